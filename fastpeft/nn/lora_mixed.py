"""Mixed-adapter batches of ``LoraLinear`` and ``LoraEmbedding``: every row's adapter in one batched op.

``model(input_ids, adapter_names=[...])`` (HF PEFT's spelling) gives each batch row its own adapter.
The base runs once for the whole batch; the adapters' low-rank updates then run as one op over all
rows (``fastpeft.ops.lora_batched``; an embedding gathers each token's column of A and runs the expand
alone): the adapters named in the batch are stacked ``A [n, R, K]``,
``B [n, N, R]`` (ranks zero-padded to a power of two, at least 16), cached on the layer until a weight
changes in place or is replaced, or a scaling changes.

The batched op is inference-only. The layer falls back to its per-adapter loop when autograd must see the
adapters (grad mode with an input or adapter weight that requires grad), when dropout is active, for ranks
over 128, or for dtypes the op lacks (adapters neither in the base output's dtype nor float32, an input in
another dtype than the output).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from fastpeft.ops._dispatch import use_triton
from fastpeft.ops.lora_batched import BATCHED_RANKS, lora_batched_delta, lora_batched_expand

__all__ = ["batched_delta", "embedding_batched_delta"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _padded_rank(r: int) -> int | None:
    return next((b for b in BATCHED_RANKS if r <= b), None)


def _batchable(layer: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str], embedding: bool = False) -> bool:
    """Whether ``names``' updates can run as the batched op (see the module docstring); ``embedding``: x holds
    token ids (no dropout on that branch, no dtype to match)."""
    params = [p for n in names for p in layer._adapter_tensors(n)]
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return False
    if not embedding and layer.training and any(getattr(layer.lora_dropout[n], "p", 0.0) > 0 for n in names):
        return False
    dtypes = {p.dtype for p in params}
    if len(dtypes) != 1 or _padded_rank(max(layer.r[n] for n in names)) is None:
        return False
    (dtype,) = dtypes
    pair_ok = y.dtype in _FLOATS and (dtype == y.dtype or dtype == torch.float32)
    return pair_ok and y.is_contiguous() and (embedding or x.dtype == y.dtype)


def _adapter(layer: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Adapter ``name``'s A ``[r, K]``, B ``[N, r]`` and lora_B bias of a LoraLinear or a LoraEmbedding."""
    if hasattr(layer, "lora_embedding_A"):
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name], None
    return layer.lora_A[name].weight, layer.lora_B[name].weight, layer.lora_B[name].bias


def _cache_key(layer: nn.Module, names: list[str]) -> tuple:
    parts = []
    for n in names:
        for p in layer._adapter_tensors(n):
            parts.append((id(p), p.data_ptr(), p._version))
        parts.append((n, float(layer.scaling[n])))
    return tuple(parts)


@torch.no_grad()
def _stack(layer: nn.Module, names: list[str]) -> tuple[torch.Tensor, ...]:
    """``A [n, R, K]``, ``B [n, N, R]``, scales ``[n]`` float32 and biases ``[n, N]`` (or None) of ``names``,
    from the layer's cache when nothing changed since they were stacked."""
    key = _cache_key(layer, names)
    cached = layer.__dict__.get("_mixed_stack")
    if cached is not None and cached[0] == key:
        return cached[1]
    weights = [_adapter(layer, name) for name in names]
    first = weights[0][0]
    r_pad = _padded_rank(max(layer.r[n] for n in names))
    n, k, out = len(names), layer.in_features, layer.out_features
    a = torch.zeros((n, r_pad, k), dtype=first.dtype, device=first.device)
    b = torch.zeros((n, out, r_pad), dtype=first.dtype, device=first.device)
    has_bias = any(w[2] is not None for w in weights)
    bias = torch.zeros((n, out), dtype=first.dtype, device=first.device) if has_bias else None
    for i, (name, (lora_a, lora_b, lora_bias)) in enumerate(zip(names, weights, strict=True)):
        r = layer.r[name]
        a[i, :r] = lora_a
        b[i, :, :r] = lora_b
        if lora_bias is not None:
            bias[i] = lora_bias
    scales = torch.tensor([float(layer.scaling[name]) for name in names], dtype=torch.float32, device=first.device)
    stacked = (a, b, scales, bias)
    layer.__dict__["_mixed_stack"] = (key, stacked)
    return stacked


def batched_delta(layer: nn.Module, x: torch.Tensor, y: torch.Tensor, adapter_names: Sequence[str]) -> bool:
    """Add row ``i``'s adapter ``adapter_names[i]`` update into the base output ``y`` in place through the
    batched op; False (``y`` untouched) when the layer must run its loop instead.

    ``x [B, ..., K]`` and ``y [B, ..., N]``: batch row ``i`` covers every position of ``x[i]``. Names this
    layer lacks and ``"__base__"`` leave their rows at the base output.
    """
    names = [n for n in dict.fromkeys(adapter_names) if n != "__base__" and layer._has(n)]
    if not names or not _batchable(layer, x, y, names):
        return False
    a, b, scales, bias = _stack(layer, names)
    per_row = x[0].numel() // x.shape[-1] if x.dim() > 1 and x.shape[0] else 1
    index, plan = _plan(tuple(adapter_names), tuple(names), per_row, y.device, use_triton(y))
    y2 = y.view(-1, y.shape[-1])
    lora_batched_delta(y2, x.reshape(-1, x.shape[-1]), a, b, scales, index, bias, plan=plan)
    return True


def embedding_batched_delta(layer: nn.Module, ids: torch.Tensor, y: torch.Tensor, adapter_names: Sequence[str]) -> bool:
    """``batched_delta`` for a LoraEmbedding: ``ids [B, ...]`` token ids, ``y [B, ..., N]`` the base
    embedding. Each token's ``u`` is its column of its adapter's A (a gather, no shrink), then the expand
    launch adds ``s·u·Bᵀ``; False (``y`` untouched) when the layer must loop (as ``batched_delta``, and
    for a base with ``max_norm``, whose renormalization the loop applies to A's rows)."""
    names = [n for n in dict.fromkeys(adapter_names) if n != "__base__" and layer._has(n)]
    if not names or layer.base_layer.max_norm is not None or not _batchable(layer, ids, y, names, embedding=True):
        return False
    a, b, scales, _ = _stack(layer, names)
    per_row = ids[0].numel() if ids.dim() > 1 and ids.shape[0] else 1
    index, plan = _plan(tuple(adapter_names), tuple(names), per_row, y.device, use_triton(y))
    flat_ids = ids.reshape(-1).to(a.device)
    u = a[index.clamp(min=0).to(a.device, torch.long), :, flat_ids].float()  # [T, R]: token t's column of A
    lora_batched_expand(y.view(-1, y.shape[-1]), u, b, scales, index, plan=plan)
    return True


_PLANS: OrderedDict[tuple, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]] = OrderedDict()
_PLANS_KEPT = 8


def _plan(
    adapter_names: tuple[str, ...], names: tuple[str, ...], per_row: int, device: torch.device, triton: bool
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """The row index (host) and, for the Triton path, the tile plan on ``device``: built by the first layer
    of a forward and reused by every other layer with the same adapters (a few recent batches are kept), so
    the host work and the copies happen once per forward, not once per layer."""
    key = (adapter_names, names, per_row, device, triton)
    hit = _PLANS.get(key)
    if hit is not None:
        _PLANS.move_to_end(key)
        return hit
    slot = {n: i for i, n in enumerate(names)}
    index = torch.tensor([slot.get(n, -1) for n in adapter_names], dtype=torch.int32).repeat_interleave(per_row)
    plan = None
    if triton:
        from fastpeft.kernels.lora_batched import plan_tiles

        order, tiles = plan_tiles(index, len(names))
        plan = (order.to(device, non_blocking=True), tiles.to(device, non_blocking=True))
    _PLANS[key] = (index, plan)
    if len(_PLANS) > _PLANS_KEPT:
        _PLANS.popitem(last=False)
    return index, plan
