"""Compile-gate cases of the DoRA kernels (``kernels/dora_linear.py``): every binary its launchers run."""

from __future__ import annotations

import itertools

from fastpeft.kernels import dora_linear as dl
from fastpeft.kernels import dora_norm
from fastpeft.kernels._gate import GateCase
from fastpeft.kernels.formats import NESTED_BLOCKSIZE

__all__ = ["compile_gate_cases"]

_MODULE = "fastpeft.kernels.dora_linear"
_TY = ("fp32", "fp16", "bf16")


def compile_gate_cases() -> list[GateCase]:
    """The epilogue, column-sum and zero-magnitude kernels per dtype and flag (the last per base: dense, NF4, NF4 with
    double quantization), at the Llama-3-8B shape M = 8192, N = 4096, R = 16; the row norm's kernel
    (``kernels/dora_norm.py``)."""
    m, n, r = 8192, 4096, 16
    cases = list(dora_norm.compile_gate_cases())
    ecfg, ccfg = dl._epilogue_config(False), dl._colsum_config(False)
    for ty, has_bias in itertools.product(_TY, (False, True)):
        cases.append(GateCase(
            name=f"dora_epilogue[{ty},bias={has_bias}]", module=_MODULE, kernel="_dora_epilogue_kernel",
            signature={
                "base_ptr": f"*{ty}", "f_ptr": "*fp32", "u_ptr": f"*{ty}", "b_ptr": f"*{ty}", "bias_ptr": f"*{ty}",
                "out_ptr": f"*{ty}", "M": "i32", "N": "i32", "R": "i32",
                "stride_bm": "i32", "stride_bn": "i32", "stride_um": "i32", "stride_ur": "i32",
                "stride_lbn": "i32", "stride_lbr": "i32", "stride_om": "i32", "stride_on": "i32", "lora_scale": "fp32",
            },
            constexprs={"HAS_BIAS": has_bias, "DOT_PRECISION": "ieee" if ty == "fp32" else "tf32",
                        "BLOCK_M": ecfg["BLOCK_M"], "BLOCK_N": ecfg["BLOCK_N"], "BLOCK_R": dl.EPILOGUE_BLOCK_R},
            num_warps=ecfg["num_warps"],
            args={"M": m, "N": n, "R": r, "stride_bm": n, "stride_bn": 1, "stride_um": r, "stride_ur": 1,
                  "stride_lbn": r, "stride_lbr": 1, "stride_om": n, "stride_on": 1, "lora_scale": 0.5},
        ))  # fmt: skip
    for ty, has_bias, write_gf in itertools.product(_TY, (False, True), (False, True)):
        cases.append(GateCase(
            name=f"dora_colsum[{ty},bias={has_bias},gf={write_gf}]", module=_MODULE, kernel="_dora_colsum_kernel",
            signature={
                "g_ptr": f"*{ty}", "y_ptr": f"*{ty}", "bias_ptr": f"*{ty}", "f_ptr": "*fp32", "gf_ptr": f"*{ty}",
                "dsum_ptr": "*fp32", "dm_ptr": "*fp32", "M": "i32", "N": "i32", "rows_per_slice": "i32",
                "stride_gm": "i32", "stride_gn": "i32", "stride_ym": "i32", "stride_yn": "i32",
                "stride_fm": "i32", "stride_fn": "i32",
            },
            constexprs={"HAS_BIAS": has_bias, "WRITE_GF": write_gf,
                        "BLOCK_M": ccfg["BLOCK_M"], "BLOCK_N": ccfg["BLOCK_N"]},
            num_warps=ccfg["num_warps"],
            args={"M": m, "N": n, "rows_per_slice": 1024, "stride_gm": n, "stride_gn": 1, "stride_ym": n,
                  "stride_yn": 1, "stride_fm": n, "stride_fn": 1},
        ))  # fmt: skip
    zcfg = dl._dm_config(False)
    for ty, base in itertools.product(_TY, ("dense", "nf4", "nf4dq")):
        nf4, dq = base != "dense", base == "nf4dq"
        cases.append(GateCase(
            name=f"dora_dm[{ty},{base}]", module=_MODULE, kernel="_dora_dm_kernel",
            signature={
                "part_ptr": "*fp32", "dbias_ptr": f"*{ty}", "x_ptr": f"*{ty}", "w_ptr": "*u8" if nf4 else f"*{ty}",
                "absmax_ptr": "*u8" if dq else "*fp32",
                "nested_ptr": "*fp32", "offset_ptr": "*fp32", "code_ptr": "*fp32", "qmap_ptr": "*fp32",
                "u_ptr": f"*{ty}", "b_ptr": f"*{ty}", "dy_ptr": f"*{ty}", "m_ptr": "*fp32", "norm_ptr": "*fp32",
                "dm_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "R": "i32", "blocksize": "i32",
                "slices": "i32", "has_dbias": "i32",
                **dict.fromkeys(("stride_xm", "stride_xk", "stride_wn", "stride_wk", "stride_um", "stride_ur"), "i32"),
                **dict.fromkeys(("stride_bn", "stride_br", "stride_gm", "stride_gn"), "i32"), "lora_scale": "fp32",
            },
            constexprs={"NF4": nf4, "DOUBLE_QUANT": dq, "NESTED_BLOCKSIZE": NESTED_BLOCKSIZE,
                        "BLOCK_N": dl.DM_BLOCK_N, "BLOCK_M": zcfg["BLOCK_M"], "BLOCK_K": zcfg["BLOCK_K"],
                        "BLOCK_R": 16},
            num_warps=zcfg["num_warps"],
            args={"M": m, "N": n, "K": 4096, "R": r, "blocksize": 64 if nf4 else 1, "slices": 8, "has_dbias": 0,
                  "stride_xm": 4096,
                  "stride_xk": 1, "stride_wn": 0 if nf4 else 4096, "stride_wk": 0 if nf4 else 1, "stride_um": r,
                  "stride_ur": 1, "stride_bn": r, "stride_br": 1, "stride_gm": n, "stride_gn": 1,
                  "lora_scale": 0.5},
        ))  # fmt: skip
    return cases
