"""The Celery worker: `celery -A worker.celery_app worker -Q fusion` (or `otfuse worker`).

One task, `otfuse.fuse(job_id)`; the message carries the id only. The parent (forking)
process never imports torch: each child imports fusion_core when it starts
(worker_process_init), so CUDA is first touched in the child that runs jobs.
"""

from __future__ import annotations

import logging

from celery import signals

from service.queue import TASK_NAME, make_celery
from service.settings import Settings
from service.storage import Storage
from service.store import make_store

settings = Settings()
app = make_celery(settings)
log = logging.getLogger("otfuse.worker")
_runtime: dict = {}


def runtime():
    """The store and storage of this process (created after fork)."""
    if not _runtime:
        _runtime["store"] = make_store(settings)
        _runtime["storage"] = Storage(settings)
    return _runtime["store"], _runtime["storage"]


@signals.worker_process_init.connect
def _child_started(**_):
    _runtime.clear()
    import fusion_core  # noqa: F401  (warm: the first job starts without import delay)


@signals.worker_ready.connect
def _parent_ready(**_):
    from .recovery import Reaper

    store = make_store(settings)
    Reaper(store, lambda job_id: fuse.delay(job_id), settings.lease_seconds).start()


@app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)
def fuse(self, job_id: str) -> str:
    from .pipeline import run_job

    store, storage = runtime()
    outcome = run_job(job_id, store, storage, settings)
    log.info("job %s: %s", job_id, outcome)
    return outcome
