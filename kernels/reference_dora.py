"""Plain-PyTorch twins of the DoRA launchers (``kernels/dora_linear.py``) and of the row-scaled NF4 dequantize.

The DoRA part of ``kernels/reference.py`` (the CPU path, the test oracle, the readable specification), kept in a
file of its own. Same signatures and contracts as the launchers; accumulation in float32 (float64 stays float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastpeft.kernels.formats import NESTED_BLOCKSIZE, NF4Args
from fastpeft.kernels.reference import _acc, _base_weight, nf4_dequantize_reference

__all__ = [
    "dora_colsum_reference",
    "dora_dm_reference",
    "dora_epilogue_reference",
    "dora_factors_reference",
    "dora_linear_bwd_reference",
    "dora_linear_fwd_reference",
    "nf4_dequantize_scaled_reference",
]


def nf4_dequantize_scaled_reference(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    numel: int,
    dtype: torch.dtype = torch.float32,
    *,
    blocksize: int = 64,
    nested_absmax: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    quant_map: torch.Tensor | None = None,
    nested_quant_map: torch.Tensor | None = None,
    nested_blocksize: int = NESTED_BLOCKSIZE,
    row_scale: torch.Tensor,
    row_len: int,
) -> torch.Tensor:
    """``nf4_dequantize(..., row_scale=c, row_len=K)``: ``c[n]·W[n, k]`` flat ``[numel]``, scaled in float32 and
    rounded once to ``dtype``."""
    w = nf4_dequantize_reference(
        packed, absmax, numel, torch.float32, blocksize=blocksize, nested_absmax=nested_absmax, offset=offset,
        quant_map=quant_map, nested_quant_map=nested_quant_map, nested_blocksize=nested_blocksize,
    )  # fmt: skip
    return (w.view(-1, row_len) * row_scale.float()[:, None]).reshape(-1).to(dtype)


def dora_epilogue_reference(
    base: torch.Tensor, f: torch.Tensor, u: torch.Tensor, lora_b: torch.Tensor, scaling: float,
    bias: torch.Tensor | None, out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """``OUT = f ⊙ (BASE + s·U·Bᵀ) + bias`` in float32, rounded once to base's dtype (into ``out`` if given)."""
    acc = _acc(base)
    y = torch.addmm(base.to(acc), u.to(acc), lora_b.to(acc).t(), alpha=scaling) * f.to(acc)
    if bias is not None:
        y += bias.to(acc)
    if out is None:
        return y.to(base.dtype)
    return out.copy_(y)


def dora_factors_reference(
    norm: torch.Tensor, magnitude: torch.Tensor, lora_b: torch.Tensor, scaling: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """What a DoRA step needs of the row norm (``dora_norm_factors_fwd``'s contract): ``F [2, N]`` float32 holding
    ``f = m / norm`` and ``s·f``, and ``f ⊙ B [N, R]`` in ``dtype`` (B rounded to ``dtype`` first, as the op's cast
    of B does, scaled in float32, rounded once)."""
    f = magnitude.float() / norm.float()
    factors = torch.stack((f, scaling * f))
    return factors, (lora_b.to(dtype).float() * f[:, None]).to(dtype)


def dora_colsum_reference(
    dy: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None, f: torch.Tensor, write_gf: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(Σ_i dY, Σ_i dY ⊙ (Y − bias), dY ⊙ f)``: the two sums in float32 ``[N]``, ``dY ⊙ f`` in dy's dtype or None."""
    acc = _acc(dy)
    g = dy.to(acc)
    y0 = y.to(acc) if bias is None else y.to(acc) - bias.to(acc)
    gf = (g * f.to(acc)).to(dy.dtype) if write_gf else None
    return g.sum(0), (g * y0).sum(0), gf


def dora_linear_fwd_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    *,
    nf4: NF4Args | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Y = f ⊙ (X·Wᵀ + s·U·Bᵀ) + bias`` and ``U = X·Aᵀ``, ``f = m / norm``.

    Args:
        x: ``[M, K]``. weight: dense ``[N, K]``, or None with ``nf4``. bias: ``[N]`` or None. lora_a: ``[R, K]``.
        lora_b: ``[N, R]``. scaling: ``s``. magnitude: ``m [N]``. norm: ``‖W + s·B·A‖`` ``[N]`` (detached).

    Returns:
        ``y [M, N]`` and ``u [M, R]`` in x's dtype (the LoRA term from U rounded to x's dtype, as the kernels).

    Evaluated in HF PEFT's order, ``base + ((f − 1) ⊙ (base − bias) + f ⊙ (U·Bᵀ) · s)`` with ``base`` the base
    layer's own ``F.linear`` (bias inside the product): in float32 that is peft's result bit for bit, and a DoRA
    adapter at its initialization (``f = 1``, ``B = 0``) returns the base layer's output exactly.
    """
    acc = _acc(x)
    xf = x.to(acc)
    u = (xf @ lora_a.to(acc).t()).to(x.dtype)
    b = None if bias is None else bias.to(acc)
    base = F.linear(xf, _base_weight(weight, nf4, acc), b)
    f = magnitude.to(acc) / norm.to(acc)
    lora = u.to(acc) @ lora_b.to(acc).t()
    y = base + ((f - 1) * (base if b is None else base - b) + f * lora * scaling)
    return y.to(x.dtype), u


def dora_linear_bwd_reference(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    u: torch.Tensor,
    y: torch.Tensor,
    scaling: float,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    *,
    nf4: NF4Args | None = None,
    needs_dx: bool = True,
    needs_da: bool = True,
    needs_db: bool = True,
    needs_dbias: bool = False,
    needs_dm: bool = True,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of ``dora_linear_fwd``, the norm a constant. With ``Gf = dY ⊙ f`` and ``Y0 = (Y − bias) / f``::

        dX = Gf·W + s·(Gf·B)·A     dA = s·(Gf·B)ᵀ·X     dB = s·Gfᵀ·U     dbias = Σ_i dY
        dm_n = Σ_i dY[i, n]·(Y[i, n] − bias_n) / m_n   (m_n = 0: Σ_i dY[i, n]·Y0[i, n] / norm_n, Y0 recomputed)

    Returns ``(dx, da, db, dbias, dm)`` in the dtypes of ``x, lora_a, lora_b, dy, magnitude``; None where not asked.
    """
    acc = _acc(dy)
    f = magnitude.to(acc) / norm.to(acc)
    g = dy.to(acc)
    gf = g * f
    a, b = lora_a.to(acc), lora_b.to(acc)
    gb = gf @ b
    dx = da = db = dbias = dm = None
    w = _base_weight(weight, nf4, acc) if needs_dx else None
    if needs_dx:
        dx = (gf @ w).addmm_(gb, a, alpha=scaling).to(x.dtype)
    if needs_da:
        da = (scaling * gb.t() @ x.to(acc)).to(lora_a.dtype)
    if needs_db:
        db = (gf.t() @ (scaling * u.to(acc))).to(lora_b.dtype)
    if needs_dbias:
        dbias = g.sum(0).to(dy.dtype)
    if needs_dm:
        y0 = y.to(acc) if bias is None else y.to(acc) - bias.to(acc)
        part = torch.stack((g.sum(0), (g * y0).sum(0)))[:, None]  # one slice
        dm = dora_dm_reference(part, False, dy, x, weight, nf4, lora_b, u, scaling, magnitude, norm)[1]
        dm = dm.to(magnitude.dtype)
    return dx, da, db, dbias, dm


def dora_dm_reference(
    part: torch.Tensor, needs_dbias: bool, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
    nf4: NF4Args | None, lora_b: torch.Tensor, u: torch.Tensor, scaling: float, magnitude: torch.Tensor,
    norm: torch.Tensor,
) -> tuple[torch.Tensor | None, torch.Tensor]:  # fmt: skip
    """``dora_dm``'s twin: ``(dbias, dm)`` from the column partials ``PART [2, S, N]`` (slices of ``Σ dY`` and
    ``Σ dY ⊙ (Y − bias)``): ``dbias = Σ_s PART[0]`` in dy's dtype (None unless asked), ``dm = Σ_s PART[1] / m``,
    and where ``m_n = 0`` (Y holds only the bias) ``dm_n = Σ_i dY[i, n]·(X_i·W_nᵀ + s·U_i·B_nᵀ) / norm_n``."""
    acc = _acc(dy)
    sums = part.to(acc).sum(1)
    dm = sums[1] / magnitude.to(acc)
    zero = magnitude == 0
    if bool(zero.any()):  # Y0's columns from X and those rows of W
        w = _base_weight(weight, nf4, acc)
        y0z = x.to(acc) @ w[zero].t() + scaling * u.to(acc) @ lora_b.to(acc)[zero].t()
        dm[zero] = (dy.to(acc)[:, zero] * y0z).sum(0) / norm.to(acc)[zero]
    return (sums[0].to(dy.dtype) if needs_dbias else None), dm
