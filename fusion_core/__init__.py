"""otfuse's science: Optimal Transport fusion of transformer checkpoints (no web, queue or
cloud code here)."""

__version__ = "0.1.0"

from .api import FusionReport, fuse
from .engine import Progress
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
from .metrics import SCHEMA_VERSION as METRICS_SCHEMA_VERSION
from .spec import FusionSpec

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
    "Progress",
    "UnsupportedArchitectureError",
    "__version__",
    "evaluate",
    "finetune",
    "fuse",
    "fuse_job",
]
