"""POST /fusions:plan answers from config.json and safetensors headers, creates no job, and
refuses (422, at a field) what submit refuses; a job whose planned peak is above the worker's
memory is refused at submit with the estimate, the limit and what to change."""

from __future__ import annotations

from factories import save, tiny_vit
from test_api_embedded import HeldQueue, make_client, spec


def test_plan_answers_without_a_job(tmp_path, parents):
    queue = HeldQueue()
    with make_client(tmp_path, parents, queue=queue) as client:
        response = client.post("/fusions:plan", json=spec(parents, policy={"residual": "shared"}))
        assert response.status_code == 200, response.text
        plan = response.json()
        assert plan["compatible"] and plan["models"][0]["family"] == "vit"
        assert plan["fused"]["shapes"]["vit.embeddings.cls_token"] == [1, 1, 16]
        assert {s["map"] for s in plan["spaces"] if s["name"].startswith("mid.")} == {"stream"}
        assert plan["estimate"]["device"] == "cpu" and plan["estimate"]["host_peak_bytes"] > 0
        assert client.get("/fusions").json()["items"] == [] and queue.sent == []


def test_plan_refuses_what_cannot_be_fused(tmp_path, parents):
    deeper = save(tiny_vit(seed=3, layers=3), tmp_path / "deeper")
    body = {"models": [f"file://{parents['models'][0]}", f"file://{deeper}"]}
    with make_client(tmp_path, parents, queue=HeldQueue()) as client:
        response = client.post("/fusions:plan", json=body)
        assert response.status_code == 422, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
        problem = response.json()
        assert problem["errors"][0]["field"] == "models" and "3 layers" in problem["detail"]

        outside = {"models": [f"file://{parents['models'][0]}", "file:///etc/"]}
        response = client.post("/fusions:plan", json=outside)
        assert response.status_code == 422 and response.json()["errors"][0]["field"] == "models.1"

        bad = client.post("/fusions:plan", json=spec(parents, policy={"heads": "cross", "qk": "x"}))
        assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "policy.qk"


def test_a_job_above_the_worker_s_memory_is_refused_at_submit(tmp_path, parents):
    queue = HeldQueue()
    with make_client(tmp_path, parents, queue=queue, worker_memory_bytes=64 << 20) as client:
        for path in ("/fusions", "/fusions:plan"):
            response = client.post(path, json=spec(parents))
            assert response.status_code == 422, response.text
            problem = response.json()
            assert problem["errors"][0]["field"] == "models"
            detail = problem["detail"]
            assert "needs ~" in detail and "the worker has 0.1 GiB" in detail, detail
            assert "policy.device cuda" in detail
        assert queue.sent == []
    with make_client(tmp_path, parents, queue=queue, worker_memory_bytes=64 << 30) as client:
        assert client.post("/fusions", json=spec(parents)).status_code == 202
        assert len(queue.sent) == 1


def test_a_cuda_job_above_the_worker_s_gpu_is_refused(tmp_path, parents):
    small_gpu = {"worker_gpu_memory_bytes": 1 << 20, "worker_memory_bytes": 64 << 30}
    with make_client(tmp_path, parents, queue=HeldQueue(), **small_gpu) as client:
        response = client.post("/fusions", json=spec(parents, policy={"device": "cuda"}))
        assert response.status_code == 422, response.text
        detail = response.json()["detail"]
        assert "GiB of GPU memory" in detail and "policy.device cpu" in detail, detail
        plan = client.post("/fusions:plan", json=spec(parents, policy={"device": "cpu"}))
        assert plan.status_code == 200 and plan.json()["estimate"]["device_peak_bytes"] is None


def test_plan_reads_only_headers_from_s3(s3_endpoint, parents, monkeypatch):
    """On S3 a plan lists the prefix and fetches config.json and the safetensors header with
    ranged GETs: far fewer bytes than the checkpoint holds."""
    import boto3
    from helpers import MODELS, seed_buckets

    from adapters.planning import plan_spec
    from adapters.settings import Settings
    from adapters.storage import S3Backend, Storage
    from fusion_core.contract import JobSpec

    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    seed_buckets(s3, parents)
    settings = Settings(
        s3_endpoint_url=s3_endpoint, allowed_buckets=[MODELS], api_keys={"key-alice": "alice"}
    )
    fetched = []
    read_range = S3Backend.read_range

    def counted(self, uri, file, start, length):
        data = read_range(self, uri, file, start, length)
        fetched.append(len(data))
        return data

    monkeypatch.setattr(S3Backend, "read_range", counted)
    spec = JobSpec(models=[f"s3://{MODELS}/vit-0/", f"s3://{MODELS}/vit-1/"])
    report = plan_spec(spec, settings, Storage(settings), "alice")
    assert report.compatible and report.models[0].path == f"s3://{MODELS}/vit-0/"
    total = sum(m.file_bytes for m in report.models)
    assert 0 < sum(fetched) < total / 4, (fetched, total)
