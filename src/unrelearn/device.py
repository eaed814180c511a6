"""Which device a command runs on: the user's choice, checked, or accelerate's default."""

from __future__ import annotations

import torch

from unrelearn.errors import UnrelearnError

_closes_at_exit = False


def accelerate_state():
    """accelerate's process state, created the same way wherever it is first asked for: on a
    machine without a GPU a ``torchrun`` / ``accelerate launch`` run is data parallel over CPU
    processes (gloo), which accelerate only sets up when told ``cpu=True``."""
    import os

    from accelerate import PartialState

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    state = PartialState(cpu=launched and not torch.cuda.is_available())
    global _closes_at_exit
    if launched and not _closes_at_exit:
        # A process group still alive at interpreter exit can abort the process while its
        # communication threads are torn down ("terminate called without an active exception",
        # seen once in the two-process test on a loaded machine); tear it down first.
        import atexit

        atexit.register(state.destroy_process_group)
        _closes_at_exit = True
    return state


def resolve_device(name: str | None) -> torch.device:
    """``None``: the accelerator accelerate picks (a GPU when there is one, else the CPU)."""
    if name is None:
        return torch.device(accelerate_state().device)
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
