"""A Triton GEMM built the way Triton's matmul tutorial (python/tutorials/03-matrix-multiplication.py) builds it, so
that the cost model can be checked against the tutorial's published timings: one program per [BLOCK_M, BLOCK_N] tile
of C in grouped launch order (GROUP_M row tiles per group), the K loop loading one A and one B tile per step with the
K tail masked, one ``tl.dot`` per step into a float32 accumulator, C stored in float16. Written here from that
description (the tutorial's code is not copied); the autotune lists are the tutorial's configurations as data.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["FP8_CONFIGS", "FP16_CONFIGS", "tutorial_matmul_kernel"]

FP16_CONFIGS = (
    # (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps): the tutorial's CUDA list since 2024
    (128, 256, 64, 3, 8), (64, 256, 32, 4, 4), (128, 128, 32, 4, 4), (128, 64, 32, 4, 4),
    (64, 128, 32, 4, 4), (128, 32, 32, 4, 4), (64, 32, 32, 5, 2), (32, 64, 32, 5, 2),
)  # fmt: skip
FP8_CONFIGS = (
    # the fp8 entries added with triton-lang/triton#3546 (April 2024)
    (128, 256, 128, 3, 8), (256, 128, 128, 3, 8), (256, 64, 128, 4, 4), (64, 256, 128, 4, 4),
    (128, 128, 128, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 32, 64, 4, 4),
)  # fmt: skip


@triton.jit
def tutorial_matmul_kernel(
    a_ptr, b_ptr, c_ptr, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # C[M, N] = A[M, K]·B[K, N]; tiles visited GROUP_M rows at a time so that neighbours share A and B in L2
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows = min(tiles_m - first_m, GROUP_M)
    tile_m = first_m + (pid % per_group) % rows
    tile_n = (pid % per_group) // rows
    rm = (tile_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    rn = (tile_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    rk = tl.arange(0, BLOCK_K)
    a_tile = a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak
    b_tile = b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, tl.cdiv(K, BLOCK_K)):
        left = K - kk * BLOCK_K
        a = tl.load(a_tile, mask=rk[None, :] < left, other=0.0)
        b = tl.load(b_tile, mask=rk[:, None] < left, other=0.0)
        acc = tl.dot(a, b, acc)
        a_tile += BLOCK_K * stride_ak
        b_tile += BLOCK_K * stride_bk
    out_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    out_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c = c_ptr + out_m[:, None] * stride_cm + out_n[None, :] * stride_cn
    tl.store(c, acc.to(tl.float16), mask=(out_m[:, None] < M) & (out_n[None, :] < N))
