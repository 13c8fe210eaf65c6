"""The job contract: what a fusion job is, its defaults and its rules, defined once.

The HTTP API reads it from request bodies, the CLI builds it from its flags, the worker reads
it from the job record, and `fuse_job` checks its own arguments with the same rules
(`check_job`). Errors are `InputError`s whose `field` is the JSON path of the spec
("regularizer", "policy.device", "data.calibration"): the API answers them as 422s, the CLI
names its flag for that path, the worker reports them as `input_error`. No torch here: the
API process validates jobs without it.

Settings-dependent checks (which URIs a tenant may name, server limits) are the adapters'
(`adapters.access`), applied before these.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import InputError
from .spec import (
    ALIGNMENTS,
    DEFAULT_MAX_SHARD_SIZE,
    HEAD_MODES,
    MIN_SHARD_SIZE,
    QK,
    Alignment,
    FinetuneConfig,
    FusionSpec,
    Heads,
    Method,
    Rectangular,
    Residual,
    Solver,
)

# -- regularizer points -----------------------------------------------------------------------
AUTO_REGS = (0.01, 0.023, 0.055, 0.13, 0.3)  # geomspace(0.01, 0.3, 5), rounded
DEFAULT_REG = 0.05


@dataclass(frozen=True)
class Point:
    """One fusion of a sweep: the exact solver, or Sinkhorn at a regularizer."""

    solver: str  # "emd" | "sinkhorn"
    reg: float | None = None  # Sinkhorn only

    @property
    def label(self) -> str:
        return "emd" if self.solver == "emd" else f"sinkhorn reg={self.reg:g}"


def auto_points() -> list[Point]:
    return [Point("emd"), *(Point("sinkhorn", r) for r in AUTO_REGS)]


# The point every structure is screened at in an auto search. A structure's rank at EMD
# predicts its rank at the soft points badly (hard maps of the residual stream favour other
# structures), and the best recipes sit at soft points. On 10 digits pairs (8 ViT, 2 BERT)
# the 32-recipe search screened here lands 0.015 below the best of all 144 recipes on test
# (mean; 0.038 screened at EMD), better on 5 pairs, worse on 1 by 0.003 (docs/benchmarks.md).
SCREEN_POINT = Point("sinkhorn", 0.023)


# -- the recipe search ------------------------------------------------------------------------
SEARCH_RESIDUALS = ("average", "shared", "weighted-scalar")  # the residual policies searched
DEFAULT_SEARCH_POINTS = 32  # a 2-model search: 24 structures at EMD + Sinkhorn for the best
DEFAULT_SEARCH_SECONDS = 600.0
SearchMode = Literal["auto", "fixed"]


@dataclass(frozen=True)
class Recipe:
    """One point of a recipe search: the parts of a FusionSpec the search varies."""

    anchor: int
    alignment: str
    residual: str
    heads: str
    solver: str
    reg: float | None = None  # Sinkhorn only

    @property
    def point(self) -> Point:
        return Point(self.solver, self.reg)

    @property
    def structure(self) -> tuple[int, str, str, str]:
        """Everything but the solver point."""
        return (self.anchor, self.alignment, self.residual, self.heads)

    @property
    def needs_activations(self) -> bool:
        return self.alignment == "activations" or self.residual.startswith("weighted")

    @property
    def label(self) -> str:
        return (
            f"anchor {self.anchor}, {self.alignment}, {self.residual}, {self.heads} heads, "
            f"{self.point.label}"
        )

    def as_spec(self, spec: FusionSpec) -> FusionSpec:
        """`spec` with this recipe's fields."""
        return replace(
            spec,
            anchor=self.anchor,
            alignment=self.alignment,
            residual=self.residual,
            heads=self.heads,
            solver=self.solver,
            reg=self.reg if self.reg is not None else spec.reg,
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SearchSpace:
    """What a job's recipe search may try. A grid (anchors x alignments x residuals x heads x
    solver points) or an explicit list of recipes; at most `budget` points and `seconds`.
    `anchors` None: every model when the parents have equal shapes, else the spec's anchor.
    One recipe in all is no search: the fixed recipe (the regularizer sweep is a search whose
    only free axis is the solver point)."""

    mode: str  # "auto" | "list" | "fixed"
    alignments: tuple[str, ...] = ("weights",)
    residuals: tuple[str, ...] = ("average",)
    heads: tuple[str, ...] = ("matched",)
    points: tuple[Point, ...] = (Point("sinkhorn", DEFAULT_REG),)
    anchors: tuple[int, ...] | None = (0,)
    recipes: tuple[Recipe, ...] = ()  # mode "list"
    budget: int = DEFAULT_SEARCH_POINTS
    seconds: float | None = DEFAULT_SEARCH_SECONDS
    reason: str = "the recipe as given"  # why a fixed recipe (fusion.json says it)

    @classmethod
    def fixed(cls, spec: FusionSpec, points: Sequence[Point] | None = None) -> SearchSpace:
        """The spec's recipe, optionally swept over solver points (the regularizer sweep)."""
        reg = spec.reg if spec.solver == "sinkhorn" else None
        return cls(
            "fixed",
            (spec.alignment,),
            (spec.residual,),
            (spec.heads,),
            tuple(points or [Point(spec.solver, reg)]),
            (spec.anchor,),
        )

    @classmethod
    def auto(cls, spec: FusionSpec, pinned: Sequence[str] = (), **limits) -> SearchSpace:
        """Every axis searched but the `pinned` fields of `spec` (alignment, residual, heads,
        solver, reg, anchor), which keep the spec's value."""
        pinned = set(pinned)
        if "reg" in pinned and spec.solver == "sinkhorn":
            points: tuple[Point, ...] = (Point("sinkhorn", spec.reg),)
        elif "solver" in pinned:
            points = (Point("emd"),) if spec.solver == "emd" else tuple(auto_points()[1:])
        else:
            points = tuple(auto_points())
        return cls(
            "auto",
            (spec.alignment,) if "alignment" in pinned else ALIGNMENTS,
            (spec.residual,) if "residual" in pinned else SEARCH_RESIDUALS,
            (spec.heads,) if "heads" in pinned else HEAD_MODES,
            points,
            (spec.anchor,) if "anchor" in pinned else None,
            **limits,
        )

    @property
    def is_search(self) -> bool:
        """More than one candidate (an unpinned anchor may add some once shapes are known)."""
        if self.mode == "list":
            return len(self.recipes) > 1
        grid = len(self.alignments) * len(self.residuals) * len(self.heads) * len(self.points)
        return grid > 1 or self.anchors is None

    def planned(self, num_models: int) -> int:
        """The most recipes it fuses (fewer when the models' shapes pin the anchor)."""
        if self.mode == "list":
            return min(self.budget, len(self.recipes))
        anchors = len(self.anchors) if self.anchors is not None else num_models
        grid = len(self.alignments) * len(self.residuals) * len(self.heads) * len(self.points)
        return min(self.budget, grid * anchors)

    @property
    def needs_activations(self) -> bool:
        """Some candidate needs activations (then data is needed: calibration serves)."""
        if self.mode == "list":
            return any(r.needs_activations for r in self.recipes)
        return "activations" in self.alignments or any(
            r.startswith("weighted") for r in self.residuals
        )

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "budget": {"points": self.budget, "seconds": self.seconds},
        }


def parse_regs(value: str | float | Sequence[str | float]) -> list[Point]:
    """`"auto"`, a number, `"emd"`, or a list of them ("0.01,0.05,emd" or a list). Numbers are
    Sinkhorn regularizers (> 0); `emd` is the exact solver. Errors name `regularizer`."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return auto_points()
        items: list = [v for v in text.replace(";", ",").split(",") if v.strip()]
    elif isinstance(value, int | float) and not isinstance(value, bool):
        items = [value]
    else:
        items = list(value)
    if not items:
        raise InputError("needs a number, a list of numbers and emd, or auto", "regularizer")
    points: list[Point] = []
    for i, item in enumerate(items):
        field = "regularizer" if len(items) == 1 else f"regularizer.{i}"
        if isinstance(item, str) and item.strip().lower() == "emd":
            point = Point("emd")
        elif isinstance(item, str) and item.strip().lower() == "auto":
            points.extend(p for p in auto_points() if p not in points)
            continue
        else:
            try:
                reg = float(item)
            except (TypeError, ValueError):
                raise InputError(f"not a number, emd or auto: {item!r}", field) from None
            if not (math.isfinite(reg) and reg > 0):
                raise InputError(f"Sinkhorn regularizers must be > 0, got {item!r}", field)
            point = Point("sinkhorn", reg)
        if point not in points:
            points.append(point)
    return points


# -- the spec -----------------------------------------------------------------------------------
URI = Annotated[
    str,
    Field(
        min_length=1,
        max_length=2048,
        pattern=r"^[^\x00-\x1f\x7f]*$",  # no control characters (NUL, newlines)
        examples=["s3://models/vit-a/"],
    ),
]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecipeSpec(Strict):
    """One recipe of a `policy` list: a partial fusion policy; what it leaves out comes
    from the job's policy, regularizer and anchor."""

    alignment: Alignment | None = None
    residual: Residual | None = None
    heads: Heads | None = None
    solver: Solver | None = None
    reg: float | None = Field(None, gt=0, description="Sinkhorn regularizer (implies sinkhorn)")
    anchor: int | None = Field(None, ge=0)


SEARCH_HELP = (
    'must be "auto", "fixed" or a list of 1 to 64 recipes (objects with alignment, residual, '
    "heads, solver, reg, anchor)"
)


class Policy(Strict):
    """How models are aligned and merged (the CLI's flags of the same names), and whether a
    recipe search chooses it. `"policy": "auto"` (or a list of recipes) is short for
    `{"search": "auto"}`."""

    search: SearchMode | list[RecipeSpec] | None = Field(
        None,
        description="auto: search alignment x residual (average, shared, weighted-scalar) x "
        "heads x solver point (EMD, Sinkhorn regularizers) and, when `anchor` is not given and "
        "the models have equal shapes, the anchor; fields given here (and `regularizer`, "
        "`anchor`) pin their axis. Candidates are fused and scored on data.calibration "
        "(never data.eval), cheap ones first, within search_budget points and search_seconds; "
        "the best is published. A list: these recipes only. fixed: the recipe as given. "
        "Default: auto when data.calibration is given, else fixed",
        examples=["auto", [{"alignment": "activations", "residual": "shared", "solver": "emd"}]],
    )
    search_budget: int = Field(
        DEFAULT_SEARCH_POINTS, ge=1, le=1000, description="most recipes a search fuses"
    )
    search_seconds: float | None = Field(
        DEFAULT_SEARCH_SECONDS,
        gt=0,
        le=7 * 86400,
        description="no new recipe is started after this many seconds of search",
    )

    @field_validator("search", mode="wrap")
    @classmethod
    def _search(cls, value, handler):
        # One clear message at `policy.search`, not one per member of the union.
        if isinstance(value, list) and not 1 <= len(value) <= 64:
            raise ValueError(SEARCH_HELP)
        try:
            return handler(value)
        except ValidationError as exc:
            detail = ""
            if isinstance(value, list):  # the first error inside a recipe, by its path
                error = next(e for e in exc.errors() if len(e.get("loc", ())) > 1)
                where = ".".join(str(p) for p in error["loc"][1:])
                detail = f"; recipe {where}: {error.get('msg')}"
            raise ValueError(SEARCH_HELP + detail) from None

    alignment: Alignment = Field(
        "weights", description="what the OT cost compares: weight rows or activations on data"
    )
    solver: Solver = Field("sinkhorn", description="exact or soft OT")
    residual: Residual = Field(
        "average", description="how transport maps merge at residual additions"
    )
    filter: str = Field(
        "all",
        pattern=r"^(all|cls|window-[1-9][0-9]*)$",
        description="ViT tokens used as activation samples: all, cls or window-N",
    )
    qk: QK = Field("tied", description="queries and keys share one map")
    heads: Heads = Field(
        "matched", description="heads paired one to one, or the paper's cross-head alignment"
    )
    rectangular: Rectangular = Field(
        "rms",
        description="maps between different widths: rms keeps each anchor neuron's RMS (and "
        "the attention temperature), mass averages, width is the paper code's width ratio",
    )
    samples: int = Field(200, ge=1, le=100_000, description="data examples for activations")
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$",
        description="auto = the worker's GPU when it has one",
    )


class DataRefs(Strict):
    """Safetensors files of model inputs (as for the CLI's --data, --calib-data, --eval-data,
    --finetune-data)."""

    activations: URI | None = Field(
        None,
        description="inputs for activations-based alignment and weighted residuals; also the "
        "calibration data of a sweep when `calibration` is not given",
    )
    calibration: URI | None = Field(
        None,
        description="labelled, held out: a regularizer sweep keeps the best one-shot model on "
        "it; must not be the eval data",
    )
    eval: URI | None = Field(
        None,
        description="labelled inputs: parents, ensemble, vanilla, fused (and finetuned) models "
        "are compared on it",
    )
    finetune: URI | None = Field(
        None, description="labelled inputs (MLM: labels optional) for the finetune stage"
    )


class Finetune(Strict):
    """A short, budgeted finetune of the chosen fusion (AdamW, linear warmup then cosine to 0;
    bf16 autocast on GPU). The first budget reached stops it; at least one is required."""

    steps: int | None = Field(None, ge=1, le=1_000_000, description="optimizer steps")
    epochs: float | None = Field(None, gt=0, le=1000, description="passes over data.finetune")
    seconds: float | None = Field(
        None, gt=0, le=7 * 86400, description="wall seconds (at most the server's time limit)"
    )
    lr: float = Field(1e-4, gt=0, le=1, description="AdamW peak learning rate")
    batch_size: int = Field(32, ge=1, le=4096)
    warmup: float = Field(0.1, ge=0, lt=1, description="fraction of the budget warming up")
    weight_decay: float = Field(0.01, ge=0, le=1)
    seed: int = Field(0, ge=0, le=2**31 - 1, description="data order (and MLM masking)")
    distill: float = Field(
        FinetuneConfig.distill,
        ge=0,
        le=1,
        description="weight of distillation from the parents' ensemble (the mean of their "
        "probabilities): loss = (1 - distill) * CE(labels) + distill * T^2 * KL(teacher_T || "
        "model_T); 0 = plain finetuning (docs/evaluation.md: the default wins on "
        "heterogeneous fusions and ties on same-width ones)",
    )
    temperature: float = Field(
        FinetuneConfig.temperature,
        gt=0,
        le=100,
        description="distillation temperature T (with distill > 0)",
    )
    baselines: list[Literal["vanilla"]] = Field(
        default_factory=list,
        max_length=1,
        description='also finetune these baselines with the same budget ("vanilla": vanilla '
        "fusion; the paper's VF + finetune row)",
    )


class Artifacts(Strict):
    """Optional files published next to the model and `metrics.json`."""

    transport_maps: bool = Field(
        False, description="transport_maps.safetensors: the published fusion's per-layer maps"
    )
    report: bool = Field(
        False, description="report.html: self-contained page with plots (matplotlib PNGs)"
    )
    # At least 1 MiB: a tiny limit would make one file per tensor (thousands of objects).
    max_shard_size: int = Field(
        DEFAULT_MAX_SHARD_SIZE,
        ge=MIN_SHARD_SIZE,
        le=10**13,
        description="largest file of the fused checkpoint, in bytes: Hugging Face shards "
        "(model-0000k-of-0000N.safetensors + model.safetensors.index.json), one "
        "model.safetensors when the model fits; a tensor larger than this gets a shard alone",
    )


RegPoint = float | Literal["emd"]
Regularizer = float | Literal["auto", "emd"] | list[RegPoint]
REGULARIZER_HELP = (
    'must be a number, "auto", "emd", or a list of numbers and "emd" (e.g. [0.01, "emd"])'
)

# Request examples, shown in openapi.yaml and reused by the responses' examples.
EXAMPLE_SPEC = {
    "models": ["s3://models/vit-seed0/", "s3://models/vit-seed1/"],
    "method": "ot",
    "policy": {"alignment": "weights", "solver": "sinkhorn"},
    "regularizer": 0.05,
    "data": {"eval": "s3://models/digits/test.safetensors"},
    "name": "digits-vit",
    "labels": {"team": "vision"},
}
HEALED_EXAMPLE_SPEC = {
    "models": ["s3://models/vit-seed0/", "s3://models/vit-seed1/"],
    "policy": "auto",
    "data": {
        "activations": "s3://models/digits/calib.safetensors",
        "calibration": "s3://models/digits/calib.safetensors",
        "eval": "s3://models/digits/test.safetensors",
        "finetune": "s3://models/digits/train.safetensors",
    },
    "finetune": {
        "steps": 60,
        "seconds": 600,
        "lr": 0.001,
        "batch_size": 64,
        "baselines": ["vanilla"],
    },
    "artifacts": {"transport_maps": True, "report": True},
    "name": "digits-vit-healed",
    "labels": {"team": "vision"},
}


class JobSpec(Strict):
    """A fusion job: fuse, optionally sweep the regularizer, compare with baselines on eval
    data, optionally finetune, publish the checkpoint and metrics.json (+ artifacts)."""

    models: list[URI] = Field(
        ...,
        min_length=2,
        description="HF checkpoint folders: s3://bucket/prefix/, file:// under the roots, or "
        "hf://org/name[@revision] for hub repos the server allows",
    )
    anchor: int = Field(0, ge=0, description="index of the model whose shapes the result takes")
    method: Method = "ot"
    policy: Policy = Field(default_factory=Policy)
    regularizer: Regularizer = Field(
        DEFAULT_REG,
        description="Sinkhorn regularizer on the max-normalized cost. A number: one fusion with "
        "policy.solver (> 0 for sinkhorn). A list (at most 16 entries; numbers are Sinkhorn "
        'regularizers whatever policy.solver says, "emd" adds the exact solver) or "auto" (EMD '
        "and Sinkhorn 0.01, 0.023, 0.055, 0.13, 0.3): one fusion per point, the best one-shot "
        "model on data.calibration (default data.activations) is kept; only it is published. "
        '"emd" alone: the exact solver',
        examples=[0.05, [0.01, 0.05, "emd"], "auto"],
    )
    weights: list[float] | None = Field(None, description="per-model weights (default equal)")
    data: DataRefs = Field(default_factory=DataRefs)
    finetune: Finetune | None = Field(
        None,
        description="heal the chosen fusion on data.finetune; the finetuned model is published",
    )
    artifacts: Artifacts = Field(default_factory=Artifacts)
    output: URI | None = Field(None, description="URI prefix (default: a per-job prefix)")
    name: str | None = Field(None, max_length=200)
    labels: dict[Annotated[str, Field(max_length=63)], Annotated[str, Field(max_length=256)]] = (
        Field(default_factory=dict, max_length=32)
    )

    @field_validator("policy", mode="before")
    @classmethod
    def _policy(cls, value):
        # "auto", "fixed" or a list of recipes: short for {"search": value}
        if isinstance(value, str | list):
            return {"search": value}
        return value

    @field_validator("models", mode="wrap")
    @classmethod
    def _models(cls, value, handler):
        if isinstance(value, list) and len(value) < 2:
            raise ValueError(f"need at least 2 models to fuse, got {len(value)}")
        return handler(value)

    @field_validator("regularizer", mode="wrap")
    @classmethod
    def _regularizer(cls, value, handler):
        # One clear message at `regularizer`, not one per member of the union.
        if isinstance(value, bool):
            raise ValueError(REGULARIZER_HELP)
        try:
            value = handler(value)
        except ValidationError:
            raise ValueError(REGULARIZER_HELP) from None
        if isinstance(value, list) and not 1 <= len(value) <= 16:
            raise ValueError("a list needs 1 to 16 entries")
        return value

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [EXAMPLE_SPEC, HEALED_EXAMPLE_SPEC]},
    )


def parse_job(document: Any) -> JobSpec:
    """A JobSpec from JSON-like data; schema errors are InputErrors at their JSON path."""
    try:
        return JobSpec.model_validate(document)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(p) for p in error.get("loc", ())) or "body"
        message = error.get("msg", "invalid")
        if error.get("type") == "extra_forbidden":
            message = "unknown field"
        elif error.get("type") == "value_error" and "error" in error.get("ctx", {}):
            message = str(error["ctx"]["error"])
        raise InputError(message, field) from None


# -- the rules ----------------------------------------------------------------------------------
# The library's own names for the recipe and finetune fields -> the spec's JSON paths.
RECIPE_FIELDS = {
    "method": "method",
    "alignment": "policy.alignment",
    "solver": "policy.solver",
    "reg": "regularizer",
    "residual": "policy.residual",
    "filter": "policy.filter",
    "qk": "policy.qk",
    "heads": "policy.heads",
    "rectangular": "policy.rectangular",
    "max_shard_size": "artifacts.max_shard_size",
    "anchor": "anchor",
    "weights": "weights",
    "samples": "policy.samples",
    "device": "policy.device",
    "models": "models",
    "data": "data.activations",
}
FINETUNE_FIELDS = {
    name: f"finetune.{name}"
    for name in (
        "steps",
        "epochs",
        "seconds",
        "lr",
        "batch_size",
        "warmup",
        "seed",
        "distill",
        "temperature",
    )
}


def as_job_error(error: InputError) -> InputError:
    """An InputError raised under the library's field names, at the spec's JSON path."""
    field = RECIPE_FIELDS.get(error.field or "") or FINETUNE_FIELDS.get(error.field or "")
    return error.renamed(field) if field and field != error.field else error


def check_job(
    *,
    method: str,
    points: list[Point],
    needs_activations: bool,
    activations: str | None,
    calibration: str | None,
    eval_data: str | None,
    finetune: FinetuneConfig | None,
    finetune_data: str | None,
    baselines: Sequence[str] = (),
    max_finetune_seconds: float | None = None,
    search: bool = False,
) -> str | None:
    """The rules that span fields, for a job given by value (the spec's or fuse_job's
    arguments; data as normalized URIs or resolved paths). `search`: a recipe search chooses
    among several recipes (`points`: a regularizer sweep's points). Returns the calibration
    data the sweep or search chooses on (None when nothing is chosen)."""
    choosing = len(points) > 1 or search
    if search and method != "ot":
        raise InputError("a recipe search needs method ot", "policy.search")
    if len(points) > 1 and method != "ot":
        raise InputError("a sweep needs method ot (vanilla has no regularizer)", "regularizer")
    chosen_on = calibration if calibration is not None else None
    if chosen_on is None and choosing:
        chosen_on = activations
    if choosing and chosen_on is None:
        what = "a recipe search" if search else f"a sweep over {len(points)} points"
        raise InputError(
            f"required for {what} (the best one-shot model on it is kept); data.activations "
            "serves when it is not given",
            "data.calibration",
        )
    # a search collects its activations on the calibration data when no other is given
    if needs_activations and activations is None and not search:
        raise InputError("required for the policy's activations", "data.activations")
    if chosen_on is not None and eval_data is not None and chosen_on == eval_data:
        raise InputError(
            "the calibration data must not be data.eval: the sweep would choose on the numbers "
            "it reports",
            "data.calibration",
        )
    if finetune is None:
        if finetune_data is not None:
            raise InputError(
                "data.finetune is given but no finetune: add one with a budget "
                "(steps, epochs or seconds)",
                "finetune",
            )
        if baselines:
            raise InputError("finetune baselines need a finetune", "finetune.baselines")
        return chosen_on
    if finetune_data is None:
        raise InputError("required for the finetune stage (labelled inputs)", "data.finetune")
    if len(set(baselines)) != len(baselines) or not set(baselines) <= {"vanilla"}:
        raise InputError("each baseline at most once, among: vanilla", "finetune.baselines")
    seconds = finetune.seconds
    if max_finetune_seconds is not None and seconds is not None and seconds >= max_finetune_seconds:
        raise InputError(
            f"{seconds:g} s does not fit in the server's job time limit of "
            f"{max_finetune_seconds:g} s",
            "finetune.seconds",
        )
    try:
        finetune.validate()
    except InputError as error:
        raise as_job_error(error) from None
    return chosen_on


def validate_job(
    spec: JobSpec, *, max_models: int | None = None, max_finetune_seconds: float | None = None
) -> JobSpec:
    """Every rule of the contract on a spec whose URIs are already normalized (the adapters
    normalize and authorize them). Raises InputError at the JSON path at fault."""
    n = len(spec.models)
    if max_models is not None and n > max_models:
        raise InputError(f"at most {max_models} models per job, got {n}", "models")
    if spec.finetune is not None and not any(
        v is not None for v in (spec.finetune.steps, spec.finetune.epochs, spec.finetune.seconds)
    ):
        raise InputError("needs a budget: steps, epochs or seconds (at least one)", "finetune")
    points = reg_points(spec)
    recipe = fusion_spec(spec, "cpu")
    space = search_space(spec)
    check_job(
        method=spec.method,
        points=points if space.mode == "fixed" else points[:1],
        search=space.mode != "fixed" and space.is_search,
        needs_activations=recipe.needs_activations or space.needs_activations,
        activations=spec.data.activations,
        calibration=spec.data.calibration,
        eval_data=spec.data.eval,
        finetune=finetune_config(spec, "cpu"),
        finetune_data=spec.data.finetune,
        baselines=spec.finetune.baselines if spec.finetune else (),
        max_finetune_seconds=max_finetune_seconds,
    )
    return spec


# -- translations into the library's arguments ---------------------------------------------------
def regs_argument(spec: JobSpec):
    """`fuse_job`'s `regs`: None for one number (the spec's solver and reg), else the value."""
    return None if isinstance(spec.regularizer, float) else spec.regularizer


def reg_points(spec: JobSpec) -> list[Point]:
    """The (solver, reg) points the job fuses, as fuse_job will."""
    regs = regs_argument(spec)
    if regs is None:
        if spec.policy.solver == "sinkhorn":
            if not (math.isfinite(spec.regularizer) and spec.regularizer > 0):
                raise InputError(
                    f"must be > 0 for the sinkhorn solver, got {spec.regularizer}", "regularizer"
                )
            return [Point("sinkhorn", spec.regularizer)]
        return [Point("emd")]
    points = parse_regs(regs)
    return [Point("emd")] if points == [Point("emd")] else points


def search_mode(spec: JobSpec) -> str:
    """auto, list or fixed: as the job names it, else auto when it has calibration data."""
    search = spec.policy.search
    if isinstance(search, list):
        return "list"
    if search is None:
        return "auto" if spec.data.calibration is not None and spec.method == "ot" else "fixed"
    return search


def search_space(spec: JobSpec) -> SearchSpace:
    """What the job's recipe search may try: the fields the job gives (policy's alignment,
    residual, heads, solver; regularizer; anchor) pin their axis."""
    mode = search_mode(spec)
    if mode != "fixed" and spec.method != "ot":
        raise InputError("a recipe search needs method ot", "policy.search")
    base = fusion_spec(spec, "cpu")
    limits = {"budget": spec.policy.search_budget, "seconds": spec.policy.search_seconds}
    if mode == "fixed":
        reason = (
            "policy fixed: the recipe as given"
            if spec.policy.search == "fixed"
            else "no calibration data to search on (data.calibration): the recipe as given, "
            "defaults for what it does not give"
        )
        return replace(SearchSpace.fixed(base, reg_points(spec)), reason=reason, **limits)
    given = spec.policy.model_fields_set & {"alignment", "residual", "heads", "solver"}
    given |= {"reg"} if "regularizer" in spec.model_fields_set else set()
    given |= {"anchor"} if "anchor" in spec.model_fields_set else set()
    if mode == "auto":
        space = SearchSpace.auto(base, sorted(given), **limits)
        if "reg" in given and not isinstance(spec.regularizer, float):
            space = replace(space, points=tuple(reg_points(spec)))  # a list or "auto"
        return space
    recipes = []
    assert isinstance(spec.policy.search, list)
    for i, item in enumerate(spec.policy.search):
        anchor = item.anchor if item.anchor is not None else base.anchor
        if anchor >= len(spec.models):
            raise InputError(
                f"recipe {i}: anchor {anchor} is out of range for {len(spec.models)} models",
                "policy.search",
            )
        solver = item.solver or ("sinkhorn" if item.reg is not None else base.solver)
        reg = None if solver == "emd" else (item.reg if item.reg is not None else base.reg)
        recipe = Recipe(
            anchor,
            item.alignment or base.alignment,
            item.residual or base.residual,
            item.heads or base.heads,
            solver,
            reg,
        )
        if recipe not in recipes:
            recipes.append(recipe)
    return SearchSpace("list", recipes=tuple(recipes), **limits)


def fusion_spec(spec: JobSpec, device: str) -> FusionSpec:
    """The `FusionSpec` this job runs (its reg is the sweep's first point's until chosen)."""
    reg = spec.regularizer if isinstance(spec.regularizer, float) else DEFAULT_REG
    if not (math.isfinite(reg) and reg > 0):
        reg = DEFAULT_REG  # EMD ignores it; reg_points has refused it for Sinkhorn
    try:
        return FusionSpec(
            method=spec.method,
            alignment=spec.policy.alignment,
            solver=spec.policy.solver,
            reg=reg,
            residual=spec.policy.residual,
            filter=spec.policy.filter,
            qk=spec.policy.qk,
            heads=spec.policy.heads,
            rectangular=spec.policy.rectangular,
            max_shard_size=spec.artifacts.max_shard_size,
            anchor=spec.anchor,
            weights=tuple(spec.weights) if spec.weights else None,
            samples=spec.policy.samples,
            device=device,
        ).validate(len(spec.models))
    except InputError as error:
        raise as_job_error(error) from None


def finetune_config(spec: JobSpec, device: str) -> FinetuneConfig | None:
    """The job's `FinetuneConfig` (None without a finetune)."""
    if spec.finetune is None:
        return None
    f = spec.finetune
    config = FinetuneConfig(
        steps=f.steps,
        epochs=f.epochs,
        seconds=f.seconds,
        lr=f.lr,
        batch_size=f.batch_size,
        warmup=f.warmup,
        weight_decay=f.weight_decay,
        seed=f.seed,
        distill=f.distill,
        temperature=f.temperature,
        device=device,
    )
    try:
        return config.validate()
    except InputError as error:
        raise as_job_error(error) from None
