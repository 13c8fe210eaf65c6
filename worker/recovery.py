"""Requeue jobs whose worker vanished: running with no live lease (the worker process was
killed, e.g. at the hard time limit, and its message was acked). Redelivery by the broker
covers the other crash cases; the lease keeps the two from running one job twice at once."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime

log = logging.getLogger("otfuse.worker")


def _age(stamp: str) -> float:
    then = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return (datetime.now(UTC) - then).total_seconds()


def requeue_stale(store, enqueue, lease_seconds: float) -> list[str]:
    """Requeue every running job without a lease that has not moved for a lease period."""
    requeued = []
    for job_id in store.active():
        job = store.get(job_id)
        if not job or job["status"] != "running" or store.lease_holder(job_id):
            continue
        if _age(job["updated_at"]) < lease_seconds:
            continue
        if _requeue(store, job_id):
            log.warning("job %s: worker lost; requeued", job_id)
            enqueue(job_id)
            requeued.append(job_id)
    return requeued


def _requeue(store, job_id: str) -> bool:
    changed = []

    def change(record):
        if record["status"] != "running" or store.lease_holder(job_id):
            return None
        record.update(status="queued", stage=None, detail="requeued: its worker stopped responding")
        changed.append(True)
        return record

    store.update(job_id, change)
    return bool(changed)


class Reaper(threading.Thread):
    """Every lease period: requeue stale jobs, and delete records of jobs that ended more
    than `record_ttl` seconds ago (their outputs stay; see docs/security.md)."""

    def __init__(self, store, enqueue, lease_seconds: float, record_ttl: float):
        super().__init__(daemon=True, name="otfuse-reaper")
        self.store, self.enqueue, self.lease_seconds = store, enqueue, lease_seconds
        self.record_ttl = record_ttl
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.wait(self.lease_seconds):
            try:
                requeue_stale(self.store, self.enqueue, self.lease_seconds)
                purged = self.store.purge_finished(self.record_ttl)
                if purged:
                    log.info("deleted %d job records ended %ds ago", purged, self.record_ttl)
            except Exception:
                log.warning("stale-job scan failed", exc_info=True)
