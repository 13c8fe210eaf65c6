"""hf://org/name[@revision] models, resolved through huggingface_hub's cache (laid out on disk
here; HF_HUB_OFFLINE: no network): the CLI fuses them, the service takes the repos its operator
allows and refuses the others at the field, only checkpoint files are staged, and artifacts
name the hub URIs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import transformers
from factories import image_data, permuted_copy, save, tiny_vit
from fastapi.testclient import TestClient
from helpers import wait_for

from adapters.hub import HubBackend, parse_hub
from adapters.settings import Settings
from otfuse.cli import main
from otfuse.server import build_app

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def lay_out_repo(cache: Path, repo: str, folder: Path, extra: dict[str, bytes] | None = None):
    """A repo in the hub cache's own layout: refs/main, snapshots/<commit>/ as links to blobs."""
    base = cache / ("models--" + repo.replace("/", "--"))
    snapshot = base / "snapshots" / COMMIT
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(COMMIT)
    snapshot.mkdir(parents=True)
    (base / "blobs").mkdir()
    files = {f.name: f.read_bytes() for f in folder.iterdir()} | (extra or {})
    for name, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        (base / "blobs" / digest).write_bytes(data)
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        depth = "../" * (name.count("/") + 2)
        (snapshot / name).symlink_to(Path(depth + "blobs") / digest)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    original = tiny_vit(seed=3)
    cache = root / "cache"
    lay_out_repo(
        cache,
        "test-org/vit-a",
        save(original, root / "a"),
        {"README.md": b"not read", "optimizer/state.bin": b"not read either"},
    )
    lay_out_repo(cache, "test-org/vit-b", save(permuted_copy(original, 7), root / "b"))
    lay_out_repo(cache, "other-org/vit-c", save(tiny_vit(seed=4), root / "c"))
    return {"root": root, "cache": cache, "original": original}


@pytest.fixture
def offline_cache(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub["cache"]))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub


@pytest.mark.parametrize(
    "uri,parsed",
    [
        ("hf://org/name", ("org/name", None)),
        ("hf://org/name@v1.0", ("org/name", "v1.0")),
        ("hf://org/name@refs/pr/3", ("org/name", "refs/pr/3")),
    ],
)
def test_hub_uris(uri, parsed):
    assert parse_hub(uri) == parsed


@pytest.mark.parametrize(
    "uri", ["hf://org", "hf://org/name/extra", "hf://../x", "hf://org/name@../../x", "hf://o/n@"]
)
def test_malformed_hub_uris(uri):
    with pytest.raises(ValueError):
        parse_hub(uri)


def test_only_checkpoint_files_are_staged(offline_cache, tmp_path):
    backend = HubBackend(offline=True)
    files = backend.list_checkpoint("hf://test-org/vit-a")
    assert sorted(f.name for f in files) == ["config.json", "model.safetensors"]
    staged = backend.fetch("hf://test-org/vit-a", files, tmp_path / "stage", lambda: False)
    assert sorted(p.name for p in staged.iterdir()) == ["config.json", "model.safetensors"]


def test_the_cli_fuses_hub_models(offline_cache, tmp_path, capsys):
    out = tmp_path / "fused"
    models = ["hf://test-org/vit-a", "hf://test-org/vit-b@main"]
    code = main(["fuse", *models, "--out", str(out), "--solver", "emd", "--quiet"])
    assert code == 0, capsys.readouterr().err
    fused = transformers.ViTForImageClassification.from_pretrained(str(out)).eval()
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(
        fused(pixel_values=x).logits,
        offline_cache["original"](pixel_values=x).logits,
        atol=1e-4,
        rtol=1e-4,
    )
    record = json.loads((out / "fusion.json").read_text())
    assert [p["path"] for p in record["parents"]] == [
        "hf://test-org/vit-a",
        "hf://test-org/vit-b@main",
    ]


def test_a_repo_missing_from_the_cache_is_one_line(offline_cache, tmp_path, capsys):
    code = main(["fuse", "hf://test-org/vit-a", "hf://test-org/nope", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 3 and len(err.splitlines()) == 1 and "hf://test-org/nope" in err, err


@pytest.fixture
def service(offline_cache, tmp_path):
    data = image_data(tmp_path / "images.safetensors")
    settings = Settings(
        data_dir=tmp_path / "svc",
        file_roots=[tmp_path],
        hub_repos=["test-org/*"],
        hub_cache=offline_cache["cache"],
        hub_offline=True,
    )
    with TestClient(build_app(settings)) as client:
        yield client, data


def test_the_service_fuses_allowed_hub_repos(service):
    client, data = service
    body = {
        "models": ["hf://test-org/vit-a", "hf://test-org/vit-b"],
        "data": {"eval": f"file://{data}"},
    }
    response = client.post("/fusions", json=body)
    assert response.status_code == 202, response.text

    def done():
        job = client.get(f"/fusions/{response.json()['id']}").json()
        return job if job["status"] in ("succeeded", "failed") else None

    job = wait_for(done, 90, "the hub job")
    assert job["status"] == "succeeded", job["error"]
    assert job["result"]["metrics"]["models"] == ["hf://test-org/vit-a", "hf://test-org/vit-b"]


@pytest.mark.parametrize(
    "models,words",
    [
        (["hf://test-org/vit-a", "hf://other-org/vit-c"], "OTFUSE_HUB_REPOS"),
        (["hf://test-org/vit-a", "hf://test-org/missing"], "no config.json"),
        (["hf://test-org/vit-a", "hf://bad uri"], "hf://org/name"),
    ],
)
def test_the_service_refuses_other_hub_names_at_the_field(service, models, words):
    client, _ = service
    response = client.post("/fusions", json={"models": models})
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["field"] == "models.1"
    assert words in response.json()["detail"]


def test_hub_repos_are_not_outputs_or_data(service):
    client, _ = service
    models = ["hf://test-org/vit-a", "hf://test-org/vit-b"]
    out = client.post("/fusions", json={"models": models, "output": "hf://test-org/vit-a"})
    assert out.status_code == 422 and out.json()["errors"][0]["field"] == "output"
    data_uri = client.post(
        "/fusions", json={"models": models, "data": {"eval": "hf://test-org/vit-a"}}
    )
    assert data_uri.status_code == 422 and data_uri.json()["errors"][0]["field"] == "data.eval"


def test_no_hub_repos_by_default(tmp_path, offline_cache):
    settings = Settings(data_dir=tmp_path / "svc")
    with TestClient(build_app(settings)) as client:
        response = client.post(
            "/fusions", json={"models": ["hf://test-org/vit-a", "hf://test-org/vit-b"]}
        )
    assert response.status_code == 422 and response.json()["errors"][0]["field"] == "models.0"
