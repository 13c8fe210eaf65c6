"""Resource attacks: configs that would grow the worker, transfers and jobs that must stop
when asked, request bodies, submit floods, and records that must not live forever."""

from __future__ import annotations

import json
import threading
import time
import uuid

import httpx
import pytest
from fastapi.testclient import TestClient
from helpers import (
    BUCKET,
    MODELS,
    children_of,
    free_port,
    rss_peak_kib,
    s3_keys,
    start_server,
    stop_process,
    wait_for,
)
from security_stack import ALICE, BOB, wait_done

from adapters.queue import Queue
from adapters.settings import Settings
from adapters.storage import S3Backend, StoredFile, TransferCancelled
from adapters.store import RedisJobStore
from otfuse.server import build_app
from worker import pipeline

MODELS_OK = [f"s3://{MODELS}/vit-0/", f"s3://{MODELS}/vit-1/"]


class HeldQueue(Queue):
    def enqueue(self, job_id):
        pass


def upload_with_config(s3, parents, change: dict) -> str:
    prefix = f"cfg-{uuid.uuid4().hex[:6]}"
    for file in parents["models"][1].iterdir():
        body = file.read_bytes()
        if file.name == "config.json":
            body = json.dumps(json.loads(body) | change).encode()
        s3.put_object(Bucket=MODELS, Key=f"{prefix}/{file.name}", Body=body)
    return f"s3://{MODELS}/{prefix}/"


def test_a_config_declaring_a_million_layers_fails_fast_in_bounded_memory(
    api, attack_stack, parents
):
    model = upload_with_config(attack_stack["s3"], parents, {"num_hidden_layers": 1_000_000})
    started = time.monotonic()
    job = api.post("/fusions", json={"models": [MODELS_OK[0], model]}, headers=ALICE).json()
    job = wait_done(api, job["id"], ALICE, timeout=60)
    assert time.monotonic() - started < 30
    assert job["status"] == "failed" and job["error"]["type"] == "input_error", job
    assert "num_hidden_layers=1000000" in job["error"]["message"]
    for child in children_of(attack_stack["proc"].pid):
        assert rss_peak_kib(child) < 3 * 1024 * 1024  # the report: 10+ GB


def test_a_config_contradicting_its_weights_is_not_published(api, attack_stack, parents):
    model = upload_with_config(attack_stack["s3"], parents, {"hidden_size": 24})
    job = api.post("/fusions", json={"models": [MODELS_OK[0], model]}, headers=ALICE).json()
    job = wait_done(api, job["id"], ALICE)
    assert job["status"] == "failed" and job["error"]["type"] == "input_error", job
    assert "config.json implies" in job["error"]["message"]
    assert s3_keys(attack_stack["s3"], BUCKET, f"fusions/alice/{job['id']}/") == []


def test_an_s3_download_stops_between_chunks_when_the_job_stops(attack_stack, tmp_path):
    settings = attack_stack["settings"].model_copy(update={"multipart_threshold_mb": 5})
    backend = S3Backend(settings)
    key = f"big-{uuid.uuid4().hex[:6]}/model.safetensors"
    attack_stack["s3"].put_object(Bucket=MODELS, Key=key, Body=b"\0" * (64 << 20))
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) > 2

    file = StoredFile("model.safetensors", 64 << 20, key)
    started = time.monotonic()
    with pytest.raises(TransferCancelled):
        backend.fetch(f"s3://{MODELS}/{key.split('/')[0]}/", [file], tmp_path, should_stop)
    assert time.monotonic() - started < 10
    assert not (tmp_path / "model.safetensors").exists()


def test_cancel_in_the_download_stage(api, attack_stack):
    job = api.post("/fusions", json={"models": MODELS_OK, "name": "hold-download"}, headers=ALICE)
    job_id = job.json()["id"]

    def downloading():
        return api.get(f"/fusions/{job_id}", headers=ALICE).json()["stage"] == "downloading"

    wait_for(downloading, 30, "the download stage")
    cancelled = time.monotonic()
    assert api.post(f"/fusions/{job_id}:cancel", headers=ALICE).status_code == 200
    job = wait_done(api, job_id, ALICE)
    assert job["status"] == "cancelled" and time.monotonic() - cancelled < 5
    assert s3_keys(attack_stack["s3"], BUCKET, f"fusions/alice/{job_id}/") == []


# -- request bodies -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory, parents):
    """`otfuse serve` as a process (embedded, with keys: bodies come before auth)."""
    folder = tmp_path_factory.mktemp("bounded-server")
    port = free_port()
    env = {
        "OTFUSE_DATA_DIR": str(folder / "svc"),
        "OTFUSE_FILE_ROOTS": str(parents["root"]),
        "OTFUSE_API_KEYS": "key-alice:alice",
    }
    proc = start_server(env, port, folder / "server.log")
    yield f"http://127.0.0.1:{port}", proc
    stop_process(proc)


def test_a_large_declared_body_is_refused_before_it_is_read(server):
    url, proc = server
    before = rss_peak_kib(proc.pid)
    body = b"{" + b" " * (56 << 20) + b"}"
    started = time.monotonic()
    response = httpx.post(f"{url}/fusions", content=body, timeout=30)  # no key at all
    assert response.status_code == 413 and time.monotonic() - started < 5
    assert response.headers["content-type"] == "application/problem+json"
    assert rss_peak_kib(proc.pid) - before < 64 * 1024


def test_a_chunked_body_is_cut_off_at_the_limit(server):
    url, _ = server

    def chunks():
        for _ in range(64):
            yield b" " * (256 << 10)

    response = httpx.post(f"{url}/fusions", content=chunks(), timeout=30)
    assert response.status_code == 413


def test_health_answers_while_a_large_body_is_refused(server):
    url, _ = server
    slowest = []

    def poll():
        for _ in range(20):
            started = time.monotonic()
            assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
            slowest.append(time.monotonic() - started)

    poller = threading.Thread(target=poll)
    poller.start()
    for _ in range(3):
        httpx.post(f"{url}/fusions", content=b"x" * (56 << 20), timeout=30)
    poller.join()
    assert max(slowest) < 0.5


def test_a_body_within_the_limit_still_reaches_validation(server):
    url, _ = server
    response = httpx.post(
        f"{url}/fusions", json={"models": []}, headers={"Authorization": "Bearer key-alice"}
    )
    assert response.status_code == 422


# -- floods, quotas and running slots -------------------------------------------------------------
def isolated(settings: Settings, **changes) -> Settings:
    """The stack's settings on a key prefix of their own, so quotas start from zero."""
    return settings.model_copy(update={"key_prefix": f"t{uuid.uuid4().hex[:8]}:", **changes})


def test_a_submit_flood_is_answered_429_with_retry_after(attack_stack):
    settings = isolated(attack_stack["settings"], submit_rate=2.0, submit_burst=5)
    with TestClient(build_app(settings, queue=HeldQueue())) as client:
        codes = [
            client.post("/fusions", json={"models": MODELS_OK}, headers=ALICE) for _ in range(12)
        ]
        assert [r.status_code for r in codes[:5]] == [202] * 5
        limited = [r for r in codes if r.status_code == 429]
        assert len(limited) >= 6
        assert int(limited[0].headers["retry-after"]) >= 1
        assert limited[0].json()["type"] == "urn:otfuse:problem:rate-limited"
        # bob's bucket is his own
        assert client.post("/fusions", json={"models": MODELS_OK}, headers=BOB).status_code == 202
        time.sleep(1.1)  # two tokens refill
        assert client.post("/fusions", json={"models": MODELS_OK}, headers=ALICE).status_code == 202


def test_a_tenant_s_waiting_jobs_are_capped(attack_stack):
    settings = isolated(attack_stack["settings"], max_queued_per_tenant=3)
    with TestClient(build_app(settings, queue=HeldQueue())) as client:
        accepted = [
            client.post("/fusions", json={"models": MODELS_OK}, headers=ALICE) for _ in range(3)
        ]
        assert all(r.status_code == 202 for r in accepted)
        full = client.post("/fusions", json={"models": MODELS_OK}, headers=ALICE)
        assert full.status_code == 429 and full.json()["type"] == "urn:otfuse:problem:queue-full"
        assert full.headers["retry-after"]
        assert client.post("/fusions", json={"models": MODELS_OK}, headers=BOB).status_code == 202
        client.post(f"/fusions/{accepted[0].json()['id']}:cancel", headers=ALICE)
        assert client.post("/fusions", json={"models": MODELS_OK}, headers=ALICE).status_code == 202


def test_a_tenant_runs_at_most_its_running_slots(tmp_path, parents, monkeypatch):
    release = threading.Event()
    original = pipeline.Run.progress

    def held(self, fraction, detail, *args, **kwargs):
        if self.stage == "aligning" and "layer" in detail:
            release.wait(30)
        return original(self, fraction, detail, *args, **kwargs)

    monkeypatch.setattr(pipeline.Run, "progress", held)
    settings = Settings(
        data_dir=tmp_path / "svc",
        file_roots=[parents["root"]],
        embedded_workers=2,
        max_running_per_tenant=1,
    )
    models = [f"file://{m}" for m in parents["models"]]
    with TestClient(build_app(settings)) as client:
        first = client.post("/fusions", json={"models": models}).json()["id"]
        wait_for(lambda: client.get(f"/fusions/{first}").json()["status"] == "running", 30, "1st")
        second = client.post("/fusions", json={"models": models}).json()["id"]

        def waiting():
            job = client.get(f"/fusions/{second}").json()
            return job["status"] == "queued" and job["detail"].startswith("waiting: 1 of")

        wait_for(waiting, 30, "the second job to wait for a slot")
        time.sleep(1)
        assert client.get(f"/fusions/{second}").json()["status"] == "queued"
        release.set()
        assert wait_done(client, first, {})["status"] == "succeeded"
        assert wait_done(client, second, {})["status"] == "succeeded"


def test_finished_records_and_idempotency_keys_expire(redis_url):
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    store = RedisJobStore(redis_url, prefix, idempotency_ttl=120, record_ttl=3600)
    now = "2026-01-01T00:00:00.000Z"
    job = {"id": "0" * 24, "tenant": "alice", "status": "queued", "created_at": now}
    store.create(job, ("key-1", "fingerprint"))
    redis = store._redis
    assert 0 < redis.ttl(f"{prefix}idem:alice:key-1") <= 120
    assert redis.ttl(f"{prefix}job:{job['id']}") == -1  # a live job never expires
    store.update(job["id"], lambda j: j | {"status": "succeeded", "finished_at": now})
    assert 3600 < redis.ttl(f"{prefix}job:{job['id']}") <= 3600 + 86400  # the backstop
    assert store.purge_finished(3600) == 0  # not old enough
    assert store.purge_finished(0) == 1
    assert store.get(job["id"]) is None
    assert store.counts()["succeeded"] == 0 and store.tenant_counts("alice")["succeeded"] == 0
    assert store.list("alice", None, None, 10) == ([], None)
    assert store.purge_finished(0) == 0
