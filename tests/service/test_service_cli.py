"""`otfuse serve` (embedded) + `otfuse submit --wait` + `otfuse status`, as processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
from helpers import REPO, free_port, wait_for


def otfuse(*args, env=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "otfuse", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=timeout,
    )


def test_serve_submit_wait_status(tmp_path, parents):
    port = free_port()
    env = os.environ | {
        "OTFUSE_DATA_DIR": str(tmp_path / "svc"),
        "OTFUSE_FILE_ROOTS": str(parents["root"]),
        "OTFUSE_URL": f"http://127.0.0.1:{port}",
    }
    env.pop("OTFUSE_REDIS_URL", None)
    server = subprocess.Popen(
        [sys.executable, "-m", "otfuse", "serve", "--port", str(port)],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def up():
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 60, "otfuse serve")
        spec = tmp_path / "spec.json"
        models = [f"file://{m}" for m in parents["models"]]
        spec.write_text(
            json.dumps({"models": models, "data": {"eval": f"file://{parents['data']}"}})
        )
        done = otfuse("submit", str(spec), "--wait", "--json", env=env)
        assert done.returncode == 0, done.stderr
        job = json.loads(done.stdout)
        assert job["status"] == "succeeded" and "accuracy" in job["result"]["metrics"]["fused"]
        assert "100.0%" in done.stderr  # the progress bar reached the end
        shown = otfuse("status", job["id"], "--json", env=env)
        assert shown.returncode == 0 and json.loads(shown.stdout)["id"] == job["id"]
        # Without --json: a summary for people, the ensemble and the artifacts included.
        human = otfuse("submit", str(spec), "--wait", env=env)
        assert human.returncode == 0, human.stderr
        lines = human.stdout.splitlines()
        assert lines[0].endswith(": succeeded") and "recipe: ot, weights alignment" in human.stdout
        table = {line.split()[0] for line in lines if line.startswith("  ")}
        assert {"parent", "ensemble", "vanilla", "fused"} <= table
        assert any(line.startswith("checkpoint: file://") for line in lines)
        assert len(lines) < 20 and "{" not in human.stdout
        spec.write_text(json.dumps({"models": models[:1]}))
        bad = otfuse("submit", str(spec), env=env)
        assert bad.returncode == 3 and "422: models:" in bad.stderr
        assert otfuse("status", "0123456789abcdef01234567", env=env).returncode == 3
    finally:
        server.terminate()
        server.wait(30)


def test_serve_refuses_a_public_bind_without_keys(tmp_path):
    env = os.environ | {"OTFUSE_DATA_DIR": str(tmp_path)}
    env.pop("OTFUSE_API_KEYS", None)
    done = otfuse("serve", "--host", "0.0.0.0", "--port", str(free_port()), env=env)
    assert done.returncode == 3 and "loopback" in done.stderr


def test_worker_needs_redis(tmp_path):
    env = os.environ.copy()
    env.pop("OTFUSE_REDIS_URL", None)
    done = otfuse("worker", env=env)
    assert done.returncode == 3 and "OTFUSE_REDIS_URL" in done.stderr


def test_submit_and_status_without_a_server_say_so_in_one_line(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"models": ["file:///a/", "file:///b/"]}))
    url = f"http://127.0.0.1:{free_port()}"
    for args in (["submit", str(spec)], ["status", "0123456789abcdef01234567"]):
        done = otfuse(*args, "--url", url)
        assert done.returncode == 1
        assert done.stderr.count("\n") == 1, done.stderr
        assert f"cannot reach the otfuse API at {url}" in done.stderr
        assert "otfuse serve" in done.stderr
