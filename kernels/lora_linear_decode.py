"""Decode-size NF4 + LoRA forward: ``Yᵀ = W·Xᵀ`` with W decoded by byte permutes straight into the MMA operand.

For ``M <= 16`` rows (token-by-token generation, small batches) a linear reads ``N·K/2`` bytes of packed W
for ``2·M·N·K`` flops: the GPU is bound by how fast it *decodes* weights, not by its tensor cores. This
kernel computes the transposed product ``OUT[m, n] = Σ_k W[n, k]·X[m, k] + s·(U·Bᵀ)[m, n] + bias[n]``
as ``[BLOCK_N, 64]·[64, 16]`` tensor-core products (M padded to 16), so that the decoded W tile is the
large MMA operand and X the small one.

Decode: ``kernels/nf4_prmt.py`` (byte permutes, 16 permutes and ≈ 5 integer instructions per 8 weights).

Scaling. The codebook values enter the MMA in the input dtype (16 bits) and each row's absmax is
applied once per 64-element block, after the block's partial product (one FMA per output element per
64 weights): ``acc += (code·Xᵀ)·absmax`` instead of ``(code·absmax)·Xᵀ``. The rounding differs from
the reference's, which rounds ``code·absmax`` to 16 bits before the product: here ``code`` is rounded
(relative error ≤ 2⁻⁹ in bfloat16, 2⁻¹¹ in float16) and ``absmax`` stays float32, so each weight carries
at most the same relative error as in the reference, and the tests hold it to the same oracle rule.
Blocks of 64 along K need ``K % 64 == 0`` (every absmax block then lies inside one row); the launcher
takes other shapes, float32 inputs and custom code maps through the general GEMM.

Fragment order. The decoded tile goes to the tensor cores from registers (the MMA's A operand), so each thread
must decode exactly the elements its MMA fragment holds: with 4 warps a tile row ``i`` belongs to warp
``(i mod 64) / 16``, lane ``4·(i mod 8) + q`` holds the column pairs ``2q + 8d + 16e`` (``d`` < 2, ``e`` < 4). The
words are loaded as a ``[2, 2, 4, 8, 8]`` tensor (tile row ``64b + 16w + 8a + r``, word), whose coalesced layout
puts ``w`` on the warps and ``(r, word / 2)`` on the lanes, and the decoded values are permuted to ``[128, 64]``
with column ``j = 16p + 8d + 2q + c`` holding ``k = 16q + 8d + 2p + c`` (``p`` the pair within a word): a lane's
two consecutive words then fill its fragment, and Triton's layout conversion to the MMA operand is a register
renaming. X is loaded in the same permuted K order (the product over K does not depend on it). Before, the
decoded tile (16 KB) went through shared memory every iteration: the model put the loop at the 128 B/clk
load/store path's limit (384 of its cycles per CTA-iteration against 406 of the integer pipe's); now 73 cycles
(``python -m fastpeft.kernels._perf --report``, sm_90a, estimates).

Under Triton's interpreter (CPU tests) inline PTX cannot run: ``USE_ASM=False`` selects a twin that
builds the same int32 pairs from a 16-entry table of 16-bit code patterns with loads. The permute path
is checked by the compile gate (and on a GPU by the ``gpu`` tests).

A forward is one launch without dropout (``fold_u_supported``: R <= 64, M <= 16): every K slice also sums its
share of ``U = X·Aᵀ`` beside the main product (A's block read from L2, in the same K order as X) and adds
``s·B·U_sliceᵀ`` to its partial before the split-K sum, so the slices' LoRA terms add up to the whole; tile 0's
slices also add their U shares into a float32 workspace, and its last slice stores U for the backward. With a
dropout mask (or a larger R or M) it is two launches: ``_lora_u_kernel`` writes ``U = drop(X)·Aᵀ``, then slice 0 of
each tile adds ``s·B·Uᵀ``. Either way the LoRA term is added after the main loop into the loop's float32
accumulator (before the loop it would serialize the wgmma: C7515), and the last slice to arrive only scales
(DoRA's ``col_scale``), adds the bias (both loaded before the count) and stores: nothing but the sum stands
between the count and the store. The rows' absmax codes are loaded at the top of each iteration, so the decode
covers their latency (only the code-map gather, an L1 hit, waits after it). The decode's three right shifts
per word run as ``mul.hi`` on the FMA pipe at BLOCK_M = 16 (``nf4_prmt``; past it they stay shifts, whose two
registers fewer keep BLOCK_M = 32 at 3 programs per SM on every supported Triton and 64 from spilling). Cost model at M = 1, H100, estimates (call with launch overhead):
4096 x 4096 6.8 us (kernel 4.8 us), 14336 x 4096 15.9 us, 4096 x 14336 14.3 us, 1024 x 4096 4.6 us.

Split-K: ``N / BLOCK_N`` programs rarely fill a GPU, so K is split over a second grid axis until one wave of
resident programs (``resident_per_sm``, from the binaries' registers) is full, rounded so that no slice is empty.
The loop issues the next block's W loads before it decodes the current one (``PREFETCH``: a register stage, 8 words
per thread). The slices meet in a float32 ``[M, N]`` workspace by L2 atomics; an int32 counter per output tile
counts the slices that have added; the last to arrive reads the sum, stores Y once in x's dtype and clears its
workspace tile and counter, so workspace and counters are zero between calls without a memset (zeroed once, when
they grow). The alternatives: no split leaves 32 programs on 132 SMs; atomics into Y itself need Y zeroed (a
launch) and float32 (a cast launch); a plain store per slice with the last program summing them all puts ``split``
L2 round trips on that program's critical path (not modelled). There is no host synchronisation and no
data-dependent host logic, so the launches are CUDA-graph capturable once a warm-up call has sized the workspace.
The summation order of float atomics varies run to run (as before), within the oracle's tolerance.
What binds now (the model): the integer pipe in the given-U form (PRMT decode, ≈ 2.6 integer-pipe instructions
per weight: 332 cycles per CTA-iteration against ≈ 308 of HBM bytes), the loop's latency in the folded form (3
programs per SM, 148-168 registers); see benchmarks/model_predictions.md.
The C library (``csrc/``) still launches the atomic form, ``_nf4_decode_kernel``, into a workspace it zeroes.
"""

from __future__ import annotations

import os
import weakref

import torch
import triton
import triton.language as tl

from fastpeft.kernels._gate import GateCase
from fastpeft.kernels.formats import NF4_CODE, NF4Args, dynamic_map
from fastpeft.kernels.nf4_prmt import DECODE_ASM, DECODE_ASM_SHR, _decode_words, _permute_tables, decode_tables

__all__ = [
    "DECODE_ASM", "DECODE_ASM_SHR", "DECODE_M_MAX", "FOLD_R_MAX", "compile_gate_cases", "decode_supported",
    "decode_tables", "fold_u_supported", "lora_u_fwd", "nf4_decode_fwd",
]  # fmt: skip

BLOCK_N = 128
"""Output features per program: two 64-row warpgroup MMAs (sm_90) or four warps of HMMA (sm_80)."""
BLOCK_K = 64
"""K per main-loop iteration: one absmax block of the smallest blocksize."""
DECODE_M_MAX = 64
"""Rows up to which the NF4 forward takes this kernel (X padded to ``BLOCK_M`` = 16, 32 or 64 rows)."""
NUM_WARPS = 4
PREFETCH = True
"""Whether the decode loop issues the next block's W loads before it decodes the current one."""


@triton.jit
def _decode_partial(
    x_ptr, w_ptr, absmax_ptr, qmap_ptr, nested_ptr, offset_ptr, table_ptr, a_ptr,
    pid_n, pid_k, M, N, K, R, blocksize_shift, stride_xm, stride_xk, stride_ar, stride_ak, split_k,
    DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, USE_ASM: tl.constexpr, PREFETCH: tl.constexpr,
    FOLD_U: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # float32 [BLOCK_N, BLOCK_M]: Σ_k W[n, k]·X[m, k] over K slice pid_k of split_k, for tile pid_n; and, when FOLD_U,
    # float32 [BLOCK_R, BLOCK_M]: Σ_k A[r, k]·X[m, k] over the same slice (this slice's share of Uᵀ)
    dtype = x_ptr.dtype.element_ty
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    steps = K // BLOCK_K
    per_split = tl.cdiv(steps, split_k)
    k_first = pid_k * per_split
    k_last = tl.minimum(k_first + per_split, steps)
    # -- fragment order (module doc): W words as [2, 2, 4, 8, 8] = (b, a, w, r, word), tile row 64b + 16w + 8a + r --
    tl.static_assert(BLOCK_N == 128 and BLOCK_K == 64)
    rows = (
        64 * tl.arange(0, 2)[:, None, None, None, None]
        + 8 * tl.arange(0, 2)[None, :, None, None, None]
        + 16 * tl.arange(0, 4)[None, None, :, None, None]
        + tl.arange(0, 8)[None, None, None, :, None]
    )
    word = tl.arange(0, 8)[None, None, None, None, :]
    n5 = pid_n * BLOCK_N + rows
    mask5 = n5 < N
    # packed W as int32 words: row n's block k0 starts at word (n·K + k0) / 8 (K % 64 == 0: 32-byte aligned)
    w_rows = w_ptr + n5.to(tl.int64) * (K // 8) + word
    # Xᵀ rows in the matching K order: tile column j = 16p + 8d + 2q + c holds k = 16q + 8d + 2p + c
    j = tl.arange(0, BLOCK_K)
    k_of_j = 16 * ((j // 2) % 4) + 8 * ((j // 8) % 2) + 2 * (j // 16) + j % 2
    x_rows = x_ptr + offs_m[None, :] * stride_xm + k_of_j[:, None] * stride_xk
    offset = tl.load(offset_ptr)
    # the decode's shifts on the FMA pipe (IMAD.HI) at BLOCK_M = 16; past it the two multiplier registers cost a
    # program per SM (BLOCK_M = 32 under Triton 3.6: 175 registers) or spill (64)
    shifts_on_fma: tl.constexpr = BLOCK_M <= 16
    t0, t1, t2, t3, t4, t5, t6, t7, sel, sh16, sh1 = _permute_tables(table_ptr, USE_ASM, shifts_on_fma)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    ut = tl.zeros([BLOCK_R, BLOCK_M], dtype=tl.float32)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    if PREFETCH:
        zero5 = tl.zeros_like(n5)  # the slice's end as a row mask (the interpreter refuses a scalar & a block)
        # the first block's words; each iteration then issues the next block's loads before it decodes this one,
        # so two iterations' W bytes are in flight per program (a register stage: no shared memory, no cp.async)
        words_next = tl.load(w_rows + k_first * (BLOCK_K // 8), mask=mask5 & (k_first + zero5 < k_last), other=0,
                             eviction_policy="evict_first")  # fmt: skip
    for kb in range(k_first, k_last):
        k0 = kb * BLOCK_K
        # -- load: 32 bytes per row, streamed once --
        if PREFETCH:
            words = words_next
            words_next = tl.load(w_rows + (kb + 1) * (BLOCK_K // 8), mask=mask5 & (kb + 1 + zero5 < k_last), other=0,
                                 eviction_policy="evict_first")  # fmt: skip
        else:
            words = tl.load(w_rows + kb * (BLOCK_K // 8), mask=mask5, other=0, eviction_policy="evict_first")
        # -- Xᵀ block [64, BLOCK_M], K permuted as W's columns, issued before the decode covers its latency --
        xt = tl.load(x_rows + k0 * stride_xk, mask=mask_m[None, :], other=0.0)
        if FOLD_U:
            # A's block in the same K order (L2-resident: every tile's slice j reads the same block)
            at = tl.load(a_ptr + offs_r[:, None] * stride_ar + (k0 + k_of_j)[None, :] * stride_ak,
                         mask=mask_r[:, None], other=0.0)  # fmt: skip
        # -- the rows' absmax codes, issued before the decode covers their latency (the code-map gather after it) --
        blk = (offs_n.to(tl.int64) * K + k0) >> blocksize_shift
        if DOUBLE_QUANT:
            a8 = tl.load(absmax_ptr + blk, mask=mask_n, other=0)
            nested = tl.load(nested_ptr + blk // NESTED_BLOCKSIZE, mask=mask_n, other=0.0)
        else:
            absmax = tl.load(absmax_ptr + blk, mask=mask_n, other=0.0)
        # -- decode: 8 codes a word -> [BLOCK_N, 64] code values in x's dtype, already in the MMA operand's order --
        o0, o1, o2, o3 = _decode_words(
            words, table_ptr, t0, t1, t2, t3, t4, t5, t6, t7, sel, sh16, sh1, USE_ASM, shifts_on_fma
        )
        pairs = tl.join(tl.join(o0, o2), tl.join(o1, o3)).reshape(2, 2, 4, 8, 8, 4)  # (..., word, p)
        lo = pairs.to(tl.int16).to(dtype, bitcast=True)
        hi = (pairs >> 16).to(tl.int16).to(dtype, bitcast=True)
        w = tl.join(lo, hi).reshape(2, 2, 4, 8, 4, 2, 4, 2)  # (b, a, w, r, q, d, p, c)
        w = tl.permute(w, (0, 2, 1, 3, 6, 5, 4, 7)).reshape(BLOCK_N, BLOCK_K)  # rows (b, w, a, r), columns (p, d, q, c)
        part = tl.dot(w, xt)
        if FOLD_U:
            ut = tl.dot(at, xt, ut)
        # -- absmax of each row's block (one value per row, decoded here under double quantization) --
        if DOUBLE_QUANT:
            absmax = tl.load(qmap_ptr + a8.to(tl.int32)) * nested + offset
        acc += part * absmax[:, None]
    return acc, ut


@triton.jit
def _lora_from_u(
    u_ptr, b_ptr, offs_n, mask_n, offs_m, mask_m, R, stride_um, stride_ur, stride_bn, stride_br,
    BLOCK_R: tl.constexpr,
):  # fmt: skip
    # B·Uᵀ [BLOCK_N, BLOCK_M] for one output tile from the whole U [M, R] (float32)
    lora = tl.zeros([offs_n.shape[0], offs_m.shape[0]], dtype=tl.float32)
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
    return lora


@triton.jit
def _lora_from_partial(ut, b_ptr, offs_n, mask_n, R, stride_bn, stride_br, BLOCK_R: tl.constexpr):
    # B·Uᵀ_slice [BLOCK_N, BLOCK_M] from this slice's float32 share of Uᵀ [BLOCK_R, BLOCK_M], rounded to B's dtype
    # for the product (the two-launch path rounds the whole U to x's dtype the same way)
    offs_r = tl.arange(0, BLOCK_R)
    bt = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                 mask=mask_n[:, None] & (offs_r < R)[None, :], other=0.0)  # fmt: skip
    return tl.dot(bt, ut.to(bt.dtype))


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
    acc, _ = _decode_partial(
        x_ptr, w_ptr, absmax_ptr, qmap_ptr, nested_ptr, offset_ptr, table_ptr, u_ptr, pid_n, pid_k, M, N, K, R,
        blocksize_shift, stride_xm, stride_xk, 0, 0, split_k, DOUBLE_QUANT, NESTED_BLOCKSIZE, USE_ASM, False, False,
        BLOCK_N, BLOCK_K, BLOCK_M, BLOCK_R,
    )  # fmt: skip
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    # -- epilogue: s·B·Uᵀ and bias, once per output tile (the first K slice) --
    if pid_k == 0:
        acc += lora_scale * _lora_from_u(u_ptr, b_ptr, offs_n, mask_n, offs_m, mask_m, R, stride_um, stride_ur,
                                         stride_bn, stride_br, BLOCK_R)  # fmt: skip
        if has_bias:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    out = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None] * stride_on
    tl.atomic_add(out, acc, mask=mask_n[:, None] & mask_m[None, :], sem="relaxed")


@triton.jit(do_not_specialize=["lora_scale", "has_bias", "has_scale", "split_k"])
def _nf4_decode_fused_kernel(
    x_ptr, w_ptr, absmax_ptr, qmap_ptr, nested_ptr, offset_ptr, table_ptr,
    bias_ptr, scale_ptr, norm_ptr, a_ptr, u_ptr, b_ptr, ws_ptr, counter_ptr, out_ptr,
    M, N, K, R, blocksize_shift,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_um, stride_ur, stride_bn, stride_br, stride_om, stride_on,
    lora_scale, has_bias, has_scale, split_k,
    DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, USE_ASM: tl.constexpr, PREFETCH: tl.constexpr,
    FOLD_U: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
):  # fmt: skip
    # OUT[m, n] = c[n]·(Σ_k W[n, k]·X[m, k] + s·(U·Bᵀ)[m, n]) + bias[n] in x's dtype (c = 1 unless has_scale; 2:
    # c = scale / norm). The
    # LoRA term joins the partial sums before they meet: with FOLD_U every slice adds s·B·Uᵀ of its own K range
    # (U = X·Aᵀ accumulated beside the main product, no U launch), else slice 0 adds s·B·Uᵀ from the given U. The
    # K slices meet in the float32 workspace WS [M, N] (zero between calls); the last of each tile to arrive scales,
    # adds the bias and stores, so nothing but the sum stands between the count and the store.
    dtype = x_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    acc, ut = _decode_partial(
        x_ptr, w_ptr, absmax_ptr, qmap_ptr, nested_ptr, offset_ptr, table_ptr, a_ptr, pid_n, pid_k, M, N, K, R,
        blocksize_shift, stride_xm, stride_xk, stride_ar, stride_ak, split_k, DOUBLE_QUANT, NESTED_BLOCKSIZE,
        USE_ASM, PREFETCH, FOLD_U, BLOCK_N, BLOCK_K, BLOCK_M, BLOCK_R,
    )  # fmt: skip
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    mask = mask_n[:, None] & mask_m[None, :]
    # -- the LoRA term, after the main loop (written into the loop's accumulator before it, wgmma serializes) --
    offs_r = tl.arange(0, BLOCK_R)
    mask_u = (offs_r < R)[:, None] & mask_m[None, :]
    if FOLD_U:
        acc += lora_scale * _lora_from_partial(ut, b_ptr, offs_n, mask_n, R, stride_bn, stride_br, BLOCK_R)
        if pid_n == 0 and split_k > 1:
            # tile 0's slices also sum U itself, behind the float32 [M, N] workspace: its last arrival stores it
            tl.atomic_add(ws_ptr + M * N + offs_m[None, :] * R + offs_r[:, None], ut, mask=mask_u, sem="relaxed")
    else:
        if pid_k == 0:
            acc += lora_scale * _lora_from_u(u_ptr, b_ptr, offs_n, mask_n, offs_m, mask_m, R, stride_um, stride_ur,
                                             stride_bn, stride_br, BLOCK_R)  # fmt: skip
    # -- scale and bias loaded before the count, so their latency overlaps the split-K round trips --
    c = tl.full([BLOCK_N], 1.0, tl.float32)
    if has_scale:
        c = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)
        if has_scale == 2:  # c = m / ‖W + s·B·A‖, DoRA's factor formed here rather than by a launch of its own
            c = c / tl.load(norm_ptr + offs_n, mask=mask_n, other=1.0)
    bias = tl.zeros([BLOCK_N], dtype=tl.float32)
    if has_bias:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    is_last = split_k == 1
    if split_k > 1:
        ws = ws_ptr + offs_m[None, :] * N + offs_n[:, None]
        acc, is_last = _last_arrival(ws, acc, mask, counter_ptr + pid_n, split_k)
    # -- epilogue: once per output tile (the last K slice to arrive), the one store --
    if is_last:
        acc = acc * c[:, None] + bias[:, None]
        out = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None] * stride_on
        tl.store(out, acc.to(dtype), mask=mask)
        if FOLD_U and pid_n == 0:
            if split_k > 1:
                uws = ws_ptr + M * N + offs_m[None, :] * R + offs_r[:, None]
                ut = tl.load(uws, mask=mask_u, other=0.0, cache_modifier=".cg")
                tl.store(uws, tl.zeros_like(ut), mask=mask_u)
            tl.store(u_ptr + offs_m[None, :] * stride_um + offs_r[:, None] * stride_ur, ut.to(dtype), mask=mask_u)


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


FOLD_R_MAX = 64
"""Ranks up to which the decode launch accumulates U = X·Aᵀ itself (its share of Uᵀ stays in registers)."""


FOLD_M_MAX = 16
"""Rows up to which it does (one ``BLOCK_M``; at 64 rows the folded loop's registers spill)."""


def fold_u_supported(m: int, r: int, dropout: bool) -> bool:
    """Whether a ``decode_supported`` forward that needs no U back (no gradient) runs as one launch: U = X·Aᵀ
    accumulated in the decode loop beside W·Xᵀ. With a dropout mask, a rank past ``FOLD_R_MAX`` or more than
    ``FOLD_M_MAX`` rows, the U kernel runs first (two launches)."""
    return 0 < r <= FOLD_R_MAX and m <= FOLD_M_MAX and not dropout


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


_TRITON_BEFORE_3_9 = tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 9)
RESIDENT_PER_SM = {90: {16: 4, 32: 3, 64: 2}, 80: {16: 3, 32: 2, 64: 2}}
"""Decode programs (128 threads) resident per SM for each arch and ``BLOCK_M``, from the gate's registers: on
sm_90a ≤ 128, ≤ 168 and ≤ 255, on sm_80 ≤ 168, ≤ 255 and ≤ 255 (a compile-gate test holds the binaries to it)."""
RESIDENT_PER_SM_FOLD = {90: {16: 3}, 80: {16: 2}}
"""The same for the one-launch form (``BLOCK_M`` = 16, U accumulated in the loop: ≤ 168 registers on sm_90a, ≤ 255
on sm_80)."""


def resident_per_sm(arch: int, block_m: int, fold: bool, n: int) -> int:
    """Decode programs per SM the split-K rule plans for: ``RESIDENT_PER_SM`` (or ``_FOLD``), one fewer at
    ``BLOCK_M`` = 16 on sm_90a for the given-U form when N is not a multiple of 16 (that specialization takes 130
    registers) and for both forms under Triton before 3.9 (its builds take more registers there)."""
    arch = 90 if arch >= 90 else 80
    resident = (RESIDENT_PER_SM_FOLD if fold else RESIDENT_PER_SM)[arch][block_m]
    if arch == 90 and block_m == 16 and _TRITON_BEFORE_3_9:
        return resident - 1  # Triton 3.6-3.8 builds take 140 (174 folded) registers there
    return resident - 1 if arch == 90 and not fold and block_m == 16 and n % 16 else resident


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


def decode_split(
    steps: int, tiles: int, sms: int, block_m: int, fold: bool = False, arch: int = 90, n: int = 0
) -> int:  # fmt: skip
    """K slices per output tile: as many as one wave of resident programs holds (``RESIDENT_PER_SM``), never a
    second, partial wave. The decode loop is latency-bound (its bytes in flight, not its instructions, set the
    speed), so filling every resident slot pays; the cost model's best split for the Llama-3-8B projections at
    M = 1-64 is this one (``python -m fastpeft.kernels._perf --report``)."""
    split = max(1, min(steps, resident_per_sm(arch, block_m, fold, n) * sms // tiles))
    return triton.cdiv(steps, triton.cdiv(steps, split))  # the slices the rounding leaves non-empty: no idle CTA


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
    lora_a: torch.Tensor | None = None,
    col_norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Y = c ⊙ (X·dequant(W)ᵀ + s·U·Bᵀ) + bias`` for a ``decode_supported`` call (arguments validated by the
    caller), one launch: the output is written once, in x's dtype, by the last K slice of each tile to finish.

    Args:
        x: ``[M, K]`` float16 / bfloat16, M <= ``DECODE_M_MAX``. nf4: an NF4 ``[N, K]`` weight.
        bias: ``[N]`` or None. u: ``[M, R]`` and lora_b: ``[N, R]`` in x's dtype, or both None (no LoRA term).
        scaling: ``s``. target_programs: two programs per SM (the split-K rule reads the SM count from it).
        col_scale: ``c`` float32 ``[N]`` (DoRA's ``m / ‖W + s·B·A‖``, applied in the epilogue before the bias), or
            None for 1. col_norm: float32 ``[N]`` or None: with it the epilogue applies ``col_scale / col_norm``
            (DoRA's magnitude and row norm, the factor formed in the kernel).
        lora_a: ``[R, K]`` in x's dtype with ``u`` None (``fold_u_supported``: no dropout): U = X·Aᵀ is
            accumulated inside this launch, so the whole LoRA forward is this one launch, and returned.

    Returns:
        ``y [M, N]`` in x's dtype; with ``lora_a``, ``(y, u)``, ``u [M, R]`` in x's dtype.
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
    fold = lora_a is not None
    if fold:
        r = lora_a.shape[0]
        u, a = x.new_empty((m, r)), lora_a  # written by the launch
        block_r = _block_r(r)
    elif u is None:
        r, u, a, lora_b = 0, x, x, x  # R = 0: the LoRA loop runs no step; placeholders keep one signature
        block_r = 16
    else:
        r, a, block_r = u.shape[1], x, 16
    tiles = triton.cdiv(n, BLOCK_N)
    block_m = _block_m(m)
    arch = 90
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        arch = 10 * major + minor
    split = decode_split(k // BLOCK_K, tiles, max(1, target_programs // 2), block_m, fold, arch, n)
    ws, cnt = _sync_buffers(device, m * n + (m * r if fold else 0), tiles)
    out = x.new_empty((m, n))
    _nf4_decode_fused_kernel[(tiles, split)](
        x, words, nf4.absmax, qmap, nested, offset, tables, x if bias is None else bias,
        ws if col_scale is None else col_scale, ws if col_norm is None else col_norm, a, u, lora_b, ws, cnt, out,
        m, n, k, r, nf4.blocksize.bit_length() - 1,
        x.stride(0), x.stride(1), a.stride(0), a.stride(1), u.stride(0), u.stride(1), lora_b.stride(0),
        lora_b.stride(1), out.stride(0), out.stride(1),
        float(scaling), int(bias is not None), 0 if col_scale is None else 2 if col_norm is not None else 1, split,
        DOUBLE_QUANT=double_quant, NESTED_BLOCKSIZE=nf4.nested_blocksize, USE_ASM=not interpret, PREFETCH=PREFETCH,
        FOLD_U=fold, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_M=block_m, BLOCK_R=block_r, num_warps=NUM_WARPS,
        num_stages=1,
    )  # fmt: skip
    return (out, u) if fold else out


def compile_gate_cases() -> list[GateCase]:
    """The decode kernels' compile-gate cases (``kernels/lora_linear_decode_gate.py``)."""
    from fastpeft.kernels import lora_linear_decode_gate  # it reads this module's constants

    return lora_linear_decode_gate.compile_gate_cases()
