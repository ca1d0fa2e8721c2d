"""Plain-PyTorch twins of every launcher in fastpeft.kernels: same signatures, same contracts.

This file is the CPU path, the test oracle and the readable specification of fastpeft's math.
Each function is named ``<launcher>_reference``.
"""

from __future__ import annotations

import torch

from fastpeft.kernels.formats import (
    NESTED_BLOCKSIZE,
    NF4_CODE,
    NF4Args,
    check_blocksize,
    check_dequantize_args,
    check_finite,
    check_float_tensor,
    dynamic_map,
    nf4_code,
)

# ----------------------------------------------------------------------------------------------
# NF4 (kernels/nf4.py)
# ----------------------------------------------------------------------------------------------


def _blockwise_scale(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax of flat fp32 ``x`` and ``x`` scaled into [-1, 1] by the fp32 reciprocal."""
    n = x.numel()
    n_blocks = -(-n // blocksize)
    blocks = torch.nn.functional.pad(x, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1)
    return scaled.flatten()[:n], absmax


def _nearest_code(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted ``code`` values: #{midpoints < x} (ties take the lower)."""
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(x, midpoints, right=False)


def nf4_quantize_reference(w: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    check_float_tensor("w", w)
    check_blocksize(blocksize)
    check_finite("w", w)
    scaled, absmax = _blockwise_scale(w.reshape(-1).float(), blocksize)
    codes = _nearest_code(scaled, nf4_code(w.device)).to(torch.uint8)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), NF4_CODE.index(0.0))])
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed.unsqueeze(1), absmax


def dynamic8_quantize_reference(
    x: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    check_float_tensor("x", x)
    if x.dtype != torch.float32:
        raise TypeError(f"x must be float32, got {x.dtype}")
    check_blocksize(blocksize)
    scaled, absmax = _blockwise_scale(x.reshape(-1), blocksize)
    return _nearest_code(scaled, dynamic_map(x.device)).to(torch.uint8), absmax


def nf4_dequantize_reference(
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
) -> torch.Tensor:
    check_dequantize_args(packed, absmax, numel, dtype, blocksize, nested_absmax, offset, nested_blocksize)
    device = packed.device
    code = nf4_code(device) if quant_map is None else quant_map.to(device, torch.float32)
    if absmax.dtype == torch.uint8:
        qmap = dynamic_map(device) if nested_quant_map is None else nested_quant_map.to(device, torch.float32)
        nested = nested_absmax.repeat_interleave(nested_blocksize)[: absmax.numel()]
        absmax = qmap[absmax.long()] * nested + offset.reshape(()).float()
    q = packed.reshape(-1)
    codes = torch.stack([q >> 4, q & 0xF], dim=1).reshape(-1)[:numel].long()
    scale = absmax.repeat_interleave(blocksize)[:numel]
    return (code[codes] * scale).to(dtype)


# ----------------------------------------------------------------------------------------------
# Fused LoRA / QLoRA linear (kernels/lora_linear.py)
# ----------------------------------------------------------------------------------------------


def _acc(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float32, or float64 for float64 inputs (gradcheck)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _base_weight(weight: torch.Tensor | None, nf4: NF4Args | None, acc: torch.dtype) -> torch.Tensor:
    """The frozen base ``W [N, K]`` in ``acc``: dense as given, or NF4 dequantized."""
    if nf4 is None:
        return weight.to(acc)
    n, k = nf4.shape
    w = nf4_dequantize_reference(
        nf4.packed, nf4.absmax, n * k, torch.float32,
        blocksize=nf4.blocksize, nested_absmax=nf4.nested_absmax, offset=nf4.offset,
        quant_map=nf4.quant_map, nested_quant_map=nf4.nested_quant_map, nested_blocksize=nf4.nested_blocksize,
    )  # fmt: skip
    return w.view(n, k).to(acc)


def _dropped(x: torch.Tensor, dropout_mask: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
    """``drop(X)``: X where the mask keeps, scaled by 1 / (1 - p); X itself without a mask."""
    if dropout_mask is None:
        return x
    return x * dropout_mask.to(x.dtype) / (1.0 - dropout_p)


def lora_linear_fwd_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    *,
    nf4: NF4Args | None = None,
    dropout_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Y = X·Wᵀ + bias + s·(drop(X)·Aᵀ)·Bᵀ`` and ``U = drop(X)·Aᵀ``.

    Args:
        x: ``[M, K]``. weight: dense ``[N, K]``, or None with ``nf4`` (an NF4 ``[N, K]``).
        bias: ``[N]`` or None. lora_a: ``[R, K]``. lora_b: ``[N, R]``. scaling: ``s``.
        dropout_mask: bool/uint8 ``[M, K]`` (1 keeps) or None; dropout_p: its drop probability.

    Returns:
        ``y [M, N]`` and ``u [M, R]``, both in x's dtype (accumulated in float32; float64 stays float64).
    """
    acc = _acc(x)
    xf = x.to(acc)
    u = _dropped(xf, dropout_mask, dropout_p) @ lora_a.to(acc).t()
    y = xf @ _base_weight(weight, nf4, acc).t() + scaling * (u.to(x.dtype).to(acc) @ lora_b.to(acc).t())
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype), u.to(x.dtype)


def lora_linear_bwd_reference(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    u: torch.Tensor,
    scaling: float,
    *,
    nf4: NF4Args | None = None,
    dropout_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    needs_dx: bool = True,
    needs_da: bool = True,
    needs_db: bool = True,
    needs_dbias: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``lora_linear_fwd`` (the base ``W`` is frozen and gets none).

    With ``G = dY·B [M, R]``::

        dX    = dY·W + s·mask/(1-p) ⊙ (G·A)
        dA    = s·Gᵀ·drop(X)          [R, K]
        dB    = s·dYᵀ·U               [N, R]
        dbias = Σ_m dY                [N]

    Returns ``(dx, da, db, dbias)`` in the dtypes of ``x, lora_a, lora_b, dy``; None where not asked.
    """
    acc = _acc(dy)
    dyf = dy.to(acc)
    g = dyf @ lora_b.to(acc)
    dx = da = db = dbias = None
    if needs_dx:
        dx = dyf @ _base_weight(weight, nf4, acc) + scaling * _dropped(g @ lora_a.to(acc), dropout_mask, dropout_p)
        dx = dx.to(x.dtype)
    if needs_da:
        da = (scaling * g.t() @ _dropped(x.to(acc), dropout_mask, dropout_p)).to(lora_a.dtype)
    if needs_db:
        db = (scaling * dyf.t() @ u.to(acc)).to(lora_b.dtype)
    if needs_dbias:
        dbias = dyf.sum(0).to(dy.dtype)
    return dx, da, db, dbias


# ----------------------------------------------------------------------------------------------
# Bottleneck adapter (kernels/adapter.py)
# ----------------------------------------------------------------------------------------------
