"""Fixtures for the service tests: tiny parents, a real Redis, a real S3-protocol server over
HTTP (moto in server mode), and app factories for the embedded and distributed modes."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/factories.py

from factories import image_data, save, tiny_vit

REPO = Path(__file__).resolve().parents[2]


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


@pytest.fixture(scope="session")
def parents(tmp_path_factory):
    """Two tiny random ViTs and a labelled image file."""
    root = tmp_path_factory.mktemp("parents")
    return {
        "root": root,
        "models": [save(tiny_vit(seed=s), root / f"vit-{s}") for s in (0, 1)],
        "data": image_data(root / "images.safetensors"),
    }


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A Redis of our own on a free port (or OTFUSE_TEST_REDIS_URL)."""
    if os.environ.get("OTFUSE_TEST_REDIS_URL"):
        yield os.environ["OTFUSE_TEST_REDIS_URL"]
        return
    binary = shutil.which("redis-server")
    if not binary:
        pytest.skip("needs redis-server on PATH or OTFUSE_TEST_REDIS_URL")
    import redis

    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)

    def up():
        try:
            return client.ping()
        except redis.ConnectionError:
            return False

    wait_for(up, 10, "redis-server")
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 in server mode, over HTTP on a free port."""
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def prefix():
    return f"t{uuid.uuid4().hex[:8]}:"
