"""Triton helpers shared by the kernels: the float32 -> storage-dtype rounding of every store."""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["cast_out"]


@triton.jit
def cast_out(x, dtype: tl.constexpr):
    """``x`` (float32) as ``dtype``; bfloat16 rounded to nearest even the same way on a GPU and in the interpreter.

    The GPU's conversion rounds to nearest even while Triton's interpreter truncates; the integer form
    gives the same bits on both. Inputs are finite (no NaN handling).
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)
