"""Compile-gate cases of the fused LoRA linear's GEMM and skinny kernels (``lora_linear_kernels``).

Each case is one binary the launchers in ``lora_linear.py`` produce: a configuration of the autotune lists or
tile rules of ``lora_linear_kernels``, built with the runtime arguments the launcher passes for a Llama-3-8B
4096 x 4096 projection at rank 16, so the gate specializes it as Triton's binder does at launch (see
``_gate``). The weight-gradient kernel's cases are in ``lora_linear_wgrad``.
"""

from __future__ import annotations

import torch
import triton

from fastpeft.kernels import lora_linear_kernels as kernels
from fastpeft.kernels._gate import GateCase
from fastpeft.kernels.formats import NESTED_BLOCKSIZE, dot_precision
from fastpeft.kernels.lora_linear_kernels import (
    _TILED_UNALIGNED,
    _W_DENSE,
    _W_NF4,
    _W_NF4_DQ,
    GEMM_BLOCK_R,
    SMALL_M_MAX,
    _skinny_config,
    gemm_configs,
)

__all__ = ["compile_gate_cases"]

_GATE_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_GATE_BLOCK_R = (16, 32, 64)  # every value _block_r returns
_GATE_W = {"dense": _W_DENSE, "nf4": _W_NF4, "nf4dq": _W_NF4_DQ}
# the representative shape every case is built for: a Llama-3-8B 4096 x 4096 projection at rank 16, NF4
# blocksize 64; M = 8192 on the tiled path, M = 1 and 16 on the small one (an int equal to 1 compiles its
# own binary: Triton's binder makes it a constant)
_GATE_K = _GATE_N = 4096
_GATE_R = 16
_GATE_M_TILED = 8192
_GATE_M_SMALL = (1, 16)
_GATE_BLOCKSIZE_SHIFT = 6
_GATE_SCALE = 2.0  # lora_alpha 32 / r 16
_GATE_DROPOUT_SCALE = 2.0 / 0.95  # the same, over 1 - lora_dropout for dX


_GATE_UNALIGNED = (1000, ",M=1000,N=4097,K=4095", 4097, 4095)  # M, name suffix, N, K: no 16-byte rows


def _small_config(dtype: torch.dtype, w: str) -> triton.Config:
    """The small-M config ``_prune_small`` keeps for ``w`` (the split count is a runtime argument)."""
    configs = gemm_configs(dtype, small=True)
    stages = {c.num_stages for c in configs}
    want = min(stages) if w != "dense" else max(stages)
    return next(c for c in configs if c.num_stages == want)


def _gemm_gate_args(direction: str, w: str, m: int, n: int = _GATE_N, k: int = _GATE_K) -> dict[str, int | float]:
    """The runtime arguments ``lora_linear``'s ``_gemm`` passes for contiguous operands: forward ``Y = X·Wᵀ +
    s·U·Bᵀ`` (U in x's dtype, no mask, no bias: Llama's projections have none), dX ``dY·W + s/(1-p)·D ⊙
    (G·A)`` with the dropout mask of training."""
    p, q = (n, k) if direction == "fwd" else (k, n)
    fwd = direction == "fwd"
    return {
        "M": m, "P": p, "Q": q, "R": _GATE_R, "m_bucket": triton.next_power_of_2(m),
        # dense launches pass the 16-entry codebook placeholder as absmax: n_blocks is its size
        "n_blocks": 16 if w == "dense" else n * k >> _GATE_BLOCKSIZE_SHIFT,
        "blocksize_shift": 0 if w == "dense" else _GATE_BLOCKSIZE_SHIFT,
        "stride_im": q, "stride_iq": 1,
        # W [N, K] row-major (dense or NF4's flat index) read as Wt[q, p]
        "stride_wq": 1 if fwd else k, "stride_wp": k if fwd else 1,
        "stride_lm": _GATE_R, "stride_lr": 1,
        # Rt[r, n] = B[n, r] forward, Rt[r, k] = A[r, k] for dX
        "stride_rr": 1 if fwd else k, "stride_rp": _GATE_R if fwd else 1,
        "stride_km": 0 if fwd else k, "stride_kp": 0 if fwd else 1,
        "stride_om": p, "stride_op": 1,
        "lora_scale": _GATE_SCALE if fwd else _GATE_DROPOUT_SCALE, "has_bias": 0, "has_mask": int(not fwd),
        "split_k": 1 if m > SMALL_M_MAX else 4,
    }  # fmt: skip


def _gemm_gate_case(
    direction: str, dtype: torch.dtype, w: str, cfg: triton.Config, m: int, suffix: str = "", *shape: int
) -> GateCase:
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
        name=f"lora_gemm_{direction}[{ty},{w},{tile},R={GEMM_BLOCK_R}{suffix}]",
        module=kernels.__name__,
        kernel="_lora_gemm_kernel",
        signature=signature,
        constexprs={
            "W_KIND": kind,
            "W_T": direction == "dx",
            "NESTED_BLOCKSIZE": NESTED_BLOCKSIZE,
            "LORA_SPLIT": direction == "dx" and dtype != torch.float32,
            "ATOMIC_OUT": small,
            "DOT_PRECISION": dot_precision(dtype),
            "BLOCK_R": GEMM_BLOCK_R,
            **blocks,
        },
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        # the 16-row split-K tile is below a warpgroup MMA's 64 rows: it runs HMMA on both archs
        tensor_cores=not small and dtype != torch.float32,
        args=_gemm_gate_args(direction, w, m, *shape),
        path="small" if small else "tiled",
        weights_per_iteration=blocks["BLOCK_P"] * blocks["BLOCK_Q"],
        # NF4: half a byte per weight plus its block's absmax (float32, or one byte under double quantization,
        # whose nested float32 per 256 blocks is noise)
        bytes_per_weight={"dense": dtype.itemsize, "nf4": 0.5 + 4 / 64, "nf4dq": 0.5 + 1 / 64 + 4 / 64 / 256}[w],
    )


def _skinny_gate_case(dtype: torch.dtype, m: int, block_r: int, product: str) -> GateCase:
    """``U = drop(X)·Aᵀ`` (``product`` "U", the forward, with the dropout mask of training past small M) or
    ``G = dY·B`` ("G", the backward) at the representative shape, rank ``block_r``."""
    ty = _GATE_TYPES[dtype]
    cfg = _skinny_config(m, interpret=False, block_r=block_r)
    u = product == "U"
    mask = u and m > SMALL_M_MAX  # decode-size forwards are inference: no dropout
    args = {
        "M": m, "Q": _GATE_K, "R": block_r, "stride_im": _GATE_K, "stride_iq": 1,
        # MAT[k, r] = A[r, k] for U, MAT[n, r] = B[n, r] for G
        "stride_mq": 1 if u else block_r, "stride_mr": _GATE_K if u else 1,
        "stride_km": _GATE_K if mask else 0, "stride_kq": 1 if mask else 0,
        "scale": 1 / 0.95 if mask else 1.0, "has_mask": int(mask), "split_k": 1 if m > SMALL_M_MAX else 8,
    }  # fmt: skip
    suffix = "" if u else ",G"
    return GateCase(
        name=f"lora_skinny[{ty},BLOCK_M={cfg['BLOCK_M']},BLOCK_R={block_r}{suffix}]",
        module=kernels.__name__,
        kernel="_lora_skinny_kernel",
        signature={
            "in_ptr": f"*{ty}",
            "mat_ptr": f"*{ty}",
            "keep_ptr": "*u8",
            "out_ptr": "*fp32",
            **dict.fromkeys(("M", "Q", "R", "stride_im", "stride_iq", "stride_mq", "stride_mr"), "i32"),
            **dict.fromkeys(("stride_km", "stride_kq"), "i32"),
            "scale": "fp32",
            "has_mask": "i32",
            "split_k": "i32",
        },
        constexprs={
            "DOT_PRECISION": dot_precision(dtype),
            "BLOCK_M": cfg["BLOCK_M"],
            "BLOCK_Q": cfg["BLOCK_Q"],
            "BLOCK_R": block_r,
        },
        num_warps=cfg["num_warps"],
        tensor_cores=cfg["BLOCK_M"] >= 64 and dtype != torch.float32,
        args=args,
    )


def compile_gate_cases() -> list[GateCase]:
    """Every configuration of ``lora_linear_kernels``' GEMM and skinny kernels the launchers ship, for float16,
    bfloat16 and float32, each built with the runtime arguments of a Llama-3-8B 4096 x 4096 projection, R = 16.

    GEMM, forward and dX. Tiled path (M = 8192): each aligned-row config of the tiled list of the input dtype,
    dense W only (an NF4 base at these sizes is dequantized once and read dense), plus the unaligned shape
    M = 1000, N = 4097, K = 4095 (no divisibility hints) on the tile the alignment rule gives it. Small split-K
    path (M = 1 and M = 16; the split count is a runtime argument): dense for every dtype, NF4 and NF4 with
    double quantization for 16-bit inputs (float32 NF4 is dequantized once), each on the config
    ``_prune_small`` keeps for it. The LoRA rank step is ``GEMM_BLOCK_R``; the NF4 blocksize, bias and
    dropout mask are runtime arguments, not variants. The base-only launchers run these same binaries with
    R = 0. Skinny kernel: its rule-picked tiles x every ``BLOCK_R``, for ``U = drop(X)·Aᵀ`` (M = 1 on the
    small tile, M = 8192 with dropout on the large one) and ``G = dY·B`` (M = 16 and 8192). 16-bit tiles of 64
    rows or more must run on tensor cores; float32 runs IEEE dots on the FMA units.
    """
    cases = []
    for direction in ("fwd", "dx"):
        for dtype in _GATE_TYPES:
            tiled = gemm_configs(dtype, small=False)
            for cfg in tiled:
                if cfg is not _TILED_UNALIGNED:
                    cases.append(_gemm_gate_case(direction, dtype, "dense", cfg, _GATE_M_TILED))
            # the unaligned shape, on the config the alignment rule gives it
            unaligned = _TILED_UNALIGNED if _TILED_UNALIGNED in tiled else tiled[0]
            cases.append(_gemm_gate_case(direction, dtype, "dense", unaligned, *_GATE_UNALIGNED))
            for w in _GATE_W if dtype != torch.float32 else ["dense"]:
                cfg = _small_config(dtype, w)
                for m in _GATE_M_SMALL:
                    cases.append(_gemm_gate_case(direction, dtype, w, cfg, m, f",M={m}"))
    for dtype in _GATE_TYPES:
        for block_r in _GATE_BLOCK_R:
            cases += [_skinny_gate_case(dtype, 1, block_r, "U"), _skinny_gate_case(dtype, 16, block_r, "G")]
            cases += [_skinny_gate_case(dtype, m, block_r, p) for m, p in ((_GATE_M_TILED, "U"), (_GATE_M_TILED, "G"))]
    return cases
