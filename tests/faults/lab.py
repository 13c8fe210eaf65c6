"""A stack to break on purpose: its own Redis (AOF on, so a restart keeps what was acked),
moto's S3 behind a proxy that can answer 5xx or drop connections, a Celery worker process
with the fault hooks of held_worker.py, and the API (in process, or as `otfuse serve`).

Used by tests/faults/ (each scenario once) and bench/faults.py (each scenario N times, a
table for docs/reliability.md)."""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import redis
from helpers import (
    BUCKET,
    MODELS,
    distributed_env,
    free_port,
    s3_keys,
    seed_buckets,
    settings_from_env,
    start_celery_worker,
    start_server,
    stop_process,
    wait_for,
)

ALICE = {"Authorization": "Bearer key-alice"}
DONE = ("succeeded", "failed", "cancelled")


@dataclass
class ProxyState:
    """What the S3 proxy does to requests that write into the output bucket."""

    mode: str = "pass"  # pass | fail (503) | drop (close the connection)
    after: int = 0  # let this many writes through first
    writes: int = 0  # writes seen
    refused: int = 0  # writes answered 503 or dropped
    lock: threading.Lock = field(default_factory=threading.Lock)

    def verdict(self, method: str, path: str) -> str:
        if method not in ("PUT", "POST") or not path.startswith(f"/{BUCKET}/"):
            return "pass"
        with self.lock:
            self.writes += 1
            if self.mode == "pass" or self.writes <= self.after:
                return "pass"
            self.refused += 1
            return self.mode


def start_s3_proxy(upstream_port: int, state: ProxyState) -> tuple[ThreadingHTTPServer, int]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _forward(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            verdict = state.verdict(self.command, self.path)
            if verdict == "drop":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if verdict == "fail":
                payload = (
                    b"<Error><Code>ServiceUnavailable</Code>"
                    b"<Message>injected fault</Message></Error>"
                )
                self.send_response(503)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
            upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            self.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            upstream.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, port


class Lab:
    def __init__(self, parents: dict, root: Path | None = None):
        self.parents = parents
        self.root = Path(root or tempfile.mkdtemp(prefix="otfuse-faults-"))
        self.proxy_state = ProxyState()
        self.redis_proc: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None
        self.servers: list[subprocess.Popen] = []

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> Lab:
        from moto.server import ThreadedMotoServer

        os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
        self.redis_dir = self.root / "redis"
        self.redis_dir.mkdir(parents=True, exist_ok=True)
        self.redis_port = free_port()
        self._start_redis()
        moto_port = free_port()
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port, verbose=False)
        self.moto.start()
        self.proxy, proxy_port = start_s3_proxy(moto_port, self.proxy_state)
        self.s3 = boto3.client(
            "s3", endpoint_url=f"http://127.0.0.1:{moto_port}", region_name="us-east-1"
        )
        seed_buckets(self.s3, self.parents)
        url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.env = distributed_env(
            url,
            f"http://127.0.0.1:{proxy_port}",
            OTFUSE_BROKER_URL=f"redis://127.0.0.1:{self.redis_port}/1",
            OTFUSE_S3_ATTEMPTS="3",
        )
        self.settings = settings_from_env(self.env)
        self.worker_log = self.root / "worker.log"
        self.worker = start_celery_worker(self.env, self.worker_log)
        return self

    def _start_redis(self) -> None:
        command = [shutil.which("redis-server"), "--port", str(self.redis_port)]
        command += ["--bind", "127.0.0.1", "--dir", str(self.redis_dir), "--save", ""]
        command += ["--appendonly", "yes", "--appendfsync", "always"]
        self.redis_proc = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = redis.Redis(port=self.redis_port)

        def up():
            try:
                return client.ping()
            except redis.ConnectionError:
                return False

        wait_for(up, 20, "redis-server")

    def restart_redis(self, down_seconds: float = 1.0) -> None:
        """A clean restart (SIGTERM: the AOF is flushed), `down_seconds` of outage."""
        self.redis_proc.terminate()
        self.redis_proc.wait(20)
        time.sleep(down_seconds)
        self._start_redis()

    def close(self) -> None:
        for proc in self.servers:
            stop_process(proc)
        if self.worker:
            stop_process(self.worker)
        self.proxy.shutdown()
        self.moto.stop()
        if self.redis_proc:
            self.redis_proc.terminate()
            self.redis_proc.wait(20)

    # -- the API -----------------------------------------------------------------------------
    def client(self):
        from fastapi.testclient import TestClient

        from otfuse.server import build_app

        return TestClient(build_app(self.settings))

    def start_api(self, port: int) -> subprocess.Popen:
        env = self.env | {"OTFUSE_DATA_DIR": str(self.root / "api")}
        proc = start_server(env, port, self.root / "api.log")
        self.servers.append(proc)
        return proc

    # -- jobs --------------------------------------------------------------------------------
    def spec(self, name: str, heal: bool = True) -> dict:
        spec = {
            "models": [f"s3://{MODELS}/vit-0/", f"s3://{MODELS}/vit-1/"],
            "data": {"eval": f"s3://{MODELS}/data/images.safetensors"},
            "name": name,
        }
        if heal:  # every stage: downloading, aligning, evaluating, finetuning, uploading
            spec["data"]["finetune"] = f"s3://{MODELS}/data/images.safetensors"
            spec["finetune"] = {"steps": 3, "batch_size": 8}
        return spec

    def submit(self, client, spec: dict) -> str:
        response = client.post("/fusions", json=spec, headers=ALICE)
        assert response.status_code == 202, response.text
        return response.json()["id"]

    def wait_done(self, client, job_id: str, timeout: float = 180) -> dict:
        def done():
            try:
                job = client.get(f"/fusions/{job_id}", headers=ALICE).json()
            except Exception:  # the store may be restarting
                return None
            return job if job.get("status") in DONE else None

        return wait_for(done, timeout, f"job {job_id} to end", interval=0.2)

    def published(self, job: dict) -> list[str]:
        prefix = job["output"].removeprefix(f"s3://{BUCKET}/")
        return [k.removeprefix(prefix) for k in s3_keys(self.s3, BUCKET, prefix)]

    def leftovers(self) -> list[str]:
        return s3_keys(self.s3, BUCKET, "_otfuse_tmp/")

    def successes_logged(self, job_id: str) -> int:
        return self.worker_log.read_text().count(f"job {job_id}: succeeded")
