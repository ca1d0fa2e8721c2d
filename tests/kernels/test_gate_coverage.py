"""The compile gate lists every kernel specialization the launchers can produce.

Each launcher is driven over the dtypes, weight kinds, ranks, bottlenecks, blocksizes and flags it
accepts with every Triton kernel replaced by a recorder (nothing runs). Each recorded launch must
match a gate case of the same kernel: the same pointer types and the same constexprs, except

- tile sizes, warps and stages: under the interpreter the launchers use small fixed tiles; on a GPU
  they come from the autotune lists and tile rules the gate iterates over itself;
- ``UNGATED``: flags that select a subset of the code of the gated variant (the gate compiles the
  superset: the costliest activation with every optional store).
"""

from __future__ import annotations

import inspect
import itertools

import pytest
import torch
from conftest import INTERPRET

from fastpeft.kernels import (
    _gate,
    adapter,
    cross_entropy,
    formats,
    lora_batched,
    lora_linear,
    lora_linear_decode,
    lora_linear_wgrad,
    nf4,
)

pytestmark = pytest.mark.skipif(not INTERPRET, reason="launches the interpreter's code path of each launcher")

TILE_KEYS = {
    "BLOCK_M",
    "BLOCK_N",
    "BLOCK_K",
    "BLOCK_P",
    "BLOCK_Q",
    "BLOCK_V",
    "GROUP_M",
    "BLOCK",
    "num_warps",
    "num_stages",
}
UNGATED = {
    "_adapter_fwd_kernel": {"ACT", "SAVE_Z"},
    "_adapter_bwd_dz_kernel": {"ACT", "ADD_DY", "COMPUTE_DH", "STORE_DW_INPUTS"},
    "_adapter_bwd_dw_kernel": {"HAS_COLSUM"},
    "_lora_wgrad_kernel": {"HAS_COLSUM"},
    # under the interpreter the decode kernel runs its table twin; GPU launches pass USE_ASM=True, as gated
    "_nf4_decode_fused_kernel": {"USE_ASM"},
    "_lora_expand_kernel": {"HAS_BIAS"},
}
KERNELS = {
    nf4: ["_nf4_quantize_kernel", "_dynamic8_quantize_kernel", "_nf4_dequantize_kernel"],
    lora_linear: ["_lora_gemm_kernel", "_lora_skinny_kernel"],
    lora_linear_wgrad: ["_lora_wgrad_kernel"],
    adapter: ["_adapter_fwd_kernel", "_adapter_bwd_dz_kernel", "_adapter_bwd_dw_kernel"],
    # the atomic _nf4_decode_kernel is the C library's (gated there); Python launches the fused form
    lora_linear_decode: ["_nf4_decode_fused_kernel", "_lora_u_kernel"],
    lora_batched: ["_lora_shrink_kernel", "_lora_expand_kernel"],
    cross_entropy: ["_cross_entropy_kernel"],
}
TRITON_TYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.uint8: "u8",
    torch.int32: "i32",
    torch.int64: "i64",
}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class _Recorder:
    """Stands in for a jit kernel: binds each launch's arguments to the kernel's parameters (a wrong
    count or a doubly given argument fails as the real launch would) and records them; runs nothing."""

    def __init__(self, name: str, fn) -> None:
        self.name, self.signature, self.launches = name, inspect.signature(fn.fn), []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            options = {k: kwargs.pop(k) for k in list(kwargs) if k not in self.signature.parameters}
            bound = self.signature.bind(*args, **kwargs)
            self.launches.append({**bound.arguments, **options})

        return launch


@pytest.fixture
def recorders(monkeypatch):
    recs = {}
    for module, names in KERNELS.items():
        for name in names:
            recs[name] = _Recorder(name, getattr(module, name))
            monkeypatch.setattr(module, name, recs[name])
    return recs


def _mismatch(case: _gate.GateCase, launch: dict) -> list[str]:
    """How ``case`` differs from the binary of ``launch`` (empty when it is that binary)."""
    out = []
    for arg, value in launch.items():
        if arg in TILE_KEYS or arg in UNGATED.get(case.kernel, ()):
            continue
        if isinstance(value, torch.Tensor):
            want = case.signature.get(arg)
            if want != f"*{TRITON_TYPES[value.dtype]}":
                out.append(f"{arg}: launched *{TRITON_TYPES[value.dtype]}, gated {want}")
        elif arg in case.options:
            if case.options[arg] != value:
                out.append(f"option {arg}: launched {value!r}, gated {case.options[arg]!r}")
        elif arg in case.constexprs:
            if case.constexprs[arg] != value:
                out.append(f"{arg}: launched {value!r}, gated {case.constexprs[arg]!r}")
        elif arg not in case.signature:
            out.append(f"{arg}: launched but not an argument, constexpr or option of the case")
    return out


def _drive_nf4() -> None:
    for dtype, bs in itertools.product(DTYPES, formats.SUPPORTED_BLOCKSIZES):
        w = torch.randn(3, 2 * bs + 5).to(dtype)
        packed, absmax = nf4.nf4_quantize(w, blocksize=bs)
        nf4.dynamic8_quantize(torch.randn(700), blocksize=bs)
        offset = torch.zeros(1)
        codes = torch.zeros_like(absmax, dtype=torch.uint8)
        nested = torch.ones(-(-absmax.numel() // 256))
        nf4.nf4_dequantize(packed, absmax, w.numel(), dtype, blocksize=bs)
        nf4.nf4_dequantize(packed, codes, w.numel(), dtype, blocksize=bs, nested_absmax=nested, offset=offset)


def _nf4_args(n: int, k: int, kind: str, bs: int) -> formats.NF4Args:
    packed = torch.zeros((n * k + 1) // 2, 1, dtype=torch.uint8)
    n_blocks = -(-n * k // bs)
    if kind == "nf4":
        return formats.NF4Args(packed, torch.ones(n_blocks), (n, k), blocksize=bs)
    codes = torch.zeros(n_blocks, dtype=torch.uint8)
    return formats.NF4Args(packed, codes, (n, k), bs, torch.ones(-(-n_blocks // 256)), torch.zeros(1))


def _drive_lora() -> None:
    k, n = 70, 33
    for dtype, kind, m, r, extras in itertools.product(
        DTYPES, ("dense", "nf4", "nf4dq"), (3, 40), (1, 20, 40, 70), ("none", "bias", "dropout")
    ):
        x, dy = torch.randn(m, k).to(dtype), torch.randn(m, n).to(dtype)
        a, b = torch.randn(r, k).to(dtype), torch.randn(n, r).to(dtype)
        weight = torch.randn(n, k).to(dtype) if kind == "dense" else None
        w4 = None if kind == "dense" else _nf4_args(n, k, kind, 64 if r != 40 else 256)
        bias = torch.randn(n).to(dtype) if extras == "bias" else None
        drop = {"dropout_mask": torch.rand(m, k) > 0.3, "dropout_p": 0.3} if extras == "dropout" else {}
        _, u = lora_linear.lora_linear_fwd(x, weight, bias, a, b, 0.5, nf4=w4, **drop)
        lora_linear.lora_linear_bwd(dy, x, weight, a, b, u, 0.5, nf4=w4, needs_dbias=bias is not None, **drop)
        if w4 is not None:
            lora_linear.nf4_linear_fwd(x, bias, w4)
            lora_linear.nf4_linear_bwd_dx(dy, w4)


def _drive_decode() -> None:
    # the NF4 forward at decode sizes: K % 64 == 0, 16-bit, M up to DECODE_M_MAX, with and without LoRA
    k, n = 128, 33
    for dtype, kind, m, r, extras in itertools.product(
        (torch.float16, torch.bfloat16), ("nf4", "nf4dq"), (1, 3, 16, 20, 40, 64), (8, 20, 40, 70),
        ("none", "bias", "dropout"),
    ):  # fmt: skip
        x = torch.randn(m, k).to(dtype)
        a, b = torch.randn(r, k).to(dtype), torch.randn(n, r).to(dtype)
        w4 = _nf4_args(n, k, kind, 64)
        bias = torch.randn(n).to(dtype) if extras == "bias" else None
        drop = {"dropout_mask": torch.rand(m, k) > 0.3, "dropout_p": 0.3} if extras == "dropout" else {}
        lora_linear.lora_linear_fwd(x, None, bias, a, b, 0.5, nf4=w4, **drop)
        lora_linear.nf4_linear_fwd(x, bias, w4)


def _drive_adapter() -> None:
    hidden = 40
    for dtype, b, act, separate, needs in itertools.product(
        DTYPES, (3, 20, 40, 100, 200, 256), adapter.ADAPTER_ACTIVATIONS, (False, True), ("both", "dh", "dw")
    ):
        h, dy = torch.randn(9, hidden).to(dtype), torch.randn(9, hidden).to(dtype)
        wd, bd = torch.randn(b, hidden).to(dtype), torch.randn(b).to(dtype)
        wu, bu = torch.randn(hidden, b).to(dtype), torch.randn(hidden).to(dtype)
        residual = torch.randn(9, hidden).to(dtype) if separate else None
        _, z = adapter.adapter_fwd(h, wd, bd, wu, bu, 0.5, act, residual, save_z=needs != "dh")
        adapter.adapter_bwd(
            dy, h, wd, wu, torch.zeros(9, b), 0.5, act,
            residual_is_separate=separate, needs_dh=needs != "dw", needs_dw=needs != "dh",
        )  # fmt: skip


def _drive_batched() -> None:
    # mixed-adapter batches: every (adapter, output) dtype pair and padded rank, with and without lora_B biases
    pairs = [(d, d) for d in DTYPES] + [(torch.float32, torch.float16), (torch.float32, torch.bfloat16)]
    for (adapter_dtype, y_dtype), r, with_bias in itertools.product(pairs, lora_batched.BATCHED_RANKS, (0, 1)):
        n, k = 2, 40
        y, x = torch.zeros(5, 24, dtype=y_dtype), torch.zeros(5, k, dtype=y_dtype)
        a, b = torch.zeros(n, r, k, dtype=adapter_dtype), torch.zeros(n, 24, r, dtype=adapter_dtype)
        bias = torch.zeros(n, 24, dtype=adapter_dtype) if with_bias else None
        lora_batched.lora_batched_delta(y, x, a, b, torch.ones(n), torch.tensor([0, 1, -1, 1, 0]), bias)
        lora_batched.lora_batched_expand(y, torch.zeros(5, r), b, torch.ones(n), torch.tensor([0, 1, -1, 1, 0]))


def _drive_cross_entropy() -> None:
    labels, scale = torch.zeros(3, dtype=torch.int64), torch.ones(3)
    for dtype, vocab in itertools.product(DTYPES, (50, 64)):  # rows that do and do not take 16-byte groups
        cross_entropy.cross_entropy_grad_(torch.zeros(3, vocab, dtype=dtype), labels, scale)
        lse, _ = cross_entropy.cross_entropy_slice_stats(torch.zeros(3, vocab, dtype=dtype), labels, 20)
        cross_entropy.cross_entropy_slice_grad_(torch.zeros(3, vocab, dtype=dtype), labels, 20, scale, lse)


def test_every_launch_is_a_gated_binary(recorders):
    _drive_nf4()
    _drive_lora()
    _drive_decode()
    _drive_adapter()
    _drive_batched()
    _drive_cross_entropy()
    cases: dict[str, list[_gate.GateCase]] = {}
    for case in _gate.all_cases():
        cases.setdefault(case.kernel, []).append(case)
    problems = set()
    for name, rec in recorders.items():
        assert rec.launches, f"{name}: the drivers above never launched it"
        for launch in rec.launches:
            reasons = [_mismatch(c, launch) for c in cases.get(name, [])]
            if not reasons:
                problems.add(f"{name}: no gate case at all")
            elif all(reasons):
                problems.add(f"{name}: no gate case; the nearest differs in {'; '.join(min(reasons, key=len))}")
    assert not problems, "launches the compile gate does not cover:\n" + "\n".join(sorted(problems)[:20])


def _rows(m: int, k: int, n: int, dtype: torch.dtype, shift: int = 0) -> dict:
    """The tiled GEMM's arguments its prune rule reads, for X [M, K], W [N, K], Y [M, N] (``shift`` elements off
    a 16-byte boundary)."""
    bufs = {p: torch.empty(numel + 8, dtype=dtype)[shift : shift + numel] for p, numel in
            (("in_ptr", m * k), ("w_ptr", n * k), ("out_ptr", m * n))}  # fmt: skip
    strides = {"stride_im": k, "stride_iq": 1, "stride_wq": 1, "stride_wp": k, "stride_om": n, "stride_op": 1}
    return {**bufs, **strides, "M": m}


def test_every_lora_gpu_config_is_gated():
    # the interpreter's launches above run fixed small tiles; on a GPU the tiles come from the autotune lists
    # (through their prune rules: row alignment, M, W kind) and the tile rules, and each must be gated
    from fastpeft.kernels import lora_linear_kernels as K

    def gated(kernel: str, ptr: str, dtype: torch.dtype, consts: dict, warps: int, stages: int) -> bool:
        return any(
            c.kernel == kernel and c.signature[ptr] == f"*{TRITON_TYPES[dtype]}" and c.num_warps == warps
            and c.num_stages == stages and all(c.constexprs.get(k) == v for k, v in consts.items())
            for c in _gate.all_cases()
        )  # fmt: skip

    missing = []
    shapes = ((8192, 4096, 4096, 0), (40, 4096, 4096, 0), (1000, 4095, 4097, 0), (1000, 4096, 4096, 1))
    for dtype in DTYPES:
        tiled = K.gemm_configs(dtype, small=False)
        picks = [(c, K._W_DENSE) for m, k, n, s in shapes for c in K._prune_tiled(tiled, _rows(m, k, n, dtype, s))]
        kinds = [K._W_DENSE] if dtype == torch.float32 else [K._W_DENSE, K._W_NF4, K._W_NF4_DQ]
        small = K.gemm_configs(dtype, small=True)
        picks += [(c, kind) for kind in kinds for c in K._prune_small(small, {"Q": 4096}, W_KIND=kind)]
        for cfg, kind in picks:
            consts = {**{k: v for k, v in cfg.kwargs.items() if k != "split_k"}, "W_KIND": kind}
            if not gated("_lora_gemm_kernel", "in_ptr", dtype, consts, cfg.num_warps, cfg.num_stages):
                missing.append(f"GEMM {dtype} {consts} warps={cfg.num_warps} stages={cfg.num_stages}")
        for m, block_r in itertools.product((1, 8192), (16, 32, 64)):
            cfg = K._skinny_config(m, interpret=False, block_r=block_r)
            consts = {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_Q": cfg["BLOCK_Q"], "BLOCK_R": block_r}
            if not gated("_lora_skinny_kernel", "in_ptr", dtype, consts, cfg["num_warps"], 3):  # Triton's default
                missing.append(f"skinny {dtype} {consts}")
            cfg = lora_linear_wgrad._wgrad_config(dtype, interpret=False)
            consts = {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_P": cfg["BLOCK_P"], "BLOCK_R": block_r}
            if not gated("_lora_wgrad_kernel", "x_ptr", dtype, consts, cfg["num_warps"], cfg["num_stages"]):
                missing.append(f"wgrad {dtype} {consts}")
    assert not missing, "GPU configurations without a gate case:\n" + "\n".join(sorted(set(missing)))


def test_a_launch_outside_the_gate_is_reported():
    # the matcher is not vacuous: a constexpr or pointer type the gate lacks is a mismatch
    case = next(c for c in _gate.all_cases() if c.kernel == "_lora_gemm_kernel")
    launch = {"in_ptr": torch.zeros(1, dtype=case_dtype(case)), **case.constexprs}
    assert _mismatch(case, launch) == []
    assert _mismatch(case, {**launch, "BLOCK_R": 128})
    assert _mismatch(case, {**launch, "in_ptr": torch.zeros(1, dtype=torch.uint8)})
    assert _mismatch(case, {**launch, "NEW_FLAG": True})


def case_dtype(case: _gate.GateCase) -> torch.dtype:
    ty = case.signature["in_ptr"].lstrip("*")
    return next(d for d, t in TRITON_TYPES.items() if t == ty)
