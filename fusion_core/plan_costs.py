"""The cost model behind `otfuse plan`: peak memory and time of a fusion from its graph's
shapes, with every constant in one place (no torch here).

Memory, on the host (and on the GPU for cuda):

    baseline            the process: Python, torch, fusion_core imported (and transformers
                        where a live model runs: activations, a search's scoring)
  + parents resident    file pages of the parents kept mapped (mmap reads stay in RSS)
  + step                the tensors of every parent loaded together (a layer; an attention
                        block's Q, K, V), in float32 on the device times WORK_COPIES (loaded,
                        aligned, the running average, temporaries); on cuda also as stored
                        and fused on the host; vocabulary tables in row blocks when the
                        engine does so
  + plans               per non-anchor model n_model x n_anchor float32 for the maps alive at
                        once (the plan, and for a soft plan its normalized map per role)
  + solver              the problem solved in that step: Sinkhorn's cost, scaled cost and
                        kernel (SOLVER_COPIES; the plan is made in the kernel), or exact OT's
                        cost and dense permutation plan
  + output buffer       fused bytes held before they are written (the whole model for the
                        in-memory engine; the streaming one writes rows in place, on a
                        thread that may have up to 64 MiB queued)
  + activations         calibration activations held (activation alignment, weighted merges)

Before the walk, activations are collected model by model (`activations.collect`): the
process with transformers, the streamed model's weights (its largest module as stored and
the 256 MiB it keeps resident) and a batch's forward pass (FORWARD_COPIES float32 tensors of
its tokens by the widest space); the taps go to disk. The peak is the larger of the two.

Memory is a timeline: the peak is the largest sum over the steps of the walk of what is held
then (plans so far or alive, output so far, the step, its solver).

Time = PREPARE_SECONDS + bytes read / READ_BANDWIDTH + bytes written / WRITE_BANDWIDTH
+ float32 passes over every tensor / MEMORY_BANDWIDTH + flops of cost matrices (2 n_m n_a F)
and plan products
(dense soft plans: 2 n_a per element; hard plans: gathers, as memory passes) / the device's
flop rate + solver time (Sinkhorn: SINKHORN_PASSES passes over each n_m x n_a kernel; EMD: the
assignment's ~n^2.6 (JV) on a host core, or on a GPU for problems of AUCTION_MIN_N and more
the auction's rounds, ~2.4 n, at a launch-bound time each) + forward passes for activations.

The engine's own structure is an `EngineProfile`: the in-memory engine (before issue 9) held
every plan of a walk and the whole fused model until it wrote it; the streaming engine, which
fusion_core runs, frees plans when no later node needs them, reads rows into memory it owns
(no mmap), processes vocabulary tables in 32 MiB row blocks, and writes each tensor's rows in
place in shards laid out from the anchor's headers. `bench/plan_check.py` measures
fusions side by side with these estimates and prints the ratios; the constants below were
calibrated with it on the 2-core development machine (see docs/benchmarks.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .compat import AUCTION_MIN_N, STREAM_REFINEMENTS
from .headers import DTYPE_BYTES

if TYPE_CHECKING:
    from .plan import Graph
    from .spec import FusionSpec

MIB = 1 << 20
STREAMED_CACHE_BYTES = 256 * MIB  # streamed.CACHE_BYTES: weights kept between batches
COLLECTION_BATCH = 32  # activations.BATCH_SIZE: sequences per forward pass


@dataclass(frozen=True)
class EngineProfile:
    """What the engine holds, which the cost model cannot read off the graph."""

    name: str
    plans_freed: bool  # a plan is dropped after the last node that reads it
    vanilla_plans: bool  # vanilla builds (dense identity) plans and applies them
    # float32 bytes of rows processed at once where no plan acts on a tensor's rows
    # (vocabulary tables); None: whole tensors
    row_block_bytes: int | None
    shard_bytes: float  # fused bytes held before a write (inf: the whole model)
    output_copies: float  # copies of the held output while it is serialized
    parents_resident: float  # fraction of the parents' file bytes that stays in RSS
    activations_per_layer: bool  # only the current layer's taps held (else all taps)
    stream_gram: bool  # shared residual: stream features accumulated as a Gram matrix
    write_behind_bytes: float = 0.0  # fused bytes queued for the writing thread, at most
    # transformers imported whatever the spec (else only for activations)
    imports_transformers: bool = False
    normalized_maps: bool = False  # a normalized copy of each soft plan per role it maps


CURRENT = EngineProfile(
    name="in-memory",
    plans_freed=False,
    vanilla_plans=True,
    row_block_bytes=None,
    shard_bytes=math.inf,
    output_copies=1.0,  # the fused tensors (save_file adds no measurable copy)
    parents_resident=1.0,  # safe_open handles stay open: every page read stays mapped
    activations_per_layer=False,
    stream_gram=False,
    normalized_maps=True,
    imports_transformers=True,  # the config check built its meta model
)

STREAMING = EngineProfile(
    name="streaming",
    plans_freed=True,
    vanilla_plans=False,
    row_block_bytes=32 << 20,
    shard_bytes=0.0,  # shards laid out from the anchor's headers, rows written in place
    output_copies=1.0,
    parents_resident=0.0,
    activations_per_layer=True,  # spilled to disk, read tap by tap (activations.SpilledTaps)
    stream_gram=True,
    write_behind_bytes=64 * MIB,  # writer.WRITE_AHEAD_BYTES
)


# A job with more than one candidate (a recipe search or a regularizer sweep) fuses each in
# memory to score it: the fused tensors and their plans (kept for the transport maps) are held,
# the best candidate's while the next one is fused, and a live model of the anchor's
# architecture is loaded with them; a single recipe streams to disk.
SEARCH = EngineProfile(
    name="in-memory (recipe search)",
    plans_freed=False,
    vanilla_plans=False,
    row_block_bytes=32 << 20,
    shard_bytes=math.inf,
    output_copies=3.0,  # the best candidate, the current one, the live model scoring it
    parents_resident=0.0,
    activations_per_layer=True,
    stream_gram=True,
    imports_transformers=True,  # candidates are scored by live models
)

# The engine this code runs (issue 9's streaming engine): the cost model describes it by
# default; CURRENT stays to describe the in-memory engine it replaced.
ENGINE = STREAMING


@dataclass(frozen=True)
class CostModel:
    """Calibrated constants (bench/plan_check.py on the 2-core development machine; GPU
    figures from the H100's data sheet until measured there)."""

    engine: EngineProfile = ENGINE
    # memory
    baseline_bytes: float = 225 * MIB  # python + torch + fusion_core, measured
    transformers_bytes: float = 150 * MIB  # its modeling code, where a live model runs
    cuda_host_bytes: float = 1.5 * (1 << 30)  # the CUDA context's host memory (libraries)
    cuda_device_bytes: float = 0.5 * (1 << 30)  # the CUDA context on the device
    work_copies: float = 2.5  # float32 copies of a step's tensors alive at once (measured)
    # a collection batch's float32 activations alive at once, by the widest space (a
    # SwiGLU MLP's gate, up and their product; the chunk being spilled)
    forward_copies: float = 3.0
    # vanilla: the parents' rows as read (the anchor's made the running mean in place), the
    # mean in float32 and in the output dtype: 1.0 (float32 parents) to 1.25 (bf16)
    average_copies: float = 1.25
    # vanilla over parents stored in another dtype than float32: row blocks of two sizes
    # (as stored, and float32) cycle through glibc's heap, which keeps freed ones (its mmap
    # threshold rises with the first freed block): measured 403-575 MiB peak RSS against
    # 387 MiB live on the 1B bf16 pair, one queue's worth more on average
    conversion_slack_bytes: float = 128 * MIB
    solver_copies: float = 3.0  # Sinkhorn's cost, scaled cost and kernel (the plan, in place)
    # time, CPU
    cpu_flops: float = 170e9  # float32 GEMM on 2 idle cores (measured 177e9: CPU s / threads)
    read_bandwidth: float = 2e9  # positioned reads from page cache, checked, to float32
    prepare_seconds: float = 0.3  # opening parents, the config-vs-tensors check
    write_bandwidth: float = 0.8e9  # safetensors serialization and write, bytes/s
    memory_bandwidth: float = 8.5e9  # float32 elementwise passes, bytes/s (measured 8.8e9)
    elementwise_passes: float = 6.0  # convert, scale, add, convert back... per tensor element
    sinkhorn_passes: float = 30.0  # passes over an n x m kernel (measured 19-33)
    # exact assignment (JV, lapx) on one host core, ~n^2.6 on random-init neuron costs: 0.28 s
    # at 3072, 3.7 s at 8192, 14.5 s at 14336 (bench/assignment.py; an n^3 law read 2.2-3x
    # high at 8192-14336)
    emd_seconds_at_3072: float = 0.3
    emd_growth: float = 2.6
    # time, CUDA (data sheet: fp32 without TF32, HBM, PCIe 4; launch-bound solver loops)
    cuda_flops: float = 40e12
    cuda_memory_bandwidth: float = 1.5e12
    cuda_transfer_bandwidth: float = 12e9
    cuda_seconds_per_pass: float = 30e-6  # one Sinkhorn pass on small problems: launches
    # exact EMD's auction (problems of AUCTION_MIN_N and more): rounds per neuron (measured
    # 1.7-2.4 on random-init costs, counted on CPU) and the time of a round (a few dozen
    # launches and one host sync; an estimate)
    auction_rounds_per_n: float = 2.4
    cuda_seconds_per_round: float = 200e-6
    default_tokens: int = 200 * 128  # activation tokens when the data's shape is not known

    def emd_seconds(self, n: int) -> float:
        """One exact assignment of n neurons by JV on a host core."""
        return self.emd_seconds_at_3072 * (n / 3072) ** self.emd_growth


@dataclass
class Estimate:
    device: str
    engine: str
    host_peak_bytes: int
    device_peak_bytes: int | None  # cuda only
    seconds: float  # one fusion
    memory: dict[str, int] = field(default_factory=dict)  # the parts of the peak
    time: dict[str, float] = field(default_factory=dict)
    flops: float = 0.0
    notes: list[str] = field(default_factory=list)
    fusions: int = 1  # fusions the job runs (a sweep or recipe search: one per point)
    job_seconds: float = 0.0  # all of them
    collection_peak_bytes: int | None = None  # host peak while collecting activations


def estimate(
    graph: Graph,
    spec: FusionSpec,
    costs: CostModel,
    data_tokens: int | None = None,
    fusions: int = 1,
) -> Estimate:
    engine = costs.engine
    cuda = spec.device.startswith("cuda")
    models, anchor, others = graph.models, graph.anchor, graph.others
    notes: list[str] = []

    # -- memory along the walk: at each step, what is held then -------------------------------
    # a block-wise average: every tensor alone, in row blocks (vanilla without plans)
    averaging = not graph.ot and not engine.vanilla_plans and bool(engine.row_block_bytes)

    def rows(p, shape) -> int:
        """Elements of a tensor processed at once (vocabulary tables in row blocks)."""
        numel = math.prod(shape)
        untransported = p.axes and p.axes[0] is None
        if engine.row_block_bytes and (untransported or averaging) and len(shape) > 1:
            per_row = numel // max(shape[0], 1)
            return min(numel, max(1, engine.row_block_bytes // (4 * per_row)) * per_row)
        return numel

    maps = graph.maps() if graph.ot else (graph.identity_maps() if engine.vanilla_plans else [])
    hard = spec.solver == "emd"
    sinkhorn = graph.ot and spec.solver == "sinkhorn"

    def plan_bytes(m) -> float:
        """The plan (soft maps are applied as the plan and scaling vectors; a hard square
        plan also as gather indices), and for the in-memory engine a normalized map per
        role it is applied in."""
        square = all(a == b for a, b in m.shapes)
        hard_square = hard and square and m.how != "merge"
        maps = len(m.roles) if engine.normalized_maps and not hard_square else 0
        return (1 + maps) * sum(4 * a * b for a, b in m.shapes)

    def auction(m) -> bool:
        """Whether exact OT solves `m` with the auction on the GPU (`assignment.assign`)."""
        square = all(a == b for a, b in m.shapes)
        return cuda and square and m.how == "ot" and max(a for a, _ in m.shapes) >= AUCTION_MIN_N

    def solver_bytes(m) -> float:
        """The solver's memory while it solves `m`: Sinkhorn's copies (float64 for small
        problems on CPU); exact OT's cost and dense plan (an assignment, float32), or POT's
        float64 cost and plan for rectangular problems."""
        if not graph.ot or m.how not in ("ot", "heads"):
            return 0.0
        entries = max(a * b for a, b in m.shapes) / (graph.heads_of(m) if m.how == "heads" else 1)
        if not sinkhorn:
            if auction(m):  # float32 cost, int64 costs, one problem converted in float64
                return entries * 20
            return entries * (8 if all(a == b for a, b in m.shapes) else 20)
        return costs.solver_copies * entries * (8 if entries <= 4_000_000 and not cuda else 4)

    # the shared residual stream: its Gram matrices (and one tap), solved before the walk
    tokens = data_tokens or costs.default_tokens
    stream_bytes = 0.0
    if graph.stream:
        n_stream = graph.width(anchor, next(iter(graph.stream)))
        if engine.stream_gram:
            stream_bytes = 2 * 4 * n_stream * n_stream * len(others)
            if spec.alignment == "activations":  # one tap of the model and the anchor
                stream_bytes += 2 * 4 * n_stream * min(tokens, spec.max_tokens)
        elif spec.alignment == "weights":  # every stream row of both, concatenated
            stream_bytes = 2 * 4 * n_stream * graph.features("stream") * len(others)

    # activations held while the walk runs
    acts = 0.0
    if spec.needs_activations:
        held = min(tokens, spec.max_tokens)
        taps = graph.taps()
        shared_stream = spec.residual == "shared" and spec.alignment == "activations"
        # the in-memory engine's shared stream by activations held every layer's taps
        if engine.activations_per_layer and (engine.stream_gram or not shared_stream):
            layers = max(1, graph.anchor.config_value("layers"))
            taps = taps[: max(1, math.ceil(len(taps) / layers))]
        acts = len(models) * 4 * held * sum(width for _, width in taps)
        if data_tokens is None:
            notes.append(f"activations: assumed {tokens} tokens (the data's shape is not read)")

    read = sum(m.headers.file_bytes for m in models)
    fused = graph.fused()["bytes"]
    base = costs.baseline_bytes + (costs.cuda_host_bytes if cuda else 0)
    if engine.imports_transformers or spec.needs_activations:
        base += costs.transformers_bytes
    host_parts: dict[str, float] = {}
    device_parts: dict[str, float] = {}
    host_peak = device_peak = 0.0
    read_so_far = out_so_far = 0
    step_name = ""
    for at, end, params in graph.steps():
        stored = f32 = out = out_step = 0
        converted = False
        for p in params:
            f32_param = 0
            for m in models:
                if m.has(p.name):
                    entry = m.entry(p.name)
                    converted = converted or entry.dtype != "F32"
                    n = rows(p, entry.shape)
                    read_so_far += entry.nbytes
                    if cuda:  # on CPU the stored copy is freed as it is converted
                        stored += n * DTYPE_BYTES[entry.dtype]
                    f32_param += 4 * n
            f32 = max(f32, f32_param) if averaging else f32 + f32_param
            entry = anchor.entry(p.name)
            out_so_far += entry.nbytes
            out_step += entry.nbytes
            if cuda:  # the fused rows back on the host, before they are written
                out += rows(p, entry.shape) * DTYPE_BYTES[entry.dtype]
        alive = [
            m for m in maps if m.live[0] <= end and (not engine.plans_freed or m.live[1] >= at)
        ]
        # a plan solved in this step lives in the solver's kernel until it is applied
        solving = [m for m in maps if at <= m.live[0] <= end and solver_bytes(m)]
        held = {
            "plans": sum(plan_bytes(m) for m in alive if m not in solving),
            "solver": max((solver_bytes(m) for m in solving), default=0.0),
            "activations": acts,
            "step": (costs.average_copies if averaging else costs.work_copies) * f32,
        }
        if averaging and converted and not cuda:
            held["allocator"] = costs.conversion_slack_bytes
        host = {
            "baseline": base,
            "parents resident": engine.parents_resident * read_so_far,
            "output buffer": min(out_so_far, engine.shard_bytes) * engine.output_copies
            + min(out_step, engine.write_behind_bytes),  # the writer keeps up: one step
            "step on the host": stored + out,
        }
        if cuda:
            device = {"context": costs.cuda_device_bytes, **held}
            if sum(device.values()) > device_peak:
                device_peak, device_parts = sum(device.values()), device
        else:
            host |= held
        if sum(host.values()) > host_peak:
            host_peak, host_parts = sum(host.values()), host
            step_name = params[0].name if params else ""
    if stream_bytes:  # before the walk: every parent read, the stream's features held
        host = {
            "baseline": base,
            "parents resident": engine.parents_resident * read,
            "shared stream": 0.0 if cuda else stream_bytes,
        }
        if sum(host.values()) > host_peak:
            host_peak, host_parts, step_name = sum(host.values()), host, ""
        if cuda and costs.cuda_device_bytes + stream_bytes > device_peak:
            device_parts = {"context": costs.cuda_device_bytes, "shared stream": stream_bytes}
            device_peak = sum(device_parts.values())
    collection_peak = None
    if spec.needs_activations and not cuda:  # collection, before the walk
        batch_tokens = tokens * min(1.0, COLLECTION_BATCH / max(spec.samples, 1))
        widest = max([graph.width(anchor, s) for s in graph.all_spaces()], default=0)
        largest = max((e.nbytes for m in models for e in m.headers.entries.values()), default=0)
        whole = max((m.headers.file_bytes for m in models), default=0)  # a cache holds no more
        host = {
            "baseline": base,
            "collection: weights held": min(largest + STREAMED_CACHE_BYTES, whole),
            "collection: forward pass": costs.forward_copies * 4 * batch_tokens * widest,
        }
        collection_peak = int(sum(host.values()))
        if collection_peak > host_peak:
            host_peak, host_parts, step_name = collection_peak, host, ""
            notes.append("peak while collecting activations")
    memory = {k: int(v) for k, v in host_parts.items()}
    memory |= {f"device: {k}": int(v) for k, v in device_parts.items()}
    if step_name:
        notes.append(f"peak at the step of {step_name}")
    solved = [m for m in maps if m.how in ("ot", "heads")] if graph.ot else []

    # -- time -------------------------------------------------------------------------------------
    flops_rate = costs.cuda_flops if cuda else costs.cpu_flops
    bandwidth = costs.cuda_memory_bandwidth if cuda else costs.memory_bandwidth
    elements = sum(
        math.prod(m.entry(p.name).shape)
        for _, _, params in graph.steps()
        for p in params
        for m in models
        if m.has(p.name)
    )
    cost_flops = 0.0
    for m in solved:
        features = graph.features(m.name) if spec.alignment == "weights" else min(tokens, 16384)
        cost_flops += sum(2 * a * b * features for a, b in m.shapes)
    product_flops, gather_bytes = graph.product_work(maps, hard)
    solver_seconds = 0.0
    for m in solved:
        for a, b in m.shapes:
            entries = a * b / (graph.heads_of(m) if m.how == "heads" else 1)
            if spec.solver == "emd" and auction(m):
                rounds = costs.auction_rounds_per_n * a
                solver_seconds += rounds * costs.cuda_seconds_per_round
            elif spec.solver == "emd":
                solver_seconds += costs.emd_seconds(max(a, b))
            elif cuda:
                solver_seconds += costs.sinkhorn_passes * (
                    costs.cuda_seconds_per_pass + 4 * entries / bandwidth
                )
            else:
                solver_seconds += costs.sinkhorn_passes * 4 * entries * 2 / bandwidth
    passes = 1.0
    if graph.stream and spec.alignment == "weights":
        passes = 1.0 + STREAM_REFINEMENTS  # the walk repeats to refine the stream's plan
        n_stream = graph.width(anchor, next(iter(graph.stream)))
        # once a pass (the first from the tensors no inner plan acts on, each refinement as
        # it walks): `flops` below counts the passes
        cost_flops += len(others) * 2 * n_stream * n_stream * graph.features("stream")
    forward_flops = 0.0
    if spec.needs_activations:
        forward_flops = sum(2 * m.parameter_count * tokens for m in models)
    flops = passes * (cost_flops + product_flops) + forward_flops
    time = {
        "prepare": costs.prepare_seconds,
        "read": passes * read / costs.read_bandwidth,
        "write": fused / costs.write_bandwidth,
        "elementwise": passes
        * (4 * elements * costs.elementwise_passes + gather_bytes)
        / bandwidth,
        "cost matrices": passes * cost_flops / flops_rate,
        "plan products": passes * product_flops / flops_rate,
        "solver": passes * solver_seconds,
        "activations": forward_flops / flops_rate,
    }
    if cuda:
        time["transfer"] = 4 * elements / costs.cuda_transfer_bandwidth
    return Estimate(
        device=spec.device,
        engine=engine.name,
        host_peak_bytes=int(host_peak),
        device_peak_bytes=int(device_peak) if cuda else None,
        seconds=sum(time.values()),
        memory=memory,
        time={k: round(v, 3) for k, v in time.items()},
        flops=flops,
        notes=notes,
        fusions=fusions,
        job_seconds=sum(time.values()) * fusions,
        collection_peak_bytes=collection_peak,
    )
