"""The embedded worker: the same pipeline in threads of the API process (no broker)."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading

from adapters.queue import Queue
from adapters.store import DONE

from .pipeline import DEFER_SECONDS, run_job
from .recovery import Reaper

log = logging.getLogger("otfuse.worker")
WORKER_NICENESS = 10


class EmbeddedQueue(Queue):
    def __init__(self, settings, store, storage):
        self.settings, self.store, self.storage = settings, store, storage
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._reaper: Reaper | None = None

    def enqueue(self, job_id: str) -> None:
        self._queue.put(job_id)

    def start(self) -> None:
        if self._threads:
            return
        self._stopping.clear()
        for job_id in sorted(self.store.active()):  # jobs left by a previous process
            job = self.store.get(job_id)
            if job and job["status"] not in DONE:
                self._queue.put(job_id)
        for n in range(self.settings.embedded_workers):
            thread = threading.Thread(target=self._work, daemon=True, name=f"otfuse-worker-{n}")
            thread.start()
            self._threads.append(thread)
        self._reaper = Reaper(
            self.store, self.enqueue, self.settings.lease_seconds, self.settings.record_ttl
        )
        self._reaper.start()

    def _work(self) -> None:
        # Below the API's priority (Linux: per thread; torch's compute threads started from
        # here inherit it), so polls stay answered while a job saturates the CPUs.
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICENESS)
        while True:
            job_id = self._queue.get()
            if job_id is None or self._stopping.is_set():
                return
            try:
                outcome = run_job(job_id, self.store, self.storage, self.settings, self._stopping)
                log.info("job %s: %s", job_id, outcome)
                if outcome == "deferred" and not self._stopping.is_set():
                    timer = threading.Timer(DEFER_SECONDS, self.enqueue, [job_id])
                    timer.daemon = True
                    timer.start()
            except Exception:
                log.exception("job %s: the pipeline crashed", job_id)

    def stop(self, timeout: float = 30) -> None:
        """Running jobs stop at their next boundary and go back to queued."""
        self._stopping.set()
        if self._reaper:
            self._reaper.stopped.set()
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout)
        self._threads = []
