"""metrics.json: what a fusion job measured, in a documented, versioned schema.

The schema is described field by field in docs/evaluation.md. `schema_version` changes when
a field is removed or changes meaning (adding fields keeps the version); readers should
ignore fields they do not know (the service adds e.g. `job_id`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

SCHEMA_VERSION = 1
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.html"
TRANSPORT_MAPS_FILE = "transport_maps.safetensors"

LANGUAGE_MODELING = ("masked-lm", "causal-lm")  # tasks scored per token: loss, perplexity


def primary_metric(task: str) -> str:
    """What ranks models of a task: loss (lower is better) or accuracy (higher)."""
    return "loss" if task in LANGUAGE_MODELING else "accuracy"


# kinds of evaluated models, in the order tables and charts show them
KINDS = ("parent", "ensemble", "vanilla", "fused", "vanilla+finetune", "fused+finetune")


@dataclass
class ModelResult:
    """One evaluated model on the eval data. `metrics` is empty and `skipped` says why when
    a baseline could not be made (e.g. vanilla fusion of models of different widths)."""

    name: str  # "parent 0", "ensemble", "vanilla", "fused", "fused+finetune", ...
    kind: str  # one of KINDS
    metrics: dict[str, float] = field(default_factory=dict)
    path: str | None = None  # checkpoint folder (parents; the published model: ".")
    skipped: str | None = None


@dataclass
class SweepPoint:
    """One recipe the search fused, scored on the calibration data (`eval` stays None in a
    job: the eval data takes no part in the search)."""

    solver: str
    reg: float | None  # None for EMD
    calib: dict[str, float]
    eval: dict[str, float] | None = None
    seconds: float = 0.0  # fusing and scoring it
    chosen: bool = False
    anchor: int = 0
    alignment: str = "weights"
    residual: str = "average"
    heads: str = "matched"
    phase: str = "screen"  # screen: a structure at its first solver point; refine: the others

    @property
    def label(self) -> str:
        return "emd" if self.solver == "emd" else f"{self.reg:g}"


@dataclass
class Sweep:
    """The recipe search (a regularizer sweep when only the solver point varies)."""

    selected_on: str  # path of the calibration data
    metric: str  # "accuracy" (higher is better) or "loss" (lower is better)
    points: list[SweepPoint]  # in the order tried
    chosen: dict  # the recipe: {"anchor", "alignment", "residual", "heads", "solver", "reg"}
    mode: str = "fixed"  # "auto" | "list" | "fixed" (only regularizers swept)
    reason: str = ""  # why the chosen recipe won, with the runner-up
    runner_up: dict | None = None  # its recipe
    budget: dict = field(default_factory=dict)  # {"points": N, "seconds": S}
    stopped_by: str | None = None  # "points" | "seconds"; None: every candidate was tried
    skipped: list[dict] = field(default_factory=list)  # {"recipe", "reason"}: not fusable


@dataclass
class FinetuneRun:
    """One finetune (of the fused model, or of a baseline with the same budget)."""

    model: str  # "fused" | "vanilla"
    steps: int
    epochs: float
    seconds: float
    stopped_by: str  # "steps" | "epochs" | "seconds"
    losses: list[tuple[int, float]]  # (step, training loss), at most ~500 points
    lr: list[tuple[int, float]]  # (step, learning rate), same steps as losses
    before: dict[str, float] | None = None  # eval metrics before (one-shot)
    after: dict[str, float] | None = None  # eval metrics after
    healing: str = "plain"  # "plain" (labels) | "distill" (labels + the parents' ensemble)


@dataclass
class PlanDiagnostics:
    """One solved transport plan (mass 1, shape (n_model, n_anchor))."""

    model: int
    space: str
    shape: tuple[int, int]
    cost: float | None  # <P, C> on the max-normalized cost
    entropy: float  # -sum P log P, nats: log(n) for a permutation, log(n*m) for uniform
    entropy_ratio: float  # entropy / log(n*m), in [0, 1]
    distance_from_permutation: float  # 0 for a permutation, ~1 for the uniform plan


@dataclass
class Metrics:
    task: str  # "classification" | "masked-lm" | "causal-lm"
    primary_metric: str  # "accuracy" | "loss"
    models: list[str]  # parent checkpoint folders, in the order given
    anchor: int
    spec: dict  # the FusionSpec of the published fusion
    data: dict[str, str | None]  # eval, calib, activations, finetune: paths
    evaluation: list[ModelResult] = field(default_factory=list)
    sweep: Sweep | None = None
    finetune: dict | None = None  # {"config": {...}, "healing": str, "runs": [FinetuneRun]}
    plans: list[PlanDiagnostics] = field(default_factory=list)
    artifacts: dict[str, str] = field(default_factory=dict)  # name -> file, relative to --out
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per stage
    published: str = "fused"  # which evaluated model the output folder holds
    schema_version: int = SCHEMA_VERSION
    otfuse_version: str = ""

    def to_dict(self) -> dict:
        return _clean(asdict(self))

    def write(self, folder: Path) -> Path:
        return write_metrics(folder, self.to_dict())


def write_metrics(folder: Path, document: dict) -> Path:
    path = Path(folder) / METRICS_FILE
    path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
    return path


def plan_diagnostics(maps: dict[str, torch.Tensor], records: list) -> list[PlanDiagnostics]:
    """Diagnostics of every recorded plan: the engine's cost and permutation distance, plus
    the plan's entropy computed here."""
    result = []
    for record in records:
        plan = maps.get(f"model{record.model}/{record.space}")
        entropy = ratio = float("nan")
        if plan is not None:
            mass = plan.double() / plan.double().sum().clamp_min(1e-300)
            nonzero = mass[mass > 0]
            entropy = float(-(nonzero * nonzero.log()).sum())
            cells = mass.numel()
            ratio = entropy / math.log(cells) if cells > 1 else 0.0
        result.append(
            PlanDiagnostics(
                record.model,
                record.space,
                tuple(record.shape),
                record.cost,
                entropy,
                ratio,
                record.distance_from_permutation,
            )
        )
    # the engine may record a plan again when it re-solves (shared stream refinement): keep
    # the last record of each (model, space)
    last = {(d.model, d.space): d for d in result}
    return list(last.values())


def _clean(value):
    """JSON-safe: tuples to lists, non-finite floats to None."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
