"""Which device a command runs on: the user's choice, checked, or accelerate's default."""

from __future__ import annotations

import torch

from unrelearn.errors import UnrelearnError


def resolve_device(name: str | None) -> torch.device:
    """``None``: the accelerator accelerate picks (a GPU when there is one, else the CPU)."""
    if name is None:
        from accelerate import PartialState

        return torch.device(PartialState().device)
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UnrelearnError(f"unknown device {name!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UnrelearnError(f"--device {name}: no CUDA GPU is visible to torch; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UnrelearnError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UnrelearnError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UnrelearnError(f"unknown device {name!r}; use cpu, cuda, cuda:N or mps")
    return device
