"""Fault scenarios: each injects one fault into a running job and reports what became of
it. tests/faults/ asserts on one run of each; bench/faults.py repeats them for a table."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from helpers import BUCKET, REPO, free_port, wait_for
from lab import ALICE, Lab

KILL_STAGES = ("downloading", "aligning", "evaluating", "finetuning", "uploading", "mid-upload")


@dataclass
class Outcome:
    """One job under one fault."""

    scenario: str
    status: str  # the job's final status
    error: str | None  # its error type
    attempts: int
    successes: int  # deliveries that recorded success (must be 0 or 1)
    artifacts_ok: bool  # the published files are exactly one set, no leftovers
    seconds: float  # submit to end

    @property
    def ok(self) -> bool:
        if self.status == "succeeded":
            return self.successes == 1 and self.artifacts_ok
        return self.artifacts_ok  # a failure must leave nothing behind


def _outcome(lab: Lab, scenario: str, job: dict, started: float) -> Outcome:
    files = lab.published(job)
    if job["status"] == "succeeded":
        key = job["output"].removeprefix(f"s3://{BUCKET}/") + "metrics.json"
        metrics = json.loads(lab.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
        artifacts_ok = (
            sorted(files) == sorted(job["result"]["files"])
            and metrics["job_id"] == job["id"]
            and not lab.leftovers()
        )
    else:
        artifacts_ok = files == [] and not lab.leftovers()
    return Outcome(
        scenario,
        job["status"],
        (job.get("error") or {}).get("type"),
        job["attempts"],
        lab.successes_logged(job["id"]),
        artifacts_ok,
        round(time.monotonic() - started, 1),
    )


def worker_killed(lab: Lab, stage: str) -> Outcome:
    """The worker's child is SIGKILLed (as by the OOM killer) at `stage` of the first
    attempt; the job must be redelivered and succeed exactly once."""
    with lab.client() as client:
        started = time.monotonic()
        name = "kill-mid-upload" if stage == "mid-upload" else f"kill-at-{stage}"
        job_id = lab.submit(client, lab.spec(name))
        job = lab.wait_done(client, job_id)
    return _outcome(lab, f"worker SIGKILL at {stage}", job, started)


def redis_restarted(lab: Lab, jobs: int = 3) -> list[Outcome]:
    """Redis restarts while one job runs and the others wait: none may be lost."""
    with lab.client() as client:
        started = time.monotonic()
        first = lab.submit(client, lab.spec("pause-4", heal=False))
        queued = [lab.submit(client, lab.spec(f"queued-{i}", heal=False)) for i in range(jobs - 1)]

        def running():
            return client.get(f"/fusions/{first}", headers=ALICE).json()["stage"] == "aligning"

        wait_for(running, 60, "the first job to run")
        lab.restart_redis()
        ended = [lab.wait_done(client, job_id) for job_id in [first, *queued]]
    return [_outcome(lab, "Redis restart (AOF on)", job, started) for job in ended]


def s3_failing(lab: Lab, mode: str, after: int) -> Outcome:
    """The S3 server answers 503 (`fail`) or drops connections (`drop`) for writes into the
    output bucket after `after` of them: retried with backoff, then `failed` with a
    storage error, and nothing under the final prefix."""
    state = lab.proxy_state
    with state.lock:
        state.mode, state.after, state.writes, state.refused = mode, after, 0, 0
    try:
        with lab.client() as client:
            started = time.monotonic()
            job = lab.wait_done(client, lab.submit(client, lab.spec(f"s3-{mode}", heal=False)))
    finally:
        with state.lock:
            state.mode = "pass"
    phase = "upload" if after == 0 else "copy into place"
    what = "503" if mode == "fail" else "dropped connections"
    outcome = _outcome(lab, f"S3 {what} during {phase}", job, started)
    outcome.refused = state.refused  # type: ignore[attr-defined]
    return outcome


def api_restarted(lab: Lab) -> Outcome:
    """`otfuse submit --wait` polls while the API process restarts: the client rides out
    the outage and reports the job's success."""
    port = free_port()
    api = lab.start_api(port)
    spec = lab.root / "spec.json"
    spec.write_text(json.dumps(lab.spec("pause-4", heal=False)))
    env = {"OTFUSE_URL": f"http://127.0.0.1:{port}", "OTFUSE_API_KEY": "key-alice"}
    started = time.monotonic()
    client = subprocess.Popen(
        [sys.executable, "-m", "otfuse", "submit", str(spec), "--wait", "--json"],
        cwd=REPO,
        env=os.environ | env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with lab.client() as local:

        def running():
            items = local.get("/fusions", headers=ALICE, params={"status": "running"}).json()
            return any(j["name"] == "pause-4" for j in items["items"])

        wait_for(running, 60, "the job to run")
    api.send_signal(signal.SIGTERM)
    api.wait(30)
    lab.servers.remove(api)
    time.sleep(1)
    lab.start_api(port)
    out, err = client.communicate(timeout=300)
    job = json.loads(out) if client.returncode == 0 else {"status": "client-failed"}
    if client.returncode != 0:
        raise AssertionError(f"submit --wait failed: {err[-2000:]}")
    return _outcome(lab, "API restart while polling", job, started)
