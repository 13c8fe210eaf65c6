"""A job spec as a server takes it: its URIs normalized and authorized for the tenant
(`access`), then the contract's rules (`fusion_core.contract`) under the server's limits.
The API checks at submit and the worker again before it runs (its own settings count, and a
path may have changed since). Errors are InputErrors at the spec's JSON paths."""

from __future__ import annotations

from fusion_core.contract import JobSpec, validate_job
from fusion_core.errors import InputError

from .access import Access
from .storage import StorageError, UnsafeInput

DATA_FIELDS = ("activations", "calibration", "eval", "finetune")


def check_spec(spec: JobSpec, settings, tenant: str) -> JobSpec:
    """The spec with normalized URIs, or InputError naming the field at fault."""
    n = len(spec.models)
    if n > settings.max_models:
        raise InputError(f"at most {settings.max_models} models per job, got {n}", "models")
    access = Access(settings)
    models = [
        access.check_read(f"models.{i}", tenant, uri, folder=True)
        for i, uri in enumerate(spec.models)
    ]
    data = spec.data.model_copy()
    for name in DATA_FIELDS:
        value = getattr(data, name)
        if value is not None:
            setattr(data, name, access.check_read(f"data.{name}", tenant, value, folder=False))
    output = spec.output and access.check_write("output", tenant, spec.output)
    normalized = spec.model_copy(update={"models": models, "data": data, "output": output})
    validate_job(
        normalized, max_models=settings.max_models, max_finetune_seconds=settings.soft_time_limit
    )
    return normalized


def probe_inputs(spec: JobSpec, storage) -> None:
    """At submit, where it is cheap: every model folder holds a config.json and every data
    file exists (a local stat, or one S3 HEAD each). A store that does not answer is left to
    the worker; only a definite "not there" is the caller's mistake."""
    for i, uri in enumerate(spec.models):
        _probe(storage, f"models.{i}", uri, folder=True)
    for name in DATA_FIELDS:
        uri = getattr(spec.data, name)
        if uri is not None:
            _probe(storage, f"data.{name}", uri, folder=False)


def _probe(storage, field: str, uri: str, folder: bool) -> None:
    try:
        found = storage.backend(uri).exists(uri, folder)
    except UnsafeInput as exc:
        raise InputError(str(exc), field) from None
    except StorageError:
        return
    if not found:
        what = "no config.json in this folder" if folder else "no such file"
        raise InputError(f"{uri}: {what}", field)
