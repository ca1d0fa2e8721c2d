"""Triton kernels of the fused LoRA / QLoRA linear, their autotune configurations and tile rules.

The math, shapes and dispatch are in ``lora_linear.py`` (the launchers); this module holds what runs on
the GPU and the configurations the compile gate builds (its cases: ``lora_linear_gate.py``). The
weight-gradient kernel is in ``lora_linear_wgrad.py``.

GEMM. ``Y`` and ``dX`` are one product shape, ``OUT [M, P] = IN [M, Q] · Wt [Q, P] + lora_scale·keep ⊙ (L·Rt)
+ bias``, so one kernel, ``_lora_gemm_kernel``, serves both: the forward reads ``W`` with ``(q, p) = (k, n)``,
the backward with ``(q, p) = (n, k)`` (the reduction runs over N, the W tile is read transposed). Only
strides differ; for NF4 the strides are in elements of the row-major flattened weight. ``L [M, R]`` is U
(forward) or G (backward), ``Rt [R, P]`` is Bᵀ or A; the keep-mask is dropout's (backward). The LoRA term is
``tl.dot`` of ``[BLOCK_M, 16] x [16, BLOCK_P]`` looped over R in ``GEMM_BLOCK_R = 16`` steps (one binary for
every rank), so neither a full-size temporary nor a second pass over Y exists. With R = 0 the loop runs no
step: the base-only linear is the same compiled kernel. Everything accumulates in float32 and is cast once
at the store.

One accumulator. The LoRA term, the dropout select and the bias go into the accumulator *before* the main
loop, which then adds ``IN·Wt`` on top (the first K slice carries them under split-K). A second float32
``[BLOCK_M, BLOCK_P]`` tile for the LoRA term (the first version), or the select after the main loop (it
needs the base product and base + LoRA at once), put the 128x128 tile past 255 registers; here only the
LoRA term is live when the select runs. Later K slices skip the LoRA term by a rank loop of no step, not
by a branch around it: its MMAs inside an ``if pid_k == 0`` made ptxas serialize every wgmma of the kernel
(C7515: one 64x128x16 product in flight at a time, an arrive and a wait around each in the main loop). Moving
the LoRA term after the loop instead spilled the forward's 128x128 tile (the dropout select's second tile)
and left dX's wgmma serialized; the compile gate fails any configuration ptxas serializes.

``lora_scale`` (with ``1/(1-p)`` for dX) multiplies the float32 L operand before its rounding to the MMA's
dtype: for dX's float32 G, whose split ``hi + lo`` (two 16-bit MMAs) keeps ~16 bits in bfloat16 and ~22 in
float16; for the forward's 16-bit U, one rounding of ``s·U`` (eager rounds ``U·Bᵀ`` and then ``s·(U·Bᵀ)``).
The select on the keep-mask is exact, so no rounded ``X/(1-p)`` ever reaches an MMA.

NF4 in the main loop (the small split-K path, 16-bit inputs; larger M and float32 inputs read W dequantized
once, dense): each ``[BLOCK_Q, BLOCK_P]`` tile of W is rebuilt from its packed bytes (flat index ``e``, byte
``e >> 1``, high nibble for even ``e``), loaded ``evict_first`` (each byte is read by one program). The code
becomes its value through a 4-level select tree on its bits over the 16 code values, loaded once per program
as scalars: registers only, no table reads. The absmax of block ``e >> log2(blocksize)`` (a runtime shift:
one binary for every blocksize) comes per *line*: the flat index is contiguous along Q in the forward and
along P in dX, and a line of ``L`` contiguous elements touches at most ``(L - 1) // 64 + 2`` blocks, so the
kernel loads that many absmax vectors (one value per line) and selects, instead of gathering one absmax per
element. Under double quantization those vectors are decoded in the kernel (``map[u8] · nested[b // 256] +
offset``). The dequantized tile only ever lives in registers / shared memory for the MMA, rounded once to the
input dtype. The fp32 ``map · nested + offset`` may be contracted to an FMA on the GPU (at most one ulp of
absmax from bitsandbytes' two roundings, far below the GEMM's own rounding). Flat indices are int32, so the
launchers refuse NF4 weights with 2³¹ or more elements.

Skinny products: ``U`` and ``G`` come from ``_lora_skinny_kernel`` (``[M, Q] · [Q, R]``, split-K by rule
so that decode shapes still fill the GPU), into float32.

Configurations (``python -m fastpeft.kernels._gate --report`` for their registers; none spills on sm_80 or
sm_90a under Triton 3.6-3.9, where older compilers take the smaller NF4 small-M and skinny tiles their rules
name). Tiled, 16-bit: two tiles for rows aligned to 16 bytes and one for unaligned rows, chosen by
``_prune_tiled`` from the strides and pointers (the strides are in the autotune key). Small-M: five split
counts of one 16-row tile, with a 4-stage pipeline for dense W and one stage for NF4 (``_prune_small``).
Float32 inputs have their own lists: Triton's FMA dot (IEEE, no tensor cores) keeps the operands of its
whole K extent live in registers at once, so float32 dots are at most 16-32 deep (64- and 128-deep ones
spilled by kilobytes: ptxas gave up at 32 registers). The skinny kernel picks tiles by rule. Under Triton's
interpreter (CPU tests) a fixed small configuration is used instead of benchmarking.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from fastpeft.kernels._gate import GateCase
from fastpeft.kernels.formats import dynamic_map, nf4_code, sm_count, triton_version
from fastpeft.kernels.rounding import cast_out

__all__ = ["SMALL_M_MAX", "compile_gate_cases"]

SMALL_M_MAX = 16
"""Rows up to which the launchers take the split-K bandwidth path instead of the tiled one."""

_W_DENSE, _W_NF4, _W_NF4_DQ = 0, 1, 2

# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _nf4_lookup(nib, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15):
    # codebook[nib] as a 4-level select tree on the code's bits: 15 selects on register scalars, no
    # table reads (a gathered table would be pipelined through shared memory tile by tile)
    b = (nib & 1) != 0
    v0 = tl.where(b, c1, c0)
    v1 = tl.where(b, c3, c2)
    v2 = tl.where(b, c5, c4)
    v3 = tl.where(b, c7, c6)
    v4 = tl.where(b, c9, c8)
    v5 = tl.where(b, c11, c10)
    v6 = tl.where(b, c13, c12)
    v7 = tl.where(b, c15, c14)
    b = (nib & 2) != 0
    w0 = tl.where(b, v1, v0)
    w1 = tl.where(b, v3, v2)
    w2 = tl.where(b, v5, v4)
    w3 = tl.where(b, v7, v6)
    b = (nib & 4) != 0
    x0 = tl.where(b, w1, w0)
    x1 = tl.where(b, w3, w2)
    return tl.where((nib & 8) != 0, x1, x0)


@triton.jit
def _absmax_vec(
    absmax_ptr, qmap_ptr, nested_ptr, offset, blk, mask, W_KIND: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr
):
    # float32 absmax of blocks ``blk`` (a vector); double quantization decoded here, on the vector only
    if W_KIND == 2:
        a8 = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        nested = tl.load(nested_ptr + blk // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        return tl.load(qmap_ptr + a8) * nested + offset
    else:
        return tl.load(absmax_ptr + blk, mask=mask, other=0.0)


@triton.jit
def _load_w_tile(
    w_ptr, absmax_ptr, qmap_ptr, nested_ptr, offset,
    c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15,
    q0, p0, offs_q, offs_p, mask_q, mask_p, stride_wq, stride_wp, n_blocks, blocksize_shift,
    W_KIND: tl.constexpr, W_T: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, dtype: tl.constexpr,
):  # fmt: skip
    """The ``[BLOCK_Q, BLOCK_P]`` tile ``Wt[q, p] = W_flat[q·stride_wq + p·stride_wp]`` in ``dtype``.

    For NF4 the flat index runs contiguously along q (forward, ``W_T`` False) or along p (dX, ``W_T``):
    a line of ``L`` contiguous elements touches at most ``(L - 1) // 64 + 2`` absmax blocks, so the absmax comes
    from that many vectors (one value per line each) and a select, not from a per-element gather.
    """
    mask = mask_q[:, None] & mask_p[None, :]
    idx = offs_q[:, None] * stride_wq + offs_p[None, :] * stride_wp
    if W_KIND == 0:
        w = tl.load(w_ptr + idx, mask=mask, other=0.0).to(dtype)
    else:
        # -- NF4: element e sits in byte e >> 1, the even element in the high nibble --
        # packed W is streamed once (each split-K program reads its own slice): evict it first from L2
        byte = tl.load(w_ptr + (idx >> 1), mask=mask, other=0, eviction_policy="evict_first").to(tl.int32)
        nib = (byte >> ((1 - (idx & 1)) * 4)) & 0xF
        value = _nf4_lookup(nib, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15)
        blk = idx >> blocksize_shift  # blocksize = 2**blocksize_shift: one binary for every blocksize
        if W_T:
            first = (offs_q * stride_wq + p0) >> blocksize_shift  # one line per q
            rel = blk - first[:, None]
            absmax = _absmax_vec(absmax_ptr, qmap_ptr, nested_ptr, offset, first, mask_q, W_KIND, NESTED_BLOCKSIZE)
            absmax = tl.broadcast_to(absmax[:, None], idx.shape)
            for j in tl.static_range(1, (offs_p.shape[0] - 1) // 64 + 2):
                more = _absmax_vec(
                    absmax_ptr, qmap_ptr, nested_ptr, offset, first + j, mask_q & (first + j < n_blocks),
                    W_KIND, NESTED_BLOCKSIZE,
                )  # fmt: skip
                absmax = tl.where(rel == j, more[:, None], absmax)
        else:
            first = (q0 + offs_p * stride_wp) >> blocksize_shift  # one line per p
            rel = blk - first[None, :]
            absmax = _absmax_vec(absmax_ptr, qmap_ptr, nested_ptr, offset, first, mask_p, W_KIND, NESTED_BLOCKSIZE)
            absmax = tl.broadcast_to(absmax[None, :], idx.shape)
            for j in tl.static_range(1, (offs_q.shape[0] - 1) // 64 + 2):
                more = _absmax_vec(
                    absmax_ptr, qmap_ptr, nested_ptr, offset, first + j, mask_p & (first + j < n_blocks),
                    W_KIND, NESTED_BLOCKSIZE,
                )  # fmt: skip
                absmax = tl.where(rel == j, more[None, :], absmax)
        # masked-out elements decode to finite values; they meet zero rows of IN or masked outputs
        w = (value * absmax).to(dtype)
    return w


@triton.jit(do_not_specialize=["blocksize_shift", "lora_scale", "has_bias", "has_mask", "split_k"])
def _lora_gemm_kernel(
    in_ptr, w_ptr, absmax_ptr, code_ptr, qmap_ptr, nested_ptr, offset_ptr,
    bias_ptr, l_ptr, rt_ptr, keep_ptr, out_ptr,
    M, P, Q, R, m_bucket, n_blocks, blocksize_shift,
    stride_im, stride_iq, stride_wq, stride_wp, stride_lm, stride_lr, stride_rr, stride_rp,
    stride_km, stride_kp, stride_om, stride_op,
    lora_scale, has_bias, has_mask, split_k,
    W_KIND: tl.constexpr, W_T: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
    LORA_SPLIT: tl.constexpr, ATOMIC_OUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    # OUT[M, P] = IN[M, Q]·Wt[Q, P] + lora_scale·keep ⊙ (L[M, R]·Rt[R, P]) + bias[P]
    # (m_bucket only keys the autotuner)
    dtype = in_ptr.dtype.element_ty
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    # -- grouped tile order: GROUP_M row tiles share each W column panel while it sits in L2 --
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_p = tl.cdiv(P, BLOCK_P)
    in_group = GROUP_M * num_pid_p
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_p = (pid % in_group) // group_size
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_m = offs_m < M
    mask_p = offs_p < P
    mask_out = mask_m[:, None] & mask_p[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32)
    # -- LoRA, dropout and bias first (the first K slice carries them), into the one accumulator --
    # A second [BLOCK_M, BLOCK_P] float32 tile for the LoRA term, or the dropout select after the main loop
    # (which needs the base product and base + LoRA at once), spilled the 128x128 tile. Here the select
    # touches the LoRA term alone while nothing else is live, and the main loop then adds IN·Wt on top.
    # The rank loop runs no step past the first K slice (a trip count of 0) rather than sitting in an
    # ``if pid_k == 0`` block: MMAs on the accumulator under a runtime branch ahead of the main loop made
    # ptxas serialize every wgmma of the kernel (C7515 on sm_90a); the select and bias may stay in one.
    r_end = tl.where(pid_k == 0, R, 0)
    for r0 in range(0, r_end, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        # the scale goes on the skinny L operand, in float32, before its rounding to the MMA's dtype
        lt = tl.load(
            l_ptr + offs_m[:, None] * stride_lm + offs_r[None, :] * stride_lr,
            mask=mask_m[:, None] & mask_r[None, :], other=0.0,
        ).to(tl.float32) * lora_scale  # fmt: skip
        rt = tl.load(
            rt_ptr + offs_r[:, None] * stride_rr + offs_p[None, :] * stride_rp,
            mask=mask_r[:, None] & mask_p[None, :], other=0.0,
        ).to(dtype)  # fmt: skip
        if LORA_SPLIT:
            # float32 s·G as hi + lo in 16 bits: two MMAs keep its float32 accuracy (~2^-16 relative in
            # bfloat16, ~2^-22 in float16)
            hi = lt.to(dtype)
            lo = (lt - hi.to(tl.float32)).to(dtype)
            acc = tl.dot(hi, rt, acc, input_precision=DOT_PRECISION)
            acc = tl.dot(lo, rt, acc, input_precision=DOT_PRECISION)
        else:
            # s·U rounded once to x's dtype (eager rounds U·Bᵀ and then s·(U·Bᵀ), twice)
            acc = tl.dot(lt.to(dtype), rt, acc, input_precision=DOT_PRECISION)
    if pid_k == 0:
        if has_mask:
            keep = tl.load(keep_ptr + offs_m[:, None] * stride_km + offs_p[None, :] * stride_kp, mask=mask_out, other=0)
            acc = tl.where(keep != 0, acc, 0.0)
        if has_bias:
            acc += tl.load(bias_ptr + offs_p, mask=mask_p, other=0.0).to(tl.float32)[None, :]
    # -- main loop over this program's slice of Q (all of it unless split-K) --
    per_split = tl.cdiv(tl.cdiv(Q, BLOCK_Q), split_k)
    q_start = pid_k * per_split * BLOCK_Q
    # the 16 code values and the double-quantization offset: per-program scalars, held in registers
    c0, c1, c2, c3 = tl.load(code_ptr + 0), tl.load(code_ptr + 1), tl.load(code_ptr + 2), tl.load(code_ptr + 3)
    c4, c5, c6, c7 = tl.load(code_ptr + 4), tl.load(code_ptr + 5), tl.load(code_ptr + 6), tl.load(code_ptr + 7)
    c8, c9, c10, c11 = tl.load(code_ptr + 8), tl.load(code_ptr + 9), tl.load(code_ptr + 10), tl.load(code_ptr + 11)
    c12, c13, c14, c15 = tl.load(code_ptr + 12), tl.load(code_ptr + 13), tl.load(code_ptr + 14), tl.load(code_ptr + 15)
    offset = tl.load(offset_ptr)
    for it in range(0, per_split):
        q0 = q_start + it * BLOCK_Q
        offs_q = q0 + tl.arange(0, BLOCK_Q)
        mask_q = offs_q < Q
        a = tl.load(
            in_ptr + offs_m[:, None] * stride_im + offs_q[None, :] * stride_iq,
            mask=mask_m[:, None] & mask_q[None, :], other=0.0,
        )  # fmt: skip
        w = _load_w_tile(
            w_ptr, absmax_ptr, qmap_ptr, nested_ptr, offset,
            c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15,
            q0, pid_p * BLOCK_P, offs_q, offs_p, mask_q, mask_p, stride_wq, stride_wp, n_blocks, blocksize_shift,
            W_KIND, W_T, NESTED_BLOCKSIZE, dtype,
        )  # fmt: skip
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
    out = out_ptr + offs_m[:, None] * stride_om + offs_p[None, :] * stride_op
    if ATOMIC_OUT:
        # split-K slices add into a float32 workspace
        tl.atomic_add(out, acc, mask=mask_out, sem="relaxed")
    else:
        tl.store(out, cast_out(acc, out_ptr.dtype.element_ty), mask=mask_out)


@triton.jit(do_not_specialize=["scale", "has_mask", "split_k"])
def _lora_skinny_kernel(
    in_ptr, mat_ptr, keep_ptr, out_ptr,
    M, Q, R,
    stride_im, stride_iq, stride_mq, stride_mr, stride_km, stride_kq,
    scale, has_mask, split_k,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # OUT[M, R] (float32) = scale·(keep ⊙ IN)[M, Q]·MAT[Q, R]; split-K slices add atomically into zeros
    dtype = in_ptr.dtype.element_ty
    # Triton's FMA dot (float32, IEEE) holds the operands of its whole K extent in registers at once (all
    # shared-memory loads of the step come before the first FMA): a 64- or 128-deep step needed ~1,000
    # and ptxas settled for 32 registers and 2-9 KB of stack. Float32 tiles run as 16-deep dots.
    SUB_Q: tl.constexpr = 16 if DOT_PRECISION == "ieee" else BLOCK_Q
    pid_m = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    per_split = tl.cdiv(tl.cdiv(Q, BLOCK_Q), split_k)
    q_start = pid_k * per_split * BLOCK_Q
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for it in range(0, per_split):
        for sub in tl.static_range(0, BLOCK_Q, SUB_Q):
            offs_q = q_start + it * BLOCK_Q + sub + tl.arange(0, SUB_Q)
            mask_q = offs_q < Q
            mask_mq = mask_m[:, None] & mask_q[None, :]
            a = tl.load(in_ptr + offs_m[:, None] * stride_im + offs_q[None, :] * stride_iq, mask=mask_mq, other=0.0)
            if has_mask:
                keep_at = keep_ptr + offs_m[:, None] * stride_km + offs_q[None, :] * stride_kq
                a = tl.where(tl.load(keep_at, mask=mask_mq, other=0) != 0, a, 0.0)
            b = tl.load(
                mat_ptr + offs_q[:, None] * stride_mq + offs_r[None, :] * stride_mr,
                mask=mask_q[:, None] & mask_r[None, :], other=0.0,
            )  # fmt: skip
            acc = tl.dot(a, b.to(dtype), acc, input_precision=DOT_PRECISION)
    out = out_ptr + offs_m[:, None] * R + offs_r[None, :]
    mask = mask_m[:, None] & mask_r[None, :]
    if split_k > 1:
        tl.atomic_add(out, scale * acc, mask=mask, sem="relaxed")
    else:
        tl.store(out, scale * acc, mask=mask)


# ----------------------------------------------------------------------------------------------
# configurations
# ----------------------------------------------------------------------------------------------


def _zero_out(nargs: dict) -> None:
    # split-K slices add into the float32 workspace: it must start at zero for every launch
    nargs["out_ptr"].zero_()


def _tiled(block_m: int, block_p: int, block_q: int, num_warps: int, num_stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_P": block_p, "BLOCK_Q": block_q, "GROUP_M": 8, "split_k": 1},
        num_warps=num_warps,
        num_stages=num_stages,
    )


# 16-bit, rows 16-byte aligned (cp.async and 128-bit loads): 128x128 with 8 warps (two warpgroups of HGMMA
# on sm_90, each operand element loaded once serves 128 products) for large M; 64x128 with 4 warps and a
# deeper pipeline for medium M, where fewer rows per tile mean more tiles to fill the SMs. With the LoRA
# term in the one accumulator (see the kernel) neither spills: 128 registers for dX on sm_90a (two CTAs
# per SM), ~250 for the forward, whose keep-mask strides are runtime zeros (the never-taken dropout select
# is compiled for arbitrary strides); on sm_80 ptxas takes 165-255.
_TILED_CONFIGS = [_tiled(128, 128, 64, 8, 3), _tiled(64, 128, 64, 4, 4)]
# rows not 16-byte aligned (a stride not a multiple of 8 elements, or an unaligned pointer): every element
# is its own scalar load with its own address and mask, staged through registers, which runs the 128x128
# tile out of registers; 128x64 with BLOCK_Q = 32 holds ~195 and still feeds 128-row HGMMAs
_TILED_UNALIGNED = _tiled(128, 64, 32, 8, 3)
_TILED_CONFIGS_16 = [*_TILED_CONFIGS, _TILED_UNALIGNED]
# float32 inputs (IEEE dots on the FMA units, no tensor cores). Triton's FMA dot keeps the operands of
# its whole BLOCK_Q extent live in registers at once (every shared-memory load of the step is issued
# before the first FMA), so BLOCK_Q = 32 spilled; 16 keeps 120-220 registers, aligned or not, at about
# 1.2 instructions per multiply-add
_TILED_CONFIGS_FP32 = [_tiled(64, 64, 16, 4, 2)]


def _small_configs(
    block_q: int, num_stages: int, nf4_stages: int | None = None, nf4_tile: tuple[int, int] = (64, 128)
) -> list[triton.Config]:
    """Small M: one 16-row tile; only the split count is tuned (a runtime argument, one compiled kernel).

    With ``nf4_stages``, the list also holds the NF4 variants (picked by ``_prune_small``) on the ``nf4_tile``
    ``(BLOCK_P, BLOCK_Q)``: the NF4 tile is issue-bound on its decode (~40 instructions per weight), so a deep
    pipeline buys nothing, while every stage in flight holds another tile of packed bytes in registers (2+
    stages spilled).
    """
    tiles = [(64, block_q, num_stages)] + ([] if nf4_stages is None else [(*nf4_tile, nf4_stages)])
    return [
        triton.Config(
            {"BLOCK_M": 16, "BLOCK_P": p, "BLOCK_Q": q, "GROUP_M": 1, "split_k": s},
            num_warps=4,
            num_stages=n,
            pre_hook=_zero_out,
        )  # fmt: skip
        for p, q, n in tiles
        for s in (1, 2, 4, 8, 16)
    ]


# dense: 4 stages of [128, 64] W tiles in flight per 4-warp program (16 KB each) keep the bandwidth-bound
# GEMV busy; NF4 (16-bit inputs only: float32 NF4 is dequantized once and runs dense): one stage. Triton < 3.7:
# the NF4 forward's 16x64x128 tile spills there (0.5-4 KB of stack on sm_80 and sm_90a with Triton 3.5 and
# 3.6), so it takes 16x128x32, the same 4096 weights an iteration in a shallower K step: no spills, about 40
# (forward) and 48 (dX) thread-instructions per weight on sm_90a against 38 and 39 for 16x64x128 on 3.9
_NF4_SMALL_TILE = (64, 128) if triton_version() >= (3, 7) else (128, 32)
_SMALL_CONFIGS = _small_configs(block_q=128, num_stages=4, nf4_stages=1, nf4_tile=_NF4_SMALL_TILE)
# float32: 32-deep FMA steps (the 64-deep one held too many operands live, see above), 4 stages in flight
_SMALL_CONFIGS_FP32 = _small_configs(block_q=32, num_stages=4)
GEMM_BLOCK_R = 16
"""The GEMM's LoRA rank step: ``L·Rt`` is summed over R in 16-wide MMAs, one binary for every rank."""
# fixed configurations under Triton's interpreter (CPU tests): small tiles keep it fast; the tests
# patch these to reach other code paths (split counts, several R tiles)
_INTERPRET_TILED = {"BLOCK_M": 32, "BLOCK_P": 32, "BLOCK_Q": 32, "GROUP_M": 2, "split_k": 1}
_INTERPRET_SMALL = {"BLOCK_M": 16, "BLOCK_P": 32, "BLOCK_Q": 32, "GROUP_M": 1, "split_k": 3}
_ALIGNED_STRIDES = ("stride_im", "stride_iq", "stride_wq", "stride_wp", "stride_om", "stride_op")


def _rows_aligned(named_args: dict) -> bool:
    """Whether IN, W and OUT start on 16 bytes and step by 1 or a multiple of 16 bytes along each dim."""
    elems = 16 // named_args["in_ptr"].element_size()
    ptrs = (named_args[k].data_ptr() % 16 == 0 for k in ("in_ptr", "w_ptr", "out_ptr"))
    return all(ptrs) and all(named_args[k] == 1 or named_args[k] % elems == 0 for k in _ALIGNED_STRIDES)


def _prune_tiled(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    # unaligned rows take the one tile that holds their scalar loads in registers, aligned ones never do
    if _TILED_UNALIGNED in configs:
        if not _rows_aligned(named_args):
            return [_TILED_UNALIGNED]
        configs = [c for c in configs if c is not _TILED_UNALIGNED]
    # a 128-row tile over at most 64 rows is half empty
    m = named_args["M"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(64, m)]
    return kept or configs[-1:]


def _prune_small(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    # the NF4 variants for an NF4 weight, the dense ones otherwise (the autotuner keys on W's dtype too)
    stages = {c.num_stages for c in configs}
    if len(stages) > 1:
        want = min(stages) if kwargs["W_KIND"] != _W_DENSE else max(stages)
        configs = [c for c in configs if c.num_stages == want]
    # more slices than BLOCK_Q steps would leave programs idle
    steps = triton.cdiv(named_args["Q"], configs[0].kwargs["BLOCK_Q"])
    kept = [c for c in configs if c.kwargs["split_k"] <= steps]
    return kept or configs[:1]


def _autotuned(tiled: list[triton.Config], small: list[triton.Config]) -> tuple:
    # the tiled key holds the strides the alignment rule reads, so an aligned and an unaligned call of one
    # shape never share a cached choice (pointer alignment is not in the key: a view 2 bytes off 16 with
    # aligned strides after an aligned call of its shape reuses the aligned tile, correct but spilling)
    tiled_key = ["m_bucket", "P", "Q", "R", *_ALIGNED_STRIDES]
    return (
        triton.autotune(tiled, key=tiled_key, prune_configs_by={"early_config_prune": _prune_tiled})(_lora_gemm_kernel),
        triton.autotune(small, key=["M", "P", "Q", "R"], prune_configs_by={"early_config_prune": _prune_small})(
            _lora_gemm_kernel
        ),
    )


_gemm_tiled, _gemm_small = _autotuned(_TILED_CONFIGS_16, _SMALL_CONFIGS)
_gemm_tiled_fp32, _gemm_small_fp32 = _autotuned(_TILED_CONFIGS_FP32, _SMALL_CONFIGS_FP32)


def gemm_configs(dtype: torch.dtype, small: bool) -> list[triton.Config]:
    """The autotune list the GEMM launcher uses for inputs of ``dtype`` on the small-M or the tiled path."""
    if dtype == torch.float32:
        return _SMALL_CONFIGS_FP32 if small else _TILED_CONFIGS_FP32
    return _SMALL_CONFIGS if small else _TILED_CONFIGS_16


def gemm_kernel(dtype: torch.dtype, small: bool):
    """The autotuned GEMM for inputs of ``dtype`` on the small-M or the tiled path."""
    if dtype == torch.float32:
        return _gemm_small_fp32 if small else _gemm_tiled_fp32
    return _gemm_small if small else _gemm_tiled


def _block_r(r: int) -> int:
    # tl.dot needs every dimension >= 16; ranks past 64 loop (GEMM) or tile the grid (skinny kernels)
    return min(64, max(16, triton.next_power_of_2(r)))


def _skinny_config(m: int, interpret: bool, block_r: int) -> dict[str, int]:
    # the products are bandwidth-bound (R <= 64 columns): tiles only need enough bytes in flight, and split-K
    # fills the device at small M, so they are sized to stay far from the register limit on sm_80 and
    # sm_90a for every BLOCK_R and dtype (BLOCK_Q = 128 at small M, and 4 warps over 64 x 64 at large M,
    # spilled: ptxas settles at 96-168 registers there). Triton < 3.8: at small M, 16-bit BLOCK_R = 16 or 32
    # binaries kept 16 bytes of stack on sm_80 at BLOCK_Q = 64 (3.6, 3.7), none at BLOCK_Q = 32
    if interpret:
        return {"BLOCK_M": 16, "BLOCK_Q": 32, "num_warps": 4}
    if m <= SMALL_M_MAX:
        shallow = block_r <= 32 and triton_version() < (3, 8)
        return {"BLOCK_M": 16, "BLOCK_Q": 32 if shallow else 64, "num_warps": 4}
    return {"BLOCK_M": 64, "BLOCK_Q": 64, "num_warps": 8}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _target_programs(device: torch.device, interpret: bool) -> int:
    """Programs that fill the device about twice (three under the interpreter, to exercise split paths)."""
    if interpret or device.type != "cuda":
        return 3
    return 2 * sm_count(device)


@functools.cache
def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The NF4 codebook, the dynamic map (float32) and a one-byte placeholder, cached per device."""
    return nf4_code(device), dynamic_map(device), torch.zeros(1, dtype=torch.uint8, device=device)


# ----------------------------------------------------------------------------------------------
# compile gate
# ----------------------------------------------------------------------------------------------


def compile_gate_cases() -> list[GateCase]:
    """Every configuration of this module's kernels the launchers ship (built in ``lora_linear_gate``)."""
    from fastpeft.kernels import lora_linear_gate  # it reads this module's configurations

    return lora_linear_gate.compile_gate_cases()
