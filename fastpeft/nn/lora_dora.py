"""DoRA on ``LoraLinear``: the magnitude vector, the cached base row norms, forward and merge terms.

HF PEFT's names and semantics (``peft.tuners.lora.dora`` / ``variants.DoraLinearVariant``): each DoRA adapter
holds ``lora_magnitude_vector[name]``, a module whose ``weight [out]`` starts as the row norms of
``W + s·B·A`` (file key ``<path>.lora_magnitude_vector``, without ``.weight``, as HF PEFT writes it).
With ``f = m / ‖W + s·B·A‖`` (the norm detached, see ``fastpeft.ops.dora``) the layer computes::

    no dropout, or eval:  y = f ⊙ (x·Wᵀ + s·x·Aᵀ·Bᵀ) + bias
    dropout in training:  y = x·Wᵀ + bias + (f − 1) ⊙ drop(x)·Wᵀ + f ⊙ s·drop(x)·Aᵀ·Bᵀ
                            = (x − drop(x))·Wᵀ + f ⊙ (drop(x)·Wᵀ + s·drop(x)·Aᵀ·Bᵀ) + bias

without dropout the fused ``dora_linear`` op (the scaling in the GEMM epilogue, the norm a constant in its backward),
with dropout the fused ``lora_linear`` op giving the bracket and a row scaling the rest (a second base pass).
A DoRA adapter after the first active one follows HF PEFT's loop: ``y += (f − 1) ⊙ (y − bias) + f ⊙ s·x·Aᵀ·Bᵀ``.
Merging writes ``f ⊙ (W + s·B·A)`` with ``f`` from the unmerged base, kept for ``unmerge``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from fastpeft.kernels.formats import NF4Args
from fastpeft.nn.nf4_linear import NF4Linear
from fastpeft.ops.dora import dora_linear, dora_norm_factors, dora_row_norm, dora_weight_sq
from fastpeft.ops.lora import lora_linear, nf4_linear

__all__ = [
    "DoraMagnitude",
    "dora_base_operands",
    "dora_branch",
    "dora_factor",
    "dora_forward",
    "dora_magnitude",
    "dora_weight_sq_cached",
]

Tensor = torch.Tensor


class DoraMagnitude(nn.Module):
    """HF PEFT's ``lora_magnitude_vector[name]`` entry: the trained magnitude ``weight [out_features]``."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)

    def extra_repr(self) -> str:
        return f"out_features={self.weight.shape[0]}"


def dora_base_operands(layer: nn.Module) -> tuple[Tensor | None, NF4Args | None]:
    """The base as ``lora_linear`` takes it: ``(weight, None)`` for a dense base, ``(None, nf4)`` for NF4."""
    base = layer.get_base_layer()
    if isinstance(base, NF4Linear):
        return None, base.kernel_args()
    return base.weight, None


def dora_weight_sq_cached(layer: nn.Module) -> Tensor:
    """``‖W_n‖²`` of ``layer``'s base, float32 ``[out]``: computed once and kept until the base changes (another
    base module, weight tensor, device or an in-place write such as a merge); recomputed under ``torch.compile``."""
    weight, nf4 = dora_base_operands(layer)
    if torch.compiler.is_compiling():
        return dora_weight_sq(weight, nf4)
    t = weight if nf4 is None else nf4.packed
    # a FakeTensor (the memory model's trace) has no data pointer: the tensor itself stands for its storage
    ptr = lambda u: ("fake", id(u)) if isinstance(u, FakeTensor) else u.data_ptr()  # noqa: E731
    extra = () if nf4 is None else (ptr(nf4.absmax), nf4.absmax._version)
    key = (id(layer.get_base_layer()), ptr(t), t._version, t.device, t.dtype, tuple(t.shape), *extra)
    cached = layer.__dict__.get("_dora_weight_sq")
    if cached is None or cached[0] != key:
        cached = (key, dora_weight_sq(weight, nf4))
        layer.__dict__["_dora_weight_sq"] = cached
    return cached[1]


def _row_norm(layer: nn.Module, lora_a: Tensor, lora_b: Tensor, scaling: float | Tensor) -> Tensor:
    """``‖W + s·B·A‖`` ``[out]``. In eval mode it is kept between calls until A, B, the scaling or the base change
    (their tensors, versions or storage): a decode step then reads the base once, not twice (A·Wᵀ is a pass over
    the whole base). In training A and B change every step, so it is computed on every forward."""
    weight, nf4 = dora_base_operands(layer)
    weight_sq = dora_weight_sq_cached(layer)
    cacheable = not layer.training and not isinstance(scaling, Tensor) and not torch.compiler.is_compiling()
    if not cacheable:
        return dora_row_norm(weight, nf4, lora_a, lora_b, scaling, weight_sq)
    # the entry holds A, B and ‖W‖² themselves, so no id in the key can be reused by a new tensor while it lives
    key = (float(scaling), *((t._version, t.data_ptr(), t.dtype, t.device) for t in (lora_a, lora_b)))
    norms = layer.__dict__.setdefault("_dora_norms", {})
    hit = norms.get((id(lora_a), id(lora_b)))
    if hit is None or hit[0] != key or hit[1] is not weight_sq or hit[2] is not lora_a or hit[3] is not lora_b:
        norm = dora_row_norm(weight, nf4, lora_a, lora_b, scaling, weight_sq)
        hit = norms[(id(lora_a), id(lora_b))] = (key, weight_sq, lora_a, lora_b, norm)
    return hit[4]


@torch.no_grad()
def dora_magnitude(
    layer: nn.Module, lora_a: Tensor, lora_b: Tensor, scaling: float, dtype: torch.dtype
) -> DoraMagnitude:
    """The initial magnitude: the row norms of ``W + s·B·A`` (so the layer starts as plain LoRA would)."""
    return DoraMagnitude(_row_norm(layer, lora_a, lora_b, scaling).to(dtype))


def dora_factor(layer: nn.Module, name: str) -> Tensor:
    """``f = m / ‖W + s·B·A‖`` ``[out]`` float32 for adapter ``name``; differentiable in ``m`` only."""
    norm = _row_norm(layer, layer.lora_A[name].weight, layer.lora_B[name].weight, layer._scale(name))
    return layer.lora_magnitude_vector[name].weight.float() / norm


def _base_mm(x: Tensor, weight: Tensor | None, nf4: NF4Args | None) -> Tensor:
    return F.linear(x, weight) if nf4 is None else nf4_linear(x, None, nf4)


def dora_forward(
    layer: nn.Module,
    x: Tensor,
    weight: Tensor | None,
    nf4: NF4Args | None,
    bias: Tensor | None,
    name: str,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: float,
    dropout_p: float,
) -> Tensor:
    """The first active adapter, DoRA: the fused op's ``x·Wᵀ + s·x·Aᵀ·Bᵀ`` scaled by ``f`` (module doc).

    ``weight`` / ``nf4`` / ``bias`` / ``lora_a`` / ``lora_b`` / ``scaling`` are what ``lora_linear`` takes
    (cast to ``x``'s dtype by the caller).
    """
    if not (layer.training and dropout_p > 0.0):
        a, b, s = layer.lora_A[name].weight, layer.lora_B[name].weight, layer._scale(name)
        magnitude = layer.lora_magnitude_vector[name].weight
        if not layer.training:
            norm = _row_norm(layer, a, b, s)
            return dora_linear(x, weight, bias, lora_a, lora_b, scaling, magnitude, norm, nf4=nf4)
        # a training step: the norm launch also forms f, s·f and f ⊙ B for the op's forward and backward
        norm, factors, fb = dora_norm_factors(*dora_base_operands(layer), a, b, s, magnitude, x.dtype,
                                              dora_weight_sq_cached(layer), lora_a_cast=lora_a)  # fmt: skip
        return dora_linear(x, weight, bias, lora_a, lora_b, scaling, magnitude, norm, nf4=nf4, factors=factors,
                           scaled_b=fb)  # fmt: skip
    f = dora_factor(layer, name).to(x.dtype)
    dropped = F.dropout(x, dropout_p, training=True)
    y = lora_linear(dropped, weight, None, lora_a, lora_b, scaling, nf4=nf4)
    out = _base_mm(x - dropped, weight, nf4) + f * y
    return out if bias is None else out + bias


def dora_branch(
    layer: nn.Module, x: Tensor, name: str, y: Tensor, weight: Tensor | None, nf4: NF4Args | None,
    bias: Tensor | None,
) -> Tensor:  # fmt: skip
    """``y`` after a DoRA adapter that is not the first active one, in plain torch (HF PEFT's loop: the
    "base result" is the output so far less the bias, or the base on the dropped-out input in training)."""
    f = dora_factor(layer, name).to(x.dtype)
    dropout = layer.lora_dropout[name]
    if layer.training and isinstance(dropout, nn.Dropout):
        x = dropout(x)
        base_result = _base_mm(x, weight, nf4)
    else:
        base_result = y if bias is None else y - bias
    lora = F.linear(F.linear(x, layer.lora_A[name].weight.to(x.dtype)), layer.lora_B[name].weight.to(x.dtype))
    return y + (f - 1) * base_result + f * (layer._scale(name) * lora)
