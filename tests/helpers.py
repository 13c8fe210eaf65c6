"""Helpers the test suites share: ports, polling, the repository root, real processes."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def start_celery_worker(env: dict, log: Path, app: str = "held_worker") -> subprocess.Popen:
    """A real Celery worker process (prefork, one child) for `env`, logging to `log`; returns
    once it is ready."""
    worker_env = os.environ | env | {"PYTHONPATH": f"{TESTS}:{REPO}"}
    command = [sys.executable, "-m", "celery", "-A", app, "worker", "-Q", "fusion"]
    command += ["-c", "1", "-P", "prefork", "-l", "INFO", "-n", f"test-{uuid.uuid4().hex[:6]}@%h"]
    command += ["--without-gossip", "--without-mingle"]
    with log.open("a") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=worker_env, stdout=out, stderr=out)
    try:
        wait_for(lambda: " ready." in log.read_text() or proc.poll() is not None, 120, "worker")
        assert proc.poll() is None, log.read_text()[-3000:]
    except BaseException:
        stop_process(proc)
        raise
    return proc


def stop_process(proc: subprocess.Popen, timeout: float = 20) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # the field after the state is the parent's pid
            found.append(int(stat.parent.name))
    return found


def s3_keys(s3, bucket: str, prefix: str) -> list[str]:
    listing = s3.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in listing.get("Contents", []))


BUCKET, MODELS = "otfuse", "models"  # the output bucket and a read-only source


def settings_from_env(env: dict):
    """The Settings an API process with these OTFUSE_* variables would read."""
    from adapters.settings import Settings

    return Settings(
        **{k.removeprefix("OTFUSE_").lower(): v for k, v in env.items() if k.startswith("OTFUSE_")}
    )


_broker_dbs = iter(range(1, 16))


def distributed_env(redis_url: str, s3_endpoint: str, **overrides: str) -> dict:
    """OTFUSE_* and AWS_* variables of a distributed stack on its own key prefix and its own
    broker database (workers of two stacks must not take each other's messages); two
    tenants, alice and bob."""
    env = {
        "OTFUSE_REDIS_URL": redis_url,
        "OTFUSE_BROKER_URL": redis_url.rsplit("/", 1)[0] + f"/{next(_broker_dbs)}",
        "OTFUSE_S3_ENDPOINT_URL": s3_endpoint,
        "OTFUSE_BUCKET": BUCKET,
        "OTFUSE_ALLOWED_BUCKETS": f"{BUCKET},{MODELS}",
        "OTFUSE_API_KEYS": "key-alice:alice,key-bob-0:bob",
        "OTFUSE_KEY_PREFIX": f"t{uuid.uuid4().hex[:8]}:",
        "OTFUSE_LEASE_SECONDS": "3",
        "OTFUSE_PRESIGN_SECONDS": "600",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    env.update(overrides)
    return env


def seed_buckets(s3, parents: dict) -> None:
    """Both buckets, and the two parents plus their data under s3://models/."""
    for bucket in (BUCKET, MODELS):
        with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
            s3.create_bucket(Bucket=bucket)
    for i, folder in enumerate(parents["models"]):
        for file in folder.iterdir():
            s3.upload_file(str(file), MODELS, f"vit-{i}/{file.name}")
    s3.upload_file(str(parents["data"]), MODELS, "data/images.safetensors")


def start_server(env: dict, port: int, log: Path) -> subprocess.Popen:
    """`otfuse serve` as a process on `port` with `env` (OTFUSE_* variables); returns once
    /healthz answers."""
    import httpx

    full = {k: v for k, v in os.environ.items() if not k.startswith("OTFUSE_")} | env
    with log.open("a") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "otfuse", "serve", "--port", str(port)],
            env=full,
            cwd=REPO,
            stdout=out,
            stderr=out,
        )

    def up():
        if proc.poll() is not None:
            raise AssertionError(f"otfuse serve exited: {log.read_text()[-2000:]}")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, 90, "otfuse serve")
    except BaseException:
        stop_process(proc)
        raise
    return proc


def rss_peak_kib(pid: int) -> int:
    """The process's peak resident memory (VmHWM), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for {pid}")


@contextlib.contextmanager
def worker_stack(env: dict, s3, log: Path):
    """A Celery worker for `env` while the block runs; yields what tests need of the stack."""
    proc = start_celery_worker(env, log)
    try:
        yield {"settings": settings_from_env(env), "s3": s3, "proc": proc, "log": log, "env": env}
    finally:
        stop_process(proc)
