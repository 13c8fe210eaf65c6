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
from .spec import FusionSpec

__all__ = [
    "CancelledError",
    "FusionError",
    "FusionReport",
    "FusionSpec",
    "IncompatibleModelsError",
    "InputError",
    "Progress",
    "UnsupportedArchitectureError",
    "__version__",
    "evaluate",
    "fuse",
]
