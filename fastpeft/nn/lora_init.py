"""LoRA initializations that start from the base weight (HF PEFT's ``init_lora_weights`` strings).

Each takes the base weight ``W [out, in]`` in float32, the rank ``r`` and the scaling ``s`` and returns
``A [r, in]``, ``B [out, r]`` and the residual base weight ``W' = W - s·B·A``, so that the adapted layer
starts out computing exactly ``W`` (up to rounding):

- ``"pissa"`` (Meng et al. 2024, arXiv:2404.02948): ``W = U·S·Vᵀ``; the top ``r`` singular triplets move
  into the adapter, ``B = U_r·sqrt(S_r / s)``, ``A = sqrt(S_r / s)·V_rᵀ``.
- ``"pissa_niter_K"``: the same from ``torch.svd_lowrank`` with ``K`` subspace iterations (fast, randomized).
- ``"olora"`` (Büyükakyüz 2024, arXiv:2406.01775): ``W = Q·R``; ``B = Q[:, :r]``, ``A = R[:r]``.
- ``"orthogonal"``: A and B drawn from the two halves (even / odd rows) of a random ``r × r`` orthogonal
  matrix, so ``B·A = 0`` and the base is unchanged; both scaled by 1/10 as HF PEFT does. ``r`` must be even.

The random draws follow HF PEFT's order (``randn(r, r)``, ``randn(in, r/2)``, ``randn(r/2, out)``) so one
seed gives the same adapter in both libraries.
"""

from __future__ import annotations

import re

import torch

__all__ = ["init_from_weight", "is_weight_init"]

_WEIGHT_INITS = re.compile(r"pissa|pissa_niter_\d+|olora|orthogonal")


def is_weight_init(init: object) -> bool:
    """True for an ``init_lora_weights`` value handled here."""
    return isinstance(init, str) and _WEIGHT_INITS.fullmatch(init.lower()) is not None


@torch.no_grad()
def init_from_weight(
    init: str, weight: torch.Tensor, r: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(A [r, in], B [out, r], residual [out, in] or None)`` for ``init`` (see module doc), all float32.

    Args:
        init: ``"pissa"``, ``"pissa_niter_K"``, ``"olora"`` or ``"orthogonal"``.
        weight: the base weight ``[out, in]`` (any float dtype; computed in float32).
        r: rank; at most ``min(out, in)`` for the SVD / QR based ones.
        scaling: the adapter's ``s``.

    Returns:
        ``residual`` is None when the base weight stays as it is (``"orthogonal"``).

    Raises:
        ValueError: an unknown ``init``, ``r`` larger than the weight allows, or odd ``r`` for ``"orthogonal"``.
    """
    name = init.lower()
    out_f, in_f = weight.shape
    if name == "orthogonal":
        if r % 2:
            raise ValueError(f"Orthogonal initialization requires the LoRA rank to be even, got {r} instead.")
        q, _ = torch.linalg.qr(torch.randn(r, r))
        # Rows of an orthogonal matrix are orthonormal: (even rows)·(odd rows)ᵀ = 0, hence B·A = 0.
        a = (torch.randn(in_f, r // 2) @ q[0::2, :]).T / 10.0
        b = torch.randn(r // 2, out_f).T @ q[1::2, :] / 10.0
        return a.contiguous(), b.contiguous(), None
    if r > min(out_f, in_f):
        raise ValueError(f"init_lora_weights={init!r} needs r <= min(out, in) = {min(out_f, in_f)}, got r={r}")
    w = weight.detach().to(torch.float32)
    if name == "olora":
        q, rr = torch.linalg.qr(w)
        a, b = rr[:r].contiguous(), q[:, :r].contiguous()
    elif name == "pissa" or name.startswith("pissa_niter_"):
        if name == "pissa":
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            u, s, vh = u[:, :r], s[:r], vh[:r]
        else:
            u, s, v = torch.svd_lowrank(w, q=r, niter=int(name.removeprefix("pissa_niter_")))
            vh = v.T
        root = torch.sqrt(s / scaling)
        a, b = (root[:, None] * vh).contiguous(), (u * root[None, :]).contiguous()
    else:
        raise ValueError(f"unknown init_lora_weights={init!r}")
    return a, b, w - scaling * (b @ a)
