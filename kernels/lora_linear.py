"""Fused LoRA / QLoRA linear: a frozen base (dense, or NF4 dequantized in registers) plus a LoRA update.

Math, for ``X [M, K]``, a frozen ``W [N, K]``, ``bias [N]``, ``A [R, K]``, ``B [N, R]``, scaling ``s``
and an optional dropout keep-mask ``D [M, K]`` with drop probability ``p``::

    U  = drop(X)·Aᵀ                            [M, R]   drop(X) = D ⊙ X / (1 - p)
    Y  = X·Wᵀ + bias + s·U·Bᵀ                  [M, N]
    G  = dY·B                                  [M, R]   (backward)
    dX = dY·W + s·D/(1-p) ⊙ (G·A)              [M, K]
    dA = s·Gᵀ·drop(X)                          [R, K]
    dB = s·dYᵀ·U                               [N, R]
    dbias = Σ_m dY                             [N]

Kernels. ``Y`` and ``dX`` are one product shape, ``OUT [M, P] = IN [M, Q] · Wt [Q, P] + epilogue``, so
one kernel, ``_lora_gemm_kernel``, serves both: the forward reads ``W`` with ``(q, p) = (k, n)``, the
backward with ``(q, p) = (n, k)`` (the reduction runs over N, the W tile is read transposed). Only
strides differ; for NF4 the strides are in elements of the row-major flattened weight. The epilogue adds
``lora_scale·(L·Rt)`` with ``L [M, R]`` (U forward, G backward) and ``Rt [R, P]`` (Bᵀ forward, A
backward), optionally masked by the dropout keep-mask (backward), plus bias. The LoRA term is one more
``tl.dot`` of ``[BLOCK_M, BLOCK_R] x [BLOCK_R, BLOCK_P]`` per tile (looped over R in ``BLOCK_R`` steps),
so neither a full-size temporary nor a second pass over Y exists. Everything accumulates in float32 and
is cast once at the store.

NF4 in the main loop: each ``[BLOCK_Q, BLOCK_P]`` tile of W is rebuilt from its packed bytes (flat index
``e``, byte ``e >> 1``, high nibble for even ``e``). The code becomes its value through a 4-level select
tree on its bits over the 16 code values, loaded once per program as scalars: registers only, no table
reads (a gathered table would be pipelined through shared memory tile by tile: the first version of
this kernel needed 200-320 KB of it). The absmax of block ``e // blocksize`` comes per *line*: the flat
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

Dispatch (``lora_linear_fwd``, and ``dX`` in ``lora_linear_bwd``): with ``M <= SMALL_M_MAX`` (16) the
launcher takes the bandwidth-bound path: ``BLOCK_M = 16`` (the smallest MMA shape), wide ``BLOCK_Q``,
split-K over a second grid axis, float32 atomics into a zeroed workspace (zeroed by the configs'
``pre_hook``) and a cast of that ``[M, N]`` workspace, a negligible pass next to reading W. For larger M
it takes the tensor-core tiled path (grouped tile order for L2 reuse, HMMA / HGMMA). The threshold is a
reasoned default, not a measurement (no GPU was at hand when it was set): at M <= 16 an NF4 GEMM reads
``N·K/2`` bytes for ``2·16·N·K`` flops, far under any GPU's compute/bandwidth ratio, so only the number of
bytes in flight matters, which split-K provides; the tiled path wins once tiles along M carry reuse.

Skinny products: ``U`` and ``G`` come from ``_lora_skinny_kernel`` (``[M, Q] · [Q, R]``, split-K by rule
so that decode shapes still fill the GPU), into float32. ``dA`` and ``dB`` come from
``_lora_wgrad_kernel`` in ``lora_linear_bwd.py`` (with the ``lora_linear_bwd`` launcher, re-exported
here): ``Xᵀ·G`` over slices of M, one float32 partial per slice, with the column sums of dY for dbias
fused into dB's pass; a ``sum`` over the few slices finishes the reduction. No atomics on those:
results stay deterministic run to run.

Autotune: the two GEMM paths carry short config lists (2 tiled, 5 split-K values of one small-M tile)
keyed on shape; the skinny and weight-gradient kernels pick tiles by rule. Under Triton's interpreter
(CPU tests) a fixed small configuration is used instead of benchmarking.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from fastpeft.kernels._gate import GateCase
from fastpeft.kernels.formats import NESTED_BLOCKSIZE, NF4Args, check_dequantize_args, dynamic_map, nf4_code
from fastpeft.kernels.nf4 import _cast_out

__all__ = ["SMALL_M_MAX", "compile_gate_cases", "lora_linear_fwd"]  # lora_linear_bwd: re-exported lazily, below

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
    q0, p0, offs_q, offs_p, mask_q, mask_p, stride_wq, stride_wp, n_blocks,
    W_KIND: tl.constexpr, W_T: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
    dtype: tl.constexpr,
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
        blk = idx // BLOCKSIZE
        if W_T:
            first = (offs_q * stride_wq + p0) // BLOCKSIZE  # one line per q
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
            first = (q0 + offs_p * stride_wp) // BLOCKSIZE  # one line per p
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


@triton.jit(do_not_specialize=["lora_scale", "has_bias", "has_mask", "split_k"])
def _lora_gemm_kernel(
    in_ptr, w_ptr, absmax_ptr, code_ptr, qmap_ptr, nested_ptr, offset_ptr,
    bias_ptr, l_ptr, rt_ptr, keep_ptr, out_ptr,
    M, P, Q, R, m_bucket, n_blocks,
    stride_im, stride_iq, stride_wq, stride_wp, stride_lm, stride_lr, stride_rr, stride_rp,
    stride_km, stride_kp, stride_om, stride_op,
    lora_scale, has_bias, has_mask, split_k,
    W_KIND: tl.constexpr, W_T: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
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
            q0, pid_p * BLOCK_P, offs_q, offs_p, mask_q, mask_p, stride_wq, stride_wp, n_blocks,
            W_KIND, W_T, BLOCKSIZE, NESTED_BLOCKSIZE, dtype,
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
        tl.store(out, _cast_out(acc, out_ptr.dtype.element_ty), mask=mask_out)


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
# small M: one 16-row tile; only the split count is tuned (a runtime argument, one compiled kernel)
_SMALL_CONFIGS = [
    triton.Config(
        {"BLOCK_M": 16, "BLOCK_P": 64, "BLOCK_Q": 128, "GROUP_M": 1, "split_k": s},
        num_warps=4,
        num_stages=4,
        pre_hook=_zero_out,
    )  # fmt: skip
    for s in (1, 2, 4, 8, 16)
]
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


_gemm_tiled = triton.autotune(
    _TILED_CONFIGS, key=["m_bucket", "P", "Q", "R"], prune_configs_by={"early_config_prune": _prune_tiled}
)(_lora_gemm_kernel)
_gemm_small = triton.autotune(
    _SMALL_CONFIGS, key=["M", "P", "Q", "R"], prune_configs_by={"early_config_prune": _prune_small}
)(_lora_gemm_kernel)


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
# launchers
# ----------------------------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_tensor(name: str, t: object, shape: tuple[int, ...], like: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != like.dtype:
        raise TypeError(f"{name} must have x's dtype {like.dtype}, got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device}, x on {like.device}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def _check_args(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    nf4: NF4Args | None,
    dropout_mask: torch.Tensor | None,
    dropout_p: float,
) -> tuple[int, int, int, int]:
    """Validate the shared arguments; returns ``(M, K, N, R)``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"x must be a non-empty [M, K] matrix, got shape {tuple(x.shape)}")
    m, k = x.shape
    if not isinstance(lora_a, torch.Tensor) or lora_a.dim() != 2 or lora_a.shape[0] == 0:
        raise ValueError(f"lora_a must be an [R, K={k}] matrix with R >= 1, got {getattr(lora_a, 'shape', lora_a)}")
    r = lora_a.shape[0]
    _check_tensor("lora_a", lora_a, (r, k), x)
    if (weight is None) == (nf4 is None):
        raise ValueError("pass exactly one of weight (a dense base) and nf4 (a quantized base)")
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"weight must be an [N, K={k}] matrix, got {getattr(weight, 'shape', weight)}")
        n = weight.shape[0]
        _check_tensor("weight", weight, (n, k), x)
    else:
        n, k_w = nf4.shape
        if k_w != k:
            raise ValueError(f"nf4.shape is {tuple(nf4.shape)}, x has K={k} features")
        if n * k >= 2**31:
            raise ValueError(f"nf4 weight has {n * k} elements; the fused kernels index up to 2**31 - 1")
        check_dequantize_args(
            nf4.packed, nf4.absmax, n * k, x.dtype, nf4.blocksize, nf4.nested_absmax, nf4.offset, nf4.nested_blocksize
        )
        for name in ("packed", "absmax", "nested_absmax", "offset"):
            t = getattr(nf4, name)
            if t is not None and t.device != x.device:
                raise ValueError(f"nf4.{name} is on {t.device}, x on {x.device}")
        if nf4.absmax.dtype == torch.uint8 and not nf4.nested_absmax.is_contiguous():
            raise ValueError("nf4.nested_absmax must be contiguous")
        if not nf4.absmax.is_contiguous():
            raise ValueError("nf4.absmax must be contiguous")
    _check_tensor("lora_b", lora_b, (n, r), x)
    if bias is not None:
        _check_tensor("bias", bias, (n,), x)
        if bias.stride(0) != 1:
            raise ValueError("bias must be contiguous")
    if dropout_mask is not None:
        if not isinstance(dropout_mask, torch.Tensor) or dropout_mask.dtype not in (torch.bool, torch.uint8):
            raise TypeError(f"dropout_mask must be a bool or uint8 tensor, got {getattr(dropout_mask, 'dtype', None)}")
        if tuple(dropout_mask.shape) != (m, k) or dropout_mask.device != x.device:
            raise ValueError(f"dropout_mask must be [{m}, {k}] on {x.device}, got {tuple(dropout_mask.shape)}")
        if not 0.0 <= dropout_p < 1.0:
            raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return m, k, n, r


def _keep(dropout_mask: torch.Tensor | None, device: torch.device) -> tuple[torch.Tensor, bool]:
    """The keep-mask as uint8 (a bool tensor is reinterpreted, not copied) and whether there is one."""
    if dropout_mask is None:
        return _tables(device)[2], False
    return (dropout_mask.view(torch.uint8) if dropout_mask.dtype == torch.bool else dropout_mask), True


def _w_operand(
    weight: torch.Tensor | None, nf4: NF4Args | None, device: torch.device, transposed: bool
) -> tuple[tuple[torch.Tensor, ...], int, int, dict[str, int]]:
    """Kernel arguments for W read as ``Wt[q, p]``: ``(q, p) = (k, n)`` forward, ``(n, k)`` when ``transposed``.

    Returns the six W pointers (weight/packed, absmax, code, qmap, nested, offset), the two strides and
    the constexprs. Unused pointers get small float32 placeholders so every launch has one signature.
    """
    code, qmap, _ = _tables(device)
    if nf4 is None:
        s_n, s_k = weight.stride()
        strides = (s_n, s_k) if transposed else (s_k, s_n)
        consts = {"W_KIND": _W_DENSE, "W_T": transposed, "BLOCKSIZE": 64, "NESTED_BLOCKSIZE": NESTED_BLOCKSIZE}
        return (weight, code, code, code, code, code), *strides, consts
    n, k = nf4.shape
    strides = (k, 1) if transposed else (1, k)
    if nf4.quant_map is not None:
        code = nf4.quant_map.to(device=device, dtype=torch.float32).contiguous()
    if nf4.absmax.dtype == torch.uint8:
        if nf4.nested_quant_map is not None:
            qmap = nf4.nested_quant_map.to(device=device, dtype=torch.float32).contiguous()
        nested, offset = nf4.nested_absmax, nf4.offset.reshape(1).to(torch.float32)
        kind = _W_NF4_DQ
    else:
        qmap = nested = offset = code
        kind = _W_NF4
    consts = {"W_KIND": kind, "W_T": transposed, "BLOCKSIZE": nf4.blocksize, "NESTED_BLOCKSIZE": nf4.nested_blocksize}
    return (nf4.packed, nf4.absmax, code, qmap, nested, offset), *strides, consts


def _gemm(
    inp: torch.Tensor,
    w_args: tuple,
    lt: torch.Tensor,
    rt: torch.Tensor,
    rt_strides: tuple[int, int],
    bias: torch.Tensor | None,
    keep: tuple[torch.Tensor, bool],
    lora_scale: float,
    p: int,
) -> torch.Tensor:
    """``OUT [M, P] = IN·Wt + lora_scale·keep ⊙ (L·Rt) + bias`` in IN's dtype (see the module docstring)."""
    (w_ptrs, stride_wq, stride_wp, w_consts) = w_args
    m, q = inp.shape
    r = lt.shape[1]
    interpret = _interpreting()
    small = m <= SMALL_M_MAX
    # the small-M path adds split-K slices into a float32 workspace; the tiled path stores directly
    # (zeroed here under the interpreter, by the autotuned configs' pre_hook on a GPU)
    if small:
        out = (torch.zeros if interpret else torch.empty)((m, p), dtype=torch.float32, device=inp.device)
    else:
        out = inp.new_empty((m, p))
    keep_t, has_mask = keep
    args = (
        inp, *w_ptrs, inp if bias is None else bias, lt, rt, keep_t, out,
        m, p, q, r, triton.next_power_of_2(m), w_ptrs[1].numel(),
        inp.stride(0), inp.stride(1), stride_wq, stride_wp, lt.stride(0), lt.stride(1), *rt_strides,
        keep_t.stride(0) if has_mask else 0, keep_t.stride(1) if has_mask else 0, out.stride(0), out.stride(1),
        lora_scale, int(bias is not None), int(has_mask),
    )  # fmt: skip
    consts = dict(
        w_consts, LORA_SPLIT=lt.dtype == torch.float32 and inp.dtype != torch.float32, ATOMIC_OUT=small,
        DOT_PRECISION=_dot_precision(inp.dtype), BLOCK_R=_block_r(r),
    )  # fmt: skip
    if interpret:
        cfg = dict(_INTERPRET_SMALL if small else _INTERPRET_TILED)
        split = max(1, min(cfg.pop("split_k"), triton.cdiv(q, cfg["BLOCK_Q"])))
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(p, cfg["BLOCK_P"]), split)
        _lora_gemm_kernel[grid](*args, split_k=split, **consts, **cfg)
    else:

        def grid(meta: dict) -> tuple[int, int]:
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(p, meta["BLOCK_P"]), meta["split_k"])

        (_gemm_small if small else _gemm_tiled)[grid](*args, **consts)
    # the [M, P] workspace cast is a negligible pass next to the weight read it follows
    return out.to(inp.dtype) if small else out


def _skinny(
    inp: torch.Tensor,
    mat: torch.Tensor,
    mat_strides: tuple[int, int],
    keep: tuple[torch.Tensor, bool],
    scale: float,
    r: int,
) -> torch.Tensor:
    """``scale·(keep ⊙ IN)[M, Q]·MAT[Q, R]`` in float32 ``[M, R]``, with ``MAT[q, r] = mat[q·s0 + r·s1]``."""
    m, q = inp.shape
    interpret = _interpreting()
    cfg = _skinny_config(m, interpret)
    block_r = _block_r(r)
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(r, block_r)
    steps = triton.cdiv(q, cfg["BLOCK_Q"])
    # split-K until the grid fills the device (decode: one row tile would leave it idle)
    split = max(1, min(steps, triton.cdiv(_target_programs(inp.device, interpret), tiles)))
    out = (torch.zeros if split > 1 else torch.empty)((m, r), dtype=torch.float32, device=inp.device)
    keep_t, has_mask = keep
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(r, block_r), split)
    _lora_skinny_kernel[grid](
        inp, mat, keep_t, out, m, q, r,
        inp.stride(0), inp.stride(1), *mat_strides,
        keep_t.stride(0) if has_mask else 0, keep_t.stride(1) if has_mask else 0,
        scale, int(has_mask), split,
        DOT_PRECISION=_dot_precision(inp.dtype), BLOCK_M=cfg["BLOCK_M"], BLOCK_Q=cfg["BLOCK_Q"], BLOCK_R=block_r,
        num_warps=cfg["num_warps"],
    )  # fmt: skip
    return out


def _base_fwd(x: torch.Tensor, weight: torch.Tensor | None, nf4: NF4Args | None) -> torch.Tensor:
    """``X·Wᵀ`` through the same GEMM with an empty LoRA (R = 0: the epilogue loop runs no step, the
    compiled kernel is the same). Not part of the op: benchmarks measure the LoRA epilogue's cost with it."""
    n = weight.shape[0] if nf4 is None else nf4.shape[0]
    empty_l, empty_r = x.new_empty((x.shape[0], 0)), x.new_empty((0, n))
    w_args = _w_operand(weight, nf4, x.device, transposed=False)
    return _gemm(x, w_args, empty_l, empty_r, (0, 1), None, _keep(None, x.device), 0.0, n)


def lora_linear_fwd(
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
    """``Y = X·Wᵀ + bias + s·(drop(X)·Aᵀ)·Bᵀ`` and ``U = drop(X)·Aᵀ`` (contract: ``lora_linear_fwd_reference``).

    Args:
        x: ``[M, K]`` float16, bfloat16 or float32 (any strides).
        weight: dense ``[N, K]`` in x's dtype, or None with ``nf4`` (an NF4 ``[N, K]``, bitsandbytes layout,
            float32 absmax or uint8 absmax under double quantization).
        bias: ``[N]`` or None. lora_a: ``[R, K]``. lora_b: ``[N, R]``, all in x's dtype. scaling: ``s``.
        dropout_mask: bool/uint8 ``[M, K]`` (1 keeps) or None; dropout_p: its drop probability.

    Returns:
        ``y [M, N]`` and ``u [M, R]`` in x's dtype (accumulated in float32).
    """
    m, k, n, r = _check_args(x, weight, bias, lora_a, lora_b, nf4, dropout_mask, dropout_p)
    keep = _keep(dropout_mask, x.device)
    inv_keep = 1.0 / (1.0 - dropout_p) if keep[1] else 1.0
    # -- U = drop(X)·Aᵀ: MAT[k, r] = A[r, k] --
    u = _skinny(x, lora_a, (lora_a.stride(1), lora_a.stride(0)), keep, inv_keep, r).to(x.dtype)
    # -- Y = X·Wᵀ + bias + s·U·Bᵀ: Rt[r, n] = B[n, r] --
    w_args = _w_operand(weight, nf4, x.device, transposed=False)
    no_keep = _keep(None, x.device)
    y = _gemm(x, w_args, u, lora_b, (lora_b.stride(1), lora_b.stride(0)), bias, no_keep, float(scaling), n)
    return y, u


# ----------------------------------------------------------------------------------------------
# compile gate
# ----------------------------------------------------------------------------------------------

_GATE_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16"}
_GATE_W = {"dense": _W_DENSE, "nf4": _W_NF4, "nf4dq": _W_NF4_DQ}


def _gemm_gate_case(direction: str, dtype: torch.dtype, w: str, cfg: triton.Config, block_r: int) -> GateCase:
    ty = _GATE_TYPES[dtype]
    kind = _GATE_W[w]
    small = cfg.kwargs["BLOCK_M"] <= SMALL_M_MAX
    ints = ["M", "P", "Q", "R", "m_bucket", "n_blocks"] + [
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
            "BLOCKSIZE": 64,
            "NESTED_BLOCKSIZE": NESTED_BLOCKSIZE,
            "LORA_SPLIT": direction == "dx",
            "ATOMIC_OUT": small,
            "DOT_PRECISION": _dot_precision(dtype),
            "BLOCK_R": block_r,
            **blocks,
        },
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        # the 16-row split-K tile is below a warpgroup MMA's 64 rows: it runs HMMA on both archs
        tensor_cores=not small,
    )


def compile_gate_cases() -> list[GateCase]:
    """Every configuration the launchers ship, for float16 and bfloat16 inputs.

    GEMM (forward and dX): each tiled autotune config and the small-M tile (its split counts are a
    runtime argument, one binary) x dense / NF4 / NF4 with double quantization, at ``BLOCK_R = 16``
    (ranks up to 16); ``BLOCK_R = 64`` (ranks past 32, looped past 64) is gated on the heaviest variant
    (bfloat16, double quantization, largest tile). Bias and the dropout mask are runtime flags, not
    variants. Skinny and weight-gradient kernels: their rule-picked tiles, both operand kinds.
    float32 inputs compile on demand (IEEE dots, no tensor-core requirement) and are not gated.
    """
    cases = []
    for direction in ("fwd", "dx"):
        for dtype in _GATE_TYPES:
            for w in _GATE_W:
                for cfg in [*_TILED_CONFIGS, _SMALL_CONFIGS[0]]:
                    cases.append(_gemm_gate_case(direction, dtype, w, cfg, 16))
        cases.append(_gemm_gate_case(direction, torch.bfloat16, "nf4dq", _TILED_CONFIGS[0], 64))
    for dtype, ty in _GATE_TYPES.items():
        for m in (1, 1024):
            cfg = _skinny_config(m, interpret=False)
            cases.append(
                GateCase(
                    name=f"lora_skinny[{ty},BLOCK_M={cfg['BLOCK_M']}]",
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
                        "BLOCK_R": 16,
                    },
                    num_warps=cfg["num_warps"],
                    tensor_cores=cfg["BLOCK_M"] >= 64,
                )
            )
    from fastpeft.kernels import lora_linear_bwd as bwd

    return cases + bwd.compile_gate_cases()


def __getattr__(name: str) -> object:
    # ``lora_linear_bwd`` lives in lora_linear_bwd.py, which imports this module's kernels and helpers; a
    # lazy re-export keeps ``from fastpeft.kernels.lora_linear import lora_linear_bwd`` working without an
    # import cycle
    if name == "lora_linear_bwd":
        from fastpeft.kernels.lora_linear_bwd import lora_linear_bwd

        return lora_linear_bwd
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
