"""Compile-gate cases of the decode kernels (``kernels/lora_linear_decode.py``): every binary its launcher runs."""

from __future__ import annotations

import torch

from fastpeft.kernels._gate import GateCase
from fastpeft.kernels.formats import NESTED_BLOCKSIZE
from fastpeft.kernels.lora_linear_decode import BLOCK_K, BLOCK_N, NUM_WARPS, PREFETCH, _block_r

__all__ = ["compile_gate_cases"]

_MODULE = "fastpeft.kernels.lora_linear_decode"


def _gate_case(
    dtype: torch.dtype, dq: bool, block_m: int, m: int, n: int = 4096, k: int = 4096, fused: bool = True,
    fold_r: int = 0,
) -> GateCase:  # fmt: skip
    # fold_r: the rank of a one-launch forward (FOLD_U, BLOCK_R = its padded rank), 0 for a given U
    ty = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    out = {"ws_ptr": "*fp32", "counter_ptr": "*i32", "out_ptr": f"*{ty}"} if fused else {"out_ptr": "*fp32"}
    scale = {"scale_ptr": "*fp32", "norm_ptr": "*fp32", "a_ptr": f"*{ty}"} if fused else {}
    a_strides = ("stride_ar", "stride_ak") if fused else ()
    signature = {
        "x_ptr": f"*{ty}", "w_ptr": "*i32", "absmax_ptr": "*u8" if dq else "*fp32", "qmap_ptr": "*fp32",
        "nested_ptr": "*fp32", "offset_ptr": "*fp32", "table_ptr": "*i32", "bias_ptr": f"*{ty}", **scale,
        "u_ptr": f"*{ty}", "b_ptr": f"*{ty}", **out,
        **dict.fromkeys(("M", "N", "K", "R", "blocksize_shift"), "i32"),
        **dict.fromkeys(("stride_xm", "stride_xk", *a_strides, "stride_um", "stride_ur", "stride_bn", "stride_br",
                         "stride_om", "stride_on"), "i32"),
        "lora_scale": "fp32", "has_bias": "i32", **({"has_scale": "i32"} if fused else {}), "split_k": "i32",
    }  # fmt: skip
    shape = "" if (n, k) == (4096, 4096) else f",{n}x{k}"
    fold = f",fold_R={fold_r}" if fold_r else ""
    consts = {"DOUBLE_QUANT": dq, "NESTED_BLOCKSIZE": NESTED_BLOCKSIZE, "USE_ASM": True}
    if fused:
        consts["PREFETCH"] = PREFETCH
        consts["FOLD_U"] = bool(fold_r)
    block_r = _block_r(fold_r) if fold_r else 16
    r = fold_r or 16
    return GateCase(
        name=f"nf4_decode{'_fused' if fused else ''}[{ty},{'nf4dq' if dq else 'nf4'},BLOCK_M={block_m},M={m}{shape}"
        f"{fold}]",
        module=_MODULE,
        kernel="_nf4_decode_fused_kernel" if fused else "_nf4_decode_kernel",
        signature=signature,
        constexprs={**consts, "BLOCK_N": BLOCK_N, "BLOCK_K": BLOCK_K, "BLOCK_M": block_m, "BLOCK_R": block_r},
        num_warps=NUM_WARPS,
        num_stages=1,
        tensor_cores=True,
        args={
            "M": m,
            "N": n,
            "K": k,
            "R": r,
            "blocksize_shift": 6,
            "stride_xm": k,
            "stride_xk": 1,
            **({"stride_ar": k, "stride_ak": 1} if fused else {}),
            "stride_um": r,
            "stride_ur": 1,
            "stride_bn": r,
            "stride_br": 1,
            "stride_om": n,
            "stride_on": 1,
            "lora_scale": 2.0,
            "has_bias": 1,
            **({"has_scale": 1} if fused else {}),
            "split_k": 8,
        },  # fmt: skip
        path="decode",
        weights_per_iteration=BLOCK_N * BLOCK_K,
        bytes_per_weight=0.5 + (1.0 if dq else 4.0) / 64,
    )


def _u_gate_case(dtype: torch.dtype, block_m: int, m: int, block_r: int, k: int = 4096) -> GateCase:
    ty = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    r = block_r
    signature = {
        "x_ptr": f"*{ty}", "a_ptr": f"*{ty}", "keep_ptr": "*u8", "ws_ptr": "*fp32", "counter_ptr": "*i32",
        "u_ptr": f"*{ty}", **dict.fromkeys(("M", "K", "R"), "i32"),
        **dict.fromkeys(("stride_xm", "stride_xk", "stride_ar", "stride_ak", "stride_km", "stride_kk", "stride_um",
                         "stride_ur"), "i32"),
        "scale": "fp32", "has_mask": "i32", "split_k": "i32",
    }  # fmt: skip
    return GateCase(
        name=f"lora_u[{ty},BLOCK_M={block_m},M={m},BLOCK_R={block_r}]",
        module=_MODULE,
        kernel="_lora_u_kernel",
        signature=signature,
        constexprs={"BLOCK_M": block_m, "BLOCK_K": BLOCK_K, "BLOCK_R": block_r},
        num_warps=NUM_WARPS,
        tensor_cores=True,
        warpgroup_mma=block_m >= 64,
        args={
            "M": m,
            "K": k,
            "R": r,
            "stride_xm": k,
            "stride_xk": 1,
            "stride_ar": k,
            "stride_ak": 1,
            "stride_km": k,
            "stride_kk": 1,
            "stride_um": r,
            "stride_ur": 1,
            "scale": 1.0,
            "has_mask": 0,
            "split_k": 8,
        },  # fmt: skip
    )


def compile_gate_cases() -> list[GateCase]:
    """The decode kernel per 16-bit dtype x plain / double-quantized absmax x each ``BLOCK_M`` the launcher
    picks, at the Llama-3-8B 4096 x 4096 projection (M = 1 compiles its own binary: Triton makes an int equal
    to 1 a constant), plus one unaligned shape; the same for the C library's atomic form (``_nf4_decode_kernel``);
    the U kernel per dtype x ``BLOCK_M`` x ``BLOCK_R``."""
    cases = []
    for fused in (True, False):
        for dtype in (torch.float16, torch.bfloat16):
            for dq in (False, True):
                for block_m, m in ((16, 1), (16, 16), (32, 32), (64, 64)):
                    cases.append(_gate_case(dtype, dq, block_m, m, fused=fused))
        cases.append(_gate_case(torch.bfloat16, True, 16, 5, n=4097, k=4160, fused=fused))
    # the one-launch form: BLOCK_M = 16 (M = 1 and M = 2-16) x every padded rank
    for dtype in (torch.float16, torch.bfloat16):
        for dq in (False, True):
            for m in (1, 16):
                for fold_r in (16, 32, 64):
                    cases.append(_gate_case(dtype, dq, 16, m, fold_r=fold_r))
    cases.append(_gate_case(torch.bfloat16, True, 16, 5, n=4097, k=4160, fold_r=16))
    for dtype in (torch.float16, torch.bfloat16):
        for block_m, m in ((16, 1), (16, 16), (32, 32), (64, 64)):
            for block_r in (16, 32, 64):
                cases.append(_u_gate_case(dtype, block_m, m, block_r))
    return cases
