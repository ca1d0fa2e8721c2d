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
``R`` rows of ``A`` (the NF4 op's decode-size path on a GPU) and the rest is rank-sized; the terms run in plain
torch (``kernels/reference.py``) on every device.

``dora_linear`` is the layer's whole forward without dropout, ``Y = f ⊙ (X·Wᵀ + s·X·Aᵀ·Bᵀ) + bias``, as one custom
op whose backward treats the norm as a constant: on CUDA ``kernels/dora_linear.py`` (the scaling in the GEMM
epilogue, or in the dequantized NF4 scratch), elsewhere ``kernels/reference_dora.py``. Its backward keeps the op's
output, not ``X·Wᵀ + s·X·Aᵀ·Bᵀ`` (the kernel module's docstring has the math and the ``m_n = 0`` case).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor

from fastpeft.kernels import dora_norm, reference, reference_dora
from fastpeft.kernels.formats import NF4Args
from fastpeft.ops._checks import check_floating
from fastpeft.ops._dispatch import use_triton
from fastpeft.ops.lora import _flat_nf4, _nf4, nf4_linear

__all__ = ["dora_linear", "dora_norm_factors", "dora_row_norm", "dora_weight_sq"]

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
    return _norm(weight, nf4, lora_a, lora_b, scaling, weight_sq, None, None, None)[0]


def dora_norm_factors(
    weight: Tensor | None,
    nf4: NF4Args | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: float | Tensor,
    magnitude: Tensor,
    dtype: torch.dtype,
    weight_sq: Tensor | None = None,
    lora_a_cast: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(norm, factors, scaled_b)`` for a training step's ``dora_linear``: the row norm as ``dora_row_norm``, and
    where the norm kernel runs (a GPU, R <= 32, a float scaling, outside ``torch.compile``) also ``factors [2, N]``
    (``f = m / norm``, ``s·f``) and ``f ⊙ B`` in ``dtype`` from the same launch; None, None elsewhere
    (``dora_linear`` then forms them itself). Arguments as ``dora_row_norm``, plus the magnitude ``m [N]``, the
    op's ``dtype`` and ``lora_a_cast``, A already cast by the caller (the pass over the base takes it instead of
    casting A again where its dtype fits: 16-bit for NF4, W's for a dense base)."""
    return _norm(weight, nf4, lora_a, lora_b, scaling, weight_sq, magnitude, dtype, lora_a_cast)


def _norm(weight, nf4, lora_a, lora_b, scaling, weight_sq, magnitude, dtype, lora_a_cast) -> tuple:
    if (weight is None) == (nf4 is None):
        raise ValueError("pass exactly one of weight (a dense base) and nf4 (a quantized base)")
    a, b = lora_a.detach(), lora_b.detach()
    if isinstance(scaling, Tensor):
        scaling = scaling.detach()
    if weight_sq is None:
        weight_sq = dora_weight_sq(weight, nf4)
    if nf4 is None:
        # W's own dtype: a float32 copy of a 16-bit W would be the [N, K] temporary this avoids
        same = lora_a_cast is not None and lora_a_cast.dtype == weight.dtype
        a_wt = F.linear(lora_a_cast.detach() if same else a.to(weight.dtype), weight.detach())
    elif nf4.packed.is_cuda:
        # 16-bit A takes the NF4 decode kernel (R <= 64 rows: one skinny pass over the packed base, float32
        # accumulation); float32 A would dequantize the whole base into a float32 [N, K] scratch first
        low = lora_a_cast is not None and lora_a_cast.dtype in (torch.bfloat16, torch.float16)
        a_wt = nf4_linear(lora_a_cast.detach() if low else a.to(torch.bfloat16), None, nf4)
    else:
        a_wt = nf4_linear(a.float(), None, nf4)
    if (use_triton(a_wt) and dora_norm.supported(a) and not isinstance(scaling, Tensor)
            and not torch.compiler.is_compiling() and not isinstance(a_wt, FakeTensor)):  # fmt: skip
        # the rank-sized rest in one launch; A·Wᵀ read in its own dtype
        if magnitude is None:
            return dora_norm.dora_row_norm_fwd(weight_sq.detach(), a_wt, a, b, scaling), None, None
        return dora_norm.dora_norm_factors_fwd(weight_sq.detach(), a_wt, a, b, scaling, magnitude, dtype)
    return reference.dora_row_norm_reference(weight_sq.detach(), a_wt, a, b, scaling), None, None


# ----------------------------------------------------------------------------------------------
# fastpeft::dora_linear_fwd / fastpeft::dora_linear_bwd
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("fastpeft::dora_linear_fwd", mutates_args=())
def dora_linear_fwd(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: float,
    magnitude: Tensor,
    norm: Tensor,
    factors: Tensor | None,
    scaled_b: Tensor | None,
    packed: Tensor | None,
    absmax: Tensor | None,
    n: int,
    k: int,
    blocksize: int,
    nested_absmax: Tensor | None,
    offset: Tensor | None,
    quant_map: Tensor | None,
    nested_quant_map: Tensor | None,
    nested_blocksize: int,
) -> tuple[Tensor, Tensor]:
    """``(Y [M, N], U [M, R])`` of the fused DoRA linear; see ``dora_linear_fwd_reference``. ``factors`` and
    ``scaled_b`` (``dora_norm_factors``; None to form them here) are what the kernels take of m and the norm."""
    nf4 = _nf4(packed, absmax, n, k, blocksize, nested_absmax, offset, quant_map, nested_quant_map, nested_blocksize)
    if use_triton(x):
        from fastpeft.kernels.dora_linear import dora_linear_fwd as launch

        return launch(x, weight, bias, lora_a, lora_b, scaling, magnitude, norm, nf4=nf4, factors=factors,
                      scaled_b=scaled_b)  # fmt: skip
    return reference_dora.dora_linear_fwd_reference(x, weight, bias, lora_a, lora_b, scaling, magnitude, norm, nf4=nf4)


@dora_linear_fwd.register_fake
def _(x, weight, bias, lora_a, lora_b, scaling, magnitude, norm, factors, scaled_b, *nf4_flat):
    m = x.shape[0]
    return x.new_empty((m, lora_b.shape[0])), x.new_empty((m, lora_a.shape[0]))


@torch.library.custom_op("fastpeft::dora_linear_bwd", mutates_args=())
def dora_linear_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    u: Tensor,
    y: Tensor,
    scaling: float,
    magnitude: Tensor,
    norm: Tensor,
    factors: Tensor | None,
    scaled_b: Tensor | None,
    packed: Tensor | None,
    absmax: Tensor | None,
    n: int,
    k: int,
    blocksize: int,
    nested_absmax: Tensor | None,
    offset: Tensor | None,
    quant_map: Tensor | None,
    nested_quant_map: Tensor | None,
    nested_blocksize: int,
    needs_dx: bool,
    needs_da: bool,
    needs_db: bool,
    needs_dbias: bool,
    needs_dm: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dX, dA, dB, dbias, dm)``, an empty ``[0]`` tensor where not asked; see ``dora_linear_bwd_reference``."""
    nf4 = _nf4(packed, absmax, n, k, blocksize, nested_absmax, offset, quant_map, nested_quant_map, nested_blocksize)
    needs = {"needs_dx": needs_dx, "needs_da": needs_da, "needs_db": needs_db, "needs_dbias": needs_dbias,
             "needs_dm": needs_dm}  # fmt: skip
    if use_triton(dy):
        from fastpeft.kernels.dora_linear import dora_linear_bwd as launch

        grads = launch(dy, x, weight, bias, lora_a, lora_b, u, y, scaling, magnitude, norm, nf4=nf4, factors=factors,
                       scaled_b=scaled_b, **needs)  # fmt: skip
    else:
        grads = reference_dora.dora_linear_bwd_reference(
            dy, x, weight, bias, lora_a, lora_b, u, y, scaling, magnitude, norm, nf4=nf4, **needs
        )
    return tuple(g if g is not None else dy.new_empty((0,)) for g in grads)


@dora_linear_bwd.register_fake
def _(dy, x, weight, bias, lora_a, lora_b, u, y, scaling, magnitude, norm, factors, scaled_b, *rest):
    needs_dx, needs_da, needs_db, needs_dbias, needs_dm = rest[-5:]
    empty = dy.new_empty((0,))
    return (
        x.new_empty(x.shape) if needs_dx else empty,
        lora_a.new_empty(lora_a.shape) if needs_da else empty,
        lora_b.new_empty(lora_b.shape) if needs_db else empty,
        dy.new_empty((dy.shape[1],)) if needs_dbias else empty,
        magnitude.new_empty(magnitude.shape) if needs_dm else empty,
    )


def _dora_setup_context(ctx, inputs: Sequence, output: tuple[Tensor, Tensor]) -> None:
    (x, weight, bias, lora_a, lora_b, scaling, magnitude, norm, factors, scaled_b, packed, absmax, n, k, blocksize,
     nested_absmax, offset, quant_map, nested_quant_map, nested_blocksize) = inputs  # fmt: skip
    y, u = output
    ctx.mark_non_differentiable(u)
    ctx.set_materialize_grads(False)
    # Y itself, not X·Wᵀ + s·U·Bᵀ: dm is recovered from it (no [M, N] kept beyond the output)
    ctx.save_for_backward(x, weight, bias, lora_a, lora_b, u, y, magnitude, norm, factors, scaled_b, packed, absmax,
                          nested_absmax, offset, quant_map, nested_quant_map)  # fmt: skip
    ctx.consts = (scaling, n, k, blocksize, nested_blocksize)


def _dora_backward(ctx, dy: Tensor | None, _du: Tensor | None) -> tuple:
    """With Gf = dY ⊙ f: dX = Gf·W + s·(Gf·B)·A, dA = s·(Gf·B)ᵀ·X, dB = s·Gfᵀ·U, dbias = Σ dY,
    dm = Σ_i dY ⊙ (Y − bias) / m; the norm, W and the scaling get none."""
    n_inputs = 20
    needs = ctx.needs_input_grad
    flags = (needs[0], needs[3], needs[4], needs[2], needs[6])  # dx, da, db, dbias, dm
    if dy is None or not any(flags):
        return (None,) * n_inputs
    (x, weight, bias, lora_a, lora_b, u, y, magnitude, norm, factors, scaled_b, packed, absmax, nested_absmax, offset,
     quant_map, nested_quant_map) = ctx.saved_tensors  # fmt: skip
    scaling, n, k, blocksize, nested_blocksize = ctx.consts
    dx, da, db, dbias, dm = dora_linear_bwd(
        dy.contiguous(), x, weight, bias, lora_a, lora_b, u, y, scaling, magnitude, norm, factors, scaled_b, packed,
        absmax, n, k, blocksize, nested_absmax, offset, quant_map, nested_quant_map, nested_blocksize, *flags,
    )  # fmt: skip
    grads = [None] * n_inputs
    for i, g, wanted in ((0, dx, flags[0]), (3, da, flags[1]), (4, db, flags[2]), (2, dbias, flags[3]),
                         (6, dm, flags[4])):  # fmt: skip
        grads[i] = g if wanted else None
    return tuple(grads)


torch.library.register_autograd("fastpeft::dora_linear_fwd", _dora_backward, setup_context=_dora_setup_context)


def dora_linear(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: float,
    magnitude: Tensor,
    norm: Tensor,
    *,
    nf4: NF4Args | None = None,
    factors: Tensor | None = None,
    scaled_b: Tensor | None = None,
) -> Tensor:
    """``Y = f ⊙ (X·Wᵀ + s·X·Aᵀ·Bᵀ) + bias``, ``f = m / norm``, differentiable in X, A, B, bias and m (never W; the
    norm is a constant). No dropout: DoRA with dropout in training keeps its two-pass form (``nn.lora_dora``).

    Args:
        x: ``[..., K]``; weight / bias / lora_a / lora_b in x's dtype (the caller casts).
        weight: dense base ``[N, K]``, or None when ``nf4`` gives the base.
        bias: ``[N]`` or None. lora_a: ``[R, K]``. lora_b: ``[N, R]``. scaling: ``s``.
        magnitude: ``m [N]`` (any float dtype; its gradient comes back in it).
        norm: ``‖W + s·B·A‖`` ``[N]`` (``dora_row_norm``), used detached, as float32.
        factors, scaled_b: ``dora_norm_factors``'s two, from this ``m`` and ``norm`` (the op then forms neither
            ``f`` nor ``f ⊙ B`` itself, forward or backward); None for the op to form them.

    Returns:
        ``[..., N]`` in x's dtype.
    """
    if (weight is None) == (nf4 is None):
        raise ValueError("pass exactly one of weight (a dense base) and nf4 (a quantized base)")
    check_floating(x=x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b, magnitude=magnitude, norm=norm)
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("weight requires grad, but dora_linear's base is frozen: pass weight.detach()")
    k = lora_a.shape[-1]
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features in its last dim, lora_a expects {k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()
    norm = norm.detach().float().contiguous()
    # the custom op on every device (no plain-Function twin as lora_linear has): the memory model's fake-tensor
    # trace then sees what a real CPU step saves (a Function twin saved differently under checkpointing)
    if (factors is None) != (scaled_b is None):
        raise ValueError("pass both factors and scaled_b (dora_norm_factors) or neither")
    y, _ = dora_linear_fwd(x2, weight, bias, lora_a, lora_b, float(scaling), magnitude, norm, factors, scaled_b,
                           *_flat_nf4(nf4))  # fmt: skip
    return y.view(*lead, y.shape[-1])
