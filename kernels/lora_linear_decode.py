"""Decode-size NF4 + LoRA forward: ``Yᵀ = W·Xᵀ`` with W decoded by byte permutes, at the memory roofline.

For ``M <= 16`` rows (token-by-token generation, small batches) a linear reads ``N·K/2`` bytes of packed W
for ``2·M·N·K`` flops: the GPU is bound by how fast it *decodes* weights, not by its tensor cores. This
kernel computes the transposed product ``OUT[m, n] = Σ_k W[n, k]·X[m, k] + s·(U·Bᵀ)[m, n] + bias[n]``
as ``[BLOCK_N, 64]·[64, 16]`` tensor-core products (M padded to 16), so that the decoded W tile is the
large MMA operand and X the small one.

Decode (``_decode_words``), per 32-bit word of packed W (8 codes, 4 bytes, the even element in the high
nibble, bitsandbytes' layout): the codebook value of each code comes from ``prmt.b32`` byte permutes, not
a select tree or a memory gather. A permute picks 4 bytes out of 8 by 3-bit selectors (bit 3 of a
selector means "replicate the sign", so one permute covers 8 codebook entries): the low and high bytes of
the 16 16-bit code values sit in 8 registers (immediates, hoisted out of the loop by ptxas), two permutes
look up the entries 0-7 and 8-15, a third picks per byte by the code's bit 3, and a last pair interleaves
low and high bytes into packed 16-bit pairs. That is 12 permutes and 5 integer instructions per 8 weights
(≈ 2.1 per weight), where the select tree cost ≈ 19. The packed pairs come back as int32 and are split
into 16-bit halves, which compiles to register renames.

Scaling. The codebook values enter the MMA in the input dtype (16 bits) and each row's absmax is
applied once per 64-element block, after the block's partial product (one FMA per output element per
64 weights): ``acc += (code·Xᵀ)·absmax`` instead of ``(code·absmax)·Xᵀ``. The rounding differs from
the reference's, which rounds ``code·absmax`` to 16 bits before the product: here ``code`` is rounded
(relative error ≤ 2⁻⁹ in bfloat16, 2⁻¹¹ in float16) and ``absmax`` stays float32, so each weight carries
at most the same relative error as in the reference, and the tests hold it to the same oracle rule.
Blocks of 64 along K need ``K % 64 == 0`` (every absmax block then lies inside one row); the launcher
takes other shapes, float32 inputs and custom code maps through the general GEMM.

Under Triton's interpreter (CPU tests) inline PTX cannot run: ``USE_ASM=False`` selects a twin that
builds the same int32 pairs from a 16-entry table of 16-bit code patterns with loads. The permute path
is checked by the compile gate (and on a GPU by the ``gpu`` tests).

A forward is two launches (``lora_linear_fwd``): ``_lora_u_kernel`` writes ``U = drop(X)·Aᵀ`` in x's dtype, then
``_nf4_decode_fused_kernel`` writes ``Y`` in x's dtype, the LoRA term and bias added in its epilogue. Before, the
same call was six launches (zeros for U's workspace, the skinny U kernel, U's cast, zeros for Y's workspace, the
decode kernel, Y's cast): at decode sizes each launch costs about as much as the weight read of a 4096 x 4096
layer's kernel (the cost model, ``python -m fastpeft.kernels._perf --report``: 22.9 us before, 10.9 us now at
M = 1, H100, estimates).

Split-K: ``N / BLOCK_N`` programs rarely fill a GPU, so K is split over a second grid axis until one wave of
resident programs (``RESIDENT_PER_SM`` per SM, from the binaries' registers) is full. The loop is latency-bound:
what sets its speed is the W bytes in flight per SM, so the split fills every resident slot, and the loop issues
the next block's W loads before it decodes the current one (``PREFETCH``: a register stage, 8 words per thread;
+0.2 thread-instructions per weight, no spills). The slices meet in a float32 ``[M, N]`` workspace by L2 atomics;
an int32 counter per output tile counts the slices that have added; the last to arrive reads the sum, adds the
LoRA term and bias, stores Y once in x's dtype and clears its workspace tile and counter, so workspace and counters
are zero between calls without a memset (zeroed once, when they grow). The alternatives: no split
leaves 32 programs on 132 SMs (the model: 45 us for the 4096 x 4096 kernel at M = 1, against 5.1 us split 16);
atomics into Y itself need Y zeroed (a launch) and float32 (a cast launch); a plain store per slice with the last
program summing them all puts ``split`` L2 round trips on that program's critical path (not modelled). There is no
host synchronisation and no data-dependent host logic, so the two launches are CUDA-graph capturable once a
warm-up call has sized the workspace. The summation order of float atomics varies run to run (as before), within
the oracle's tolerance.
The C library (``csrc/``) still launches the atomic form, ``_nf4_decode_kernel``, into a workspace it zeroes.
"""

from __future__ import annotations

import functools
import os
import weakref

import torch
import triton
import triton.language as tl

from fastpeft.kernels._gate import GateCase
from fastpeft.kernels.formats import NESTED_BLOCKSIZE, NF4_CODE, NF4Args, dynamic_map

__all__ = ["DECODE_M_MAX", "compile_gate_cases", "decode_supported", "lora_u_fwd", "nf4_decode_fwd"]

BLOCK_N = 128
"""Output features per program: two 64-row warpgroup MMAs (sm_90) or four warps of HMMA (sm_80)."""
BLOCK_K = 64
"""K per main-loop iteration: one absmax block of the smallest blocksize."""
DECODE_M_MAX = 64
"""Rows up to which the NF4 forward takes this kernel (X padded to ``BLOCK_M`` = 16, 32 or 64 rows)."""
NUM_WARPS = 4
PREFETCH = True
"""Whether the decode loop issues the next block's W loads before it decodes the current one."""


def _halves(dtype: torch.dtype) -> list[int]:
    """The 16 NF4 code values as 16-bit patterns of ``dtype`` (round to nearest)."""
    bits = torch.tensor(NF4_CODE, dtype=torch.float32).to(dtype).view(torch.int16)
    return [int(b) & 0xFFFF for b in bits]


def _byte_words(halves: list[int], shift: int) -> list[int]:
    """Four int32 lookup words: byte ``j`` of word ``i`` is byte ``shift // 8`` of code ``4i + j``."""
    words = []
    for i in range(4):
        w = 0
        for j in range(4):
            w |= ((halves[4 * i + j] >> shift) & 0xFF) << (8 * j)
        words.append(w)
    return words


def _decode_asm() -> str:
    """PTX that turns one packed word ``$4`` into four int32 words ``$0..$3`` of 16-bit code-value pairs, with
    the permute tables in ``$5..$8`` (low bytes of codes 0-15, four per word) and ``$9..$12`` (high bytes),
    and the select mask ``0x44444444`` in ``$13`` (as an immediate, ptxas rebuilds it every use)."""
    lines = [
        "{",
        ".reg .b32 s, c, s1, c1, la, lb, ha, hb, l, h;",
        # selectors: the code's low 3 bits; the select's control: byte i from the 0-7 or the 8-15 lookup
        "and.b32 s, $4, 0x77777777;",
        "shr.b32 c, $4, 1;",
        "and.b32 c, c, $13;",
        "or.b32 c, c, 0x32103210;",
        "shr.b32 s1, s, 16;",
        "shr.b32 c1, c, 16;",
    ]
    # bytes of the word, low to high, hold codes (1, 0), (3, 2), (5, 4), (7, 6): selector nibble i of s is
    # code 1, 0, 3, 2 for i = 0..3, so the interleave puts (e0, e1) in $0 and (e2, e3) in $1
    for sel, ctl, out0, out1 in (("s", "c", "$0", "$1"), ("s1", "c1", "$2", "$3")):
        lines += [
            f"prmt.b32 la, $5, $6, {sel};",
            f"prmt.b32 lb, $7, $8, {sel};",
            f"prmt.b32 l, la, lb, {ctl};",
            f"prmt.b32 ha, $9, $10, {sel};",
            f"prmt.b32 hb, $11, $12, {sel};",
            f"prmt.b32 h, ha, hb, {ctl};",
            f"prmt.b32 {out0}, l, h, 0x4051;",
            f"prmt.b32 {out1}, l, h, 0x6273;",
        ]
    lines.append("}")
    return "\n".join(lines)


DECODE_ASM = _decode_asm()
_SELECT_MASK = 0x44444444
_DECODE_ASM = tl.constexpr(DECODE_ASM)


@functools.cache
def decode_tables(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """int32 ``[25]``: the permute tables (low bytes, then high bytes of the 16 code values, four per word),
    the select mask ``0x44444444``, then the 16-bit pattern of each code value in ``dtype`` (the interpreter
    twin's table)."""
    halves = _halves(dtype)
    words = [w - (1 << 32) if w >= 1 << 31 else w for w in _byte_words(halves, 0) + _byte_words(halves, 8)]
    return torch.tensor([*words, _SELECT_MASK, *halves], dtype=torch.int32, device=device)


@triton.jit
def _vector_register(x):
    # x + (laneid >> 5), which is x: ptxas cannot prove the value warp-uniform, so it stays in an ordinary
    # register instead of a uniform one that it would copy out again before every permute that reads it
    return tl.inline_asm_elementwise(
        "{.reg .u32 l; mov.u32 l, %laneid; shr.u32 l, l, 5; add.u32 $0, $1, l;}", "=r,r", [x],
        dtype=tl.int32, is_pure=True, pack=1,
    )  # fmt: skip


@triton.jit
def _permute_tables(table_ptr, USE_ASM: tl.constexpr):
    # the eight permute table words (low bytes of codes 0-15, then high bytes), loaded once per program
    if USE_ASM:
        t0 = _vector_register(tl.load(table_ptr + 0))
        t1 = _vector_register(tl.load(table_ptr + 1))
        t2 = _vector_register(tl.load(table_ptr + 2))
        t3 = _vector_register(tl.load(table_ptr + 3))
        t4 = _vector_register(tl.load(table_ptr + 4))
        t5 = _vector_register(tl.load(table_ptr + 5))
        t6 = _vector_register(tl.load(table_ptr + 6))
        t7 = _vector_register(tl.load(table_ptr + 7))
        sel = _vector_register(tl.load(table_ptr + 8))
    else:  # the interpreter's twin reads the 16-bit table directly
        t0, t1, t2, t3, t4, t5, t6, t7, sel = 0, 0, 0, 0, 0, 0, 0, 0, 0
    return t0, t1, t2, t3, t4, t5, t6, t7, sel


@triton.jit
def _decode_words(p, table_ptr, t0, t1, t2, t3, t4, t5, t6, t7, sel, USE_ASM: tl.constexpr):
    # four int32 tensors of 16-bit pairs: (e0, e1), (e2, e3), (e4, e5), (e6, e7) of each packed word p
    if USE_ASM:
        o0, o1, o2, o3 = tl.inline_asm_elementwise(
            _DECODE_ASM, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r", [p, t0, t1, t2, t3, t4, t5, t6, t7, sel],
            dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1,
        )  # fmt: skip
    else:
        # the interpreter's twin: element 2j sits in the high nibble of byte j
        halves = table_ptr + 9
        e0 = tl.load(halves + ((p >> 4) & 0xF))
        e1 = tl.load(halves + (p & 0xF))
        e2 = tl.load(halves + ((p >> 12) & 0xF))
        e3 = tl.load(halves + ((p >> 8) & 0xF))
        e4 = tl.load(halves + ((p >> 20) & 0xF))
        e5 = tl.load(halves + ((p >> 16) & 0xF))
        e6 = tl.load(halves + ((p >> 28) & 0xF))
        e7 = tl.load(halves + ((p >> 24) & 0xF))
        o0 = e0 | (e1 << 16)
        o1 = e2 | (e3 << 16)
        o2 = e4 | (e5 << 16)
        o3 = e6 | (e7 << 16)
    return o0, o1, o2, o3


@triton.jit
def _decode_partial(
    x_ptr, w_ptr, absmax_ptr, qmap_ptr, nested_ptr, offset_ptr, table_ptr,
    pid_n, pid_k, M, N, K, blocksize_shift, stride_xm, stride_xk, split_k,
    DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, USE_ASM: tl.constexpr, PREFETCH: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    # float32 [BLOCK_N, BLOCK_M]: Σ_k W[n, k]·X[m, k] over K slice pid_k of split_k, for tile pid_n
    dtype = x_ptr.dtype.element_ty
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_w = tl.arange(0, BLOCK_K // 8)  # int32 words of a row's 64-element block
    offs_k = tl.arange(0, BLOCK_K)
    steps = K // BLOCK_K
    per_split = tl.cdiv(steps, split_k)
    k_first = pid_k * per_split
    k_last = tl.minimum(k_first + per_split, steps)
    # packed W as int32 words: row n's block k0 starts at word (n·K + k0) / 8 (K % 64 == 0: 32-byte aligned)
    row_words = offs_n.to(tl.int64) * (K // 8)
    offset = tl.load(offset_ptr)
    t0, t1, t2, t3, t4, t5, t6, t7, sel = _permute_tables(table_ptr, USE_ASM)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    if PREFETCH:
        zero_n = tl.zeros_like(offs_n)  # the slice's end as a row mask (the interpreter refuses a scalar & a block)
        # the first block's words; each iteration then issues the next block's loads before it decodes this one,
        # so two iterations' W bytes are in flight per program (a register stage: no shared memory, no cp.async)
        words_next = tl.load(
            w_ptr + row_words[:, None] + (k_first * (BLOCK_K // 8) + offs_w)[None, :],
            mask=(mask_n & (k_first + zero_n < k_last))[:, None], other=0, eviction_policy="evict_first",
        )  # fmt: skip
    for kb in range(k_first, k_last):
        k0 = kb * BLOCK_K
        # -- load: 32 bytes per row, streamed once --
        if PREFETCH:
            words = words_next
            words_next = tl.load(
                w_ptr + row_words[:, None] + (k0 // 8 + BLOCK_K // 8 + offs_w)[None, :],
                mask=(mask_n & (kb + 1 + zero_n < k_last))[:, None], other=0,
                eviction_policy="evict_first",
            )  # fmt: skip
        else:
            words = tl.load(
                w_ptr + row_words[:, None] + (k0 // 8 + offs_w)[None, :], mask=mask_n[:, None], other=0,
                eviction_policy="evict_first",
            )  # fmt: skip
        # -- decode: [BLOCK_N, 8] words -> [BLOCK_N, 64] code values in x's dtype --
        o0, o1, o2, o3 = _decode_words(words, table_ptr, t0, t1, t2, t3, t4, t5, t6, t7, sel, USE_ASM)
        pairs = tl.join(tl.join(o0, o2), tl.join(o1, o3)).reshape(BLOCK_N, BLOCK_K // 2)
        lo = pairs.to(tl.int16).to(dtype, bitcast=True)
        hi = (pairs >> 16).to(tl.int16).to(dtype, bitcast=True)
        w = tl.join(lo, hi).reshape(BLOCK_N, BLOCK_K)
        # -- Xᵀ block [64, BLOCK_M] --
        xt = tl.load(
            x_ptr + offs_m[None, :] * stride_xm + (k0 + offs_k)[:, None] * stride_xk, mask=mask_m[None, :], other=0.0
        )
        part = tl.dot(w, xt)
        # -- absmax of each row's block (one value per row, decoded here under double quantization) --
        blk = (offs_n.to(tl.int64) * K + k0) >> blocksize_shift
        if DOUBLE_QUANT:
            a8 = tl.load(absmax_ptr + blk, mask=mask_n, other=0).to(tl.int32)
            nested = tl.load(nested_ptr + blk // NESTED_BLOCKSIZE, mask=mask_n, other=0.0)
            absmax = tl.load(qmap_ptr + a8) * nested + offset
        else:
            absmax = tl.load(absmax_ptr + blk, mask=mask_n, other=0.0)
        acc += part * absmax[:, None]
    return acc


@triton.jit
def _lora_bias_epilogue(
    acc, bias_ptr, scale_ptr, u_ptr, b_ptr, offs_n, mask_n, offs_m, mask_m, R,
    stride_um, stride_ur, stride_bn, stride_br, lora_scale, has_bias, has_scale, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # c ⊙ (acc + s·B·Uᵀ) + bias for one output tile [BLOCK_N, BLOCK_M], c the per-feature scale (DoRA's m / ‖W + s·B·A‖)
    # when has_scale, else 1
    lora = tl.zeros(acc.shape, dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        bt = tl.load(
            b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
            mask=mask_n[:, None] & mask_r[None, :], other=0.0,
        )  # fmt: skip
        ut = tl.load(
            u_ptr + offs_m[None, :] * stride_um + offs_r[:, None] * stride_ur,
            mask=mask_m[None, :] & mask_r[:, None], other=0.0,
        )  # fmt: skip
        lora = tl.dot(bt, ut, lora)
    acc += lora_scale * lora
    if has_scale:
        acc *= tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)[:, None]
    if has_bias:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    return acc


@triton.jit
def _last_arrival(ws, acc, mask, counter_ptr, split_k):
    # split-K reduction without a memset: every slice adds into the float32 workspace (zero between calls), then
    # counts itself in; the program that arrives last reads the sum and leaves the workspace and counter at zero
    # for the next call. The barrier before the count orders all the CTA's adds before the release (the count is
    # one thread's atomic); the acquire and the barrier after it order the last program's reads after every add.
    tl.atomic_add(ws, acc, mask=mask, sem="relaxed")
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    is_last = arrived == split_k - 1
    if is_last:
        acc = tl.load(ws, mask=mask, other=0.0, cache_modifier=".cg")
        tl.store(ws, tl.zeros_like(acc), mask=mask)
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed")
    return acc, is_last


@triton.jit(do_not_specialize=["lora_scale", "has_bias", "split_k"])
def _nf4_decode_kernel(
    x_ptr, w_ptr, absmax_ptr, qmap_ptr, nested_ptr, offset_ptr, table_ptr,
    bias_ptr, u_ptr, b_ptr, out_ptr,
    M, N, K, R, blocksize_shift,
    stride_xm, stride_xk, stride_um, stride_ur, stride_bn, stride_br, stride_om, stride_on,
    lora_scale, has_bias, split_k,
    DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, USE_ASM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # The C library's form (csrc/fastpeft_kernels.c): OUT[m, n] (float32, zeroed by the caller) += this K slice's
    # Σ_k W[n, k]·X[m, k] (+ s·U·Bᵀ + bias on the first slice), by atomics; the caller casts OUT
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    acc = _decode_partial(
        x_ptr, w_ptr, absmax_ptr, qmap_ptr, nested_ptr, offset_ptr, table_ptr, pid_n, pid_k, M, N, K, blocksize_shift,
        stride_xm, stride_xk, split_k, DOUBLE_QUANT, NESTED_BLOCKSIZE, USE_ASM, False, BLOCK_N, BLOCK_K, BLOCK_M,
    )  # fmt: skip
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    # -- epilogue: s·B·Uᵀ and bias, once per output tile (the first K slice) --
    if pid_k == 0:
        acc = _lora_bias_epilogue(acc, bias_ptr, bias_ptr, u_ptr, b_ptr, offs_n, mask_n, offs_m, mask_m, R, stride_um,
                                  stride_ur, stride_bn, stride_br, lora_scale, has_bias, 0, BLOCK_R)  # fmt: skip
    out = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None] * stride_on
    tl.atomic_add(out, acc, mask=mask_n[:, None] & mask_m[None, :], sem="relaxed")


@triton.jit(do_not_specialize=["lora_scale", "has_bias", "has_scale", "split_k"])
def _nf4_decode_fused_kernel(
    x_ptr, w_ptr, absmax_ptr, qmap_ptr, nested_ptr, offset_ptr, table_ptr,
    bias_ptr, scale_ptr, u_ptr, b_ptr, ws_ptr, counter_ptr, out_ptr,
    M, N, K, R, blocksize_shift,
    stride_xm, stride_xk, stride_um, stride_ur, stride_bn, stride_br, stride_om, stride_on,
    lora_scale, has_bias, has_scale, split_k,
    DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, USE_ASM: tl.constexpr, PREFETCH: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # OUT[m, n] = c[n]·(Σ_k W[n, k]·X[m, k] + s·(U·Bᵀ)[m, n]) + bias[n] in x's dtype (c = 1 unless has_scale): the
    # K slices meet in the float32 workspace WS [M, N] (zero between calls), the last slice of each tile to arrive
    # adds the LoRA term, scales and adds the bias
    dtype = x_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    acc = _decode_partial(
        x_ptr, w_ptr, absmax_ptr, qmap_ptr, nested_ptr, offset_ptr, table_ptr, pid_n, pid_k, M, N, K, blocksize_shift,
        stride_xm, stride_xk, split_k, DOUBLE_QUANT, NESTED_BLOCKSIZE, USE_ASM, PREFETCH, BLOCK_N, BLOCK_K, BLOCK_M,
    )  # fmt: skip
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    mask = mask_n[:, None] & mask_m[None, :]
    is_last = split_k == 1
    if split_k > 1:
        ws = ws_ptr + offs_m[None, :] * N + offs_n[:, None]
        acc, is_last = _last_arrival(ws, acc, mask, counter_ptr + pid_n, split_k)
    # -- epilogue: s·B·Uᵀ and bias, once per output tile (the last K slice to arrive), then the one store --
    if is_last:
        acc = _lora_bias_epilogue(acc, bias_ptr, scale_ptr, u_ptr, b_ptr, offs_n, mask_n, offs_m, mask_m, R,
                                  stride_um, stride_ur, stride_bn, stride_br, lora_scale, has_bias, has_scale,
                                  BLOCK_R)  # fmt: skip
        out = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None] * stride_on
        tl.store(out, acc.to(dtype), mask=mask)


@triton.jit(do_not_specialize=["scale", "has_mask", "split_k"])
def _lora_u_kernel(
    x_ptr, a_ptr, keep_ptr, ws_ptr, counter_ptr, u_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_km, stride_kk, stride_um, stride_ur,
    scale, has_mask, split_k,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # U[m, r] = scale·Σ_k (keep ⊙ X)[m, k]·A[r, k] in x's dtype; the K slices meet in the float32 workspace
    # WS [M, R] (zero between calls) and the last to arrive casts and stores U: no memset, no cast launch
    dtype = x_ptr.dtype.element_ty
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    steps = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(steps, split_k)
    k_first = pid_k * per_split
    k_last = tl.minimum(k_first + per_split, steps)
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for kb in range(k_first, k_last):
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        mask_mk = mask_m[:, None] & mask_k[None, :]
        xs = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask_mk, other=0.0)
        if has_mask:
            keep = tl.load(keep_ptr + offs_m[:, None] * stride_km + offs_k[None, :] * stride_kk, mask=mask_mk, other=0)
            xs = tl.where(keep != 0, xs, 0.0)
        at = tl.load(
            a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak, mask=mask_k[:, None] & mask_r[None, :],
            other=0.0,
        )  # fmt: skip
        acc = tl.dot(xs, at, acc)
    mask = mask_m[:, None] & mask_r[None, :]
    is_last = split_k == 1
    if split_k > 1:
        ws = ws_ptr + offs_m[:, None] * R + offs_r[None, :]
        acc, is_last = _last_arrival(ws, acc, mask, counter_ptr + pid_r, split_k)
    if is_last:
        tl.store(u_ptr + offs_m[:, None] * stride_um + offs_r[None, :] * stride_ur, (scale * acc).to(dtype), mask=mask)


# ----------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------


def decode_supported(x: torch.Tensor, nf4: NF4Args) -> bool:
    """Whether ``nf4_decode_fwd`` takes this forward: 16-bit x with at most ``DECODE_M_MAX`` rows, ``K % 64 == 0``,
    the NF4 codebook (a custom code map goes through the general GEMM) and packed bytes aligned for 64-bit loads."""
    n, k = nf4.shape
    packed = nf4.packed
    return (
        x.dtype in (torch.float16, torch.bfloat16)
        and x.shape[0] <= DECODE_M_MAX
        and k % BLOCK_K == 0
        and nf4.blocksize >= BLOCK_K
        and packed.is_contiguous()
        and packed.data_ptr() % 16 == 0
        and (nf4.quant_map is None or _is_nf4_codebook(nf4.quant_map))
    )


_CODEBOOK_CHECKED: dict[int, tuple[int, bool]] = {}
"""``id(code map) -> (its version counter, holds the NF4 values)``; an entry leaves with its tensor."""


def _is_nf4_codebook(quant_map: torch.Tensor) -> bool:
    """Whether a code map holds the NF4 values, compared once per tensor (and again after an in-place change):
    comparing a CUDA tensor waits for the device, which must not happen on every forward."""
    key = id(quant_map)
    seen = _CODEBOOK_CHECKED.get(key)
    if seen is not None and seen[0] == quant_map._version:
        return seen[1]
    same = quant_map.numel() == 16 and torch.equal(quant_map.detach().float().cpu(), torch.tensor(NF4_CODE))
    if seen is None:
        weakref.finalize(quant_map, _CODEBOOK_CHECKED.pop, key, None)
    _CODEBOOK_CHECKED[key] = (quant_map._version, same)
    return same


def _block_m(m: int) -> int:
    return max(16, triton.next_power_of_2(m))


def _block_r(r: int) -> int:
    # tl.dot needs every dimension >= 16; ranks past 64 tile the U kernel's grid and loop in the decode epilogue
    return min(64, max(16, triton.next_power_of_2(r)))


RESIDENT_PER_SM = {16: 4, 32: 3, 64: 2}
"""Decode programs resident per SM for each ``BLOCK_M``: 128 threads of the gate's registers on sm_80 and sm_90a
(≤ 128, ≤ 168 and ≤ 255 registers; a compile-gate test holds the binaries to it)."""

_SYNC: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
"""Per device: the float32 split-K workspace and the int32 arrival counters, both zero between calls."""


def _sync_buffers(device: torch.device, floats: int, counters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The split-K workspace (at least ``floats`` float32) and counters (at least ``counters``), zero on entry.

    Every launch that adds into them leaves them at zero (the last program of each tile clears its part), so they
    are zeroed only when they grow: the first call at a new largest size, before a CUDA graph is captured (a warm-up
    call), never per call. Launches of one device run in stream order (one stream per process), so calls share them.
    """
    ws, cnt = _SYNC.get(device, (None, None))
    if ws is None or ws.numel() < floats:
        ws = torch.zeros(max(floats, 1 << 12), dtype=torch.float32, device=device)
    if cnt is None or cnt.numel() < counters:
        cnt = torch.zeros(max(counters, 1 << 10), dtype=torch.int32, device=device)
    _SYNC[device] = (ws, cnt)
    return ws, cnt


def decode_split(steps: int, tiles: int, sms: int, block_m: int) -> int:
    """K slices per output tile: as many as one wave of resident programs holds (``RESIDENT_PER_SM``), never a
    second, partial wave. The decode loop is latency-bound (its bytes in flight, not its instructions, set the
    speed), so filling every resident slot pays; the cost model's best split for the Llama-3-8B projections at
    M = 1-64 is this one (``python -m fastpeft.kernels._perf --report``)."""
    return max(1, min(steps, RESIDENT_PER_SM[block_m] * sms // tiles))


def lora_u_fwd(
    x: torch.Tensor, lora_a: torch.Tensor, keep: tuple[torch.Tensor, bool], scale: float, target_programs: int
) -> torch.Tensor:
    """``U = scale·(keep ⊙ X)·Aᵀ`` in x's dtype, one launch (arguments validated by the caller).

    Args:
        x: ``[M, K]`` float16 / bfloat16, M <= ``DECODE_M_MAX``. lora_a: ``[R, K]`` in x's dtype.
        keep: the uint8 keep-mask ``[M, K]`` and whether there is one. scale: ``1 / (1 - p)`` or 1.
        target_programs: programs that fill the device (split-K stops there).

    Returns:
        ``u [M, R]`` in x's dtype (accumulated in float32).
    """
    m, k = x.shape
    r = lora_a.shape[0]
    block_r = _block_r(r)
    r_tiles = triton.cdiv(r, block_r)
    split = max(1, min(triton.cdiv(k, BLOCK_K), triton.cdiv(target_programs, r_tiles)))
    ws, cnt = _sync_buffers(x.device, m * r, r_tiles)
    u = x.new_empty((m, r))
    keep_t, has_mask = keep
    _lora_u_kernel[(r_tiles, split)](
        x, lora_a, keep_t, ws, cnt, u, m, k, r,
        x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1),
        keep_t.stride(0) if has_mask else 0, keep_t.stride(1) if has_mask else 0, u.stride(0), u.stride(1),
        float(scale), int(has_mask), split,
        BLOCK_M=_block_m(m), BLOCK_K=BLOCK_K, BLOCK_R=block_r, num_warps=NUM_WARPS,
    )  # fmt: skip
    return u


def nf4_decode_fwd(
    x: torch.Tensor,
    nf4: NF4Args,
    bias: torch.Tensor | None,
    u: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scaling: float,
    target_programs: int,
    col_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Y = c ⊙ (X·dequant(W)ᵀ + s·U·Bᵀ) + bias`` for a ``decode_supported`` call (arguments validated by the
    caller), one launch: the output is written once, in x's dtype, by the last K slice of each tile to finish.

    Args:
        x: ``[M, K]`` float16 / bfloat16, M <= ``DECODE_M_MAX``. nf4: an NF4 ``[N, K]`` weight.
        bias: ``[N]`` or None. u: ``[M, R]`` and lora_b: ``[N, R]`` in x's dtype, or both None (no LoRA term).
        scaling: ``s``. target_programs: two programs per SM (the split-K rule reads the SM count from it).
        col_scale: ``c`` float32 ``[N]`` (DoRA's ``m / ‖W + s·B·A‖``, applied in the epilogue before the bias), or
            None for 1.

    Returns:
        ``y [M, N]`` in x's dtype.
    """
    m, k = x.shape
    n = nf4.shape[0]
    device = x.device
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    tables = decode_tables(x.dtype, device)
    # packed bytes as int32 words: 8 codes each; K % 64 == 0 puts every row's 64-block on 8 whole words
    words = nf4.packed.reshape(-1).view(torch.int32)
    double_quant = nf4.absmax.dtype == torch.uint8
    if double_quant:
        qmap = nf4.nested_quant_map if nf4.nested_quant_map is not None else dynamic_map(device)
        qmap = qmap.to(device=device, dtype=torch.float32).contiguous()
        nested, offset = nf4.nested_absmax, nf4.offset.reshape(1).to(torch.float32)
    else:
        qmap = nested = offset = nf4.absmax  # unread placeholders of the signature's type
    if u is None:
        r, u, lora_b = 0, x, x  # R = 0: the epilogue loop runs no step; placeholders keep one signature
    else:
        r = u.shape[1]
    tiles = triton.cdiv(n, BLOCK_N)
    block_m = _block_m(m)
    split = decode_split(k // BLOCK_K, tiles, max(1, target_programs // 2), block_m)
    ws, cnt = _sync_buffers(device, m * n, tiles)
    out = x.new_empty((m, n))
    _nf4_decode_fused_kernel[(tiles, split)](
        x, words, nf4.absmax, qmap, nested, offset, tables, x if bias is None else bias,
        ws if col_scale is None else col_scale, u, lora_b, ws, cnt, out,
        m, n, k, r, nf4.blocksize.bit_length() - 1,
        x.stride(0), x.stride(1), u.stride(0), u.stride(1), lora_b.stride(0), lora_b.stride(1),
        out.stride(0), out.stride(1),
        float(scaling), int(bias is not None), int(col_scale is not None), split,
        DOUBLE_QUANT=double_quant, NESTED_BLOCKSIZE=nf4.nested_blocksize, USE_ASM=not interpret, PREFETCH=PREFETCH,
        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_M=block_m, BLOCK_R=16, num_warps=NUM_WARPS, num_stages=1,
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------
# compile gate
# ----------------------------------------------------------------------------------------------


def _gate_case(
    dtype: torch.dtype, dq: bool, block_m: int, m: int, n: int = 4096, k: int = 4096, fused: bool = True
) -> GateCase:
    ty = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    out = {"ws_ptr": "*fp32", "counter_ptr": "*i32", "out_ptr": f"*{ty}"} if fused else {"out_ptr": "*fp32"}
    scale = {"scale_ptr": "*fp32"} if fused else {}
    signature = {
        "x_ptr": f"*{ty}", "w_ptr": "*i32", "absmax_ptr": "*u8" if dq else "*fp32", "qmap_ptr": "*fp32",
        "nested_ptr": "*fp32", "offset_ptr": "*fp32", "table_ptr": "*i32", "bias_ptr": f"*{ty}", **scale,
        "u_ptr": f"*{ty}", "b_ptr": f"*{ty}", **out,
        **dict.fromkeys(("M", "N", "K", "R", "blocksize_shift"), "i32"),
        **dict.fromkeys(("stride_xm", "stride_xk", "stride_um", "stride_ur", "stride_bn", "stride_br",
                         "stride_om", "stride_on"), "i32"),
        "lora_scale": "fp32", "has_bias": "i32", **({"has_scale": "i32"} if fused else {}), "split_k": "i32",
    }  # fmt: skip
    shape = "" if (n, k) == (4096, 4096) else f",{n}x{k}"
    consts = {"DOUBLE_QUANT": dq, "NESTED_BLOCKSIZE": NESTED_BLOCKSIZE, "USE_ASM": True}
    if fused:
        consts["PREFETCH"] = PREFETCH
    return GateCase(
        name=f"nf4_decode{'_fused' if fused else ''}[{ty},{'nf4dq' if dq else 'nf4'},BLOCK_M={block_m},M={m}{shape}]",
        module=__name__,
        kernel="_nf4_decode_fused_kernel" if fused else "_nf4_decode_kernel",
        signature=signature,
        constexprs={**consts, "BLOCK_N": BLOCK_N, "BLOCK_K": BLOCK_K, "BLOCK_M": block_m, "BLOCK_R": 16},
        num_warps=NUM_WARPS,
        num_stages=1,
        tensor_cores=True,
        args={
            "M": m,
            "N": n,
            "K": k,
            "R": 16,
            "blocksize_shift": 6,
            "stride_xm": k,
            "stride_xk": 1,
            "stride_um": 16,
            "stride_ur": 1,
            "stride_bn": 16,
            "stride_br": 1,
            "stride_om": n,
            "stride_on": 1,
            "lora_scale": 2.0,
            "has_bias": 1,
            **({"has_scale": 1} if fused else {}),
            "split_k": 8,
        },  # fmt: skip
        path="decode",
        weights_per_iteration=BLOCK_N * BLOCK_K,
        bytes_per_weight=0.5 + (1.0 if dq else 4.0) / 64,
    )


def _u_gate_case(dtype: torch.dtype, block_m: int, m: int, block_r: int, k: int = 4096) -> GateCase:
    ty = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    r = block_r
    signature = {
        "x_ptr": f"*{ty}", "a_ptr": f"*{ty}", "keep_ptr": "*u8", "ws_ptr": "*fp32", "counter_ptr": "*i32",
        "u_ptr": f"*{ty}", **dict.fromkeys(("M", "K", "R"), "i32"),
        **dict.fromkeys(("stride_xm", "stride_xk", "stride_ar", "stride_ak", "stride_km", "stride_kk", "stride_um",
                         "stride_ur"), "i32"),
        "scale": "fp32", "has_mask": "i32", "split_k": "i32",
    }  # fmt: skip
    return GateCase(
        name=f"lora_u[{ty},BLOCK_M={block_m},M={m},BLOCK_R={block_r}]",
        module=__name__,
        kernel="_lora_u_kernel",
        signature=signature,
        constexprs={"BLOCK_M": block_m, "BLOCK_K": BLOCK_K, "BLOCK_R": block_r},
        num_warps=NUM_WARPS,
        tensor_cores=True,
        warpgroup_mma=block_m >= 64,
        args={
            "M": m,
            "K": k,
            "R": r,
            "stride_xm": k,
            "stride_xk": 1,
            "stride_ar": k,
            "stride_ak": 1,
            "stride_km": k,
            "stride_kk": 1,
            "stride_um": r,
            "stride_ur": 1,
            "scale": 1.0,
            "has_mask": 0,
            "split_k": 8,
        },  # fmt: skip
    )


def compile_gate_cases() -> list[GateCase]:
    """The decode kernel per 16-bit dtype x plain / double-quantized absmax x each ``BLOCK_M`` the launcher
    picks, at the Llama-3-8B 4096 x 4096 projection (M = 1 compiles its own binary: Triton makes an int equal
    to 1 a constant), plus one unaligned shape; the same for the C library's atomic form (``_nf4_decode_kernel``);
    the U kernel per dtype x ``BLOCK_M`` x ``BLOCK_R``."""
    cases = []
    for fused in (True, False):
        for dtype in (torch.float16, torch.bfloat16):
            for dq in (False, True):
                for block_m, m in ((16, 1), (16, 16), (32, 32), (64, 64)):
                    cases.append(_gate_case(dtype, dq, block_m, m, fused=fused))
        cases.append(_gate_case(torch.bfloat16, True, 16, 5, n=4097, k=4160, fused=fused))
    for dtype in (torch.float16, torch.bfloat16):
        for block_m, m in ((16, 1), (16, 16), (32, 32), (64, 64)):
            for block_r in (16, 32, 64):
                cases.append(_u_gate_case(dtype, block_m, m, block_r))
    return cases
