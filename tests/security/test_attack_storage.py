"""Storage attacks against the real stack: object keys that climb out of the scratch folder,
bucket roots, byte caps, one tenant naming another's prefixes, deleting what is not the
job's, and links out of the file roots. Each asserts the refusal and that nothing was
written or leaked."""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from helpers import BUCKET, MODELS, s3_keys
from security_stack import ALICE, BOB, INPUT_CAP, wait_done

from adapters.settings import Settings
from otfuse.server import build_app


def upload_model(s3, parents, prefix: str, index: int = 0) -> str:
    for file in parents["models"][index].iterdir():
        s3.upload_file(str(file), MODELS, f"{prefix}/{file.name}")
    return f"s3://{MODELS}/{prefix}/"


def spec(*models: str, **extra) -> dict:
    return {"models": list(models), **extra}


@pytest.mark.parametrize(
    "hostile", ["../../tmp/{tag}", "/tmp/{tag}", "./{tag}", "sub/../../{tag}", "a\\..\\{tag}"]
)
def test_object_keys_that_climb_out_fail_the_job_and_write_nothing(
    api, attack_stack, parents, hostile
):
    s3, tag = attack_stack["s3"], f"otfuse-escape-{uuid.uuid4().hex[:8]}"
    prefix = f"evil-{uuid.uuid4().hex[:6]}"
    evil = upload_model(s3, parents, prefix, 1)
    key = f"{prefix}/{hostile.format(tag=tag)}"
    s3.put_object(Bucket=MODELS, Key=key, Body=b"owned")
    job = api.post("/fusions", json=spec(f"s3://{MODELS}/vit-0/", evil), headers=ALICE).json()
    job = wait_done(api, job["id"], ALICE)
    assert job["status"] == "failed" and job["error"]["type"] == "input_error", job
    assert repr(key) in job["error"]["message"]  # named, control characters escaped
    assert not list(Path("/tmp").glob(f"**/{tag}")), "a file was written outside scratch"
    assert s3_keys(s3, BUCKET, f"fusions/alice/{job['id']}/") == []


@pytest.mark.parametrize("root", [f"s3://{MODELS}", f"s3://{MODELS}/", f"s3://{MODELS}//"])
def test_a_bucket_root_is_not_a_model(api, root):
    response = api.post("/fusions", json=spec(f"s3://{MODELS}/vit-0/", root), headers=ALICE)
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "models.1"
    assert "bucket root" in response.json()["detail"]


def test_a_prefix_without_a_config_is_refused(api, attack_stack, parents):
    """At submit (one HEAD): the files are one level down, not a checkpoint folder."""
    s3 = attack_stack["s3"]
    prefix = f"noconfig-{uuid.uuid4().hex[:6]}"
    upload_model(s3, parents, f"{prefix}/nested", 1)
    models = (f"s3://{MODELS}/vit-0/", f"s3://{MODELS}/{prefix}/")
    response = api.post("/fusions", json=spec(*models), headers=ALICE)
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["field"] == "models.1"
    assert "no config.json in this folder" in response.json()["detail"]


def test_the_byte_cap_is_checked_before_anything_is_downloaded(api, attack_stack, parents, caplog):
    s3 = attack_stack["s3"]
    prefix = f"huge-{uuid.uuid4().hex[:6]}"
    big = upload_model(s3, parents, prefix, 1)
    s3.put_object(Bucket=MODELS, Key=f"{prefix}/extra.safetensors", Body=b"\0" * (INPUT_CAP + 1))
    caplog.set_level(logging.INFO, logger="werkzeug")  # moto's request log, in this process
    job = api.post("/fusions", json=spec(f"s3://{MODELS}/vit-0/", big), headers=ALICE).json()
    job = wait_done(api, job["id"], ALICE)
    assert job["status"] == "failed" and job["error"]["type"] == "input_error"
    assert "OTFUSE_MAX_INPUT_BYTES" in job["error"]["message"]
    fetched = [
        r.getMessage() for r in caplog.records if f"GET /{MODELS}/{prefix}/" in r.getMessage()
    ]
    assert fetched == [], "objects were downloaded before the cap was checked"


@pytest.mark.parametrize(
    "output",
    [
        f"s3://{BUCKET}/fusions/alice/",
        f"s3://{BUCKET}/fusions/alice/mine-now/",
        f"s3://{BUCKET}/fusions/",
        f"s3://{BUCKET}/fusions/bob/../alice/x/",
        f"s3://{MODELS}/vit-0/",
        f"s3://{MODELS}/bob-out/",
        f"s3://{BUCKET}/_otfuse_tmp/x/",
        f"s3://{BUCKET}/elsewhere/",
    ],
)
def test_bob_writes_only_under_his_own_prefix(api, output):
    models = (f"s3://{MODELS}/vit-0/", f"s3://{MODELS}/vit-1/")
    response = api.post("/fusions", json=spec(*models, output=output), headers=BOB)
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["field"] == "output"
    ok = api.post(
        "/fusions", json=spec(*models, output=f"s3://{BUCKET}/fusions/bob/x/"), headers=BOB
    )
    assert ok.status_code == 202  # his own prefix is his
    api.post(f"/fusions/{ok.json()['id']}:cancel", headers=BOB)


@pytest.fixture(scope="module")
def alice_published(attack_stack, parents):
    """A job of alice's that succeeded: its checkpoint is under fusions/alice/."""
    with TestClient(build_app(attack_stack["settings"])) as client:
        models = (f"s3://{MODELS}/vit-0/", f"s3://{MODELS}/vit-1/")
        job = client.post("/fusions", json=spec(*models), headers=ALICE).json()
        job = wait_done(client, job["id"], ALICE)
    assert job["status"] == "succeeded", job
    return job


@pytest.mark.parametrize(
    "field,uri",
    [
        ("models.0", "{checkpoint}"),
        ("models.0", f"s3://{BUCKET}/fusions/alice/"),
        ("models.0", f"s3://{BUCKET}/_otfuse_tmp/x/"),
        ("data.eval", "{checkpoint}model.safetensors"),
        ("data.eval", "{checkpoint}metrics.json"),
    ],
)
def test_bob_cannot_read_alice_s_results(api, alice_published, field, uri):
    uri = uri.format(checkpoint=alice_published["result"]["checkpoint"])
    body = spec(f"s3://{MODELS}/vit-0/", f"s3://{MODELS}/vit-1/")
    if field == "models.0":
        body["models"][0] = uri
    else:
        body["data"] = {"eval": uri}
    response = api.post("/fusions", json=body, headers=BOB)
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["field"] == field
    assert "not readable by this tenant" in response.json()["detail"]


def test_alice_reads_her_own_results(api, alice_published):
    body = spec(alice_published["result"]["checkpoint"], f"s3://{MODELS}/vit-1/")
    response = api.post("/fusions", json=body, headers=ALICE)
    assert response.status_code == 202, response.text
    api.post(f"/fusions/{response.json()['id']}:cancel", headers=ALICE)


def published_by_alice(api, name: str) -> tuple[dict, str]:
    """A succeeded job of alice's at an output prefix of her choice, and that prefix."""
    models = (f"s3://{MODELS}/vit-0/", f"s3://{MODELS}/vit-1/")
    out = f"fusions/alice/{name}-{uuid.uuid4().hex[:6]}/"
    job = api.post("/fusions", json=spec(*models, output=f"s3://{BUCKET}/{out}"), headers=ALICE)
    job = wait_done(api, job.json()["id"], ALICE)
    assert job["status"] == "succeeded", job
    return job, out


def test_delete_with_artifacts_removes_only_what_the_job_published(api, attack_stack):
    s3 = attack_stack["s3"]
    job, out = published_by_alice(api, "shared")
    published = s3_keys(s3, BUCKET, out)
    assert sorted(job["result"]["files"]) == sorted(k.removeprefix(out) for k in published)
    s3.put_object(Bucket=BUCKET, Key=f"{out}notes.txt", Body=b"alice's own notes")
    assert api.delete(f"/fusions/{job['id']}?artifacts=true", headers=BOB).status_code == 404
    assert api.delete(f"/fusions/{job['id']}?artifacts=true", headers=ALICE).status_code == 204
    assert s3_keys(s3, BUCKET, out) == [f"{out}notes.txt"]


def test_delete_refuses_when_the_prefix_holds_another_job_s_files(api, attack_stack):
    s3 = attack_stack["s3"]
    job, out = published_by_alice(api, "reused")
    s3.put_object(Bucket=BUCKET, Key=f"{out}job.json", Body=json.dumps({"job_id": "someone"}))
    response = api.delete(f"/fusions/{job['id']}?artifacts=true", headers=ALICE)
    assert response.status_code == 409
    assert len(s3_keys(s3, BUCKET, out)) == len(job["result"]["files"])


# -- links out of the file roots (embedded mode reads file:// in place) ------------------------
@pytest.fixture
def embedded(tmp_path, parents):
    root = tmp_path / "root"
    root.mkdir()
    settings = Settings(data_dir=tmp_path / "service", file_roots=[root, parents["root"]])
    with TestClient(build_app(settings)) as client:
        yield client, root, tmp_path


def copy_model(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for file in source.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


@pytest.mark.parametrize("name", ["tokenizer.json", "vocab.txt", "config.json"])
def test_links_out_of_the_roots_are_refused_and_nothing_leaks(embedded, parents, name):
    client, root, tmp_path = embedded
    secret = tmp_path / "secret.txt"
    token = f"SECRET-{uuid.uuid4().hex}"
    secret.write_text(json.dumps({"token": token}))
    model = copy_model(parents["models"][1], root / "model")
    (model / name).unlink(missing_ok=True)
    (model / name).symlink_to(secret)
    job = client.post("/fusions", json=spec(f"file://{parents['models'][0]}", f"file://{model}"))
    job = wait_done(client, job.json()["id"], {})
    assert job["status"] == "failed" and job["error"]["type"] == "input_error", job
    assert (
        name in job["error"]["message"] and "out of the readable folders" in job["error"]["message"]
    )
    assert token not in json.dumps(job)
    written = [p for p in (tmp_path / "service").rglob("*") if p.is_file()]
    assert all(token not in p.read_text(errors="ignore") for p in written)


def test_links_inside_the_roots_are_followed(embedded, parents):
    """The hub cache's layout: snapshot files are links to blobs in the same root."""
    client, root, _ = embedded
    blobs, snapshot = root / "blobs", root / "snapshots" / "abc"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for file in parents["models"][1].iterdir():
        (blobs / file.name).write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(blobs / file.name)
    job = client.post("/fusions", json=spec(f"file://{parents['models'][0]}", f"file://{snapshot}"))
    job = wait_done(client, job.json()["id"], {})
    assert job["status"] == "succeeded", job


def test_a_model_folder_that_is_itself_a_link_out_of_the_roots(embedded, parents):
    client, root, tmp_path = embedded
    outside = copy_model(parents["models"][1], tmp_path / "outside")
    (root / "linked").symlink_to(outside)
    response = client.post(
        "/fusions", json=spec(f"file://{parents['models'][0]}", f"file://{root}/linked")
    )
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "models.1"
