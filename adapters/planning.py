"""A job's plan as a server makes it: its inputs read through storage (config.json and the
safetensors headers only: a local read, or ranged GETs on S3), under the tenant's rules
(`access`), and the verdict of whether it fits the worker's memory."""

from __future__ import annotations

from dataclasses import dataclass

from fusion_core.contract import JobSpec, fusion_spec, search_space
from fusion_core.errors import InputError
from fusion_core.plan import PlanReport, data_tokens, plan, total_memory

from .access import Access
from .storage import StorageError, StoredFile, UnsafeInput, parse_uri

GIB = 1 << 30


@dataclass
class StoredFolder:
    """A checkpoint folder in storage, listed and checked (`list_checkpoint`) before any
    byte is read; only the ranges the header reader asks for are fetched."""

    uri: str
    backend: object
    files: dict[str, StoredFile]

    @property
    def where(self) -> str:
        return self.uri

    def sizes(self) -> dict[str, int]:
        return {name: f.size for name, f in self.files.items()}

    def read(self, name: str, start: int, length: int) -> bytes:
        try:
            return self.backend.read_range(self.uri, self.files[name], start, length)
        except StorageError as exc:
            raise InputError(str(exc)) from None


def _folder(storage, access: Access, tenant: str, field: str, uri: str, pickle: bool):
    if parse_uri(uri)[0] == "hf":
        raise InputError(f"{uri}: hub models are not planned before they are fetched", field)
    backend = storage.backend(uri)

    def readable(target: str) -> bool:
        return access.readable(tenant, target)

    try:
        listed = backend.list_checkpoint(uri, readable, pickle)
    except (UnsafeInput, StorageError) as exc:
        raise InputError(str(exc), field) from None
    return StoredFolder(uri, backend, {f.name: f for f in listed})


def device_of(spec: JobSpec, settings) -> str:
    """The device the worker will fuse on: the job's, or the server's; `auto` is cuda where
    the worker has a GPU (OTFUSE_WORKER_GPU_MEMORY_BYTES set), else cpu."""
    device = spec.policy.device if spec.policy.device != "auto" else settings.device
    if device == "auto":
        return "cuda" if settings.worker_gpu_memory_bytes else "cpu"
    return device


def plan_spec(spec: JobSpec, settings, storage, tenant: str) -> PlanReport:
    """The plan of a checked spec (normalized URIs). Unreadable or refused inputs raise
    InputError at their field."""
    access = Access(settings)
    folders = [
        _folder(storage, access, tenant, f"models.{i}", uri, settings.allow_pickle)
        for i, uri in enumerate(spec.models)
    ]
    recipe = fusion_spec(spec, device_of(spec, settings))
    tokens = None
    if spec.data.activations is not None and parse_uri(spec.data.activations)[0] != "hf":
        tokens = _data_tokens(storage, access, tenant, spec.data.activations, recipe.samples)
    limits = settings.limits  # torch-free: Limits.check_sizes reads configs only
    fusions = search_space(spec).planned(len(spec.models))
    return plan(folders, recipe, limits, tokens, fusions=fusions)


def _data_tokens(storage, access: Access, tenant: str, uri: str, samples: int) -> int | None:
    backend = storage.backend(uri)
    try:
        stored = backend.stat_file(uri, lambda target: access.readable(tenant, target))
    except StorageError:
        return None
    folder = StoredFolder(uri.rsplit("/", 1)[0], backend, {stored.name: stored})
    return data_tokens(folder, stored.name, samples)


def memory_limits(settings) -> tuple[int | None, int | None]:
    """(host, GPU) bytes a worker has: the settings', or for the embedded server (whose
    worker is this process) this machine's memory; None: not checked."""
    host = settings.worker_memory_bytes
    if host is None and settings.mode == "embedded":
        host = total_memory()
    return host, settings.worker_gpu_memory_bytes


def check_fits(report: PlanReport, settings) -> None:
    """InputError at `models` when the plan's peak memory is above the worker's."""
    est = report.estimate
    if est is None:
        return
    host, gpu = memory_limits(settings)
    cuda = est.device.startswith("cuda")
    if host is not None and est.host_peak_bytes > host:
        advice = "fewer or smaller models"
        advice = advice if cuda else f"policy.device cuda, {advice}"
        raise InputError(
            f"needs ~{est.host_peak_bytes / GIB:.1f} GiB of memory ({est.engine} engine, on "
            f"{est.device}), the worker has {host / GIB:.1f} GiB: use {advice}",
            "models",
        )
    if cuda and gpu is not None and (est.device_peak_bytes or 0) > gpu:
        raise InputError(
            f"needs ~{(est.device_peak_bytes or 0) / GIB:.1f} GiB of GPU memory, the worker's "
            f"GPU has {gpu / GIB:.1f} GiB: use policy.device cpu, fewer or smaller models",
            "models",
        )
