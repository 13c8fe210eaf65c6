"""`otfuse plan`: what a fusion will be and cost, from config.json and safetensors headers
alone (no torch here: the API plans and checks jobs without it, reading S3 inputs through
ranged GETs of their headers).

A plan says whether the models can be fused (the engine's own rules, `compat.py`), the
fused config and tensor shapes (the anchor's), the transport-map graph (which spaces exist,
which tensors define and read each, which share one map), and the estimated peak memory and
time on the chosen device, from the cost model in `plan_costs.py`.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .compat import ModelRoles, canonical_keys, check_attention_policy, check_compatible
from .contract import as_job_error
from .errors import InputError
from .families import Attention, Family, Layer, Merge, Node, Param, axis_spaces, resolve_family
from .headers import Entry, Folder, Headers, LocalFolder, read_file_header, read_headers
from .limits import COUNT_KEYS, LAYER_KEYS, WIDTH_KEYS, Limits, check_config_matches_tensors
from .plan_costs import SEARCH, CostModel, Estimate, estimate
from .spec import FusionSpec

GIB = 1 << 30


# A sparse (CSR) product runs ~6x below the dense flop rate per useful flop (768-wide
# stream maps with 23 sources: 1.05 ms against 4.3 ms dense on 2 cores).
SPARSE_SLOWDOWN = 6


@dataclass
class HeaderModel(ModelRoles):
    """A parent as the planner sees it: config and tensor headers, no data."""

    index: int
    headers: Headers
    family: Family
    architecture: str
    keys: dict[str, str]  # canonical name -> serialized key

    @property
    def label(self) -> str:
        return f"model {self.index} ({self.headers.where})"

    @property
    def config(self) -> dict:
        return self.headers.config

    @property
    def parameter_count(self) -> int:
        return sum(e.numel for e in self.headers.entries.values())

    def entry(self, name: str) -> Entry:
        return self.headers.entries[self.keys[name]]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entry(name).shape


def open_headers(index: int, folder: Folder) -> HeaderModel:
    headers = read_headers(folder)
    where = f"model {index} ({headers.where})"
    family, architecture = resolve_family(headers.config, where=f"{where}: ")
    keys = canonical_keys(family, headers.entries, where)
    return HeaderModel(index, headers, family, architecture, keys)


# -- the report ------------------------------------------------------------------------------
@dataclass
class ModelSummary:
    path: str
    family: str
    architecture: str
    layers: int
    heads: int
    kv_heads: int
    parameters: int
    dtype: str  # the stored dtypes, e.g. "BF16"
    file_bytes: int


@dataclass
class Space:
    """A space of neurons a transport map acts on."""

    name: str
    widths: list[int]  # per model, in the models' order
    defined_by: str  # "ot: <tensor>", "merge: <residual> + <branch>", "from <space>", ...
    map: str  # the map it uses: its own name, or the map it shares ("stream", "q.0+k.0")
    written_by: list[str] = field(default_factory=list)  # tensors holding its values (out)
    read_by: list[str] = field(default_factory=list)  # tensors consuming it (in)


@dataclass
class TransportMap:
    """One map solved (or combined) per non-anchor model: its plans are (n_model, n_anchor)."""

    name: str
    spaces: list[str]
    how: str  # "ot" | "heads" | "merge" | "derived" | "identity"
    shapes: list[tuple[int, int]]  # per non-anchor model
    live: tuple[int, int]  # first and last node of the walk that needs it
    roles: list[str] = field(default_factory=list)  # applied to outputs ("out"), inputs ("in")


@dataclass
class PlanReport:
    compatible: bool
    problem: str | None  # why not, when not (the message the fusion would fail with)
    field: str | None  # the spec field at fault, when one is
    spec: dict
    models: list[ModelSummary]
    anchor: int
    differences: list[str]  # what differs between the models (widths OT reconciles)
    fused: dict | None  # config, tensor count, parameters, bytes, dtype, shapes
    spaces: list[Space] = field(default_factory=list)
    maps: list[TransportMap] = field(default_factory=list)
    estimate: Estimate | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return format_report(self)


# -- planning --------------------------------------------------------------------------------
def _cost_model(fusions: int) -> CostModel:
    """A single recipe streams; more candidates are held in memory to be scored."""
    return CostModel(engine=SEARCH) if fusions > 1 else CostModel()


def plan(
    folders: list[Folder],
    spec: FusionSpec,
    limits: Limits | None = None,
    data_tokens: int | None = None,
    costs: CostModel | None = None,
    fusions: int = 1,
) -> PlanReport:
    """The plan of fusing `folders` with `spec` (validated for their count); `fusions`: how
    many a job runs (a sweep or recipe search fuses once per point). Incompatible
    models give a report with `compatible: false` and the reason; unreadable or oversized
    inputs raise InputError, as the fusion would."""
    spec = spec.validate(len(folders))
    models, summaries = [], []
    for i, folder in enumerate(folders):
        try:
            models.append(open_headers(i, folder))
            (limits or Limits()).check_sizes(models[-1])
            check_config_matches_tensors(models[-1], settle_open=False)
            summaries.append(_summary(models[-1]))
        except InputError as error:  # a model's own fault: at its place in the job
            raise (error if error.field else error.renamed(f"models.{i}")) from None
    anchor = models[spec.anchor]
    ordered = [anchor, *[m for m in models if m is not anchor]]
    try:
        nodes = anchor.family.nodes(anchor.architecture, anchor.config_value("layers"))
        check_compatible(ordered, [n for _, n in nodes])
        check_attention_policy([n for _, n in nodes], spec, anchor)
        graph = Graph(models, spec, [n for _, n in nodes])
        graph.check_vanilla()
    except InputError as error:
        error = as_job_error(error)  # the field at its job-spec path ("policy.heads")
        return PlanReport(
            False,
            str(error.reason),
            error.field,
            spec_dict(spec),
            summaries,
            spec.anchor,
            _differences(models, anchor),
            None,
        )
    return PlanReport(
        True,
        None,
        None,
        spec_dict(spec),
        summaries,
        spec.anchor,
        _differences(models, anchor),
        graph.fused(),
        graph.spaces(),
        graph.maps(),
        estimate(graph, spec, costs or _cost_model(fusions), data_tokens, fusions),
    )


def spec_dict(spec: FusionSpec) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(spec).items()}


def _summary(model: HeaderModel) -> ModelSummary:
    dtypes = sorted({e.dtype for e in model.headers.entries.values()})
    return ModelSummary(
        model.headers.where,
        model.family.name,
        model.architecture,
        model.config_value("layers"),
        model.config_value("heads"),
        model.kv_heads,
        model.parameter_count,
        ", ".join(dtypes),
        model.headers.file_bytes,
    )


# the sizes a difference between models is reported for: the ones Limits bounds
SIZE_KEYS = (*LAYER_KEYS, *WIDTH_KEYS, *COUNT_KEYS)


def _differences(models: list[HeaderModel], anchor: HeaderModel) -> list[str]:
    """Config sizes and dtypes that differ from the anchor's, one line each."""
    lines = []
    for model in models:
        if model is anchor or model.family is not anchor.family:
            continue
        for key in SIZE_KEYS:
            if key in anchor.config or key in model.config:
                mine, theirs = model.config.get(key), anchor.config.get(key)
                if mine != theirs:
                    lines.append(f"{model.label}: {key} {mine} (anchor {theirs})")
        mine = {e.dtype for e in model.headers.entries.values()}
        theirs = {e.dtype for e in anchor.headers.entries.values()}
        if mine != theirs:
            lines.append(
                f"{model.label}: stored as {', '.join(sorted(mine))} (anchor "
                f"{', '.join(sorted(theirs))}; the fused model takes the anchor's)"
            )
    return lines


class Graph:
    """The engine's walk, on shapes: which spaces and maps exist, who defines and reads
    them, what each step loads. `estimate` prices it."""

    def __init__(self, models: list[HeaderModel], spec: FusionSpec, nodes: list[Node]):
        self.models = models
        self.spec = spec
        self.nodes = nodes
        self.anchor = models[spec.anchor]
        self.others = [m for m in models if m is not self.anchor]
        self.layers = [n for n in nodes if isinstance(n, Layer)]
        self.definer: dict[str, tuple[int, Layer]] = {
            space: (i, n) for i, n in enumerate(nodes) if isinstance(n, Layer) for space in n.spaces
        }
        self.attention = {
            space: (i, n)
            for i, n in enumerate(nodes)
            if isinstance(n, Attention)
            for space in (n.query, n.key, n.value)
        }
        self.output_of = {n.output: (i, n) for i, n in enumerate(nodes) if isinstance(n, Attention)}
        self.merges = {n.defines: (i, n) for i, n in enumerate(nodes) if isinstance(n, Merge)}
        self.ot = spec.method == "ot"
        shared = spec.residual == "shared" and self.ot
        self.stream = (
            {s for _, n in self.merges.values() for s in (n.defines, n.residual, n.branch)}
            if shared
            else set()
        )

    # -- what is fused -----------------------------------------------------------------------
    def params(self, layer: Layer) -> list[Param]:
        """The tensors a layer fuses (present in the anchor, not tied copies)."""
        return [p for p in layer.params if self.anchor.has(p.name) and not self.anchor.is_tied(p)]

    def fused(self) -> dict:
        shapes, parameters, nbytes, dtypes = {}, 0, 0, set()
        for layer in self.layers:
            for p in layer.params:
                if not self.anchor.has(p.name):
                    continue
                entry = self.anchor.entry(p.name)
                shapes[self.anchor.keys[p.name]] = list(entry.shape)
                parameters += entry.numel
                nbytes += entry.nbytes
                dtypes.add(entry.dtype)
        buffers = self.anchor.family.buffer_names(self.anchor.config_value("layers"))
        for name in buffers:
            if self.anchor.has(name):
                entry = self.anchor.entry(name)
                shapes[self.anchor.keys[name]] = list(entry.shape)
                nbytes += entry.nbytes
        return {
            "config": self.anchor.config,
            "tensors": len(shapes),
            "parameters": parameters,
            "bytes": nbytes,
            "dtype": ", ".join(sorted(dtypes)),
            "shapes": shapes,
        }

    # -- spaces and maps ----------------------------------------------------------------------
    def width(self, model: HeaderModel, space: str) -> int:
        """A space's width in a model: the size of an axis tagged with it (a fused axis holds
        its spaces in equal parts)."""
        if space in self.merges:
            return self.width(model, self.merges[space][1].residual)
        for layer in self.layers:
            for p in layer.params:
                if not model.has(p.name):
                    continue
                for axis, tag in enumerate(p.axes):
                    spaces = axis_spaces(tag)
                    if space in spaces:
                        return model.shape(p.name)[axis] // len(spaces)
        raise InputError(f"{model.label}: no tensor holds space {space}")

    def map_of(self, space: str) -> str:
        """The map a space uses: shared ones are named after what shares them."""
        if space in self.stream:
            return "stream"
        if not self.ot:
            return space
        if space in self.attention:
            attention = self.attention[space][1]
            tied = self.spec.qk == "tied" and (self.spec.heads == "cross" or not attention.rotary)
            if tied and space in (attention.query, attention.key):
                return f"{attention.query}+{attention.key}"
        if space in self.output_of and self.spec.heads == "cross":
            return self.output_of[space][1].value  # cross-head: the value plan itself
        return space

    def all_spaces(self) -> list[str]:
        names = list(self.definer)
        names += [s for s in self.merges if s not in self.definer]
        names += [s for s in self.output_of if s not in self.definer]
        return list(dict.fromkeys(names))

    def how(self, space: str) -> str:
        if not self.ot:
            return "identity"
        if space in self.stream:
            return "ot"
        if space in self.merges:
            return "merge"
        if space in self.output_of:
            return "derived"
        if space in self.attention:
            return "heads"
        return "ot"

    def spaces(self) -> list[Space]:
        result = []
        for space in self.all_spaces():
            widths = [self.width(m, space) for m in self.models]
            if space in self.merges:
                merge = self.merges[space][1]
                defined = f"merge: {merge.residual} + {merge.branch} ({self.spec.residual})"
            elif space in self.output_of:
                defined = f"from {self.output_of[space][1].value} and the head matching"
            else:
                layer = self.definer[space][1]
                what = "heads matched" if space in self.attention else "ot"
                defined = f"{what}: {layer.params[0].name}"
            if not self.ot:
                defined = "identity (vanilla averaging)"
            entry = Space(space, widths, defined, self.map_of(space))
            for layer in self.layers:
                for p in layer.params:
                    for tag in p.axes:
                        if space in axis_spaces(tag):
                            (entry.written_by if tag[0] == "out" else entry.read_by).append(p.name)
            result.append(entry)
        return result

    def maps(self) -> list[TransportMap]:
        """The maps solved per non-anchor model, with the span of the walk that needs each
        (none for vanilla: its maps are identities the streaming engine never builds)."""
        return self._maps() if self.ot else []

    def identity_maps(self) -> list[TransportMap]:
        """Vanilla's identity maps, for an engine that builds them."""
        return self._maps()

    def _maps(self) -> list[TransportMap]:
        first: dict[str, int] = {}
        last: dict[str, int] = {}
        members: dict[str, list[str]] = {}
        roles: dict[str, set[str]] = {}

        def use(space: str, at: int) -> None:
            name = self.map_of(space)
            members.setdefault(name, [])
            if space not in members[name]:
                members[name].append(space)
            first[name] = min(first.get(name, at), at)
            last[name] = max(last.get(name, at), at)

        for at, node in enumerate(self.nodes):
            if isinstance(node, Layer):
                fused = self.params(node)
                for p in node.params:
                    for tag in p.axes:
                        for space in axis_spaces(tag):
                            use(space, at)
                            if p in fused:
                                roles.setdefault(self.map_of(space), set()).add(tag[0])
            elif isinstance(node, Merge):
                for space in (node.defines, node.residual, node.branch):
                    use(space, at)
            elif isinstance(node, Attention):  # solved here, with the output's map
                for space in (node.query, node.key, node.value, node.output):
                    use(space, at)
        if self.stream:  # solved up front, alive throughout
            first["stream"], last["stream"] = 0, len(self.nodes) - 1
        result = []
        for name, spaces in members.items():
            space = spaces[0]
            shapes = [(self.width(m, space), self.width(self.anchor, space)) for m in self.others]
            how = self.how(space)
            span = (first[name], last[name])
            used = sorted(roles.get(name, ()))
            result.append(TransportMap(name, spaces, how, shapes, span, used))
        return result

    def check_vanilla(self) -> None:
        """Vanilla averaging needs equal widths (the engine's message)."""
        if self.ot:
            return
        for space in self.all_spaces():
            n_anchor = self.width(self.anchor, space)
            for model in self.others:
                n_model = self.width(model, space)
                if n_model != n_anchor:
                    raise InputError(
                        f"{model.label}: vanilla fusion needs equal widths, space {space} "
                        f"has {n_model} vs {n_anchor} in the anchor",
                        "method",
                    )

    # -- what each step of the walk loads ---------------------------------------------------------
    def steps(self) -> list[tuple[int, int, list[Param]]]:
        """(first node, last node, tensors) loaded together, in walk order: one layer, or an
        attention block's Q, K and V layers (solved together when the first is reached)."""
        grouped: dict[int, tuple[int, list[Param]]] = {}
        for at, node in enumerate(self.nodes):
            if not isinstance(node, Layer):
                continue
            key = at
            for space in node.spaces:
                if space in self.attention:
                    key = self.attention[space][0]
            end, params = grouped.get(key, (at, []))
            grouped[key] = (max(end, at), params + self.params(node))
        return [(key, end, params) for key, (end, params) in sorted(grouped.items())]

    def taps(self) -> list[tuple[object, int]]:
        """(tap, width) of the activations a fusion collects, in walk order."""
        found: dict = {}
        if self.spec.alignment == "activations":
            for layer in self.layers:
                if layer.defines and layer.tap:
                    width = sum(self.width(self.anchor, s) for s in layer.spaces)
                    found.setdefault(layer.tap, width)
        if self.spec.residual.startswith("weighted") or (
            self.stream and self.spec.alignment == "activations"
        ):
            for _, merge in self.merges.values():
                width = self.width(self.anchor, merge.defines)
                for tap in (merge.residual_tap, merge.branch_tap):
                    if tap is not None:
                        found.setdefault(tap, width)
        return list(found.items())

    def heads_of(self, m: TransportMap) -> int:
        """Independent problems a head-matched map splits into (its heads or groups)."""
        attention = self.attention.get(m.spaces[0])
        if attention is None:
            return 1
        node = attention[1]
        if m.spaces[0] == node.query:
            return self.anchor.config_value("heads")
        return self.anchor.kv_heads

    def merged_sources(self, m: TransportMap) -> int:
        """Model neurons feeding an anchor neuron in a hard plan: one for a permutation, up
        to one more per residual merge up to this one (merges average plans)."""
        if m.how != "merge":
            return 1
        at = self.merges[m.spaces[0]][0]
        return 1 + sum(1 for i, _ in self.merges.values() if i <= at)

    def blocks_of(self, m: TransportMap) -> int:
        """Diagonal blocks a map is applied by (`transport.HeadBlockMap`): a head-matched
        map's heads, 1 for a dense map."""
        if self.spec.heads == "cross":
            return 1
        if m.how == "heads":
            return self.heads_of(m)
        if m.how == "derived":
            return self.anchor.config_value("heads")
        return 1

    def product_work(self, maps: list[TransportMap], hard: bool) -> tuple[float, float]:
        """Flops of the dense plan products, and bytes moved by gathers (hard square plans),
        over every tensor of every non-anchor model."""
        by_name = {m.name: m for m in maps}
        flops = gathered = 0.0
        for _, _, params in self.steps():
            for p in params:
                for model in self.others:
                    if not model.has(p.name):
                        continue
                    numel = math.prod(model.shape(p.name))
                    for tag in p.axes:
                        for space in axis_spaces(tag):
                            m = by_name.get(self.map_of(space))
                            if m is None:
                                continue
                            n_model = self.width(model, space)
                            n_anchor = self.width(self.anchor, space)
                            part = numel / len(axis_spaces(tag))
                            sources = self.merged_sources(m) if hard else n_anchor
                            if hard and n_model == n_anchor and m.how != "merge":
                                gathered += 4 * part
                            # transport.GatheredMap.of's and SparseMap.of's thresholds
                            elif hard and sources <= 4:  # a few gathers
                                gathered += 4 * part * sources
                            elif hard and sources <= n_anchor / 32:  # a sparse product
                                flops += 2 * part * sources * SPARSE_SLOWDOWN
                            else:  # dense; head-matched: one small block per anchor head
                                flops += 2 * part * n_anchor / self.blocks_of(m)
                            numel = numel // max(n_model, 1) * n_anchor
        return flops, gathered

    def features(self, name: str) -> int:
        """Columns of the cost of a map: the row length of every tensor whose output axis
        holds one of its spaces (weights-based alignment)."""
        spaces = {s for s in self.all_spaces() if self.map_of(s) == name}
        total = 0
        for layer in self.layers:
            for p in self.params(layer):
                shape = self.anchor.shape(p.name)
                for axis, tag in enumerate(p.axes):
                    hit = [s for s in axis_spaces(tag) if s in spaces]
                    if tag is not None and hit and (tag[0] == "out" or name == "stream"):
                        total += math.prod(shape) // shape[axis] * len(hit)
        return total


def layer_pattern(name: str) -> str:
    """A name with its layer index replaced by {i}, to print one layer for all."""
    return re.sub(r"(?<=\.)\d+(?!\w)", "{i}", name)


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / (1 << 20):.1f} MiB"


def format_report(report: PlanReport) -> str:
    """The plan for people: compatibility, fused shapes, the map graph (one layer shown for
    all), memory and time."""
    lines = []
    for i, m in enumerate(report.models):
        mark = " (anchor)" if i == report.anchor else ""
        lines.append(
            f"model {i}{mark}: {m.path}  {m.architecture}, {m.layers} layers, {m.heads} heads "
            f"({m.kv_heads} kv), {m.parameters / 1e6:,.1f}M params, {m.dtype}, "
            f"{_gib(m.file_bytes)}"
        )
    lines += [f"  differs: {d}" for d in report.differences]
    if not report.compatible:
        where = f"{report.field}: " if report.field else ""
        lines.append(f"NOT compatible: {where}{report.problem}")
        return "\n".join(lines)
    fused = report.fused or {}
    lines.append(
        f"compatible. fused model: {fused.get('tensors')} tensors, "
        f"{fused.get('parameters', 0) / 1e6:,.1f}M params, {fused.get('dtype')}, "
        f"{_gib(fused.get('bytes', 0))} (the anchor's shapes)"
    )
    lines.append("transport maps (one layer shown; {i} = every layer):")
    shown = {layer_pattern(s.name): s for s in report.spaces}  # the last layer's stands for all
    for pattern, space in shown.items():
        widths = "/".join(str(w) for w in space.widths)
        shared = "" if space.map == space.name else f"  [shares map {layer_pattern(space.map)}]"
        defined = layer_pattern(space.defined_by)
        lines.append(f"  {pattern:<10} width {widths:<12} {defined}{shared}")
    if report.maps:
        solved = sum(1 for m in report.maps if m.how in ("ot", "heads"))
        lines.append(
            f"  {len(report.maps)} maps per non-anchor model ({solved} solved by OT, "
            f"{len(report.maps) - solved} merged or derived)"
        )
    est = report.estimate
    if est is not None:
        lines.append(f"estimate on {est.device} ({est.engine} engine):")
        lines.append(
            f"  peak host memory ~{_gib(est.host_peak_bytes)}"
            + (f", peak GPU memory ~{_gib(est.device_peak_bytes)}" if est.device_peak_bytes else "")
        )
        parts = [f"{k} {_gib(v)}" for k, v in est.memory.items() if v >= 1 << 20]
        lines.append("    " + ", ".join(parts))
        if est.collection_peak_bytes is not None:
            lines.append(f"  peak while collecting activations ~{_gib(est.collection_peak_bytes)}")
        total = ""
        if est.fusions > 1:
            total = f" per fusion, ~{est.job_seconds:.0f} s for the job's {est.fusions} fusions"
        lines.append(f"  time ~{est.seconds:.1f} s{total}")
        parts = [f"{k} {v:.1f} s" for k, v in est.time.items() if v >= 0.05]
        if parts:
            lines.append("    " + ", ".join(parts))
        lines += [f"  note: {n}" for n in est.notes]
    return "\n".join(lines)


# -- local inputs ----------------------------------------------------------------------------
def local_plan(
    models: list[str],
    spec: FusionSpec,
    data: str | None = None,
    limits: Limits | None = None,
    costs: CostModel | None = None,
    fusions: int = 1,
) -> PlanReport:
    """The plan of local checkpoint folders (and a local data file's shape)."""
    folders = [LocalFolder(Path(m.removeprefix("file://"))) for m in models]
    tokens = None
    if data is not None:
        path = Path(data.removeprefix("file://"))
        tokens = data_tokens(LocalFolder(path.parent), path.name, spec.samples)
    return plan(folders, spec, limits, tokens, costs, fusions)


def data_tokens(folder: Folder, name: str, samples: int) -> int | None:
    """Tokens the activations see: `samples` examples of the data file's input_ids, from its
    header (None when it has none, or cannot be read: the fusion reports that)."""
    try:
        size = folder.sizes().get(name)
        entries = read_file_header(folder, name, size) if size is not None else {}
    except InputError:
        return None
    ids = entries.get("input_ids")
    if ids is None or len(ids.shape) != 2:
        return None
    return min(samples, ids.shape[0]) * ids.shape[1]


def plan_device(device: str) -> str:
    """`auto` as the fusion resolves it (cuda when there is one), without importing torch:
    an NVIDIA driver on this machine."""
    if device != "auto":
        return device
    return "cuda" if Path("/proc/driver/nvidia/version").exists() else "cpu"


def available_memory() -> int | None:
    """Bytes of memory available to a new process now (Linux), else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def total_memory() -> int | None:
    """Bytes of physical memory of this machine, else None."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
