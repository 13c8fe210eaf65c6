"""Submit-time checks that need settings or span fields: URI schemes, allowed buckets and
roots, model count, anchor and weights, Sinkhorn's regularizer, data the policy needs. Each
raises `SpecError` naming the JSON field; `fusion_core`'s own validation runs last."""

from __future__ import annotations

import math
from pathlib import Path

from .models import JobSpec
from .problems import SpecError
from .storage import parse_uri

# fusion_core names flags in its messages; the JSON fields they correspond to.
FLAG_FIELDS = {
    "--method": "method",
    "--alignment": "policy.alignment",
    "--solver": "policy.solver",
    "--reg": "regularizer",
    "--residual": "policy.residual",
    "--filter": "policy.filter",
    "--qk": "policy.qk",
    "--heads": "policy.heads",
    "--anchor": "anchor",
    "--weights": "weights",
    "--samples": "policy.samples",
    "--device": "policy.device",
    "--data": "data.activations",
}


def check_uri(field: str, uri: str, settings, folder: bool) -> str:
    """A URI the worker may read or write: s3 in an allowed bucket, or file under a root.
    Returns it normalized (folders end with '/')."""
    try:
        scheme, bucket, path = parse_uri(uri)
    except ValueError as exc:
        raise SpecError(field, str(exc).split(": ", 1)[-1] + f" (got {uri!r})") from None
    if scheme == "s3":
        if not settings.s3_enabled:
            raise SpecError(field, "s3:// URIs need S3 configured on the server")
        if not bucket:
            raise SpecError(field, f"{uri}: no bucket")
        if bucket not in settings.buckets:
            raise SpecError(field, f"bucket {bucket!r} is not allowed on this server")
        if not folder and (not path or path.endswith("/")):
            raise SpecError(field, f"{uri}: names a folder, not a file")
        if folder:
            path = path.rstrip("/") + "/" if path else ""
        return f"s3://{bucket}/{path}"
    if not path.startswith("/"):
        raise SpecError(field, f"{uri}: file URIs need an absolute path")
    resolved = Path(path).resolve()
    if not any(resolved == root or root in resolved.parents for root in settings.roots):
        raise SpecError(field, f"{uri}: not under an allowed file root (OTFUSE_FILE_ROOTS)")
    return f"file://{resolved}/" if folder else f"file://{resolved}"


def check_spec(spec: JobSpec, settings) -> JobSpec:
    """Validate and normalize; returns a spec with normalized URIs."""
    n = len(spec.models)
    if n > settings.max_models:
        raise SpecError("models", f"at most {settings.max_models} models per job, got {n}")
    models = [
        check_uri(f"models.{i}", uri, settings, folder=True) for i, uri in enumerate(spec.models)
    ]
    if spec.anchor >= n:
        raise SpecError("anchor", f"{spec.anchor} is out of range for {n} models")
    if spec.weights is not None:
        if len(spec.weights) != n:
            raise SpecError("weights", f"{len(spec.weights)} values for {n} models")
        if any(not math.isfinite(w) or w < 0 for w in spec.weights) or sum(spec.weights) <= 0:
            raise SpecError("weights", "must be non-negative numbers with a positive sum")
    if spec.policy.solver == "sinkhorn" and not (
        math.isfinite(spec.regularizer) and spec.regularizer > 0
    ):
        raise SpecError(
            "regularizer", f"must be > 0 for the sinkhorn solver, got {spec.regularizer}"
        )
    data = spec.data.model_copy()
    for name in ("activations", "eval", "finetune"):
        value = getattr(data, name)
        if value is not None:
            setattr(data, name, check_uri(f"data.{name}", value, settings, folder=False))
    needs = spec.method == "ot" and (
        spec.policy.alignment == "activations" or spec.policy.residual.startswith("weighted")
    )
    if needs and data.activations is None:
        raise SpecError(
            "data.activations",
            f"required for alignment={spec.policy.alignment}, residual={spec.policy.residual}",
        )
    if spec.finetune is not None:
        raise SpecError("finetune", "finetuning is not supported yet")
    output = spec.output and check_uri("output", spec.output, settings, folder=True)
    normalized = spec.model_copy(update={"models": models, "data": data, "output": output})
    fusion_spec(normalized, "cpu")  # fusion_core's own checks, as a last net
    return normalized


def fusion_spec(spec: JobSpec, device: str):
    """The `fusion_core.FusionSpec` this job runs, validated."""
    from fusion_core import FusionSpec, InputError

    try:
        return FusionSpec(
            method=spec.method,
            alignment=spec.policy.alignment,
            solver=spec.policy.solver,
            reg=spec.regularizer,
            residual=spec.policy.residual,
            filter=spec.policy.filter,
            qk=spec.policy.qk,
            heads=spec.policy.heads,
            anchor=spec.anchor,
            weights=tuple(spec.weights) if spec.weights else None,
            samples=spec.policy.samples,
            device=device,
        ).validate(len(spec.models))
    except InputError as exc:
        message = str(exc)
        flag = message.split(" ", 1)[0]
        field = FLAG_FIELDS.get(flag, "body")
        raise SpecError(field, message) from None


def default_output(settings, tenant: str, job_id: str) -> str:
    if settings.bucket:
        return f"s3://{settings.bucket}/fusions/{tenant}/{job_id}/"
    if settings.mode == "distributed":
        raise SpecError("output", "required: the server has no default bucket (OTFUSE_BUCKET)")
    return f"file://{Path(settings.data_dir).resolve()}/artifacts/{tenant}/{job_id}/"
