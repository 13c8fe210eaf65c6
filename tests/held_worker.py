"""The real Celery worker app, with one test hook: a job named "hold..." waits inside its
first aligned layer until it is cancelled ("hold-once": only on its first attempt), so tests
can cancel a running job or kill its worker at a known point. Used as
`celery -A held_worker worker` by test_api_distributed.py."""

from __future__ import annotations

import time

from worker import pipeline
from worker.celery_app import app  # noqa: F401  (celery -A finds it here)

_original = pipeline.Run.progress


def _held(self, fraction, detail, force=False):
    if self.stage == "aligning" and "layer" in detail:
        job = self.store.get(self.job_id) or {}
        name = job.get("name") or ""
        hold = name == "hold" or (name == "hold-once" and job.get("attempts") == 1)
        deadline = time.monotonic() + 60
        while hold and time.monotonic() < deadline and not self.should_stop():
            time.sleep(0.05)
    return _original(self, fraction, detail, force)


pipeline.Run.progress = _held
