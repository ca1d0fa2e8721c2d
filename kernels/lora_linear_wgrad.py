"""Weight-gradient kernel of the fused LoRA linear: ``dA``, ``dB`` and ``dbias`` (see ``lora_linear.py``).

``dA = s·Gᵀ·drop(X) [R, K]`` and ``dB = s·dYᵀ·U [N, R]`` are reductions over the M rows of skinny
operands, so ``_lora_wgrad_kernel`` computes ``(keep ⊙ X)ᵀ·G`` for one slice of rows per program (a
``[BLOCK_P, BLOCK_M] x [BLOCK_M, BLOCK_R]`` MMA per step, X read transposed), into one float32 partial
per slice; the column sums of dY for ``dbias`` ride along in dB's pass, and for DoRA (``HAS_YSUM``) also
``Σ dY ⊙ (Y − bias)`` for the magnitude's gradient, Y read beside dY. A ``sum`` over the few slices
finishes each reduction: no atomics, so results are deterministic run to run. The number of slices is
chosen by rule so the grid fills the device. ``G`` is float32; for a 16-bit MMA it is split as
``hi + lo`` (two MMAs), which keeps its float32 accuracy.

``lora_linear_bwd`` (in ``lora_linear.py``) runs ``G = dY·B`` and ``dX = dY·W + s·D/(1-p) ⊙ (G·A)``
through ``lora_linear_kernels.py``, then these reductions through ``_wgrad``.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from fastpeft.kernels._gate import GateCase
from fastpeft.kernels.formats import dot_precision
from fastpeft.kernels.lora_linear_gate import _GATE_BLOCK_R, _GATE_TYPES
from fastpeft.kernels.lora_linear_kernels import (
    _block_r,
    _interpreting,
    _target_programs,
)

__all__ = ["compile_gate_cases"]

# ----------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["has_mask", "rows_per_split"])
def _lora_wgrad_kernel(
    x_ptr, g_ptr, keep_ptr, out_ptr, colsum_ptr, y_ptr, bias_ptr, f_ptr, xf_ptr,
    M, P, R, rows_per_split,
    stride_xm, stride_xp, stride_gm, stride_gr, stride_km, stride_kp, stride_ym, stride_yp, stride_fm, stride_fp,
    has_mask,
    MASKABLE: tl.constexpr, HAS_COLSUM: tl.constexpr, G_SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_YSUM: tl.constexpr = False, HAS_BIAS: tl.constexpr = False, WRITE_XF: tl.constexpr = False,
):  # fmt: skip
    # OUT[s, P, R] = Σ_{m in slice s} (keep ⊙ X)[m, p]·G[m, r];  COLSUM[s, P] = Σ_{m in slice s} X[m, p];
    # HAS_YSUM: COLSUM[S + s, P] = Σ_{m in slice s} X[m, p]·(Y[m, p] − bias[p])  (S slices);
    # WRITE_XF: XF[m, p] = X[m, p]·f[p] in X's dtype (by the programs of the first R tile)
    dtype = x_ptr.dtype.element_ty
    pid_p = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_p = offs_p < P
    mask_r = offs_r < R
    acc = tl.zeros([BLOCK_P, BLOCK_R], dtype=tl.float32)
    colsum = tl.zeros([BLOCK_P], dtype=tl.float32)
    ysum = tl.zeros([BLOCK_P], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_p, mask=mask_p, other=0.0).to(tl.float32)
    if WRITE_XF:
        f = tl.load(f_ptr + offs_p, mask=mask_p, other=0.0)
        xf_rows = tl.where(pid_r == 0, M, 0)  # a predicate, not a branch in the loop (that serialized dB's wgmma)
    m_start = pid_s * rows_per_split
    for m0 in range(0, rows_per_split, BLOCK_M):
        offs_m = m_start + m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        mask_pm = mask_p[:, None] & mask_m[None, :]
        # X read transposed: the [BLOCK_P, BLOCK_M] tile is the MMA's left operand
        xt = tl.load(x_ptr + offs_p[:, None] * stride_xp + offs_m[None, :] * stride_xm, mask=mask_pm, other=0.0)
        if HAS_COLSUM:
            colsum += tl.sum(xt.to(tl.float32), axis=1)
        if HAS_YSUM:
            yt = tl.load(y_ptr + offs_p[:, None] * stride_yp + offs_m[None, :] * stride_ym, mask=mask_pm, other=0.0,
                         eviction_policy="evict_first").to(tl.float32)  # fmt: skip
            if HAS_BIAS:
                yt = yt - bias[:, None]  # where masked, X is 0
            ysum += tl.sum(xt.to(tl.float32) * yt, axis=1)
        if WRITE_XF:
            tl.store(xf_ptr + offs_p[:, None] * stride_fp + offs_m[None, :] * stride_fm,
                     (xt.to(tl.float32) * f[:, None]).to(xf_ptr.dtype.element_ty),
                     mask=mask_p[:, None] & (offs_m < xf_rows)[None, :])  # fmt: skip
        # dB (never masked) compiles no branch here: the runtime branch inside the loop made ptxas serialize its
        # wgmma (C7515); dA keeps it, one binary with and without dropout (its wgmma stay pipelined)
        if MASKABLE and has_mask:
            keep = tl.load(keep_ptr + offs_p[:, None] * stride_kp + offs_m[None, :] * stride_km, mask=mask_pm, other=0)
            xt = tl.where(keep != 0, xt, 0.0)
        g = tl.load(
            g_ptr + offs_m[:, None] * stride_gm + offs_r[None, :] * stride_gr,
            mask=mask_m[:, None] & mask_r[None, :], other=0.0,
        )  # fmt: skip
        if G_SPLIT:
            hi = g.to(dtype)
            lo = (g - hi.to(tl.float32)).to(dtype)
            acc = tl.dot(xt, hi, acc, input_precision=DOT_PRECISION)
            acc = tl.dot(xt, lo, acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(xt, g.to(dtype), acc, input_precision=DOT_PRECISION)
    tl.store(
        out_ptr + pid_s * P * R + offs_p[:, None] * R + offs_r[None, :], acc,
        mask=mask_p[:, None] & mask_r[None, :],
    )  # fmt: skip
    if HAS_COLSUM:
        if pid_r == 0:
            tl.store(colsum_ptr + pid_s * P + offs_p, colsum, mask=mask_p)
            if HAS_YSUM:
                tl.store(colsum_ptr + (tl.num_programs(2) + pid_s) * P + offs_p, ysum, mask=mask_p)


# ----------------------------------------------------------------------------------------------
# launch helper
# ----------------------------------------------------------------------------------------------


def _wgrad_config(dtype: torch.dtype, interpret: bool) -> dict[str, int]:
    # a bandwidth-bound pass over X: the tile only needs bytes in flight. 16-bit: [128, 32] X tiles over 8
    # warps (4 warps over [128, 64] spilled in dB, where the column sums of dY keep X in registers too);
    # float32: the FMA dot holds its whole K extent (BLOCK_M) of operands live at once, so 16 rows a step
    if interpret:
        return {"BLOCK_M": 32, "BLOCK_P": 32, "num_warps": 4, "num_stages": 3}
    if dtype == torch.float32:
        return {"BLOCK_M": 16, "BLOCK_P": 64, "num_warps": 8, "num_stages": 3}
    return {"BLOCK_M": 32, "BLOCK_P": 128, "num_warps": 8, "num_stages": 4}


def _wgrad_rows(m: int, p: int, r: int, cfg: dict[str, int], programs: int) -> int:
    """Rows per slice of M: enough slices to give the device ``programs`` programs, each a whole number of
    ``BLOCK_M`` rows."""
    tiles = triton.cdiv(p, cfg["BLOCK_P"]) * triton.cdiv(r, _block_r(r))
    splits = max(1, min(triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(programs, tiles)))
    return triton.cdiv(triton.cdiv(m, splits), cfg["BLOCK_M"]) * cfg["BLOCK_M"]


def _wgrad(
    x: torch.Tensor,
    g: torch.Tensor,
    keep: tuple[torch.Tensor, bool],
    colsum: bool,
    maskable: bool = True,
    y: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale_into: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(keep ⊙ X)ᵀ·G [P, R]`` and, if asked, ``Σ_m X [P]``, both float32, for ``X [M, P]``, ``G [M, R]``;
    ``maskable`` False (dB) compiles the kernel without the keep-mask select (``keep`` must then be unset).
    With ``y`` (DoRA's output ``[M, P]``, X's dtype; ``bias [P]`` or None) the sums come back unsummed, float32
    ``[2, S, P]``: the S slices' ``Σ_m X`` and ``Σ_m X ⊙ (Y − bias)`` (``colsum`` must be asked; ``dora_dm`` sums
    them). With ``scale_into = (f, out)`` (f float32 ``[P]``, ``out [M, P]`` in X's dtype, dB only) the pass also
    writes ``X ⊙ f`` into ``out``, rounded once: DoRA's ``dY ⊙ f`` for dX, with no pass of its own."""
    assert maskable or not keep[1], "a keep-mask for a launch compiled without the select"
    assert y is None or (colsum and not maskable), "Y's sums ride along dB's pass only"
    assert scale_into is None or not maskable, "X ⊙ f rides along dB's pass only"
    m, p = x.shape
    r = g.shape[1]
    interpret = _interpreting()
    cfg = _wgrad_config(x.dtype, interpret)
    block_r = _block_r(r)
    rows = _wgrad_rows(m, p, r, cfg, _target_programs(x.device, interpret))
    splits = triton.cdiv(m, rows)
    part = torch.empty((splits, p, r), dtype=torch.float32, device=x.device)
    with_y = y is not None
    sums = torch.empty((1 + with_y, splits, p), dtype=torch.float32, device=x.device) if colsum else part
    keep_t, has_mask = keep
    y_t = x if y is None else y
    f, xf = (part, x) if scale_into is None else scale_into
    grid = (triton.cdiv(p, cfg["BLOCK_P"]), triton.cdiv(r, block_r), splits)
    _lora_wgrad_kernel[grid](
        x, g, keep_t, part, sums, y_t, x if bias is None else bias, f, xf, m, p, r, rows,
        x.stride(0), x.stride(1), g.stride(0), g.stride(1),
        keep_t.stride(0) if has_mask else 0, keep_t.stride(1) if has_mask else 0,
        y_t.stride(0) if with_y else 0, y_t.stride(1) if with_y else 0,
        xf.stride(0) if scale_into else 0, xf.stride(1) if scale_into else 0,
        int(has_mask), MASKABLE=maskable, HAS_COLSUM=colsum,
        G_SPLIT=g.dtype == torch.float32 and x.dtype != torch.float32,
        DOT_PRECISION=dot_precision(x.dtype), BLOCK_M=cfg["BLOCK_M"], BLOCK_P=cfg["BLOCK_P"], BLOCK_R=block_r,
        HAS_YSUM=with_y, HAS_BIAS=bias is not None, WRITE_XF=scale_into is not None, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )  # fmt: skip
    # the few per-slice partials are summed by torch: a [splits, P, R] reduction, no atomics
    if not colsum:
        return part.sum(0), None
    return part.sum(0), (sums if with_y else sums[0].sum(0))


# ----------------------------------------------------------------------------------------------
# compile gate
# ----------------------------------------------------------------------------------------------


def compile_gate_cases() -> list[GateCase]:
    """The weight-gradient kernel's rule-picked tile for float16, bfloat16 and float32 x every ``BLOCK_R``:
    dA (float32 G, split into hi + lo for 16-bit X, dropout select) and dB (U in X's dtype, column sums for
    dbias, no select compiled), with the runtime arguments of a Llama-3-8B 4096 x 4096 projection at M = 8192
    (dropout on in dA's pass, as in training); DoRA's dB (``dB_dora``: Y's sums beside, with and without a bias, and
    on a base that is not the scaled scratch also writing dY ⊙ f, ``gf=True``).
    Collected by ``lora_linear``'s ``compile_gate_cases``."""
    cases = []
    m, p = 8192, 4096
    grads = ("dA", "dB", "dB_dora", "dB_dora_bias", "dB_dora_gf", "dB_dora_gf_bias")
    for (dtype, ty), block_r, grad in itertools.product(_GATE_TYPES.items(), _GATE_BLOCK_R, grads):
        cfg = _wgrad_config(dtype, interpret=False)
        da, dora, xf = grad == "dA", grad.startswith("dB_dora"), "_gf" in grad
        name = f"lora_wgrad_{grad}[{ty},BLOCK_R={block_r}]"
        if dora:
            name = f"lora_wgrad_dB_dora[{ty},bias={grad.endswith('bias')},{'gf=True,' if xf else ''}BLOCK_R={block_r}]"
        cases.append(
            GateCase(
                name=name,
                module=__name__,
                kernel="_lora_wgrad_kernel",
                signature={
                    "x_ptr": f"*{ty}",
                    "g_ptr": "*fp32" if da else f"*{ty}",
                    "keep_ptr": "*u8",
                    "out_ptr": "*fp32",
                    "colsum_ptr": "*fp32",
                    "y_ptr": f"*{ty}",
                    "bias_ptr": f"*{ty}",
                    "f_ptr": "*fp32",
                    "xf_ptr": f"*{ty}",
                    **dict.fromkeys(("M", "P", "R", "rows_per_split"), "i32"),
                    **dict.fromkeys(("stride_xm", "stride_xp", "stride_gm", "stride_gr", "stride_km"), "i32"),
                    **dict.fromkeys(("stride_kp", "stride_ym", "stride_yp", "stride_fm", "stride_fp"), "i32"),
                    "has_mask": "i32",
                },
                constexprs={
                    "MASKABLE": da,
                    "HAS_COLSUM": not da,
                    "G_SPLIT": da and dtype != torch.float32,
                    "DOT_PRECISION": dot_precision(dtype),
                    "BLOCK_M": cfg["BLOCK_M"],
                    "BLOCK_P": cfg["BLOCK_P"],
                    "BLOCK_R": block_r,
                    "HAS_YSUM": dora,
                    "HAS_BIAS": grad.endswith("bias"),
                    "WRITE_XF": xf,
                },
                num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"],
                tensor_cores=dtype != torch.float32,
                # X [M, K] (dA) or dY [M, N] (dB), G / U [M, R] contiguous; M sliced as the launcher cuts it for
                # an H100's 132 SMs
                args={
                    "M": m,
                    "P": p,
                    "R": block_r,
                    "rows_per_split": _wgrad_rows(m, p, block_r, cfg, 2 * 132),
                    "stride_xm": p,
                    "stride_xp": 1,
                    "stride_gm": block_r,
                    "stride_gr": 1,
                    "stride_km": p if da else 0,
                    "stride_kp": int(da),
                    "stride_ym": p if dora else 0,
                    "stride_yp": int(dora),
                    "stride_fm": p if xf else 0,
                    "stride_fp": int(xf),
                    "has_mask": int(da),
                },
            )
        )
    return cases
