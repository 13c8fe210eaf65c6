"""One job contract: the CLI, the API and the worker reject the same bad specs, naming the
same JSON fields (the CLI names its flag for the field), from one table; every field of the
spec has its flag; the API validates without importing torch."""

from __future__ import annotations

import subprocess
import sys
import typing

import pytest
from factories import image_data, save, tiny_vit
from fastapi.testclient import TestClient
from helpers import REPO

from adapters.queue import Queue
from adapters.settings import Settings
from adapters.store import MemoryJobStore, new_job_id, now_iso
from fusion_core.contract import JobSpec
from otfuse.cli import FLAGS, flag_of, main
from otfuse.server import build_app
from worker import pipeline


class HeldQueue(Queue):
    def enqueue(self, job_id):
        pass


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    models = [save(tiny_vit(seed=s), root / f"m{s}") for s in (0, 1)]
    data = image_data(root / "d.safetensors")
    return {"root": root, "models": models, "data": str(data)}


D = "{data}"  # the data file, in whichever form the caller names files
# (field, spec patch, CLI flags): each bad in every caller's eyes.
CASES = [
    ("regularizer", {"regularizer": -1.0}, ["--reg", "-1"]),
    ("regularizer.1", {"regularizer": [0.1, -2.0]}, ["--reg", "0.1,-2"]),
    (
        "regularizer",
        {"method": "vanilla", "regularizer": "auto", "data": {"activations": D}},
        ["--method", "vanilla", "--reg", "auto", "--data", D],
    ),
    ("anchor", {"anchor": 5}, ["--anchor", "5"]),
    (
        "artifacts.max_shard_size",
        {"artifacts": {"max_shard_size": 1000}},
        ["--max-shard-size", "1KB"],
    ),
    ("weights", {"weights": [1.0]}, ["--weights", "1"]),
    ("weights", {"weights": [1e308, 1e308]}, ["--weights", "1e308", "1e308"]),
    ("data.activations", {"policy": {"alignment": "activations"}}, ["--alignment", "activations"]),
    (
        "data.activations",
        {"policy": {"residual": "weighted-scalar"}},
        ["--residual", "weighted-scalar"],
    ),
    ("data.calibration", {"regularizer": [0.1, "emd"]}, ["--reg", "0.1,emd"]),
    (
        "data.calibration",
        {"regularizer": "auto", "data": {"calibration": D, "eval": D}},
        ["--reg", "auto", "--calib-data", D, "--eval-data", D],
    ),
    ("data.finetune", {"finetune": {"steps": 5}}, ["--finetune-steps", "5"]),
    ("finetune", {"finetune": {"baselines": ["vanilla"]}}, ["--finetune-baselines", "vanilla"]),
    (
        "finetune.lr",
        {"finetune": {"steps": 5, "lr": 5.0}, "data": {"finetune": D}},
        ["--finetune-steps", "5", "--lr", "5", "--finetune-data", D],
    ),
    (
        "finetune.distill",
        {"finetune": {"steps": 5, "distill": 1.5}, "data": {"finetune": D}},
        ["--finetune-steps", "5", "--distill", "1.5", "--finetune-data", D],
    ),
    (
        "finetune.temperature",
        {"finetune": {"steps": 5, "distill": 0.5, "temperature": 0}, "data": {"finetune": D}},
        ["--finetune-steps", "5", "--distill", "0.5", "--temperature", "0", "--finetune-data", D],
    ),
    (
        "finetune.steps",
        {"finetune": {"steps": 0}, "data": {"finetune": D}},
        ["--finetune-steps", "0", "--finetune-data", D],
    ),
    ("policy.samples", {"policy": {"samples": 0}}, ["--samples", "0"]),
    ("policy.filter", {"policy": {"filter": "window-x"}}, ["--filter", "window-x"]),
    ("policy.device", {"policy": {"device": "tpu"}}, ["--device", "tpu"]),
    ("policy.search", {"policy": "sometimes"}, ["--policy", "sometimes"]),
    ("policy.search", {"policy": [{"solver": "lbfgs"}]}, ["--policy", '[{"solver": "lbfgs"}]']),
    ("policy.search", {"policy": [{"reg": -1}]}, ["--policy", '[{"reg": -1}]']),
    ("policy.search", {"policy": []}, ["--policy", "[]"]),
    (
        "policy.search",
        {"policy": [{"anchor": 7}], "data": {"calibration": D}},
        ["--policy", '[{"anchor": 7}]', "--calib-data", D],
    ),
    (
        "policy.search",
        {"method": "vanilla", "policy": "auto", "data": {"calibration": D}},
        ["--method", "vanilla", "--policy", "auto", "--calib-data", D],
    ),
    ("data.calibration", {"policy": "auto"}, ["--policy", "auto"]),
    (
        "data.calibration",
        {"policy": [{"reg": 0.1}, {"solver": "emd"}]},
        ["--policy", '[{"reg": 0.1}, {"solver": "emd"}]'],
    ),
    (
        "data.calibration",
        {"policy": "auto", "data": {"calibration": D, "eval": D}},
        ["--calib-data", D, "--eval-data", D],
    ),
    ("policy.search_budget", {"policy": {"search_budget": 0}}, ["--search-budget", "0"]),
    ("policy.search_seconds", {"policy": {"search_seconds": -1}}, ["--search-seconds", "-1"]),
]
IDS = [f"{case[0]}-{i}" for i, case in enumerate(CASES)]


def _fill(value, data: str):
    if isinstance(value, dict):
        return {k: _fill(v, data) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, data) for v in value]
    return data if value == D else value


def api_body(world, patch: dict) -> dict:
    body = {"models": [f"file://{m}" for m in world["models"]]}
    for key, value in _fill(patch, f"file://{world['data']}").items():
        if isinstance(value, dict):
            body[key] = {**body.get(key, {}), **value}
        else:
            body[key] = value
    return body


@pytest.mark.parametrize("field,patch,flags", CASES, ids=IDS)
def test_the_api_names_the_field(world, tmp_path, field, patch, flags):
    settings = Settings(data_dir=tmp_path / "svc", file_roots=[world["root"]])
    with TestClient(build_app(settings, queue=HeldQueue())) as client:
        response = client.post("/fusions", json=api_body(world, patch))
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["field"] == field


@pytest.mark.parametrize("field,patch,flags", CASES, ids=IDS)
def test_the_cli_names_the_flag_of_the_field(world, tmp_path, capsys, field, patch, flags):
    flags = [world["data"] if f == D else f for f in flags]
    code = main(["fuse", *map(str, world["models"]), "--out", str(tmp_path / "o"), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 3, err
    assert err.startswith(f"otfuse: error: {flag_of(field)}: "), err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("field,patch,flags", CASES, ids=IDS)
def test_the_worker_names_the_field(world, tmp_path, field, patch, flags):
    """A record that never passed the API (written by an older server, or by hand)."""
    settings = Settings(data_dir=tmp_path / "svc", file_roots=[world["root"]])
    store = MemoryJobStore()
    job_id, now = new_job_id(), now_iso()
    store.create(
        {
            "id": job_id,
            "tenant": "local",
            "status": "queued",
            "spec": api_body(world, patch),
            "output": f"file://{tmp_path}/svc/artifacts/local/{job_id}/",
            "created_at": now,
            "updated_at": now,
            "attempts": 0,
        }
    )
    from adapters.storage import Storage

    assert pipeline.run_job(job_id, store, Storage(settings), settings) == "failed"
    error = store.get(job_id)["error"]
    assert error["type"] == "input_error" and error["message"].startswith(f"{field}: "), error


def _leaves(model: type, prefix: str = "") -> set[str]:
    fields = set()
    for name, info in model.model_fields.items():
        kinds = [info.annotation, *typing.get_args(info.annotation)]
        nested = [k for k in kinds if isinstance(k, type) and hasattr(k, "model_fields")]
        if nested:
            fields |= _leaves(nested[0], f"{prefix}{name}.")
        else:
            fields.add(prefix + name)
    return fields


def test_every_field_of_the_spec_has_a_flag_or_is_the_service_s():
    service_only = {"name", "labels", "finetune.warmup", "finetune.weight_decay", "finetune.seed"}
    assert _leaves(JobSpec) - service_only == set(FLAGS) - {"finetune", "policy"}


def test_the_api_validates_without_torch(tmp_path, parents):
    """The API image has no torch, transformers or numerical libraries: with them made
    unimportable, the app builds, validates a job, plans one from its headers, lists jobs
    and serves its docs."""
    code = f"""
import importlib.abc, sys
BLOCKED = {{"torch", "transformers", "safetensors", "scipy", "ot", "numpy", "lap", "sklearn"}}
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"the API imported {{name}}")
sys.meta_path.insert(0, Blocker())
from fastapi.testclient import TestClient
from adapters.queue import Queue
from adapters.settings import Settings
from service.app import create_app

class Held(Queue):
    def enqueue(self, job_id):
        pass

settings = Settings(
    data_dir={str(tmp_path / "svc")!r}, file_roots=[{str(tmp_path)!r}, {str(parents["root"])!r}]
)
with TestClient(create_app(settings, queue=Held())) as client:
    bad = client.post("/fusions", json={{"models": ["file:///a/"], "regularizer": -1}})
    assert bad.status_code == 422, bad.text
    models = {[f"file://{m}" for m in parents["models"]]!r}
    plan = client.post("/fusions:plan", json={{"models": models}})
    assert plan.status_code == 200 and plan.json()["compatible"], plan.text
    assert client.get("/fusions").status_code == 200
    docs = client.get("/docs").text
    assert "/docs/assets/swagger-ui-bundle.js" in docs and "cdn" not in docs.lower()
    assert client.get("/docs/assets/swagger-ui-bundle.js").status_code == 200
import otfuse.cli, otfuse.server  # the API image's `otfuse serve`
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_policy_defaults_and_pinned_flags(world, tmp_path):
    """With calibration data and no policy the job searches; without, it runs the fixed
    recipe; a flag given (or a spec field) pins its axis, the same from the CLI and JSON."""
    from fusion_core.contract import AUTO_REGS, Point, parse_job, search_space
    from otfuse.cli import build_parser, job_spec

    def cli(*flags):
        args = build_parser().parse_args(
            ["fuse", *map(str, world["models"]), "--out", str(tmp_path / "o"), *flags]
        )
        return search_space(job_spec(args))

    calib = ["--calib-data", world["data"]]
    assert cli().mode == "fixed" and cli().points == (Point("sinkhorn", 0.05),)
    auto = cli(*calib)
    assert auto.mode == "auto" and auto.anchors is None
    assert auto.alignments == ("weights", "activations") and len(auto.points) == 6
    assert auto.residuals == ("average", "shared", "weighted-scalar")
    pinned = cli(*calib, "--solver", "emd", "--residual", "shared", "--anchor", "1")
    assert pinned.points == (Point("emd"),) and pinned.residuals == ("shared",)
    assert pinned.anchors == (1,) and pinned.heads == ("matched", "cross")
    assert cli(*calib, "--solver", "sinkhorn").points == tuple(
        Point("sinkhorn", r) for r in AUTO_REGS
    )
    assert cli(*calib, "--reg", "0.01").points == (Point("sinkhorn", 0.01),)
    assert cli(*calib, "--policy", "fixed").mode == "fixed"
    listed = cli(*calib, "--policy", '[{"reg": 0.1}, {"solver": "emd", "anchor": 1}]')
    assert [(r.solver, r.reg, r.anchor) for r in listed.recipes] == [
        ("sinkhorn", 0.1, 0),
        ("emd", None, 1),
    ]
    # the JSON spec: the same rules
    models = [f"file://{m}" for m in world["models"]]
    data = {"calibration": f"file://{world['data']}"}
    spec = parse_job({"models": models, "policy": {"heads": "cross"}, "data": data})
    assert search_space(spec).heads == ("cross",) and search_space(spec).mode == "auto"
    assert search_space(parse_job({"models": models, "policy": "auto", "data": data})).is_search
