"""Mixed-adapter LoRA update: ``y[m] += s_i·(x[m]·A_iᵀ·B_iᵀ + b_i)`` with ``i`` row ``m``'s adapter.

Inference only (no autograd). Runs ``fastpeft.kernels.lora_batched`` (one shrink and one expand launch for
every adapter of the batch) or its reference, as ``fastpeft.ops._dispatch.use_triton`` decides.
"""

from __future__ import annotations

import torch

from fastpeft.kernels import reference
from fastpeft.ops._dispatch import use_triton

__all__ = ["BATCHED_RANKS", "lora_batched_delta", "lora_batched_expand"]

BATCHED_RANKS = reference.LORA_BATCHED_RANKS
"""Padded ranks of the stacked adapters the op accepts."""


def lora_batched_delta(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor,
    adapter_index: torch.Tensor,
    bias: torch.Tensor | None = None,
    plan: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Add each row's adapter update into ``y [M, N]`` in place and return it; arguments as
    ``fastpeft.kernels.lora_batched.lora_batched_delta`` (``adapter_index`` on the host; ``plan``, its tiles
    on y's device, is used by the Triton path only)."""
    if use_triton(y):
        from fastpeft.kernels.lora_batched import lora_batched_delta as launch

        return launch(y, x, lora_a, lora_b, scales, adapter_index, bias, plan=plan)
    return reference.lora_batched_delta_reference(y, x, lora_a, lora_b, scales, adapter_index, bias)


def lora_batched_expand(
    y: torch.Tensor,
    u: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor,
    adapter_index: torch.Tensor,
    bias: torch.Tensor | None = None,
    plan: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``lora_batched_delta`` from given ``u [M, R]`` float32 (a LoRA embedding's gathered rows of A)."""
    if use_triton(y):
        from fastpeft.kernels.lora_batched import lora_batched_expand as launch

        return launch(y, u, lora_b, scales, adapter_index, bias, plan=plan)
    return reference.lora_batched_expand_reference(y, u, lora_b, scales, adapter_index, bias)
