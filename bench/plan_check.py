"""`otfuse plan`'s estimates against measured fusions: peak RSS and time, side by side.

    nice -n 5 python bench/plan_check.py [--pairs bert-base,llama-1b-2l,llama-1b]
        [--cases vanilla,sinkhorn,emd] [--workdir runs/plan-check]

Each fusion runs in a fresh process (`fusion_core.fuse` on CPU); its peak RSS is the child's
ru_maxrss from wait4, its time the fusion's own wall time (imports excluded, as in the
estimate), beside its CPU seconds and the load average when it started: on a shared machine
the wall time stretches with the load, so compare at load ~0. The parents are random init,
made here and cached under --workdir: a BERT-base
pair (float32) and Llama-3.2-1B-shaped pairs (hidden 2048, 32 heads, 8 key/value heads, MLP
8192, vocab 128256, tied embeddings, bf16) at 2 and 16 layers. A case whose estimate does not
fit in half the memory available now (a shared machine) is skipped, as the service would
refuse it. Goals
(issue 9): memory within 30%, time within 2x. Prints one table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fusion_core.headers import LocalFolder  # noqa: E402
from fusion_core.plan import plan  # noqa: E402
from fusion_core.plan_costs import CostModel  # noqa: E402
from fusion_core.spec import FusionSpec  # noqa: E402

GIB = 1 << 30
LLAMA_1B = {
    "hidden_size": 2048,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 8192,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "head_dim": 64,
}
CASES = {
    "vanilla": FusionSpec(method="vanilla"),
    "sinkhorn": FusionSpec(solver="sinkhorn", reg=0.05),
    "emd": FusionSpec(solver="emd"),
    # activations of DATA_SAMPLES examples of DATA_SEQ tokens, held for every tap
    "activations": FusionSpec(alignment="activations", samples=64),
}
DATA_SAMPLES, DATA_SEQ = 64, 128

MAKE = """
import sys, torch, transformers
from safetensors.torch import save_file
kind, folder, seed, layers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if kind == "bert":
    config = transformers.BertConfig()
    config.architectures = ["BertModel"]
    cls, dtype = transformers.BertModel, torch.float32
else:
    config = transformers.LlamaConfig(**{**{LLAMA}, "num_hidden_layers": layers})
    config.architectures = ["LlamaForCausalLM"]
    config.torch_dtype = "bfloat16"
    cls, dtype = transformers.LlamaForCausalLM, torch.bfloat16
with torch.device("meta"):
    skeleton = cls(config)
gen = torch.Generator().manual_seed(seed)
state = {}
for key, t in skeleton.state_dict().items():
    if key == "lm_head.weight" and config.tie_word_embeddings:
        continue
    if t.dim() == 1:
        value = torch.ones(t.shape) if "norm" in key.lower() else torch.zeros(t.shape)
    else:
        value = torch.randn(t.shape, generator=gen) * 0.02
    state[key] = value.to(dtype if t.is_floating_point() else t.dtype)
if kind == "bert":
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
save_file(state, folder + "/model.safetensors", metadata={"format": "pt"})
config.save_pretrained(folder)
"""

RUN = """
import json, sys, time, resource
from fusion_core import FusionSpec, fuse
spec = FusionSpec(**json.loads(sys.argv[3]))
started = time.perf_counter()
fuse(sys.argv[1].split(","), sys.argv[2], spec, data=sys.argv[4] or None)
seconds = time.perf_counter() - started
gpu = None
if spec.device.startswith("cuda"):
    import torch
    gpu = torch.cuda.max_memory_allocated()
print(json.dumps({"seconds": seconds, "gpu_bytes": gpu}))
"""

CALIBRATE = """
import json, resource, sys, time
started = time.process_time()
import torch
from safetensors import safe_open
from fusion_core import api  # noqa: F401  (what a fusion process imports)
from fusion_core.assignment import assign
from fusion_core.cost import block_cost
from fusion_core.solvers import sinkhorn
threads = torch.get_num_threads()
result = {"baseline_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}

def cpu(f, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        t = time.process_time()
        f()
        best = min(best, time.process_time() - t)
    return best

# float32 GEMM, both threads busy: flops per idle wall second = flops / (cpu / threads)
a, b = torch.randn(2048, 8192), torch.randn(8192, 2048)
result["cpu_flops"] = 2 * 2048 * 8192 * 2048 / (cpu(lambda: a @ b) / threads)
x, y = torch.randn(1 << 25), torch.randn(1 << 25)
result["memory_bandwidth"] = 3 * 4 * (1 << 25) / (cpu(lambda: x.mul(0.5).add_(y)) / threads)
# reading a parent's tensors (page cache -> tensors, as the engine loads them)
path = sys.argv[1]
def read():
    with safe_open(path, "pt") as handle:
        for key in handle.keys():
            handle.get_tensor(key).float()
import os
result["read_bandwidth"] = os.path.getsize(path) / cpu(read, 2)
# Sinkhorn on the cost of two random layers (what random-init parents give), one thread
# mostly (matrix-vector products): passes over the kernel, at memory_bandwidth
for n, f in ((768, 3072), (3072, 768)):
    m1, m2 = torch.randn(n, f) * 0.02, torch.randn(n, f) * 0.02
    cost = block_cost([m1], [m2])
    seconds = cpu(lambda: sinkhorn(cost, 0.05), 1) / threads
    width = 8 if cost.numel() <= 4_000_000 else 4
    result[f"sinkhorn_passes_{n}"] = seconds * result["memory_bandwidth"] / (width * 2 * n * n)
# exact assignment (lapx, one core) on the costs of two random-init 3072-wide layers
m1, m2 = torch.randn(3072, 1536) * 0.02, torch.randn(3072, 1536) * 0.02
cost = block_cost([m1], [m2])
result["emd_seconds_at_3072"] = cpu(lambda: assign(cost), 1)
print(json.dumps(result))
"""


def calibrate(folder: Path) -> dict:
    """The cost model's machine constants, measured in a fresh process in CPU seconds (per
    thread busy), so a loaded machine changes them less than wall time would."""
    done = subprocess.run(
        [sys.executable, "-c", CALIBRATE, str(folder / "model.safetensors")],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def make_pair(workdir: Path, kind: str, layers: int) -> list[Path]:
    folders = []
    for seed in (0, 1):
        folder = workdir / f"{kind}-{layers}l-{seed}"
        if not (folder / "config.json").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            code = MAKE.replace("{LLAMA}", repr(LLAMA_1B))
            subprocess.run(
                [sys.executable, "-c", code, kind, str(folder), str(seed), str(layers)],
                check=True,
                cwd=REPO,
            )
        folders.append(folder)
    return folders


LLAMA_3_8B = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
}

SPARSE = """
import json, math, os, sys, torch, transformers
folder, config = sys.argv[1], json.loads(sys.argv[2])
config = transformers.LlamaConfig(**config)
config.architectures = ["LlamaForCausalLM"]
with torch.device("meta"):
    skeleton = transformers.LlamaForCausalLM(config)
header, offset = {}, 0
for key, t in skeleton.state_dict().items():
    if key == "lm_head.weight" and config.tie_word_embeddings:
        continue
    size = math.prod(t.shape) * 2
    header[key] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [offset, offset + size]}
    offset += size
raw = json.dumps(header).encode()
raw += b" " * (-len(raw) % 8)
with open(folder + "/model.safetensors", "wb") as handle:
    handle.write(len(raw).to_bytes(8, "little") + raw)
    handle.truncate(8 + len(raw) + offset)  # sparse: the plan reads headers only
config.save_pretrained(folder)
"""


def make_sparse_pair(workdir: Path, name: str, config: dict) -> list[Path]:
    """A pair whose safetensors files hold real headers over holes (no disk used): enough for
    a plan, which never reads tensors."""
    folders = []
    for seed in (0, 1):
        folder = workdir / f"{name}-sparse-{seed}"
        if not (folder / "config.json").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            code = [sys.executable, "-c", SPARSE, str(folder), json.dumps(config)]
            subprocess.run(code, check=True, cwd=REPO, capture_output=True)
        folders.append(folder)
    return folders


def predictions(workdir: Path) -> None:
    """What the plan predicts for pairs too large to fuse here: Llama-3.2-1B- and
    Llama-3-8B-shaped (bf16), with today's engine and the streaming one, CPU and CUDA."""
    from fusion_core.plan_costs import CURRENT, STREAMING

    print(
        f"{'pair':<10} {'case':<9} {'engine':<10} {'device':<5} {'host GiB':>9} "
        f"{'GPU GiB':>8} {'s':>8}"
    )
    for name, config in (("llama-1b", LLAMA_1B), ("llama-8b", LLAMA_3_8B)):
        folders = make_sparse_pair(workdir, name, config)
        for case in ("vanilla", "sinkhorn", "emd"):
            for engine in (CURRENT, STREAMING):
                for device in ("cpu", "cuda"):
                    spec = FusionSpec(**{**CASES[case].__dict__, "device": device})
                    est = plan(
                        [LocalFolder(f) for f in folders], spec, costs=CostModel(engine=engine)
                    ).estimate
                    gpu = (
                        f"{est.device_peak_bytes / GIB:8.1f}" if est.device_peak_bytes else " " * 8
                    )
                    print(
                        f"{name:<10} {case:<9} {engine.name:<10} {device:<5} "
                        f"{est.host_peak_bytes / GIB:9.1f} {gpu} {est.seconds:8.0f}"
                    )


PAIRS = {
    "bert-base": ("bert", 12),
    "llama-1b-2l": ("llama", 2),
    "llama-1b-4l": ("llama", 4),
    "llama-1b": ("llama", 16),
}


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def make_data(folder: Path) -> Path:
    """Random token ids for activations: DATA_SAMPLES x DATA_SEQ, the parents' vocabulary."""
    path = folder.parent / f"{folder.name}-tokens.safetensors"
    if not path.is_file():
        code = (
            "import json, sys, torch; from safetensors.torch import save_file; "
            "c = json.load(open(sys.argv[1] + '/config.json')); "
            f"ids = torch.randint(c['vocab_size'], ({DATA_SAMPLES}, {DATA_SEQ})); "
            "save_file({'input_ids': ids, 'attention_mask': torch.ones_like(ids)}, sys.argv[2])"
        )
        subprocess.run([sys.executable, "-c", code, str(folder), str(path)], check=True)
    return path


MEASURED_GPU: list[int | None] = [None]  # the last fusion's torch peak on the GPU


def measure(
    folders: list[Path], spec: FusionSpec, out: Path, data: Path | None = None
) -> tuple[float, float, int]:
    """(fusion wall seconds, the child's CPU seconds, peak RSS bytes) of one fusion in a
    fresh process. CPU seconds include the imports (about 3 s)."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    chosen = ("method", "solver", "reg", "alignment", "samples", "device")
    fields = {k: v for k, v in spec.__dict__.items() if k in chosen}
    args = [sys.executable, "-c", RUN, ",".join(map(str, folders)), str(out), json.dumps(fields)]
    args.append(str(data) if data else "")
    child = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(child.pid, 0)
    output = child.stdout.read()
    child.stdout.close()
    child.returncode = os.waitstatus_to_exitcode(status)
    shutil.rmtree(out, ignore_errors=True)
    if child.returncode != 0:
        raise RuntimeError(f"fusion failed ({child.returncode})")
    result = json.loads(output.strip().splitlines()[-1])
    MEASURED_GPU[0] = result["gpu_bytes"]
    return result["seconds"], usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="bert-base,llama-1b-2l,llama-1b")
    parser.add_argument("--cases", default="vanilla,sinkhorn,emd")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "plan-check")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument(
        "--device", default="cpu", help="cuda: also the GPU peak (torch's allocator) vs the plan"
    )
    parser.add_argument(
        "--calibrate", action="store_true", help="measure the machine constants and exit"
    )
    parser.add_argument(
        "--predict",
        action="store_true",
        help="print the plan's figures for 1B- and 8B-shaped pairs (headers only) and exit",
    )
    args = parser.parse_args()
    if args.predict:
        predictions(args.workdir)
        return
    if args.calibrate:
        folder = make_pair(args.workdir, "bert", 12)[0]
        constants = CostModel()
        for name, value in calibrate(folder).items():
            current = getattr(constants, name, None)
            shown = f"{current:.3g}" if current is not None else "-"
            print(f"{name:<24} measured {value:.3g}   in plan_costs.py {shown}")
        return
    rows = []
    header = (
        f"{'pair':<12} {'case':<9} {'est GiB':>8} {'meas GiB':>9} {'ratio':>6} "
        f"{'est s':>7} {'meas s':>7} {'ratio':>6} {'cpu s':>7} {'load':>5}"
    )
    print(header)
    for pair in args.pairs.split(","):
        kind, layers = PAIRS[pair]
        folders = make_pair(args.workdir, kind, layers)
        for case in args.cases.split(","):
            spec = FusionSpec(**{**CASES[case].__dict__, "device": args.device})
            started = time.perf_counter()
            data = make_data(folders[0]) if spec.needs_activations else None
            tokens = DATA_SAMPLES * DATA_SEQ if data else None
            report = plan([LocalFolder(f) for f in folders], spec, data_tokens=tokens)
            plan_seconds = time.perf_counter() - started
            if not report.compatible or report.estimate is None:
                print(f"{pair:<12} {case:<9} not compatible: {report.problem}")
                continue
            est = report.estimate
            if est.host_peak_bytes > 0.5 * available_bytes():
                print(
                    f"{pair:<12} {case:<9} {est.host_peak_bytes / GIB:8.2f} {'skipped':>9}  "
                    f"(> 50% of {available_bytes() / GIB:.1f} GiB available)   "
                    f"{est.seconds:7.1f}"
                )
                continue
            load = os.getloadavg()[0]
            seconds, cpu, peak = measure(folders, spec, args.workdir / "out", data)
            row = {
                "pair": pair,
                "case": case,
                "estimate_bytes": est.host_peak_bytes,
                "measured_bytes": peak,
                "estimate_gpu_bytes": est.device_peak_bytes,
                "measured_gpu_bytes": MEASURED_GPU[0],
                "estimate_seconds": est.seconds,
                "measured_seconds": seconds,
                "cpu_seconds": cpu,
                "load": load,
                "plan_seconds": plan_seconds,
                "memory_parts": est.memory,
                "time_parts": est.time,
            }
            rows.append(row)
            print(
                f"{pair:<12} {case:<9} {est.host_peak_bytes / GIB:8.2f} {peak / GIB:9.2f} "
                f"{est.host_peak_bytes / peak:6.2f} {est.seconds:7.1f} {seconds:7.1f} "
                f"{est.seconds / seconds:6.2f} {cpu:7.1f} {load:5.1f}"
                + (
                    f"  GPU {est.device_peak_bytes / GIB:.2f} est, "
                    f"{MEASURED_GPU[0] / GIB:.2f} torch peak"
                    if MEASURED_GPU[0] is not None and est.device_peak_bytes
                    else ""
                ),
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
