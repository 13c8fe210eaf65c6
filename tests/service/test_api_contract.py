"""Every submit-time validation error is a 422 problem naming the field; auth and tenant
isolation; openapi.yaml equals the app's schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from test_api_embedded import HeldQueue

from adapters.settings import Settings
from otfuse.server import build_app
from service.openapi import render

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def client(tmp_path, parents):
    settings = Settings(data_dir=tmp_path / "svc", file_roots=[parents["root"]], max_models=3)
    with TestClient(build_app(settings, queue=HeldQueue())) as client:
        yield client


def _body(parents, **extra):
    body = {"models": [f"file://{m}" for m in parents["models"]]}
    body.update(extra)
    return body


INVALID = [
    ("one model", {"models": ["file:///x/"]}, "models"),
    ("too many models", {"models": ["M0", "M1", "M0", "M1"]}, "models"),
    ("scheme", {"models": ["http://host/model/", "M1"]}, "models.0"),
    ("s3 not configured", {"models": ["M0", "s3://bucket/model/"]}, "models.1"),
    ("outside the roots", {"models": ["M0", "file:///etc/"]}, "models.1"),
    ("escaping the roots", {"models": ["M0", "ROOT/../../etc/"]}, "models.1"),
    ("file host", {"models": ["file://host/model/", "M1"]}, "models.0"),
    ("anchor out of range", {"anchor": 2}, "anchor"),
    ("negative anchor", {"anchor": -1}, "anchor"),
    ("method", {"method": "average"}, "method"),
    ("alignment", {"policy": {"alignment": "gradients"}}, "policy.alignment"),
    ("solver", {"policy": {"solver": "greedy"}}, "policy.solver"),
    ("residual", {"policy": {"residual": "sum"}}, "policy.residual"),
    ("filter", {"policy": {"filter": "window-0"}}, "policy.filter"),
    ("qk", {"policy": {"qk": "loose"}}, "policy.qk"),
    ("samples", {"policy": {"samples": 0}}, "policy.samples"),
    ("device", {"policy": {"device": "tpu"}}, "policy.device"),
    ("unknown policy field", {"policy": {"solvr": "emd"}}, "policy.solvr"),
    ("zero regularizer", {"regularizer": 0}, "regularizer"),
    ("negative regularizer", {"regularizer": -0.5}, "regularizer"),
    ("regularizer type", {"regularizer": "fast"}, "regularizer"),
    ("regularizer bool", {"regularizer": True}, "regularizer"),
    ("empty regularizer list", {"regularizer": []}, "regularizer"),
    ("long regularizer list", {"regularizer": [0.1] * 17}, "regularizer"),
    ("regularizer list entry type", {"regularizer": [0.1, "auto"]}, "regularizer"),
    (
        "regularizer list entry",
        {"regularizer": [0.1, 0], "data": {"calibration": "@D"}},
        "regularizer.1",
    ),
    (
        "sweep without calibration",
        {"regularizer": "auto", "data": {"eval": "@D"}},
        "data.calibration",
    ),
    (
        "calibration is the eval data",
        {"regularizer": [0.1, 0.2], "data": {"calibration": "@D", "eval": "@D"}},
        "data.calibration",
    ),
    (
        "activations calibrate a sweep: not the eval data",
        {"regularizer": "auto", "data": {"activations": "@D", "eval": "@D"}},
        "data.calibration",
    ),
    (
        "sweep of vanilla",
        {"method": "vanilla", "regularizer": [0.1, 0.2], "data": {"calibration": "@D"}},
        "regularizer",
    ),
    (
        "calibration outside roots",
        {"data": {"calibration": "file:///etc/passwd"}},
        "data.calibration",
    ),
    ("weights count", {"weights": [1.0]}, "weights"),
    ("negative weights", {"weights": [1.0, -1.0]}, "weights"),
    ("activations needed", {"policy": {"alignment": "activations"}}, "data.activations"),
    (
        "weighted residual needs data",
        {"policy": {"residual": "weighted-scalar"}},
        "data.activations",
    ),
    ("eval outside roots", {"data": {"eval": "file:///etc/passwd"}}, "data.eval"),
    ("eval is a folder", {"data": {"eval": "s3://b/folder/"}}, "data.eval"),
    ("unknown data kind", {"data": {"train": "file:///x"}}, "data.train"),
    ("finetune without data", {"finetune": {"epochs": 1}}, "data.finetune"),
    (
        "finetune without budget",
        {"finetune": {"lr": 0.001}, "data": {"finetune": "@D"}},
        "finetune",
    ),
    ("finetune data without finetune", {"data": {"finetune": "@D"}}, "finetune"),
    ("finetune range", {"finetune": {"epochs": 0}}, "finetune.epochs"),
    ("finetune steps", {"finetune": {"steps": 0}}, "finetune.steps"),
    ("finetune lr", {"finetune": {"steps": 1, "lr": 2}}, "finetune.lr"),
    ("finetune batch size", {"finetune": {"steps": 1, "batch_size": 0}}, "finetune.batch_size"),
    ("finetune warmup", {"finetune": {"steps": 1, "warmup": 1}}, "finetune.warmup"),
    (
        "finetune baseline",
        {"finetune": {"steps": 1, "baselines": ["ensemble"]}},
        "finetune.baselines.0",
    ),
    (
        "finetune longer than the time limit",
        {"finetune": {"seconds": 5000}, "data": {"finetune": "@D"}},
        "finetune.seconds",
    ),
    (
        "finetune unknown field",
        {"finetune": {"steps": 1, "learning_rate": 1}},
        "finetune.learning_rate",
    ),
    ("unknown artifact", {"artifacts": {"plots": True}}, "artifacts.plots"),
    ("artifact type", {"artifacts": {"report": "yes please"}}, "artifacts.report"),
    ("output scheme", {"output": "ftp://host/out/"}, "output"),
    ("output outside roots", {"output": "file:///tmp/elsewhere/"}, "output"),
    ("unknown field", {"regulariser": 0.1}, "regulariser"),
    ("name too long", {"name": "x" * 201}, "name"),
    ("too many labels", {"labels": {f"k{i}": "v" for i in range(33)}}, "labels"),
    ("models type", {"models": "file:///x/"}, "models"),
]


@pytest.mark.parametrize(("case", "change", "field"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_spec_is_a_422_naming_the_field(client, parents, case, change, field):
    data = f"file://{parents['data']}"
    body = json.loads(json.dumps(_body(parents, **change)).replace("@D", data))
    models = [str(m).replace("ROOT", str(parents["root"])) for m in body["models"]]
    if isinstance(body["models"], list):
        for i, m in enumerate(models):
            if m in ("M0", "M1"):
                models[i] = f"file://{parents['models'][int(m[1])]}"
            elif m.startswith(str(parents["root"])):
                models[i] = f"file://{m}"
        body["models"] = models
    response = client.post("/fusions", json=body)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == 422 and problem["title"]
    assert problem["errors"][0]["field"] == field, problem
    assert problem["detail"].startswith(f"{field}: ")
    assert client.get("/fusions").json()["items"] == []  # nothing was recorded


def test_emd_ignores_the_regularizer(client, parents):
    body = _body(parents, policy={"solver": "emd"}, regularizer=0)
    assert client.post("/fusions", json=body).status_code == 202


def test_malformed_json_is_a_422(client):
    response = client.post(
        "/fusions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"page_size": 0}, "page_size"),
        ({"status": "done"}, "status"),
        ({"page_token": "!!"}, "page_token"),
    ],
)
def test_invalid_list_query_is_a_422(client, params, field):
    response = client.get("/fusions", params=params)
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == field


@pytest.fixture
def keyed(tmp_path, parents):
    settings = Settings(
        data_dir=tmp_path / "svc",
        file_roots=[parents["root"]],
        api_keys="key-alice:alice,key-bob-0:bob",
    )
    with TestClient(build_app(settings, queue=HeldQueue())) as client:
        yield client


def test_auth_and_tenant_isolation(keyed, parents):
    alice = {"Authorization": "Bearer key-alice"}
    bob = {"Authorization": "Bearer key-bob-0"}
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic a2V5LWE6"}):
        response = keyed.post("/fusions", json=_body(parents), headers=headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert response.headers["content-type"] == "application/problem+json"
        assert keyed.get("/fusions", headers=headers).status_code == 401
    job = keyed.post("/fusions", json=_body(parents), headers=alice).json()
    assert job["tenant"] == "alice"
    path = f"/fusions/{job['id']}"
    assert keyed.get(path, headers=alice).status_code == 200
    assert keyed.get(path, headers=bob).status_code == 404
    assert keyed.post(f"{path}:cancel", headers=bob).status_code == 404
    assert keyed.delete(path, headers=bob).status_code == 404
    assert keyed.get("/fusions", headers=bob).json()["items"] == []
    assert [j["id"] for j in keyed.get("/fusions", headers=alice).json()["items"]] == [job["id"]]
    # Idempotency keys are per tenant: bob's "k" is not alice's "k".
    a = keyed.post("/fusions", json=_body(parents), headers=alice | {"Idempotency-Key": "k"})
    b = keyed.post("/fusions", json=_body(parents), headers=bob | {"Idempotency-Key": "k"})
    assert a.json()["id"] != b.json()["id"] and b.json()["tenant"] == "bob"
    # Labels that mimic the record's own fields fool neither the tenant nor the status check.
    spoof = _body(parents, labels={"tenant": "bob", "status": "succeeded", "z": '","tenant":"bob'})
    spoofed = keyed.post("/fusions", json=spoof, headers=alice).json()
    assert keyed.get(f"/fusions/{spoofed['id']}", headers=bob).status_code == 404
    polled = keyed.get(f"/fusions/{spoofed['id']}", headers=alice)
    assert polled.status_code == 200 and polled.headers["retry-after"] == "1"
    # Health and metrics need no key.
    for open_path in ("/healthz", "/readyz", "/metrics"):
        assert keyed.get(open_path).status_code == 200


def test_openapi_yaml_equals_the_app_schema():
    committed = yaml.safe_load((REPO / "openapi.yaml").read_text())
    assert committed == yaml.safe_load(render()), (
        "openapi.yaml is stale: run `python -m service.openapi > openapi.yaml`"
    )
    assert set(committed["paths"]) >= {
        "/fusions",
        "/fusions/{job_id}",
        "/fusions/{job_id}:cancel",
        "/healthz",
        "/readyz",
        "/metrics",
    }
    post = committed["paths"]["/fusions"]["post"]
    assert post["responses"]["422"]["content"]["application/problem+json"]
    assert committed["components"]["schemas"]["JobSpec"]["examples"]
