"""`fuse`: checkpoint folders in, one fused checkpoint folder out."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch

from . import __version__
from .activations import collect
from .checkpoint import sha256_file
from .data import load_data
from .device import check_device
from .engine import Engine, EngineResult, PlanRecord, check_attention_policy
from .errors import InputError, check_cancelled
from .families import Layer, Merge, Tap
from .limits import Limits
from .modelcard import model_card
from .models import ParentModel, check_compatible, open_parent
from .progress import Progress
from .spec import FusionSpec
from .writer import CheckpointWriter, check_output_dir

ProgressCallback = Callable[[Progress], None]


@dataclass
class FusionReport:
    out: Path
    spec: FusionSpec
    models: list[str]
    seconds: float
    plans: list[PlanRecord] = field(default_factory=list)
    # With keep_plans: "model<i>/<space>" -> the solved plan (n_model, n_anchor), on CPU.
    transport_maps: dict[str, torch.Tensor] | None = None


@dataclass
class Prepared:
    """What a fusion needs that does not depend on the solver or its regularizer: the opened
    parents, the flow graph and the activations. A sweep prepares once, fuses many times."""

    parents: list[ParentModel]
    nodes: list
    spec: FusionSpec
    data: Path | None
    activations: dict | None
    seconds: float
    # how the caller names the files it gave (e.g. the URIs a service's scratch copies came
    # from): recorded in fusion.json instead of the local paths
    names: dict[str, str] = field(default_factory=dict)

    def name_of(self, path: str | Path | None) -> str | None:
        return display_name(path, self.names)


def fuse(
    model_dirs: list[str | Path],
    out: str | Path,
    spec: FusionSpec | None = None,
    data: str | Path | None = None,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    allow_pickle: bool = False,
    metrics: dict | None = None,
    limits: Limits | None = None,
    names: Mapping[str, str] | None = None,
) -> FusionReport:
    """Fuse two or more HF checkpoint folders into `out` (written atomically).

    `data` is a safetensors file of inputs, needed for activations-based alignment and the
    weighted residual policies. `metrics` (one-shot results known to the caller) go into the
    model card and fusion.json.
    """
    spec = (spec or FusionSpec()).validate(len(model_dirs))
    out = Path(out)
    check_output_dir(out)
    prepared = prepare(model_dirs, spec, data, progress, allow_pickle, limits, should_cancel, names)
    return fuse_prepared(prepared, out, prepared.spec, progress, should_cancel, metrics)


def prepare(
    model_dirs: list[str | Path],
    spec: FusionSpec | None = None,
    data: str | Path | None = None,
    progress: ProgressCallback | None = None,
    allow_pickle: bool = False,
    limits: Limits | None = None,
    should_cancel: Callable[[], bool] | None = None,
    names: Mapping[str, str] | None = None,
) -> Prepared:
    """Open and check the parents (sizes under `limits`, configs matching their tensors,
    before anything is allocated) and collect the activations `spec` needs (once)."""
    started = time.perf_counter()
    spec = (spec or FusionSpec()).validate(len(model_dirs))
    check_device(spec.device)
    report = progress or (lambda _p: None)
    parents = []
    for i, path in enumerate(model_dirs):
        check_cancelled(should_cancel)
        parents.append(open_parent(i, path, allow_pickle))
        (limits or Limits()).check(parents[-1])
    anchor = parents[spec.anchor]
    nodes = anchor.family.nodes(anchor.architecture, anchor.config_value("layers"))
    check_compatible([anchor, *[p for p in parents if p is not anchor]], [n for _, n in nodes])
    check_attention_policy([n for _, n in nodes], spec, anchor)

    activations = None
    if spec.needs_activations:
        if data is None:
            raise InputError(
                f"required for alignment={spec.alignment}, residual={spec.residual} "
                "(inputs to collect activations on)",
                field="data",
            )
        activations = _activations(
            parents, anchor, [n for _, n in nodes], spec, data, report, should_cancel
        )
    seconds = time.perf_counter() - started
    data_path = Path(data) if data else None
    return Prepared(parents, nodes, spec, data_path, activations, seconds, dict(names or {}))


def fuse_prepared(
    prepared: Prepared,
    out: str | Path,
    spec: FusionSpec | None = None,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    metrics: dict | None = None,
    keep_plans: bool = False,
) -> FusionReport:
    """Fuse prepared parents with `spec` (default: the prepared one). It may differ from the
    prepared spec in what activations do not depend on: method, solver, reg, qk, heads,
    weights; anything else raises InputError."""
    started = time.perf_counter()
    spec = (spec or prepared.spec).validate(len(prepared.parents))
    if spec.anchor != prepared.spec.anchor or (
        spec.needs_activations
        and (
            prepared.activations is None or _activation_key(spec) != _activation_key(prepared.spec)
        )
    ):
        raise InputError("the spec differs from the prepared one in what activations depend on")
    out = Path(out)
    check_output_dir(out)
    report = progress or (lambda _p: None)
    parents = prepared.parents
    anchor = parents[spec.anchor]
    engine = Engine(
        parents,
        spec.anchor,
        prepared.nodes,
        spec,
        prepared.activations,
        report,
        should_cancel,
        keep_plans=keep_plans,
    )
    buffers = [
        name
        for name in anchor.family.buffer_names(anchor.config_value("layers"))
        if anchor.has(name)
    ]
    # the fused tensors go to disk as they are produced (sharded like Hugging Face does)
    with CheckpointWriter(
        out, anchor, engine.output_names() + buffers, spec.max_shard_size
    ) as writer:
        result = engine.run(writer.write)
        for name in buffers:  # not fused: the anchor's own
            writer.write(name, anchor.tensor(name))
        seconds = time.perf_counter() - started + prepared.seconds
        record = fusion_record(prepared, anchor, spec, seconds, result, metrics)
        writer.publish(record, model_card(record))
    maps = result.kept_plans if keep_plans else None
    return FusionReport(out, spec, [str(p.path) for p in parents], seconds, result.plans, maps)


def _activation_key(spec: FusionSpec) -> tuple:
    return (
        spec.alignment,
        spec.residual,
        spec.filter,
        spec.samples,
        spec.max_tokens,
        spec.device,
    )


def _activations(
    parents: list[ParentModel],
    anchor: ParentModel,
    nodes,
    spec: FusionSpec,
    data_file,
    report: ProgressCallback,
    should_cancel: Callable[[], bool] | None = None,
):
    data = load_data(data_file, anchor.family)
    align_taps: list[Tap] = []
    if spec.alignment == "activations":
        align_taps = [n.tap for n in nodes if isinstance(n, Layer) and n.defines and n.tap]
    merge_taps = [t for n in nodes if isinstance(n, Merge) for t in (n.residual_tap, n.branch_tap)]
    if spec.residual.startswith("weighted") and any(t is None for t in merge_taps):
        raise InputError(f"{anchor.family.name}: residual policy {spec.residual} needs taps")
    result = {}
    for number, parent in enumerate(parents, 1):
        report(
            Progress(
                number - 1,
                len(parents),
                f"activations of model {number}/{len(parents)}",
                unit="model",
            )
        )
        stream = spec.residual == "shared" and spec.alignment == "activations"
        wanted = merge_taps if parent is anchor or stream else []
        taps = list(dict.fromkeys(align_taps + [t for t in wanted if t is not None]))
        result[parent.index] = collect(
            parent,
            taps,
            data,
            spec.samples,
            spec.max_tokens,
            spec.filter,
            spec.window,
            spec.device,
            should_cancel,
        )
    return result


def display_name(path: str | Path | None, names: Mapping[str, str]) -> str | None:
    """The caller's name for a path it gave (as given, or resolved), else the path."""
    if path is None:
        return None
    key = str(Path(path))
    return names.get(key) or names.get(str(Path(path).resolve())) or key


def fusion_record(prepared: Prepared, anchor, spec, seconds, result: EngineResult, metrics):
    """The machine-readable recipe written as fusion.json."""
    import ot
    import safetensors
    import transformers

    return {
        "otfuse_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "family": anchor.family.name,
        "architecture": anchor.architecture,
        "anchor": spec.anchor,
        "parents": [
            {
                "index": p.index,
                "path": prepared.name_of(p.path),
                "files": p.checkpoint.file_hashes(),
            }
            for p in prepared.parents
        ],
        "spec": spec.to_dict(),
        "data": (
            {"path": prepared.name_of(prepared.data), "sha256": sha256_file(prepared.data)}
            if prepared.data
            else None
        ),
        "seconds": round(seconds, 3),
        "plans": [asdict(p) for p in result.plans],
        # stored dtypes read per parent; every tensor is fused in float32 and written in the
        # anchor's dtype
        "dtypes": {
            "parents": [", ".join(result.dtypes[p.index]) for p in prepared.parents],
            "compute": "float32",
            "written": ", ".join(result.dtypes[anchor.index]),
        },
        "metrics": metrics,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "pot": ot.__version__,
            "safetensors": safetensors.__version__,
        },
    }
