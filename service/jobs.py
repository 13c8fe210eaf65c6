"""Job operations behind the routes: submit, cancel, delete. Plain functions over the store,
the queue and storage, so route functions stay thin."""

from __future__ import annotations

import hashlib
import json
import math

from adapters.access import Access
from adapters.jobspec import check_spec, probe_inputs
from adapters.planning import check_fits, memory_limits, plan_spec
from adapters.storage import StorageError
from adapters.store import DONE, IdempotencyConflict, JobStore, finish, new_job_id, now_iso
from fusion_core.contract import JobSpec
from fusion_core.errors import InputError

from .problems import ProblemError, SpecError

QUEUE_FULL_RETRY = 30  # seconds: a queued job takes at least that to start and finish


def fingerprint(spec: JobSpec) -> str:
    """Of the fields the body gives: giving a default is not the same request as leaving it
    out (a given field pins its axis of the recipe search)."""
    canonical = json.dumps(given(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def given(spec: JobSpec) -> dict:
    """The spec as the client gave it, without the defaults: what the worker parses, so that
    the fields the job pins survive the round trip through the job record."""
    return spec.model_dump(mode="json", exclude_unset=True)


def submit(
    spec: JobSpec,
    tenant: str,
    settings,
    store: JobStore,
    queue,
    storage,
    idempotency_key: str | None,
) -> tuple[dict, bool]:
    """Within the tenant's submit rate and queue quota: validate, record, enqueue. Returns
    (job, created)."""
    original = fingerprint(spec)  # of the body as sent, before normalization
    check_quota(tenant, settings, store)
    job_id = new_job_id()
    try:
        spec = check_spec(spec, settings, tenant)
        probe_inputs(spec, storage)
        check_memory(spec, tenant, settings, storage)
        output = spec.output or Access(settings).default_output(tenant, job_id)
    except InputError as error:
        raise SpecError(error.field or "body", error.reason) from None
    now = now_iso()
    job = {
        "id": job_id,
        "tenant": tenant,
        "status": "queued",
        "stage": None,
        "progress": 0.0,
        "detail": "waiting for a worker",
        "name": spec.name,
        "labels": spec.labels,
        "spec": spec.model_dump(mode="json"),
        "request": given(spec),
        "output": output,
        "created_at": now,
        "updated_at": now,
        "started_at": None,
        "finished_at": None,
        "attempts": 0,
        "cancel_requested": False,
        "error": None,
        "result": None,
        "position": None,
    }
    try:
        job, created = store.create(job, (idempotency_key, original) if idempotency_key else None)
    except IdempotencyConflict:
        raise ProblemError(
            422,
            "Idempotency-Key was already used with a different body",
            kind="idempotency-key-reused",
            errors=[{"field": "Idempotency-Key", "message": "already used with another body"}],
        ) from None
    if created:
        try:
            queue.enqueue(job_id)
        except Exception as exc:
            error = ("queue_error", f"could not enqueue: {exc}")
            store.update(job_id, lambda j: finish(j, "failed", error=error))
            raise ProblemError(503, f"the job queue is unavailable: {exc}") from exc
    return job, created


def plan(spec: JobSpec, tenant: str, settings, storage) -> dict:
    """The job's plan (nothing recorded or queued): 422 where submit would refuse it, for
    the same reasons, or because the models cannot be fused or do not fit the worker."""
    try:
        spec = check_spec(spec, settings, tenant)
        report = plan_spec(spec, settings, storage, tenant)
        if not report.compatible:
            raise InputError(report.problem or "the models cannot be fused", report.field)
        check_fits(report, settings)
    except InputError as error:
        raise SpecError(error.field or "models", error.reason) from None
    return report.to_dict()


def check_memory(spec: JobSpec, tenant: str, settings, storage) -> None:
    """At submit, where a worker memory is known: refuse a job whose planned peak is above
    it. A plan that cannot be made (unreadable inputs, models that do not fit together) is
    left to the worker, which reports it as the fusion would."""
    if memory_limits(settings) == (None, None):
        return
    try:
        report = plan_spec(spec, settings, storage, tenant)
    except (InputError, StorageError):
        return
    if report.compatible:
        check_fits(report, settings)


def check_submit_rate(tenant: str, settings, store: JobStore) -> None:
    """429 with Retry-After when the tenant submits (or plans) faster than its rate."""
    wait = store.take_submit_token(tenant, settings.submit_rate, settings.submit_burst)
    if wait > 0:
        raise ProblemError(
            429,
            f"more than {settings.submit_rate:g} submits per second (bursts of "
            f"{settings.submit_burst}); retry in {math.ceil(wait)} s",
            kind="rate-limited",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )


def check_quota(tenant: str, settings, store: JobStore) -> None:
    """429 with Retry-After when the tenant submits faster than its rate, or has its
    maximum of jobs waiting. Every submit takes a token, valid or not."""
    check_submit_rate(tenant, settings, store)
    queued = store.tenant_counts(tenant)["queued"]
    if queued >= settings.max_queued_per_tenant:
        raise ProblemError(
            429,
            f"{queued} of your jobs are waiting, the most this server queues per tenant; "
            "submit again when some have started",
            kind="queue-full",
            headers={"Retry-After": str(QUEUE_FULL_RETRY)},
        )


def cancel(job_id: str, store: JobStore) -> dict | None:
    """Queued: cancelled now (it never runs). Running: flagged; the worker stops at the next
    layer or stage boundary. Raises 409 when it already ended."""
    ended = []

    def change(job):
        if job["status"] in DONE:
            ended.append(job["status"])
            return None
        if job["status"] == "queued":
            return finish(job, "cancelled", detail="cancelled before it ran")
        job["cancel_requested"] = True
        job["detail"] = "cancelling at the next layer or stage boundary"
        return job

    job = store.update(job_id, change)
    if ended:
        raise ProblemError(409, f"job {job_id} already ended ({ended[0]})", kind="job-ended")
    return job


def delete(job: dict, store: JobStore, storage, artifacts: bool) -> None:
    if job["status"] not in DONE:
        raise ProblemError(
            409, f"job {job['id']} is {job['status']}; cancel it first", kind="job-not-ended"
        )
    if artifacts and job["status"] == "succeeded":
        # Only what this job published, and only while it is still there as this job's.
        names = (job.get("result") or {}).get("files") or []
        try:
            storage.delete_published(job["output"], job["id"], names)
        except StorageError as exc:
            raise ProblemError(409, str(exc), kind="artifacts-not-owned") from None
    store.delete(job["id"])
