"""Typed progress events: where a fusion job is. fusion_core emits them through one
callback; the CLI's progress lines, the service's job record (stage, progress, position) and
the job's stage timings are computed from the fields, never from `detail`, which is for
people. No torch here."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

Stage = Literal["search", "aligning", "evaluating", "finetuning", "writing"]
STAGES: tuple[Stage, ...] = ("search", "aligning", "evaluating", "finetuning", "writing")


@dataclass(frozen=True)
class Progress:
    step: int  # steps done of this stage's current unit
    total: int
    detail: str = ""  # for people: "aligning layer 5/12", "finetune fused: step 40/60, ..."
    stage: Stage = "aligning"
    unit: str = ""  # what steps count: "recipe", "block", "model", "batch", "step"
    point: int | None = None  # the search's recipe (0-based) it belongs to
    points: int | None = None  # recipes the search plans (its budget or fewer)
    run: str | None = None  # the finetune run ("fused", "vanilla")
    # the fused checkpoint's bytes written so far and in all (fusion streams it to disk)
    bytes_written: int | None = None
    bytes_total: int | None = None

    @property
    def fraction(self) -> float:
        """Done of this unit, 0..1."""
        return min(max(self.step / self.total, 0.0), 1.0) if self.total > 0 else 0.0

    def position(self) -> dict:
        """The typed fields, for a record (no detail, no stage)."""
        return {k: v for k, v in asdict(self).items() if k not in ("detail", "stage")}
