"""Mixed-adapter LoRA: each row of a batch through its own adapter, every adapter in the same two launches.

Serving many fine-tunes of one base shares the base matmul across the batch; only the low-rank update
differs per row. For ``x [M, K]``, the base output ``y [M, N]``, adapters stacked as ``A [n, R, K]``,
``B [n, N, R]`` (ranks below ``R`` zero-padded), scalings ``s [n]``, optional ``lora_B`` biases ``b [n, N]``
and a per-row adapter index ``i [M]`` (-1: the base alone)::

    u[m] = x[m]·A[i_m]ᵀ                          [R]   (rounded to the adapters' dtype, as the eager layer)
    y[m] += s[i_m]·(u[m]·B[i_m]ᵀ + b[i_m])       [N]   (float32 sum, rounded once into y's dtype)

**Plan.** Rows are grouped by adapter (a stable sort of the index, on the host: the index comes from the
caller's list of names) and cut into tiles of ``BLOCK_M`` rows of one adapter. A tile table ``[T, 3]``
(adapter, first and end position in the sorted order) and the order itself go to the device; no
launch waits for the GPU. Each tile runs tensor-core products against one adapter's weights.

**Shrink** (``_lora_shrink_kernel``, grid ``T × S``): a program gathers its tile's rows of ``x`` and
reduces ``x·Aᵀ`` over a ``1/S`` slice of K into float32 partials ``[S, M, R]``; ``S`` splits K when
there are too few tiles to fill the GPU (decode: one row per adapter). No atomics: the expand sums the
``S`` partials in a fixed order, so results do not vary run to run.

**Expand** (``_lora_expand_kernel``, grid ``T × cdiv(N, BLOCK_N)``): sums the partials, rounds ``u``
to the adapters' dtype, multiplies by its adapter's ``B`` block and adds ``s·(u·Bᵀ + b)`` into ``y`` in
place. A row belongs to exactly one tile, so the read-modify-write of ``y`` never races.

Inference only: no backward (mixed batches are a serving feature; the layer falls back to its
per-adapter loop when gradients are needed).
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from fastpeft.kernels._gate import GateCase
from fastpeft.kernels.formats import dot_precision, sm_count
from fastpeft.kernels.reference import LORA_BATCHED_RANKS, check_lora_batched_args, check_lora_batched_out
from fastpeft.kernels.rounding import cast_out

__all__ = ["BATCHED_RANKS", "compile_gate_cases", "lora_batched_delta", "lora_batched_expand", "plan_tiles"]

BATCHED_RANKS = LORA_BATCHED_RANKS
"""Padded ranks (``BLOCK_R``) the kernels are built for; a larger rank is refused."""
BLOCK_M = 16
"""Rows per tile: the smallest tensor-core M; decode batches hold few rows per adapter."""


@triton.jit
def _tile(tiles_ptr, order_ptr, t, BLOCK_M: tl.constexpr):
    """Tile ``t``'s adapter, its rows (indices into x / y) and their mask."""
    adapter = tl.load(tiles_ptr + 3 * t)
    start = tl.load(tiles_ptr + 3 * t + 1)
    end = tl.load(tiles_ptr + 3 * t + 2)
    pos = start + tl.arange(0, BLOCK_M)
    row_mask = pos < end
    rows = tl.load(order_ptr + pos, mask=row_mask, other=0).to(tl.int64)
    return adapter.to(tl.int64), rows, row_mask


@triton.jit(do_not_specialize=["M"])
def _lora_shrink_kernel(
    x_ptr, a_ptr, order_ptr, tiles_ptr, part_ptr,
    M, K, k_per_split,
    stride_xm, stride_xk, stride_aa, stride_ar, stride_ak,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """``part[s, rows] = x[rows, slice s of K]·A[adapter, :, slice s]ᵀ`` for tile ``program_id(0)``."""
    t = tl.program_id(0)
    split = tl.program_id(1)
    adapter, rows, row_mask = _tile(tiles_ptr, order_ptr, t, BLOCK_M)
    r = tl.arange(0, BLOCK_R)
    k_start = split * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K)
    a_base = a_ptr + adapter * stride_aa + r[None, :] * stride_ar
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < k_stop
        x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :] * stride_xk,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # fmt: skip
        a = tl.load(a_base + k[:, None] * stride_ak, mask=k_mask[:, None], other=0.0)
        acc = tl.dot(x.to(a.dtype), a, acc, input_precision=DOT_PRECISION)
    part = part_ptr + (split * M + rows[:, None]) * BLOCK_R + r[None, :]
    tl.store(part, acc, mask=row_mask[:, None])


@triton.jit(do_not_specialize=["M", "splits"])
def _lora_expand_kernel(
    part_ptr, b_ptr, bias_ptr, scale_ptr, order_ptr, tiles_ptr, y_ptr,
    M, N, splits,
    stride_ba, stride_bn, stride_br, stride_biasa, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """``y[rows, n-block] += s·(u·B[adapter, n-block]ᵀ + b)`` for tile ``program_id(0)``."""
    t = tl.program_id(0)
    adapter, rows, row_mask = _tile(tiles_ptr, order_ptr, t, BLOCK_M)
    r = tl.arange(0, BLOCK_R)
    u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for s in range(0, splits):
        u += tl.load(part_ptr + (s * M + rows[:, None]) * BLOCK_R + r[None, :], mask=row_mask[:, None], other=0.0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    b = tl.load(b_ptr + adapter * stride_ba + r[:, None] * stride_br + n[None, :] * stride_bn,
                mask=n_mask[None, :], other=0.0)  # fmt: skip
    d = tl.dot(cast_out(u, b.dtype), b, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        d += tl.load(bias_ptr + adapter * stride_biasa + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    scale = tl.load(scale_ptr + adapter)
    y_ptrs = y_ptr + rows[:, None] * stride_ym + n[None, :] * stride_yn
    mask = row_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, cast_out(y + scale * d, y_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------


def plan_tiles(
    adapter_index: torch.Tensor, n_adapters: int, block_m: int = BLOCK_M
) -> tuple[torch.Tensor, torch.Tensor]:
    """The row order (rows grouped by adapter, stable) and the tile table ``[T, 3]`` int32 (adapter, start,
    end positions in the order), computed on ``adapter_index``'s device (the host, in the layer). Rows with
    index -1 are in no tile."""
    index = adapter_index.to(torch.int64)
    key = torch.where(index < 0, n_adapters, index)
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=n_adapters + 1)[:n_adapters]
    seg_end = torch.cumsum(counts, 0)
    seg_start = seg_end - counts
    tiles_per = (counts + block_m - 1) // block_m
    owner = torch.repeat_interleave(torch.arange(n_adapters, device=index.device), tiles_per)
    first_tile = torch.cumsum(tiles_per, 0) - tiles_per
    local = torch.arange(owner.numel(), device=index.device) - first_tile[owner]
    start = seg_start[owner] + local * block_m
    end = torch.minimum(start + block_m, seg_end[owner])
    tiles = torch.stack([owner, start, end], dim=1).to(torch.int32).contiguous()
    return order.to(torch.int32), tiles


def _config(dtype: torch.dtype, block_r: int, interpret: bool) -> dict[str, int]:
    """Tile sizes: the interpreter's small ones; else 64-deep K steps and 64-wide N blocks for 16-bit, and for
    float32 (FMA products, operands held in registers) 32-deep / 64-wide, halved at rank 128."""
    if interpret:
        return {"BLOCK_K": 16, "BLOCK_N": 16, "num_warps": 4}
    if dtype != torch.float32:
        return {"BLOCK_K": 64, "BLOCK_N": 64, "num_warps": 4}
    return {"BLOCK_K": 32 if block_r < 128 else 16, "BLOCK_N": 64 if block_r < 128 else 32, "num_warps": 4}


def _splits(n_tiles: int, k: int, block_k: int, sms: int) -> int:
    """K slices of the shrink: enough programs for two waves over ``sms`` multiprocessors, each slice at
    least four K steps long."""
    return max(1, min(triton.cdiv(2 * sms, max(n_tiles, 1)), k // (4 * block_k)))


def lora_batched_delta(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor,
    adapter_index: torch.Tensor,
    bias: torch.Tensor | None = None,
    plan: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Add each row's LoRA update into ``y`` in place (see the module docstring); returns ``y``.

    Args:
        y: ``[M, N]`` the base output, float32/float16/bfloat16, updated in place.
        x: ``[M, K]`` the input, any float dtype and strides (cast to the adapters' dtype on load).
        lora_a: ``[n, R, K]`` stacked ``lora_A`` weights, R one of ``BATCHED_RANKS`` (zero-padded).
        lora_b: ``[n, N, R]`` stacked ``lora_B`` weights, lora_a's dtype.
        scales: ``[n]`` float32 scalings. adapter_index: ``[M]`` integer, in ``[-1, n)``, on any device (the
            host is cheapest: the plan is computed where it lives). bias: ``[n, N]`` ``lora_B`` biases or None.
        plan: ``plan_tiles(adapter_index, n)`` already on x's device, shared by every layer of one forward
            (the caller vouches for ``adapter_index``, whose range is then not checked again).
    """
    check_lora_batched_args(y, x, lora_a, lora_b, scales, adapter_index, bias, ranks=BATCHED_RANKS,
                            check_index=plan is None)  # fmt: skip
    x = x if x.stride(1) == 1 else x.contiguous()  # unit-stride rows: the binary the gate checks
    m, k = x.shape
    n_adapters, block_r = lora_a.shape[0], lora_a.shape[1]
    order, tiles = plan if plan is not None else plan_tiles(adapter_index, n_adapters)
    n_tiles = tiles.shape[0]
    if n_tiles == 0:
        return y
    order, tiles = order.to(x.device), tiles.to(x.device)  # no copy when the plan is there already
    interpret = x.device.type != "cuda"
    cfg = _config(lora_a.dtype, block_r, interpret)
    splits = _splits(n_tiles, k, cfg["BLOCK_K"], sm_count(x.device))
    k_per_split = cfg["BLOCK_K"] * triton.cdiv(triton.cdiv(k, cfg["BLOCK_K"]), splits)
    splits = triton.cdiv(k, k_per_split)
    part = torch.empty((splits, m, block_r), dtype=torch.float32, device=x.device)
    _lora_shrink_kernel[(n_tiles, splits)](
        x, lora_a, order, tiles, part, m, k, k_per_split,
        x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
        BLOCK_M=BLOCK_M, BLOCK_R=block_r, BLOCK_K=cfg["BLOCK_K"], DOT_PRECISION=dot_precision(lora_a.dtype),
        num_warps=cfg["num_warps"],
    )  # fmt: skip
    _expand(y, part, lora_b, scales, bias, order, tiles, cfg)
    return y


def _expand(y, part, lora_b, scales, bias, order, tiles, cfg) -> None:
    """The expand launch: ``part [S, M, R]`` float32 partials of u summed, then every tile's update into y."""
    bias_arg = bias if bias is not None else lora_b  # unread; B's dtype keeps the pointer type (the binary)
    n_out, block_r = y.shape[1], lora_b.shape[2]
    _lora_expand_kernel[(tiles.shape[0], triton.cdiv(n_out, cfg["BLOCK_N"]))](
        part, lora_b, bias_arg, scales, order, tiles, y, y.shape[0], n_out, part.shape[0],
        lora_b.stride(0), lora_b.stride(1), lora_b.stride(2), bias.stride(0) if bias is not None else 0,
        y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M, BLOCK_N=cfg["BLOCK_N"], BLOCK_R=block_r,
        DOT_PRECISION=dot_precision(lora_b.dtype), num_warps=cfg["num_warps"],
    )  # fmt: skip


def lora_batched_expand(
    y: torch.Tensor,
    u: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor,
    adapter_index: torch.Tensor,
    bias: torch.Tensor | None = None,
    plan: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``lora_batched_delta`` from a given ``u [M, R]`` float32 (LoRA on an embedding: u is the gathered rows
    of A, no shrink needed): the expand launch alone. Arguments otherwise as ``lora_batched_delta``."""
    check_lora_batched_out(y, u.shape[0], lora_b, scales, adapter_index, bias, (lora_b.shape[0], u.shape[1]),
                           BATCHED_RANKS, check_index=plan is None)  # fmt: skip
    if u.dtype != torch.float32 or u.device != y.device:
        raise ValueError(f"u must be float32 on y's device, got {u.dtype} on {u.device}")
    order, tiles = plan if plan is not None else plan_tiles(adapter_index, lora_b.shape[0])
    if tiles.shape[0] == 0:
        return y
    cfg = _config(lora_b.dtype, lora_b.shape[2], y.device.type != "cuda")
    _expand(y, u.contiguous().unsqueeze(0), lora_b, scales, bias, order.to(y.device), tiles.to(y.device), cfg)
    return y


# ----------------------------------------------------------------------------------------------
# compile gate
# ----------------------------------------------------------------------------------------------

_GATE_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def compile_gate_cases() -> list[GateCase]:
    """Both kernels for every adapter dtype and padded rank, as the GPU launcher runs them: hidden 4096,
    256 rows, contiguous tensors; ``x`` and ``y`` in the adapters' dtype, or 16-bit with float32 adapters.
    16-bit cases must run their products on tensor cores (HMMA on both archs: 16-row tiles are below wgmma's 64)."""
    m, hidden = 256, 4096
    cases = []
    combos = [(d, d) for d in _GATE_TYPES] + [(torch.float32, torch.bfloat16), (torch.float32, torch.float16)]
    for (dtype, y_dtype), block_r in itertools.product(combos, BATCHED_RANKS):
        cfg = _config(dtype, block_r, interpret=False)
        ty, y_ty, mma, prec = _GATE_TYPES[dtype], _GATE_TYPES[y_dtype], dtype != torch.float32, dot_precision(dtype)
        launch = {"num_warps": cfg["num_warps"], "tensor_cores": mma, "warpgroup_mma": False}
        cases.append(
            GateCase(
                f"lora_shrink[{ty},x={y_ty},BLOCK_R={block_r}]", __name__, "_lora_shrink_kernel",
                {"x_ptr": f"*{y_ty}", "a_ptr": f"*{ty}", "order_ptr": "*i32", "tiles_ptr": "*i32",
                 "part_ptr": "*fp32", "M": "i32", "K": "i32", "k_per_split": "i32", "stride_xm": "i32",
                 "stride_xk": "i32", "stride_aa": "i32", "stride_ar": "i32", "stride_ak": "i32"},
                {"BLOCK_M": BLOCK_M, "BLOCK_R": block_r, "BLOCK_K": cfg["BLOCK_K"], "DOT_PRECISION": prec},
                args={"M": m, "K": hidden, "k_per_split": hidden, "stride_xm": hidden, "stride_xk": 1,
                      "stride_aa": block_r * hidden, "stride_ar": hidden, "stride_ak": 1},
                **launch,
            )
        )  # fmt: skip
        cases.append(
            GateCase(
                f"lora_expand[{ty},y={y_ty},BLOCK_R={block_r}]", __name__, "_lora_expand_kernel",
                {"part_ptr": "*fp32", "b_ptr": f"*{ty}", "bias_ptr": f"*{ty}", "scale_ptr": "*fp32",
                 "order_ptr": "*i32", "tiles_ptr": "*i32", "y_ptr": f"*{y_ty}", "M": "i32", "N": "i32",
                 "splits": "i32", "stride_ba": "i32", "stride_bn": "i32", "stride_br": "i32",
                 "stride_biasa": "i32", "stride_ym": "i32", "stride_yn": "i32"},
                {"HAS_BIAS": True, "BLOCK_M": BLOCK_M, "BLOCK_N": cfg["BLOCK_N"], "BLOCK_R": block_r,
                 "DOT_PRECISION": prec},
                args={"M": m, "N": hidden, "splits": 2, "stride_ba": hidden * block_r, "stride_bn": block_r,
                      "stride_br": 1, "stride_biasa": hidden, "stride_ym": hidden, "stride_yn": 1},
                **launch,
            )
        )  # fmt: skip
    return cases
