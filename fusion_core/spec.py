"""The fusion recipe: every knob of the method, validated once."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Literal

from .errors import InputError

Method = Literal["ot", "vanilla"]
Alignment = Literal["weights", "activations"]
Solver = Literal["emd", "sinkhorn"]
Residual = Literal["average", "weighted-scalar", "weighted-matrix", "identity", "shared"]
QK = Literal["tied", "free"]
Heads = Literal["matched", "cross"]

METHODS = ("ot", "vanilla")
ALIGNMENTS = ("weights", "activations")
SOLVERS = ("emd", "sinkhorn")
RESIDUALS = ("average", "weighted-scalar", "weighted-matrix", "identity", "shared")
QK_MODES = ("tied", "free")
HEAD_MODES = ("matched", "cross")
_WINDOW = re.compile(r"^window-(\d+)$")


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
    weights: tuple[float, ...] | None = None
    samples: int = 200  # examples drawn from the data file for activations
    max_tokens: int = 16384  # tokens kept per activation tap (a seeded subset)
    device: str = "cpu"

    def validate(self, num_models: int) -> FusionSpec:
        _choice("method", self.method, METHODS)
        _choice("alignment", self.alignment, ALIGNMENTS)
        _choice("solver", self.solver, SOLVERS)
        _choice("residual", self.residual, RESIDUALS)
        _choice("qk", self.qk, QK_MODES)
        _choice("heads", self.heads, HEAD_MODES)
        if self.filter not in ("all", "cls") and not _WINDOW.match(self.filter):
            raise InputError(
                f"--filter must be all, cls or window-N, not {self.filter!r}", field="filter"
            )
        if num_models < 2:
            raise InputError(f"need at least 2 models to fuse, got {num_models}", field="models")
        if not 0 <= self.anchor < num_models:
            raise InputError(
                f"--anchor {self.anchor} is out of range for {num_models} models", field="anchor"
            )
        if self.solver == "sinkhorn" and not (math.isfinite(self.reg) and self.reg > 0):
            raise InputError(
                f"--reg must be a positive number for Sinkhorn, not {self.reg}", field="reg"
            )
        if self.weights is not None:
            if len(self.weights) != num_models:
                raise InputError(
                    f"--weights has {len(self.weights)} values for {num_models} models",
                    field="weights",
                )
            total = sum(self.weights)
            if any(not math.isfinite(w) or w < 0 for w in self.weights) or not (
                math.isfinite(total) and total > 0
            ):
                raise InputError(
                    "--weights must be non-negative numbers with a positive, finite sum",
                    field="weights",
                )
        if self.samples < 1 or self.max_tokens < 1:
            raise InputError("--samples must be at least 1", field="samples")
        if not re.match(r"^(cpu|cuda(:\d+)?|mps)$", self.device):
            raise InputError(
                f"--device must be cpu or cuda[:N], not {self.device!r}", field="device"
            )
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
        raise InputError(f"--{name} must be one of {', '.join(allowed)}, not {value!r}", field=name)
