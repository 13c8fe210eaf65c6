"""The compute device a job names must exist on this machine: `cuda:99` is the caller's
mistake (an input error), not a crash in the middle of a fusion."""

from __future__ import annotations

import torch

from .errors import InputError


def check_device(device: str) -> None:
    kind, _, index = device.partition(":")
    if kind == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise InputError(
                f"this machine has no CUDA device (asked for {device})", field="device"
            )
        if index and int(index) >= count:
            raise InputError(
                f"{device} is not one of this machine's {count} CUDA device(s) "
                f"(cuda:0 to cuda:{count - 1})",
                field="device",
            )
    elif kind == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"MPS is not available here (asked for {device})", field="device")
