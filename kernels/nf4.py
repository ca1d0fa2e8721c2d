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

The dequantize kernel streams whole tiles of 4096 weights through an unmasked loop (a masked tail
tile follows it): each thread turns 4 packed bytes (2 for float32 outputs) into 16 bytes of output, looks
each code up in the 16-entry float32 table at ``code_ptr | 4·code`` (an L1 hit), scales it by its row's
absmax and rounds once. Static cost (sm_90a SASS of the launcher's binaries at 4096×4096, an estimate):
per weight 8.1 thread-instructions for float16, 11.2 for bfloat16 (3.5 of them the exact integer
rounding of ``cast_out``) and 9.5 for float32 outputs, with double quantization. At 4 warp-instructions a
clock on 132 SMs at 1.755 GHz that issues 2.6-3.7 T weights/s, above the H100's memory bound of
3.0e12 B/s / 2.52 B ≈ 1.19 T weights/s for 16-bit outputs (4.52 B: 0.66 T for float32), so the model
predicts the HBM roofline.

References: Dettmers et al., "QLoRA" (2023), appendix on NormalFloat; bitsandbytes' QuantState layout.
"""

from __future__ import annotations

import dataclasses
import functools
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
    triton_version,
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
    """#{j : x > mid_j}, the index of the nearest code (ties to the lower one), by binary search.

    Four compares against midpoints picked by the bits found so far. The plain count (15 compares
    summed) is what LLVM's SLP vectorizer turns into a ``<N x i1>`` bitcast, which the NVPTX backend
    lowers through a stack slot: a 16-64 byte stack frame in every quantize binary.
    """
    c8 = x > _M7
    c = tl.where(c8, 8, 0)
    c4 = x > tl.where(c8, _M11, _M3)
    c += tl.where(c4, 4, 0)
    c2 = x > tl.where(c8, tl.where(c4, _M13, _M9), tl.where(c4, _M5, _M1))
    c += tl.where(c2, 2, 0)
    m = tl.where(
        c8,
        tl.where(c4, tl.where(c2, _M14, _M12), tl.where(c2, _M10, _M8)),
        tl.where(c4, tl.where(c2, _M6, _M4), tl.where(c2, _M2, _M0)),
    )
    return c + tl.where(x > m, 1, 0)


@triton.jit
def _reciprocal(absmax):
    """``1 / max(absmax, 1e-38)``, correctly rounded in float32.

    The floor is spelled as a float32 tensor: Triton before 3.9 types a bare ``1e-38`` float64 (it is below
    float32's smallest normal), and ``div_rn`` refuses a float64 operand.
    """
    tiny = tl.full(absmax.shape, 1e-38, tl.float32)
    return tl.math.div_rn(tl.full(absmax.shape, 1.0, tl.float32), tl.maximum(absmax, tiny))


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
    inv = _reciprocal(absmax)
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
    inv = _reciprocal(absmax)  # IEEE reciprocal, as on the CPU
    xs = tl.minimum(tl.maximum(x * inv, -1.0), 1.0)
    # -- binary search over the 255 sorted midpoints: code = #{j : xs > mid_j} --
    code = tl.zeros([BLOCKSIZE], dtype=tl.int32)
    step = 128
    for _ in tl.static_range(8):
        probe = tl.load(mid_ptr + (code + step - 1))
        code = tl.where(xs > probe, code + step, code)
        step = step // 2
    tl.store(q_ptr + offs, code.to(tl.uint8), mask=mask)


@triton.jit
def _dequantize_tile(
    q_ptr, absmax_ptr, code_ptr, out_ptr, qmap_ptr, nested_absmax_ptr, offset,
    tile, numel, n_bytes, blocksize_shift, scale_ptr, row_words,
    NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr,
    ROW_SCALE: tl.constexpr,
):  # fmt: skip
    """Dequantize packed bytes ``[tile·BLOCK, (tile + 1)·BLOCK)`` (weights from ``2·tile·BLOCK``).

    With ``ROW_SCALE`` each weight row ``n`` (``K = 64·row_words`` weights) is also multiplied by
    ``scale[n]`` (float32): a 64-weight tile row lies in one weight row, so that is one load and one
    multiply into the block scale per tile row, never per weight.

    The tile is ``[ROWS, 32 // G, G]`` bytes: a row is 64 weights, which never straddle an absmax block
    (blocksizes are powers of two >= 64), so the scale is one value a row. A thread owns G consecutive
    bytes, i.e. 2·G outputs = 16 bytes: the G-byte load and the 16-byte store then share one layout (no
    register shuffle through shared memory) and both stay coalesced across the warp.
    """
    ROWS: tl.constexpr = BLOCK // 32
    G: tl.constexpr = 64 // out_ptr.dtype.element_ty.primitive_bitwidth  # 4 bytes for 16-bit outputs, 2 for fp32
    r = tl.arange(0, ROWS)
    row = tile * ROWS + r  # rows (64 weights each) fit int32 for any weight
    start = tl.cast(tile, tl.int64) * BLOCK  # the tile's first byte; int64, as element offsets may pass 2**31
    byte = r[:, None, None] * 32 + (tl.arange(0, 32 // G) * G)[None, :, None] + tl.arange(0, G)[None, None, :]
    # -- load: packed W is streamed once, so it is evicted first --
    if MASKED:
        q = tl.load(q_ptr + start + byte, mask=byte < n_bytes - start, other=0, eviction_policy="evict_first")
        rmask = row.to(tl.int64) * 64 < numel
    else:
        q = tl.load(q_ptr + start + byte, eviction_policy="evict_first")
        rmask = tl.full([ROWS], True, tl.int1)  # folded away
    # the G bytes as one little-endian word (disjoint bit fields: the sum is an OR), so that each code
    # below is a shift and a mask of one register rather than a byte extraction and then a nibble one
    word = tl.sum(q.to(tl.int32) << (8 * tl.arange(0, G))[None, None, :], axis=2)
    # -- absmax of each row; blocksize = 2**blocksize_shift is a runtime value (one binary for all) --
    blk = row >> (blocksize_shift - 6)
    if DOUBLE_QUANT:
        a8 = tl.load(absmax_ptr + blk, mask=rmask, other=0).to(tl.int32)
        # a tile spans at most 64 blocks from a multiple of 64: one nested block, one scalar load
        nested = tl.load(nested_absmax_ptr + ((tile * ROWS) >> (blocksize_shift - 6)) // NESTED_BLOCKSIZE)
        absmax = tl.load(qmap_ptr + a8) * nested + offset
    else:
        absmax = tl.load(absmax_ptr + blk, mask=rmask, other=0.0)
    if ROW_SCALE:
        absmax = absmax * tl.load(scale_ptr + row // row_words, mask=rmask, other=0.0)
    # -- decode: byte k holds element 2k in its high nibble and 2k + 1 in its low one --
    j = tl.arange(0, 2 * G)
    shift = 8 * (j // 2) + 4 * (1 - j % 2)
    nib = (word[:, :, None] >> shift[None, None, :]) & 0xF
    # code_ptr is 64-byte aligned (the launcher sees to it): base | 4·code is the address, one LOP3
    # with the mask above, where a 64-bit add would take two instructions
    addr = code_ptr.to(tl.int64) | (nib * 4).to(tl.int64)
    code = tl.load(addr.to(tl.pointer_type(tl.float32)))
    vals = cast_out(code * absmax[:, None, None], out_ptr.dtype.element_ty)
    # -- store: [ROWS, 32 // G, 2·G] is element order --
    elem = r[:, None, None] * 64 + (tl.arange(0, 32 // G) * 2 * G)[None, :, None] + j[None, None, :]
    if MASKED:
        tl.store(out_ptr + 2 * start + elem, vals, mask=elem < numel - 2 * start)
    else:
        tl.store(out_ptr + 2 * start + elem, vals)


@triton.jit(do_not_specialize=["blocksize_shift"])
def _nf4_dequantize_kernel(
    q_ptr, absmax_ptr, code_ptr, out_ptr,
    qmap_ptr, nested_absmax_ptr, offset_ptr,
    numel, n_bytes, blocksize_shift,
    NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    offset = tl.load(offset_ptr) if DOUBLE_QUANT else 0.0
    # -- main loop: whole tiles (all 2·BLOCK weights in range), no masks, strided over the programs --
    n_full = numel // (2 * BLOCK)
    for tile in range(pid, n_full, n_prog):
        _dequantize_tile(
            q_ptr, absmax_ptr, code_ptr, out_ptr, qmap_ptr, nested_absmax_ptr, offset,
            tile, numel, n_bytes, blocksize_shift, offset_ptr, 1,
            NESTED_BLOCKSIZE, DOUBLE_QUANT, False, BLOCK, False,
        )  # fmt: skip
    # -- the partial last tile, masked, by the program the stride would have given it to --
    if (n_full * (2 * BLOCK) < numel) & (pid == n_full % n_prog):
        _dequantize_tile(
            q_ptr, absmax_ptr, code_ptr, out_ptr, qmap_ptr, nested_absmax_ptr, offset,
            n_full, numel, n_bytes, blocksize_shift, offset_ptr, 1,
            NESTED_BLOCKSIZE, DOUBLE_QUANT, True, BLOCK, False,
        )  # fmt: skip


@triton.jit(do_not_specialize=["blocksize_shift"])
def _nf4_dequantize_scaled_kernel(
    q_ptr, absmax_ptr, code_ptr, out_ptr,
    qmap_ptr, nested_absmax_ptr, offset_ptr, scale_ptr,
    numel, n_bytes, blocksize_shift, row_words,
    NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    # _nf4_dequantize_kernel with each weight row scaled: out[n, k] = scale[n]·W[n, k] (DoRA's f_n·W_n), a kernel of
    # its own so the plain one keeps the parameters the C library binds
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    offset = tl.load(offset_ptr) if DOUBLE_QUANT else 0.0
    n_full = numel // (2 * BLOCK)
    for tile in range(pid, n_full, n_prog):
        _dequantize_tile(
            q_ptr, absmax_ptr, code_ptr, out_ptr, qmap_ptr, nested_absmax_ptr, offset,
            tile, numel, n_bytes, blocksize_shift, scale_ptr, row_words,
            NESTED_BLOCKSIZE, DOUBLE_QUANT, False, BLOCK, True,
        )  # fmt: skip
    if (n_full * (2 * BLOCK) < numel) & (pid == n_full % n_prog):
        _dequantize_tile(
            q_ptr, absmax_ptr, code_ptr, out_ptr, qmap_ptr, nested_absmax_ptr, offset,
            n_full, numel, n_bytes, blocksize_shift, scale_ptr, row_words,
            NESTED_BLOCKSIZE, DOUBLE_QUANT, True, BLOCK, True,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------

# packed bytes per tile: 2048 (4096 weights); Triton < 3.7 spilled there on sm_90a (80-144 bytes of stack for
# float32 outputs with double quantization and float16 ones without, Triton 3.5 and 3.6), and at 1024; 512 holds
# 32-40 registers with none, at 7.3-12.9 thread-instructions per weight (still issue-bound above the roofline)
_DEQUANT_BLOCK = 2048 if triton_version() >= (3, 7) else 512
_DEQUANT_WARPS = 4


def _dequantize_programs(device: torch.device) -> int:
    """Programs of the dequantize grid: about four waves of resident blocks (an H100 SM holds 6-8 of these
    128-thread blocks at 48-80 registers), so the last wave's imbalance costs little; 3 under the
    interpreter, so that its programs stride over several tiles."""
    if device.type != "cuda":
        return 3
    return 32 * torch.cuda.get_device_properties(device).multi_processor_count


def _aligned_code(code: torch.Tensor) -> torch.Tensor:
    """The 16 code values, contiguous and 64-byte aligned: the kernel forms a lookup's address as
    ``code_ptr | 4·index``, one logic operation instead of a 64-bit add (the copy, when one is needed, is
    64 bytes)."""
    code = code.reshape(-1)
    if code.is_contiguous() and code.data_ptr() % 64 == 0:
        return code
    buf = torch.empty(32, dtype=torch.float32, device=code.device)
    start = (-buf.data_ptr() % 64) // 4
    return buf[start : start + 16].copy_(code)


@functools.cache
def _default_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The NF4 code and the dynamic map on ``device``, made once (not a host-to-device copy every call)."""
    return _aligned_code(nf4_code(device)), dynamic_map(device)


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


def _check_row_scale(row_scale: object, numel: int, row_len: int, device: torch.device) -> None:
    if not isinstance(row_scale, torch.Tensor) or row_scale.dtype != torch.float32:
        raise TypeError(f"row_scale must be a float32 tensor, got {getattr(row_scale, 'dtype', type(row_scale))}")
    if not isinstance(row_len, int) or row_len <= 0 or row_len % 64 or numel % row_len:
        raise ValueError(f"row_len must be a positive multiple of 64 dividing numel={numel}, got {row_len}")
    if tuple(row_scale.shape) != (numel // row_len,) or row_scale.stride(0) != 1 or row_scale.device != device:
        raise ValueError(
            f"row_scale must be a contiguous [{numel // row_len}] tensor on {device}, got {tuple(row_scale.shape)} "
            f"on {row_scale.device}"
        )


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
    out: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    row_len: int = 0,
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
        out: a contiguous tensor of ``dtype`` on packed's device with at least ``numel`` elements to write
            into (its first ``numel``), e.g. a scratch buffer reused across layers; None allocates.
        row_scale: float32 ``[numel // row_len]`` or None: with it the output is ``row_scale[n]·W[n, k]`` for the
            weight viewed as ``[numel // row_len, row_len]`` (DoRA's ``f ⊙ W``), scaled in float32 and rounded once.
        row_len: the weight's row length K, a multiple of 64 (given with ``row_scale``).
    """
    check_dequantize_args(
        packed, absmax, numel, dtype, blocksize, nested_absmax, offset, nested_blocksize, quant_map, nested_quant_map
    )
    device = packed.device
    double_quant = absmax.dtype == torch.uint8
    code = _default_tables(device)[0] if quant_map is None else _aligned_code(quant_map.to(device, torch.float32))
    if double_quant:
        if nested_quant_map is None:
            qmap = _default_tables(device)[1]
        else:
            qmap = nested_quant_map.to(device, torch.float32).contiguous()
        nested, off = nested_absmax, offset.reshape(1).to(torch.float32)
    else:
        qmap = nested = off = absmax  # unused placeholders
    if out is None:
        out = torch.empty(numel, dtype=dtype, device=device)
    else:
        if out.dtype != dtype or out.device != device or not out.is_contiguous() or out.numel() < numel:
            raise ValueError(
                f"out must be a contiguous {dtype} tensor on {device} with >= {numel} elements, got "
                f"{out.dtype} {tuple(out.shape)} on {out.device}"
            )
        out = out.reshape(-1)[:numel]
    if row_scale is not None:
        _check_row_scale(row_scale, numel, row_len, device)
    n_bytes = (numel + 1) // 2
    grid = (min(triton.cdiv(numel, 2 * _DEQUANT_BLOCK), _dequantize_programs(device)),)
    # no FMA contraction: absmax = map * nested + offset must round exactly like bitsandbytes
    if row_scale is not None:
        _nf4_dequantize_scaled_kernel[grid](
            packed, absmax, code, out, qmap, nested, off, row_scale, numel, n_bytes, blocksize.bit_length() - 1,
            row_len // 64, NESTED_BLOCKSIZE=nested_blocksize, DOUBLE_QUANT=double_quant,
            BLOCK=_DEQUANT_BLOCK, num_warps=_DEQUANT_WARPS, num_stages=1, enable_fp_fusion=False,
        )  # fmt: skip
        return out
    _nf4_dequantize_kernel[grid](
        packed, absmax, code, out, qmap, nested, off, numel, n_bytes, blocksize.bit_length() - 1,
        NESTED_BLOCKSIZE=nested_blocksize, DOUBLE_QUANT=double_quant,
        BLOCK=_DEQUANT_BLOCK, num_warps=_DEQUANT_WARPS, num_stages=1, enable_fp_fusion=False,
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------
# compile gate
# ----------------------------------------------------------------------------------------------


_GATE_SHAPE = (4096, 4096)  # a Llama-3-8B attention projection
_GATE_UNALIGNED = (4095, 4097)  # odd element count: the masked tail tile and an odd numel


def _dequantize_case(out_ty: str, dq: bool, shape: tuple[int, int], suffix: str = "") -> GateCase:
    numel = shape[0] * shape[1]
    # bytes per weight moved: the packed nibble, the block's absmax (a uint8 code under double quantization;
    # the nested absmax, one float per 256 blocks, is negligible) and the output written
    out_bytes = {"fp32": 4, "fp16": 2, "bf16": 2}[out_ty]
    return GateCase(
        name=f"nf4_dequantize[{out_ty},double_quant={dq}{suffix}]",
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
        num_warps=_DEQUANT_WARPS,
        num_stages=1,
        options={"enable_fp_fusion": False},
        args={"numel": numel, "n_bytes": (numel + 1) // 2, "blocksize_shift": 6},
        path="dequant",
        weights_per_iteration=2 * _DEQUANT_BLOCK,
        bytes_per_weight=0.5 + (1 if dq else 4) / 64 + out_bytes,
    )


def _scaled_case(out_ty: str, dq: bool, shape: tuple[int, int], suffix: str = "") -> GateCase:
    # the row-scaled dequantize (DoRA's f ⊙ W scratch): the plain case plus a scale pointer and the row length
    base = _dequantize_case(out_ty, dq, shape, suffix)
    sig = dict(base.signature)
    sig["scale_ptr"] = "*fp32"
    sig = {k: sig[k] for k in (*list(base.signature)[:7], "scale_ptr", *list(base.signature)[7:])}
    sig["row_words"] = "i32"
    name = base.name.replace("nf4_dequantize[", "nf4_dequantize_scaled[")
    return dataclasses.replace(
        base, name=name, kernel="_nf4_dequantize_scaled_kernel", signature=sig,
        args={**base.args, "row_words": shape[1] // 64}, bytes_per_weight=base.bytes_per_weight + 4 / shape[1],
    )  # fmt: skip


def compile_gate_cases() -> list[GateCase]:
    """Every configuration the launchers above ship: quantize per blocksize and input dtype, the 8-bit
    quantizer per blocksize, dequantize per output dtype with and without double quantization (the
    blocksize is a runtime shift there; the nested blocksize is always 256). Runtime arguments are those
    of a 4096×4096 weight quantized with its own blocksize; the dequantize kernel also at 4095×4097."""
    numel = _GATE_SHAPE[0] * _GATE_SHAPE[1]
    cases = []
    for bs, ty in itertools.product(SUPPORTED_BLOCKSIZES, ("fp32", "fp16", "bf16")):
        cases.append(
            GateCase(
                name=f"nf4_quantize[{ty},bs={bs}]",
                module=__name__,
                kernel="_nf4_quantize_kernel",
                signature={"w_ptr": f"*{ty}", "q_ptr": "*u8", "absmax_ptr": "*fp32", "numel": "i64", "n_blocks": "i64"},
                constexprs={"BLOCKSIZE": bs, "BLOCKS_PER_PROG": _blocks_per_prog(bs)},
                args={"numel": numel, "n_blocks": numel // bs},
            )
        )
    for bs in SUPPORTED_BLOCKSIZES:
        # double quantization's input: the float32 absmax of that weight at blocksize 64
        n = numel // 64
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
                args={"n": n, "n_blocks": triton.cdiv(n, bs)},
            )
        )
    for out_ty, dq in itertools.product(("fp32", "fp16", "bf16"), (False, True)):
        cases.append(_dequantize_case(out_ty, dq, _GATE_SHAPE))
    cases.append(_dequantize_case("bf16", True, _GATE_UNALIGNED, suffix=",4095x4097"))
    for out_ty, dq in itertools.product(("fp32", "fp16", "bf16"), (False, True)):
        cases.append(_scaled_case(out_ty, dq, _GATE_SHAPE))
    # K a multiple of 64 but the weight count not of a tile: the masked tail tile with the scale
    cases.append(_scaled_case("bf16", True, (4095, 4160), suffix=",4095x4160"))
    return cases
