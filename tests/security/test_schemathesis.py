"""schemathesis against the running app: `otfuse serve` as a process (embedded worker, S3 over
HTTP with the models the OpenAPI examples name), authenticated, fuzzed from openapi.yaml's
own schema. Bounded and seeded, so CI is repeatable: at least 500 cases, no 5xx, responses
conforming to the documented status codes, content types, headers and schemas."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import boto3
from helpers import REPO, free_port, start_server, stop_process

CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
)
MIN_CASES = 500


def test_schemathesis_finds_no_server_errors_and_no_nonconforming_responses(
    tmp_path, parents, s3_endpoint
):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    for bucket in ("fuzz-models", "fuzz-out"):
        s3.create_bucket(Bucket=bucket)
    for seed, folder in enumerate(parents["models"]):
        for file in folder.iterdir():
            s3.upload_file(str(file), "fuzz-models", f"vit-seed{seed}/{file.name}")
    port = free_port()
    env = {
        "OTFUSE_DATA_DIR": str(tmp_path / "svc"),
        "OTFUSE_FILE_ROOTS": str(parents["root"]),
        "OTFUSE_API_KEYS": "key-schemathesis:fuzz",
        "OTFUSE_S3_ENDPOINT_URL": s3_endpoint,
        "OTFUSE_BUCKET": "fuzz-out",
        "OTFUSE_ALLOWED_BUCKETS": "fuzz-out,fuzz-models,models",
        "OTFUSE_SUBMIT_RATE": "10000",
        "OTFUSE_SUBMIT_BURST": "10000",
        "OTFUSE_MAX_QUEUED_PER_TENANT": "100000",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }
    server = start_server(env, port, tmp_path / "server.log")
    report = tmp_path / "report.json"
    st = shutil.which("st", path=str(REPO / ".venv" / "bin")) or [
        sys.executable,
        "-m",
        "schemathesis.cli",
    ]
    command = [
        *([st] if isinstance(st, str) else st),
        "run",
        f"http://127.0.0.1:{port}/openapi.json",
    ]
    command += ["-H", "Authorization: Bearer key-schemathesis", "-n", "100", "--seed", "7"]
    command += ["--checks", ",".join(CHECKS), "--no-color"]
    command += [
        "--generation-database",
        "none",
        "--report",
        "json",
        "--report-json-path",
        str(report),
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    finally:
        stop_process(server)
    assert report.is_file(), done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(report.read_text())
    summary = done.stdout[-4000:]
    assert result["test_cases"]["generated"] >= MIN_CASES, summary
    assert result["failures"] == [] and result["errors"] == [], summary
    assert done.returncode == 0, summary
    server_log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in server_log, server_log[-3000:]
