"""Benchmark the API on loopback, side by side with the floor for this stack (a bare FastAPI +
async-Redis endpoint returning a 1 KB record, bench/api_floor.py), one uvicorn worker each.

Measures: GET /fusions/{id} (bearer auth, ETag) closed-loop throughput vs the floor's;
p50/p99 at 200 req/s offered (hey -q, rate-limited workers); POST /fusions throughput; time
from submit to `running` with an idle Celery worker; service overhead per job (wall time minus
fusion time) for a small pair over S3 (moto server). Starts everything it needs: redis-server,
moto, two uvicorns, a Celery worker. Needs `hey` on PATH.

    python bench/api_bench.py [--requests 20000] [--jobs 8]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
KEY = "bench-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout=60, what="service"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


def hey(url: str, *args: str) -> dict:
    out = subprocess.run(["hey", *args, url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    pct = {
        p: float(v) * 1000
        for p, v in re.findall(r"(\d+)%% in ([\d.]+) secs".replace("%%", "%"), out)
    }
    codes = dict(re.findall(r"\[(\d+)\]\s+(\d+) responses", out))
    return {"rps": rps, "p50_ms": pct.get("50"), "p99_ms": pct.get("99"), "codes": codes}


def cpu_per_request(env: dict, job_id: str, redis_url: str, n: int = 5000) -> tuple[float, float]:
    """CPU microseconds per GET (median of 5 rounds) for the API and the floor, called as
    ASGI apps in this process against the same Redis: the share of each request that is
    Python, without the network and the load generator, which on a busy 2-core machine make
    closed-loop throughput swing by 20% between rounds."""
    import asyncio

    import redis

    os.environ.update({k: v for k, v in env.items() if k.startswith(("OTFUSE_", "BENCH_"))})
    sys.path[:0] = [str(REPO), str(REPO / "bench")]
    import api_floor

    from adapters.queue import Queue
    from adapters.settings import Settings
    from service.app import create_app

    app = create_app(Settings(), queue=Queue())
    raw = app.state.store.get_raw(job_id)
    redis.Redis.from_url(redis_url).set("floor:r1", raw)  # the same bytes from both
    auth = [(b"authorization", f"Bearer {KEY}".encode())]

    def scope(path: str, headers: list) -> dict:
        return {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "GET", "scheme": "http", "path": path, "raw_path": path.encode(),
            "query_string": b"", "root_path": "", "headers": headers,
            "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
        }  # fmt: skip

    async def call(target, request_scope) -> int:
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        await target(request_scope, receive, send)
        return sent[0]["status"]

    async def rounds(target, request_scope) -> float:
        assert await call(target, request_scope) == 200
        per_round = []
        for _ in range(5):
            started = time.process_time()
            for _ in range(n // 5):
                await call(target, request_scope)
            per_round.append((time.process_time() - started) / (n // 5) * 1e6)
        return statistics.median(per_round)

    async def both() -> tuple[float, float]:
        floor = await rounds(api_floor.app, scope("/records/r1", []))
        api = await rounds(app, scope(f"/fusions/{job_id}", auth))
        return api, floor

    return asyncio.run(both())


def stamp(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def make_parents(folder: Path) -> tuple[list[Path], Path]:
    """Two small ViTs of the digits shape (random init: timings only) and a data file."""
    import torch
    import transformers

    from otfuse.digits import load_digits_splits, save_split, vit_config

    parents = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = transformers.ViTForImageClassification(vit_config())
        model.save_pretrained(str(folder / f"parent-{seed}"))
        parents.append(folder / f"parent-{seed}")
    return parents, save_split(load_digits_splits().test, folder / "test.safetensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=10, help="open-loop run length")
    args = parser.parse_args()
    if not shutil.which("hey") or not shutil.which("redis-server"):
        raise SystemExit("needs hey and redis-server on PATH")

    import boto3
    from moto.server import ThreadedMotoServer

    tmp = Path(tempfile.mkdtemp(prefix="otfuse-bench-"))
    procs: list[subprocess.Popen] = []
    redis_port, s3_port, api_port, floor_port = (free_port() for _ in range(4))
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    procs.append(
        subprocess.Popen(
            ["redis-server", "--port", str(redis_port), "--save", "", "--dir", str(tmp)],
            stdout=subprocess.DEVNULL,
        )
    )
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port, verbose=False)
    moto.start()
    aws = {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    os.environ.update(aws)
    env = (
        os.environ
        | aws
        | {
            "OTFUSE_REDIS_URL": redis_url,
            "OTFUSE_S3_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
            "OTFUSE_BUCKET": "bench",
            "OTFUSE_API_KEYS": f"{KEY}:bench",
            # throughput, not the per-tenant quotas, is measured here
            "OTFUSE_SUBMIT_RATE": "1000000",
            "OTFUSE_SUBMIT_BURST": "1000000",
            "OTFUSE_MAX_QUEUED_PER_TENANT": "1000000",
            "BENCH_REDIS_URL": redis_url,
            "PYTHONPATH": str(REPO),
            "TRANSFORMERS_VERBOSITY": "error",
        }
    )
    uvicorn = [sys.executable, "-m", "uvicorn", "--workers", "1", "--no-access-log"]
    uvicorn += ["--log-level", "warning", "--host", "127.0.0.1"]
    procs.append(
        subprocess.Popen(
            [*uvicorn, "--factory", "service.app:create_app", "--port", str(api_port)],
            env=env,
            cwd=REPO,
        )
    )
    procs.append(
        subprocess.Popen(
            [
                *uvicorn,
                "--app-dir",
                str(REPO / "bench"),
                "api_floor:app",
                "--port",
                str(floor_port),
            ],
            env=env,
            cwd=REPO,
        )
    )
    worker = subprocess.Popen(
        [
            *(sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", "fusion"),
            *("-c", "1", "-P", "prefork", "--without-gossip", "--without-mingle", "-l", "WARNING"),
        ],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
    )
    procs.append(worker)
    api = f"http://127.0.0.1:{api_port}"
    auth = {"Authorization": f"Bearer {KEY}"}
    results: dict = {}
    try:
        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{s3_port}")
        s3.create_bucket(Bucket="bench")
        parents, test = make_parents(tmp)
        for i, folder in enumerate(parents):
            for file in folder.iterdir():
                s3.upload_file(str(file), "bench", f"models/p{i}/{file.name}")
        s3.upload_file(str(test), "bench", "data/test.safetensors")
        client = httpx.Client(base_url=api, headers=auth, timeout=30)
        wait_for(lambda: client.get("/readyz").status_code == 200, what="the API")
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{floor_port}/docs").status_code == 200)
        time.sleep(5)  # the worker child imports fusion_core at start

        # -- jobs: submit -> running, and overhead = wall - fusion ------------------------
        spec = {"models": ["s3://bench/models/p0/", "s3://bench/models/p1/"]}
        for label, body in (
            ("no eval data", spec),
            ("with eval data", spec | {"data": {"eval": "s3://bench/data/test.safetensors"}}),
        ):
            to_running, overhead, fusion = [], [], []
            for _ in range(args.jobs):
                job = client.post("/fusions", json=body).json()
                while job["status"] in ("queued", "running"):
                    time.sleep(0.02)
                    job = client.get(f"/fusions/{job['id']}").json()
                assert job["status"] == "succeeded", job
                created = stamp(job["created_at"])
                to_running.append((stamp(job["started_at"]) - created) * 1000)
                wall = stamp(job["finished_at"]) - created
                fusion.append(job["result"]["metrics"]["fusion_seconds"])
                overhead.append(wall - fusion[-1])
            results[f"jobs ({label})"] = {
                "submit_to_running_ms_median": round(statistics.median(to_running), 1),
                "submit_to_running_ms_max": round(max(to_running), 1),
                "fusion_s_median": round(statistics.median(fusion), 3),
                "overhead_s_median": round(statistics.median(overhead), 3),
                "overhead_s_max": round(max(overhead), 3),
            }
            print(label, results[f"jobs ({label})"], file=sys.stderr)
        done_id = job["id"]

        # -- GET: closed-loop max throughput and open-loop latency, side by side ----------
        import redis

        record = json.dumps({"id": "x" * 24, "pad": "y" * 950})
        redis.Redis.from_url(redis_url).set("floor:r1", record)
        floor_url = f"http://127.0.0.1:{floor_port}/records/r1"
        api_url = f"{api}/fusions/{done_id}"
        size = len(client.get(f"/fusions/{done_id}").content)
        bearer = ["-H", f"Authorization: Bearer {KEY}"]
        closed = ["-n", str(args.requests), "-c", str(args.concurrency)]
        rate = ["-z", f"{args.seconds}s", "-c", "10", "-q", "20"]  # 10 workers x 20/s = 200/s
        for round_ in (1, 2):
            results[f"GET closed loop, floor (round {round_})"] = hey(floor_url, *closed)
            results[f"GET closed loop, API (round {round_})"] = hey(api_url, *closed, *bearer)
        results["GET 200 req/s offered, floor"] = hey(floor_url, *rate)
        results["GET 200 req/s offered, API"] = hey(api_url, *rate, *bearer)
        etag = client.get(f"/fusions/{done_id}").headers["etag"]
        results["GET closed loop, API, If-None-Match (304)"] = hey(
            api_url, *closed, *bearer, "-H", f"If-None-Match: {etag}"
        )

        # -- POST throughput (worker stopped: jobs stay queued) ---------------------------
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)
        body_file = tmp / "body.json"
        body_file.write_text(json.dumps(spec))
        results["POST /fusions closed loop"] = hey(
            f"{api}/fusions",
            "-n", str(max(args.requests // 10, 500)),
            "-c", "16",
            "-m", "POST",
            "-T", "application/json",
            "-D", str(body_file),
            *bearer,
        )  # fmt: skip
        floor_rps = max(results[f"GET closed loop, floor (round {r})"]["rps"] for r in (1, 2))
        api_rps = max(results[f"GET closed loop, API (round {r})"]["rps"] for r in (1, 2))
        api_cpu, floor_cpu = cpu_per_request(env, done_id, redis_url)
        results["summary"] = {
            "job record bytes": size,
            "GET API/floor throughput": round(api_rps / floor_rps, 3),
            "CPU us per GET, in process: API": round(api_cpu, 1),
            "floor": round(floor_cpu, 1),
            "floor/API": round(floor_cpu / api_cpu, 3),
            "cpus": os.cpu_count(),
        }
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        moto.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    print("\n| measurement | req/s | p50 ms | p99 ms | codes |\n|---|---|---|---|---|")
    for name, r in results.items():
        if "rps" in r:
            print(
                f"| {name} | {r['rps']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                f"{', '.join(f'{k}: {v}' for k, v in r['codes'].items())} |"
            )
    for name, r in results.items():
        if "rps" not in r:
            print(f"\n{name}: " + ", ".join(f"{k} = {v}" for k, v in r.items()))


if __name__ == "__main__":
    main()
