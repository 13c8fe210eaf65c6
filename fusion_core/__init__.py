"""otfuse's science: Optimal Transport fusion of transformer checkpoints (no web, queue or
cloud code here).

Names are imported on first use, so that `fusion_core.spec`, `fusion_core.errors` and
`fusion_core.files` (the job contract's rules) load without torch: the API process validates
jobs without it.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "FusionReport": "api",
    "fuse": "api",
    "Progress": "progress",
    "CancelledError": "errors",
    "FusionError": "errors",
    "IncompatibleModelsError": "errors",
    "InputError": "errors",
    "UnsupportedArchitectureError": "errors",
    "evaluate": "evaluate",
    "FinetuneConfig": "finetune",
    "finetune": "finetune",
    "JobResult": "job",
    "fuse_job": "job",
    "Limits": "limits",
    "FusionSpec": "spec",
}

__all__ = [
    "METRICS_SCHEMA_VERSION",
    "CancelledError",
    "FinetuneConfig",
    "FusionError",
    "FusionReport",
    "FusionSpec",
    "IncompatibleModelsError",
    "InputError",
    "JobResult",
    "Limits",
    "Progress",
    "UnsupportedArchitectureError",
    "__version__",
    "evaluate",
    "finetune",
    "fuse",
    "fuse_job",
]

if TYPE_CHECKING:
    from .api import FusionReport, fuse
    from .errors import (
        CancelledError,
        FusionError,
        IncompatibleModelsError,
        InputError,
        UnsupportedArchitectureError,
    )
    from .evaluate import evaluate
    from .finetune import FinetuneConfig, finetune
    from .job import JobResult, fuse_job
    from .limits import Limits
    from .metrics import SCHEMA_VERSION as METRICS_SCHEMA_VERSION
    from .progress import Progress
    from .spec import FusionSpec


class _Package(types.ModuleType):
    """`fusion_core.evaluate` and `fusion_core.finetune` are functions, exported from
    submodules of the same names. Importing such a submodule would bind the package
    attribute to the module; the function stays the attribute (the module is in
    sys.modules, where `from fusion_core.evaluate import ...` finds it)."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name == "METRICS_SCHEMA_VERSION":
        return importlib.import_module(".metrics", __name__).SCHEMA_VERSION
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
