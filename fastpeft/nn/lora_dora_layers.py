"""DoRA on ``LoraEmbedding`` and ``LoraConv``: HF PEFT's magnitudes, norms, forward and merge rules.

Both layers are a matrix ``W [N, K]`` and a LoRA pair ``A [R, K]``, ``B [N, R]`` once flattened, so the norm
comes from the same low-rank identity as on linear layers (``fastpeft.ops.dora``), never from a dense
``W + s·B·A``:

- embedding: ``W = Eᵀ [embedding_dim, num_embeddings]`` (HF PEFT's fan-in-fan-out view: one norm per embedding
  dimension, over the vocabulary), ``A = lora_embedding_A``, ``B = lora_embedding_B``; the magnitude is
  ``[embedding_dim]``. Forward (each active adapter in turn): ``y ← f ⊙ y + f ⊙ s·(Aᵀ[x])·Bᵀ``.
- convolution: ``W = weight.flatten(1) [out, in·k…]``, ``A = lora_A.weight.flatten(1)``, ``B`` the 1×…×1
  ``lora_B`` as ``[out, r]``; one norm per output channel; the magnitude has HF PEFT's shape ``[1, out, 1, …]``.
  Forward: ``y ← y + (f − 1) ⊙ base + f ⊙ s·B(A(x'))`` with ``base = y − bias`` and ``x' = x`` (no dropout,
  or eval), else ``x' = drop(x)`` and ``base = conv(x', W)``.
- grouped convolution (``groups = g``): ``W [out, in/g, k…]``, ``lora_A`` ungrouped ``[r, in, k…]``, ``lora_B``
  grouped ``[out, r/g, 1…]``, so ``B·A`` has no place in the weight's shape. HF PEFT's norm reads
  ``B' = B.view(out/g, r)`` and ``reshape(B'·A, W.shape)``: output channel ``o = i·g + j`` gets
  ``B'_i · A_j`` with ``A_j`` the ``j``-th of ``g`` equal column blocks of ``A.flatten(1)``. That is ``g``
  low-rank norms (row block ``j`` of ``W.view(out/g, g, -1)``); the forward is the grouped ``B(A(x))`` as
  above. Merging is refused (as without DoRA, and as HF PEFT).

``f = m / ‖W + s·B·A‖`` with the norm detached (a constant in the backward). Merging writes
``f ⊙ (W + s·B·A)`` (``f`` along the norm's axis) with ``f`` from the unmerged base, kept for ``unmerge``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fastpeft.nn.lora_dora import DoraMagnitude
from fastpeft.ops.dora import dora_row_norm, dora_weight_sq

__all__ = ["check_dora_layer", "dora_conv_step", "dora_embedding_step", "dora_layer_factor", "dora_layer_magnitude",
           "dora_merge", "dora_unmerge"]  # fmt: skip

Tensor = torch.Tensor


def _is_embedding(layer: nn.Module) -> bool:
    return isinstance(layer.get_base_layer(), nn.Embedding)


def _flat_base(layer: nn.Module) -> Tensor:
    """The frozen base as ``[N, K]`` (a view, no copy)."""
    w = layer.get_base_layer().weight
    return w.t() if _is_embedding(layer) else w.flatten(1)


def _flat_pair(layer: nn.Module, name: str) -> tuple[Tensor, Tensor]:
    if _is_embedding(layer):
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return layer.lora_A[name].weight.flatten(1), layer.lora_B[name].weight.flatten(1)


def check_dora_layer(layer: nn.Module, lora_bias: bool) -> None:
    """Raise for what DoRA cannot run on this layer: ``lora_bias``."""
    if lora_bias:
        raise ValueError("lora_bias=True is not supported for DoRA (HF PEFT refuses it too); pass use_dora=False")


def _groups(layer: nn.Module) -> int:
    return 1 if _is_embedding(layer) else layer.get_base_layer().groups


def _weight_sq(layer: nn.Module) -> Tensor:
    """``‖W_n‖²`` ``[N]`` float32, cached until the base changes (module, tensor, device or an in-place write)."""
    w = _flat_base(layer)
    if torch.compiler.is_compiling():
        return dora_weight_sq(w, None)
    key = (id(layer.get_base_layer()), w.data_ptr(), w._version, w.device, w.dtype, tuple(w.shape))
    cached = layer.__dict__.get("_dora_weight_sq")
    if cached is None or cached[0] != key:
        cached = (key, dora_weight_sq(w, None))
        layer.__dict__["_dora_weight_sq"] = cached
    return cached[1]


def _norm(layer: nn.Module, name: str) -> Tensor:
    a, b = _flat_pair(layer, name)
    g = _groups(layer)
    if g == 1:
        return dora_row_norm(_flat_base(layer), None, a, b, layer._scale(name), _weight_sq(layer))
    # grouped convolution (module doc): channel o = i·g + j pairs W's row block j with A's column block j
    r = a.shape[0]
    w, b, w_sq = _flat_base(layer).unflatten(0, (-1, g)), b.reshape(-1, r), _weight_sq(layer).view(-1, g)
    blocks = a.chunk(g, dim=1)
    norms = [dora_row_norm(w[:, j], None, blocks[j], b, layer._scale(name), w_sq[:, j]) for j in range(g)]
    return torch.stack(norms, dim=1).flatten()


@torch.no_grad()
def dora_layer_magnitude(layer: nn.Module, name: str) -> DoraMagnitude:
    """The initial magnitude (the norms of ``W + s·B·A``) in HF PEFT's shape and the base weight's dtype."""
    norm = _norm(layer, name).to(layer.get_base_layer().weight.dtype)
    if not _is_embedding(layer):
        norm = norm.view(1, -1, *([1] * (layer.get_base_layer().weight.dim() - 2)))
    return DoraMagnitude(norm)


def dora_layer_factor(layer: nn.Module, name: str) -> Tensor:
    """``f = m / ‖W + s·B·A‖`` ``[N]`` float32; differentiable in ``m`` only."""
    return layer.lora_magnitude_vector[name].weight.float().flatten() / _norm(layer, name)


def dora_embedding_step(layer: nn.Module, x: Tensor, y: Tensor, name: str) -> Tensor:
    """``y`` after DoRA adapter ``name`` of an embedding: ``f ⊙ y + f ⊙ s·(Aᵀ[x])·Bᵀ``."""
    f = dora_layer_factor(layer, name).to(y.dtype)
    return f * y + f * layer._branch(x, name, y.dtype)


def dora_conv_step(layer: nn.Module, x: Tensor, y: Tensor, name: str) -> Tensor:
    """``y`` after DoRA adapter ``name`` of a convolution (module doc); ``x`` in the adapter's dtype."""
    base, a, b = layer.get_base_layer(), layer.lora_A[name], layer.lora_B[name]
    channel = 1 if x.dim() == base.weight.dim() else 0  # an unbatched input has no batch axis
    shape = [1] * y.dim()
    shape[channel] = -1
    f = dora_layer_factor(layer, name).to(y.dtype).view(shape)
    dropout = layer.lora_dropout[name]
    if layer.training and isinstance(dropout, nn.Dropout):
        x = dropout(x)
        base_result = base._conv_forward(x, base.weight.to(x.dtype), None).to(y.dtype)
    else:
        base_result = y if base.bias is None else y - base.bias.to(y.dtype).view(shape)
    h = a._conv_forward(x, a.weight.to(x.dtype), None)
    lora = b._conv_forward(h, b.weight.to(x.dtype), None).to(y.dtype)
    return y + (f - 1) * base_result + f * (layer._scale(name) * lora)


def _factor_view(layer: nn.Module, f: Tensor) -> Tensor:
    """``f`` shaped to scale the stored weight along the norm's axis."""
    weight = layer.get_base_layer().weight
    return f.view(1, -1) if _is_embedding(layer) else f.view(-1, *([1] * (weight.dim() - 1)))


@torch.no_grad()
def dora_merge(layer: nn.Module, names: Sequence[str], safe_merge: bool) -> None:
    """Merge ``names`` (DoRA or not) into the base; DoRA's factors come from the unmerged base (HF PEFT's rule),
    so adapters merged before are unmerged and merged again."""
    base = layer.get_base_layer()
    names = [*layer.merged_adapters, *names]
    dora_unmerge(layer)
    factors = {n: dora_layer_factor(layer, n).detach() for n in names if layer.use_dora.get(n)}
    for name in names:
        merged = base.weight.float() + layer.get_delta_weight(name).to(base.weight.device)
        if name in factors:
            merged = _factor_view(layer, factors[name].to(merged.device)) * merged
        if safe_merge and not bool(torch.isfinite(merged).all()):
            raise ValueError(f"merging adapter {name!r} gives non-finite weights; the base was left as it was")
        base.weight.copy_(merged)
        layer.merged_adapters.append(name)
    layer.__dict__.setdefault("_dora_factors", {}).update(factors)


@torch.no_grad()
def dora_unmerge(layer: nn.Module) -> None:
    """Undo every merge, last first: ``W = W' / f − s·B·A`` for a DoRA adapter, ``W − s·B·A`` otherwise."""
    base = layer.get_base_layer()
    factors = layer.__dict__.setdefault("_dora_factors", {})
    while layer.merged_adapters:
        name = layer.merged_adapters.pop()
        w = base.weight.float()
        if name in factors:
            w = w / _factor_view(layer, factors.pop(name).to(w.device))
        base.weight.copy_(w - layer.get_delta_weight(name).to(w.device))


class DoraLayerMixin:
    """``use_dora`` bookkeeping for ``LoraEmbedding`` / ``LoraConv`` (listed before ``LoraLayerBase``)."""

    def _init_dora(self) -> None:
        self._init_tables()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.use_dora: dict[str, bool] = {}
        self.__dict__["_dora_factors"] = {}

    def _check_dora(self, use_dora: bool, lora_bias: bool) -> None:
        if not isinstance(use_dora, bool):
            raise TypeError(f"use_dora must be a bool, got {use_dora!r}")
        if use_dora:
            check_dora_layer(self, lora_bias)

    def _add_magnitude(self, name: str, use_dora: bool) -> None:
        self.use_dora[name] = use_dora
        if use_dora:
            self.lora_magnitude_vector[name] = dora_layer_magnitude(self, name)
        elif name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]

    def _magnitude_param(self, name: str, params: dict[str, Tensor]) -> dict[str, Tensor]:
        if name in self.lora_magnitude_vector:
            params["lora_magnitude_vector"] = self.lora_magnitude_vector[name].weight  # HF PEFT's key: no ".weight"
        return params

    def _refuse_mixed_dora(self, adapter_names: Sequence[str]) -> None:
        dora = sorted({n for n in adapter_names if self.use_dora.get(n)})
        if dora:
            raise ValueError(f"Cannot pass `adapter_names` when DoRA is enabled (DoRA adapters {dora}), as HF PEFT")

    def merge(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        """``LoraLayerBase.merge``; with a DoRA adapter among them (or merged), ``dora_merge``'s rule."""
        names = self._merge_names(adapter_names)
        if any(self.use_dora.get(n) for n in [*names, *self.merged_adapters]):
            dora_merge(self, names, safe_merge)
        else:
            super().merge(safe_merge, names)

    def unmerge(self) -> None:
        """Undo every merge (``dora_unmerge`` divides a DoRA adapter's factor out first)."""
        dora_unmerge(self)
