"""Liveness, readiness and Prometheus metrics (no auth; failure details need a key)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..auth import tenant_of
from ..problems import ProblemError

router = APIRouter(tags=["health"])
log = logging.getLogger("otfuse.api")


READY = {"status": "ready", "checks": {"store": "ok", "queue": "ok", "storage": "ok"}}


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="The job store, the queue (broker) and storage are reachable",
    responses={
        200: {"content": {"application/json": {"example": READY}}},
        503: {"description": "a dependency is unreachable (the same body, status not-ready)"},
    },
)
async def readyz(request: Request):
    """Why a check failed is for operators: in the log, and in the body only for callers
    with a valid API key (or on an open loopback server)."""
    state = request.app.state
    try:
        tenant_of(request)
        detailed = True
    except ProblemError:
        detailed = False
    checks = {}
    for name, ping in (
        ("store", state.store.ping),
        ("queue", state.queue.ping),
        ("storage", state.storage.ping),
    ):
        try:
            await run_in_threadpool(ping)
            checks[name] = "ok"
        except Exception as exc:
            log.warning("readiness: %s failed: %s: %s", name, type(exc).__name__, exc)
            checks[name] = f"error: {type(exc).__name__}: {exc}"[:300] if detailed else "error"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "not-ready", "checks": checks},
        status_code=200 if ready else 503,
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}},
)
async def metrics(request: Request) -> Response:
    body = await run_in_threadpool(generate_latest, request.app.state.metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
