"""Submit-time checks that need settings or span fields: URI schemes, allowed buckets and
roots, model count, anchor and weights, Sinkhorn's regularizer, data the policy needs. Each
raises `SpecError` naming the JSON field; `fusion_core`'s own validation runs last."""

from __future__ import annotations

import math

from .access import Access
from .models import JobSpec
from .problems import SpecError

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


# FusionSpec's field names (InputError.field) -> the JSON fields.
RECIPE_FIELDS = {
    "method": "method",
    "alignment": "policy.alignment",
    "solver": "policy.solver",
    "reg": "regularizer",
    "residual": "policy.residual",
    "filter": "policy.filter",
    "qk": "policy.qk",
    "heads": "policy.heads",
    "anchor": "anchor",
    "weights": "weights",
    "samples": "policy.samples",
    "device": "policy.device",
    "models": "models",
}


def check_spec(spec: JobSpec, settings, tenant: str) -> JobSpec:
    """Validate and normalize for `tenant`: inputs it may read, an output it may write.
    Returns a spec with normalized URIs."""
    access = Access(settings)
    n = len(spec.models)
    if n > settings.max_models:
        raise SpecError("models", f"at most {settings.max_models} models per job, got {n}")
    models = [
        access.check_read(f"models.{i}", tenant, uri, folder=True)
        for i, uri in enumerate(spec.models)
    ]
    if spec.anchor >= n:
        raise SpecError("anchor", f"{spec.anchor} is out of range for {n} models")
    if spec.weights is not None:
        if len(spec.weights) != n:
            raise SpecError("weights", f"{len(spec.weights)} values for {n} models")
        total = sum(spec.weights)
        if any(not math.isfinite(w) or w < 0 for w in spec.weights) or not (
            math.isfinite(total) and total > 0
        ):
            raise SpecError("weights", "must be non-negative numbers with a positive, finite sum")
    check_regularizer(spec)
    points = len(reg_points(spec))
    data = spec.data.model_copy()
    for name in ("activations", "calibration", "eval", "finetune"):
        value = getattr(data, name)
        if value is not None:
            setattr(data, name, access.check_read(f"data.{name}", tenant, value, folder=False))
    needs = spec.method == "ot" and (
        spec.policy.alignment == "activations" or spec.policy.residual.startswith("weighted")
    )
    if needs and data.activations is None:
        raise SpecError(
            "data.activations",
            f"required for alignment={spec.policy.alignment}, residual={spec.policy.residual}",
        )
    if points > 1 and spec.method != "ot":
        raise SpecError("regularizer", "a sweep needs method ot (vanilla has no regularizer)")
    if points > 1 and data.calibration is None and data.activations is None:
        raise SpecError(
            "data.calibration",
            f"required for a sweep over {points} regularizers (the best one-shot model on it "
            "is kept); data.activations serves when it is not given",
        )
    calibration = calibration_uri(spec.model_copy(update={"data": data}))
    if calibration is not None and calibration == data.eval:
        which = "data.calibration" if data.calibration else "data.activations"
        raise SpecError(
            "data.calibration",
            f"the calibration data ({which}) must not be data.eval: the sweep would choose on "
            "the numbers it reports",
        )
    check_finetune(spec, data, settings)
    output = spec.output and access.check_write("output", tenant, spec.output)
    normalized = spec.model_copy(update={"models": models, "data": data, "output": output})
    fusion_spec(normalized, "cpu")  # fusion_core's own checks, as a last net
    from fusion_core import InputError

    try:
        finetune_config(normalized, "cpu")
    except InputError as exc:
        raise SpecError("finetune", str(exc)) from None
    return normalized


def fusion_spec(spec: JobSpec, device: str):
    """The `fusion_core.FusionSpec` this job runs, validated."""
    from fusion_core import FusionSpec, InputError

    try:
        return FusionSpec(
            method=spec.method,
            alignment=spec.policy.alignment,
            solver=spec.policy.solver,
            reg=spec.regularizer if isinstance(spec.regularizer, float) else DEFAULT_REG,
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
        field = RECIPE_FIELDS.get(exc.field or "") or FLAG_FIELDS.get(message.split(" ", 1)[0])
        raise SpecError(field or "body", message) from None


DEFAULT_REG = 0.05  # FusionSpec's; the spec's reg when a sweep chooses it


def check_regularizer(spec: JobSpec) -> None:
    value = spec.regularizer
    if isinstance(value, float):
        if spec.policy.solver == "sinkhorn" and not (math.isfinite(value) and value > 0):
            raise SpecError("regularizer", f"must be > 0 for the sinkhorn solver, got {value}")
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, float) and not (math.isfinite(item) and item > 0):
                raise SpecError(
                    f"regularizer.{i}", f"Sinkhorn regularizers must be > 0, got {item}"
                )


def regs_argument(spec: JobSpec):
    """`fuse_job`'s `regs`: None for one number (the spec's solver and reg), else the value."""
    return None if isinstance(spec.regularizer, float) else spec.regularizer


def reg_points(spec: JobSpec) -> list:
    """The (solver, reg) points the job fuses, as fuse_job will."""
    from fusion_core.sweep import Point, parse_regs

    regs = regs_argument(spec)
    if regs is None:
        reg = spec.regularizer if spec.policy.solver == "sinkhorn" else None
        return [Point(spec.policy.solver, reg)]
    return parse_regs(regs)


def calibration_uri(spec: JobSpec) -> str | None:
    """The data a sweep chooses on, as fuse_job picks it: data.calibration, else
    data.activations when there is more than one point."""
    if spec.data.calibration is not None:
        return spec.data.calibration
    return spec.data.activations if len(reg_points(spec)) > 1 else None


def check_finetune(spec: JobSpec, data, settings) -> None:
    finetune = spec.finetune
    if finetune is None:
        if data.finetune is not None:
            raise SpecError(
                "finetune",
                "data.finetune is given but no finetune: add one with a budget "
                "(steps, epochs or seconds)",
            )
        return
    if finetune.steps is None and finetune.epochs is None and finetune.seconds is None:
        raise SpecError("finetune", "needs a budget: steps, epochs or seconds (at least one)")
    if data.finetune is None:
        raise SpecError("data.finetune", "required for the finetune stage (labelled inputs)")
    limit = settings.soft_time_limit
    if finetune.seconds is not None and finetune.seconds >= limit:
        raise SpecError(
            "finetune.seconds",
            f"{finetune.seconds:g} s does not fit in the server's job time limit of {limit} s",
        )
    if len(set(finetune.baselines)) != len(finetune.baselines):
        raise SpecError("finetune.baselines", "each baseline at most once")


def finetune_config(spec: JobSpec, device: str):
    """The `fusion_core.FinetuneConfig` of the job (None without a finetune)."""
    if spec.finetune is None:
        return None
    from fusion_core.finetune import FinetuneConfig

    f = spec.finetune
    return FinetuneConfig(
        steps=f.steps,
        epochs=f.epochs,
        seconds=f.seconds,
        lr=f.lr,
        batch_size=f.batch_size,
        warmup=f.warmup,
        weight_decay=f.weight_decay,
        seed=f.seed,
        device=device,
    ).validate()
