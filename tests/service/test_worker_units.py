"""The pipeline's guarantees on the embedded adapters: idempotent re-run after a crash
between publishing and recording, leases, the attempt limit, stale-job recovery, time limits,
shutdown; and the Celery configuration API and workers share."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from celery.exceptions import SoftTimeLimitExceeded

import fusion_core
from adapters.queue import QUEUE_NAME, make_celery
from adapters.settings import Settings
from adapters.storage import Storage
from adapters.store import MemoryJobStore
from fusion_core.contract import JobSpec
from fusion_core.progress import Progress
from service.jobs import submit
from worker import pipeline
from worker.recovery import requeue_stale


class Sent:
    def __init__(self):
        self.ids = []

    def enqueue(self, job_id):
        self.ids.append(job_id)


@pytest.fixture
def env(tmp_path, parents):
    settings = Settings(data_dir=tmp_path / "svc", file_roots=[parents["root"]], max_attempts=2)
    store, storage, queue = MemoryJobStore(), Storage(settings), Sent()
    spec = JobSpec(models=[f"file://{m}" for m in parents["models"]])
    job, _ = submit(spec, "local", settings, store, queue, storage, None)
    return settings, store, storage, job["id"]


def run(env, **kw):
    settings, store, storage, job_id = env
    return pipeline.run_job(job_id, store, storage, settings, **kw)


def test_rerun_after_a_crash_between_publish_and_record_publishes_once(env, monkeypatch):
    _settings, store, _storage, job_id = env
    assert run(env) == "succeeded"
    output = Path(store.get(job_id)["output"].removeprefix("file://"))
    first = json.loads((output / "metrics.json").read_text())
    # The crash: the record still says running, the result is published.
    store.update(job_id, lambda j: j | {"status": "running", "result": None, "finished_at": None})

    def no_fusion(*a, **k):
        raise AssertionError("the job was fused again")

    monkeypatch.setattr(fusion_core, "fuse_job", no_fusion)
    assert run(env) == "succeeded"
    job = store.get(job_id)
    assert job["attempts"] == 2 and job["result"]["metrics"] == pipeline.inline_metrics(first)
    assert json.loads((output / "metrics.json").read_text()) == first


def test_a_second_delivery_does_not_run_a_leased_job(env):
    _settings, store, _storage, job_id = env
    assert store.acquire_lease(job_id, "other-worker", 30)
    assert run(env) == "leased-elsewhere"
    assert store.get(job_id)["status"] == "queued"


def test_attempt_limit(env):
    settings, store, _storage, job_id = env
    store.update(job_id, lambda j: j | {"attempts": settings.max_attempts, "status": "running"})
    assert run(env) == "skipped"
    job = store.get(job_id)
    assert job["status"] == "failed" and job["error"]["type"] == "worker_lost"


def test_stale_running_job_is_requeued_once(env):
    _settings, store, _storage, job_id = env
    store.update(job_id, lambda j: j | {"status": "running", "stage": "aligning"})
    sent = []
    assert requeue_stale(store, sent.append, lease_seconds=60) == []  # not stale yet
    store._jobs[job_id]["updated_at"] = "2000-01-01T00:00:00.000Z"
    assert store.acquire_lease(job_id, "alive", 30)
    assert requeue_stale(store, sent.append, lease_seconds=1) == []  # its worker is alive
    store.release_lease(job_id, "alive")
    assert requeue_stale(store, sent.append, lease_seconds=1) == [job_id]
    assert sent == [job_id] and store.get(job_id)["status"] == "queued"
    assert run(env) == "succeeded"


def test_soft_time_limit_fails_the_job_cleanly(env, monkeypatch):
    _settings, store, _storage, job_id = env

    def slow(*a, **k):
        k["progress"](Progress(0, 12, "aligning layer 1/12", unit="block"))
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(fusion_core, "fuse_job", slow)
    assert run(env) == "failed"
    job = store.get(job_id)
    assert job["error"]["type"] == "time_limit" and job["stage"] == "aligning"
    assert not Path(job["output"].removeprefix("file://")).exists()


def test_shutdown_puts_a_running_job_back_in_the_queue(env):
    import threading

    stopping = threading.Event()
    stopping.set()
    assert run(env, stopping=stopping) == "interrupted"
    _settings, store, _storage, job_id = env
    assert store.get(job_id)["status"] == "queued"
    assert run(env) == "succeeded"


def test_worker_rechecks_uris_with_its_own_roots(env, tmp_path):
    settings, store, storage, job_id = env
    strict = settings.model_copy(update={"file_roots": [tmp_path / "elsewhere"]})
    strict.__dict__.pop("roots", None)  # the cached property, computed for the new roots
    assert pipeline.run_job(job_id, store, storage, strict) == "failed"
    error = store.get(job_id)["error"]
    assert error["type"] == "input_error" and error["message"].startswith("models.0: ")


def test_celery_configuration():
    settings = Settings(redis_url="redis://h:6379/0", soft_time_limit=100, hard_time_limit=130)
    conf = make_celery(settings).conf
    assert conf.task_serializer == "json" and conf.accept_content == ["json"]
    assert conf.task_default_queue == QUEUE_NAME == "fusion"
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1 and conf.worker_concurrency == 1
    assert conf.worker_proc_alive_timeout >= 60  # children import torch before saying UP
    assert (conf.task_soft_time_limit, conf.task_time_limit) == (100, 130)
    assert conf.broker_transport_options["visibility_timeout"] > 130
    with pytest.raises(ValueError, match="HARD_TIME_LIMIT"):
        Settings(soft_time_limit=100, hard_time_limit=100)


def test_worker_parent_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, worker.celery_app; print('torch' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"OTFUSE_REDIS_URL": "redis://127.0.0.1:1/0", "PATH": ""},
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.stdout.strip() == "False", done.stderr


def test_job_spec_defaults_match_fusion_core():
    """The contract's defaults are explicit in its schema; they follow FusionSpec's. When
    those change, change fusion_core/contract.py (and openapi.yaml) with them."""
    from fusion_core import FusionSpec
    from fusion_core.contract import fusion_spec

    ours = fusion_spec(JobSpec(models=["file:///a/", "file:///b/"]), "cpu")
    assert ours == FusionSpec()


def test_finetune_defaults_match_fusion_core():
    from fusion_core.contract import Finetune, finetune_config
    from fusion_core.spec import FinetuneConfig

    spec = JobSpec(
        models=["file:///a/", "file:///b/"],
        finetune=Finetune(steps=5),
        data={"finetune": "file:///t"},
    )
    assert finetune_config(spec, "cpu") == FinetuneConfig(steps=5, device="cpu")


def test_stage_spans_cover_the_job_in_order():
    spans = pipeline.stage_spans(points=6, evaluated=True, finetune_runs=2)
    order = ["downloading", "aligning", "evaluating", "finetuning", "uploading"]
    edges = [x for stage in order for x in spans[stage]]
    assert edges == sorted(edges) and edges[0] == 0.0 and edges[-1] == 1.0
    assert spans["finetuning"][1] == pytest.approx(0.95)
    plain = pipeline.stage_spans(points=1, evaluated=False, finetune_runs=0)
    assert plain["finetuning"][0] == plain["finetuning"][1]


def test_local_paths_become_uris_in_one_pass():
    rewrite = pipeline.path_rewriter(
        {"/tmp/w/model-0": "s3://m/a/", "/tmp/w/model-0/x.safetensors": "file:///d/x.safetensors"}
    )
    text = "/tmp/w/model-0 and /tmp/w/model-0/x.safetensors and /tmp/w/model-0/config.json"
    assert rewrite(text) == ("s3://m/a and file:///d/x.safetensors and s3://m/a/config.json")
