"""Fused bottleneck adapter (Houlsby / Pfeiffer / parallel placements share one op).

Math, for ``h [M, H]``, ``W_down [b, H]``, ``b_down [b]``, ``W_up [H, b]``, ``b_up [H]``, scaling ``s`` and
a residual ``r [M, H]`` (``r = h`` unless given; the parallel placement passes the FFN output)::

    z = h·W_downᵀ + b_down                      [M, b]   (float32, saved for the backward)
    a = act(z)                                  [M, b]   (rounded to h's dtype once, fed to the MMA)
    y = r + s·(a·W_upᵀ + b_up)                  [M, H]

with act one of relu, silu, gelu (erf) and gelu_tanh (transformers' ``gelu_new``).

Forward (one kernel): a program owns ``BLOCK_M`` rows. It loops over H to accumulate ``z`` in
registers, applies bias and activation, then loops over H again writing ``y`` tiles, so the bottleneck
activation never leaves the chip. ``b`` is small (≤ 256): ``BLOCK_B = next_pow2(max(b, 16))``, masked.

Backward, from the saved ``z`` (``M·b`` floats, 1/H-th of h, so recomputing ``h·W_downᵀ`` is not
worth its read of h)::

    dz      = s·(dY·W_up) ⊙ act'(z)             [M, b]
    dh      = dz·W_down (+ dY when r = h)       [M, H]
    dW_down = dzᵀ·h,   db_down = Σ_m dz
    dW_up   = s·dYᵀ·a, db_up   = s·Σ_m dY

Kernel ``_adapter_bwd_dz_kernel`` (per ``BLOCK_M`` rows) forms ``dz`` on chip, writes ``dh`` and, for
the weight gradients, ``dz`` and ``a`` in h's dtype plus per-program partial sums of ``dz``.
Kernel ``_adapter_bwd_dw_kernel`` computes ``Xᵀ·G`` over a slice of rows (``X = dY, G = a`` for
``dW_up``; ``X = h, G = dz`` for ``dW_down``, stored transposed) into float32 partials, one per
row slice; a tiny ``sum`` over slices finishes the reduction. No atomics: fp16 atomics are slow and
make results run-to-run nondeterministic.
"""

from __future__ import annotations

import inspect
import itertools

import torch
import triton
import triton.language as tl

from fastpeft.kernels._gate import GateCase
from fastpeft.kernels.formats import dot_precision, sm_count, triton_version
from fastpeft.kernels.reference import ADAPTER_ACTIVATIONS, check_adapter_args, check_adapter_bwd_args
from fastpeft.kernels.rounding import cast_out

__all__ = ["adapter_bwd", "adapter_fwd", "compile_gate_cases"]

_ACT_ID = {name: i for i, name in enumerate(ADAPTER_ACTIVATIONS)}  # relu 0, silu 1, gelu 2, gelu_tanh 3
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_INV_SQRT_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_GELU_C = tl.constexpr(0.044715)

# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    # tanh through the sigmoid: libdevice's tanh is unavailable in the interpreter
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 0:
        return tl.maximum(z, 0.0)
    elif ACT == 1:
        return z * tl.sigmoid(z)
    elif ACT == 2:
        return 0.5 * z * (1.0 + tl.erf(z * _INV_SQRT_2))
    else:
        return 0.5 * z * (1.0 + _tanh((z + z * z * z * _GELU_C) * _SQRT_2_OVER_PI))


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    if ACT == 0:
        return tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == 1:
        sig = tl.sigmoid(z)
        return sig * (1.0 + z * (1.0 - sig))
    elif ACT == 2:
        return 0.5 * (1.0 + tl.erf(z * _INV_SQRT_2)) + z * tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
    else:
        t = _tanh((z + z * z * z * _GELU_C) * _SQRT_2_OVER_PI)
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * (1.0 + z * z * (3.0 * _GELU_C)) * _SQRT_2_OVER_PI


@triton.jit
def _tile(ptr, offs_r, offs_c, stride_r, stride_c, mask_r, mask_c):
    """The masked ``[rows, cols]`` block of a 2-D tensor (zeros outside)."""
    return tl.load(
        ptr + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c, mask=mask_r[:, None] & mask_c[None, :], other=0.0
    )


@triton.jit
def _rows_times(
    x_ptr, stride_xm, stride_xk, w_ptr, stride_wk, stride_wb, offs_m, mask_m, offs_b, mask_b, K,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    """``X[offs_m, :K] · W[:K, offs_b]`` in float32, looped over K in ``BLOCK_K`` steps."""
    acc = tl.zeros([BLOCK_M, BLOCK_B], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = _tile(x_ptr, offs_m, offs_k, stride_xm, stride_xk, mask_m, mask_k)
        w = _tile(w_ptr, offs_k, offs_b, stride_wk, stride_wb, mask_k, mask_b)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _rows_times_2(
    x_ptr, stride_xm, stride_xk, w_ptr, stride_wk, stride_wb, offs_m, mask_m, offs_b0, offs_b1, B, K,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """``_rows_times`` for two column panels ``offs_b0``, ``offs_b1`` (``BLOCK_P`` wide each): one K loop, so X
    is read once, and two accumulators the caller can finish one after the other."""
    acc0 = tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = _tile(x_ptr, offs_m, offs_k, stride_xm, stride_xk, mask_m, mask_k)
        w_rows = w_ptr + offs_k[:, None] * stride_wk
        w0 = tl.load(w_rows + offs_b0[None, :] * stride_wb, mask=mask_k[:, None] & (offs_b0 < B)[None, :], other=0.0)
        w1 = tl.load(w_rows + offs_b1[None, :] * stride_wb, mask=mask_k[:, None] & (offs_b1 < B)[None, :], other=0.0)
        acc0 = tl.dot(x, w0, acc0, input_precision=DOT_PRECISION)
        acc1 = tl.dot(x, w1, acc1, input_precision=DOT_PRECISION)
    return acc0, acc1


@triton.jit(do_not_specialize=["scaling"])
def _adapter_fwd_kernel(
    h_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr, r_ptr, y_ptr, z_ptr,
    M, H, B, scaling,
    stride_hm, stride_hh, stride_wdb, stride_wdh, stride_wuh, stride_wub, stride_rm, stride_rh,
    ACT: tl.constexpr, SAVE_Z: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_b = tl.arange(0, BLOCK_B)
    mask_m = offs_m < M
    mask_b = offs_b < B
    # -- down projection: z = h·W_downᵀ, K loop over H --
    acc = _rows_times(
        h_ptr, stride_hm, stride_hh, wd_ptr, stride_wdh, stride_wdb, offs_m, mask_m, offs_b, mask_b, H,
        DOT_PRECISION, BLOCK_M, BLOCK_K, BLOCK_B,
    )  # fmt: skip
    # -- bias + activation, on chip --
    z = acc + tl.load(bd_ptr + offs_b, mask=mask_b, other=0.0).to(tl.float32)[None, :]
    if SAVE_Z:
        tl.store(z_ptr + offs_m[:, None] * B + offs_b[None, :], z, mask=mask_m[:, None] & mask_b[None, :])
    # padded bottleneck columns meet zero rows of W_up, so their act(z) needs no masking
    a = _act(z, ACT).to(h_ptr.dtype.element_ty)
    # -- up projection + bias + residual, N loop over H backwards: with r = h, the h tiles read last
    # by the down projection are the likeliest to still be in L2 --
    last = tl.cdiv(H, BLOCK_K) - 1
    for i in range(0, H, BLOCK_K):
        offs_n = (last * BLOCK_K - i) + tl.arange(0, BLOCK_K)
        mask_n = offs_n < H
        wu = _tile(wu_ptr, offs_b, offs_n, stride_wub, stride_wuh, mask_b, mask_n)
        out = tl.dot(a, wu, input_precision=DOT_PRECISION)
        out += tl.load(bu_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
        r = tl.load(r_ptr + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rh, mask=mask, other=0.0)
        y = r.to(tl.float32) + scaling * out
        tl.store(y_ptr + offs_m[:, None] * H + offs_n[None, :], cast_out(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dz_panel(
    da, z_ptr, dz_ptr, a_ptr, dbd_part_ptr, pid, offs_m, mask_m, offs_b, B, scaling,
    ACT: tl.constexpr, STORE_DW_INPUTS: tl.constexpr, OUT_DTYPE: tl.constexpr,
):  # fmt: skip
    """``dz = s·da ⊙ act'(z)`` for the columns ``offs_b``, rounded to ``OUT_DTYPE`` (returned); with
    ``STORE_DW_INPUTS`` also stores dz, ``a = act(z)`` and the program's partial ``Σ_m dz``."""
    # chain rule through the activation; padded rows and columns have da = 0, hence dz = 0
    mask_b = offs_b < B
    mask_mb = mask_m[:, None] & mask_b[None, :]
    z = tl.load(z_ptr + offs_m[:, None] * B + offs_b[None, :], mask=mask_mb, other=0.0)
    dz = scaling * da * _act_grad(z, ACT)
    dzc = dz.to(OUT_DTYPE)
    if STORE_DW_INPUTS:
        tl.store(dz_ptr + offs_m[:, None] * B + offs_b[None, :], dzc, mask=mask_mb)
        tl.store(a_ptr + offs_m[:, None] * B + offs_b[None, :], _act(z, ACT).to(a_ptr.dtype.element_ty), mask=mask_mb)
        # db_down in float32 from the unrounded dz: one partial row per program
        tl.store(dbd_part_ptr + pid * B + offs_b, tl.sum(dz, axis=0), mask=mask_b)
    return dzc


@triton.jit(do_not_specialize=["scaling"])
def _adapter_bwd_dz_kernel(
    dy_ptr, z_ptr, wu_ptr, wd_ptr, dh_ptr, dz_ptr, a_ptr, dbd_part_ptr,
    M, H, B, scaling,
    stride_dym, stride_dyh, stride_wuh, stride_wub, stride_wdb, stride_wdh,
    ACT: tl.constexpr, ADD_DY: tl.constexpr, COMPUTE_DH: tl.constexpr, STORE_DW_INPUTS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    # -- da = dY·W_up (K loop over H), then dz = s·da ⊙ act'(z) --
    if BLOCK_B <= 128:
        offs_b = tl.arange(0, BLOCK_B)
        da = _rows_times(
            dy_ptr, stride_dym, stride_dyh, wu_ptr, stride_wuh, stride_wub, offs_m, mask_m, offs_b, offs_b < B, H,
            DOT_PRECISION, BLOCK_M, BLOCK_K, BLOCK_B,
        )  # fmt: skip
        dzc = _dz_panel(
            da, z_ptr, dz_ptr, a_ptr, dbd_part_ptr, pid, offs_m, mask_m, offs_b, B, scaling,
            ACT, STORE_DW_INPUTS, dh_ptr.dtype.element_ty,
        )  # fmt: skip
    else:
        # 256 columns in two panels: the activation's epilogue then holds half of them at a time (all at
        # once it needs more than 255 registers a thread at BLOCK_M = 64, the least a wgmma tile takes)
        offs_b0 = tl.arange(0, BLOCK_B // 2)
        offs_b1 = offs_b0 + BLOCK_B // 2
        da0, da1 = _rows_times_2(
            dy_ptr, stride_dym, stride_dyh, wu_ptr, stride_wuh, stride_wub, offs_m, mask_m, offs_b0, offs_b1, B, H,
            DOT_PRECISION, BLOCK_M, BLOCK_K, BLOCK_B // 2,
        )  # fmt: skip
        dzc0 = _dz_panel(
            da0, z_ptr, dz_ptr, a_ptr, dbd_part_ptr, pid, offs_m, mask_m, offs_b0, B, scaling,
            ACT, STORE_DW_INPUTS, dh_ptr.dtype.element_ty,
        )  # fmt: skip
        dzc1 = _dz_panel(
            da1, z_ptr, dz_ptr, a_ptr, dbd_part_ptr, pid, offs_m, mask_m, offs_b1, B, scaling,
            ACT, STORE_DW_INPUTS, dh_ptr.dtype.element_ty,
        )  # fmt: skip
    if COMPUTE_DH:
        # -- dh = dz·W_down (+ dY), N loop over H backwards (dY tiles read last are likeliest in L2) --
        last = tl.cdiv(H, BLOCK_K) - 1
        for i in range(0, H, BLOCK_K):
            offs_n = (last * BLOCK_K - i) + tl.arange(0, BLOCK_K)
            mask_n = offs_n < H
            wd_cols = wd_ptr + offs_n[None, :] * stride_wdh
            if BLOCK_B <= 128:
                wd = tl.load(
                    wd_cols + offs_b[:, None] * stride_wdb, mask=(offs_b < B)[:, None] & mask_n[None, :], other=0.0
                )
                dh = tl.dot(dzc, wd, input_precision=DOT_PRECISION)
            else:
                wd0 = tl.load(
                    wd_cols + offs_b0[:, None] * stride_wdb, mask=(offs_b0 < B)[:, None] & mask_n[None, :], other=0.0
                )
                wd1 = tl.load(
                    wd_cols + offs_b1[:, None] * stride_wdb, mask=(offs_b1 < B)[:, None] & mask_n[None, :], other=0.0
                )
                dh = tl.dot(dzc0, wd0, input_precision=DOT_PRECISION)
                dh = tl.dot(dzc1, wd1, dh, input_precision=DOT_PRECISION)
            mask = mask_m[:, None] & mask_n[None, :]
            if ADD_DY:
                dh += tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyh, mask=mask).to(
                    tl.float32
                )
            tl.store(dh_ptr + offs_m[:, None] * H + offs_n[None, :], cast_out(dh, dh_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adapter_bwd_dw_kernel(
    x_ptr, g_ptr, out_ptr, colsum_ptr,
    M, N, B, rows_per_split,
    stride_xm, stride_xn, stride_gm, stride_gb, stride_os, stride_on, stride_ob,
    HAS_COLSUM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    # out[s, n, j] = Σ_{m in slice s} x[m, n]·g[m, j]  and  colsum[s, n] = Σ_{m in slice s} x[m, n]
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = tl.arange(0, BLOCK_B)
    mask_n = offs_n < N
    mask_b = offs_b < B
    m_start = pid_s * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    acc = tl.zeros([BLOCK_N, BLOCK_B], dtype=tl.float32)
    # 16-bit X, BLOCK_B <= 64: the column sums as one more MMA, X^T times 16 columns of ones (every column holds
    # the sums; the products are exact, the sum float32): a tl.sum of the X tile beside the MMA made ptxas
    # serialize the kernel's wgmma there (C7515). Wider tiles (whose wgmma stay pipelined with the tl.sum; the
    # extra accumulator spilled BLOCK_B = 256 on sm_80) and float32 (FMA dots, no wgmma) keep the reduction.
    SUM_COLS: tl.constexpr = 16 if DOT_PRECISION != "ieee" and BLOCK_B <= 64 else 1
    colsum = tl.zeros([BLOCK_N, SUM_COLS], dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m_end
        xt = _tile(x_ptr, offs_n, offs_m, stride_xn, stride_xm, mask_n, mask_m)
        g = _tile(g_ptr, offs_m, offs_b, stride_gm, stride_gb, mask_m, mask_b)
        acc = tl.dot(xt, g, acc, input_precision=DOT_PRECISION)
        if HAS_COLSUM:
            if SUM_COLS == 1:
                colsum += tl.sum(xt.to(tl.float32), axis=1)[:, None]
            else:
                ones = tl.full([BLOCK_M, SUM_COLS], 1.0, xt.dtype)
                colsum = tl.dot(xt, ones, colsum, input_precision=DOT_PRECISION)
    out = out_ptr + pid_s * stride_os + offs_n[:, None] * stride_on + offs_b[None, :] * stride_ob
    tl.store(out, acc, mask=mask_n[:, None] & mask_b[None, :])
    if HAS_COLSUM:
        tl.store(colsum_ptr + pid_s * N + offs_n, tl.max(colsum, axis=1), mask=mask_n)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------

BOTTLENECK_BLOCKS = (16, 32, 64, 128, 256)  # BLOCK_B choices: b ≤ 256


# Triton < 3.8: float32 wide bottlenecks kept 8-16 bytes of stack (Triton 3.7.1: the dz kernel at BLOCK_B = 128 on
# sm_90a, dW_down at 256 on sm_80) on the tiles below; 16-row row tiles and a 32-wide dW tile hold none
_OLD_PTXAS = triton_version() < (3, 8)


def _block_b(b: int) -> int:
    # tl.dot needs every dimension ≥ 16
    return max(16, triton.next_power_of_2(b))


def _row_config(block_b: int, dtype: torch.dtype) -> dict[str, int]:
    """Tile sizes of the row kernels (forward, backward dz/dh) by rule, sized so that no binary spills.

    16-bit inputs: BLOCK_M = 64, the M of one wgmma; the [BLOCK_M, BLOCK_B] float32 accumulator is the
    register budget, so wide bottlenecks get 8 warps and shorter H tiles (and the dz kernel finishes 256
    columns in two panels). Float32 inputs multiply on the FMA units (IEEE products, no TF32), where each
    thread also holds its rows and columns of both operands: 32-row tiles and 32-wide H steps (16 for
    wide bottlenecks) keep that in registers (at 64×64 the float32 binaries spilled up to 664 bytes); the
    price is twice the re-reads of the small weights, which L2 serves.
    """
    wide = block_b >= 128
    f32 = dtype == torch.float32
    return {
        "BLOCK_M": (16 if wide and _OLD_PTXAS else 32) if f32 else 64,
        "BLOCK_K": (16 if wide else 32) if f32 else (32 if wide else 64),
        "BLOCK_B": block_b,
        "num_warps": 8 if wide else 4,
        "num_stages": 2 if block_b == 256 else 3,
    }


def _dw_config(block_b: int, dtype: torch.dtype) -> dict[str, int]:
    """Tiles of the weight-gradient kernel ``Xᵀ·G`` (``[BLOCK_N, BLOCK_B]`` output, reduced over BLOCK_M rows a
    step). Float32 (FMA) steps over 16 rows with 8 warps: its operand slices then stay in registers."""
    f32 = dtype == torch.float32
    return {
        "BLOCK_M": 16 if f32 else 64,
        "BLOCK_N": 32 if f32 and block_b == 256 and _OLD_PTXAS else 64,
        "BLOCK_B": block_b,
        "num_warps": 8 if (f32 or block_b >= 64) else 4,
        "num_stages": 2 if block_b == 256 else 3,
    }


def _check_bottleneck(w_down: torch.Tensor) -> None:
    if w_down.shape[0] > BOTTLENECK_BLOCKS[-1]:
        raise ValueError(f"w_down has bottleneck size {w_down.shape[0]}; the fused kernel supports up to 256")


def adapter_fwd(
    h: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor,
    scaling: float,
    activation: str,
    residual: torch.Tensor | None = None,
    *,
    save_z: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fused ``y = r + s·(act(h·W_downᵀ + b_down)·W_upᵀ + b_up)`` (see the module docstring).

    Args:
        h: ``[M, H]`` float32/float16/bfloat16, any strides. w_down: ``[b, H]``, b ≤ 256. b_down: ``[b]``
            (contiguous). w_up: ``[H, b]``. b_up: ``[H]`` (contiguous). scaling: ``s``. activation: one of
            ``relu, silu, gelu, gelu_tanh``. residual: ``[M, H]`` or None (``r = h``).
        save_z: also return the pre-activation for the backward.

    Returns:
        ``y [M, H]`` (contiguous, h's dtype) and ``z [M, b]`` float32, or None unless ``save_z``.
    """
    check_adapter_args(h, w_down, b_down, w_up, b_up, activation, residual, allow_float64=False)
    _check_bottleneck(w_down)
    for name, t in (("b_down", b_down), ("b_up", b_up)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    m, hidden = h.shape
    b = w_down.shape[0]
    r = h if residual is None else residual
    y = torch.empty((m, hidden), dtype=h.dtype, device=h.device)
    # without save_z, a one-element float32 placeholder: the pointer type (the binary) stays the same
    z = torch.empty((m, b) if save_z else (1,), dtype=torch.float32, device=h.device)
    cfg = _row_config(_block_b(b), h.dtype)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]),)
    _adapter_fwd_kernel[grid](
        h, w_down, b_down, w_up, b_up, r, y, z,
        m, hidden, b, float(scaling),
        h.stride(0), h.stride(1), w_down.stride(0), w_down.stride(1), w_up.stride(0), w_up.stride(1),
        r.stride(0), r.stride(1),
        ACT=_ACT_ID[activation], SAVE_Z=save_z, DOT_PRECISION=dot_precision(h.dtype), **cfg,
    )  # fmt: skip
    return y, (z if save_z else None)


def _num_splits(m: int, block_m: int, n_tiles: int, sms: int) -> int:
    """Row slices for the weight-gradient reduction: enough programs to fill ``sms`` multiprocessors twice."""
    return max(1, min(triton.cdiv(m, block_m), triton.cdiv(2 * sms, n_tiles)))


def _dw_grid(m: int, n: int, cfg: dict[str, int], sms: int) -> tuple[int, int, int]:
    """``(n_tiles, splits, rows_per_split)`` of the weight-gradient launch: N tiles × row slices."""
    n_tiles = triton.cdiv(n, cfg["BLOCK_N"])
    splits = _num_splits(m, cfg["BLOCK_M"], n_tiles, sms)
    rows_per_split = cfg["BLOCK_M"] * triton.cdiv(triton.cdiv(m, cfg["BLOCK_M"]), splits)
    return n_tiles, triton.cdiv(m, rows_per_split), rows_per_split


def _xt_g(x: torch.Tensor, g: torch.Tensor, out_t: bool, colsum: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float32 ``xᵀ·g`` ``[N, B]`` (or its transpose ``[B, N]`` when ``out_t``) and optionally ``Σ_m x [N]``."""
    m, n = x.shape
    b = g.shape[1]
    cfg = _dw_config(_block_b(b), x.dtype)
    n_tiles, splits, rows_per_split = _dw_grid(m, n, cfg, sm_count(x.device))
    part = torch.empty((splits, b, n) if out_t else (splits, n, b), dtype=torch.float32, device=x.device)
    stride_on, stride_ob = (part.stride(2), part.stride(1)) if out_t else (part.stride(1), part.stride(2))
    sums = torch.empty((splits, n), dtype=torch.float32, device=x.device) if colsum else part  # placeholder
    _adapter_bwd_dw_kernel[(n_tiles, splits)](
        x, g, part, sums,
        m, n, b, rows_per_split,
        x.stride(0), x.stride(1), g.stride(0), g.stride(1), part.stride(0), stride_on, stride_ob,
        HAS_COLSUM=colsum, DOT_PRECISION=dot_precision(x.dtype), **cfg,
    )  # fmt: skip
    # the tiny second stage of the reduction: splits × (N·B) float32 partials
    return part.sum(0), (sums.sum(0) if colsum else None)


def adapter_bwd(
    dy: torch.Tensor,
    h: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor,
    z: torch.Tensor,
    scaling: float,
    activation: str,
    *,
    residual_is_separate: bool = False,
    needs_dh: bool = True,
    needs_dw: bool = True,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of ``adapter_fwd`` from its saved ``z``; contract of ``adapter_bwd_reference``.

    Args:
        dy: ``[M, H]`` in h's dtype, any strides. h: ``[M, H]``. w_down: ``[b, H]``. w_up: ``[H, b]``.
        z: ``[M, b]`` float32 (contiguous) from ``adapter_fwd``. scaling, activation: as in the forward.
        residual_is_separate: the forward got a ``residual``, so dY does not flow into dh.
        needs_dh / needs_dw: skip the input / the four weight gradients.

    Returns:
        ``(dh [M, H], dw_down [b, H], db_down [b], dw_up [H, b], db_up [H])`` in h's dtype, None where
        not asked for.
    """
    check_adapter_bwd_args(dy, h, w_down, w_up, z, activation)
    if h.dtype == torch.float64:
        raise TypeError("h must be float32, float16 or bfloat16 for the Triton kernels, got torch.float64")
    _check_bottleneck(w_down)
    m, hidden = h.shape
    b = w_down.shape[0]
    dh = dw_down = db_down = dw_up = db_up = None
    if not (needs_dh or needs_dw):
        return dh, dw_down, db_down, dw_up, db_up
    cfg = _row_config(_block_b(b), h.dtype)
    n_prog = triton.cdiv(m, cfg["BLOCK_M"])
    dh_buf = torch.empty((m, hidden), dtype=h.dtype, device=h.device) if needs_dh else dy  # dy: placeholder
    if needs_dw:
        dz = torch.empty((m, b), dtype=h.dtype, device=h.device)
        a = torch.empty((m, b), dtype=h.dtype, device=h.device)
        dbd_part = torch.empty((n_prog, b), dtype=torch.float32, device=h.device)
    else:
        dz = a = dy  # placeholders of the same pointer types, never touched
        dbd_part = z
    _adapter_bwd_dz_kernel[(n_prog,)](
        dy, z, w_up, w_down, dh_buf, dz, a, dbd_part,
        m, hidden, b, float(scaling),
        dy.stride(0), dy.stride(1), w_up.stride(0), w_up.stride(1), w_down.stride(0), w_down.stride(1),
        ACT=_ACT_ID[activation], ADD_DY=not residual_is_separate, COMPUTE_DH=needs_dh, STORE_DW_INPUTS=needs_dw,
        DOT_PRECISION=dot_precision(h.dtype), **cfg,
    )  # fmt: skip
    if needs_dh:
        dh = dh_buf
    if needs_dw:
        dwu, dy_sum = _xt_g(dy, a, out_t=False, colsum=True)
        dwd, _ = _xt_g(h, dz, out_t=True, colsum=False)
        dw_down = dwd.to(h.dtype)
        db_down = dbd_part.sum(0).to(h.dtype)
        dw_up = (scaling * dwu).to(h.dtype)
        db_up = (scaling * dy_sum).to(h.dtype)
    return dh, dw_down, db_down, dw_up, db_up


# ----------------------------------------------------------------------------------------------
# compile gate
# ----------------------------------------------------------------------------------------------

_GATE_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_GATE_M, _GATE_H, _GATE_SMS = 2048, 4096, 132  # tokens, hidden (Llama-3-8B), H100 multiprocessors


_PARAMETERS = {
    k.fn.__name__: tuple(inspect.signature(k.fn).parameters)
    for k in (_adapter_fwd_kernel, _adapter_bwd_dz_kernel, _adapter_bwd_dw_kernel)
}


def _gate_case(name: str, kernel: str, pointers: dict[str, str], constexprs: dict, args: dict, **launch) -> GateCase:
    """A case whose signature lists ``kernel``'s runtime parameters: ``pointers`` as given, ``scaling`` float32
    and every size or stride int32."""
    runtime = [p for p in _PARAMETERS[kernel] if p not in constexprs]
    signature = {p: pointers[p] if p.endswith("_ptr") else "fp32" if p == "scaling" else "i32" for p in runtime}
    return GateCase(name, __name__, kernel, signature, constexprs, args=args, **launch)


def compile_gate_cases() -> list[GateCase]:
    """Every tile configuration the launchers pick: each BLOCK_B in float32, float16 and bfloat16, for the
    three kernels; the weight-gradient kernel twice, as dW_up (``[N, b]`` out) and dW_down (transposed out),
    whose unit strides specialize differently.

    Runtime arguments are those of hidden 4096, 2048 tokens, bottleneck b = BLOCK_B, contiguous tensors, on
    an H100 (the weight-gradient row slices depend on its 132 SMs). Activation and flags do not change tile
    shapes; the cases use the costliest activation (gelu_tanh) with every optional store enabled. 16-bit
    cases must run their matmuls on tensor cores.
    """
    m, hidden = _GATE_M, _GATE_H
    cases = []
    for (dtype, ty), b in itertools.product(_GATE_DTYPES.items(), BOTTLENECK_BLOCKS):
        mma, prec = dtype != torch.float32, dot_precision(dtype)
        row = _row_config(b, dtype)
        tiles = {k: v for k, v in row.items() if k.startswith("BLOCK")}
        launch = {"num_warps": row["num_warps"], "num_stages": row["num_stages"], "tensor_cores": mma}
        same = {"scaling": 0.5, "M": m, "H": hidden, "B": b}
        fwd_ptrs = dict.fromkeys(("h_ptr", "wd_ptr", "bd_ptr", "wu_ptr", "bu_ptr", "r_ptr", "y_ptr"), f"*{ty}")
        cases.append(
            _gate_case(
                f"adapter_fwd[{ty},BLOCK_B={b}]", "_adapter_fwd_kernel", {**fwd_ptrs, "z_ptr": "*fp32"},
                {"ACT": _ACT_ID["gelu_tanh"], "SAVE_Z": True, "DOT_PRECISION": prec, **tiles},
                {**same, "stride_hm": hidden, "stride_hh": 1, "stride_wdb": hidden, "stride_wdh": 1,
                 "stride_wuh": b, "stride_wub": 1, "stride_rm": hidden, "stride_rh": 1},
                **launch,
            )
        )  # fmt: skip
        dz_ptrs = dict.fromkeys(("dy_ptr", "wu_ptr", "wd_ptr", "dh_ptr", "dz_ptr", "a_ptr"), f"*{ty}")
        cases.append(
            _gate_case(
                f"adapter_bwd_dz[{ty},BLOCK_B={b}]", "_adapter_bwd_dz_kernel",
                {**dz_ptrs, "z_ptr": "*fp32", "dbd_part_ptr": "*fp32"},
                {"ACT": _ACT_ID["gelu_tanh"], "ADD_DY": True, "COMPUTE_DH": True, "STORE_DW_INPUTS": True,
                 "DOT_PRECISION": prec, **tiles},
                {**same, "stride_dym": hidden, "stride_dyh": 1, "stride_wuh": b, "stride_wub": 1,
                 "stride_wdb": hidden, "stride_wdh": 1},
                **launch,
            )
        )  # fmt: skip
        dw = _dw_config(b, dtype)
        dw_tiles = {k: v for k, v in dw.items() if k.startswith("BLOCK")}
        _, _, rows_per_split = _dw_grid(m, hidden, dw, _GATE_SMS)
        for which, (stride_on, stride_ob) in (("dW_up", (b, 1)), ("dW_down", (1, hidden))):
            cases.append(
                _gate_case(
                    f"adapter_bwd_dw[{ty},BLOCK_B={b},{which}]", "_adapter_bwd_dw_kernel",
                    {"x_ptr": f"*{ty}", "g_ptr": f"*{ty}", "out_ptr": "*fp32", "colsum_ptr": "*fp32"},
                    {"HAS_COLSUM": True, "DOT_PRECISION": prec, **dw_tiles},
                    {"M": m, "N": hidden, "B": b, "rows_per_split": rows_per_split, "stride_xm": hidden,
                     "stride_xn": 1, "stride_gm": b, "stride_gb": 1, "stride_os": hidden * b,
                     "stride_on": stride_on, "stride_ob": stride_ob},
                    num_warps=dw["num_warps"], num_stages=dw["num_stages"], tensor_cores=mma,
                )
            )  # fmt: skip
    return cases
