"""Fixtures every suite may use: tiny parents, digits parents trained once, a real Redis and
a real S3-protocol server over HTTP (moto in server mode)."""

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # factories, helpers, held_worker

import pytest
import transformers
from factories import image_data, save, tiny_vit
from helpers import free_port, wait_for

transformers.utils.logging.disable_progress_bar()


@pytest.fixture(scope="session")
def digits_parents(tmp_path_factory):
    """Two small ViTs trained on digits from different seeds (trained once per session)."""
    from otfuse.digits import load_digits_splits, save_model, save_split, train_vit

    root = tmp_path_factory.mktemp("digits")
    splits = load_digits_splits()
    parents = [save_model(train_vit(seed, splits, epochs=25), root / f"p{seed}") for seed in (0, 1)]
    return {
        "parents": parents,
        "test": save_split(splits.test, root / "test.safetensors"),
        "calib": save_split(splits.calib, root / "calib.safetensors"),
        "root": root,
    }


@pytest.fixture(scope="session")
def parents(tmp_path_factory):
    """Two tiny random ViTs and a labelled image file."""
    root = tmp_path_factory.mktemp("parents")
    return {
        "root": root,
        "models": [save(tiny_vit(seed=s), root / f"vit-{s}") for s in (0, 1)],
        "data": image_data(root / "images.safetensors"),
    }


def start_redis(folder: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """A redis-server of our own on a free port, keeping its files in `folder`."""
    binary = shutil.which("redis-server")
    if not binary:
        pytest.fail("redis-server is not on PATH (Debian: apt-get install redis-server)")
    import redis

    port = free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder)]
    proc = subprocess.Popen(
        [*command, "--save", "", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)

    def up():
        try:
            return client.ping()
        except redis.ConnectionError:
            return False

    wait_for(up, 10, "redis-server")
    return proc, url


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A Redis of our own on a free port (or OTFUSE_TEST_REDIS_URL)."""
    if os.environ.get("OTFUSE_TEST_REDIS_URL"):
        yield os.environ["OTFUSE_TEST_REDIS_URL"]
        return
    proc, url = start_redis(tmp_path_factory.mktemp("redis"))
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


@pytest.fixture(scope="session")
def char_lm_parents(tmp_path_factory):
    """Two small Llamas (4 query heads reading 2 key/value heads, rotary embeddings) trained
    on the same license texts from different seeds (trained once per session)."""
    from otfuse.charlm import char_splits, save_model, save_split, train_char_lm

    root = tmp_path_factory.mktemp("charlm")
    splits = char_splits()
    parents = [
        save_model(train_char_lm(seed, splits, steps=300), root / f"p{seed}") for seed in (0, 1)
    ]
    return {
        "parents": parents,
        "train": save_split(splits.train, root / "train.safetensors"),
        "calib": save_split(splits.calib, root / "calib.safetensors"),
        "test": save_split(splits.test, root / "test.safetensors"),
    }
