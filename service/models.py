"""Response bodies: the job record clients poll, its result, problems. The job spec clients
send is the contract's (`fusion_core.contract.JobSpec`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from fusion_core.contract import JobSpec

Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]
Stage = Literal["downloading", "aligning", "evaluating", "finetuning", "uploading"]


class JobError(BaseModel):
    type: str = Field(..., examples=["input_error"])
    message: str = Field(..., examples=["s3://models/vit-b/: no config.json under this prefix"])


# A recipe as the search reports it (the examples of the API document).
CHOSEN_EXAMPLE = {
    "anchor": 1,
    "alignment": "activations",
    "residual": "shared",
    "heads": "cross",
    "solver": "sinkhorn",
    "reg": 0.023,
}


class JobResult(BaseModel):
    checkpoint: str = Field(..., description="URI prefix of the published HF folder")
    metrics_uri: str = Field(..., description="URI of metrics.json")
    report_uri: str | None = Field(None, description="URI of report.html, when asked")
    transport_maps_uri: str | None = Field(
        None, description="URI of transport_maps.safetensors, when asked"
    )
    chosen: dict[str, Any] | None = Field(
        None,
        description="the recipe the search (or regularizer sweep) chose on the calibration "
        "data: {anchor, alignment, residual, heads, solver, reg}",
        examples=[CHOSEN_EXAMPLE],
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
    position: dict[str, Any] | None = Field(
        None,
        description="where the stage is, typed: unit (byte, model, block, step), step, total, "
        "and point/points (the sweep point) or run (the finetune run); while aligning, "
        "bytes_written/bytes_total of the fused checkpoint, which is written as it is fused",
        examples=[
            {
                "unit": "block",
                "step": 5,
                "total": 12,
                "point": 1,
                "points": 6,
                "run": None,
                "bytes_written": 183500800,
                "bytes_total": 438000000,
            }
        ],
    )
    name: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    spec: JobSpec = Field(..., description="the job as it runs, every default filled in")
    request: dict[str, Any] | None = Field(
        None,
        description="the spec as submitted: only the fields the body gave (URIs normalized). "
        "The worker runs this; a field given pins its axis of the recipe search, a field "
        "left out is searched",
    )
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
