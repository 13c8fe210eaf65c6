"""`otfuse serve`, `otfuse worker`, `otfuse submit`, `otfuse status`: the service from the shell.

With no settings, `serve` is the embedded default (API + in-process worker, local folders,
loopback only). With OTFUSE_REDIS_URL it is the distributed API, and `worker` runs a Celery
worker for it. `submit` and `status` talk to a server at OTFUSE_URL with OTFUSE_API_KEY.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
import time
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8000"
EXIT_INPUT, EXIT_FAILED = 3, 1


class CommandError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(message)
        self.code = code


def add_commands(commands) -> None:
    with_defaults = argparse.ArgumentDefaultsHelpFormatter
    serve = commands.add_parser(
        "serve",
        help="run the REST API (no settings: embedded, with its own worker)",
        description="Run the fusion service. With no OTFUSE_* settings it is the embedded "
        "default: API, job store, queue and worker in this process, results in a local "
        "folder, loopback only. With OTFUSE_REDIS_URL it is the distributed API. Settings "
        "are OTFUSE_* environment variables (README: Service).",
        formatter_class=with_defaults,
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (beyond loopback: keys needed)"
    )
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--log-level", default="info", help="uvicorn's log level")

    worker = commands.add_parser(
        "worker",
        help="run a Celery worker for the distributed service (one per GPU)",
        description="Run one Celery worker process on the `fusion` queue (set "
        "CUDA_VISIBLE_DEVICES to pin it to one GPU). Needs OTFUSE_REDIS_URL.",
        formatter_class=with_defaults,
    )
    worker.add_argument("--log-level", default="INFO", help="Celery's log level")
    worker.add_argument("--name", default=None, help="worker node name (default: host)")

    for name, text in (("submit", "submit a job spec (JSON)"), ("status", "print a job")):
        command = commands.add_parser(
            name, help=text, description=text + ".", formatter_class=with_defaults
        )
        if name == "submit":
            command.add_argument("spec", metavar="SPEC.json", help="job spec file, or - for stdin")
            command.add_argument(
                "--wait", action="store_true", help="poll until it ends (progress on stderr)"
            )
            command.add_argument(
                "--idempotency-key", default=None, help="retries with the same key submit once"
            )
        else:
            command.add_argument("id", metavar="ID")
        command.add_argument(
            "--json", action="store_true", help="print the job record as JSON (default: a summary)"
        )
        command.add_argument(
            "--url", default=os.environ.get("OTFUSE_URL", DEFAULT_URL), help="server URL"
        )
        command.add_argument(
            "--api-key",
            default=os.environ.get("OTFUSE_API_KEY"),
            help="bearer key (default: $OTFUSE_API_KEY)",
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from adapters.settings import Settings

    from .server import build_app

    settings = Settings()
    if not settings.api_keys and not _is_loopback(args.host):
        raise CommandError(
            f"refusing to listen on {args.host} with no API keys: without OTFUSE_API_KEYS "
            "the server is open, so it binds to loopback only",
            EXIT_INPUT,
        )
    print(
        f"otfuse: {settings.mode} service on http://{args.host}:{args.port}"
        + (f" (data in {settings.data_dir})" if settings.mode == "embedded" else ""),
        file=sys.stderr,
    )
    uvicorn.run(build_app(settings), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def worker(args: argparse.Namespace) -> int:
    from adapters.settings import Settings

    if Settings().mode != "distributed":
        raise CommandError(
            "otfuse worker needs OTFUSE_REDIS_URL (the embedded `otfuse serve` runs its own)",
            EXIT_INPUT,
        )
    # A fresh interpreter: `otfuse` itself has imported torch by now, and the worker's forking
    # parent must not carry it (its pool child imports fusion_core and touches CUDA).
    argv = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", "fusion"]
    argv += ["-c", "1", "-P", "prefork", "-l", args.log_level]
    argv += ["-n", args.name] if args.name else []
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)
    return 0  # not reached


def _client(args):
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    return httpx.Client(base_url=args.url, headers=headers, timeout=30)


def _check(response) -> dict:
    if response.status_code >= 400:
        try:
            problem = response.json()
            message = problem.get("detail") or problem.get("title")
        except ValueError:
            message = response.text[:300]
        code = EXIT_INPUT if response.status_code in (401, 404, 409, 422) else EXIT_FAILED
        raise CommandError(f"{response.status_code}: {message}", code)
    return response.json()


def _bar(job: dict, width: int = 30) -> str:
    filled = round(job.get("progress", 0) * width)
    return (
        f"\r[{'#' * filled}{' ' * (width - filled)}] {job.get('progress', 0) * 100:5.1f}% "
        f"{job['status']:<9} {job.get('detail', '')[:60]:<60}"
    )


OUTAGE_PATIENCE = 300.0  # seconds `wait` keeps polling an API that does not answer


def _poll(client, path: str, headers: dict, stream, patience: float = OUTAGE_PATIENCE):
    """GET, riding out an API restart: connection errors and 502/503/504 are retried with
    backoff for up to `patience` seconds."""
    import httpx

    deadline, delay, said = time.monotonic() + patience, 0.25, False
    while True:
        try:
            response = client.get(path, headers=headers)
            if response.status_code not in (502, 503, 504):
                return response
            reason = f"HTTP {response.status_code}"
        except httpx.TransportError as exc:
            reason = type(exc).__name__
        if time.monotonic() > deadline:
            raise CommandError(f"the otfuse API did not answer for {patience:.0f}s ({reason})")
        if not said:
            stream.write(f"\notfuse: the API is not answering ({reason}); still polling\n")
            said = True
        time.sleep(delay)
        delay = min(delay * 2, 5.0)


def wait(client, job: dict, stream=sys.stderr) -> dict:
    """Poll honouring Retry-After, sending the ETag back; draw a progress bar."""
    etag = None
    tty = stream.isatty()
    last = None
    while job["status"] in ("queued", "running"):
        headers = {"If-None-Match": etag} if etag else {}
        response = _poll(client, f"/fusions/{job['id']}", headers, stream)
        if response.status_code != 304:
            job = _check(response)
            etag = response.headers.get("etag")
            line = _bar(job)
            if tty:
                stream.write(line)
            elif line != last:
                stream.write(line.lstrip("\r") + "\n")
            stream.flush()
            last = line
        if job["status"] in ("queued", "running"):
            time.sleep(min(float(response.headers.get("retry-after", 1)), 5) / 4)
    if tty:
        stream.write("\n")
    return job


def submit(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.spec == "-" else Path(args.spec).read_text()
    try:
        spec = json.loads(text)
    except ValueError as exc:
        raise CommandError(f"{args.spec}: not JSON: {exc}", EXIT_INPUT) from None
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
    with _client(args) as client:
        job = _check(client.post("/fusions", json=spec, headers=headers))
        print(f"submitted {job['id']}", file=sys.stderr)
        if args.wait:
            job = wait(client, job)
    print(json.dumps(job, indent=2) if args.json else summary(job))
    if args.wait and job["status"] != "succeeded":
        error = job.get("error") or {}
        print(f"otfuse: job {job['status']}: {error.get('message', '')}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = _check(client.get(f"/fusions/{args.id}"))
    print(json.dumps(job, indent=2) if args.json else summary(job))
    return 0


def summary(job: dict) -> str:
    """A job for people: status, the recipe that ran, the metrics table (parents, ensemble,
    baselines, the published model) and where the artifacts are."""
    lines = [f"job {job['id']} ({job.get('name') or 'unnamed'}): {job['status']}"]
    if job["status"] in ("queued", "running"):
        lines[0] += f", {job.get('progress', 0) * 100:.0f}% ({job.get('detail', '')})"
        lines.append(f"follow it with: otfuse status {job['id']}")
        return "\n".join(lines)
    if job.get("error"):
        stage = f" in {job['stage']}" if job.get("stage") else ""
        lines.append(f"error{stage}: {job['error']['type']}: {job['error']['message']}")
    result = job.get("result") or {}
    metrics = result.get("metrics") or {}
    spec = metrics.get("spec") or {}
    if spec:
        solver = "EMD" if spec.get("solver") == "emd" else f"Sinkhorn reg {spec.get('reg'):g}"
        recipe = f"{spec.get('method', 'ot')}, {spec.get('alignment')} alignment, {solver}"
        recipe += f", residual {spec.get('residual')}, heads {spec.get('heads')}"
        chosen = " (chosen on the calibration data)" if result.get("chosen") else ""
        lines.append(f"recipe: {recipe}{chosen}")
    rows = metrics.get("evaluation") or []
    names = [
        n
        for n in ("accuracy", "loss", "perplexity")
        if any(n in (r.get("metrics") or {}) for r in rows)
    ]
    if rows and names:
        lines.append("")
        lines.append(f"  {'model':<24}" + "".join(f"{n:>12}" for n in names))
        for row in rows:
            mark = " *" if row.get("path") == "." else ""
            if row.get("skipped"):
                lines.append(f"  {row['name'] + mark:<24}  skipped: {row['skipped']}")
                continue
            values = "".join(
                f"{row['metrics'][n]:>12.4f}" if n in row["metrics"] else f"{'':>12}" for n in names
            )
            lines.append(f"  {row['name'] + mark:<24}{values}")
        lines.append("  (* published)")
    if result:
        lines.append("")
        lines.append(f"checkpoint: {result['checkpoint']}")
        lines.append(f"metrics:    {result['metrics_uri']}")
        for label, key in (("report:    ", "report_uri"), ("maps:      ", "transport_maps_uri")):
            if result.get(key):
                lines.append(f"{label} {result[key]}")
    return "\n".join(lines)


def _guard(handler):
    import httpx

    def run(args):
        try:
            return handler(args)
        except CommandError as exc:
            print(f"otfuse: error: {exc}", file=sys.stderr)
            return exc.code
        except httpx.TransportError as exc:  # before OSError: some are both
            url = getattr(args, "url", DEFAULT_URL)
            reason = str(exc).split("] ")[-1].lower() or type(exc).__name__
            print(
                f"otfuse: error: cannot reach the otfuse API at {url}: {reason}; "
                "is `otfuse serve` running (or OTFUSE_URL set)?",
                file=sys.stderr,
            )
            return EXIT_FAILED
        except OSError as exc:  # an unreadable spec file
            print(f"otfuse: error: {exc}", file=sys.stderr)
            return EXIT_FAILED

    return run


HANDLERS = {
    "serve": _guard(serve),
    "worker": _guard(worker),
    "submit": _guard(submit),
    "status": _guard(status),
}


# -- the README's main job: the embedded service end to end ----------------------------------
def run_service_demo(workdir: Path, port: int, epochs: int = 40) -> dict:
    """Start the embedded service, submit OT and vanilla fusions of two digits ViTs (trained
    once, cached in `workdir`, shared with `otfuse demo`), wait, print the metrics."""
    import subprocess

    import httpx

    workdir = workdir.resolve()
    data_dir = workdir / "service"
    env = os.environ | {
        "OTFUSE_DATA_DIR": str(data_dir),
        "OTFUSE_FILE_ROOTS": str(workdir),
    }
    for name in ("OTFUSE_REDIS_URL", "OTFUSE_API_KEYS", "OTFUSE_BUCKET"):
        env.pop(name, None)
    url = f"http://127.0.0.1:{port}"
    print(f"$ otfuse serve --port {port}   (embedded; data in {data_dir})", file=sys.stderr)
    server = subprocess.Popen(
        [sys.executable, "-m", "otfuse", "serve", "--port", str(port), "--log-level", "warning"],
        env=env,
    )
    try:
        parents, test, calib = _digits_parents(workdir, epochs)
        client = httpx.Client(base_url=url, timeout=30)
        deadline = time.monotonic() + 120
        while True:
            try:
                if client.get("/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise CommandError("the embedded service did not start")
            time.sleep(0.2)
        jobs = {}
        # OT as a user gets it by default: calibration images and no policy, so the job
        # searches the recipe (and the anchor) on them; the test images only score it.
        data = {"eval": f"file://{test}"}
        ot = {"data": data | {"calibration": f"file://{calib}"}}
        for name, extra in (("ot", ot), ("vanilla", {"method": "vanilla", "data": data})):
            spec = {
                "models": [f"file://{p}" for p in parents],
                "name": f"digits-{name}",
                **extra,
            }
            (workdir / f"job-{name}.json").write_text(json.dumps(spec, indent=2) + "\n")
            print(f"$ otfuse submit {workdir / f'job-{name}.json'} --wait", file=sys.stderr)
            job = wait(client, _check(client.post("/fusions", json=spec)))
            if job["status"] != "succeeded":
                raise CommandError(f"job {job['id']} {job['status']}: {job.get('error')}")
            jobs[name] = job
    finally:
        server.terminate()
        server.wait(30)

    ot = jobs["ot"]["result"]["metrics"]
    ensemble = next(r["metrics"] for r in ot["evaluation"] if r["kind"] == "ensemble")
    rows = [(f"parent-{i}", p) for i, p in enumerate(ot["parents"])]
    rows += [
        ("ensemble", ensemble),  # two models' cost: what one fused model competes with
        ("vanilla", jobs["vanilla"]["result"]["metrics"]["fused"]),
        ("ot", ot["fused"]),
    ]
    print(f"\n{'model':<12} {'accuracy':>9} {'loss':>8}")
    for name, m in rows:
        print(f"{name:<12} {m['accuracy']:>9.4f} {m['loss']:>8.3f}")
    checkpoint = jobs["ot"]["result"]["checkpoint"]
    chosen = jobs["ot"]["result"].get("chosen")
    if chosen:
        solver = "EMD" if chosen["solver"] == "emd" else f"Sinkhorn {chosen['reg']:g}"
        print(
            f"\nOT recipe, searched on the calibration images: anchor {chosen['anchor']}, "
            f"{chosen['alignment']}, residual {chosen['residual']}, {chosen['heads']} heads, "
            f"{solver}"
        )
    print(
        f"\nOT job {jobs['ot']['id']}: fusion {ot['fusion_seconds']:.2f}s, "
        f"job wall {ot['wall_seconds']:.2f}s\nfused checkpoint: {checkpoint}"
    )
    return jobs


def _digits_parents(workdir: Path, epochs: int) -> tuple[list[Path], Path, Path]:
    from .digits import cached_parents

    return cached_parents(workdir, epochs, log=lambda message: print(message, file=sys.stderr))


if __name__ == "__main__":
    demo = argparse.ArgumentParser(description="the embedded service end to end on digits")
    demo.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    demo.add_argument("--port", type=int, default=8765)
    demo.add_argument("--epochs", type=int, default=40)
    options = demo.parse_args()
    try:
        run_service_demo(options.workdir, options.port, options.epochs)
    except CommandError as exc:
        print(f"otfuse: error: {exc}", file=sys.stderr)
        sys.exit(exc.code)
