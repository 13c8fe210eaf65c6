"""The report's low items, each against the real stack or the app: bad bytes in URIs,
malformed checkpoints, overflowing numbers, absent devices, outputs that are files,
readiness details, 405s, and placeholder secrets."""

from __future__ import annotations

import json
import uuid

import pytest
from fastapi.testclient import TestClient
from helpers import BUCKET, MODELS, s3_keys
from security_stack import ALICE, wait_done

from adapters.settings import Settings
from otfuse.server import build_app

MODELS_OK = [f"s3://{MODELS}/vit-0/", f"s3://{MODELS}/vit-1/"]


@pytest.mark.parametrize(
    "body,field",
    [
        ({"models": [MODELS_OK[0], f"s3://{MODELS}/vit-1\x00/"]}, "models.1"),
        ({"models": MODELS_OK, "data": {"eval": f"s3://{MODELS}/d\x00.safetensors"}}, "data.eval"),
        ({"models": MODELS_OK, "output": f"s3://{BUCKET}/fusions/alice/x\n/"}, "output"),
        ({"models": MODELS_OK, "weights": [1e308, 1e308]}, "weights"),
        ({"models": MODELS_OK, "weights": [1.0, float("inf")]}, "weights"),
    ],
)
def test_bad_bytes_and_overflowing_numbers_are_422(api, body, field):
    headers = ALICE | {"Content-Type": "application/json"}
    response = api.post("/fusions", content=json.dumps(body), headers=headers)
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["field"].startswith(field)


@pytest.mark.parametrize(
    "header,words",
    [
        ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 0]}}, "data_offsets"),
        ({"w": {"dtype": "F32", "shape": [1 << 40, 1 << 30], "data_offsets": [0, 16]}}, "fill"),
        ({"w": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}, "dtype"),
    ],
)
def test_malformed_safetensors_are_input_errors(api, attack_stack, parents, header, words):
    s3, prefix = attack_stack["s3"], f"bad-st-{uuid.uuid4().hex[:6]}"
    config = (parents["models"][1] / "config.json").read_bytes()
    raw = json.dumps(header).encode()
    s3.put_object(Bucket=MODELS, Key=f"{prefix}/config.json", Body=config)
    body = len(raw).to_bytes(8, "little") + raw + b"\0" * 16
    s3.put_object(Bucket=MODELS, Key=f"{prefix}/model.safetensors", Body=body)
    spec = {"models": [MODELS_OK[0], f"s3://{MODELS}/{prefix}/"]}
    job = wait_done(api, api.post("/fusions", json=spec, headers=ALICE).json()["id"], ALICE)
    assert job["status"] == "failed" and job["error"]["type"] == "input_error", job
    assert words in job["error"]["message"] and f"s3://{MODELS}/{prefix}" in job["error"]["message"]


def test_a_device_the_worker_lacks_is_an_input_error(api, attack_stack):
    spec = {"models": MODELS_OK, "policy": {"device": "cuda:99"}}
    job = wait_done(api, api.post("/fusions", json=spec, headers=ALICE).json()["id"], ALICE)
    assert job["status"] == "failed" and job["error"]["type"] == "input_error", job
    assert "cuda:99" in job["error"]["message"]
    assert s3_keys(attack_stack["s3"], BUCKET, f"fusions/alice/{job['id']}/") == []


def test_an_output_that_is_a_file_fails_cleanly(tmp_path, parents):
    settings = Settings(data_dir=tmp_path / "svc", file_roots=[parents["root"]])
    area = tmp_path / "svc" / "artifacts" / "local"
    area.mkdir(parents=True)
    (area / "taken").write_text("mine")
    models = [f"file://{m}" for m in parents["models"]]
    with TestClient(build_app(settings)) as client:
        job = client.post("/fusions", json={"models": models, "output": f"file://{area}/taken"})
        job = wait_done(client, job.json()["id"], {})
    assert job["status"] == "failed" and job["error"]["type"] == "storage_error", job
    assert (area / "taken").read_text() == "mine"
    assert sorted(p.name for p in area.iterdir()) == ["taken"]  # no temporary copy left


def test_readiness_details_need_a_key(tmp_path):
    settings = Settings(
        data_dir=tmp_path / "svc",
        redis_url="redis://127.0.0.1:1/0",  # nothing listens there
        api_keys={"key-alice": "alice"},
        bucket="otfuse",
        s3_endpoint_url="http://127.0.0.1:1",
    )

    class DownQueue:
        def ping(self):
            raise ConnectionError("broker at 10.0.0.7:6379 refused")

        def start(self):
            pass

        def stop(self):
            pass

    with TestClient(build_app(settings, queue=DownQueue())) as client:
        anonymous = client.get("/readyz")
        assert anonymous.status_code == 503
        assert set(anonymous.json()["checks"].values()) == {"error"}
        assert "10.0.0.7" not in anonymous.text and "127.0.0.1" not in anonymous.text
        authenticated = client.get("/readyz", headers={"Authorization": "Bearer key-alice"})
        assert "10.0.0.7" in authenticated.json()["checks"]["queue"]


@pytest.mark.parametrize(
    "method,path,allowed",
    [
        ("PUT", "/fusions/0123456789abcdef01234567", {"GET", "DELETE"}),
        ("PATCH", "/fusions", {"GET", "POST"}),
        ("GET", "/fusions/0123456789abcdef01234567:cancel", None),
    ],
)
def test_405_lists_every_allowed_method(api, method, path, allowed):
    response = api.request(method, path, headers=ALICE)
    if allowed is None:  # a GET here is a (missing) job id, not a wrong method
        assert response.status_code == 404
        return
    assert response.status_code == 405
    assert allowed <= {m.strip() for m in response.headers["allow"].split(",")}


@pytest.mark.parametrize("keys", ["change-me-key:team-a", "short:team-a", "good-long-key:bad/name"])
def test_placeholder_or_weak_keys_and_bad_tenant_names_are_refused(keys, monkeypatch):
    monkeypatch.setenv("OTFUSE_API_KEYS", keys)
    with pytest.raises(ValueError):
        Settings()
