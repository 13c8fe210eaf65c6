"""SIGTERM is honoured within seconds at any stage: a Celery worker and the embedded server
stop their running job at its next boundary, put it back to `queued`, and exit; the job runs
again on the next worker (or the next start of the embedded server)."""

from __future__ import annotations

import json
import signal
import time

from helpers import free_port, start_celery_worker, start_server, stop_process, wait_for
from lab import ALICE


def test_sigterm_stops_a_celery_worker_within_seconds_and_the_job_runs_again(lab):
    with lab.client() as client:
        job_id = lab.submit(client, lab.spec("hold", heal=False))

        def aligning():
            return client.get(f"/fusions/{job_id}", headers=ALICE).json()["stage"] == "aligning"

        wait_for(aligning, 60, "the job to run")
        lab.worker.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        lab.worker.wait(30)
        assert time.monotonic() - stopped < 15  # not the 30 minutes of a warm shutdown
        job = client.get(f"/fusions/{job_id}", headers=ALICE).json()
        assert job["status"] == "queued" and "worker shutdown" in job["detail"], job
        # The next worker takes it from the broker; the hold hook holds until cancelled.
        lab.worker = start_celery_worker(lab.env, lab.worker_log)
        wait_for(aligning, 60, "the job to run again")
        client.post(f"/fusions/{job_id}:cancel", headers=ALICE)
        assert lab.wait_done(client, job_id)["status"] == "cancelled"
        assert client.get(f"/fusions/{job_id}", headers=ALICE).json()["attempts"] == 2


def test_sigterm_stops_the_embedded_server_within_seconds_mid_finetune(tmp_path, parents):
    import httpx

    port = free_port()
    env = {"OTFUSE_DATA_DIR": str(tmp_path / "svc"), "OTFUSE_FILE_ROOTS": str(parents["root"])}
    url = f"http://127.0.0.1:{port}"
    data = f"file://{parents['data']}"
    spec = {
        "models": [f"file://{m}" for m in parents["models"]],
        "data": {"finetune": data},
        "finetune": {"steps": 1_000_000, "batch_size": 4},  # far longer than the test
    }
    servers = [start_server(env, port, tmp_path / "server.log")]
    try:
        job_id = httpx.post(f"{url}/fusions", json=spec, timeout=60).json()["id"]

        def finetuning():
            job = httpx.get(f"{url}/fusions/{job_id}", timeout=30).json()
            return job["stage"] == "finetuning"

        wait_for(finetuning, 90, "the finetune stage")
        servers[0].send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        servers[0].wait(60)
        assert time.monotonic() - stopped < 15
        record = json.loads((tmp_path / "svc" / "jobs.json").read_text())["jobs"][job_id]
        assert record["status"] == "queued" and not (tmp_path / "svc" / "artifacts").exists()
        # The next start resumes it.
        servers.append(start_server(env, port, tmp_path / "server.log"))
        wait_for(finetuning, 90, "the job to run again")
        httpx.post(f"{url}/fusions/{job_id}:cancel", timeout=30)

        def cancelled():
            return httpx.get(f"{url}/fusions/{job_id}", timeout=30).json()["status"] == "cancelled"

        wait_for(cancelled, 60, "the cancel")
    finally:
        for server in servers:
            stop_process(server, timeout=60)
