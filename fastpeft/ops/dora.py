r"""DoRA's per-row weight norm from low-rank terms, and the magnitude scaling after the fused LoRA op.

DoRA (weight-decomposed LoRA, Liu et al. 2024, arXiv:2402.09353) computes, for a frozen base ``W [N, K]``
(dense or NF4), the LoRA pair ``A [R, K]``, ``B [N, R]``, scaling ``s`` and the trained magnitude ``m [N]``::

    W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖          (the norm of each output row n)
    Y  = X·W'ᵀ + bias = f ⊙ (X·Wᵀ + s·X·Aᵀ·Bᵀ) + bias,   f = m / ‖W + s·B·A‖

The norm is a constant in the backward (detached, section 4.3 of the paper and HF PEFT), so the gradient
of ``m`` is ``Σ_rows dY ⊙ (X·Wᵀ + s·X·Aᵀ·Bᵀ) / ‖·‖`` and that of the fused op's output is ``f ⊙ dY``: plain
autograd over a row scaling of ``lora_linear``'s output. The norm never forms ``W + s·B·A``::

    ‖W_n + s·B_n·A‖² = ‖W_n‖² + 2s·B_n·(A·W_nᵀ) + s²·B_n·(A·Aᵀ)·B_nᵀ

``‖W_n‖²`` is fixed for a frozen base (callers cache it), ``A·Wᵀ`` is one skinny pass of the base over the
``R`` rows of ``A`` (the NF4 op's decode-size path on a GPU) and the rest is rank-sized. There is no DoRA
kernel yet: the terms run in plain torch (``kernels/reference.py``) on every device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastpeft.kernels import reference
from fastpeft.kernels.formats import NF4Args
from fastpeft.ops.lora import nf4_linear

__all__ = ["dora_row_norm", "dora_weight_sq"]

Tensor = torch.Tensor


def dora_weight_sq(weight: Tensor | None, nf4: NF4Args | None) -> Tensor:
    """``‖W_n‖²`` ``[N]`` float32 of the frozen base (dense ``weight [N, K]`` or ``nf4``), in row chunks."""
    return reference.dora_weight_sq_reference(weight.detach() if weight is not None else None, nf4)


def dora_row_norm(
    weight: Tensor | None,
    nf4: NF4Args | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: float | Tensor,
    weight_sq: Tensor | None = None,
) -> Tensor:
    """``‖W_n + s·B_n·A‖`` ``[N]`` float32, detached (no gradient reaches A, B or the scaling through it).

    Args:
        weight: dense base ``[N, K]``, or None when ``nf4`` gives the base.
        nf4: an NF4 base instead of ``weight``.
        lora_a: ``[R, K]``. lora_b: ``[N, R]``. scaling: ``s`` (a 0-d tensor under ``torch.compile``).
        weight_sq: ``dora_weight_sq(weight, nf4)`` when the caller holds it; computed here otherwise.
    """
    if (weight is None) == (nf4 is None):
        raise ValueError("pass exactly one of weight (a dense base) and nf4 (a quantized base)")
    a, b = lora_a.detach(), lora_b.detach()
    if isinstance(scaling, Tensor):
        scaling = scaling.detach()
    if weight_sq is None:
        weight_sq = dora_weight_sq(weight, nf4)
    if nf4 is None:
        # W's own dtype: a float32 copy of a 16-bit W would be the [N, K] temporary this avoids
        a_wt = F.linear(a.to(weight.dtype), weight.detach()).float()
    else:
        a_wt = nf4_linear(a.float(), None, nf4)
    return reference.dora_row_norm_reference(weight_sq.detach(), a_wt, a, b, scaling)
