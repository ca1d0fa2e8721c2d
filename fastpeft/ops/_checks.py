"""Operand checks the op wrappers share (the launchers validate their own arguments)."""

from __future__ import annotations

import torch

__all__ = ["check_floating"]


def check_floating(**tensors: torch.Tensor | None) -> None:
    """``TypeError`` naming the first operand that is not a floating tensor (None is skipped): integer or
    bool operands would run the reference math in integers, where ``F.linear`` raises."""
    for name, t in tensors.items():
        if t is not None and not (isinstance(t, torch.Tensor) and t.is_floating_point()):
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{name} must be a floating-point tensor, got {got}")
