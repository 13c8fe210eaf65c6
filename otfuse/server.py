"""The composition root of the service: the API (`service`) with its queue wired in. In
embedded mode that is the in-process worker (`worker.embedded`), which the API must not
import itself; in distributed mode it is the Celery queue."""

from __future__ import annotations

from adapters.settings import Settings
from adapters.storage import Storage
from adapters.store import make_store
from service.app import create_app


def build_app(settings: Settings | None = None, *, store=None, storage=None, queue=None):
    settings = settings or Settings()
    store = store or make_store(settings)
    storage = storage or Storage(settings)
    if queue is None and settings.mode == "embedded":
        from worker.embedded import EmbeddedQueue  # the same pipeline, in threads

        queue = EmbeddedQueue(settings, store, storage)
    return create_app(settings, store=store, storage=storage, queue=queue)
