"""Scale: otfuse against mergekit's linear merge, side by side in one run, on a BERT-base
pair, a Llama-3.2-1B-shaped pair (bf16, tied embeddings) and a depth sweep.

    python bench/scale.py --mergekit /work/mergekit-venv/bin/mergekit-yaml [--device cuda]
        [--workdir runs/scale] [--repeats 3] [--parts bert,llama,depth]

Every run is a subprocess (otfuse through `fusion_core.fuse`, mergekit through its CLI), so
wall time includes start-up and imports for both, and peak memory is the child's peak
resident set size as the kernel reports it to `wait4` (ru_maxrss), measured the same way
for both tools. Tools take turns, one run each per round, so a drifting machine slows
them alike. The parent process never imports torch (parents are made in children too):
a forked child's ru_maxrss starts from its parent's resident size. With --device cuda,
otfuse runs on the GPU (its peak GPU memory is added) and mergekit gets --cuda. Parents are
random inits made by this script and cached under --workdir. Prints ONE table; the figures
are in docs/benchmarks.md ("Scale").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LLAMA_1B = dict(  # Llama-3.2-1B's shapes
    hidden_size=2048,
    intermediate_size=8192,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    vocab_size=128256,
    tie_word_embeddings=True,
    rope_theta=500000.0,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
)


# -- parents ------------------------------------------------------------------------------
def bert_pair(workdir: Path) -> list[Path]:
    """Two differently seeded random BERT-base models (fp32 safetensors)."""
    import torch
    import transformers

    folders = []
    for seed in (0, 1):
        folder = workdir / f"bert-base-{seed}"
        if not (folder / "model.safetensors").is_file():
            torch.manual_seed(seed)
            config = transformers.BertConfig()
            config.architectures = ["BertModel"]
            transformers.BertModel(config).save_pretrained(str(folder))
        folders.append(folder)
    return folders


def llama_pair(workdir: Path, layers: int) -> list[Path]:
    """Two random Llama-3.2-1B-shaped models of `layers` layers, bf16 safetensors, made
    tensor by tensor (names and shapes from a meta-device model) so making them holds one
    model in bf16 at most."""
    import torch
    import transformers
    from safetensors.torch import save_file

    folders = []
    for seed in (0, 1):
        folder = workdir / f"llama-1b-{layers}l-{seed}"
        if not (folder / "model.safetensors").is_file():
            config = transformers.LlamaConfig(num_hidden_layers=layers, **LLAMA_1B)
            config.architectures = ["LlamaForCausalLM"]
            config.torch_dtype = "bfloat16"
            with torch.device("meta"):
                model = transformers.LlamaForCausalLM(config)
            gen = torch.Generator().manual_seed(seed)
            state = {}
            for name, param in model.named_parameters():  # tied lm_head: listed once
                if name.endswith("norm.weight"):
                    values = 1 + 0.1 * torch.randn(param.shape, generator=gen)
                else:
                    values = 0.02 * torch.randn(param.shape, generator=gen)
                state[name] = values.to(torch.bfloat16)
            tmp = Path(tempfile.mkdtemp(dir=workdir))
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            config.save_pretrained(str(tmp))
            del state
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
        folders.append(folder)
    return folders


# -- runs ---------------------------------------------------------------------------------
@dataclass
class Run:
    seconds: float  # wall
    cpu: float  # user + system seconds of the child (robust to a loaded machine)
    peak_rss: int  # bytes
    extra: dict = field(default_factory=dict)


def measured(command: list[str], env: dict | None = None) -> Run:
    """Run a child; its wall time and its peak resident set size from wait4."""
    started = time.perf_counter()
    child = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
    )
    # wait4 gives this child's own rusage (ru_maxrss in KiB on Linux)
    out_reader = child.stdout
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    stdout, stderr = out_reader.read(), child.stderr.read()
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{stderr[-3000:]}")
    extra = {}
    for line in stdout.splitlines():
        if line.startswith("{"):
            extra = json.loads(line)
    return Run(seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024, extra)


def otfuse_child(args) -> None:
    """In the child: one fusion, then a JSON line with its own figures."""
    import torch

    from fusion_core import FusionSpec, fuse

    spec = FusionSpec(**json.loads(args.spec))
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    fuse(args.models, args.out, spec)
    figures = {"fuse_seconds": time.perf_counter() - started}
    if spec.device.startswith("cuda"):
        figures["peak_gpu"] = torch.cuda.max_memory_allocated()
    print(json.dumps(figures))


def make_child(args) -> None:
    """In a child: make (or find cached) parents; print their folders as a JSON line."""
    kind, layers = args.make.split(":")
    folders = bert_pair(args.workdir) if kind == "bert" else llama_pair(args.workdir, int(layers))
    print(json.dumps([str(f) for f in folders]))


def parents(workdir: Path, kind: str, layers: int = 0) -> list[Path]:
    command = [sys.executable, str(Path(__file__).resolve()), "--make", f"{kind}:{layers}"]
    command += ["--workdir", str(workdir)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"making {kind} parents failed:\n{done.stderr[-3000:]}")
    return [Path(p) for p in json.loads(done.stdout.strip().splitlines()[-1])]


def run_otfuse(models: list[Path], out: Path, spec: dict, threads: int) -> Run:
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--out", str(out)]
    command += ["--spec", json.dumps(spec), "--threads", str(threads), "--models"]
    command += [str(m) for m in models]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return measured(command, env)


# mergekit 0.1.5 fails on BERT before merging (`[name] + aliases` where aliases is a tuple,
# for the optional position_ids): its CLI is run with that one expression fixed.
MERGEKIT_SHIM = """
import inspect, sys, textwrap
import mergekit.plan as plan
source = textwrap.dedent(inspect.getsource(plan.MergePlanner.plan_tensor))
source = source.replace("[w_in.name] + (w_in.aliases or [])", "[w_in.name, *(w_in.aliases or ())]")
namespace = {}
exec(compile(source, plan.__file__, "exec"), vars(plan), namespace)
plan.MergePlanner.plan_tensor = namespace["plan_tensor"]
from mergekit.scripts.run_yaml import main
sys.argv[0] = "mergekit-yaml"
sys.exit(main())
"""


def run_mergekit(mergekit: str, models: list[Path], out: Path, dtype: str, cuda: bool) -> Run:
    shutil.rmtree(out, ignore_errors=True)
    config = out.parent / f"{out.name}.yml"
    lines = ["merge_method: linear", f"dtype: {dtype}", "models:"]
    for model in models:
        lines += [f"  - model: {model}", "    parameters:", "      weight: 0.5"]
    config.write_text("\n".join(lines) + "\n")
    python = Path(mergekit).parent / "python"
    command = [str(python), "-c", MERGEKIT_SHIM, str(config), str(out), "--no-copy-tokenizer"]
    if cuda:
        command.append("--cuda")
    return measured(command)


def output_dtypes(folder: Path) -> str:
    """The dtypes the written safetensors headers name (floating ones)."""
    found = set()
    for file in folder.glob("*.safetensors"):
        with file.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        found |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return ",".join(sorted(d for d in found if d.startswith(("F", "BF"))))


def predicted(models: list[Path], spec: dict) -> tuple[float, float] | None:
    """`otfuse plan`'s estimate (host peak bytes, seconds) for the run, or None when the
    estimator is missing or fails (then the table says n/a)."""
    sys.path.insert(0, str(REPO))
    try:
        from fusion_core.plan import local_plan
        from fusion_core.spec import FusionSpec
    except ImportError:
        return None
    try:
        estimate = local_plan([str(m) for m in models], FusionSpec(**spec)).estimate
    except Exception as exc:  # a missing figure, not a failed bench
        print(f"note: no estimate: {exc}", file=sys.stderr)
        return None
    if estimate is None:
        return None
    return float(estimate.host_peak_bytes), float(estimate.seconds)


# -- the table ----------------------------------------------------------------------------
@dataclass
class Row:
    pair: str
    tool: str
    runs: list[Run]
    dtype: str = ""
    baseline: Row | None = None
    prediction: tuple[float, float] | None = None

    @property
    def seconds(self) -> float:
        return statistics.median(r.seconds for r in self.runs)

    def ratio(self, what: str) -> float:
        """Median over rounds of this row's figure over its baseline's in the same round."""
        assert self.baseline is not None
        pairs = zip(self.runs, self.baseline.runs, strict=False)
        return statistics.median(getattr(r, what) / getattr(b, what) for r, b in pairs)

    @property
    def cpu(self) -> float:
        return statistics.median(r.cpu for r in self.runs)

    @property
    def peak(self) -> int:
        return max(r.peak_rss for r in self.runs)


def method_of(spec: dict) -> str:
    return spec.get("method") or spec["solver"]


def print_table(rows: list[Row], header: str) -> None:
    print(header)
    columns = [
        "pair",
        "tool / method",
        "runs",
        "wall s",
        "CPU s",
        "peak RSS MiB",
        "time x mk",
        "CPU x mk",
        "mem x mk",
        "peak GPU MiB",
        "out dtype",
        "pred. MiB",
        "pred. s",
    ]
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        gpu = [r.extra.get("peak_gpu") for r in row.runs if r.extra.get("peak_gpu")]
        cells = [
            row.pair,
            row.tool,
            str(len(row.runs)),
            f"{row.seconds:.1f}",
            f"{row.cpu:.1f}",
            f"{row.peak / 2**20:,.0f}",
            f"{row.ratio('seconds'):.2f}" if row.baseline else "",
            f"{row.ratio('cpu'):.2f}" if row.baseline else "",
            f"{row.peak / row.baseline.peak:.2f}" if row.baseline else "",
            f"{max(gpu) / 2**20:,.0f}" if gpu else "",
            row.dtype,
            f"{row.prediction[0] / 2**20:,.0f}" if row.prediction else "n/a",
            f"{row.prediction[1]:.1f}" if row.prediction else "n/a",
        ]
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit", default=os.environ.get("OTFUSE_MERGEKIT"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", type=Path, default=Path("runs/scale"))
    parser.add_argument("--repeats", type=int, default=3, help="BERT-base runs per row")
    parser.add_argument("--llama-repeats", type=int, default=1, help="1B runs per row")
    parser.add_argument("--parts", default="bert,llama,depth", help="in the order to run")
    parser.add_argument(
        "--methods", default="vanilla,sinkhorn,emd", help="otfuse rows to run (a subset)"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    # the child's arguments
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="*", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--make", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        otfuse_child(args)
        return
    if args.make:
        make_child(args)
        return
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    cuda = args.device.startswith("cuda")
    device = {"device": args.device}
    sinkhorn = {"solver": "sinkhorn", "reg": 0.05, **device}
    out = args.workdir / "out"
    load_before = os.getloadavg()
    rows: list[Row] = []

    def log(row: Row) -> None:  # each row as it is measured (a long run's partial figures)
        print(
            f"[{time.strftime('%H:%M:%S')}] {row.pair} | {row.tool}: wall {row.seconds:.1f} s, "
            f"CPU {row.cpu:.1f} s, peak RSS {row.peak / 2**20:,.0f} MiB, {row.dtype}, "
            f"load {os.getloadavg()[0]:.1f}",
            file=sys.stderr,
            flush=True,
        )

    def pair_rows(pair, models, dtype, tools, repeats, with_mergekit=True):
        """Every tool once per round, round after round: on a VM whose speed drifts by tens
        of percent over minutes, each tool then sees the same phases, and each ratio is the
        median over rounds of otfuse's run against mergekit's in the same round."""
        tools = [(label, spec) for label, spec in tools if method_of(spec) in methods]
        if args.mergekit and with_mergekit:
            tools.insert(0, ("mergekit linear", None))
        runs = {label: [] for label, _ in tools}
        dtypes = {}
        for _ in range(repeats):
            for label, spec in tools:
                if spec is None:
                    run = run_mergekit(args.mergekit, models, out, dtype, cuda)
                else:
                    run = run_otfuse(models, out, spec, args.threads)
                runs[label].append(run)
                dtypes[label] = output_dtypes(out)
        baseline = None
        result = {}
        for label, spec in tools:
            row = Row(pair, label, runs[label], dtypes[label], baseline)
            if spec is None:
                baseline = row
            else:
                row.models, row.spec = models, spec  # predicted after every run (see below)
            rows.append(row)
            result[label] = row
            log(row)
        return result

    methods = args.methods.split(",")
    vanilla = {"method": "vanilla", **device}
    emd = {"solver": "emd", **device}
    ot_label = "otfuse OT weights, Sinkhorn 0.05"
    depth_rows = {}
    for part in parts:  # in the order given: the most wanted figures first
        if part == "bert":
            tools = [("otfuse vanilla", vanilla), (ot_label, sinkhorn)]
            tools.append(("otfuse OT weights, EMD", emd))
            models = parents(args.workdir, "bert")
            pair_rows("BERT-base", models, "float32", tools, args.repeats)
        for layers in {"llama": [16], "depth": [4, 8]}.get(part, []):
            pair, models = f"Llama-1B-shape {layers}L bf16", parents(args.workdir, "llama", layers)
            tools = [("otfuse vanilla", vanilla), (ot_label, sinkhorn)]
            if layers == 16:  # hard plans at 1B: exact assignments of 8192 neurons, gathers
                tools.append(("otfuse OT weights, EMD", emd))
            # the depth sweep's shallower pairs: otfuse alone
            found = pair_rows(pair, models, "bfloat16", tools, args.llama_repeats, layers == 16)
            depth_rows[layers] = (found.get("otfuse vanilla"), found.get(ot_label))
    for row in rows:  # imports torch: only once no more runs are forked from here
        if hasattr(row, "spec"):
            row.prediction = predicted(row.models, row.spec)
    print_table(
        rows,
        f"otfuse vs mergekit linear, device={args.device}, threads={args.threads}, "
        f"load average {load_before[0]:.1f} before / {os.getloadavg()[0]:.1f} after "
        f"(1-minute); rounds of one run per tool; wall and CPU (user + system) time: median "
        "of the runs; x mk: median over rounds of the ratio to mergekit's run in the same "
        "round; peak RSS: the largest",
    )
    if len(depth_rows) > 1:
        print("\ndepth sweep (same width): per layer count, wall s / peak RSS MiB")
        for layers in sorted(depth_rows):
            vanilla, ot = depth_rows[layers]
            if vanilla is None or ot is None:
                continue
            print(
                f"  {layers:>2} layers: vanilla {vanilla.seconds:.1f} s / "
                f"{vanilla.peak / 2**20:,.0f} MiB; OT {ot.seconds:.1f} s / "
                f"{ot.peak / 2**20:,.0f} MiB"
            )


if __name__ == "__main__":
    main()
