r"""Fused DoRA linear: the magnitude scaling in the LoRA op's epilogue, its backward with the norm a constant.

Math, for ``X [M, K]``, a frozen ``W [N, K]`` (dense, or NF4), ``bias [N]``, ``A [R, K]``, ``B [N, R]``, scaling
``s``, the trained magnitude ``m [N]`` and the detached row norm ``‖W + s·B·A‖`` (float32 ``[N]``)::

    f  = m / ‖W + s·B·A‖                               [N]      float32
    U  = X·Aᵀ                                          [M, R]
    Y  = f ⊙ (X·Wᵀ + s·U·Bᵀ) + bias                    [M, N]   = X·(f ⊙ W)ᵀ + s·U·(f ⊙ B)ᵀ + bias
    (backward, G = dY, the norm constant; Y0 = X·Wᵀ + s·U·Bᵀ = (Y − bias) / f)
    dX    = (G ⊙ f)·W + s·((G ⊙ f)·B)·A               [M, K]
    dA    = s·((G ⊙ f)·B)ᵀ·X                          [R, K]
    dB    = s·(G ⊙ f)ᵀ·U = s·f ⊙ (Gᵀ·U)               [N, R]   (rows scaled)
    dbias = Σ_i G                                      [N]
    dm_n  = Σ_i G[i, n]·Y0[i, n] / ‖·‖_n = Σ_i G[i, n]·(Y[i, n] − bias_n) / m_n

so the backward keeps the op's own output ``Y`` (no extra memory where its consumer keeps it too) instead of
``Y0``. Where ``m_n = 0`` the column of ``Y`` is ``bias`` and ``Y0`` cannot be recovered from it: those columns
get ``Y0`` recomputed from X and the base's rows by ``_dora_dm_kernel``, which finds them on the GPU: one launch
that sums the column partials into dbias and dm = Σ / m and, only where a magnitude is exactly 0, recomputes (no
host synchronization).
Numerics of the recovery: ``Y − bias`` carries ``Y``'s rounding (half an ulp of ``|Y|``), so with a bias much
larger than ``f·Y0`` the magnitude's gradient loses the bits the bias takes (eager autograd keeps ``Y0``).

Paths (a scaling per row is rank-sized work: ``f ⊙ B`` is ``[N, R]``):

- NF4 forward at decode sizes (``lora_linear_decode.decode_supported``): the decode kernel forming ``f = m / norm``
  in its epilogue (``col_scale = m``, ``col_norm = norm``): one launch where LoRA's is one.
- NF4 with ``K % 64 == 0`` wherever LoRA dequantizes once into the scratch (16-bit M > ``SMALL_M_MAX``, or float32):
  the dequantize kernel writes ``f ⊙ W`` into the scratch (``nf4_dequantize(row_scale=f)``), then LoRA's own base
  GEMM (cuBLAS + addmm, or the tiled kernel) with ``f ⊙ B`` and the bias: the DoRA output with no pass beyond
  LoRA's. The backward dequantizes ``f ⊙ W`` again for dX = G·(f ⊙ W) + s·(G·(f ⊙ B))·A.
- everything else (dense bases, the NF4 split-K path): LoRA's base GEMM without the LoRA term, then
  ``_dora_epilogue_kernel``: ``Y = f ⊙ (base + s·U·Bᵀ) + bias`` in place, the bytes of LoRA's addmm pass over Y.
  The backward's dB pass writes ``G ⊙ f`` and LoRA's dX and dA run on it.

The column sums ``Σ G`` (dbias) and ``Σ G·(Y − bias)`` (dm), per slice of M into float32 partials (no atomics:
deterministic), ride along dB's own pass over G (``_wgrad`` with Y: the weight-gradient kernel's ``HAS_YSUM``), Y
read beside G, which off the scaled scratch also writes the ``G ⊙ f`` that dX and dA read (``WRITE_XF``): no pass
of their own. Where dB is not asked, the column pass (``_dora_colsum_kernel``) does both.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastpeft.kernels import lora_linear as lora
from fastpeft.kernels import lora_linear_decode as decode
from fastpeft.kernels._gate import GateCase
from fastpeft.kernels.formats import NESTED_BLOCKSIZE, NF4Args, dot_precision, dynamic_map, nf4_code
from fastpeft.kernels.lora_linear_kernels import _interpreting, _target_programs
from fastpeft.kernels.lora_linear_wgrad import _wgrad

__all__ = ["compile_gate_cases", "dora_colsum", "dora_epilogue", "dora_dm", "dora_linear_bwd", "dora_linear_fwd"]

# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["lora_scale"])
def _dora_epilogue_kernel(
    base_ptr, f_ptr, u_ptr, b_ptr, bias_ptr, out_ptr,
    M, N, R,
    stride_bm, stride_bn, stride_um, stride_ur, stride_lbn, stride_lbr, stride_om, stride_on,
    lora_scale,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # OUT = f ⊙ (BASE + s·U·Bᵀ) + bias for one [BLOCK_M, BLOCK_N] tile; OUT may be BASE (each element is read
    # before this program writes it, and no other program touches it)
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    # -- the LoRA term: U [BLOCK_M, R]·Bᵀ [R, BLOCK_N], float32 --
    lora = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        u = tl.load(u_ptr + offs_m[:, None] * stride_um + offs_r[None, :] * stride_ur,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)  # fmt: skip
        bt = tl.load(b_ptr + offs_n[None, :] * stride_lbn + offs_r[:, None] * stride_lbr,
                     mask=mask_n[None, :] & mask_r[:, None], other=0.0)  # fmt: skip
        lora = tl.dot(u, bt, lora, input_precision=DOT_PRECISION)
    # -- epilogue: one rounding to the output dtype --
    base = tl.load(base_ptr + offs_m[:, None] * stride_bm + offs_n[None, :] * stride_bn, mask=mask, other=0.0)
    f = tl.load(f_ptr + offs_n, mask=mask_n, other=0.0)
    acc = (base.to(tl.float32) + lora_scale * lora) * f[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask)  # fmt: skip


@triton.jit
def _dora_colsum_kernel(
    g_ptr, y_ptr, bias_ptr, f_ptr, gf_ptr, dsum_ptr, dm_ptr,
    M, N, rows_per_slice,
    stride_gm, stride_gn, stride_ym, stride_yn, stride_fm, stride_fn,
    HAS_BIAS: tl.constexpr, WRITE_GF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # over rows [slice·rows_per_slice, +rows_per_slice) of columns tile pid_n: Σ G and Σ G·(Y − bias) into the
    # slice's float32 partials, and G ⊙ f into GF when WRITE_GF
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if WRITE_GF:
        f = tl.load(f_ptr + offs_n, mask=mask_n, other=0.0)
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_m = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    row0 = pid_s.to(tl.int64) * rows_per_slice
    row_end = tl.minimum(row0 + rows_per_slice, M)
    for m0 in range(row0, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask = (offs_m < row_end)[:, None] & mask_n[None, :]
        # -- load: G and Y are streamed once --
        g = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn, mask=mask, other=0.0,
                    eviction_policy="evict_first").to(tl.float32)  # fmt: skip
        y = tl.load(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, mask=mask, other=0.0,
                    eviction_policy="evict_first").to(tl.float32)  # fmt: skip
        if HAS_BIAS:
            y = tl.where(mask, y - bias[None, :], 0.0)
        acc_g += g
        acc_m += g * y
        if WRITE_GF:
            tl.store(gf_ptr + offs_m[:, None] * stride_fm + offs_n[None, :] * stride_fn,
                     (g * f[None, :]).to(gf_ptr.dtype.element_ty), mask=mask)  # fmt: skip
    tl.store(dsum_ptr + pid_s * N + offs_n, tl.sum(acc_g, axis=0), mask=mask_n)
    tl.store(dm_ptr + pid_s * N + offs_n, tl.sum(acc_m, axis=0), mask=mask_n)


@triton.jit(do_not_specialize=["lora_scale", "has_dbias", "slices"])
def _dora_dm_kernel(
    part_ptr, dbias_ptr, x_ptr, w_ptr, absmax_ptr, nested_ptr, offset_ptr, code_ptr, qmap_ptr, u_ptr, b_ptr, dy_ptr,
    m_ptr, norm_ptr, dm_ptr, M, N, K, R, blocksize, slices, has_dbias,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_um, stride_ur, stride_bn, stride_br, stride_gm, stride_gn,
    lora_scale,
    NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # PART [2, slices, N]: the backward's per-slice Σ dY and Σ dY·(Y − bias). This program's BLOCK_N columns: dbias
    # = Σ_s of the first (if has_dbias), dm = Σ_s of the second / m where m != 0, and where m[n] = 0 (Y holds only
    # the bias there) dm[n] = Σ_i dY[i, n]·(X_i·W_nᵀ + s·U_i·B_nᵀ) / norm[n], W_n a dense row or an NF4 row decoded
    # here (bitsandbytes' layout). Each column is written once, by the vector store or by the zero branch.
    pid = tl.program_id(0)
    offs = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs < N
    mags = tl.load(m_ptr + offs, mask=mask_n, other=1.0)
    sum_g = tl.zeros([BLOCK_N], dtype=tl.float32)
    sum_m = tl.zeros([BLOCK_N], dtype=tl.float32)
    for s in range(slices):
        sum_g += tl.load(part_ptr + s * N + offs, mask=mask_n, other=0.0)
        sum_m += tl.load(part_ptr + (slices + s) * N + offs, mask=mask_n, other=0.0)
    if has_dbias:
        tl.store(dbias_ptr + offs, sum_g.to(dbias_ptr.dtype.element_ty), mask=mask_n)
    tl.store(dm_ptr + offs, tl.math.div_rn(sum_m, mags), mask=mask_n & (mags != 0.0))
    if tl.sum(tl.where(mags == 0.0, 1, 0)) > 0:
        for j in range(BLOCK_N):
            n = pid * BLOCK_N + j
            if n < N:
                if tl.load(m_ptr + n) == 0.0:
                    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
                    for m0 in range(0, M, BLOCK_M):
                        offs_m = m0 + tl.arange(0, BLOCK_M)
                        mask_m = offs_m < M
                        y0 = tl.zeros([BLOCK_M], dtype=tl.float32)
                        for k0 in range(0, K, BLOCK_K):
                            offs_k = k0 + tl.arange(0, BLOCK_K)
                            mask_k = offs_k < K
                            if NF4:
                                q = n.to(tl.int64) * K + offs_k  # flat index; the even element in the high nibble
                                byte = tl.load(w_ptr + q // 2, mask=mask_k, other=0).to(tl.int32)
                                code = tl.where(q % 2 == 0, byte >> 4, byte & 0xF)
                                blk = q // blocksize
                                if DOUBLE_QUANT:
                                    a8 = tl.load(absmax_ptr + blk, mask=mask_k, other=0).to(tl.int32)
                                    nested = tl.load(nested_ptr + blk // NESTED_BLOCKSIZE, mask=mask_k, other=0.0)
                                    scale = tl.load(qmap_ptr + a8) * nested + tl.load(offset_ptr)
                                else:
                                    scale = tl.load(absmax_ptr + blk, mask=mask_k, other=0.0)
                                w_n = tl.load(code_ptr + code) * scale
                            else:
                                w_n = tl.load(w_ptr + n * stride_wn + offs_k * stride_wk, mask=mask_k,
                                              other=0.0).to(tl.float32)  # fmt: skip
                            xk = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                                         mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)  # fmt: skip
                            y0 += tl.sum(xk * w_n[None, :], axis=1)
                        for r0 in range(0, R, BLOCK_R):  # + s·U_i·B_nᵀ, BLOCK_R ranks a step
                            offs_r = r0 + tl.arange(0, BLOCK_R)
                            b_n = tl.load(b_ptr + n * stride_bn + offs_r * stride_br, mask=offs_r < R, other=0.0)
                            u = tl.load(u_ptr + offs_m[:, None] * stride_um + offs_r[None, :] * stride_ur,
                                        mask=mask_m[:, None] & (offs_r < R)[None, :], other=0.0)  # fmt: skip
                            y0 += lora_scale * tl.sum(u.to(tl.float32) * b_n.to(tl.float32)[None, :], axis=1)
                        g = tl.load(dy_ptr + offs_m * stride_gm + n * stride_gn, mask=mask_m, other=0.0)
                        acc += g.to(tl.float32) * y0
                    tl.store(dm_ptr + n, tl.sum(acc, axis=0) / tl.load(norm_ptr + n))


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------

EPILOGUE_BLOCK_R = 16


def _epilogue_config(interpret: bool) -> dict[str, int]:
    # a bandwidth-bound pass over Y (the rank-R dot is tiny): 64 x 128 tiles, 16 KB of 16-bit Y in flight a program
    if interpret:
        return {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4}
    return {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4}


def _colsum_config(interpret: bool) -> dict[str, int]:
    # 32 rows x 128 columns of G and Y per step: 16 KB of 16-bit loads in flight a program, 64 accumulator registers
    if interpret:
        return {"BLOCK_M": 8, "BLOCK_N": 16, "num_warps": 4}
    return {"BLOCK_M": 32, "BLOCK_N": 128, "num_warps": 4}


def dora_epilogue(
    base: torch.Tensor, f: torch.Tensor, u: torch.Tensor, lora_b: torch.Tensor, scaling: float,
    bias: torch.Tensor | None, out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """``OUT = f ⊙ (BASE + s·U·Bᵀ) + bias`` (contract: ``reference_dora.dora_epilogue_reference``).

    Args:
        base: ``[M, N]`` float16 / bfloat16 / float32 (any strides). f: float32 ``[N]``, contiguous.
        u: ``[M, R]``, lora_b: ``[N, R]``, bias: ``[N]`` contiguous or None, all in base's dtype. scaling: ``s``.
        out: ``[M, N]`` to write (``base`` itself for the in-place pass), or None to allocate.

    Returns:
        ``out [M, N]`` in base's dtype (computed in float32, rounded once).
    """
    m, n = base.shape
    r = u.shape[1]
    _check_vec("f", f, n, torch.float32, base.device)
    if u.shape[0] != m or tuple(lora_b.shape) != (n, r) or u.dtype != base.dtype or lora_b.dtype != base.dtype:
        raise ValueError(f"u must be [{m}, R] and lora_b [{n}, R] in {base.dtype}, got {tuple(u.shape)} "
                         f"{u.dtype} and {tuple(lora_b.shape)} {lora_b.dtype}")  # fmt: skip
    if bias is not None:
        _check_vec("bias", bias, n, base.dtype, base.device)
    if out is None:
        out = torch.empty_like(base)
    interpret = _interpreting()
    cfg = _epilogue_config(interpret)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    _dora_epilogue_kernel[grid](
        base, f, u, lora_b, base if bias is None else bias, out, m, n, r,
        base.stride(0), base.stride(1), u.stride(0), u.stride(1), lora_b.stride(0), lora_b.stride(1),
        out.stride(0), out.stride(1), float(scaling),
        HAS_BIAS=bias is not None, DOT_PRECISION=dot_precision(base.dtype),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_R=EPILOGUE_BLOCK_R, num_warps=cfg["num_warps"],
    )  # fmt: skip
    return out


def dora_colsum(
    dy: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None, f: torch.Tensor, write_gf: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(PART, dY ⊙ f)``: PART float32 ``[2, S, N]`` the slices' ``Σ_i dY`` and ``Σ_i dY ⊙ (Y − bias)``, whose sums
    over S are ``reference_dora.dora_colsum_reference``'s first two (its contract; ``dora_dm`` sums them).

    Args:
        dy, y: ``[M, N]`` in one dtype (any strides). bias: ``[N]`` in that dtype, contiguous, or None.
        f: float32 ``[N]``. write_gf: whether to write ``dY ⊙ f`` (else None comes back).

    Returns:
        the partials and ``dY ⊙ f`` ``[M, N]`` in dy's dtype or None.
    """
    m, n = dy.shape
    if tuple(y.shape) != (m, n) or y.dtype != dy.dtype:
        raise ValueError(f"y must be [{m}, {n}] in {dy.dtype}, got {tuple(y.shape)} {y.dtype}")
    _check_vec("f", f, n, torch.float32, dy.device)
    if bias is not None:
        _check_vec("bias", bias, n, dy.dtype, dy.device)
    interpret = _interpreting()
    cfg = _colsum_config(interpret)
    tiles = triton.cdiv(n, cfg["BLOCK_N"])
    splits = max(1, min(triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(_target_programs(dy.device, interpret), tiles)))
    rows = triton.cdiv(triton.cdiv(m, splits), cfg["BLOCK_M"]) * cfg["BLOCK_M"]
    splits = triton.cdiv(m, rows)
    part = torch.empty((2, splits, n), dtype=torch.float32, device=dy.device)
    gf = torch.empty_like(dy, memory_format=torch.contiguous_format) if write_gf else None
    gf_t = dy if gf is None else gf
    _dora_colsum_kernel[(tiles, splits)](
        dy, y, dy if bias is None else bias, f, gf_t, part[0], part[1], m, n, rows,
        dy.stride(0), dy.stride(1), y.stride(0), y.stride(1), gf_t.stride(0), gf_t.stride(1),
        HAS_BIAS=bias is not None, WRITE_GF=write_gf, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        num_warps=cfg["num_warps"],
    )  # fmt: skip
    return part, gf


DM_BLOCK_N = 128
"""Columns per program of the dm pass: N / 128 programs."""


def _dm_config(interpret: bool) -> dict[str, int]:
    # the zero-magnitude branch (rare): a float32 FMA dot per row block, 32 rows x 128 of K in flight, no spill
    if interpret:
        return {"BLOCK_M": 8, "BLOCK_K": 32, "num_warps": 4}
    return {"BLOCK_M": 32, "BLOCK_K": 128, "num_warps": 4}


def dora_dm(
    part: torch.Tensor, needs_dbias: bool, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
    nf4: NF4Args | None, lora_b: torch.Tensor, u: torch.Tensor, scaling: float, magnitude: torch.Tensor,
    norm: torch.Tensor,
) -> tuple[torch.Tensor | None, torch.Tensor]:  # fmt: skip
    """``(dbias, dm)`` from the backward's column partials in one launch, with no host synchronization (a DoRA
    backward stays CUDA-graph capturable): ``dbias = Σ_s PART[0, s]`` in dy's dtype (None unless asked), ``dm =
    Σ_s PART[1, s] / m`` float32, and where ``m_n = 0`` (Y's column holds only the bias, so ``(Y − bias) / m``
    says nothing) ``dm_n = Σ_i dY[i, n]·(X_i·W_nᵀ + s·U_i·B_nᵀ) / norm_n``, W's row dense or NF4-decoded in the
    kernel, float32; without a zero magnitude that branch never runs. Contract: ``reference_dora.dora_dm_reference``.

    Args:
        part: float32 ``[2, S, N]`` (``dora_colsum`` / ``_wgrad``'s unsummed slices), contiguous.
        dy ``[M, N]``, x ``[M, K]``, u ``[M, R]``, lora_b ``[N, R]``: the backward's (any strides). weight / nf4: the
        base. magnitude, norm: ``[N]``.
    """
    m_rows, k = x.shape
    n, r = lora_b.shape
    if part.dtype != torch.float32 or part.dim() != 3 or part.shape[0] != 2 or part.shape[2] != n:
        raise ValueError(f"part must be float32 [2, S, {n}], got {part.dtype} {list(part.shape)}")
    mag = magnitude.detach().float().contiguous()
    dm = torch.empty(n, dtype=torch.float32, device=x.device)
    dbias = torch.empty(n, dtype=dy.dtype, device=x.device) if needs_dbias else None
    cfg = _dm_config(_interpreting())
    nested_bs = NESTED_BLOCKSIZE if nf4 is None else nf4.nested_blocksize
    if nf4 is None:
        w, placeholders = weight, (norm,) * 5  # absmax, nested absmax, offset, code map, nested map: unread
        w_strides, blocksize, dq = (weight.stride(0), weight.stride(1)), 1, False
    else:
        w, absmax, dq = nf4.packed.reshape(-1), nf4.absmax, nf4.absmax.dtype == torch.uint8
        code = (nf4_code(x.device) if nf4.quant_map is None else nf4.quant_map).float().contiguous()
        if dq:
            qmap = nf4.nested_quant_map if nf4.nested_quant_map is not None else dynamic_map(x.device)
            placeholders = (absmax, nf4.nested_absmax, nf4.offset.reshape(1).float(), code, qmap.float().contiguous())
        else:
            placeholders = (absmax, absmax, absmax, code, absmax)  # nested absmax, offset and nested map unread
        w_strides, blocksize = (0, 0), nf4.blocksize
    _dora_dm_kernel[(triton.cdiv(n, DM_BLOCK_N),)](
        part.contiguous(), dy if dbias is None else dbias, x, w, *placeholders, u, lora_b, dy, mag, norm, dm,
        m_rows, n, k, r, blocksize, part.shape[1], int(needs_dbias),
        x.stride(0), x.stride(1), *w_strides, u.stride(0), u.stride(1), lora_b.stride(0), lora_b.stride(1),
        dy.stride(0), dy.stride(1), float(scaling),
        NF4=nf4 is not None, DOUBLE_QUANT=dq, NESTED_BLOCKSIZE=nested_bs, BLOCK_N=DM_BLOCK_N,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"], BLOCK_R=16, num_warps=cfg["num_warps"],
    )  # fmt: skip
    return dbias, dm


def _check_vec(name: str, t: object, n: int, dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if tuple(t.shape) != (n,) or t.stride(0) != 1 or t.device != device:
        raise ValueError(f"{name} must be a contiguous [{n}] tensor on {device}, got {tuple(t.shape)} on {t.device}")


def check_dora_args(magnitude: object, norm: object, n: int, like: torch.Tensor) -> None:
    """``magnitude``: a floating ``[N]`` tensor on x's device; ``norm``: float32 ``[N]`` (the detached row norm)."""
    if not isinstance(magnitude, torch.Tensor) or not magnitude.is_floating_point():
        raise TypeError(f"magnitude must be a floating tensor, got {getattr(magnitude, 'dtype', type(magnitude))}")
    if tuple(magnitude.shape) != (n,) or magnitude.device != like.device:
        raise ValueError(
            f"magnitude must be [{n}] on {like.device}, got {tuple(magnitude.shape)} on {magnitude.device}"
        )
    _check_vec("norm", norm, n, torch.float32, like.device)


def check_factors(factors: object, scaled_b: object, n: int, r: int, like: torch.Tensor) -> None:
    """``factors``: float32 ``[2, N]`` and ``scaled_b``: ``[N, R]`` in x's dtype on x's device, or both None."""
    if factors is None and scaled_b is None:
        return
    for name, t, shape, dtype in (("factors", factors, (2, n), torch.float32),
                                  ("scaled_b", scaled_b, (n, r), like.dtype)):  # fmt: skip
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != shape or t.device != like.device:
            raise ValueError(f"{name} must be a {dtype} tensor of shape {list(shape)} on {like.device} "
                             f"(dora_norm_factors), got {getattr(t, 'dtype', type(t).__name__)} "
                             f"{list(getattr(t, 'shape', []))}")  # fmt: skip


def _factor(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """``f = m / ‖W + s·B·A‖`` float32 ``[N]``."""
    return magnitude.float() / norm


def _scaled_scratch(nf4: NF4Args | None, m: int, dtype: torch.dtype) -> bool:
    """Whether this call reads W from the dequantize-once scratch and that scratch can hold ``f ⊙ W`` (the scaled
    dequantize takes whole 64-weight rows, ``K % 64 == 0``)."""
    return nf4 is not None and nf4.shape[1] % 64 == 0 and not lora._fuse_nf4(m, dtype)


def _scaled_b(lora_b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``f ⊙ B`` ``[N, R]`` in B's dtype (rank-sized), rounded once."""
    return (lora_b.float() * f[:, None]).to(lora_b.dtype)


def dora_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    *,
    nf4: NF4Args | None = None,
    factors: torch.Tensor | None = None,
    scaled_b: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Y = f ⊙ (X·Wᵀ + s·U·Bᵀ) + bias`` and ``U = X·Aᵀ`` (contract: ``reference_dora.dora_linear_fwd_reference``).

    Args:
        x, weight, bias, lora_a, lora_b, scaling, nf4: as ``lora_linear_fwd`` takes them (no dropout).
        magnitude: ``m [N]`` (any float dtype). norm: ``‖W + s·B·A‖`` float32 ``[N]``, detached.
        factors, scaled_b: ``dora_norm_factors_fwd``'s ``F [2, N]`` and ``f ⊙ B`` for this m and norm, or None to
            form ``f`` and ``f ⊙ B`` here.

    Returns:
        ``y [M, N]`` and ``u [M, R]`` in x's dtype.
    """
    m, k, n, r = lora._check_args(x, weight, bias, lora_a, lora_b, nf4, None, 0.0)
    check_dora_args(magnitude, norm, n, x)
    check_factors(factors, scaled_b, n, r, x)
    s = float(scaling)
    no_keep = lora._keep(None, x.device)
    if nf4 is not None and decode.decode_supported(x, nf4):
        # decode sizes: the decode kernel forms f = m / norm in its epilogue; one launch as for LoRA (U summed
        # inside it), or U first past its one-launch sizes
        target = _target_programs(x.device, _interpreting())
        mag = magnitude if magnitude.dtype == torch.float32 else magnitude.float()
        if decode.fold_u_supported(m, r, False):
            return decode.nf4_decode_fwd(x, nf4, bias, None, lora_b, s, target, col_scale=mag, lora_a=lora_a,
                                         col_norm=norm)  # fmt: skip
        u = decode.lora_u_fwd(x, lora_a, no_keep, 1.0, target)
        return decode.nf4_decode_fwd(x, nf4, bias, u, lora_b, s, target, col_scale=mag, col_norm=norm), u
    f = _factor(magnitude, norm) if factors is None else factors[0]
    u = lora._skinny(x, lora_a, (lora_a.stride(1), lora_a.stride(0)), no_keep, 1.0, r).to(x.dtype)
    if _scaled_scratch(nf4, m, x.dtype):
        # X·(f ⊙ W)ᵀ + s·U·(f ⊙ B)ᵀ + bias: LoRA's GEMM on the scaled scratch, nothing added
        w = lora._dequantized(nf4, x.dtype, x.device, row_scale=f)
        fb = _scaled_b(lora_b, f) if scaled_b is None else scaled_b
        if lora.cublas_path(m, n, k):
            return lora._cublas_fwd(x, w, bias, u, fb, s), u
        w_args = lora._w_operand(w, None, x.device, False)
        return lora._gemm(x, w_args, u, fb, (fb.stride(1), fb.stride(0)), bias, no_keep, s, n), u
    # -- the base alone, then f ⊙ (base + s·U·Bᵀ) + bias in place (the bytes of LoRA's addmm pass) --
    if lora.cublas_path(m, n, k):
        base = torch.mm(x, lora._dense_base(weight, nf4, x).t())
    else:
        lt, rt = lora._empty_lora(m, x, x)
        w_args = lora._w_operand(weight, None, x.device, False) if nf4 is None else lora._nf4_w_operand(nf4, x, False)
        base = lora._gemm(x, w_args, lt, rt, (0, 1), None, no_keep, 0.0, n)
    return dora_epilogue(base, f, u, lora_b, s, bias, out=base), u


def dora_linear_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    u: torch.Tensor,
    y: torch.Tensor,
    scaling: float,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    *,
    nf4: NF4Args | None = None,
    factors: torch.Tensor | None = None,
    scaled_b: torch.Tensor | None = None,
    needs_dx: bool = True,
    needs_da: bool = True,
    needs_db: bool = True,
    needs_dbias: bool = False,
    needs_dm: bool = True,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of ``dora_linear_fwd``, the norm constant (contract: ``reference_dora.dora_linear_bwd_reference``).

    Args:
        dy: ``[M, N]`` in x's dtype. y: the forward's output ``[M, N]``. u: its ``[M, R]``. The rest as the forward
        (``factors`` and ``scaled_b`` spare forming ``f``, ``f ⊙ B`` and ``s·f`` here).
        needs_*: which gradients to compute.

    Returns:
        ``(dx, da, db, dbias, dm)`` in the dtypes of ``x, lora_a, lora_b, dy, magnitude``; None where not asked.
    """
    m, k, n, r = lora._check_args(x, weight, bias, lora_a, lora_b, nf4, None, 0.0)
    lora._check_tensor("dy", dy, (m, n), x)
    lora._check_tensor("u", u, (m, r), x)
    lora._check_tensor("y", y, (m, n), x)
    check_dora_args(magnitude, norm, n, x)
    check_factors(factors, scaled_b, n, r, x)
    f = _factor(magnitude, norm) if factors is None else factors[0]
    s = float(scaling)
    scaled = needs_dx and _scaled_scratch(nf4, m, x.dtype)
    write_gf = (needs_dx or needs_da) and not scaled
    # dB's pass over G also sums G and G·(Y − bias) and, off the scaled scratch, writes G ⊙ f: the column pass
    # runs only where dB is not asked
    sums = needs_dm or needs_dbias or write_gf
    part = gf = db = None
    if needs_db:
        keep = lora._keep(None, x.device)
        gf = torch.empty_like(dy, memory_format=torch.contiguous_format) if write_gf else None
        grad_b, part = _wgrad(dy, u, keep, colsum=sums, maskable=False, y=y if sums else None, bias=bias,
                              scale_into=None if gf is None else (f, gf))  # fmt: skip
        # dB = s·(G ⊙ f)ᵀ·U = s·f ⊙ (Gᵀ·U)
        sf = s * f if factors is None else factors[1]
        db = (grad_b * sf[:, None]).to(lora_b.dtype)
    elif sums:
        part, gf = dora_colsum(dy, y, bias, f, write_gf)
    dx = da = None
    if scaled:
        # dX = G·(f ⊙ W) + s·(G·(f ⊙ B))·A on the scaled scratch; dA from the same G·(f ⊙ B)
        fb = _scaled_b(lora_b, f) if scaled_b is None else scaled_b
        w = lora._dequantized(nf4, x.dtype, x.device, row_scale=f)
        dx, da, _, _ = lora.lora_linear_bwd(dy, x, w, lora_a, fb, u, s, needs_da=needs_da, needs_db=False)
    elif gf is not None:
        # LoRA's backward on G ⊙ f: dX = (G ⊙ f)·W + s·((G ⊙ f)·B)·A, dA = s·((G ⊙ f)·B)ᵀ·X
        dx, da, _, _ = lora.lora_linear_bwd(
            gf, x, weight, lora_a, lora_b, u, s, nf4=nf4, needs_dx=needs_dx, needs_da=needs_da, needs_db=False
        )
    # dbias and dm (Σ / m; recomputed where m = 0) from the partials in one launch, no host sync
    dbias = dm = None
    if needs_dm:
        dbias, dm = dora_dm(part, needs_dbias, dy, x, weight, nf4, lora_b, u, s, magnitude, norm)
        dm = dm.to(magnitude.dtype)
    elif needs_dbias:
        dbias = part[0].sum(0).to(dy.dtype)
    return dx, da, db, dbias, dm


# ----------------------------------------------------------------------------------------------
# compile gate
# ----------------------------------------------------------------------------------------------


def compile_gate_cases() -> list[GateCase]:
    """The DoRA kernels' compile-gate cases (``kernels/dora_linear_gate.py``) and the row norm's."""
    from fastpeft.kernels import dora_linear_gate  # it reads this module's constants

    return dora_linear_gate.compile_gate_cases()
