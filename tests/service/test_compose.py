"""docker-compose.yml and docker/: validated statically (no Docker engine in CI)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from adapters.settings import Settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"


def example_env() -> dict[str, str]:
    env = {}
    for line in (REPO / "docker" / "env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    return env


def compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


def test_compose_config_is_valid():
    command = compose_command()
    if command is None:
        # CI installs Debian's docker-compose (.ci/run); there a missing client is a failure.
        if os.environ.get("OTFUSE_CI"):
            pytest.fail("docker-compose is not installed; .ci/run should have installed it")
        pytest.skip("neither docker-compose nor the docker compose plugin is installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTFUSE_")} | example_env()
    done = subprocess.run(
        [*command, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    missing = {k: v for k, v in env.items() if k != "REDIS_PASSWORD"}
    done = subprocess.run(
        [*command, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, env=missing
    )
    assert done.returncode != 0 and "REDIS_PASSWORD" in done.stderr  # secrets are required


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load(COMPOSE.read_text())


def test_stack_shape(compose):
    services = compose["services"]
    assert {"redis", "minio", "minio-init", "api", "worker", "flower"} <= set(services)
    redis_cmd = " ".join(services["redis"]["command"])
    for flag in ("--appendonly yes", "--maxmemory-policy noeviction", "--requirepass"):
        assert flag in redis_cmd
    assert services["redis"]["volumes"]
    for name in ("redis", "minio", "flower", "minio-init"):
        image = services[name]["image"]
        assert re.search(r":[\w.\-]+$", image) and not image.endswith(":latest"), image
    init = " ".join(services["minio-init"]["entrypoint"])
    assert "mc mb" in init and "mc admin user add" in init and "policy attach" in init
    for port in services["minio"]["ports"]:
        assert port.startswith("127.0.0.1:"), port  # the S3 API stays off the network
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert services["worker"]["stop_grace_period"] == "2m"  # SIGTERM requeues the running job
    assert "FLOWER_BASIC_AUTH" in services["flower"]["environment"]
    assert services["flower"]["ports"][0].startswith("127.0.0.1:")
    for name in ("redis", "minio", "api", "worker"):
        assert services[name]["healthcheck"]["test"], name
    for name in ("api", "worker"):
        depends = services[name]["depends_on"]
        assert depends["redis"]["condition"] == "service_healthy"
        assert depends["minio"]["condition"] == "service_healthy"
        assert depends["minio-init"]["condition"] == "service_completed_successfully"


def test_api_and_worker_share_settings_and_visibility_timeout(compose):
    services = compose["services"]
    api, worker = services["api"]["environment"], services["worker"]["environment"]
    assert api == worker
    env = {
        k.removeprefix("OTFUSE_").lower(): v
        for k, v in api.items()
        if k.startswith("OTFUSE_") and "${" not in v
    }
    settings = Settings(**env, redis_url="redis://redis:6379/0")
    assert settings.visibility_timeout > settings.hard_time_limit > settings.soft_time_limit


@pytest.mark.parametrize("name", ["api.Dockerfile", "worker.Dockerfile"])
def test_dockerfiles_copy_what_exists(name):
    text = (REPO / "docker" / name).read_text()
    for source in re.findall(r"^COPY (\S+(?: \S+)*) \S+$", text, re.M):
        for path in source.split():
            assert (REPO / path).exists(), f"{name}: COPY {path} does not exist"
    assert "otfuse" in text.splitlines()[-1]


def test_the_app_uses_its_own_minio_user_not_root(compose):
    env = compose["x-otfuse-env"]
    assert "MINIO_APP_USER" in env["AWS_ACCESS_KEY_ID"]
    assert "MINIO_APP_PASSWORD" in env["AWS_SECRET_ACCESS_KEY"]
    assert "ROOT" not in env["AWS_ACCESS_KEY_ID"] + env["AWS_SECRET_ACCESS_KEY"]
    policy = compose["services"]["minio-init"]["environment"]["APP_POLICY"]
    import json

    statements = json.loads(policy)["Statement"]
    writable = {r for s in statements if "s3:PutObject" in s["Action"] for r in s["Resource"]}
    assert writable == {"arn:aws:s3:::otfuse/*"}  # models/ is read-only for the app


def run_preflight(compose, env: dict) -> subprocess.CompletedProcess:
    """The preflight service's script, as compose would run it ($$ is a literal $)."""
    script = compose["services"]["preflight"]["entrypoint"][2].replace("$$", "$")
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=env)


def test_preflight_refuses_placeholder_and_short_secrets(compose):
    done = run_preflight(compose, example_env())
    assert done.returncode != 0
    for name in ("REDIS_PASSWORD", "MINIO_ROOT_PASSWORD", "MINIO_APP_PASSWORD", "OTFUSE_API_KEYS"):
        assert f"{name} still holds a placeholder" in done.stdout
    strong = {
        "REDIS_PASSWORD": "kP9vX2qL8wZ4rT6y",
        "MINIO_ROOT_PASSWORD": "Hn3bV7mC1xQ5sD8f",
        "MINIO_APP_PASSWORD": "Gy6tR2eW9uI4oP1a",
        "OTFUSE_API_KEYS": "Jk8hG5fD2sA7lZ3x:team-a",
        "FLOWER_BASIC_AUTH": "admin:Bn4mV8cX1zQ6wE9r",
    }
    assert run_preflight(compose, strong).returncode == 0
    short = strong | {"REDIS_PASSWORD": "short"}
    done = run_preflight(compose, short)
    assert done.returncode != 0 and "REDIS_PASSWORD is shorter" in done.stdout


def test_every_service_waits_for_the_preflight(compose):
    for name in ("redis", "minio"):
        assert compose["services"][name]["depends_on"]["preflight"]["condition"] == (
            "service_completed_successfully"
        )


def test_the_api_image_installs_no_torch():
    text = (REPO / "docker" / "api.Dockerfile").read_text()
    commands = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert not any("torch" in line and "pip install" in line for line in commands)
    assert "pip install --no-deps ." in text and "optional-dependencies']['api']" in text
