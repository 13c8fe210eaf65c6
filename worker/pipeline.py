"""The job pipeline: download -> fusion_core.fuse_job (sweep, baselines, finetune,
artifacts) -> publish -> record.

Plain Python, called by the Celery task and by the embedded worker alike. A lease in the job
store keeps two deliveries of one job from running at once; a heartbeat renews it. Cancel is
cooperative: fusion_core polls `should_cancel` at each layer boundary and finetune step, and
the pipeline checks between stages. Publishing is atomic and idempotent (storage.publish, then
the record).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path

from adapters.access import Access
from adapters.jobspec import DATA_FIELDS, check_spec
from adapters.storage import (
    JOB_FILE,
    METRICS_FILE,
    StorageError,
    StoredFile,
    TransferCancelled,
    UnsafeInput,
    join,
)
from adapters.store import DONE, JobStore, finish, now_iso
from fusion_core.contract import (
    JobSpec,
    as_job_error,
    finetune_config,
    fusion_spec,
    parse_job,
    regs_argument,
    search_space,
)
from fusion_core.progress import Progress

log = logging.getLogger("otfuse.worker")

# Overall progress at the start and end of each stage, for a plain fusion; `stage_spans`
# sizes them for the job at hand (sweep points, eval data, finetune runs).
STAGE_SPAN = {
    "downloading": (0.0, 0.05),
    "aligning": (0.05, 0.8),
    "evaluating": (0.8, 0.95),
    "finetuning": (0.95, 0.95),
    "uploading": (0.95, 1.0),
}
UPDATE_EVERY = 0.2  # seconds between progress writes to the job store
DEFER_SECONDS = 2.0  # a job whose tenant has all its running slots is delivered again after
# fuse_job's stages -> the job record's ("writing" metrics.json and the report is the first
# part of publishing)
STAGES = {
    "search": "aligning",  # the recipe search fuses candidates: the record's aligning stage
    "aligning": "aligning",
    "evaluating": "evaluating",
    "finetuning": "finetuning",
    "writing": "uploading",
}


def stage_spans(points: int, evaluated: bool, finetune_runs: int) -> dict[str, tuple]:
    """Progress spans in proportion to rough costs: a fusion per recipe searched, the models
    scored on eval data, a finetune per run (the fused model and each baseline)."""
    weights = {
        "aligning": 1.0 * points,
        "evaluating": 0.5 if evaluated else 0.05,
        "finetuning": 2.0 * finetune_runs,
    }
    total = sum(weights.values())
    spans, low = {"downloading": (0.0, 0.05)}, 0.05
    for stage, weight in weights.items():
        high = low + 0.9 * weight / total
        spans[stage] = (round(low, 4), round(high, 4))
        low = high
    spans["uploading"] = (0.95, 1.0)
    return spans


def inline_metrics(document: dict) -> dict:
    """metrics.json for the job record: without the per-step finetune curves and the
    per-plan diagnostics, which can be large (the full document is at metrics_uri)."""
    small = copy.deepcopy(document)
    small.pop("plans", None)
    for run in (small.get("finetune") or {}).get("runs", []):
        run.pop("losses", None)
        run.pop("lr", None)
    return small


def path_rewriter(paths: dict[str, str]):
    """A function that replaces, in one pass, each local path by the URI users sent."""
    if not paths:
        return lambda text: text
    ordered = sorted(paths, key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(p) for p in ordered))
    targets = {p: paths[p].rstrip("/") for p in ordered}
    return lambda text: pattern.sub(lambda m: targets[m.group(0)], text)


class Stop(Exception):
    """Cancelled by the user, or the worker is shutting down."""


class LeaseLost(Exception):
    """Another delivery owns the job now; leave its record alone."""


class JobFailed(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class Heartbeat(threading.Thread):
    """Renews the job's lease, and its tenant's running slot, every third of a lease."""

    def __init__(self, store: JobStore, job_id: str, token: str, seconds: float, tenant: str):
        super().__init__(daemon=True, name=f"lease-{job_id}")
        self.store, self.job_id, self.token, self.seconds = store, job_id, token, seconds
        self.tenant = tenant
        self.stopped = threading.Event()
        self.lost = threading.Event()

    def run(self):
        while not self.stopped.wait(self.seconds / 3):
            try:
                if not self.store.renew_lease(self.job_id, self.token, self.seconds):
                    self.lost.set()
                    return
                self.store.renew_slot(self.tenant, self.job_id, self.seconds)
            except Exception:  # a store blip: try again at the next beat
                log.warning("lease renewal of %s failed", self.job_id, exc_info=True)


class Run:
    """One delivery of one job."""

    def __init__(self, job_id, store, storage, settings, stopping: threading.Event | None):
        self.job_id, self.store, self.storage, self.settings = job_id, store, storage, settings
        self.stopping = stopping or threading.Event()
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.stage: str | None = None
        self.spans = dict(STAGE_SPAN)
        self.finetune_names: list[str] = ["fused"]
        self.stage_started = time.perf_counter()
        self.stage_seconds: dict[str, float] = {}
        self.last_write = 0.0
        self.last_poll = 0.0
        self.shown_progress = 0.0
        self.cancel_seen = False
        self.heartbeat: Heartbeat | None = None
        self.local_paths: dict[str, str] = {}  # downloaded copy -> its URI, for error messages

    # -- record updates -------------------------------------------------------------------
    def _set(self, **fields) -> dict | None:
        """Best effort: while the job store is unreachable (a Redis restart) the job goes
        on; its lease decides whether it may finish."""

        def change(job):
            if job["status"] != "running":
                return None
            job.update(fields)
            return job

        try:
            return self.store.update(self.job_id, change)
        except Exception:
            log.warning("job %s: progress not recorded (job store unreachable)", self.job_id)
            return None

    def enter(self, stage: str, detail: str) -> None:
        self.check()
        self._close_stage()
        self.stage, self.stage_started = stage, time.perf_counter()
        self.shown_progress = max(self.shown_progress, self.spans[stage][0])
        self._set(stage=stage, progress=self.shown_progress, detail=detail, position=None)
        self.last_write = time.perf_counter()

    def _close_stage(self) -> None:
        if self.stage:
            seconds = time.perf_counter() - self.stage_started
            self.stage_seconds[self.stage] = self.stage_seconds.get(self.stage, 0) + seconds
            try:
                self.store.observe_stage(self.stage, seconds)
            except Exception:
                log.warning("could not record stage duration", exc_info=True)
            self.stage = None

    def progress(
        self, fraction: float, detail: str, force: bool = False, position: dict | None = None
    ) -> None:
        """Overall progress from the fraction done of the current stage; `position` is the
        event's typed fields (unit, step, total, point, points, run), kept in the record."""
        now = time.perf_counter()
        if not force and now - self.last_write < UPDATE_EVERY:
            return
        low, high = self.spans[self.stage]
        overall = round(low + (high - low) * min(max(fraction, 0), 1), 4)
        # Never back: a stage's parts (activations, then the layers) each count from zero.
        self.shown_progress = max(self.shown_progress, overall)
        self._set(progress=self.shown_progress, detail=detail, position=position)
        self.last_write = now

    # -- cancellation ---------------------------------------------------------------------
    def should_stop(self) -> bool:
        if self.heartbeat and self.heartbeat.lost.is_set():
            return True
        if self.stopping.is_set() or self.cancel_seen:
            return True
        now = time.perf_counter()
        if now - self.last_poll >= 0.25:
            self.last_poll = now
            try:
                job = self.store.get(self.job_id)
            except Exception:  # unreachable store: ask again at the next poll
                return False
            self.cancel_seen = job is None or job.get("cancel_requested", False)
        return self.cancel_seen

    def check(self) -> None:
        self.last_poll = 0.0  # at stage boundaries always ask the store
        if self.should_stop():
            raise Stop()

    # -- the run --------------------------------------------------------------------------
    def start(self) -> dict | None:
        """Claim the job. None when there is nothing to run (ended, cancelled, given up)."""
        settings = self.settings
        started = []

        def change(job):
            if job["status"] in DONE:
                return None
            if job.get("cancel_requested"):
                return finish(job, "cancelled", detail="cancelled before it ran")
            job["attempts"] = job.get("attempts", 0) + 1
            if job["attempts"] > settings.max_attempts:
                return finish(
                    job,
                    "failed",
                    error=(
                        "worker_lost",
                        f"gave up after {settings.max_attempts} attempts: the worker running "
                        f"it was lost or killed (hard time limit {settings.hard_time_limit}s)",
                    ),
                )
            job.update(
                status="running",
                stage="downloading",
                progress=0.0,
                detail="starting",
                started_at=job.get("started_at") or now_iso(),
                error=None,
            )
            started.append(True)
            return job

        job = self.store.update(self.job_id, change)
        return job if started else None

    def __call__(self) -> str:
        """ "deferred" means: the tenant has its maximum of jobs running; deliver it again
        in a few seconds (the caller does)."""
        seconds = self.settings.lease_seconds
        if not self.store.acquire_lease(self.job_id, self.token, seconds):
            log.info("job %s is leased by another worker; skipping this delivery", self.job_id)
            return "leased-elsewhere"
        record = self.store.get(self.job_id) or {}
        tenant = record.get("tenant", "")
        wants_to_run = record.get("status") not in DONE and not record.get("cancel_requested")
        limit = self.settings.max_running_per_tenant
        if wants_to_run and not self.store.acquire_slot(tenant, self.job_id, limit, seconds):
            self.store.release_lease(self.job_id, self.token)
            self._waiting(limit)
            return "deferred"
        self.heartbeat = Heartbeat(self.store, self.job_id, self.token, seconds, tenant)
        self.heartbeat.start()
        try:
            job = self.start()
            if job is None:
                return "skipped"
            return self._run(job)
        finally:
            self.heartbeat.stopped.set()
            self._close_stage()
            self.store.release_slot(tenant, self.job_id)
            self.store.release_lease(self.job_id, self.token)

    def _waiting(self, limit: int) -> None:
        detail = f"waiting: {limit} of this tenant's jobs are running (the most at once)"

        def change(job):
            if job["status"] != "queued" or job.get("detail") == detail:
                return None
            job["detail"] = detail
            return job

        self.store.update(self.job_id, change)

    def _run(self, job: dict) -> str:
        started = time.perf_counter()
        output = job["output"]
        try:
            with tempfile.TemporaryDirectory(prefix=f"otfuse-{self.job_id}-") as tmp:
                work = Path(tmp)
                previous = self._output_state(output)
                if previous is not None:  # a crashed delivery published; record it once
                    names = self.storage.backend(output).list_names(output)
                    return self._succeed(job, previous, output, names)
                result, metrics = self._fuse(job, work, started)
                if self.stage == "uploading":  # fuse_job wrote its artifacts in this stage
                    self.check()
                    self.progress(0.5, "uploading the fused checkpoint", force=True)
                else:
                    self.enter("uploading", "uploading the fused checkpoint")
                backend = self.storage.backend(output)
                # A failed publish removes what it copied; once it returns, a later delivery
                # records the result (metrics.json names this job), so nothing is undone.
                names = backend.publish(result, output, self.job_id, job["attempts"])
                return self._succeed(job, metrics, output, names)
        except Exception as exc:
            return self._fail(exc)

    def _output_state(self, output: str) -> dict | None:
        """metrics.json of this job when a previous delivery already published; raises when
        the prefix holds someone else's files."""
        backend = self.storage.backend(output)
        names = backend.list_names(output)
        if not names:
            return None
        metrics = backend.read_json(join(output, METRICS_FILE)) if METRICS_FILE in names else None
        if metrics and metrics.get("job_id") == self.job_id:
            return metrics
        owner = backend.read_json(join(output, JOB_FILE)) if JOB_FILE in names else None
        if owner and owner.get("job_id") == self.job_id:
            return None  # a partial copy of ours: publishing again overwrites it
        raise JobFailed(
            "output_not_empty",
            f"output {output} already holds {len(names)} files of another job; "
            "choose an empty prefix",
        )

    def _fuse(self, job: dict, work: Path, started: float) -> tuple[Path, dict]:
        import transformers

        import fusion_core

        transformers.utils.logging.disable_progress_bar()  # progress goes to the job record
        # Checked again with this worker's settings: its roots and buckets are what count
        # here, and a path may have changed since submit (a swapped symlink).
        # The request, not the echoed spec: a field the client left out must stay unset, or
        # every axis of a recipe search would look pinned (records from before it: spec).
        request = job.get("request") or job["spec"]
        spec = check_spec(parse_job(request), self.settings, job["tenant"])
        requested = spec.policy.device
        device = resolve_device(self.settings.device if requested == "auto" else requested)
        fspec = fusion_spec(spec, device)
        finetune = finetune_config(spec, device)
        baselines = tuple(spec.finetune.baselines) if spec.finetune else ()
        self.finetune_names = ["fused", *baselines]
        search = search_space(spec)
        self.spans = stage_spans(
            search.planned(len(spec.models)),
            spec.data.eval is not None,
            len(self.finetune_names) if finetune else 0,
        )
        parents, files = self._stage_inputs(spec, job["tenant"], work)

        out = work / "fused"
        job_started = time.perf_counter()
        result = fusion_core.fuse_job(
            parents,
            out,
            fspec,
            regs=regs_argument(spec),
            search=search,
            data=files.get("activations"),
            eval_data=files.get("eval"),
            calib_data=files.get("calibration"),
            finetune_config=finetune,
            finetune_data=files.get("finetune"),
            finetune_baselines=baselines,
            save_maps=spec.artifacts.transport_maps,
            report=spec.artifacts.report,
            progress=self._on_event,
            should_cancel=self.should_stop,
            allow_pickle=self.settings.allow_pickle,
            limits=self.settings.limits,
            names={path: uri.rstrip("/") for path, uri in self.local_paths.items()},
            extra_metrics=self._service_metrics(spec, device, started, job_started),
        )
        out = Path(result.out)
        metrics = result.metrics
        as_run = {
            "job_id": self.job_id,
            "tenant": job["tenant"],
            "spec": job["spec"],
            "request": job.get("request"),
            "fusion_spec": metrics.get("spec") or fspec.to_dict(),  # as published (chosen)
            "finetune": finetune.to_dict() if finetune else None,
            "attempt": job["attempts"],
            "created": now_iso(),
        }
        (out / JOB_FILE).write_text(json.dumps(as_run, indent=2) + "\n")
        return out, metrics

    def _service_metrics(self, spec: JobSpec, device: str, started: float, job_started: float):
        """The service's fields of metrics.json, computed when fuse_job writes it."""

        def fields(document: dict) -> dict:
            stages = dict(self.stage_seconds)  # so far; "uploading" goes on after this
            if self.stage:
                running = time.perf_counter() - self.stage_started
                stages[self.stage] = stages.get(self.stage, 0) + running
            return {
                **self._summary(document, spec),
                "job_id": self.job_id,
                "fusion_seconds": round(document.get("seconds", {}).get("fusion", 0.0), 3),
                "job_seconds": round(time.perf_counter() - job_started, 3),
                "wall_seconds": round(time.perf_counter() - started, 3),
                "stages": {k: round(v, 3) for k, v in stages.items()},
                "device": device,
            }

        return fields

    def _stage_inputs(
        self, spec: JobSpec, tenant: str, work: Path
    ) -> tuple[list[Path], dict[str, Path]]:
        """Every input listed and checked (keys, links, the job's byte cap) before anything
        is fetched into the scratch folder `work`; fetching stops when the job is stopped."""
        access = Access(self.settings)

        def readable(uri: str) -> bool:
            return access.readable(tenant, uri)

        n = len(spec.models)
        self.enter("downloading", f"listing {n} models and the data")
        listed = []
        for uri in spec.models:
            self.check()
            backend = self.storage.backend(uri)
            listed.append(backend.list_checkpoint(uri, readable, self.settings.allow_pickle))
        data_files: dict[str, StoredFile] = {}  # one download per URI (activations may calibrate)
        for name in DATA_FIELDS:
            uri = getattr(spec.data, name)
            if uri and uri not in data_files:
                self.check()
                data_files[uri] = self.storage.backend(uri).stat_file(uri, readable)
        total = sum(f.size for files in listed for f in files)
        total += sum(f.size for f in data_files.values())
        cap = self.settings.max_input_bytes
        if total > cap:
            raise UnsafeInput(
                f"the job's inputs total {total:,} bytes, above this server's per-job limit of "
                f"{cap:,} (OTFUSE_MAX_INPUT_BYTES)"
            )

        done = 0
        parents = []
        for i, (uri, files) in enumerate(zip(spec.models, listed, strict=True)):
            self.check()
            where = {"unit": "byte", "step": done, "total": total}
            self.progress(done / max(total, 1), f"downloading model {i + 1}/{n}", True, where)
            backend = self.storage.backend(uri)
            folder = backend.fetch(uri, files, work / f"model-{i}", self.should_stop)
            self.local_paths[str(folder)] = uri
            parents.append(folder)
            done += sum(f.size for f in files)
        fetched: dict[str, Path] = {}
        for number, (uri, file) in enumerate(data_files.items()):
            self.check()
            where = {"unit": "byte", "step": done, "total": total}
            self.progress(done / max(total, 1), f"downloading {uri}", True, where)
            dest = work / "data" / f"data-{number}.safetensors"
            fetched[uri] = self.storage.backend(uri).fetch_file(uri, file, dest, self.should_stop)
            self.local_paths[str(fetched[uri])] = uri
            done += file.size
        files = {n: fetched[getattr(spec.data, n)] for n in DATA_FIELDS if getattr(spec.data, n)}
        return parents, files

    @staticmethod
    def _summary(metrics: dict, spec: JobSpec) -> dict:
        """The service's summary fields (kept from its first metrics.json): `fused` (the
        one-shot fusion's eval metrics) and `parents` [{model: URI, ...metrics}]."""
        rows = {r["name"]: r for r in metrics.get("evaluation") or []}
        if "fused" not in rows:
            return {}
        parents = [
            {"model": uri, **(rows.get(f"parent {i}") or {}).get("metrics", {})}
            for i, uri in enumerate(spec.models)
        ]
        return {"fused": dict(rows["fused"]["metrics"]), "parents": parents}

    # -- fuse_job's events ----------------------------------------------------------------
    def _on_event(self, event: Progress) -> None:
        """A typed progress event: a new stage enters it; the stage's fraction comes from the
        event's fields (sweep point, finetune run, step of total)."""
        stage = STAGES[event.stage]
        if stage != self.stage:
            self.enter(stage, event.detail)
        if stage not in ("aligning", "evaluating", "finetuning"):
            return
        fraction = event.fraction
        if event.points:
            fraction = ((event.point or 0) + fraction) / event.points
        elif event.run is not None:
            names = self.finetune_names
            run = names.index(event.run) if event.run in names else 0
            fraction = (run + fraction) / len(names)
        self.progress(fraction, event.detail, position=event.position())

    def _succeed(self, job: dict, metrics: dict, output: str, names: list[str]) -> str:
        self._close_stage()
        artifacts = metrics.get("artifacts") or {}
        sweep = metrics.get("sweep") or {}
        result = {
            "checkpoint": output,
            "metrics_uri": join(output, METRICS_FILE),
            "report_uri": join(output, artifacts["report"]) if "report" in artifacts else None,
            "transport_maps_uri": (
                join(output, artifacts["transport_maps"]) if "transport_maps" in artifacts else None
            ),
            "chosen": sweep.get("chosen"),
            "files": sorted(names),
            "metrics": inline_metrics(metrics),
            "urls": self._presign(output),
        }

        def change(record):
            if record["status"] in DONE:
                return None
            record.update(stage=None, progress=1.0, result=result, cancel_requested=False)
            return finish(record, "succeeded")

        self.store.update(self.job_id, change)
        log.info("job %s succeeded", self.job_id)
        return "succeeded"

    def _presign(self, output: str) -> dict | None:
        seconds = self.settings.presign_seconds
        backend = self.storage.backend(output)
        if not seconds:
            return None
        urls = {}
        for name in backend.list_names(output):
            url = backend.presign(join(output, name), seconds)
            if url:
                urls[name] = url
        return urls or None

    def _fail(self, exc: Exception) -> str:
        import fusion_core

        try:
            from celery.exceptions import SoftTimeLimitExceeded
        except ImportError:  # pragma: no cover
            SoftTimeLimitExceeded = ()
        if self.heartbeat and self.heartbeat.lost.is_set():
            log.warning("job %s: lease lost; another delivery owns it", self.job_id)
            return "lease-lost"
        if isinstance(exc, Stop | TransferCancelled | fusion_core.CancelledError):
            if self.stopping.is_set() and not self.cancel_seen:
                self._requeue("interrupted by a worker shutdown; it will run again")
                return "interrupted"
            self._end("cancelled", None, "cancelled; nothing was published")
            return "cancelled"
        if isinstance(exc, JobFailed):
            error = (exc.kind, str(exc))
        elif isinstance(exc, UnsafeInput):
            error = ("input_error", str(exc))
        elif isinstance(exc, fusion_core.InputError):  # named at the spec's JSON path
            error = ("input_error", self._with_uris(str(as_job_error(exc))))
        elif isinstance(exc, fusion_core.FusionError):
            error = ("fusion_error", self._with_uris(str(exc)))
        elif isinstance(exc, StorageError):
            error = ("storage_error", str(exc))
        elif SoftTimeLimitExceeded and isinstance(exc, SoftTimeLimitExceeded):
            limit = self.settings.soft_time_limit
            error = ("time_limit", f"ran past the soft time limit of {limit}s")
        else:
            log.exception("job %s failed", self.job_id)
            error = ("internal_error", f"{type(exc).__name__}: {exc}")
        self._end("failed", error, f"failed in {self.stage or 'setup'}")
        return "failed"

    def _with_uris(self, message: str) -> str:
        """fusion_core names the scratch copies it read; users know the URIs they sent."""
        return path_rewriter(self.local_paths)(message)

    def _end(self, status: str, error, detail: str) -> None:
        stage = self.stage

        def change(job):
            if job["status"] in DONE:
                return None
            job["stage"] = stage if status == "failed" else None
            return finish(job, status, error=error, detail=detail)

        self.store.update(self.job_id, change)

    def _requeue(self, detail: str) -> None:
        def change(job):
            if job["status"] != "running":
                return None
            job.update(status="queued", stage=None, progress=0.0, detail=detail)
            return job

        self.store.update(self.job_id, change)


def run_job(job_id, store, storage, settings, stopping: threading.Event | None = None) -> str:
    """Run one delivery of a job; returns what happened (for logs and tests)."""
    return Run(job_id, store, storage, settings, stopping)()
