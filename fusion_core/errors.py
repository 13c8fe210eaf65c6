"""Errors the fusion core raises. Every message is one line naming the problem."""


class FusionError(Exception):
    """Base class: anything the caller can act on."""


class InputError(FusionError):
    """A checkpoint, data file or option is unusable (bad file, wrong shapes, bad flags).

    `field` names the recipe field at fault when there is one ("reg", "anchor"), so a
    caller with its own names for the fields (the HTTP API) can point at them."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class IncompatibleModelsError(InputError):
    """The models cannot be fused together (family, depth, head count, fixed sizes)."""


class UnsupportedArchitectureError(InputError):
    """No family description covers this architecture."""


class CancelledError(FusionError):
    """The caller asked to stop; nothing was written."""


def check_cancelled(should_cancel, what: str = "fusion") -> None:
    """Raise CancelledError when the caller's `should_cancel()` says stop (None: never)."""
    if should_cancel is not None and should_cancel():
        raise CancelledError(f"{what} cancelled; nothing was written")
