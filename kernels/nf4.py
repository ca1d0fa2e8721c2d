"""NF4 4-bit block quantization, byte-compatible with bitsandbytes.

Math (per block of ``blocksize`` consecutive elements of the row-major flattened weight):

    absmax_b = max_i |w_i|                                    (float32, one per block)
    x_i      = clamp(w_i * (1 / max(absmax_b, 1e-38)), -1, 1)  (fp32 reciprocal, then multiply)
    code_i   = #{j : x_i > mid_j}                              (15 fp32 midpoints of the NF4 codebook)

so a value exactly on a midpoint takes the lower code. Codes are packed two per byte, the even
element in the high nibble; an odd element count pads the last low nibble with the code of 0.0 (7).
The packed tensor is ``[(numel + 1) // 2, 1]`` uint8.

Double quantization (QLoRA) compresses the float32 absmax: ``offset = mean(absmax)`` and
``absmax - offset`` is quantized in blocks of 256 with the signed 8-bit dynamic map
(``dynamic_map()``), nearest value with ties to the lower code, giving uint8 codes plus one
float32 ``nested_absmax`` per 256 blocks. Dequantization is, in fp32 and without fused multiply-adds,

    absmax_b = map[u8_b] * nested_absmax[b // 256] + offset
    w_i      = NF4[code_i] * absmax_b

References: Dettmers et al., "QLoRA" (2023), appendix on NormalFloat; bitsandbytes' QuantState layout.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from fastpeft.kernels._gate import GateCase
from fastpeft.kernels.formats import (
    NESTED_BLOCKSIZE,
    NF4_CODE,
    SUPPORTED_BLOCKSIZES,
    check_blocksize,
    check_dequantize_args,
    check_finite,
    check_float_tensor,
    dynamic_map,
    fp32_midpoints,
    nf4_code,
)
from fastpeft.kernels.rounding import cast_out

__all__ = [
    "compile_gate_cases",
    "dynamic8_quantize",
    "nf4_dequantize",
    "nf4_quantize",
]

# the 15 midpoints enter the encoder as compile-time constants (exact fp32 values)
_M0, _M1, _M2, _M3, _M4, _M5, _M6, _M7, _M8, _M9, _M10, _M11, _M12, _M13, _M14 = (
    tl.constexpr(m) for m in fp32_midpoints(NF4_CODE)
)

# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _nf4_encode(x):
    # count of midpoints strictly below x == index of the nearest code, ties to the lower one
    c = (x > _M0).to(tl.int32) + (x > _M1).to(tl.int32) + (x > _M2).to(tl.int32)
    c += (x > _M3).to(tl.int32) + (x > _M4).to(tl.int32) + (x > _M5).to(tl.int32)
    c += (x > _M6).to(tl.int32) + (x > _M7).to(tl.int32) + (x > _M8).to(tl.int32)
    c += (x > _M9).to(tl.int32) + (x > _M10).to(tl.int32) + (x > _M11).to(tl.int32)
    c += (x > _M12).to(tl.int32) + (x > _M13).to(tl.int32) + (x > _M14).to(tl.int32)
    return c


@triton.jit
def _nf4_quantize_kernel(
    w_ptr, q_ptr, absmax_ptr,
    numel, n_blocks,
    BLOCKSIZE: tl.constexpr, BLOCKS_PER_PROG: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    blk = pid * BLOCKS_PER_PROG + tl.arange(0, BLOCKS_PER_PROG)  # [B]
    pair = tl.arange(0, BLOCKSIZE // 2)  # [P]
    # -- load: even and odd elements of each block as two [B, P] tiles --
    even = blk[:, None] * BLOCKSIZE + 2 * pair[None, :]
    odd = even + 1
    w_even = tl.load(w_ptr + even, mask=even < numel, other=0.0).to(tl.float32)
    w_odd = tl.load(w_ptr + odd, mask=odd < numel, other=0.0).to(tl.float32)
    # -- absmax per block --
    absmax = tl.maximum(tl.max(tl.abs(w_even), axis=1), tl.max(tl.abs(w_odd), axis=1))
    tl.store(absmax_ptr + blk, absmax, mask=blk < n_blocks)
    # -- scale by the correctly rounded fp32 reciprocal (not a division: that is what fixes the bytes) --
    inv = tl.math.div_rn(tl.full(absmax.shape, 1.0, tl.float32), tl.maximum(absmax, 1e-38))
    x_even = tl.minimum(tl.maximum(w_even * inv[:, None], -1.0), 1.0)
    x_odd = tl.minimum(tl.maximum(w_odd * inv[:, None], -1.0), 1.0)
    # a padded odd element loads 0.0 and encodes as code 7, the value bitsandbytes pads with
    packed = (_nf4_encode(x_even) << 4) | _nf4_encode(x_odd)
    byte = even // 2
    tl.store(q_ptr + byte, packed.to(tl.uint8), mask=even < numel)


@triton.jit
def _dynamic8_quantize_kernel(
    x_ptr, q_ptr, absmax_ptr, mid_ptr,
    n, n_blocks,
    BLOCKSIZE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCKSIZE + tl.arange(0, BLOCKSIZE)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    absmax = tl.max(tl.abs(x), axis=0)
    tl.store(absmax_ptr + pid, absmax)
    inv = tl.math.div_rn(1.0, tl.maximum(absmax, 1e-38))  # IEEE reciprocal, as on the CPU
    xs = tl.minimum(tl.maximum(x * inv, -1.0), 1.0)
    # -- binary search over the 255 sorted midpoints: code = #{j : xs > mid_j} --
    code = tl.zeros([BLOCKSIZE], dtype=tl.int32)
    step = 128
    for _ in tl.static_range(8):
        probe = tl.load(mid_ptr + (code + step - 1))
        code = tl.where(xs > probe, code + step, code)
        step = step // 2
    tl.store(q_ptr + offs, code.to(tl.uint8), mask=mask)


@triton.jit(do_not_specialize=["blocksize_shift"])
def _nf4_dequantize_kernel(
    q_ptr, absmax_ptr, code_ptr, out_ptr,
    qmap_ptr, nested_absmax_ptr, offset_ptr,
    numel, n_bytes, blocksize_shift,
    NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    byte = pid * BLOCK + tl.arange(0, BLOCK)
    bmask = byte < n_bytes
    # -- load: one byte holds elements 2i (high nibble) and 2i+1 (low nibble) --
    q = tl.load(q_ptr + byte, mask=bmask, other=0).to(tl.int32)
    # blocksize = 2**blocksize_shift (one binary for all), even: both nibbles share a block
    blk = (2 * byte) >> blocksize_shift
    if DOUBLE_QUANT:
        a8 = tl.load(absmax_ptr + blk, mask=bmask, other=0).to(tl.int32)
        nested = tl.load(nested_absmax_ptr + blk // NESTED_BLOCKSIZE, mask=bmask, other=0.0)
        absmax = tl.load(qmap_ptr + a8) * nested + tl.load(offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + blk, mask=bmask, other=0.0)
    hi = tl.load(code_ptr + (q >> 4)) * absmax
    lo = tl.load(code_ptr + (q & 0xF)) * absmax
    # -- store: interleave back to element order --
    vals = tl.interleave(hi, lo)
    offs = 2 * pid * BLOCK + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + offs, cast_out(vals, out_ptr.dtype.element_ty), mask=offs < numel)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------

_DEQUANT_BLOCK = 1024


def _blocks_per_prog(blocksize: int) -> int:
    # about 1024 elements a program: enough bytes in flight, registers well under the limit
    return max(1, 1024 // blocksize)


def nf4_quantize(w: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w`` (any shape, row-major) to packed NF4.

    Args:
        w: float tensor, ``numel`` elements, contiguous, finite.
        blocksize: elements per absmax block.

    Returns:
        ``packed [(numel + 1) // 2, 1]`` uint8 and ``absmax [ceil(numel / blocksize)]`` float32.
    """
    check_float_tensor("w", w)
    check_blocksize(blocksize)
    check_finite("w", w)
    numel = w.numel()
    n_blocks = triton.cdiv(numel, blocksize)
    packed = torch.empty(((numel + 1) // 2, 1), dtype=torch.uint8, device=w.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=w.device)
    grid = (triton.cdiv(n_blocks, _blocks_per_prog(blocksize)),)
    _nf4_quantize_kernel[grid](
        w, packed, absmax, numel, n_blocks,
        BLOCKSIZE=blocksize, BLOCKS_PER_PROG=_blocks_per_prog(blocksize),
    )  # fmt: skip
    return packed, absmax


def dynamic8_quantize(x: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization of a float32 vector with ``dynamic_map()`` (nearest, ties low).

    Args:
        x: float32 ``[n]``, contiguous.
        blocksize: elements per absmax block (256 for double quantization).

    Returns:
        ``codes [n]`` uint8 and ``absmax [ceil(n / blocksize)]`` float32.
    """
    check_float_tensor("x", x)
    if x.dtype != torch.float32:
        raise TypeError(f"x must be float32, got {x.dtype}")
    check_blocksize(blocksize)
    n = x.numel()
    n_blocks = triton.cdiv(n, blocksize)
    qmap = dynamic_map(x.device)
    mid = (qmap[:-1] + qmap[1:]) / 2
    codes = torch.empty(n, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
    _dynamic8_quantize_kernel[(n_blocks,)](x, codes, absmax, mid, n, n_blocks, BLOCKSIZE=blocksize)
    return codes, absmax


def nf4_dequantize(
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
    """Dequantize packed NF4 to a flat ``[numel]`` tensor of ``dtype``.

    Args:
        packed: uint8 ``[(numel + 1) // 2]`` or ``[(numel + 1) // 2, 1]``.
        absmax: float32 ``[n_blocks]``; or uint8 ``[n_blocks]`` codes under double quantization,
            which then needs ``nested_absmax [ceil(n_blocks / nested_blocksize)]`` float32 and
            ``offset`` (float32, one element).
        numel: element count of the original weight.
        dtype: float32, float16 or bfloat16.
        quant_map / nested_quant_map: the 16 / 256 code values (default NF4 / ``dynamic_map()``).
    """
    check_dequantize_args(
        packed, absmax, numel, dtype, blocksize, nested_absmax, offset, nested_blocksize, quant_map, nested_quant_map
    )
    device = packed.device
    double_quant = absmax.dtype == torch.uint8
    code = nf4_code(device) if quant_map is None else quant_map.to(device, torch.float32).contiguous()
    if double_quant:
        qmap = dynamic_map(device) if nested_quant_map is None else nested_quant_map.to(device, torch.float32)
        qmap = qmap.contiguous()
        nested, off = nested_absmax, offset.reshape(1).to(torch.float32)
    else:
        qmap = nested = off = absmax  # unused placeholders
    out = torch.empty(numel, dtype=dtype, device=device)
    n_bytes = (numel + 1) // 2
    grid = (triton.cdiv(n_bytes, _DEQUANT_BLOCK),)
    # no FMA contraction: absmax = map * nested + offset must round exactly like bitsandbytes
    _nf4_dequantize_kernel[grid](
        packed, absmax, code, out, qmap, nested, off, numel, n_bytes, blocksize.bit_length() - 1,
        NESTED_BLOCKSIZE=nested_blocksize, DOUBLE_QUANT=double_quant,
        BLOCK=_DEQUANT_BLOCK, enable_fp_fusion=False,
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------
# compile gate
# ----------------------------------------------------------------------------------------------


def compile_gate_cases() -> list[GateCase]:
    """Every configuration the launchers above ship: quantize per blocksize and input dtype, the 8-bit
    quantizer per blocksize, dequantize per output dtype with and without double quantization (the
    blocksize is a runtime shift there; the nested blocksize is always 256)."""
    cases = []
    for bs, ty in itertools.product(SUPPORTED_BLOCKSIZES, ("fp32", "fp16", "bf16")):
        cases.append(
            GateCase(
                name=f"nf4_quantize[{ty},bs={bs}]",
                module=__name__,
                kernel="_nf4_quantize_kernel",
                signature={"w_ptr": f"*{ty}", "q_ptr": "*u8", "absmax_ptr": "*fp32", "numel": "i64", "n_blocks": "i64"},
                constexprs={"BLOCKSIZE": bs, "BLOCKS_PER_PROG": _blocks_per_prog(bs)},
            )
        )
    for bs in SUPPORTED_BLOCKSIZES:
        cases.append(
            GateCase(
                name=f"dynamic8_quantize[bs={bs}]",
                module=__name__,
                kernel="_dynamic8_quantize_kernel",
                signature={
                    "x_ptr": "*fp32",
                    "q_ptr": "*u8",
                    "absmax_ptr": "*fp32",
                    "mid_ptr": "*fp32",
                    "n": "i64",
                    "n_blocks": "i64",
                },
                constexprs={"BLOCKSIZE": bs},
            )
        )
    for out_ty, dq in itertools.product(("fp32", "fp16", "bf16"), (False, True)):
        cases.append(
            GateCase(
                name=f"nf4_dequantize[{out_ty},double_quant={dq}]",
                module=__name__,
                kernel="_nf4_dequantize_kernel",
                signature={
                    "q_ptr": "*u8",
                    "absmax_ptr": "*u8" if dq else "*fp32",
                    "code_ptr": "*fp32",
                    "out_ptr": f"*{out_ty}",
                    "qmap_ptr": "*fp32",
                    "nested_absmax_ptr": "*fp32",
                    "offset_ptr": "*fp32",
                    "numel": "i64",
                    "n_bytes": "i64",
                    "blocksize_shift": "i32",
                },  # fmt: skip
                constexprs={"NESTED_BLOCKSIZE": NESTED_BLOCKSIZE, "DOUBLE_QUANT": dq, "BLOCK": _DEQUANT_BLOCK},
                options={"enable_fp_fusion": False},
            )
        )
    return cases
