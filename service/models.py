"""Request and response bodies: the job spec users send and the job record they poll."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]
Stage = Literal["downloading", "aligning", "evaluating", "finetuning", "uploading"]
DONE: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})

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


class Policy(Strict):
    """How models are aligned and merged (the CLI's flags of the same names)."""

    alignment: Literal["weights", "activations"] = Field(
        "weights", description="what the OT cost compares: weight rows or activations on data"
    )
    solver: Literal["emd", "sinkhorn"] = Field("sinkhorn", description="exact or soft OT")
    residual: Literal["average", "weighted-scalar", "weighted-matrix", "identity", "shared"] = (
        Field("average", description="how transport maps merge at residual additions")
    )
    filter: str = Field(
        "all",
        pattern=r"^(all|cls|window-[1-9][0-9]*)$",
        description="ViT tokens used as activation samples: all, cls or window-N",
    )
    qk: Literal["tied", "free"] = Field("tied", description="queries and keys share one map")
    heads: Literal["matched", "cross"] = Field(
        "matched", description="heads paired one to one, or the paper's cross-head alignment"
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
    "policy": {"alignment": "activations", "residual": "shared"},
    "regularizer": "auto",
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
        description="HF checkpoint folders: s3://bucket/prefix/ or file:// under the roots",
    )
    anchor: int = Field(0, ge=0, description="index of the model whose shapes the result takes")
    method: Literal["ot", "vanilla"] = "ot"
    policy: Policy = Field(default_factory=Policy)
    regularizer: Regularizer = Field(
        0.05,
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


class JobError(BaseModel):
    type: str = Field(..., examples=["input_error"])
    message: str = Field(..., examples=["s3://models/vit-b/: no config.json under this prefix"])


class JobResult(BaseModel):
    checkpoint: str = Field(..., description="URI prefix of the published HF folder")
    metrics_uri: str = Field(..., description="URI of metrics.json")
    report_uri: str | None = Field(None, description="URI of report.html, when asked")
    transport_maps_uri: str | None = Field(
        None, description="URI of transport_maps.safetensors, when asked"
    )
    chosen: dict[str, Any] | None = Field(
        None,
        description="the point a sweep chose: {solver, reg}",
        examples=[{"solver": "sinkhorn", "reg": 0.055}],
    )
    files: list[str] = Field(
        default_factory=list,
        description="the files this job published under `checkpoint` (what DELETE "
        "?artifacts=true removes)",
    )
    metrics: dict[str, Any] = Field(
        default_factory=dict,
        description="metrics.json inline, less its bulky arrays (finetune curves, per-plan "
        "diagnostics): the full document is at metrics_uri",
    )
    urls: dict[str, str] | None = Field(
        None, description="presigned GET URLs by file name, when configured"
    )


class Job(BaseModel):
    id: str
    tenant: str
    status: Status
    stage: Stage | None = None
    progress: float = Field(0.0, ge=0, le=1)
    detail: str = ""
    name: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    spec: JobSpec
    output: str = Field(..., description="resolved output URI prefix")
    created_at: str
    updated_at: str
    started_at: str | None = None
    finished_at: str | None = None
    attempts: int = 0
    cancel_requested: bool = False
    error: JobError | None = None
    result: JobResult | None = None


class JobList(BaseModel):
    items: list[Job]
    next_page_token: str | None = None


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    errors: list[dict[str, str]] | None = Field(
        None, description="validation errors: field (dotted JSON path) and message"
    )
