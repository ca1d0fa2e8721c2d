"""How much memory an adapter will take, checked before it is allocated.

A config read from a file (``r: 1000000000``, ``num_virtual_tokens: 100000``) must fail with a
message, not with an allocator error halfway through injection, or by exhausting the machine.
"""

from __future__ import annotations

import torch

__all__ = ["available_bytes", "check_fits"]


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` (CUDA: the driver's free bytes; CPU: ``MemAvailable``), None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits(nbytes: int, device: torch.device, what: str) -> None:
    """``ValueError`` naming ``what`` when ``nbytes`` exceed the memory available on ``device``."""
    free = available_bytes(device)
    if free is not None and nbytes > free:
        raise ValueError(
            f"{what} needs {nbytes / 2**30:,.1f} GiB, more than the {free / 2**30:,.1f} GiB free on {device}"
        )
