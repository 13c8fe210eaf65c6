"""The real Celery worker app, with test hooks keyed on the job's name, so tests can cancel a
running job, kill its worker or stop it at a known point:

- "hold": waits inside its first aligned layer until it is cancelled or stopped;
- "hold-once": the same, on its first attempt only;
- "hold-download": waits at the start of the downloading stage, before anything is fetched.

Used as `celery -A held_worker worker` by the distributed, security and fault tests."""

from __future__ import annotations

import time

from worker import pipeline
from worker.celery_app import app  # noqa: F401  (celery -A finds it here)

_progress = pipeline.Run.progress
_stage_inputs = pipeline.Run._stage_inputs


def _hold(run, name_to_hold: str) -> None:
    job = run.store.get(run.job_id) or {}
    name = job.get("name") or ""
    first = job.get("attempts") == 1
    hold = name == name_to_hold or (name_to_hold == "hold" and name == "hold-once" and first)
    deadline = time.monotonic() + 60
    while hold and time.monotonic() < deadline and not run.should_stop():
        time.sleep(0.05)


def _held_progress(self, fraction, detail, force=False):
    if self.stage == "aligning" and "layer" in detail:
        _hold(self, "hold")
    return _progress(self, fraction, detail, force)


def _held_download(self, spec, tenant, work):
    _hold(self, "hold-download")
    return _stage_inputs(self, spec, tenant, work)


pipeline.Run.progress = _held_progress
pipeline.Run._stage_inputs = _held_download
