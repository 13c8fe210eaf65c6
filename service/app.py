"""The FastAPI app factory. The job store and storage come from settings unless given; the
queue too in distributed mode (Celery). The embedded mode's queue is its in-process worker,
which the service does not import: `otfuse.server.build_app` (the composition root) wires it
in."""

from __future__ import annotations

import gc
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI

from adapters.settings import Settings
from adapters.storage import Storage
from adapters.store import make_store

from . import problems
from .bounds import BodyLimit
from .metrics import LatencyMiddleware, Metrics
from .routers import fusions, health

DESCRIPTION = """Fuse independently trained transformers with Optimal Transport.

Submit a job with `POST /fusions`, poll `GET /fusions/{id}` (honour `Retry-After`; send the
`ETag` back in `If-None-Match` for cheap polls), then read the fused Hugging Face checkpoint
and `metrics.json` under the job's `output` prefix. Errors are RFC 9457 problem details.
Authenticate with `Authorization: Bearer <API key>`."""


def _settle() -> None:
    # The imports leave many long-lived objects (in the embedded server, torch's too): move
    # them out of the cyclic GC's generations so full collections stop pausing requests.
    gc.collect()
    gc.freeze()


def create_app(settings: Settings | None = None, *, store=None, storage=None, queue=None):
    settings = settings or Settings()
    store = store or make_store(settings)
    storage = storage or Storage(settings)
    if queue is None:
        if settings.mode != "distributed":
            raise ValueError(
                "the embedded mode's queue is its in-process worker: build the app with "
                "otfuse.server.build_app (or pass queue=)"
            )
        from adapters.queue import CeleryQueue

        queue = CeleryQueue(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=_settle, daemon=True).start()
        queue.start()
        try:
            yield
        finally:
            queue.stop()
            await store.aclose()

    app = FastAPI(
        title="otfuse",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # served below, with its assets from this process (no CDN)
        redoc_url=None,
    )
    install_docs(app)
    app.state.settings, app.state.store, app.state.storage, app.state.queue = (
        settings,
        store,
        storage,
        queue,
    )
    app.state.metrics = Metrics(store)
    problems.install(app)
    app.include_router(fusions.router)
    app.include_router(health.router)
    app.add_middleware(LatencyMiddleware, metrics=app.state.metrics)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)  # outermost: first
    app.openapi = lambda: _openapi(app)
    return app


DOCS_ASSETS = "/docs/assets"


def install_docs(app: FastAPI) -> None:
    """Swagger UI at /docs, its JavaScript and CSS served from the swagger-ui-bundle package,
    so the page works on a machine with no internet."""
    import swagger_ui_bundle
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    app.mount(DOCS_ASSETS, StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), "docs")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="otfuse API",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
        )


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema, with error bodies declared as application/problem+json."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    problem_ref = {"$ref": "#/components/schemas/Problem"}
    for operation in (op for path in schema["paths"].values() for op in path.values()):
        for code, response in operation.get("responses", {}).items():
            if code.startswith(("4", "5")):
                response["content"] = {problems.PROBLEM: {"schema": problem_ref}}
    components = schema.get("components", {}).get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    app.openapi_schema = schema
    return schema
