"""/fusions: submit, poll, list, cancel, delete."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from adapters.store import DONE, decode_token, encode_token, peek
from fusion_core.contract import EXAMPLE_SPEC, HEALED_EXAMPLE_SPEC, JobSpec
from fusion_core.plan import PlanReport

from .. import jobs
from ..auth import tenant, tenant_of
from ..direct import DirectRoute
from ..jobs import check_submit_rate
from ..models import CHOSEN_EXAMPLE, Job, JobList, Problem, Status
from ..plan_example import PLAN_EXAMPLE
from ..problems import ProblemError

router = APIRouter(prefix="/fusions", tags=["fusions"])
_ID = re.compile(r"^[0-9a-f]{24}$")


def _get(path: str, **kwargs):
    """A GET route served by DirectRoute (see service/direct.py)."""

    def register(endpoint):
        router.add_api_route(
            path, endpoint, methods=["GET"], route_class_override=DirectRoute, **kwargs
        )
        return endpoint

    return register


def _problem_responses(*codes: int) -> dict:
    """Error responses: RFC 9457 bodies (moved to application/problem+json in app.py)."""
    return {c: {"model": Problem} for c in codes}


OUT = "s3://otfuse/fusions/team-a/0193a1f2c3d4a1b2c3d4e5f6/"


def _example_job(spec: dict | None = None, **overrides) -> dict:
    parsed = JobSpec.model_validate(spec or EXAMPLE_SPEC)
    spec = parsed.model_dump(mode="json")
    job = {
        "id": "0193a1f2c3d4a1b2c3d4e5f6",
        "tenant": "team-a",
        "status": "running",
        "stage": "aligning",
        "progress": 0.42,
        "detail": "aligning layer 5/12",
        "name": spec["name"],
        "labels": spec["labels"],
        "spec": spec,
        "request": jobs.given(parsed),
        "output": OUT,
        "created_at": "2026-11-26T19:00:00.000Z",
        "updated_at": "2026-11-26T19:00:03.125Z",
        "started_at": "2026-11-26T19:00:00.180Z",
        "finished_at": None,
        "attempts": 1,
        "cancel_requested": False,
        "error": None,
        "result": None,
    }
    job.update(overrides)
    return job


def _row(name: str, accuracy: float, loss: float, path: str | None = None) -> dict:
    metrics = {"accuracy": accuracy, "loss": loss, "examples": 360}
    kind = "parent" if name.startswith("parent") else name
    return {"name": name, "kind": kind, "metrics": metrics, "path": path, "skipped": None}


SUCCEEDED = _example_job(
    status="succeeded",
    stage=None,
    progress=1.0,
    detail="succeeded",
    finished_at="2026-11-26T19:00:09.870Z",
    result={
        "checkpoint": OUT,
        "metrics_uri": OUT + "metrics.json",
        "report_uri": None,
        "transport_maps_uri": None,
        "chosen": None,
        "metrics": {
            "schema_version": 1,
            "task": "classification",
            "primary_metric": "accuracy",
            "models": EXAMPLE_SPEC["models"],
            "anchor": 0,
            "published": "fused",
            "evaluation": [
                _row("parent 0", 0.97, 0.1, "s3://models/vit-seed0"),
                _row("parent 1", 0.9, 0.2, "s3://models/vit-seed1"),
                _row("ensemble", 0.97, 0.09),
                _row("vanilla", 0.31, 1.9),
                _row("fused", 0.93, 0.25, "."),
            ],
            "sweep": None,
            "finetune": None,
            "artifacts": {"model": ".", "metrics": "metrics.json"},
            "fused": {"accuracy": 0.93, "loss": 0.25, "examples": 360},
            "parents": [
                {"model": "s3://models/vit-seed0/", "accuracy": 0.97, "loss": 0.1, "examples": 360},
                {"model": "s3://models/vit-seed1/", "accuracy": 0.9, "loss": 0.2, "examples": 360},
            ],
            "job_id": "0193a1f2c3d4a1b2c3d4e5f6",
            "fusion_seconds": 1.92,
            "wall_seconds": 4.1,
            "device": "cuda",
        },
        "urls": None,
    },
)

FINETUNING = _example_job(
    HEALED_EXAMPLE_SPEC,
    stage="finetuning",
    progress=0.71,
    detail="finetune fused: step 40/60, loss 0.2113",
)

HEALED = _example_job(
    HEALED_EXAMPLE_SPEC,
    status="succeeded",
    stage=None,
    progress=1.0,
    detail="succeeded",
    finished_at="2026-11-26T19:01:12.410Z",
    result={
        "checkpoint": OUT,
        "metrics_uri": OUT + "metrics.json",
        "report_uri": OUT + "report.html",
        "transport_maps_uri": OUT + "transport_maps.safetensors",
        "chosen": CHOSEN_EXAMPLE,
        "metrics": {
            "schema_version": 1,
            "task": "classification",
            "primary_metric": "accuracy",
            "published": "fused+finetune",
            "evaluation": [
                _row("parent 0", 0.97, 0.1, "s3://models/vit-seed0"),
                _row("parent 1", 0.9, 0.2, "s3://models/vit-seed1"),
                _row("ensemble", 0.97, 0.09),
                _row("vanilla", 0.31, 1.9),
                _row("fused", 0.93, 0.25),
                _row("vanilla+finetune", 0.89, 0.36),
                _row("fused+finetune", 0.98, 0.07, "."),
            ],
            "sweep": {
                "selected_on": "s3://models/digits/calib.safetensors",
                "metric": "accuracy",
                "chosen": CHOSEN_EXAMPLE,
                "mode": "auto",
                "reason": "best calibration accuracy (0.9400) among 32 recipes tried (stopped "
                "by the points budget); runner-up: anchor 1, activations, shared, cross heads, "
                "emd (0.9300)",
                "points": [
                    {
                        **CHOSEN_EXAMPLE,
                        "calib": {"accuracy": 0.94, "loss": 0.22, "examples": 360},
                        "eval": None,
                        "seconds": 0.41,
                        "chosen": True,
                        "phase": "refine",
                    }
                ],
            },
            "finetune": {
                "config": {"steps": 60, "lr": 0.001, "batch_size": 64, "device": "cuda"},
                "runs": [
                    {"model": "fused", "steps": 60, "stopped_by": "steps", "seconds": 3.2},
                    {"model": "vanilla", "steps": 60, "stopped_by": "steps", "seconds": 3.1},
                ],
            },
            "artifacts": {
                "model": ".",
                "transport_maps": "transport_maps.safetensors",
                "report": "report.html",
                "metrics": "metrics.json",
            },
            "job_id": "0193a1f2c3d4a1b2c3d4e5f6",
        },
        "urls": None,
    },
)

QUEUED = _example_job(
    status="queued",
    stage=None,
    progress=0.0,
    detail="waiting for a worker",
    started_at=None,
    attempts=0,
)


def _job_response(raw: bytes, status: int = 200, headers: dict | None = None) -> Response:
    return Response(raw, status_code=status, media_type="application/json", headers=headers)


async def _owned(request: Request, job_id: str, who: str) -> tuple[bytes, dict]:
    raw = await request.app.state.store.aget_raw(job_id) if _ID.match(job_id) else None
    job = json.loads(raw) if raw is not None else None
    if job is None or job["tenant"] != who:
        raise ProblemError(404, f"no job {job_id}", kind="job-not-found")
    return raw, job


@_get(
    "/{job_id}",
    operation_id="get_job",
    summary="A job: status, stage, progress, result",
    response_model=Job,
    responses={
        200: {
            "description": "the job; `Retry-After` while it is not done",
            "headers": {
                "ETag": {"schema": {"type": "string"}},
                "Retry-After": {"schema": {"type": "integer"}, "description": "seconds"},
            },
            "content": {
                "application/json": {
                    "examples": {
                        "running": {"value": _example_job()},
                        "finetuning": {"value": FINETUNING},
                        "succeeded": {"value": SUCCEEDED},
                        "succeeded (sweep + finetune)": {"value": HEALED},
                    }
                }
            },
        },
        304: {"description": "not modified since the ETag in If-None-Match"},
        **_problem_responses(401, 404),
    },
    openapi_extra={
        "security": [{"HTTPBearer": []}],
        "parameters": [
            {
                "name": "if-none-match",
                "in": "header",
                "required": False,
                "schema": {"type": "string"},
                "description": "an ETag from a previous response: 304 when unchanged",
            }
        ],
    },
)
async def get_job(request: Request, job_id: str):
    # The polling hot path: no dependency injection (auth and If-None-Match are read here;
    # they are declared for the OpenAPI document in openapi_extra), no JSON parsing.
    who = tenant_of(request)
    raw = await request.app.state.store.aget_raw(job_id) if _ID.match(job_id) else None
    if raw is None or peek(raw, "tenant") != who:
        raise ProblemError(404, f"no job {job_id}", kind="job-not-found")
    if_none_match = request.headers.get("if-none-match")
    etag = '"' + hashlib.blake2b(raw, digest_size=12).hexdigest() + '"'
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if peek(raw, "status") not in DONE:
        headers["Retry-After"] = str(request.app.state.settings.retry_after)
    if if_none_match and (
        if_none_match.strip() == "*"
        or etag in (t.strip().removeprefix("W/") for t in if_none_match.split(","))
    ):
        return Response(status_code=304, headers=headers)
    return _job_response(raw, headers=headers)


@router.post(
    "",
    operation_id="submit_job",
    status_code=202,
    summary="Submit a fusion job",
    response_model=Job,
    responses={
        202: {
            "description": "accepted; poll the Location",
            "headers": {"Location": {"schema": {"type": "string"}, "description": "/fusions/{id}"}},
            "content": {"application/json": {"example": QUEUED}},
            "links": {
                name: {"operationId": operation, "parameters": {"job_id": "$response.body#/id"}}
                for name, operation in (
                    ("GetJob", "get_job"),
                    ("CancelJob", "cancel_job"),
                    ("DeleteJob", "delete_job"),
                )
            },
        },
        **_problem_responses(401, 413, 422, 429, 503),
    },
)
async def submit(
    request: Request,
    spec: JobSpec,
    who: Annotated[str, Depends(tenant)],
    idempotency_key: Annotated[
        str | None,
        Header(
            max_length=255,
            description="retries with the same key and body return the original job",
        ),
    ] = None,
):
    state = request.app.state
    job, _ = await run_in_threadpool(
        jobs.submit,
        spec,
        who,
        state.settings,
        state.store,
        state.queue,
        state.storage,
        idempotency_key,
    )
    return JSONResponse(job, status_code=202, headers={"Location": f"/fusions/{job['id']}"})


@router.post(
    ":plan",
    operation_id="plan_job",
    summary="Plan a fusion job without running it",
    description="The body of POST /fusions. From the models' config.json and safetensors "
    "headers only (no tensor is read, no job is created): whether the models can be fused, "
    "the fused config and shapes, the transport-map graph, and the estimated peak memory and "
    "time on the worker's device. 422 where POST /fusions would refuse the job, or when the "
    "models cannot be fused or their estimate does not fit the worker's memory.",
    response_model=PlanReport,
    responses={
        200: {"content": {"application/json": {"example": PLAN_EXAMPLE}}},
        **_problem_responses(401, 413, 422, 429),
    },
)
async def plan_job(request: Request, spec: JobSpec, who: Annotated[str, Depends(tenant)]):
    state = request.app.state
    await run_in_threadpool(check_submit_rate, who, state.settings, state.store)
    report = await run_in_threadpool(jobs.plan, spec, who, state.settings, state.storage)
    return JSONResponse(report)


@router.get(
    "",
    operation_id="list_jobs",
    summary="The caller's jobs, newest first",
    response_model=JobList,
    responses=_problem_responses(401, 422),
)
async def list_jobs(
    request: Request,
    who: Annotated[str, Depends(tenant)],
    status: Annotated[Status | None, Query(description="only jobs with this status")] = None,
    page_size: Annotated[int, Query(ge=1, le=100)] = 20,
    page_token: Annotated[
        str | None, Query(max_length=200, description="next_page_token of the previous page")
    ] = None,
):
    try:
        after = decode_token(page_token) if page_token else None
    except ValueError as exc:
        raise ProblemError(
            422,
            f"page_token: {exc}",
            kind="invalid-request",
            errors=[{"field": "page_token", "message": str(exc)}],
        ) from None
    items, last = await run_in_threadpool(
        request.app.state.store.list, who, status, after, page_size
    )
    return {"items": items, "next_page_token": encode_token(last) if last else None}


@router.post(
    "/{job_id}:cancel",
    operation_id="cancel_job",
    summary="Cancel a job (cooperative)",
    response_model=Job,
    responses=_problem_responses(401, 404, 409),
)
async def cancel(request: Request, job_id: str, who: Annotated[str, Depends(tenant)]):
    await _owned(request, job_id, who)
    job = await run_in_threadpool(jobs.cancel, job_id, request.app.state.store)
    if job is None:
        raise ProblemError(404, f"no job {job_id}", kind="job-not-found")
    return JSONResponse(job)


@router.delete(
    "/{job_id}",
    operation_id="delete_job",
    status_code=204,
    summary="Remove a finished job's record (and, with artifacts=true, its outputs)",
    responses=_problem_responses(401, 404, 409),
)
async def delete(
    request: Request,
    job_id: str,
    who: Annotated[str, Depends(tenant)],
    artifacts: Annotated[bool, Query(description="also delete the output prefix")] = False,
):
    _, job = await _owned(request, job_id, who)
    state = request.app.state
    await run_in_threadpool(jobs.delete, job, state.store, state.storage, artifacts)
    return Response(status_code=204)
