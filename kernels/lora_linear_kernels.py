"""Triton kernels of the fused LoRA / QLoRA linear, their autotune configurations and tile rules.

The math, shapes and dispatch are in ``lora_linear.py`` (the launchers); this module holds what runs on
the GPU and the configurations the compile gate builds. The weight-gradient kernel is in
``lora_linear_wgrad.py``.

GEMM. ``Y`` and ``dX`` are one product shape, ``OUT [M, P] = IN [M, Q] · Wt [Q, P] + epilogue``, so
one kernel, ``_lora_gemm_kernel``, serves both: the forward reads ``W`` with ``(q, p) = (k, n)``, the
backward with ``(q, p) = (n, k)`` (the reduction runs over N, the W tile is read transposed). Only
strides differ; for NF4 the strides are in elements of the row-major flattened weight. The epilogue adds
``lora_scale·(L·Rt)`` with ``L [M, R]`` (U forward, G backward) and ``Rt [R, P]`` (Bᵀ forward, A
backward), optionally masked by the dropout keep-mask (backward), plus bias. The LoRA term is one more
``tl.dot`` of ``[BLOCK_M, 16] x [16, BLOCK_P]`` per tile, looped over R in ``GEMM_BLOCK_R = 16`` steps
(one binary for every rank),
so neither a full-size temporary nor a second pass over Y exists. With R = 0 the loop runs no step: the
base-only linear is the same compiled kernel. Everything accumulates in float32 and is cast once at the
store.

NF4 in the main loop: each ``[BLOCK_Q, BLOCK_P]`` tile of W is rebuilt from its packed bytes (flat index
``e``, byte ``e >> 1``, high nibble for even ``e``). The code becomes its value through a 4-level select
tree on its bits over the 16 code values, loaded once per program as scalars: registers only, no table
reads (a gathered table would be pipelined through shared memory tile by tile: the first version of
this kernel needed 200-320 KB of it). The absmax of block ``e >> log2(blocksize)`` (a runtime shift: one
binary for every blocksize) comes per *line*: the flat
index is contiguous along Q in the forward and along P in dX, and a line of ``L`` contiguous elements
touches at most ``(L - 1) // 64 + 2`` blocks, so the kernel loads that many absmax vectors (one value
per line) and selects, instead of gathering one absmax per element. Under double quantization those
vectors are decoded in the kernel (``map[u8] · nested[b // 256] + offset``) rather than by a pre-pass
that would write and re-read a float32 absmax, 4x the bytes of the uint8 one, on the bandwidth-bound
decode path. The dequantized tile only ever lives in registers / shared memory for the MMA, rounded
once to the input dtype. The fp32 ``map · nested + offset`` may be contracted to an FMA on the GPU (at
most one ulp of absmax from bitsandbytes' two roundings, far below the GEMM's own rounding). Flat
indices are int32, so the launchers refuse NF4 weights with 2³¹ or more elements.

``G`` (backward) is float32; where it feeds a 16-bit MMA it is split as ``hi + lo`` (both 16-bit), two
MMAs, which keeps float32-level accuracy for the skinny LoRA operand at the cost of one extra small dot.
Dropout is applied as a select on the keep-mask (exact in 16 bits) and ``1/(1-p)`` is folded into the
float32 scale after the dot, so no rounded ``X/(1-p)`` ever reaches the MMA.

Skinny products: ``U`` and ``G`` come from ``_lora_skinny_kernel`` (``[M, Q] · [Q, R]``, split-K by rule
so that decode shapes still fill the GPU), into float32.

Autotune: the two GEMM paths carry short config lists (2 tiled, 5 split-K values of one small-M tile)
keyed on shape, and float32 inputs their own smaller ones (IEEE dots, twice the bytes per element); the
skinny kernel picks tiles by rule. Under Triton's interpreter (CPU tests) a fixed
small configuration is used instead of benchmarking.
"""

from __future__ import annotations

import functools
import itertools
import os

import torch
import triton
import triton.language as tl

from fastpeft.kernels._gate import GateCase
from fastpeft.kernels.formats import NESTED_BLOCKSIZE, dynamic_map, nf4_code
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
        byte = tl.load(w_ptr + (idx >> 1), mask=mask, other=0).to(tl.int32)
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
    # -- main loop over this program's slice of Q (all of it unless split-K) --
    per_split = tl.cdiv(tl.cdiv(Q, BLOCK_Q), split_k)
    q_start = pid_k * per_split * BLOCK_Q
    acc = tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32)
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
    mask_out = mask_m[:, None] & mask_p[None, :]
    # -- epilogue (once per output tile: the first K slice carries it) --
    if pid_k == 0:
        lora = tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < R
            lt = tl.load(
                l_ptr + offs_m[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                mask=mask_m[:, None] & mask_r[None, :], other=0.0,
            )  # fmt: skip
            rt = tl.load(
                rt_ptr + offs_r[:, None] * stride_rr + offs_p[None, :] * stride_rp,
                mask=mask_r[:, None] & mask_p[None, :], other=0.0,
            ).to(dtype)  # fmt: skip
            if LORA_SPLIT:
                # float32 L as hi + lo in 16 bits: two MMAs keep its float32 accuracy
                hi = lt.to(dtype)
                lo = (lt - hi.to(tl.float32)).to(dtype)
                lora = tl.dot(hi, rt, lora, input_precision=DOT_PRECISION)
                lora = tl.dot(lo, rt, lora, input_precision=DOT_PRECISION)
            else:
                lora = tl.dot(lt.to(dtype), rt, lora, input_precision=DOT_PRECISION)
        if has_mask:
            keep = tl.load(keep_ptr + offs_m[:, None] * stride_km + offs_p[None, :] * stride_kp, mask=mask_out, other=0)
            lora = tl.where(keep != 0, lora, 0.0)
        acc += lora_scale * lora
        if has_bias:
            acc += tl.load(bias_ptr + offs_p, mask=mask_p, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m[:, None] * stride_om + offs_p[None, :] * stride_op
    if ATOMIC_OUT:
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
        offs_q = q_start + it * BLOCK_Q + tl.arange(0, BLOCK_Q)
        mask_q = offs_q < Q
        mask_mq = mask_m[:, None] & mask_q[None, :]
        a = tl.load(in_ptr + offs_m[:, None] * stride_im + offs_q[None, :] * stride_iq, mask=mask_mq, other=0.0)
        if has_mask:
            keep = tl.load(keep_ptr + offs_m[:, None] * stride_km + offs_q[None, :] * stride_kq, mask=mask_mq, other=0)
            a = tl.where(keep != 0, a, 0.0)
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


# sm_80 / sm_90: 128x128 with 8 warps (two warpgroups of HGMMA) for large M; 64x128 with 4 warps and a
# deeper pipeline for medium M, where fewer rows per tile mean more tiles to fill the SMs.
_TILED_CONFIGS = [
    triton.Config(
        {"BLOCK_M": 128, "BLOCK_P": 128, "BLOCK_Q": 64, "GROUP_M": 8, "split_k": 1}, num_warps=8, num_stages=3
    ),
    triton.Config(
        {"BLOCK_M": 64, "BLOCK_P": 128, "BLOCK_Q": 64, "GROUP_M": 8, "split_k": 1}, num_warps=4, num_stages=4
    ),
]


def _small_configs(block_q: int, num_stages: int) -> list[triton.Config]:
    """Small M: one 16-row tile; only the split count is tuned (a runtime argument, one compiled kernel)."""
    return [
        triton.Config(
            {"BLOCK_M": 16, "BLOCK_P": 64, "BLOCK_Q": block_q, "GROUP_M": 1, "split_k": s},
            num_warps=4,
            num_stages=num_stages,
            pre_hook=_zero_out,
        )  # fmt: skip
        for s in (1, 2, 4, 8, 16)
    ]


_SMALL_CONFIGS = _small_configs(block_q=128, num_stages=4)
# float32 inputs (IEEE dots on the FMA units, no tensor cores): twice the bytes per element, so shorter
# tiles and pipelines keep the staged operands inside sm_80's 163 KB of shared memory
_TILED_CONFIGS_FP32 = [
    triton.Config({"BLOCK_M": 64, "BLOCK_P": 64, "BLOCK_Q": 32, "GROUP_M": 8, "split_k": 1}, num_warps=4, num_stages=3),
]
_SMALL_CONFIGS_FP32 = _small_configs(block_q=64, num_stages=3)
GEMM_BLOCK_R = 16
"""The GEMM epilogue's rank step: ``L·Rt`` is summed over R in 16-wide MMAs, one binary for every rank."""
# fixed configurations under Triton's interpreter (CPU tests): small tiles keep it fast; the tests
# patch these to reach other code paths (split counts, several R tiles)
_INTERPRET_TILED = {"BLOCK_M": 32, "BLOCK_P": 32, "BLOCK_Q": 32, "GROUP_M": 2, "split_k": 1}
_INTERPRET_SMALL = {"BLOCK_M": 16, "BLOCK_P": 32, "BLOCK_Q": 32, "GROUP_M": 1, "split_k": 3}


def _prune_tiled(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    # a 128-row tile over at most 64 rows is half empty
    m = named_args["M"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(64, m)]
    return kept or configs[-1:]


def _prune_small(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    # more slices than BLOCK_Q steps would leave programs idle
    steps = triton.cdiv(named_args["Q"], configs[0].kwargs["BLOCK_Q"])
    kept = [c for c in configs if c.kwargs["split_k"] <= steps]
    return kept or configs[:1]


def _autotuned(tiled: list[triton.Config], small: list[triton.Config]) -> tuple:
    return (
        triton.autotune(tiled, key=["m_bucket", "P", "Q", "R"], prune_configs_by={"early_config_prune": _prune_tiled})(
            _lora_gemm_kernel
        ),
        triton.autotune(small, key=["M", "P", "Q", "R"], prune_configs_by={"early_config_prune": _prune_small})(
            _lora_gemm_kernel
        ),
    )


_gemm_tiled, _gemm_small = _autotuned(_TILED_CONFIGS, _SMALL_CONFIGS)
_gemm_tiled_fp32, _gemm_small_fp32 = _autotuned(_TILED_CONFIGS_FP32, _SMALL_CONFIGS_FP32)


def gemm_configs(dtype: torch.dtype, small: bool) -> list[triton.Config]:
    """The autotune list the GEMM launcher uses for inputs of ``dtype`` on the small-M or the tiled path."""
    if dtype == torch.float32:
        return _SMALL_CONFIGS_FP32 if small else _TILED_CONFIGS_FP32
    return _SMALL_CONFIGS if small else _TILED_CONFIGS


def gemm_kernel(dtype: torch.dtype, small: bool):
    """The autotuned GEMM for inputs of ``dtype`` on the small-M or the tiled path."""
    if dtype == torch.float32:
        return _gemm_small_fp32 if small else _gemm_tiled_fp32
    return _gemm_small if small else _gemm_tiled


def _block_r(r: int) -> int:
    # tl.dot needs every dimension >= 16; ranks past 64 loop (epilogue) or tile the grid (skinny kernels)
    return min(64, max(16, triton.next_power_of_2(r)))


def _skinny_config(m: int, interpret: bool) -> dict[str, int]:
    if interpret:
        return {"BLOCK_M": 16, "BLOCK_Q": 32, "num_warps": 4}
    if m <= SMALL_M_MAX:
        return {"BLOCK_M": 16, "BLOCK_Q": 128, "num_warps": 4}
    return {"BLOCK_M": 64, "BLOCK_Q": 64, "num_warps": 4}


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs get IEEE products (torch's default, no TF32); 16-bit inputs are exact on the MMA
    return "ieee" if dtype == torch.float32 else "tf32"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _target_programs(device: torch.device, interpret: bool) -> int:
    """Programs that fill the device about twice (three under the interpreter, to exercise split paths)."""
    if interpret or device.type != "cuda":
        return 3
    return 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The NF4 codebook, the dynamic map (float32) and a one-byte placeholder, cached per device."""
    return nf4_code(device), dynamic_map(device), torch.zeros(1, dtype=torch.uint8, device=device)


# ----------------------------------------------------------------------------------------------
# compile gate
# ----------------------------------------------------------------------------------------------

_GATE_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_GATE_BLOCK_R = (16, 32, 64)  # every value _block_r returns
_GATE_W = {"dense": _W_DENSE, "nf4": _W_NF4, "nf4dq": _W_NF4_DQ}


def _gemm_gate_case(direction: str, dtype: torch.dtype, w: str, cfg: triton.Config, block_r: int) -> GateCase:
    ty = _GATE_TYPES[dtype]
    kind = _GATE_W[w]
    small = cfg.kwargs["BLOCK_M"] <= SMALL_M_MAX
    ints = ["M", "P", "Q", "R", "m_bucket", "n_blocks", "blocksize_shift"] + [
        f"stride_{s}" for s in ("im", "iq", "wq", "wp", "lm", "lr", "rr", "rp", "km", "kp", "om", "op")
    ]
    signature = {
        "in_ptr": f"*{ty}",
        "w_ptr": f"*{ty}" if kind == _W_DENSE else "*u8",
        "absmax_ptr": "*u8" if kind == _W_NF4_DQ else "*fp32",
        "code_ptr": "*fp32",
        "qmap_ptr": "*fp32",
        "nested_ptr": "*fp32",
        "offset_ptr": "*fp32",
        "bias_ptr": f"*{ty}",
        "l_ptr": "*fp32" if direction == "dx" else f"*{ty}",  # G is float32, U is in x's dtype
        "rt_ptr": f"*{ty}",
        "keep_ptr": "*u8",
        "out_ptr": "*fp32" if small else f"*{ty}",
        **dict.fromkeys(ints, "i32"),
        "lora_scale": "fp32",
        "has_bias": "i32",
        "has_mask": "i32",
        "split_k": "i32",
    }
    blocks = {k: v for k, v in cfg.kwargs.items() if k != "split_k"}
    tile = "x".join(str(blocks[k]) for k in ("BLOCK_M", "BLOCK_P", "BLOCK_Q"))
    return GateCase(
        name=f"lora_gemm_{direction}[{ty},{w},{tile},R={block_r}]",
        module=__name__,
        kernel="_lora_gemm_kernel",
        signature=signature,
        constexprs={
            "W_KIND": kind,
            "W_T": direction == "dx",
            "NESTED_BLOCKSIZE": NESTED_BLOCKSIZE,
            "LORA_SPLIT": direction == "dx" and dtype != torch.float32,
            "ATOMIC_OUT": small,
            "DOT_PRECISION": _dot_precision(dtype),
            "BLOCK_R": block_r,
            **blocks,
        },
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        # the 16-row split-K tile is below a warpgroup MMA's 64 rows: it runs HMMA on both archs
        tensor_cores=not small and dtype != torch.float32,
    )


def compile_gate_cases() -> list[GateCase]:
    """Every configuration of this module's kernels the launchers ship, for float16, bfloat16 and float32.

    GEMM (forward and dX): each config of the tiled and the small-M autotune lists of the input dtype (the
    small-M split count is a runtime argument: one binary) x dense / NF4 / NF4 with double quantization,
    at the one epilogue rank step ``GEMM_BLOCK_R``; the NF4 blocksize, bias and dropout mask are runtime
    arguments, not variants. The base-only launchers (``nf4_linear_fwd``, ``nf4_linear_bwd_dx``) run these
    same binaries with R = 0. Skinny kernel: its rule-picked tiles x every ``BLOCK_R``. 16-bit tiles of 64
    rows or more must run on tensor cores; float32 runs IEEE dots on the FMA units.
    """
    cases = []
    for direction in ("fwd", "dx"):
        for dtype in _GATE_TYPES:
            for w in _GATE_W:
                for cfg in [*gemm_configs(dtype, small=False), gemm_configs(dtype, small=True)[0]]:
                    cases.append(_gemm_gate_case(direction, dtype, w, cfg, GEMM_BLOCK_R))
    for dtype, ty in _GATE_TYPES.items():
        for m, block_r in itertools.product((1, 1024), _GATE_BLOCK_R):
            cfg = _skinny_config(m, interpret=False)
            cases.append(
                GateCase(
                    name=f"lora_skinny[{ty},BLOCK_M={cfg['BLOCK_M']},BLOCK_R={block_r}]",
                    module=__name__,
                    kernel="_lora_skinny_kernel",
                    signature={
                        "in_ptr": f"*{ty}",
                        "mat_ptr": f"*{ty}",
                        "keep_ptr": "*u8",
                        "out_ptr": "*fp32",
                        "M": "i32",
                        "Q": "i32",
                        "R": "i32",
                        "stride_im": "i32",
                        "stride_iq": "i32",
                        "stride_mq": "i32",
                        "stride_mr": "i32",
                        "stride_km": "i32",
                        "stride_kq": "i32",
                        "scale": "fp32",
                        "has_mask": "i32",
                        "split_k": "i32",
                    },  # fmt: skip
                    constexprs={
                        "DOT_PRECISION": _dot_precision(dtype),
                        "BLOCK_M": cfg["BLOCK_M"],
                        "BLOCK_Q": cfg["BLOCK_Q"],
                        "BLOCK_R": block_r,
                    },
                    num_warps=cfg["num_warps"],
                    tensor_cores=cfg["BLOCK_M"] >= 64 and dtype != torch.float32,
                )
            )
    return cases
