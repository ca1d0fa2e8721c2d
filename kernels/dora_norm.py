"""DoRA's row norm from its low-rank terms in one launch (``dora_row_norm_reference`` is the contract).

For a frozen base ``W [N, K]`` with cached ``‖W_n‖²``, the LoRA pair ``A [R, K]``, ``B [N, R]`` and scaling ``s``::

    ‖W_n + s·B_n·A‖² = ‖W_n‖² + 2s·B_n·(A·W_nᵀ) + s²·B_n·(A·Aᵀ)·B_nᵀ

``A·Wᵀ [R, N]`` comes from one skinny pass of the base (the NF4 decode kernel); everything else is rank-sized. In
plain torch that rest is about a dozen launches of microseconds each (products, sums, the clamp and the root), more
than the skinny pass itself at decode sizes. Here one program per 128 rows of B (64 at R > 16) computes
``G = A·Aᵀ`` (R x R, over K in 64-wide blocks; A is read from L2 by every program, ``N / BLOCK_N`` times 4·R·K
bytes), the cross term and ``B_n·G·B_nᵀ`` from its tile of B and of ``A·Wᵀ``, and writes the clamped root.
Products run in float32 FMA (``input_precision="ieee"``: tf32 would round A to 10 bits), R padded to 16 or 32
(``R_MAX``).

Given the magnitude ``m``, the same launch also writes what the DoRA op needs of the norm in a training step
(``dora_factors_reference`` is the contract): ``F [2, N]`` float32 with ``f = m / norm`` and ``s·f``, and
``f ⊙ B`` ``[N, R]`` in the op's dtype (B rounded to it first, as the op's cast of B does, then scaled in float32
and rounded once). Those are six rank-sized torch launches in a step otherwise (``f``, ``f ⊙ B`` and its cast in
the forward and again in the backward, ``s·f`` for dB).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastpeft.kernels._gate import GateCase

__all__ = ["compile_gate_cases", "dora_norm_factors_fwd", "dora_row_norm_fwd"]

BLOCK_N = {16: 128, 32: 64}
"""Rows of B per program for each padded rank: the B tile and its product with G stay at 16 floats a thread."""
BLOCK_K = 64
R_MAX = 32
"""Ranks the kernel takes; at 64 its float32 G (64 x 64) and A tile spill, and larger ranks keep the torch form."""
NUM_WARPS = 4


@triton.jit(do_not_specialize=["scaling"])
def _dora_norm_kernel(
    wsq_ptr, awt_ptr, a_ptr, b_ptr, out_ptr, m_ptr, fac_ptr, fb_ptr, N, K, R,
    stride_awr, stride_awn, stride_ar, stride_ak, stride_bn, stride_br, stride_fbn, stride_fbr, scaling,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, FACTORS: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    # -- G = A·Aᵀ [R, R], float32 --
    g = tl.zeros([BLOCK_R, BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                    mask=mask_r[:, None] & (offs_k < K)[None, :], other=0.0).to(tl.float32)  # fmt: skip
        g = tl.dot(a, tl.trans(a), g, input_precision="ieee")
    # -- this tile's rows: B_n and (A·W_nᵀ) --
    mask = mask_n[:, None] & mask_r[None, :]
    b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br, mask=mask, other=0.0).to(tl.float32)
    awt = tl.load(awt_ptr + offs_r[None, :] * stride_awr + offs_n[:, None] * stride_awn, mask=mask, other=0.0)
    cross = tl.sum(b * awt.to(tl.float32), axis=1)
    low = tl.sum(tl.dot(b, g, input_precision="ieee") * b, axis=1)
    sq = tl.load(wsq_ptr + offs_n, mask=mask_n, other=0.0) + 2.0 * scaling * cross + scaling * scaling * low
    norm = tl.sqrt(tl.maximum(sq, 0.0))
    tl.store(out_ptr + offs_n, norm, mask=mask_n)
    if FACTORS:
        # -- f = m / norm (rounded as torch divides), s·f, and f ⊙ B in the op's dtype --
        mag = tl.load(m_ptr + offs_n, mask=mask_n, other=1.0).to(tl.float32)
        f = tl.math.div_rn(mag, norm)
        tl.store(fac_ptr + offs_n, f, mask=mask_n)
        tl.store(fac_ptr + N + offs_n, scaling * f, mask=mask_n)
        b_op = b.to(fb_ptr.dtype.element_ty).to(tl.float32)
        tl.store(fb_ptr + offs_n[:, None] * stride_fbn + offs_r[None, :] * stride_fbr,
                 (b_op * f[:, None]).to(fb_ptr.dtype.element_ty), mask=mask)  # fmt: skip


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def supported(lora_a: torch.Tensor) -> bool:
    """Whether ``dora_row_norm_fwd`` takes this rank (R <= ``R_MAX``); larger ranks keep the torch form."""
    return 0 < lora_a.shape[0] <= R_MAX


def dora_row_norm_fwd(
    weight_sq: torch.Tensor, a_wt: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float
) -> torch.Tensor:
    """``‖W_n + s·B_n·A‖`` ``[N]`` float32 (arguments as ``dora_row_norm_reference``; validated by the caller).

    Args:
        weight_sq: float32 ``[N]``. a_wt: ``A·Wᵀ`` ``[R, N]`` (any float dtype, any strides).
        lora_a: ``[R, K]``, R <= ``R_MAX``. lora_b: ``[N, R]`` (float dtypes). scaling: ``s``.
    """
    return _launch(weight_sq, a_wt, lora_a, lora_b, scaling, None, None)[0]


def dora_norm_factors_fwd(
    weight_sq: torch.Tensor, a_wt: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
    magnitude: torch.Tensor, dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(norm [N], F [2, N], f ⊙ B [N, R])`` in one launch (contract: ``dora_factors_reference``).

    Args:
        weight_sq, a_wt, lora_a, lora_b, scaling: as ``dora_row_norm_fwd``.
        magnitude: ``m [N]``, any float dtype, contiguous. dtype: the op's dtype, that of ``f ⊙ B``.
    """
    return _launch(weight_sq, a_wt, lora_a, lora_b, scaling, magnitude, dtype)


def _launch(weight_sq, a_wt, lora_a, lora_b, scaling, magnitude, dtype) -> tuple[torch.Tensor, ...]:
    r, k = lora_a.shape
    n = lora_b.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=weight_sq.device)
    wsq = weight_sq.float().contiguous()  # [N]: a copy only for another dtype or a strided view
    factors = magnitude is not None
    if factors:
        fac = torch.empty((2, n), dtype=torch.float32, device=out.device)
        fb = torch.empty((n, r), dtype=dtype, device=out.device)
        mag = magnitude.detach().contiguous()
    else:
        fac, fb, mag = out, out.view(n, 1), out
    block_r = _block_r(r)
    _dora_norm_kernel[(triton.cdiv(n, BLOCK_N[block_r]),)](
        wsq, a_wt, lora_a, lora_b, out, mag, fac, fb, n, k, r,
        a_wt.stride(0), a_wt.stride(1), lora_a.stride(0), lora_a.stride(1), lora_b.stride(0), lora_b.stride(1),
        fb.stride(0), fb.stride(1), float(scaling),
        BLOCK_N=BLOCK_N[block_r], BLOCK_K=BLOCK_K, BLOCK_R=block_r, FACTORS=factors, num_warps=NUM_WARPS,
    )  # fmt: skip
    return (out, fac, fb) if factors else (out,)


_FACTOR_TYPES = (("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "fp32"), ("fp32", "bf16"), ("fp32", "fp16"))
"""``(A·Wᵀ, f ⊙ B)`` dtypes of the factors launch: a 16-bit step (A·Wᵀ from the 16-bit decode kernel or base),
a float32 one, and a float32 dense base under a 16-bit op."""


def compile_gate_cases() -> list[GateCase]:
    """The norm kernel per padded rank, at a Llama-3-8B projection (N = K = 4096): A·Wᵀ in bf16 (the decode
    kernel's output) or float32 (the CPU and dense paths), A, B and m float32 (adapter parameters); with the
    factors (``FACTORS``) for each pair of ``_FACTOR_TYPES``."""
    cases = []
    variants = [(awt, None) for awt in ("bf16", "fp32")] + list(_FACTOR_TYPES)
    for (awt, fb), block_r in ((v, b) for v in variants for b in BLOCK_N):
        kind = f"dora_norm[awt={awt}," if fb is None else f"dora_norm_factors[awt={awt},fb={fb},"
        cases.append(GateCase(
            name=f"{kind}BLOCK_R={block_r}]", module=__name__, kernel="_dora_norm_kernel",
            signature={"wsq_ptr": "*fp32", "awt_ptr": f"*{awt}", "a_ptr": "*fp32", "b_ptr": "*fp32", "out_ptr": "*fp32",
                       "m_ptr": "*fp32", "fac_ptr": "*fp32", "fb_ptr": f"*{fb or 'fp32'}",
                       "N": "i32", "K": "i32", "R": "i32", "stride_awr": "i32", "stride_awn": "i32", "stride_ar": "i32",
                       "stride_ak": "i32", "stride_bn": "i32", "stride_br": "i32", "stride_fbn": "i32",
                       "stride_fbr": "i32", "scaling": "fp32"},
            constexprs={"BLOCK_N": BLOCK_N[block_r], "BLOCK_K": BLOCK_K, "BLOCK_R": block_r, "FACTORS": fb is not None},
            num_warps=NUM_WARPS,
            args={"N": 4096, "K": 4096, "R": block_r, "stride_awr": 4096, "stride_awn": 1, "stride_ar": 4096,
                  "stride_ak": 1, "stride_bn": block_r, "stride_br": 1, "stride_fbn": block_r if fb else 1,
                  "stride_fbr": 1, "scaling": 2.0},
        ))  # fmt: skip
    return cases
