"""`fuse`: checkpoint folders in, one fused checkpoint folder out."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch

from . import __version__
from .activations import collect
from .checkpoint import sha256_file
from .data import load_data
from .engine import Engine, PlanRecord, Progress
from .errors import InputError
from .families import Layer, Merge, Tap
from .modelcard import model_card
from .models import ParentModel, check_compatible, open_parent
from .spec import FusionSpec
from .writer import check_output_dir, write_checkpoint

ProgressCallback = Callable[[Progress], None]


@dataclass
class FusionReport:
    out: Path
    spec: FusionSpec
    models: list[str]
    seconds: float
    plans: list[PlanRecord] = field(default_factory=list)


def fuse(
    model_dirs: list[str | Path],
    out: str | Path,
    spec: FusionSpec | None = None,
    data: str | Path | None = None,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    allow_pickle: bool = False,
    metrics: dict | None = None,
) -> FusionReport:
    """Fuse two or more HF checkpoint folders into `out` (written atomically).

    `data` is a safetensors file of inputs, needed for activations-based alignment and the
    weighted residual policies. `metrics` (one-shot results known to the caller) go into the
    model card and fusion.json.
    """
    started = time.perf_counter()
    spec = (spec or FusionSpec()).validate(len(model_dirs))
    out = Path(out)
    check_output_dir(out)
    report = progress or (lambda _p: None)
    parents = [open_parent(i, path, allow_pickle) for i, path in enumerate(model_dirs)]
    anchor = parents[spec.anchor]
    nodes = anchor.family.nodes(anchor.architecture, anchor.config_value("layers"))
    check_compatible([anchor, *[p for p in parents if p is not anchor]], [n for _, n in nodes])

    activations = None
    if spec.needs_activations:
        if data is None:
            raise InputError(
                f"alignment={spec.alignment}, residual={spec.residual} needs --data (activations)"
            )
        activations = _activations(parents, anchor, [n for _, n in nodes], spec, data, report)

    engine = Engine(parents, spec.anchor, nodes, spec, activations, report, should_cancel)
    result = engine.run()
    seconds = time.perf_counter() - started
    record = fusion_record(parents, anchor, spec, data, seconds, result.plans, metrics)
    write_checkpoint(out, anchor, result.tensors, record, model_card(record))
    return FusionReport(out, spec, [str(p.path) for p in parents], seconds, result.plans)


def _activations(
    parents: list[ParentModel],
    anchor: ParentModel,
    nodes,
    spec: FusionSpec,
    data_file,
    report: ProgressCallback,
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
        report(Progress(0, 1, f"activations of model {number}/{len(parents)}"))
        stream = spec.residual == "shared" and spec.alignment == "activations"
        wanted = merge_taps if parent is anchor or stream else []
        taps = list(dict.fromkeys(align_taps + [t for t in wanted if t is not None]))
        result[parent.index] = collect(
            parent, taps, data, spec.samples, spec.max_tokens, spec.filter, spec.window, spec.device
        )
    return result


def fusion_record(parents, anchor, spec, data, seconds, plans, metrics) -> dict:
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
            {"index": p.index, "path": str(p.path), "files": p.checkpoint.file_hashes()}
            for p in parents
        ],
        "spec": spec.to_dict(),
        "data": {"path": str(data), "sha256": sha256_file(Path(data))} if data else None,
        "seconds": round(seconds, 3),
        "plans": [asdict(p) for p in plans],
        "metrics": metrics,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "pot": ot.__version__,
            "safetensors": safetensors.__version__,
        },
    }
