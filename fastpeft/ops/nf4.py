"""NF4 ops: quantization (plain functions, never traced) and dequantization (a custom op)."""

from __future__ import annotations

import torch

from fastpeft.kernels import reference
from fastpeft.ops._dispatch import use_triton

__all__ = [
    "dynamic8_quantize",
    "nf4_dequantize",
    "nf4_quantize",
]


def nf4_quantize(w: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed NF4 codes and float32 absmax of ``w``; see ``fastpeft.kernels.nf4.nf4_quantize``."""
    if use_triton(w):
        from fastpeft.kernels.nf4 import nf4_quantize as launch

        return launch(w, blocksize)
    return reference.nf4_quantize_reference(w, blocksize)


def dynamic8_quantize(x: torch.Tensor, blocksize: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit dynamic-map codes and float32 absmax of ``x``; see ``fastpeft.kernels.nf4``."""
    if use_triton(x):
        from fastpeft.kernels.nf4 import dynamic8_quantize as launch

        return launch(x, blocksize)
    return reference.dynamic8_quantize_reference(x, blocksize)


@torch.library.custom_op("fastpeft::nf4_dequantize", mutates_args=())
def nf4_dequantize(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    numel: int,
    dtype: torch.dtype,
    blocksize: int,
    nested_absmax: torch.Tensor | None,
    offset: torch.Tensor | None,
    quant_map: torch.Tensor | None,
    nested_quant_map: torch.Tensor | None,
    nested_blocksize: int,
) -> torch.Tensor:
    """Flat ``[numel]`` tensor of ``dtype`` from packed NF4 (optionally double-quantized absmax)."""
    kwargs = dict(
        blocksize=blocksize,
        nested_absmax=nested_absmax,
        offset=offset,
        quant_map=quant_map,
        nested_quant_map=nested_quant_map,
        nested_blocksize=nested_blocksize,
    )
    if use_triton(packed):
        from fastpeft.kernels.nf4 import nf4_dequantize as launch

        return launch(packed, absmax, numel, dtype, **kwargs)
    return reference.nf4_dequantize_reference(packed, absmax, numel, dtype, **kwargs)


@nf4_dequantize.register_fake
def _(packed, absmax, numel, dtype, blocksize, nested_absmax, offset, quant_map, nested_quant_map, nested_blocksize):
    return packed.new_empty((numel,), dtype=dtype)
