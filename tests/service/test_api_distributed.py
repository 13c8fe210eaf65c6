"""The distributed stack for real: Redis job store and broker, S3 over HTTP (moto in server
mode), a Celery worker process. Submit -> poll -> the fused checkpoint in the bucket loads with
from_pretrained; cancel queued and running; a killed worker's job is redelivered and written
once; idempotency and tenants on the Redis store."""

from __future__ import annotations

import json
import os
import signal
import uuid

import boto3
import httpx
import pytest
import transformers
from factories import image_data
from fastapi.testclient import TestClient
from helpers import (
    BUCKET,
    MODELS,
    children_of,
    distributed_env,
    s3_keys,
    seed_buckets,
    wait_for,
    worker_stack,
)
from test_api_embedded import HeldQueue

from otfuse.server import build_app

ALICE = {"Authorization": "Bearer key-alice"}
BOB = {"Authorization": "Bearer key-bob-0"}
DONE = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="session")
def stack(redis_url, s3_endpoint, parents, tmp_path_factory):
    env = distributed_env(redis_url, s3_endpoint)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    seed_buckets(s3, parents)
    calib = image_data(tmp_path_factory.mktemp("calib") / "calib.safetensors", seed=1)
    s3.upload_file(str(calib), MODELS, "data/calib.safetensors")
    with worker_stack(env, s3, tmp_path_factory.mktemp("worker") / "worker.log") as stack:
        yield stack


@pytest.fixture
def api(stack):
    with TestClient(build_app(stack["settings"])) as client:
        yield client


def body(**extra) -> dict:
    spec = {
        "models": [f"s3://{MODELS}/vit-0/", f"s3://{MODELS}/vit-1"],
        "data": {"eval": f"s3://{MODELS}/data/images.safetensors"},
    }
    spec.update(extra)
    return spec


def wait_done(client, job_id, timeout=60) -> dict:
    def done():
        job = client.get(f"/fusions/{job_id}", headers=ALICE).json()
        return job if job["status"] in DONE else None

    return wait_for(done, timeout, f"job {job_id} to end")


def keys(s3, bucket, prefix) -> list[str]:
    return s3_keys(s3, bucket, prefix)


def test_distributed_end_to_end(api, stack, tmp_path):
    spec = body(name="e2e", regularizer=[0.05, "emd"], artifacts={"report": True})
    spec["data"]["calibration"] = f"s3://{MODELS}/data/calib.safetensors"
    # calibration data: a recipe search, as short as the 2-point sweep this test ran before
    spec["policy"] = {"alignment": "weights", "residual": "average", "search_budget": 2}
    response = api.post("/fusions", json=spec, headers=ALICE)
    assert response.status_code == 202, response.text
    job = wait_done(api, response.json()["id"])
    assert job["status"] == "succeeded", (job, stack["log"].read_text()[-3000:])
    prefix = f"fusions/alice/{job['id']}/"
    assert job["output"] == job["result"]["checkpoint"] == f"s3://{BUCKET}/{prefix}"
    s3 = stack["s3"]
    names = [k.removeprefix(prefix) for k in keys(s3, BUCKET, prefix)]
    assert set(names) == {
        "config.json",
        "model.safetensors",
        "metrics.json",
        "job.json",
        "fusion.json",
        "README.md",
        "report.html",
    }
    assert keys(s3, BUCKET, "_otfuse_tmp/") == []  # the temporary prefix is gone
    local = tmp_path / "fused"
    local.mkdir()
    for name in names:
        s3.download_file(BUCKET, prefix + name, str(local / name))
    model = transformers.ViTForImageClassification.from_pretrained(local)
    assert model.config.num_labels == 4
    assert job["result"]["metrics"]["fused"]["examples"] == 24
    url = job["result"]["urls"]["metrics.json"]
    metrics = httpx.get(url).json()  # presigned, no credentials
    assert metrics["job_id"] == job["id"]
    # The worker's temporary copies are named by the URIs users sent.
    assert metrics["models"] == [f"s3://{MODELS}/vit-0", f"s3://{MODELS}/vit-1"]
    assert metrics["sweep"]["selected_on"] == spec["data"]["calibration"]
    assert job["result"]["chosen"] == metrics["sweep"]["chosen"]
    assert metrics["sweep"]["mode"] == "auto" and len(metrics["sweep"]["points"]) == 2
    assert job["result"]["report_uri"] == f"s3://{BUCKET}/{prefix}report.html"
    report = httpx.get(job["result"]["urls"]["report.html"]).text
    assert "data:image/png;base64," in report and "otfuse-" not in report
    for name in ("README.md", "fusion.json"):
        assert "otfuse-" not in (local / name).read_text(), name
    record = json.loads((local / "fusion.json").read_text())
    assert [p["path"] for p in record["parents"]] == metrics["models"]


def test_a_missing_model_is_a_422_at_submit(api):
    spec = body(models=[f"s3://{MODELS}/vit-0/", f"s3://{MODELS}/missing/"])
    response = api.post("/fusions", json=spec, headers=ALICE)
    assert response.status_code == 422 and response.json()["errors"][0]["field"] == "models.1"
    assert f"s3://{MODELS}/missing/" in response.json()["detail"]


def test_a_model_gone_before_the_job_runs_fails_naming_the_uri(stack, parents):
    s3, settings = stack["s3"], stack["settings"]
    prefix = f"vanishing-{uuid.uuid4().hex[:6]}"
    for file in parents["models"][1].iterdir():
        s3.upload_file(str(file), MODELS, f"{prefix}/{file.name}")
    spec = body(models=[f"s3://{MODELS}/vit-0/", f"s3://{MODELS}/{prefix}/"])
    with TestClient(build_app(settings, queue=HeldQueue())) as held:
        job = held.post("/fusions", json=spec, headers=ALICE).json()  # checked: it is there
    for key in keys(s3, MODELS, f"{prefix}/"):
        s3.delete_object(Bucket=MODELS, Key=key)
    from adapters.queue import CeleryQueue

    CeleryQueue(settings).enqueue(job["id"])
    with TestClient(build_app(settings)) as api:
        job = wait_done(api, job["id"])
    assert job["status"] == "failed" and job["error"]["type"] == "storage_error", job
    assert f"s3://{MODELS}/{prefix}/" in job["error"]["message"]
    assert keys(s3, BUCKET, f"fusions/alice/{job['id']}/") == []


def test_distributed_bad_checkpoint_error_names_the_s3_uri(api, stack, tmp_path):
    s3 = stack["s3"]
    s3.put_object(Bucket=MODELS, Key="broken/config.json", Body=b'{"model_type": "vit"}')
    s3.put_object(Bucket=MODELS, Key="broken/model.safetensors", Body=b"not safetensors")
    spec = body(models=[f"s3://{MODELS}/vit-0/", f"s3://{MODELS}/broken/"])
    job = wait_done(api, api.post("/fusions", json=spec, headers=ALICE).json()["id"])
    assert job["status"] == "failed" and job["error"]["type"] == "input_error", job
    assert f"s3://{MODELS}/broken" in job["error"]["message"]
    assert "/tmp" not in job["error"]["message"] and "otfuse-" not in job["error"]["message"]


def test_distributed_cancel_running(api, stack):
    job = api.post("/fusions", json=body(name="hold"), headers=ALICE).json()

    def aligning():
        current = api.get(f"/fusions/{job['id']}", headers=ALICE).json()
        return current["stage"] == "aligning" and current["status"] == "running"

    wait_for(aligning, 30, "the job to run")
    assert api.post(f"/fusions/{job['id']}:cancel", headers=ALICE).status_code == 200
    ended = wait_done(api, job["id"])
    assert ended["status"] == "cancelled" and ended["result"] is None
    assert keys(stack["s3"], BUCKET, f"fusions/alice/{job['id']}/") == []


def test_distributed_cancel_queued_never_runs(stack):
    settings = stack["settings"]
    with TestClient(build_app(settings, queue=HeldQueue())) as held:
        job = held.post("/fusions", json=body(), headers=ALICE).json()
        assert held.post(f"/fusions/{job['id']}:cancel", headers=ALICE).json()["status"] == (
            "cancelled"
        )
    from adapters.queue import CeleryQueue

    CeleryQueue(settings).enqueue(job["id"])  # a late delivery reaches the worker
    with TestClient(build_app(settings)) as api:
        wait_for(lambda: f"job {job['id']}: skipped" in stack["log"].read_text(), 30, "delivery")
        final = api.get(f"/fusions/{job['id']}", headers=ALICE).json()
    assert final["status"] == "cancelled" and final["attempts"] == 0


def test_killed_worker_job_is_redelivered_and_written_once(api, stack):
    job = api.post("/fusions", json=body(name="hold-once"), headers=ALICE).json()

    def running():
        current = api.get(f"/fusions/{job['id']}", headers=ALICE).json()
        return current["stage"] == "aligning"

    wait_for(running, 30, "the job to run")
    children = children_of(stack["proc"].pid)
    assert children, "no worker child process"
    for pid in children:  # the pool child that runs the job: killed as by the OOM killer
        os.kill(pid, signal.SIGKILL)
    final = wait_done(api, job["id"], timeout=90)
    assert final["status"] == "succeeded", final
    assert final["attempts"] == 2
    prefix = f"fusions/alice/{job['id']}/"
    assert len(keys(stack["s3"], BUCKET, prefix + "metrics.json")) == 1
    assert keys(stack["s3"], BUCKET, "_otfuse_tmp/") == []


def test_redis_store_idempotency_and_tenants(stack):
    with TestClient(build_app(stack["settings"], queue=HeldQueue())) as held:
        headers = ALICE | {"Idempotency-Key": f"k-{uuid.uuid4().hex}"}
        first = held.post("/fusions", json=body(), headers=headers)
        again = held.post("/fusions", json=body(), headers=headers)
        assert first.status_code == again.status_code == 202
        assert first.json()["id"] == again.json()["id"]
        other = held.post("/fusions", json=body(regularizer=0.2), headers=headers)
        assert other.status_code == 422
        job_id = first.json()["id"]
        assert held.get(f"/fusions/{job_id}", headers=BOB).status_code == 404
        assert job_id not in [j["id"] for j in held.get("/fusions", headers=BOB).json()["items"]]
        mine = held.get("/fusions", headers=ALICE, params={"status": "queued"}).json()["items"]
        assert job_id in [j["id"] for j in mine]
        etag = held.get(f"/fusions/{job_id}", headers=ALICE).headers["etag"]
        cached = held.get(f"/fusions/{job_id}", headers=ALICE | {"If-None-Match": etag})
        assert cached.status_code == 304 and cached.headers["retry-after"] == "1"
        held.post(f"/fusions/{job_id}:cancel", headers=ALICE)
        assert (
            held.get(f"/fusions/{job_id}", headers=ALICE | {"If-None-Match": etag}).status_code
            == 200
        )
        assert held.get("/readyz").json()["checks"] == {
            "store": "ok",
            "queue": "ok",
            "storage": "ok",
        }


def test_s3_validation(api):
    response = api.post(
        "/fusions", json=body(models=["s3://other/a/", f"s3://{MODELS}/vit-1/"]), headers=ALICE
    )
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "models.0"


def test_s3_publish_is_multipart_for_large_files_and_round_trips(stack, tmp_path):
    from adapters.storage import S3Backend

    settings = stack["settings"].model_copy(update={"multipart_threshold_mb": 5})
    backend = S3Backend(settings)
    local = tmp_path / "out"
    local.mkdir()
    payload = os.urandom(11 * 1024 * 1024)
    (local / "model.safetensors").write_bytes(payload)
    (local / "job.json").write_text('{"job_id": "j"}')
    (local / "metrics.json").write_text('{"job_id": "j"}')
    prefix = f"s3://{BUCKET}/multipart-{uuid.uuid4().hex[:6]}/"
    backend.publish(local, prefix, "j", 1)
    key = prefix.removeprefix(f"s3://{BUCKET}/") + "model.safetensors"
    head = stack["s3"].head_object(Bucket=BUCKET, Key=key)
    assert "-" in head["ETag"]  # a multipart upload's ETag: md5-of-parts "-" count
    assert backend.list_names(prefix) == ["job.json", "metrics.json", "model.safetensors"]
    (local / "config.json").write_text("{}")  # a checkpoint folder needs its config
    backend.publish(local, prefix, "j", 2)
    files = backend.list_checkpoint(prefix, lambda uri: True)
    assert [f.name for f in files] == ["config.json", "model.safetensors"]  # not job/metrics
    back = backend.fetch(prefix, files, tmp_path / "back", lambda: False)
    assert (back / "model.safetensors").read_bytes() == payload
    assert keys(stack["s3"], BUCKET, "_otfuse_tmp/") == []
    backend.delete_files(prefix, backend.list_names(prefix))
    assert backend.list_names(prefix) == []
