"""fusion_core.fuse_job through the embedded service: a regularizer sweep (the chosen point
reported, only the chosen model published), a budgeted finetune with the vanilla baseline,
cancel during the finetune, stages and progress as the job record shows them."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from factories import image_data
from test_api_embedded import make_client, spec, wait_done

import fusion_core
from worker import pipeline
from worker.pipeline import inline_metrics


@pytest.fixture(scope="session")
def datasets(parents):
    folder = parents["root"] / "jobs-data"
    folder.mkdir(exist_ok=True)
    return {
        "calibration": f"file://{image_data(folder / 'calib.safetensors', seed=1)}",
        "eval": f"file://{parents['data']}",
        "finetune": f"file://{image_data(folder / 'train.safetensors', count=48, seed=2)}",
    }


@pytest.fixture
def recorded(monkeypatch):
    """Every stage entered and every progress value written to the job record."""
    seen = {"stages": [], "progress": []}
    enter, setter = pipeline.Run.enter, pipeline.Run._set

    def entering(self, stage, detail):
        seen["stages"].append(stage)
        return enter(self, stage, detail)

    def setting(self, **fields):
        if "progress" in fields:
            seen["progress"].append(fields["progress"])
        return setter(self, **fields)

    monkeypatch.setattr(pipeline.Run, "enter", entering)
    monkeypatch.setattr(pipeline.Run, "_set", setting)
    monkeypatch.setattr(pipeline, "UPDATE_EVERY", 0.0)  # every event reaches the record
    return seen


def calibration_key(metrics: dict) -> tuple[float, float]:
    return (metrics["accuracy"], -metrics["loss"])


def test_a_job_with_calibration_data_searches_the_axes_it_leaves_out(tmp_path, parents, datasets):
    """No policy and calibration data: the worker searches every axis the body leaves out.
    The job record echoes the spec with its defaults filled in, and the worker must not read
    those defaults as pinned (it did: the search tried one recipe). A field the body gives
    (`policy.heads`) pins its axis."""
    body = spec(
        parents,
        policy={"heads": "cross", "search_budget": 6},
        data={"calibration": datasets["calibration"]},
    )
    with make_client(tmp_path, parents) as client:
        response = client.post("/fusions", json=body)
        assert response.status_code == 202, response.text
        accepted = response.json()
        assert accepted["spec"]["policy"]["alignment"] == "weights"  # the echo: defaults
        assert accepted["request"]["policy"] == {"heads": "cross", "search_budget": 6}
        job = wait_done(client, accepted["id"])
    assert job["status"] == "succeeded", job["error"]
    sweep = job["result"]["metrics"]["sweep"]
    assert sweep["mode"] == "auto" and len(sweep["points"]) == 6
    points = sweep["points"]
    assert {p["heads"] for p in points} == {"cross"}
    assert len({(p["anchor"], p["alignment"], p["residual"]) for p in points}) == 6


def test_sweep_reports_the_chosen_point_and_publishes_only_it(tmp_path, parents, datasets):
    out = tmp_path / "swept"
    body = spec(
        parents,
        regularizer=[0.02, 0.3, "emd"],
        policy="fixed",  # the regularizer sweep: the recipe search over solver points only
        data={"calibration": datasets["calibration"], "eval": datasets["eval"]},
        artifacts={"report": True, "transport_maps": True},
        output=f"file://{out}",
    )
    with make_client(tmp_path, parents) as client:
        response = client.post("/fusions", json=body)
        assert response.status_code == 202, response.text
        assert response.json()["spec"]["regularizer"] == [0.02, 0.3, "emd"]
        job = wait_done(client, response.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    result = job["result"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert inline_metrics(metrics) == result["metrics"]

    sweep = metrics["sweep"]
    points = sweep["points"]
    assert [(p["solver"], p["reg"]) for p in points] == [  # EMD first: the cheapest
        ("emd", None),
        ("sinkhorn", 0.02),
        ("sinkhorn", 0.3),
    ]
    assert sum(p["chosen"] for p in points) == 1
    best = max(points, key=lambda p: calibration_key(p["calib"]))  # first best wins ties
    assert best["chosen"] and result["chosen"] == sweep["chosen"]
    assert result["chosen"] == {
        "anchor": 0,
        "alignment": "weights",
        "residual": "average",
        "heads": "matched",
        "solver": best["solver"],
        "reg": best["reg"],
    }
    assert sweep["selected_on"] == datasets["calibration"]
    assert metrics["spec"]["solver"] == best["solver"]
    assert best["reg"] is None or metrics["spec"]["reg"] == best["reg"]
    # The published checkpoint is the chosen point's: it scores what the sweep recorded.
    calib = Path(datasets["calibration"].removeprefix("file://"))
    again = fusion_core.evaluate(out, calib)
    assert again["accuracy"] == pytest.approx(best["calib"]["accuracy"])
    assert again["loss"] == pytest.approx(best["calib"]["loss"], rel=1e-4)

    # One model, its artifacts, nothing else: no losing candidates, no work folders.
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "fusion.json",
        "job.json",
        "metrics.json",
        "model.safetensors",
        "report.html",
        "transport_maps.safetensors",
    ]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert result["report_uri"] == f"file://{out}/report.html"
    assert result["transport_maps_uri"] == f"file://{out}/transport_maps.safetensors"
    report = (out / "report.html").read_text()
    assert "<html" in report.lower() and "data:image/png;base64," in report
    assert metrics["artifacts"] == {
        "model": ".",
        "transport_maps": "transport_maps.safetensors",
        "report": "report.html",
        "metrics": "metrics.json",
    }
    assert metrics["plans"] and "plans" not in result["metrics"]
    as_run = json.loads((out / "job.json").read_text())
    assert as_run["fusion_spec"]["solver"] == best["solver"]


def test_finetune_job_reports_before_after_and_respects_its_budget(
    tmp_path, parents, datasets, recorded
):
    body = spec(
        parents,
        # activations: the aligning stage reports per model, then per layer
        policy={"alignment": "activations"},
        data={
            "activations": datasets["calibration"],
            "eval": datasets["eval"],
            "finetune": datasets["finetune"],
        },
        finetune={"steps": 3, "lr": 0.001, "batch_size": 8, "baselines": ["vanilla"]},
    )
    with make_client(tmp_path, parents) as client:
        job = wait_done(client, client.post("/fusions", json=body).json()["id"])
    assert job["status"] == "succeeded", job["error"]
    folder = Path(job["result"]["checkpoint"].removeprefix("file://"))
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["published"] == "fused+finetune"
    rows = {r["name"]: r for r in metrics["evaluation"]}
    assert rows["fused+finetune"]["path"] == "." and rows["fused"]["path"] is None
    assert {"vanilla", "vanilla+finetune", "ensemble", "parent 0", "parent 1"} <= set(rows)
    config = metrics["finetune"]["config"]
    assert (config["steps"], config["lr"], config["batch_size"]) == (3, 0.001, 8)
    runs = {r["model"]: r for r in metrics["finetune"]["runs"]}
    assert set(runs) == {"fused", "vanilla"}
    for name, run in runs.items():
        assert run["steps"] == 3 and run["stopped_by"] == "steps", run
        assert len(run["losses"]) == 3
        assert run["before"] == rows[name]["metrics"]
        assert run["after"] == rows[f"{name}+finetune"]["metrics"]
        assert run["before"] != run["after"]
    # Inline: the runs without their curves.
    inline = job["result"]["metrics"]["finetune"]["runs"]
    assert all("losses" not in r and "lr" not in r for r in inline)
    assert job["result"]["metrics"]["published"] == "fused+finetune"
    # Stages in order, progress never going back.
    order = ["downloading", "aligning", "evaluating", "finetuning", "uploading"]
    assert recorded["stages"] == order  # each once
    assert list(metrics["stages"]) == order and all(v >= 0 for v in metrics["stages"].values())
    values = recorded["progress"]
    assert values == sorted(values) and values[-1] <= 1.0
    assert job["progress"] == 1.0


def test_seconds_budget_stops_the_finetune(tmp_path, parents, datasets):
    body = spec(
        parents,
        data={"finetune": datasets["finetune"]},
        finetune={"seconds": 0.5, "steps": 100_000, "batch_size": 4},
    )
    with make_client(tmp_path, parents) as client:
        job = wait_done(client, client.post("/fusions", json=body).json()["id"])
    assert job["status"] == "succeeded", job["error"]
    (run,) = job["result"]["metrics"]["finetune"]["runs"]
    assert run["stopped_by"] == "seconds" and 0 < run["steps"] < 100_000
    assert run["seconds"] < 0.5 + 1.0  # stops at the first step past the budget
    assert job["result"]["metrics"]["evaluation"] == []  # no eval data: nothing compared


def test_cancel_during_finetune_publishes_nothing(tmp_path, parents, datasets, monkeypatch):
    entered, release = threading.Event(), threading.Event()
    original = pipeline.Run.progress

    def gated(self, fraction, detail, *args, **kwargs):
        if self.stage == "finetuning" and "step 2/" in detail:
            original(self, fraction, detail, force=True)
            entered.set()
            release.wait(30)  # hold the finetune until the test cancelled it
        return original(self, fraction, detail, *args, **kwargs)

    monkeypatch.setattr(pipeline.Run, "progress", gated)
    out = tmp_path / "healed"
    body = spec(
        parents,
        data={"eval": datasets["eval"], "finetune": datasets["finetune"]},
        finetune={"steps": 50, "batch_size": 8},
        artifacts={"report": True},
        output=f"file://{out}",
    )
    with make_client(tmp_path, parents) as client:
        job = client.post("/fusions", json=body).json()
        try:
            assert entered.wait(60)
            running = client.get(f"/fusions/{job['id']}").json()
            assert running["stage"] == "finetuning", running
            assert running["detail"].startswith("finetune fused: step 2/50")
            assert 0.05 < running["progress"] < 0.95
            assert client.post(f"/fusions/{job['id']}:cancel").status_code == 200
        finally:
            release.set()
        job = wait_done(client, job["id"])
    assert job["status"] == "cancelled" and job["result"] is None
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_accepted_sweep_and_finetune_specs(tmp_path, parents, datasets):
    from test_api_embedded import HeldQueue

    with make_client(tmp_path, parents, queue=HeldQueue()) as client:
        for regularizer in ("auto", "emd", [0.1, "emd"], [0.05]):
            body = spec(
                parents, regularizer=regularizer, data={"activations": datasets["calibration"]}
            )
            response = client.post("/fusions", json=body)
            assert response.status_code == 202, (regularizer, response.text)
        body = spec(
            parents,
            data={"finetune": datasets["finetune"]},
            finetune={"epochs": 2},
        )
        job = client.post("/fusions", json=body).json()
        assert job["spec"]["finetune"] == {
            "steps": None,
            "epochs": 2.0,
            "seconds": None,
            "lr": 0.0001,
            "batch_size": 32,
            "warmup": 0.1,
            "weight_decay": 0.01,
            "seed": 0,
            "distill": 0.9,
            "temperature": 4.0,
            "baselines": [],
        }
        assert job["spec"]["artifacts"] == {
            "transport_maps": False,
            "report": False,
            "max_shard_size": 5 * 10**9,
        }


def test_sweep_without_eval_reports_no_baselines(tmp_path, parents, datasets):
    body = spec(parents, regularizer=[0.05, "emd"], data={"activations": datasets["calibration"]})
    with make_client(tmp_path, parents) as client:
        job = wait_done(client, client.post("/fusions", json=body).json()["id"])
    assert job["status"] == "succeeded", job["error"]
    metrics = job["result"]["metrics"]
    assert metrics["sweep"]["selected_on"] == datasets["calibration"]
    assert metrics["evaluation"] == [] and "fused" not in metrics
    chosen = job["result"]["chosen"]
    assert (chosen["solver"], chosen["reg"]) in (("sinkhorn", 0.05), ("emd", None))
