"""The real distributed stack the attacks run against: Redis, S3 over HTTP (moto), a Celery
worker process (with the test hooks of held_worker.py), and the API in this process. Two
tenants: alice (key-alice) and bob (key-bob-0). The worker's per-job download cap is small
(30 MB) so that the cap can be tested with a small object."""

from __future__ import annotations

import boto3
import pytest
from fastapi.testclient import TestClient
from helpers import distributed_env, seed_buckets, worker_stack
from security_stack import INPUT_CAP

from otfuse.server import build_app


@pytest.fixture(scope="session")
def attack_stack(redis_url, s3_endpoint, parents, tmp_path_factory):
    env = distributed_env(redis_url, s3_endpoint, OTFUSE_MAX_INPUT_BYTES=str(INPUT_CAP))
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    seed_buckets(s3, parents)
    with worker_stack(env, s3, tmp_path_factory.mktemp("attack-worker") / "worker.log") as stack:
        yield stack


@pytest.fixture
def api(attack_stack):
    with TestClient(build_app(attack_stack["settings"])) as client:
        yield client
