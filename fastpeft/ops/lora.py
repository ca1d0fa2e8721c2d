"""LoRA / QLoRA linear as ``torch.library`` custom ops with autograd, and the NF4 base linear.

``lora_linear`` computes, for ``x [..., K]``, a frozen base ``W [N, K]`` (dense, or NF4 via ``nf4``),
``A [R, K]``, ``B [N, R]`` and scaling ``s``::

    Y = X·Wᵀ + bias + s·(drop(X)·Aᵀ)·Bᵀ

Forward and backward run ``fastpeft.kernels.lora_linear`` on CUDA (or with ``FASTPEFT_BACKEND=triton``)
and ``fastpeft.kernels.reference`` otherwise. ``NF4Args`` is flattened into tensor and int arguments
because an op schema cannot carry a NamedTuple. ``W`` is frozen: it never receives a gradient.

``nf4_linear`` is ``X·dequant(W)ᵀ + bias`` for a plain NF4 layer. On the Triton path its forward and its
``dX = dY·dequant(W)`` run the fused GEMM with ``W`` dequantized tile by tile in registers, so no dense
weight is ever materialized, let alone kept alive between forward and backward (the QLoRA memory saving);
the reference path dequantizes in each call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch._subclasses.fake_tensor import FakeTensor

from fastpeft.kernels import reference
from fastpeft.kernels.formats import FLOAT_DTYPES, NESTED_BLOCKSIZE, NF4Args
from fastpeft.ops._checks import check_floating
from fastpeft.ops._dispatch import use_triton

__all__ = ["lora_linear", "make_dropout_mask", "nf4_linear"]

Tensor = torch.Tensor


def _nf4(
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
) -> NF4Args | None:
    """Rebuild the ``NF4Args`` that ``_flat_nf4`` took apart (None for a dense base)."""
    if packed is None:
        return None
    return NF4Args(packed, absmax, (n, k), blocksize, nested_absmax, offset, quant_map, nested_quant_map,
                   nested_blocksize)  # fmt: skip


def _flat_nf4(nf4: NF4Args | None) -> tuple:
    """``NF4Args`` as the op schema's ``packed, absmax, n, k, blocksize, nested_absmax, offset,
    quant_map, nested_quant_map, nested_blocksize`` arguments."""
    if nf4 is None:
        return (None, None, 0, 0, 64, None, None, None, None, NESTED_BLOCKSIZE)
    n, k = nf4.shape
    return (nf4.packed, nf4.absmax, int(n), int(k), nf4.blocksize, nf4.nested_absmax, nf4.offset, nf4.quant_map,
            nf4.nested_quant_map, nf4.nested_blocksize)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# fastpeft::lora_linear_fwd / fastpeft::lora_linear_bwd
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("fastpeft::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: float,
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
    dropout_mask: Tensor | None,
    dropout_p: float,
) -> tuple[Tensor, Tensor]:
    """``(Y [M, N], U [M, R])`` of the fused LoRA linear; see ``lora_linear_fwd_reference``."""
    nf4 = _nf4(packed, absmax, n, k, blocksize, nested_absmax, offset, quant_map, nested_quant_map, nested_blocksize)
    if use_triton(x):
        from fastpeft.kernels.lora_linear import lora_linear_fwd as launch
    else:
        launch = reference.lora_linear_fwd_reference
    y, u = launch(x, weight, bias, lora_a, lora_b, scaling, nf4=nf4, dropout_mask=dropout_mask, dropout_p=dropout_p)
    return y, u


@lora_linear_fwd.register_fake
def _(x, weight, bias, lora_a, lora_b, scaling, packed, absmax, n, k, blocksize, nested_absmax, offset, quant_map,
      nested_quant_map, nested_blocksize, dropout_mask, dropout_p):  # fmt: skip
    m = x.shape[0]
    return x.new_empty((m, lora_b.shape[0])), x.new_empty((m, lora_a.shape[0]))


@torch.library.custom_op("fastpeft::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    u: Tensor,
    scaling: float,
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
    dropout_mask: Tensor | None,
    dropout_p: float,
    needs_dx: bool,
    needs_da: bool,
    needs_db: bool,
    needs_dbias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dX, dA, dB, dbias)``; see ``lora_linear_bwd_reference``.

    An op cannot return None, so a gradient that was not asked for comes back as an empty ``[0]``
    tensor (``_none_if_empty`` turns it back into None).
    """
    nf4 = _nf4(packed, absmax, n, k, blocksize, nested_absmax, offset, quant_map, nested_quant_map, nested_blocksize)
    if use_triton(dy):
        from fastpeft.kernels.lora_linear import lora_linear_bwd as launch
    else:
        launch = reference.lora_linear_bwd_reference
    grads = launch(
        dy, x, weight, lora_a, lora_b, u, scaling, nf4=nf4, dropout_mask=dropout_mask, dropout_p=dropout_p,
        needs_dx=needs_dx, needs_da=needs_da, needs_db=needs_db, needs_dbias=needs_dbias,
    )  # fmt: skip
    dx, da, db, dbias = (g if g is not None else dy.new_empty((0,)) for g in grads)
    return dx, da, db, dbias


@lora_linear_bwd.register_fake
def _(dy, x, weight, lora_a, lora_b, *rest):
    # the schema's last four arguments are the needs_dx, needs_da, needs_db, needs_dbias flags
    needs_dx, needs_da, needs_db, needs_dbias = rest[-4:]
    empty = dy.new_empty((0,))
    return (
        x.new_empty(x.shape) if needs_dx else empty,
        lora_a.new_empty(lora_a.shape) if needs_da else empty,
        lora_b.new_empty(lora_b.shape) if needs_db else empty,
        dy.new_empty((dy.shape[1],)) if needs_dbias else empty,
    )


def _none_if_empty(t: Tensor, wanted: bool) -> Tensor | None:
    return t if wanted else None


def _lora_setup_context(ctx, inputs: Sequence, output: tuple[Tensor, Tensor]) -> None:
    (x, weight, _bias, lora_a, lora_b, scaling, packed, absmax, n, k, blocksize, nested_absmax, offset, quant_map,
     nested_quant_map, nested_blocksize, dropout_mask, dropout_p) = inputs  # fmt: skip
    _, u = output
    # U is an internal product kept for dB; nothing outside differentiates through it.
    ctx.mark_non_differentiable(u)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, lora_a, lora_b, u, packed, absmax, nested_absmax, offset, quant_map,
                          nested_quant_map, dropout_mask)  # fmt: skip
    ctx.consts = (scaling, n, k, blocksize, nested_blocksize, dropout_p)


def _lora_backward(ctx, dy: Tensor | None, _du: Tensor | None) -> tuple:
    """dX = dY·W + s·mask/(1-p) ⊙ (dY·B·A), dA = s·(dY·B)ᵀ·drop(X), dB = s·dYᵀ·U, dbias = Σ dY; no dW."""
    n_inputs = 18
    needs = ctx.needs_input_grad
    needs_dx, needs_dbias, needs_da, needs_db = needs[0], needs[2], needs[3], needs[4]
    if dy is None or not (needs_dx or needs_dbias or needs_da or needs_db):
        return (None,) * n_inputs
    (x, weight, lora_a, lora_b, u, packed, absmax, nested_absmax, offset, quant_map, nested_quant_map,
     dropout_mask) = ctx.saved_tensors  # fmt: skip
    scaling, n, k, blocksize, nested_blocksize, dropout_p = ctx.consts
    # dY arrives strided (an expand from .sum(), a transpose); the kernels read it row-major.
    dy = dy.contiguous()
    dx, da, db, dbias = lora_linear_bwd(
        dy, x, weight, lora_a, lora_b, u, scaling, packed, absmax, n, k, blocksize, nested_absmax, offset, quant_map,
        nested_quant_map, nested_blocksize, dropout_mask, dropout_p, needs_dx, needs_da, needs_db, needs_dbias,
    )  # fmt: skip
    grads = [None] * n_inputs
    grads[0] = _none_if_empty(dx, needs_dx)
    grads[2] = _none_if_empty(dbias, needs_dbias)
    grads[3] = _none_if_empty(da, needs_da)
    grads[4] = _none_if_empty(db, needs_db)
    return tuple(grads)


torch.library.register_autograd("fastpeft::lora_linear_fwd", _lora_backward, setup_context=_lora_setup_context)


def make_dropout_mask(
    shape: Sequence[int], p: float, device: torch.device | str, generator: torch.Generator | None = None
) -> Tensor:
    """The keep-mask ``lora_linear`` draws: bool ``shape``, each element True with probability ``1 - p``.

    Drawn as ``torch.rand(shape) >= p``, so re-seeding torch's generator reproduces it.
    """
    return torch.rand(tuple(shape), device=device, generator=generator) >= p


def lora_linear(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: float,
    *,
    nf4: NF4Args | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
) -> Tensor:
    """``Y = X·Wᵀ + bias + s·(drop(X)·Aᵀ)·Bᵀ`` with a frozen base ``W``, differentiable in X, A, B and bias.

    Args:
        x: ``[..., K]``; all operands in one float dtype (the caller casts).
        weight: dense base ``[N, K]``, or None when ``nf4`` gives the base.
        bias: ``[N]`` or None.
        lora_a: ``[R, K]``. lora_b: ``[N, R]``. scaling: ``s`` (alpha / r, or alpha / sqrt(r)).
        nf4: an NF4-quantized base ``[N, K]`` (QLoRA) instead of ``weight``.
        dropout_p: dropout on the LoRA branch's input; a mask is drawn only when ``training`` and p > 0.
        training: apply dropout.

    Returns:
        ``[..., N]`` in x's dtype.

    Raises:
        TypeError: an operand that is not a floating tensor (integers would be computed as integers).
        ValueError: neither or both of ``weight`` and ``nf4``; ``dropout_p`` outside [0, 1); mis-shaped ``x``;
            a ``weight`` that requires grad (the base is frozen).
    """
    if (weight is None) == (nf4 is None):
        raise ValueError("pass exactly one of weight (a dense base) and nf4 (a quantized base)")
    check_floating(x=x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        # The op never computes dW; failing here beats a silently missing gradient.
        raise ValueError("weight requires grad, but lora_linear's base is frozen: pass weight.detach()")
    k = lora_a.shape[-1]
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features in its last dim, lora_a expects {k}")
    lead = x.shape[:-1]
    # The kernels take a row-major [M, K]; reshape copies only when x's layout forces it.
    x2 = x.reshape(-1, k).contiguous()
    mask = make_dropout_mask(x2.shape, dropout_p, x.device) if training and dropout_p > 0.0 else None
    # fake tensors (fastpeft.app.memory's traced step) take the custom ops too: their fake implementations
    # allocate what the GPU kernels return, not the reference's internal temporaries
    if use_triton(x2) or torch.compiler.is_compiling() or isinstance(x2, FakeTensor):
        y, _ = lora_linear_fwd(
            x2, weight, bias, lora_a, lora_b, float(scaling), *_flat_nf4(nf4), mask, float(dropout_p)
        )
    else:
        y = _LoraReference.apply(x2, weight, bias, lora_a, lora_b, float(scaling), mask, float(dropout_p),
                                 *_flat_nf4(nf4))  # fmt: skip
    return y.view(*lead, y.shape[-1])


class _LoraReference(torch.autograd.Function):
    """The reference path (CPU tensors) as a plain autograd Function: the same math as the custom ops
    (forward ``lora_linear_fwd_reference``, backward ``lora_linear_bwd_reference``) without their Python
    dispatch, which cost ~0.2 ms a layer and step (3.4x PEFT's whole per-layer overhead, measured on the
    CPU). ``torch.compile`` still traces the custom ops (``torch.compiler.is_compiling``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, mask, p, packed, absmax, n, k, blocksize,
                nested_absmax, offset, quant_map, nested_quant_map, nested_blocksize):  # fmt: skip
        nf4 = _nf4(packed, absmax, n, k, blocksize, nested_absmax, offset, quant_map, nested_quant_map,
                   nested_blocksize)  # fmt: skip
        # The operands arrive cast (LoraLinear applies autocast's dtype); as in the custom op, forward and
        # backward run in their dtypes, not autocast's.
        with torch.autocast(x.device.type, enabled=False):
            y, u = reference.lora_linear_fwd_reference(x, weight, bias, lora_a, lora_b, scaling, nf4=nf4,
                                                       dropout_mask=mask, dropout_p=p)  # fmt: skip
        ctx.save_for_backward(x, weight, lora_a, lora_b, u, mask, packed, absmax, nested_absmax, offset, quant_map,
                              nested_quant_map)  # fmt: skip
        ctx.consts = (scaling, p, n, k, blocksize, nested_blocksize)
        return y

    @staticmethod
    def backward(ctx, dy):
        (x, weight, lora_a, lora_b, u, mask, packed, absmax, nested_absmax, offset, quant_map,
         nested_quant_map) = ctx.saved_tensors  # fmt: skip
        scaling, p, n, k, blocksize, nested_blocksize = ctx.consts
        nf4 = _nf4(packed, absmax, n, k, blocksize, nested_absmax, offset, quant_map, nested_quant_map,
                   nested_blocksize)  # fmt: skip
        needs = ctx.needs_input_grad
        with torch.autocast(dy.device.type, enabled=False):
            dx, da, db, dbias = reference.lora_linear_bwd_reference(
                dy, x, weight, lora_a, lora_b, u, scaling, nf4=nf4, dropout_mask=mask, dropout_p=p,
                needs_dx=needs[0], needs_da=needs[3], needs_db=needs[4], needs_dbias=needs[2],
            )  # fmt: skip
        return (dx, None, dbias, da, db) + (None,) * 13


# ----------------------------------------------------------------------------------------------
# fastpeft::nf4_linear: X·dequant(W)ᵀ + bias for an NF4 layer without LoRA
# ----------------------------------------------------------------------------------------------


def _nf4_triton(t: Tensor) -> bool:
    # float64 (gradcheck) has no kernel: it takes the reference on every device
    return use_triton(t) and t.dtype in FLOAT_DTYPES


@torch.library.custom_op("fastpeft::nf4_linear", mutates_args=())
def nf4_linear_op(
    x: Tensor,
    bias: Tensor | None,
    packed: Tensor,
    absmax: Tensor,
    n: int,
    k: int,
    blocksize: int,
    nested_absmax: Tensor | None,
    offset: Tensor | None,
    quant_map: Tensor | None,
    nested_quant_map: Tensor | None,
    nested_blocksize: int,
) -> Tensor:
    """``X [M, K] · dequant(W)ᵀ + bias -> [M, N]`` in x's dtype; see ``nf4_linear_fwd_reference``."""
    if x.shape[0] == 0:  # an empty batch: nothing to launch (the kernels take non-empty matrices)
        return x.new_empty((0, n))
    nf4 = _nf4(packed, absmax, n, k, blocksize, nested_absmax, offset, quant_map, nested_quant_map, nested_blocksize)
    if _nf4_triton(x):
        from fastpeft.kernels.lora_linear import nf4_linear_fwd as launch
    else:
        launch = reference.nf4_linear_fwd_reference
    return launch(x, bias, nf4)


@nf4_linear_op.register_fake
def _(x, bias, packed, absmax, n, k, blocksize, nested_absmax, offset, quant_map, nested_quant_map,
      nested_blocksize):  # fmt: skip
    return x.new_empty((x.shape[0], n))


@torch.library.custom_op("fastpeft::nf4_linear_bwd_dx", mutates_args=())
def nf4_linear_bwd_dx(
    dy: Tensor,
    packed: Tensor,
    absmax: Tensor,
    n: int,
    k: int,
    blocksize: int,
    nested_absmax: Tensor | None,
    offset: Tensor | None,
    quant_map: Tensor | None,
    nested_quant_map: Tensor | None,
    nested_blocksize: int,
) -> Tensor:
    """``dY [M, N] · dequant(W) -> dX [M, K]`` in dy's dtype; see ``nf4_linear_bwd_dx_reference``."""
    if dy.shape[0] == 0:
        return dy.new_empty((0, k))
    nf4 = _nf4(packed, absmax, n, k, blocksize, nested_absmax, offset, quant_map, nested_quant_map, nested_blocksize)
    if _nf4_triton(dy):
        from fastpeft.kernels.lora_linear import nf4_linear_bwd_dx as launch
    else:
        launch = reference.nf4_linear_bwd_dx_reference
    return launch(dy, nf4)


@nf4_linear_bwd_dx.register_fake
def _(dy, packed, absmax, n, k, blocksize, nested_absmax, offset, quant_map, nested_quant_map, nested_blocksize):
    return dy.new_empty((dy.shape[0], k))


def _nf4_setup_context(ctx, inputs: Sequence, output: Tensor) -> None:
    (_x, _bias, packed, absmax, n, k, blocksize, nested_absmax, offset, quant_map, nested_quant_map,
     nested_blocksize) = inputs  # fmt: skip
    ctx.save_for_backward(packed, absmax, nested_absmax, offset, quant_map, nested_quant_map)
    ctx.consts = (n, k, blocksize, nested_blocksize)


def _nf4_backward(ctx, dy: Tensor) -> tuple:
    """dX = dY·dequant(W) (W dequantized again, never kept), dbias = Σ_m dY; W gets none."""
    needs = ctx.needs_input_grad
    packed, absmax, nested_absmax, offset, quant_map, nested_quant_map = ctx.saved_tensors
    n, k, blocksize, nested_blocksize = ctx.consts
    dx = dbias = None
    if needs[0]:
        dx = nf4_linear_bwd_dx(dy, packed, absmax, n, k, blocksize, nested_absmax, offset, quant_map,
                               nested_quant_map, nested_blocksize)  # fmt: skip
    if needs[1]:
        dbias = dy.sum(0)
    return (dx, dbias) + (None,) * 10


torch.library.register_autograd("fastpeft::nf4_linear", _nf4_backward, setup_context=_nf4_setup_context)


def nf4_linear(x: Tensor, bias: Tensor | None, nf4: NF4Args) -> Tensor:
    """``Y = X·dequant(W)ᵀ + bias`` for an NF4 ``W [N, K]``, differentiable in X and bias (never W).

    Args:
        x: ``[..., K]`` float; W is dequantized to x's dtype. bias: ``[N]`` (x's dtype) or None.
        nf4: the quantized weight.

    Returns:
        ``[..., N]`` in x's dtype.

    Raises:
        TypeError: ``x`` or ``bias`` is not a floating tensor.
    """
    check_floating(x=x, bias=bias)
    n, k = nf4.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features in its last dim, the NF4 weight expects {k}")
    lead = x.shape[:-1]
    y = nf4_linear_op(x.reshape(-1, k).contiguous(), bias, *_flat_nf4(nf4))
    return y.view(*lead, n)
