"""Request and response bodies: the job spec users send and the job record they poll."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]
Stage = Literal["downloading", "aligning", "evaluating", "finetuning", "uploading"]
DONE: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})

URI = Annotated[str, Field(min_length=1, max_length=2048, examples=["s3://models/vit-a/"])]


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
    """Safetensors files of model inputs (as for the CLI's --data)."""

    activations: URI | None = Field(
        None, description="inputs for activations-based alignment and weighted residuals"
    )
    eval: URI | None = Field(None, description="labelled inputs: one-shot metrics of all models")
    finetune: URI | None = Field(None, description="labelled inputs for the finetune stage")


class Finetune(Strict):
    """Optional short finetune of the fused model (not supported yet: rejected at submit)."""

    epochs: float = Field(1.0, gt=0, le=100)
    learning_rate: float = Field(1e-4, gt=0, le=1)
    batch_size: int = Field(32, ge=1, le=4096)


class JobSpec(Strict):
    """A fusion job. `regularizer` is a number today; sweeps (a list, "auto") come later."""

    models: list[URI] = Field(
        ...,
        min_length=2,
        description="HF checkpoint folders: s3://bucket/prefix/ or file:// under the roots",
    )
    anchor: int = Field(0, ge=0, description="index of the model whose shapes the result takes")
    method: Literal["ot", "vanilla"] = "ot"
    policy: Policy = Field(default_factory=Policy)
    regularizer: float = Field(
        0.05, description="Sinkhorn regularizer on the max-normalized cost (> 0 for sinkhorn)"
    )
    weights: list[float] | None = Field(None, description="per-model weights (default equal)")
    data: DataRefs = Field(default_factory=DataRefs)
    finetune: Finetune | None = None
    output: URI | None = Field(None, description="URI prefix (default: a per-job prefix)")
    name: str | None = Field(None, max_length=200)
    labels: dict[Annotated[str, Field(max_length=63)], Annotated[str, Field(max_length=256)]] = (
        Field(default_factory=dict, max_length=32)
    )

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "models": ["s3://models/vit-seed0/", "s3://models/vit-seed1/"],
                    "method": "ot",
                    "policy": {"alignment": "weights", "solver": "sinkhorn"},
                    "regularizer": 0.05,
                    "data": {"eval": "s3://models/digits/test.safetensors"},
                    "name": "digits-vit",
                    "labels": {"team": "vision"},
                }
            ]
        },
    )


class JobError(BaseModel):
    type: str = Field(..., examples=["input_error"])
    message: str = Field(..., examples=["s3://models/vit-b/: no config.json under this prefix"])


class JobResult(BaseModel):
    checkpoint: str = Field(..., description="URI prefix of the fused HF folder")
    metrics_uri: str = Field(..., description="URI of metrics.json")
    metrics: dict[str, Any] = Field(default_factory=dict, description="metrics.json inline")
    urls: dict[str, str] | None = Field(None, description="presigned GET URLs, when configured")


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
