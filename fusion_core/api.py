"""`fuse`: checkpoint folders in, one fused checkpoint folder out."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
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
from .writer import CheckpointWriter, check_output_dir, write_checkpoint

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
    parents, the flow graph and the activations. A search prepares once, fuses many times."""

    parents: list[ParentModel]
    nodes: list
    spec: FusionSpec
    data: Path | None
    activations: dict | None
    seconds: float
    # how the caller names the files it gave (e.g. the URIs a service's scratch copies came
    # from): recorded in fusion.json instead of the local paths
    names: dict[str, str] = field(default_factory=dict)
    # the activations hold every tap of every model (a recipe search's), so any alignment,
    # residual policy and anchor can use them, not only the prepared spec's
    every_tap: bool = False

    def name_of(self, path: str | Path | None) -> str | None:
        return display_name(path, self.names)

    @property
    def equal_shapes(self) -> bool:
        """Every parent stores the same tensors in the same shapes (any may be the anchor)."""
        first = self.parents[0]
        shapes = {name: first.checkpoint.shape(key) for name, key in first.keys.items()}
        return all(
            {n: p.checkpoint.shape(k) for n, k in p.keys.items()} == shapes
            for p in self.parents[1:]
        )

    def with_anchor(self, anchor: int) -> Prepared:
        """The same parents and activations around another anchor (its flow graph checked)."""
        if anchor == self.spec.anchor:
            return self
        spec = replace(self.spec, anchor=anchor)
        parent = self.parents[anchor]
        nodes = parent.family.nodes(parent.architecture, parent.config_value("layers"))
        check_compatible(
            [parent, *[p for p in self.parents if p is not parent]], [n for _, n in nodes]
        )
        if self.activations is not None and not self.every_tap:
            raise InputError("the spec differs from the prepared one in what activations depend on")
        return replace(self, nodes=nodes, spec=spec)


@dataclass
class Fused:
    """One fusion held in memory: the tensors, and the engine for its plans."""

    spec: FusionSpec
    result: EngineResult
    engine: Engine
    seconds: float  # this fusion's own time (the preparation not counted)


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
    search: dict | None = None,
) -> FusionReport:
    """Fuse two or more HF checkpoint folders into `out` (written atomically).

    `data` is a safetensors file of inputs, needed for activations-based alignment and the
    weighted residual policies. `metrics` (one-shot results known to the caller) go into the
    model card and fusion.json; so does `search` (how the recipe was chosen; default: it
    was given).
    """
    spec = (spec or FusionSpec()).validate(len(model_dirs))
    out = Path(out)
    check_output_dir(out)
    prepared = prepare(model_dirs, spec, data, progress, allow_pickle, limits, should_cancel, names)
    search = search or {"mode": "fixed", "why": "the recipe as given"}
    return fuse_prepared(
        prepared, out, prepared.spec, progress, should_cancel, metrics, search=search
    )


def prepare(
    model_dirs: list[str | Path],
    spec: FusionSpec | None = None,
    data: str | Path | None = None,
    progress: ProgressCallback | None = None,
    allow_pickle: bool = False,
    limits: Limits | None = None,
    should_cancel: Callable[[], bool] | None = None,
    names: Mapping[str, str] | None = None,
    collect_activations: bool = True,
) -> Prepared:
    """Open and check the parents (sizes under `limits`, configs matching their tensors,
    before anything is allocated) and collect the activations `spec` needs (once; with
    `collect_activations` False they are left to `add_activations`, e.g. a search's)."""
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

    data_path = Path(data) if data else None
    prepared = Prepared(parents, nodes, spec, data_path, None, 0.0, dict(names or {}))
    if spec.needs_activations and collect_activations:
        add_activations(prepared, False, report, should_cancel)
    prepared.seconds += time.perf_counter() - started
    return prepared


def add_activations(
    prepared: Prepared,
    every_tap: bool,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> None:
    """Collect the activations once per model: the taps the prepared spec needs, or
    (`every_tap`) those of every alignment, residual policy and anchor."""
    started = time.perf_counter()
    spec = prepared.spec
    if prepared.data is None:
        raise InputError(
            f"required for alignment={spec.alignment}, residual={spec.residual} "
            "(inputs to collect activations on)",
            field="data",
        )
    anchor = prepared.parents[spec.anchor]
    nodes = [n for _, n in prepared.nodes]
    prepared.activations = _activations(
        prepared.parents,
        anchor,
        nodes,
        spec,
        prepared.data,
        progress or (lambda _p: None),
        should_cancel,
        every_tap,
    )
    prepared.every_tap = every_tap
    prepared.seconds += time.perf_counter() - started


def fuse_prepared(
    prepared: Prepared,
    out: str | Path,
    spec: FusionSpec | None = None,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    metrics: dict | None = None,
    keep_plans: bool = False,
    search: dict | None = None,
) -> FusionReport:
    """Fuse prepared parents with `spec` (default: the prepared one) and write `out`,
    streaming: each fused layer goes to disk as soon as it is produced (Hugging Face shards
    of at most `spec.max_shard_size` bytes), so no whole model is held. `spec` may differ
    from the prepared spec in what activations do not depend on: method, solver, reg, qk,
    heads, weights (and alignment, residual, anchor when the activations hold every tap);
    anything else raises InputError."""
    out = Path(out)
    check_output_dir(out)
    started = time.perf_counter()
    engine, spec, prepared = _engine(prepared, spec, progress, should_cancel, keep_plans)
    anchor = prepared.parents[spec.anchor]
    buffers = [
        name
        for name in anchor.family.buffer_names(anchor.config_value("layers"))
        if anchor.has(name)
    ]
    names = engine.output_names() + buffers
    with CheckpointWriter(out, anchor, names, spec.max_shard_size) as writer:
        result = engine.run(writer.write)
        for name in buffers:  # not fused: the anchor's own
            writer.write(name, anchor.tensor(name))
        seconds = time.perf_counter() - started + prepared.seconds
        record = fusion_record(prepared, anchor, spec, seconds, result, metrics, search)
        writer.publish(record, model_card(record))
    maps = result.kept_plans if keep_plans else None
    models = [str(p.path) for p in prepared.parents]
    return FusionReport(out, spec, models, seconds, result.plans, maps)


def _engine(
    prepared: Prepared,
    spec: FusionSpec | None,
    progress: ProgressCallback | None,
    should_cancel: Callable[[], bool] | None,
    keep_plans: bool,
) -> tuple[Engine, FusionSpec, Prepared]:
    """The engine for `spec` over prepared parents (around its anchor), checked."""
    spec = (spec or prepared.spec).validate(len(prepared.parents))
    if spec.anchor != prepared.spec.anchor:
        prepared = prepared.with_anchor(spec.anchor)
    if spec.needs_activations and (
        prepared.activations is None
        or _activation_key(spec, prepared.every_tap)
        != _activation_key(prepared.spec, prepared.every_tap)
    ):
        raise InputError("the spec differs from the prepared one in what activations depend on")
    check_attention_policy([n for _, n in prepared.nodes], spec, prepared.parents[spec.anchor])
    engine = Engine(
        prepared.parents,
        spec.anchor,
        prepared.nodes,
        spec,
        prepared.activations,
        progress or (lambda _p: None),
        should_cancel,
        keep_plans=keep_plans,
    )
    return engine, spec, prepared


def fuse_tensors(
    prepared: Prepared,
    spec: FusionSpec | None = None,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    keep_plans: bool = True,
) -> Fused:
    """Fuse prepared parents with `spec` into tensors held in memory (nothing written; a
    search scores its candidates so). The plans are kept (on CPU) for `write_fused`'s
    transport maps unless `keep_plans` is False."""
    started = time.perf_counter()
    engine, spec, _ = _engine(prepared, spec, progress, should_cancel, keep_plans)
    result = engine.run()
    return Fused(spec, result, engine, time.perf_counter() - started)


def write_fused(
    prepared: Prepared,
    fused: Fused,
    out: str | Path,
    metrics: dict | None = None,
    keep_plans: bool = False,
    search: dict | None = None,
) -> FusionReport:
    """Write a fusion held in memory as a checkpoint folder (fusion.json records `search`:
    how its recipe was chosen)."""
    out = Path(out)
    spec = fused.spec
    parents = prepared.parents
    anchor = parents[spec.anchor]
    seconds = fused.seconds + prepared.seconds
    record = fusion_record(prepared, anchor, spec, seconds, fused.result, metrics, search)
    card = model_card(record)
    write_checkpoint(out, anchor, fused.result.tensors, record, card, spec.max_shard_size)
    maps = fused.result.kept_plans if keep_plans else None
    plans = fused.result.plans
    return FusionReport(out, spec, [str(p.path) for p in parents], seconds, plans, maps)


def _activation_key(spec: FusionSpec, every_tap: bool = False) -> tuple:
    what = () if every_tap else (spec.alignment, spec.residual)
    return (*what, spec.filter, spec.samples, spec.max_tokens, spec.device)


def _activations(
    parents: list[ParentModel],
    anchor: ParentModel,
    nodes,
    spec: FusionSpec,
    data_file,
    report: ProgressCallback,
    should_cancel: Callable[[], bool] | None = None,
    every_tap: bool = False,
):
    data = load_data(data_file, anchor.family)
    align_taps: list[Tap] = []
    if spec.alignment == "activations" or every_tap:
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
        wanted = merge_taps if parent is anchor or stream or every_tap else []
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


def fusion_record(
    prepared: Prepared, anchor, spec, seconds, result: EngineResult, metrics, search=None
):
    """The machine-readable recipe written as fusion.json (`search`: how it was chosen)."""
    # package metadata, not imports: `import transformers` or `import ot` costs ~1 s each
    from importlib.metadata import version

    import safetensors

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
        "search": search,
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
            "transformers": version("transformers"),
            "pot": version("pot"),
            "safetensors": safetensors.__version__,
        },
    }
