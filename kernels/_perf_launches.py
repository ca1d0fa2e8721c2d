"""fastpeft's kernels as the launchers run them, for the cost model (kernels/_perf.py), and the report.

Each function turns a call (shapes, M, rank) into the ``Launch`` list the launcher issues: the compile gate's binary
for the configuration it picks (built, or read from the gate's cache), the grid it computes (split-K, persistent
grids), the iterations each CTA runs, and the HBM bytes. ``report()`` predicts the Llama-3-8B table::

    python -m fastpeft.kernels._perf --report [--arch 90] [--markdown FILE]
"""

from __future__ import annotations

import functools
import gzip
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from fastpeft.kernels import _gate, _perf
from fastpeft.kernels import lora_linear_decode as _decode

__all__ = [
    "LLAMA3_8B",
    "OpPrediction",
    "cross_entropy_op",
    "cublas_gemm",
    "cublas_lora_op",
    "qlora_step",
    "decode_op",
    "dequantize_op",
    "format_report",
    "report",
    "tiled_gemm_op",
]

LLAMA3_8B = ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336))
"""Weights ``[N, K]`` of Llama-3-8B's projections: q/o, k/v, gate/up, down."""
LLAMA3_VOCAB = 128_256
TARGET_PROGRAMS_PER_SM = 2
"""The launchers' ``_target_programs``: two programs per SM (the U kernel's split-K stops there)."""


@functools.cache
def _cases() -> dict[str, _gate.GateCase]:
    return {c.name: c for c in _gate.all_cases()}


_REPORTS: dict[tuple[str, int], _gate.GateReport] = {}

REPORT_CASES = (
    *(f"nf4_decode_fused[bf16,nf4dq,BLOCK_M={bm},M={m}]" for bm, m in ((16, 1), (16, 16), (32, 32), (64, 64))),
    *(f"nf4_decode_fused[bf16,nf4dq,BLOCK_M=16,M={m},fold_R=16]" for m in (1, 16)),
    *(f"lora_u[bf16,BLOCK_M={bm},M={m},BLOCK_R=16]" for bm, m in ((16, 1), (16, 16), (32, 32), (64, 64))),
    "nf4_dequantize[bf16,double_quant=True]", "lora_gemm_fwd[bf16,dense,128x128x64,R=16]",
    "lora_gemm_fwd[bf16,dense,64x128x64,R=16]", "cross_entropy[bf16]",
)  # fmt: skip
"""The gate cases the report reads (built together, in child processes, the first time one is asked for)."""


def gate_report(case_name: str, arch: int = 90) -> _gate.GateReport:
    """The compile gate's record of a case, built through the gate (its cache makes a rebuild free). Under Triton's
    interpreter (the test suite) the build runs in the gate's child processes, every report case at once."""
    key = (case_name, arch)
    if key not in _REPORTS:
        names = [case_name, *(n for n in REPORT_CASES if (n, arch) not in _REPORTS and n != case_name)]
        cases = [_cases()[n] for n in names]
        if os.environ.get("TRITON_INTERPRET") == "1":
            reports = _gate.run_gate(cases, (arch,), jobs=min(len(cases), os.cpu_count() or 1))
        else:
            reports = [_gate.build(c, arch) for c in cases[:1]]
        _REPORTS.update({(r.case, r.arch): r for r in reports})
    rep = _REPORTS[key]
    if rep.error:
        raise RuntimeError(f"{case_name} sm_{arch}: {rep.error}")
    return rep


@functools.cache
def profile(case_name: str, arch: int = 90) -> _perf.Profile:
    """The model's profile of a gate case."""
    rep = gate_report(case_name, arch)
    sass = gzip.decompress((Path(rep.artifacts) / "kernel.sass.gz").read_bytes()).decode()
    case = _cases()[case_name]
    return _perf.profile_from_sass(sass, rep.kernel, arch, case.num_warps, rep.shared_bytes, source=case_name)


@dataclass
class OpPrediction:
    """One call: its launches' predictions and the totals."""

    name: str
    launches: list[_perf.Prediction]
    seconds: float
    graph_seconds: float
    hbm_bytes: float
    hbm_fraction: float
    """Bytes at the achievable bandwidth / predicted time (launch overhead included)."""
    binding: str
    issue_bound_seconds: float | None = None
    """The first model's figure for the main kernel (weights / issue-bound weights per second), for comparison."""


def _elementwise(name: str, nbytes: float, m: _perf.Machine) -> _perf.Prediction:
    """A torch fill or cast in this model: one DRAM round trip and the bytes at the achievable bandwidth."""
    body = _perf.streaming_time(nbytes, m=m, launches=0)
    return _perf.Prediction(
        name, body + m.launch_s, body + m.graph_launch_s, body, {"hbm": nbytes / m.hbm_bytes_per_s, "latency": body},
        "launch", 0, "-", 0.0, 0, 0, nbytes / m.hbm_bytes_per_s / body, 0.0, 0.0, m.dram_latency_s,
    )  # fmt: skip


def _total(name: str, preds: list[_perf.Prediction], hbm: float, m: _perf.Machine, issue=None) -> OpPrediction:
    seconds = sum(p.seconds for p in preds)
    graph = sum(p.graph_seconds for p in preds)
    main = max(preds, key=lambda p: p.kernel_seconds)
    launch_share = sum(p.seconds - p.kernel_seconds for p in preds) / seconds
    binding = f"{main.binding} ({main.name})" if launch_share < 0.5 else "launches"
    return OpPrediction(name, preds, seconds, graph, hbm, hbm / m.hbm_bytes_per_s / seconds, binding, issue)


# ------------------------------------------------------------------------------------------------
# the decode kernel (NF4 + LoRA forward, M <= 64)
# ------------------------------------------------------------------------------------------------


def decode_case(m_rows: int, dtype: str = "bf16", dq: bool = True, fold_r: int = 0) -> str:
    """The gate case of the binary the decode launcher runs for ``m_rows`` rows (M = 1 is its own binary); with
    ``fold_r`` the one-launch form at that rank (U accumulated in the loop)."""
    block_m, m_case = (16, 1) if m_rows == 1 else (16, 16) if m_rows <= 16 else (32, 32) if m_rows <= 32 else (64, 64)
    fold = f",fold_R={_decode._block_r(fold_r)}" if fold_r else ""
    return f"nf4_decode_fused[{dtype},{'nf4dq' if dq else 'nf4'},BLOCK_M={block_m},M={m_case}{fold}]"


def u_case(m_rows: int, r: int, dtype: str = "bf16") -> str:
    """The gate case of the U kernel the decode path runs first."""
    block_m, m_case = (16, 1) if m_rows == 1 else (16, 16) if m_rows <= 16 else (32, 32) if m_rows <= 32 else (64, 64)
    return f"lora_u[{dtype},BLOCK_M={block_m},M={m_case},BLOCK_R={min(64, max(16, 1 << (r - 1).bit_length()))}]"


def decode_split(n: int, k: int, sms: int, m_rows: int = 1, fold: bool = False, arch: int = 90) -> tuple[int, int, int]:
    """``(tiles, split, per_split)`` as ``nf4_decode_fwd`` computes them (BLOCK_N 128, BLOCK_K 64)."""
    tiles, steps = math.ceil(n / 128), k // 64
    split = _decode.decode_split(steps, tiles, sms, max(16, 1 << (m_rows - 1).bit_length()), fold, arch, n)
    return tiles, split, math.ceil(steps / split)


def decode_fold(m_rows: int, r: int) -> bool:
    """Whether a call without dropout runs as the one-launch form (U summed in the decode loop)."""
    return _decode.fold_u_supported(m_rows, r, False)


def decode_launch(
    n: int, k: int, m_rows: int, r: int = 16, arch: int = 90, split: int | None = None, fold: bool = False
) -> _perf.Launch:
    """The decode kernel's launch: grid (tiles, split); CTA ``i`` is tile ``i % tiles`` of K slice ``i // tiles``,
    running ``min(per_split, steps - slice·per_split)`` iterations (0 for the empty slices the rounding leaves).
    Given U, the LoRA term's rank steps run in slice 0 of each tile; with ``fold`` every slice accumulates its share
    of U = X·Aᵀ in the main loop (A's block read from L2 beside W's) and adds its B·Uᵀ once, with no rank loop.
    Packed W and its absmax stream once (loads marked evict-first); the float32 workspace tile is added into by every
    slice (L2 atomics), read and cleared by the last, and the output written once in bf16."""
    m = _perf.machine(arch)
    tiles, auto_split, _ = decode_split(n, k, m.sms, m_rows, fold, arch)
    split = split or auto_split
    steps = k // 64
    per_split = math.ceil(steps / split)

    def trips(i: int) -> tuple[int, ...]:
        kslice = i // tiles
        iters = max(0, min(per_split, steps - kslice * per_split))
        return (iters,) if fold else (iters, math.ceil(r / 16) if kslice == 0 else 0)

    weights = n * k
    workspace = 2 * m_rows * n * 4 if split > 1 else 0
    hbm = weights / 2 + weights / 64 + weights / 64 / 256 * 4 + m_rows * k * 2 + m_rows * n * 2 + workspace
    hbm += (r * k + n * r) * 2 if fold else (m_rows + n) * r * 2
    prof = profile(decode_case(m_rows, fold_r=r if fold else 0), arch)
    return _perf.Launch(f"decode {n}x{k} M={m_rows}", prof, tiles * split, trips, hbm, weights=weights,
                        dram_loads="marked", prefetch=2 if prof_prefetch() else 1)  # fmt: skip


def prof_prefetch() -> bool:
    """Whether the shipped decode loop issues its W loads one iteration ahead (``lora_linear_decode.PREFETCH``)."""
    return bool(_cases()[decode_case(1)].constexprs.get("PREFETCH"))


def u_launch(k: int, m_rows: int, r: int = 16, arch: int = 90) -> _perf.Launch:
    """The U kernel's launch: grid (R tiles, split) with split-K to the decode kernel's target; each CTA runs its
    slice's 64-wide steps; A and X read once, U written once in bf16, the float32 workspace added into, read and
    cleared."""
    m = _perf.machine(arch)
    block_r = min(64, max(16, 1 << (r - 1).bit_length()))
    r_tiles, steps = math.ceil(r / block_r), math.ceil(k / 64)
    split = max(1, min(steps, math.ceil(TARGET_PROGRAMS_PER_SM * m.sms / r_tiles)))
    per_split = math.ceil(steps / split)

    def trips(i: int) -> tuple[int]:
        return (max(0, min(per_split, steps - (i // r_tiles) * per_split)),)

    hbm = r * k * 2 + m_rows * k * 2 + m_rows * r * 2 + (2 * m_rows * r * 4 if split > 1 else 0)
    return _perf.Launch(f"U = X·Aᵀ K={k} M={m_rows}", profile(u_case(m_rows, r), arch), r_tiles * split, trips, hbm,
                        dram_loads="all")  # fmt: skip


def decode_op(
    n: int, k: int, m_rows: int, r: int = 16, arch: int = 90, split: int | None = None, dropout: bool = False
) -> OpPrediction:
    """The NF4 + LoRA forward at decode size as ``lora_linear_fwd`` issues it: without dropout (``decode_fold``) one
    launch, U = X·Aᵀ summed inside it and written for the backward; with a dropout mask two - the U kernel (``U =
    drop(X)·Aᵀ`` in bf16), then the decode kernel (LoRA term added before the split-K sum, scale and bias in the
    epilogue, output in bf16) - each with its launch overhead."""
    m = _perf.machine(arch)
    fold = not dropout and decode_fold(m_rows, r)
    main = _perf.predict(decode_launch(n, k, m_rows, r, arch, split, fold), m)
    preds = [main] if fold else [_perf.predict(u_launch(k, m_rows, r, arch), m), main]
    hbm = n * k * (0.5 + 1 / 64) + m_rows * (k + n) * 2
    rec = gate_report(decode_case(m_rows, fold_r=r if fold else 0), arch)
    issue = n * k / rec.issue_bound_weights_per_s if rec.issue_bound_weights_per_s else None
    return _total(f"NF4+LoRA decode {n}x{k} M={m_rows}", preds, hbm, m, issue)


def cublas_gemv(n: int, k: int, m_rows: int, arch: int = 90) -> OpPrediction:
    """bf16 ``F.linear`` at decode size in this model: the weight streamed at the achievable bandwidth."""
    m = _perf.machine(arch)
    nbytes = 2 * (n * k + m_rows * (n + k))
    body = _perf.streaming_time(nbytes, 2.0 * m_rows * n * k, m, launches=0)
    pred = _perf.Prediction(f"cuBLAS bf16 {n}x{k} M={m_rows}", body + m.launch_s, body + m.graph_launch_s, body,
                            {"hbm": nbytes / m.hbm_bytes_per_s}, "hbm", 0, "-", 0.0, 0, 0, 1.0, 0, 0, 0)  # fmt: skip
    return _total(pred.name, [pred], nbytes, m)


# ------------------------------------------------------------------------------------------------
# dequantize, tiled GEMM, cross-entropy
# ------------------------------------------------------------------------------------------------


def dequantize_op(n: int, k: int, arch: int = 90, dtype: str = "bf16") -> OpPrediction:
    """``nf4_dequantize`` of an ``[N, K]`` double-quantized weight: a grid of ``min(tiles, 32·SMs)`` programs
    striding over 4096-weight tiles."""
    m = _perf.machine(arch)
    numel = n * k
    full = numel // 4096
    grid = min(math.ceil(numel / 4096), 32 * m.sms)

    def trips(i: int) -> tuple[int]:
        return (max(0, math.ceil((full - i) / grid)),)

    hbm = numel * (0.5 + 1 / 64 + 2) + numel / 64 / 256 * 4
    launch = _perf.Launch(f"dequantize {n}x{k}", profile(f"nf4_dequantize[{dtype},double_quant=True]", arch), grid,
                          trips, hbm, weights=numel, dram_loads="marked")  # fmt: skip
    pred = _perf.predict(launch, m)
    rec = gate_report(f"nf4_dequantize[{dtype},double_quant=True]", arch)
    issue = numel / rec.issue_bound_weights_per_s if rec.issue_bound_weights_per_s else None
    return _total(launch.name, [pred], hbm, m, issue)


_TILED = ("lora_gemm_fwd[bf16,dense,128x128x64,R=16]", 128, 128, 64), ("lora_gemm_fwd[bf16,dense,64x128x64,R=16]", 64,
                                                                      128, 64)  # fmt: skip


def tiled_gemm_op(n: int, k: int, m_rows: int = 8192, r: int = 16, arch: int = 90) -> OpPrediction:
    """The dense tiled GEMM with the LoRA epilogue (the M > 64 path, W dequantized once beforehand): both autotune
    configurations predicted, the faster kept (the autotuner's choice)."""
    m = _perf.machine(arch)
    best = None
    for case, bm, bn, bk in _TILED:
        prof = profile(case, arch)
        grid = math.ceil(m_rows / bm) * math.ceil(n / bn)
        hbm = 2 * (m_rows * k + n * k + m_rows * n) + 2 * r * (m_rows + n)
        loops = len(prof.loops)
        kt = math.ceil(k / bk)
        # loops in address order: the LoRA rank steps (written into the accumulator first), then the K loop
        lora = math.ceil(r / 16)

        def trips(i: int, kt: int = kt, lora: int = lora, loops: int = loops) -> tuple[int, ...]:
            return (lora, kt) if loops > 1 else (kt,)

        pred = _perf.predict(
            _perf.Launch(f"tiled {m_rows}x{n}x{k} {bm}x{bn}x{bk}", prof, grid, trips, hbm, flops=2.0 * m_rows * n * k),
            m,
        )
        if best is None or pred.seconds < best.seconds:
            best = pred
    hbm = 2 * (m_rows * k + n * k + m_rows * n)
    return _total(best.name, [best], hbm, m)


def cublas_gemm(n: int, k: int, m_rows: int = 8192, arch: int = 90) -> OpPrediction:
    """bf16 cuBLAS GEMM in this model: the larger of its bytes at the achievable bandwidth and its flops at the dense
    tensor-core peak at the model's clock (an upper bound on its speed)."""
    m = _perf.machine(arch)
    nbytes = 2 * (m_rows * k + n * k + m_rows * n)
    body = _perf.streaming_time(nbytes, 2.0 * m_rows * n * k, m, launches=0)
    pred = _perf.Prediction(f"cuBLAS bf16 {m_rows}x{n}x{k}", body + m.launch_s, body + m.graph_launch_s, body, {},
                            "tensor", 0, "-", 0.0, 0, 0, 0.0, 0, 0, 0)  # fmt: skip
    return _total(pred.name, [pred], nbytes, m)


def _stream(name: str, nbytes: float, flops: float, m: _perf.Machine) -> _perf.Prediction:
    """A bandwidth-bound cuBLAS call or skinny product (an addmm onto the output, U = X·Aᵀ): the streaming model."""
    body = _perf.streaming_time(nbytes, flops, m, launches=0)
    return _perf.Prediction(name, body + m.launch_s, body + m.graph_launch_s, body, {"hbm": nbytes / m.hbm_bytes_per_s},
                            "hbm", 0, "-", 0.0, 0, 0, 1.0, 0, 0, 0)  # fmt: skip


def lora_addmm(n: int, m_rows: int = 8192, r: int = 16, arch: int = 90) -> OpPrediction:
    """``OUT [M, N] += s·U·Bᵀ`` as cuBLAS's addmm runs it: the output read and written once, U and B read."""
    m = _perf.machine(arch)
    nbytes = 2 * (2 * m_rows * n + r * (m_rows + n))
    return _total(f"addmm LoRA {m_rows}x{n} r={r}", [_stream("addmm", nbytes, 2.0 * m_rows * n * r, m)], nbytes, m)


def cublas_lora_op(n: int, k: int, m_rows: int = 8192, r: int = 16, arch: int = 90) -> OpPrediction:
    """The launchers' cuBLAS path past the tiled GEMM's range (``lora_linear.cublas_path``): the base GEMM at cuBLAS's
    bound (bias in its epilogue), then the LoRA term as an addmm onto the output. W dequantized beforehand."""
    m = _perf.machine(arch)
    preds = cublas_gemm(n, k, m_rows, arch).launches + lora_addmm(n, m_rows, r, arch).launches
    return _total(f"cuBLAS+addmm {m_rows}x{n}x{k}", preds, 2 * (m_rows * k + n * k + m_rows * n), m)


def _skinny_stream(name: str, rows: int, width: int, r: int, m: _perf.Machine) -> _perf.Prediction:
    """A skinny product over ``[rows, width]`` (U = X·Aᵀ, G = dY·B, dA = Gᵀ·X, dB = dYᵀ·U): the wide operand
    streamed."""
    return _stream(name, 2 * (rows * width + r * (rows + width)), 2.0 * rows * width * r, m)


def qlora_step(n: int, k: int, m_rows: int = 8192, r: int = 16, arch: int = 90, path: str = "cublas") -> dict:
    """Forward and forward + backward seconds of one LoRA linear at ``m_rows``, without dropout: ``path`` "tiled"
    (dequantize + the tiled GEMM, LoRA in its epilogue), "cublas" (dequantize + cuBLAS + addmm) or "dense" (a bf16
    base, eager torch's chain: cuBLAS + addmm, no dequantize). The skinny products (U forward; G, dA, dB backward) are
    streamed in every path; the backward dequantizes again (the scratch holds another layer's W by then); dX's tiled
    GEMM is modeled by the forward binary with N and K swapped. With a dropout mask the cuBLAS path's dX adds one
    ``[M, K]`` pass (``G·A`` written, then read with the mask), not modeled here."""
    m = _perf.machine(arch)
    deq = 0.0 if path == "dense" else dequantize_op(n, k, arch).seconds
    u = _skinny_stream("U", m_rows, k, r, m).seconds
    if path == "tiled":
        fwd_gemm = tiled_gemm_op(n, k, m_rows, r, arch).seconds
        dx_gemm = tiled_gemm_op(k, n, m_rows, r, arch).seconds
    else:
        fwd_gemm = cublas_lora_op(n, k, m_rows, r, arch).seconds
        # the launcher splits G into 16-bit halves (rank 2R); eager torch's dense chain rounds G (rank R)
        dx_gemm = cublas_lora_op(k, n, m_rows, r if path == "dense" else 2 * r, arch).seconds
    wgrad = sum(_skinny_stream(w, m_rows, width, r, m).seconds for w, width in (("G", n), ("dA", k), ("dB", n)))
    fwd = deq + u + fwd_gemm
    return {"fwd": fwd, "fwd_bwd": fwd + deq + dx_gemm + wgrad}


def cross_entropy_op(vocab: int = LLAMA3_VOCAB, tokens: int | None = None, arch: int = 90) -> OpPrediction:
    """One chunk of the causal-LM loss: ``tokens`` programs (the chunk, default ``64 MiB / (4·V)`` as
    ``linear_cross_entropy`` sizes it) of the warps the launcher picks (``cross_entropy.ce_warps``), each sweeping its
    bf16 row twice: statistics in steps of ``BLOCK_V · STATS_LOADS``, then the gradient, written in place, in steps of
    ``BLOCK_V``. HBM bytes: the row read twice and written once (the re-read counted from DRAM, though the chunk's
    33 MB may partly stay in L2)."""
    from fastpeft.kernels import cross_entropy as _ce

    m = _perf.machine(arch)
    tokens = tokens or max(1, (64 << 20) // (4 * vocab))
    warps = _ce.ce_warps(tokens, m.sms)
    case = "cross_entropy[bf16]" if warps == _ce.CE_WARPS[0] else f"cross_entropy[bf16,warps={warps}]"
    block, loads = (_cases()[case].constexprs[k] for k in ("BLOCK_V", "STATS_LOADS"))
    sweeps = (math.ceil(vocab / (block * loads)), math.ceil(vocab / block))
    hbm = 3 * tokens * vocab * 2 + tokens * 16
    launch = _perf.Launch(f"cross-entropy T={tokens} V={vocab}", profile(case, arch), tokens, lambda i: sweeps, hbm,
                          dram_loads="all")  # fmt: skip
    return _total(launch.name, [_perf.predict(launch, m)], hbm, m)


# ------------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------------


def levers(n: int, k: int, m_rows: int, arch: int = 90) -> list[tuple[str, float]]:
    """What moves the decode call's time: each lever applied alone, as predicted seconds."""
    m = _perf.machine(arch)
    fold = decode_fold(m_rows, 16)
    base = decode_op(n, k, m_rows, arch=arch)
    out = [(f"as built ({len(base.launches)} launch{'es' if len(base.launches) > 1 else ''})", base.seconds)]
    launch = decode_launch(n, k, m_rows, arch=arch, fold=fold)
    main = _perf.predict(launch, m)
    rest = base.seconds - main.seconds
    tiles, split, _ = decode_split(n, k, m.sms, m_rows, fold, arch)
    # 1. more bytes in flight: W loads issued one (or, built that way, two) iterations ahead
    ahead = launch.prefetch + 1
    out.append((f"W loads {ahead - 1} iteration(s) ahead", rest + _perf.predict(replace(launch, prefetch=ahead),
                                                                             m).seconds))  # fmt: skip
    # 2. half the integer/logic instructions in the loop
    out.append(("half the ALU instructions", rest + _perf.predict(replace(launch, profile=_fewer_alu(launch.profile)),
                                                                   m).seconds))  # fmt: skip
    # 3. twice the split: a second wave of programs
    steps = k // 64
    split2 = min(steps, 2 * split)
    out.append(
        (
            f"split {split2} (two waves) instead of {split}",
            rest + _perf.predict(decode_launch(n, k, m_rows, arch=arch, split=split2, fold=fold), m).seconds,
        )
    )
    # 4. the two-launch form (U kernel first), as a forward with dropout on the LoRA input runs it
    out.append(("U kernel first (2 launches: dropout)", decode_op(n, k, m_rows, arch=arch, dropout=True).seconds))
    out.append(("bf16 cuBLAS (reference)", cublas_gemv(n, k, m_rows, arch).seconds))
    return out


def _fewer_alu(p: _perf.Profile) -> _perf.Profile:
    loops = []
    for lp in p.loops:
        alu = lp.pipes.get("alu", 0.0)
        loops.append(replace(lp, pipes={**lp.pipes, "alu": alu / 2}, instructions=int(lp.instructions - alu / 2)))
    return replace(p, loops=loops)


def report(arch: int = 90, m_values: Sequence[int] = (1, 16, 64)) -> dict:
    """Every row of the report as plain data."""
    rows = {"decode": [], "dequantize": [], "tiled": [], "cross_entropy": [], "levers": {}}
    for n, k in LLAMA3_8B:
        for mr in m_values:
            rows["decode"].append((decode_op(n, k, mr, arch=arch), cublas_gemv(n, k, mr, arch)))
        rows["dequantize"].append(dequantize_op(n, k, arch))
        rows["tiled"].append((tiled_gemm_op(n, k, arch=arch), cublas_gemm(n, k, arch=arch)))
        rows.setdefault("qlora", []).append(
            ((n, k), {p: qlora_step(n, k, arch=arch, path=p) for p in ("tiled", "cublas", "dense")})
        )
    rows["cross_entropy"].append(cross_entropy_op(arch=arch))
    from fastpeft.kernels import _perf_dora  # builds on this module: imported at run time only

    rows["dora"] = _perf_dora.dora_rows(arch)
    for n, k in ((4096, 4096), (14336, 4096)):
        for mr in (1, 16):
            rows["levers"][(n, k, mr)] = levers(n, k, mr, arch)
    return rows


def _us(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e6:.1f}"


def format_report(rows: dict, arch: int = 90) -> str:
    """The report as Markdown tables."""
    m = _perf.machine(arch)
    out = [f"Predicted on {m.gpu.upper()} (sm_{arch}) by kernels/_perf.py; estimates from static SASS, not "
           f"measurements. Achievable HBM {m.hbm_bytes_per_s / 1e12:.2f} TB/s, {m.sms} SMs at "
           f"{m.clock_hz / 1e9:.3f} GHz, {m.launch_s * 1e6:.1f} us per stream launch "
           f"({m.graph_launch_s * 1e6:.2f} under CUDA graphs).", ""]  # fmt: skip
    out += ["## NF4 + LoRA forward at decode size (r = 16, bf16, double-quantized NF4)", "",
            "| W [N, K] | M | launches | predicted us | graph us | % of HBM (call) | decode kernel us "
            "| kernel % of HBM | binding (kernel) | grid (empty) | CTAs/SM | in flight / needed per SM "
            "| issue bound us (old) | bf16 cuBLAS us (graph) | speed-up (graph) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for op, ref in rows["decode"]:
        main = max(op.launches, key=lambda p: p.kernel_seconds)
        out.append(
            f"| {op.name.split()[2]} | {op.name.split('M=')[1]} | {len(op.launches)} | {_us(op.seconds)} | "
            f"{_us(op.graph_seconds)} | {op.hbm_fraction:.0%} | {_us(main.kernel_seconds)} | {main.hbm_fraction:.0%} | "
            f"{main.binding} | {main.grid} ({main.empty_ctas}) | {main.ctas_per_sm} | "
            f"{main.bytes_in_flight_per_sm / 1e3:.1f} / {main.bytes_needed_per_sm / 1e3:.1f} KB | "
            f"{_us(op.issue_bound_seconds)} | {_us(ref.seconds)} ({_us(ref.graph_seconds)}) | "
            f"{ref.seconds / op.seconds:.2f}x ({ref.graph_seconds / op.graph_seconds:.2f}x) |"
        )
    out += ["", "## What would move the decode number", "", "| W, M | lever | predicted us |", "|---|---|---|"]
    for (n, k, mr), lev in rows["levers"].items():
        out += [f"| {n}x{k}, M={mr} | {name} | {_us(s)} |" for name, s in lev]
    out += [
        "",
        "## NF4 dequantize (bf16 out, double quant)",
        "",
        "| W [N, K] | predicted us | % of HBM | binding | CTAs/SM | issue bound us (old) |",
        "|---|---|---|---|---|---|",
    ]
    for op in rows["dequantize"]:
        p = op.launches[0]
        out.append(f"| {op.name.split()[1]} | {_us(op.seconds)} | {op.hbm_fraction:.0%} | {p.binding} | "
                   f"{p.ctas_per_sm} | {_us(op.issue_bound_seconds)} |")  # fmt: skip
    out += ["", "## Tiled GEMM with LoRA epilogue, M = 8192 (bf16; no longer run at these shapes: see below)", "",
            "| W [N, K] | config | predicted us | TFLOP/s | binding | CTAs/SM | waves | cuBLAS bound us "
            "| cuBLAS + addmm us (runs) |",
            "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for op, ref in rows["tiled"]:
        p = op.launches[0]
        n, k = op.name.split()[1].split("x")[1:]
        tf = 2 * 8192 * int(n) * int(k) / op.seconds / 1e12
        runs = cublas_lora_op(int(n), int(k), arch=arch).seconds
        out.append(f"| {n}x{k} | {op.name.split()[2]} | {_us(op.seconds)} | {tf:.0f} | {p.binding} | {p.ctas_per_sm} | "
                   f"{p.waves:.2f} | {_us(ref.seconds)} | {_us(runs)} |")  # fmt: skip
    out += ["", "## QLoRA linear at M = 8192 (bf16, r = 16): the path that runs", "",
            "The launchers take cuBLAS + addmm here (``lora_linear.cublas_path``); the tiled row is the path before. "
            "Fractions: dense bf16 cuBLAS + LoRA (no dequantize) over the path's time; skinny products streamed in "
            "every path, the backward dequantizes again.", "",
            "| W [N, K] | fwd us: tiled / cuBLAS+addmm / dense | fwd fraction of dense: tiled -> cuBLAS "
            "| fwd+bwd us: tiled / cuBLAS+addmm / dense | fwd+bwd fraction of dense: tiled -> cuBLAS |",
            "|---|---|---|---|---|"]  # fmt: skip
    for (n, k), q in rows.get("qlora", []):
        t, c, d = q["tiled"], q["cublas"], q["dense"]
        out.append(f"| {n}x{k} | {_us(t['fwd'])} / {_us(c['fwd'])} / {_us(d['fwd'])} | "
                   f"{d['fwd'] / t['fwd']:.2f} -> {d['fwd'] / c['fwd']:.2f} | {_us(t['fwd_bwd'])} / "
                   f"{_us(c['fwd_bwd'])} / {_us(d['fwd_bwd'])} | {d['fwd_bwd'] / t['fwd_bwd']:.2f} -> "
                   f"{d['fwd_bwd'] / c['fwd_bwd']:.2f} |")  # fmt: skip
    out += [
        "",
        "## Cross-entropy kernel, one loss chunk (bf16 logits)",
        "",
        "| chunk | predicted us | % of HBM | binding | CTAs/SM |",
        "|---|---|---|---|---|",
    ]
    for op in rows["cross_entropy"]:
        p = op.launches[0]
        out.append(f"| {op.name} | {_us(op.seconds)} | {op.hbm_fraction:.0%} | {p.binding} | {p.ctas_per_sm} |")
    if rows.get("dora"):
        from fastpeft.kernels import _perf_dora

        out += _perf_dora.format_dora(rows["dora"])
    out += ["", "## Reading the tables", "",
            "- *predicted*: every launch of the call, each with a stream launch's overhead; *graph*: the same under "
            "CUDA-graph replay (how the benchmarks time microsecond kernels).",
            "- *binding*: the largest device-level bound of the kernel - hbm (bytes at the achievable bandwidth), "
            "latency (each CTA alone: its loop's dependence chain with the loaded DRAM latency, waves), a pipe (alu, "
            "fp32, lsu = the 128 B/clk load/store and shared-memory path, tensor) or issue.",
            "- *in flight / needed per SM*: the W bytes a decode SM keeps in flight (resident CTAs x an iteration's "
            "loads x the share of the iteration spent waiting for DRAM) against Little's law's achievable bandwidth x "
            "loaded latency / SMs.",
            "- *issue bound (old)*: the first model's figure (thread-instructions per weight at 4 warp-instructions "
            "per clock), kept for comparison.",
            "- *bf16 cuBLAS*: one DRAM round trip, then the bytes at the achievable bandwidth (the streaming model the "
            "Liger LayerNorm and cross-entropy calibration points check to -7 % and -2 %); for the GEMM the larger "
            "of that and the flops at the dense tensor peak (an upper bound on its speed).",
            "- The decode kernel's binary is the gate's 4096 x 4096 build for each M; other shapes reuse it (same "
            "specialization, other runtime arguments)."]  # fmt: skip
    return "\n".join(out) + "\n"
