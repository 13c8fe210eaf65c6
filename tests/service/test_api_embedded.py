"""The embedded default end to end (in-process worker, local folders), plus the HTTP
contract: validation errors, ETag/304, Retry-After, pagination, cancel, delete, metrics."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import transformers
from fastapi.testclient import TestClient
from helpers import wait_for

from adapters.queue import Queue
from adapters.settings import Settings
from otfuse.server import build_app
from worker import pipeline
from worker.pipeline import inline_metrics

DONE = ("succeeded", "failed", "cancelled")


class HeldQueue(Queue):
    """A queue nobody drains: jobs stay queued."""

    def __init__(self):
        self.sent = []

    def enqueue(self, job_id):
        self.sent.append(job_id)


def make_client(tmp_path: Path, parents, queue=None, **overrides) -> TestClient:
    """Inputs from the parents' folder; the test's folder is the local tenant's own."""
    settings = Settings(
        data_dir=tmp_path / "service",
        file_roots=[parents["root"]],
        tenant_prefixes={"local": [f"file://{tmp_path}/"]},
        **overrides,
    )
    return TestClient(build_app(settings, queue=queue))


def spec(parents, **extra) -> dict:
    body = {"models": [f"file://{m}" for m in parents["models"]]}
    body.update(extra)
    return body


def wait_done(client: TestClient, job_id: str, timeout: float = 60) -> dict:
    def done():
        job = client.get(f"/fusions/{job_id}").json()
        return job if job["status"] in DONE else None

    return wait_for(done, timeout, f"job {job_id} to end")


@pytest.fixture
def client(tmp_path, parents):
    with make_client(tmp_path, parents) as client:
        yield client


def test_embedded_end_to_end(client, parents):
    body = spec(parents, data={"eval": f"file://{parents['data']}"}, name="e2e", labels={"a": "b"})
    response = client.post("/fusions", json=body)
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/fusions/{job['id']}"
    assert job["status"] == "queued" and job["name"] == "e2e" and job["labels"] == {"a": "b"}

    job = wait_done(client, job["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["progress"] == 1.0 and job["stage"] is None and job["attempts"] == 1
    result = job["result"]
    folder = Path(result["checkpoint"].removeprefix("file://"))
    model = transformers.ViTForImageClassification.from_pretrained(folder)
    assert model.config.hidden_size == 16
    metrics = json.loads((folder / "metrics.json").read_text())
    assert inline_metrics(metrics) == result["metrics"]
    assert metrics["job_id"] == job["id"] and metrics["schema_version"] == 1
    assert set(metrics["fused"]) == {"accuracy", "loss", "examples"}
    assert [p["model"] for p in metrics["parents"]] == [m + "/" for m in body["models"]]
    assert [r["name"] for r in metrics["evaluation"]] == [
        "parent 0",
        "parent 1",
        "ensemble",
        "vanilla",
        "fused",
    ]
    # The document names the URIs sent, not the worker's copies.
    assert metrics["models"] == body["models"] and metrics["data"]["eval"] == body["data"]["eval"]
    assert metrics["sweep"] is None and metrics["finetune"] is None
    assert result["report_uri"] is None and result["transport_maps_uri"] is None
    as_run = json.loads((folder / "job.json").read_text())
    assert as_run["job_id"] == job["id"] and as_run["fusion_spec"]["reg"] == 0.05
    assert {"config.json", "model.safetensors", "fusion.json", "README.md"} <= {
        p.name for p in folder.iterdir()
    }
    # A finished job has no Retry-After; polling with its ETag is a 304.
    response = client.get(f"/fusions/{job['id']}")
    assert "retry-after" not in response.headers
    etag = response.headers["etag"]
    again = client.get(f"/fusions/{job['id']}", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.headers["etag"] == etag and not again.content

    metrics_text = client.get("/metrics").text
    assert 'otfuse_jobs{status="succeeded"} 1.0' in metrics_text
    assert 'otfuse_stage_duration_seconds_count{stage="aligning"} 1.0' in metrics_text
    assert "otfuse_http_request_duration_seconds_bucket" in metrics_text
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"


def test_failed_job_names_the_model_and_leaves_nothing(client, parents, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    out = tmp_path / "out"
    body = {
        "models": [f"file://{parents['models'][0]}", f"file://{broken}"],
        "output": f"file://{out}",
    }
    job = wait_done(client, client.post("/fusions", json=body).json()["id"])
    assert job["status"] == "failed"
    assert job["error"]["type"] == "input_error"
    assert str(broken) in job["error"]["message"]
    assert not out.exists()
    assert "retry-after" not in client.get(f"/fusions/{job['id']}").headers


def test_output_prefix_of_another_job_is_refused(client, parents, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "something").write_text("x")
    job = client.post("/fusions", json=spec(parents, output=f"file://{out}")).json()
    job = wait_done(client, job["id"])
    assert job["status"] == "failed" and job["error"]["type"] == "output_not_empty"
    assert (out / "something").read_text() == "x"


def test_cancel_queued_never_runs(tmp_path, parents):
    with make_client(tmp_path, parents, queue=HeldQueue()) as client:
        job = client.post("/fusions", json=spec(parents)).json()
        response = client.get(f"/fusions/{job['id']}")
        assert response.headers["retry-after"] == "1"
        cancelled = client.post(f"/fusions/{job['id']}:cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        assert client.post(f"/fusions/{job['id']}:cancel").status_code == 409
        app = client.app
        # A delivery that arrives now does nothing.
        outcome = pipeline.run_job(
            job["id"], app.state.store, app.state.storage, app.state.settings
        )
        assert outcome == "skipped"
        assert client.get(f"/fusions/{job['id']}").json()["attempts"] == 0
        assert client.delete(f"/fusions/{job['id']}").status_code == 204
        assert client.get(f"/fusions/{job['id']}").status_code == 404


def test_cancel_running_stops_at_a_layer_boundary(tmp_path, parents, monkeypatch):
    entered, release = threading.Event(), threading.Event()
    original = pipeline.Run.progress

    def gated(self, fraction, detail, *args, **kwargs):
        if self.stage == "aligning" and "layer" in detail:
            entered.set()
            release.wait(30)  # hold the job inside a layer until the test cancelled it
        return original(self, fraction, detail, *args, **kwargs)

    monkeypatch.setattr(pipeline.Run, "progress", gated)
    out = tmp_path / "cancelled-out"
    with make_client(tmp_path, parents) as client:
        job = client.post("/fusions", json=spec(parents, output=f"file://{out}")).json()
        assert entered.wait(30)
        running = client.get(f"/fusions/{job['id']}").json()
        assert running["status"] == "running" and running["stage"] == "aligning"
        assert client.delete(f"/fusions/{job['id']}").status_code == 409
        response = client.post(f"/fusions/{job['id']}:cancel")
        assert response.status_code == 200 and response.json()["cancel_requested"]
        release.set()
        job = wait_done(client, job["id"])
    assert job["status"] == "cancelled" and job["result"] is None
    assert not out.exists()


def test_list_is_newest_first_with_cursor_pages_and_status_filter(tmp_path, parents):
    with make_client(tmp_path, parents, queue=HeldQueue()) as client:
        ids = [client.post("/fusions", json=spec(parents)).json()["id"] for _ in range(5)]
        client.post(f"/fusions/{ids[1]}:cancel")
        seen, token = [], None
        while True:
            params = {"page_size": 2} | ({"page_token": token} if token else {})
            page = client.get("/fusions", params=params).json()
            seen += [j["id"] for j in page["items"]]
            token = page["next_page_token"]
            if not token:
                break
        assert seen == ids[::-1]
        cancelled = client.get("/fusions", params={"status": "cancelled"}).json()
        assert [j["id"] for j in cancelled["items"]] == [ids[1]]
        assert cancelled["next_page_token"] is None


def test_delete_with_artifacts(client, parents):
    job = wait_done(client, client.post("/fusions", json=spec(parents)).json()["id"])
    folder = Path(job["output"].removeprefix("file://"))
    assert (folder / "model.safetensors").is_file()
    assert client.delete(f"/fusions/{job['id']}", params={"artifacts": "true"}).status_code == 204
    assert not folder.exists()
    assert client.get(f"/fusions/{job['id']}").status_code == 404


def test_idempotency_key(tmp_path, parents):
    with make_client(tmp_path, parents, queue=HeldQueue()) as client:
        headers = {"Idempotency-Key": "abc-1"}
        first = client.post("/fusions", json=spec(parents), headers=headers)
        again = client.post("/fusions", json=spec(parents), headers=headers)
        assert first.status_code == again.status_code == 202
        assert again.json()["id"] == first.json()["id"]
        assert again.headers["location"] == first.headers["location"]
        other = client.post("/fusions", json=spec(parents, regularizer=0.1), headers=headers)
        assert other.status_code == 422
        assert other.json()["errors"][0]["field"] == "Idempotency-Key"
        fresh = client.post("/fusions", json=spec(parents), headers={"Idempotency-Key": "abc-2"})
        assert fresh.json()["id"] != first.json()["id"]
        assert len(client.get("/fusions").json()["items"]) == 2


def test_job_store_file_survives_a_restart(tmp_path, parents):
    with make_client(tmp_path, parents, queue=HeldQueue()) as client:
        job_id = client.post("/fusions", json=spec(parents)).json()["id"]
    with make_client(tmp_path, parents) as client:  # the embedded worker picks it up
        job = wait_done(client, job_id)
    assert job["status"] == "succeeded"


def test_no_keys_means_no_auth_and_tenant_local(client, parents):
    job = client.post("/fusions", json=spec(parents)).json()
    assert job["tenant"] == "local"


@pytest.mark.parametrize("path", ["/fusions/nothex", "/fusions/0123456789abcdef01234567"])
def test_unknown_job_is_a_problem_404(client, path):
    response = client.get(path)
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["status"] == 404


def test_timings_are_recorded(client, parents):
    started = time.perf_counter()
    job = wait_done(client, client.post("/fusions", json=spec(parents)).json()["id"])
    metrics = job["result"]["metrics"]
    assert 0 < metrics["fusion_seconds"] <= metrics["wall_seconds"] <= time.perf_counter() - started
    assert job["started_at"] >= job["created_at"] and job["finished_at"] >= job["started_at"]
