"""Errors the fusion core raises. Every message is one line naming the problem."""


class FusionError(Exception):
    """Base class: anything the caller can act on."""


class InputError(FusionError):
    """A checkpoint, data file or option is unusable (bad file, wrong shapes, bad flags)."""


class IncompatibleModelsError(InputError):
    """The models cannot be fused together (family, depth, head count, fixed sizes)."""


class UnsupportedArchitectureError(InputError):
    """No family description covers this architecture."""


class CancelledError(FusionError):
    """The caller asked to stop; nothing was written."""
