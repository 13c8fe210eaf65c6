"""Errors the fusion core raises. Every message is one line naming the problem."""

from __future__ import annotations


class FusionError(Exception):
    """Base class: anything the caller can act on."""


class InputError(FusionError):
    """A checkpoint, data file or option is unusable (bad file, wrong shapes, bad flags).

    `field` names the field at fault when there is one ("reg", "policy.device"), and
    `reason` says what is wrong with it; the message is "field: reason". A caller with its
    own names for the fields (the job spec's JSON paths, the CLI's flags) re-raises with
    `renamed`, so nobody parses messages."""

    def __init__(self, reason: str, field: str | None = None) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.field = field
        self.reason = reason

    def renamed(self, field: str) -> InputError:
        """The same error at another name of its field."""
        error = type(self)(self.reason, field=field)
        error.__cause__ = self
        return error


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
