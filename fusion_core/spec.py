"""The fusion recipe and the finetune budget: every knob, validated once (no torch here: the
API process validates jobs with these)."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Literal, get_args

from .errors import InputError

Method = Literal["ot", "vanilla"]
Alignment = Literal["weights", "activations"]
Solver = Literal["emd", "sinkhorn"]
Residual = Literal["average", "weighted-scalar", "weighted-matrix", "identity", "shared"]
QK = Literal["tied", "free"]
Heads = Literal["matched", "cross"]
Rectangular = Literal["rms", "mass", "width"]

# The choices, defined once by the types above (the CLI's choices, the job spec's enums).
METHODS: tuple[str, ...] = get_args(Method)
ALIGNMENTS: tuple[str, ...] = get_args(Alignment)
SOLVERS: tuple[str, ...] = get_args(Solver)
RESIDUALS: tuple[str, ...] = get_args(Residual)
QK_MODES: tuple[str, ...] = get_args(QK)
HEAD_MODES: tuple[str, ...] = get_args(Heads)
RECTANGULAR: tuple[str, ...] = get_args(Rectangular)
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # Hugging Face's default "5GB"
MIN_SHARD_SIZE = 1 << 20  # the job spec's floor (the library takes any positive size)
_WINDOW = re.compile(r"^window-(\d+)$")

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: int | str) -> int:
    """Bytes from an int or a size such as "5GB", "500MB" or "2GiB" (Hugging Face's units)."""
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", value.upper())
        if not match:
            raise InputError(f"not a size: {value!r} (e.g. 5GB, 500MB, 2GiB)")
        size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2) or ""])
    if size < 1:
        raise InputError(f"a shard size must be positive, not {value!r}")
    return size


@dataclass(frozen=True)
class FusionSpec:
    method: Method = "ot"
    alignment: Alignment = "weights"
    solver: Solver = "sinkhorn"
    reg: float = 0.05
    residual: Residual = "average"
    filter: str = "all"  # all | cls | window-N (ViT token filter for activations)
    qk: QK = "tied"
    heads: Heads = "matched"  # matched: heads one-to-one; cross: the paper's cross-head pool
    anchor: int = 0
    # maps of plans between different widths: see docs/fusion.md "Heterogeneous widths"
    rectangular: Rectangular = "rms"
    weights: tuple[float, ...] | None = None
    samples: int = 200  # examples drawn from the data file for activations
    max_tokens: int = 16384  # tokens kept per activation tap (a seeded subset)
    device: str = "cpu"
    # the fused checkpoint's shards: Hugging Face's naming, a new shard past this many bytes
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE

    def validate(self, num_models: int) -> FusionSpec:
        _choice("method", self.method, METHODS)
        _choice("alignment", self.alignment, ALIGNMENTS)
        _choice("solver", self.solver, SOLVERS)
        _choice("residual", self.residual, RESIDUALS)
        _choice("qk", self.qk, QK_MODES)
        _choice("heads", self.heads, HEAD_MODES)
        _choice("rectangular", self.rectangular, RECTANGULAR)
        if self.filter not in ("all", "cls") and not _WINDOW.match(self.filter):
            raise InputError(f"must be all, cls or window-N, not {self.filter!r}", field="filter")
        if num_models < 2:
            raise InputError(f"need at least 2 models to fuse, got {num_models}", field="models")
        if not 0 <= self.anchor < num_models:
            raise InputError(
                f"{self.anchor} is out of range for {num_models} models", field="anchor"
            )
        if self.solver == "sinkhorn" and not (math.isfinite(self.reg) and self.reg > 0):
            raise InputError(f"must be a positive number for Sinkhorn, not {self.reg}", field="reg")
        if self.weights is not None:
            if len(self.weights) != num_models:
                raise InputError(
                    f"{len(self.weights)} values for {num_models} models",
                    field="weights",
                )
            total = sum(self.weights)
            if any(not math.isfinite(w) or w < 0 for w in self.weights) or not (
                math.isfinite(total) and total > 0
            ):
                raise InputError(
                    "must be non-negative numbers with a positive, finite sum",
                    field="weights",
                )
        if self.samples < 1 or self.max_tokens < 1:
            raise InputError("must be at least 1", field="samples")
        if self.max_shard_size < 1:
            raise InputError(
                f"must be a positive number of bytes, not {self.max_shard_size}",
                field="max_shard_size",
            )
        if not re.match(r"^(cpu|cuda(:\d+)?|mps)$", self.device):
            raise InputError(f"must be cpu or cuda[:N], not {self.device!r}", field="device")
        return self

    @property
    def needs_activations(self) -> bool:
        return self.method == "ot" and (
            self.alignment == "activations" or self.residual.startswith("weighted")
        )

    @property
    def window(self) -> int | None:
        match = _WINDOW.match(self.filter)
        return int(match.group(1)) if match else None

    def model_weights(self, num_models: int) -> list[float]:
        weights = self.weights or (1.0,) * num_models
        total = sum(weights)
        return [w / total for w in weights]

    def to_dict(self) -> dict:
        return asdict(self)


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InputError(f"must be one of {', '.join(allowed)}, not {value!r}", field=name)


@dataclass(frozen=True)
class FinetuneConfig:
    """A budgeted finetune: AdamW, linear warmup then cosine to 0; the first budget reached
    (steps, epochs, seconds) stops it."""

    steps: int | None = None
    epochs: float | None = None
    seconds: float | None = None
    lr: float = 1e-4
    batch_size: int = 32
    warmup: float = 0.1  # fraction of the budget spent warming up linearly
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 0
    device: str | None = None  # None: the job's device (fuse_job), else cpu
    # Distillation from the teachers' ensemble (a job's parents): loss = (1 - distill) *
    # CE(labels) + distill * T^2 * KL(teacher_T || student_T); 0, or no teachers: plain.
    distill: float = 0.9
    temperature: float = 4.0

    def validate(self) -> FinetuneConfig:
        if self.steps is None and self.epochs is None and self.seconds is None:
            return FinetuneConfig(**{**asdict(self), "epochs": 1.0}).validate()
        if self.steps is not None and self.steps < 1:
            raise InputError(f"steps must be at least 1, not {self.steps}", field="steps")
        for name in ("epochs", "seconds"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise InputError(f"{name} must be a positive number, not {value}", field=name)
        if not (math.isfinite(self.lr) and 0 < self.lr <= 1):
            raise InputError(f"lr must be in (0, 1], not {self.lr}", field="lr")
        if self.batch_size < 1:
            raise InputError(
                f"batch size must be at least 1, not {self.batch_size}", field="batch_size"
            )
        if not 0 <= self.warmup < 1:
            raise InputError(
                f"warmup must be a fraction in [0, 1), not {self.warmup}", field="warmup"
            )
        if not (math.isfinite(self.distill) and 0 <= self.distill <= 1):
            raise InputError(
                f"distill must be a weight in [0, 1], not {self.distill}", field="distill"
            )
        if not (math.isfinite(self.temperature) and 0 < self.temperature <= 100):
            raise InputError(
                f"temperature must be in (0, 100], not {self.temperature}", field="temperature"
            )
        return self

    def healing(self, teachers: int) -> str:
        """What a run with that many teachers optimizes: "plain" (labels) or "distill"
        (labels and the teachers' ensemble)."""
        return "distill" if self.distill > 0 and teachers > 0 else "plain"

    def to_dict(self) -> dict:
        return asdict(self)
