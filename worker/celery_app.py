"""The Celery worker: `celery -A worker.celery_app worker -Q fusion` (or `otfuse worker`).

One task, `otfuse.fuse(job_id)`; the message carries the id only. The parent (forking)
process never imports torch: each child imports fusion_core when it starts
(worker_process_init), so CUDA is first touched in the child that runs jobs.

Shutdown: Celery's warm shutdown (SIGTERM) would wait for the running job, which may take an
hour. The parent forwards SIGUSR2 to its pool children instead; a child's running job stops
at its next layer, step or transfer chunk, goes back to `queued` and its message back to the
broker, so the worker exits within seconds and the job runs again elsewhere.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading

from celery import signals
from celery.exceptions import Reject

from adapters.queue import TASK_NAME, make_celery
from adapters.settings import Settings
from adapters.storage import Storage
from adapters.store import make_store

settings = Settings()
app = make_celery(settings)
log = logging.getLogger("otfuse.worker")
_runtime: dict = {}
STOPPING = threading.Event()  # in a pool child: the worker is shutting down


def runtime():
    """The store and storage of this process (created after fork)."""
    if not _runtime:
        _runtime["store"] = make_store(settings)
        _runtime["storage"] = Storage(settings)
    return _runtime["store"], _runtime["storage"]


@signals.worker_process_init.connect
def _child_started(**_):
    _runtime.clear()
    STOPPING.clear()
    signal.signal(signal.SIGUSR2, lambda *_: STOPPING.set())
    import fusion_core  # noqa: F401  (warm: the first job starts without import delay)


@signals.worker_shutting_down.connect
def _stop_children(**_):
    from billiard.process import active_children

    for child in active_children():
        with contextlib.suppress(ProcessLookupError, TypeError):  # gone, or not started
            os.kill(child.pid, signal.SIGUSR2)


@signals.worker_ready.connect
def _parent_ready(**_):
    from .recovery import Reaper

    store = make_store(settings)
    reaper = Reaper(
        store, lambda job_id: fuse.delay(job_id), settings.lease_seconds, settings.record_ttl
    )
    reaper.start()


@app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)
def fuse(self, job_id: str) -> str:
    from .pipeline import DEFER_SECONDS, run_job

    store, storage = runtime()
    outcome = run_job(job_id, store, storage, settings, STOPPING)
    log.info("job %s: %s", job_id, outcome)
    if outcome == "interrupted":  # the worker is shutting down: back to the broker
        raise Reject("worker shutting down", requeue=True)
    if outcome == "deferred":  # the tenant's running slots are taken: again, later
        raise self.retry(countdown=DEFER_SECONDS, max_retries=None)
    return outcome
