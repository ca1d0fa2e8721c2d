"""Plain-PyTorch twins of every launcher in fastpeft.kernels: same signatures, same contracts.

This file is the CPU path, the test oracle and the readable specification of fastpeft's math.
Each function is named ``<launcher>_reference``.
"""

from __future__ import annotations

import torch

from fastpeft.kernels.formats import (
    NESTED_BLOCKSIZE,
    NF4_CODE,
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


def dynamic8_quantize_reference(x: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
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
