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


def _held_progress(self, fraction, detail, *args, **kwargs):
    if self.stage == "aligning" and "layer" in detail:
        _hold(self, "hold")
    return _progress(self, fraction, detail, *args, **kwargs)


def _held_download(self, spec, tenant, work):
    _hold(self, "hold-download")
    return _stage_inputs(self, spec, tenant, work)


pipeline.Run.progress = _held_progress
pipeline.Run._stage_inputs = _held_download


# -- fault injection (tests/faults): the worker child dies as if OOM-killed ------------------------
# "kill-at-<stage>": on the first attempt, at entering <stage> (downloading, aligning,
# evaluating, finetuning, uploading); "kill-mid-upload": on the first attempt, after the first
# file reached the final prefix; "pause-<seconds>": the first aligned layer of each attempt
# takes that long (a job that is surely running when a fault hits).
import os  # noqa: E402
import signal  # noqa: E402

from adapters import storage  # noqa: E402

_enter = pipeline.Run.enter
_publish = storage.S3Backend.publish


def _first_attempt_named(run, name: str) -> bool:
    job = run.store.get(run.job_id) or {}
    return job.get("name") == name and job.get("attempts") == 1


def _killing_enter(self, stage, detail):
    if _first_attempt_named(self, f"kill-at-{stage}"):
        os.kill(os.getpid(), signal.SIGKILL)
    return _enter(self, stage, detail)


def _pausing_progress(self, fraction, detail, *args, **kwargs):
    job = self.store.get(self.job_id) or {}
    name = job.get("name") or ""
    if self.stage == "aligning" and name.startswith("pause-") and not getattr(self, "_paused", 0):
        self._paused = 1
        time.sleep(float(name.removeprefix("pause-")))
    return _held_progress(self, fraction, detail, *args, **kwargs)


def _killing_publish(self, local, prefix, job_id, attempt):
    if attempt == 1 and (local / "job.json").is_file():
        import json

        name = json.loads((local / "job.json").read_text()).get("spec", {}).get("name")
        if name == "kill-mid-upload":
            copy = self._client.copy
            calls = []

            def copy_then_die(*args, **kwargs):
                copy(*args, **kwargs)
                calls.append(1)
                if len(calls) == 2:  # job.json and one more file are in the final prefix
                    os.kill(os.getpid(), signal.SIGKILL)

            self._client.copy = copy_then_die
    return _publish(self, local, prefix, job_id, attempt)


pipeline.Run.enter = _killing_enter
pipeline.Run.progress = _pausing_progress
storage.S3Backend.publish = _killing_publish
