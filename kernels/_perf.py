"""Latency-aware cost model of a kernel launch, from its SASS: a predicted time, every bound beside it, and why.

The first model (kernels/_sass.py, kept as the "issue bound" column) counts main-loop instructions and assumes every
scheduler finds a ready warp each clock. That hides what binds small-M decode kernels: bytes in flight. This model
reads the same binaries (the compile gate's cubins, or any cuobjdump text) and composes, per launch:

**Per CTA-iteration of a loop** (the loops are the innermost backward branches holding a global load or an MMA):

- *throughput time* ``T_tp``: the CTA's warp-instructions on each pipe divided by that pipe's rate per SM (integer /
  logic at half the FP32 rate on sm_90: PRMT, LOP3, SHF, IADD3, ISETP, LEA, SEL, ...; IMAD and VIADD on the
  FMA-heavy half; FP32; MUFU and conversions at 16 lanes; FP64; the load/store data path at 128 bytes a clock,
  shared-memory bytes included; tensor cores from the HGMMA / HMMA shapes), and the issue slots (4 per SM); the
  largest of these.
- *latency time* ``T_alone``: one warp walked through the loop body in program order, four times over, with the
  stall count that ptxas encodes in each instruction's control word (bits 105-108, Jia et al. 2018) and a wait on
  every scoreboard the instruction names (bits 116-121) until its producer's variable latency has passed: a global
  load (DRAM at the loaded latency below when it streams data read once - marked evict-first in the SASS, or named
  so by the launch - else L2 or L1, or a blend in the proportion of unique to requested bytes for a kernel that
  re-reads its tiles), a shared-memory load, MUFU, a barrier, an HGMMA / HMMA (its tensor time plus a fixed
  latency), ``DEPBAR`` / ``WARPGROUP.DEPBAR`` counted against the cp.async / wgmma groups in flight. The
  steady-state period of that walk is the time one CTA needs for an iteration when it has the SM to itself: memory
  latency the loop does not overlap is in it, latency that prefetching (``num_stages``) overlaps is not. The CTA's
  warps beyond one per scheduler, and its own pipe time, bound it from below.

**Per SM**, the ``k`` resident CTAs (registers, shared memory, threads, the CTA limit, and the grid itself) share the
SM: an iteration of each takes ``max(T_alone, k · T_tp)`` - a CTA either waits on its own latency or on the pipes
the others also use (a fluid processor-sharing model; CTAs with different work progress at their own rates). CTAs
are dispatched breadth-first over the SMs and refill a slot when one finishes, so the simulation gives waves, a
ragged last wave and empty split-K slices (which still pay their prologue and epilogue: one walk of the code outside
the loops). Its makespan is the **SM time**.

**Device**: ``T = max(SM time, HBM bytes / achievable bandwidth)``. The DRAM latency in ``T_alone`` grows with the
bandwidth the launch draws (``L = L0 · (1 + g · u)``, ``u`` its fraction of the achievable bandwidth; solved by
fixed-point iteration): Little's law with the loaded latency measured by streaming microbenchmarks, so the bytes a
launch keeps in flight decide how close it gets to the bandwidth bound.

**Per call**: ``predicted = T + launches · launch overhead``, the overhead being the additive cost of one more kernel
in a stream (or a CUDA graph) measured by a repeated-small-kernel benchmark.

Why this composition: the bounds are what a roofline plus Little's law give, and the maximum (rather than a sum) is
what a GPU achieves when warps overlap perfectly; the one place where they do not overlap by construction - a CTA's
own loop latency, which no other warp hides - is inside ``T_alone`` as a sum along the warp's dependence chain.
What it does not model: L2 bandwidth and hit rates beyond the requested/unique byte ratio, bank conflicts, DRAM page
effects, clocks falling under power limits (the calibration's tensor-bound points run slower than modelled), host
time per call (a Python launch path under ``do_bench`` shows at tens of microseconds), instruction-cache misses, code
skipped by branches inside a loop (counted as executed unless a launch names the span as not taken). Every figure is
an estimate; ``CONSTANTS`` holds the machine, each value with its source; benchmarks/calibration.md checks it on
kernels others measured.

Command line: ``python -m fastpeft.kernels._perf --report`` (fastpeft's kernels at Llama-3-8B shapes, see
``kernels/_perf_launches.py``).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from fastpeft.kernels import _sass
from fastpeft.kernels._perf_profile import Op, Profile, Span, profile_from_sass

__all__ = [
    "CONSTANTS",
    "Constant",
    "Launch",
    "Machine",
    "Op",
    "Prediction",
    "Profile",
    "Span",
    "constant",
    "machine",
    "predict",
    "profile_from_sass",
    "streaming_time",
]

# ------------------------------------------------------------------------------------------------
# constants: one table, every value with its source
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Constant:
    name: str
    gpu: str
    """"h100" (H100 SXM5 80 GB, sm_90) or "a100" (A100 SXM4 80 GB, sm_80)."""
    value: float
    unit: str
    source: str


_WP = "NVIDIA H100 Tensor Core GPU Architecture whitepaper (2022)"
_GA = "NVIDIA A100 Tensor Core GPU Architecture whitepaper (2020)"
_PG = "CUDA C++ Programming Guide, 'Arithmetic Instructions' throughput table (results per clock per SM), cc 8.0 / 9.0"
_GB = "te42kyfo/gpu-benches (github.com/te42kyfo/gpu-benches)"
_GBX = "gpu-benches fork xxrjun/gpu-benches (github.com/xxrjun/gpu-benches)"

CONSTANTS: tuple[Constant, ...] = (
    # -- machine shape --
    Constant("sms", "h100", 132, "SMs", f"{_WP}: H100 SXM5 has 132 SMs"),
    Constant("sms", "a100", 108, "SMs", f"{_GA}: A100 has 108 SMs"),
    Constant("clock_hz", "h100", 1.755e9, "Hz",
             f"{_GB} gpu-latency/h100_pcie.txt runs at 1755 MHz; the clock the first model (kernels/_sass.py) used. "
             f"H100 SXM boosts to 1980 MHz when power allows (gh200.txt in {_GBX}); dense tensor loads run lower"),
    Constant("clock_hz", "a100", 1.41e9, "Hz", f"{_GB} gpu-latency/a100_80.txt: 1410 MHz (A100 boost clock)"),
    Constant("issue_per_sm", "h100", 4, "warp-instr/clk", f"{_WP}: 4 SM sub-partitions, one warp scheduler each"),
    Constant("issue_per_sm", "a100", 4, "warp-instr/clk", f"{_GA}: 4 SM sub-partitions, one warp scheduler each"),
    # -- pipes (warp-instructions per clock per SM = lanes / 32) --
    Constant("pipe_fp32", "h100", 4, "warp-instr/clk", f"{_PG}: 128 FP32 add/mul/FMA per clock on cc 9.0"),
    Constant("pipe_fp32", "a100", 2, "warp-instr/clk", f"{_PG}: 64 FP32 add/mul/FMA per clock on cc 8.0"),
    Constant("pipe_fp16x2", "h100", 4, "warp-instr/clk", f"{_PG}: 256 FP16 results (HFMA2) per clock"),
    Constant("pipe_fp16x2", "a100", 4, "warp-instr/clk", f"{_PG}: 256 FP16 results (HFMA2) per clock"),
    Constant("pipe_alu", "h100", 2, "warp-instr/clk",
             f"{_PG}: 64 per clock for 32-bit integer add, compare, shift, logical ops (IADD3, ISETP, SHF, LOP3; PRMT, "
             "LEA, SEL on the same ALU) on cc 9.0: half the FP32 rate"),
    Constant("pipe_alu", "a100", 2, "warp-instr/clk", f"{_PG}: 64 per clock, 32-bit integer add/compare/shift/logic"),
    Constant("pipe_fmaheavy", "h100", 2, "warp-instr/clk", f"{_PG}: 64 per clock, 32-bit integer multiply-add (IMAD)"),
    Constant("pipe_fmaheavy", "a100", 2, "warp-instr/clk", f"{_PG}: 64 per clock, 32-bit integer multiply-add (IMAD)"),
    Constant("pipe_mufu", "h100", 0.5, "warp-instr/clk",
             f"{_PG}: 16 per clock for sin/cos/exp2/log2/rsqrt and for 'all other type conversions' on cc 9.0"),
    Constant("pipe_mufu", "a100", 0.5, "warp-instr/clk", f"{_PG}: 16 per clock for MUFU ops and type conversions"),
    Constant("pipe_fp64", "h100", 2, "warp-instr/clk", f"{_PG}: 64 FP64 FMA per clock on cc 9.0"),
    Constant("pipe_fp64", "a100", 1, "warp-instr/clk", f"{_PG}: 32 FP64 FMA per clock on cc 8.0"),
    Constant("pipe_uniform", "h100", 4, "warp-instr/clk", "assumption: one uniform datapath per sub-partition"),
    Constant("pipe_uniform", "a100", 4, "warp-instr/clk", "assumption: one uniform datapath per sub-partition"),
    Constant("lsu_bytes_per_clk", "h100", 128, "B/clk/SM",
             f"{_GB} README (gpu-cache): NVIDIA's L1 transfers close to 128 B/cycle/SM; {_PG}: 32 banks x 4 B shared "
             "memory; each memory warp-instruction takes max(1, bytes/128) clocks of that path"),
    Constant("lsu_bytes_per_clk", "a100", 128, "B/clk/SM", f"{_GB} README (gpu-cache): close to 128 B/cycle/SM"),
    # -- tensor cores (dense) --
    Constant("tc_fp16_flops_per_clk", "h100", 4096, "flop/clk/SM",
             "NVIDIA H100 datasheet: 989.4 dense FP16/BF16 TFLOP/s = 132 SMs x 4096 flop/clk x 1.83 GHz (wgmma)"),
    Constant("tc_fp16_flops_per_clk", "a100", 2048, "flop/clk/SM",
             f"{_GA}: 312 dense FP16/BF16 TFLOP/s = 108 SMs x 2048 flop/clk x 1.41 GHz"),
    Constant("tc_hmma_fraction", "h100", 0.5, "of wgmma rate",
             "assumption after Luo et al. 2025 (arXiv:2501.12084): the legacy mma.sync path (HMMA) on Hopper reaches "
             "well under the wgmma peak; half is taken"),
    Constant("tc_hmma_fraction", "a100", 1.0, "of peak", f"{_GA}: mma.sync is A100's native tensor-core path"),
    Constant("mma_latency_cycles", "h100", 32, "clk",
             "estimate: fixed pipeline latency of an MMA beyond its tensor time (Luo et al. 2024, arXiv:2402.13499, "
             "report tens of cycles for mma/wgmma latency on Hopper)"),
    Constant("mma_latency_cycles", "a100", 32, "clk",
             "estimate: Abdelkhalik et al. 2022 (arXiv:2208.11174) measure tens of cycles for mma.sync on A100"),
    # -- memory --
    Constant("hbm_bytes_per_s", "h100", 3.17e12, "B/s",
             f"H100 SXM5 HBM3 3.35 TB/s spec (datasheet) x 0.946, the STREAM-triad efficiency of Hopper HBM3 in "
             f"{_GBX} gpu-stream/gh200.txt (3783 of 4000 GB/s)"),
    Constant("hbm_bytes_per_s", "a100", 1.76e12, "B/s",
             f"{_GB} gpu-stream/a100_80.txt: read 1769 GB/s, triad 1759 GB/s at full occupancy (A100 SXM4 80 GB)"),
    Constant("dram_latency_s", "h100", 343e-9, "s",
             f"{_GBX} gpu-latency/gh200.txt: pointer chase past L2, 678.6 cycles at 1980 MHz (Hopper, HBM3)"),
    Constant("dram_latency_s", "a100", 404e-9, "s", f"{_GB} gpu-latency/a100_80.txt: 570 cycles at 1410 MHz"),
    Constant("dram_latency_growth", "h100", 0.6, "x at full bandwidth",
             f"{_GB} gpu-stream: bytes in flight / bandwidth of the read kernel rises from 304 ns (3% occupancy) to "
             "471 ns at 96% of peak on H100 PCIe (x1.55), 325 -> 501 ns on A100 (x1.54 at 84%); gh200: x1.43 at 69%"),
    Constant("dram_latency_growth", "a100", 0.6, "x at full bandwidth", f"{_GB} gpu-stream/a100_80.txt (see h100 row)"),
    Constant("l2_latency_cycles", "h100", 280, "clk", f"{_GBX} gpu-latency/gh200.txt: 280 cycles L2 plateau"),
    Constant("l2_latency_cycles", "a100", 211, "clk", f"{_GB} gpu-latency/a100_80.txt: 211 cycles L2 plateau"),
    Constant("l1_latency_cycles", "h100", 32, "clk",
             f"{_GBX} gpu-latency/gh200.txt: 32 cycles L1 hit; used for shared-memory loads, LDC and S2R"),
    Constant("l1_latency_cycles", "a100", 36, "clk", f"{_GB} gpu-latency/a100_80.txt: 36 cycles L1 hit"),
    Constant("mufu_latency_cycles", "h100", 20, "clk", "estimate: MUFU / conversion latency, of the order of L1's"),
    Constant("mufu_latency_cycles", "a100", 20, "clk", "estimate: MUFU / conversion latency, of the order of L1's"),
    Constant("barrier_cycles", "h100", 24, "clk", "estimate: BAR.SYNC of warps that arrive together"),
    Constant("barrier_cycles", "a100", 24, "clk", "estimate: BAR.SYNC of warps that arrive together"),
    Constant("store_read_cycles", "h100", 8, "clk", "estimate: a store reads its register operands a few clocks on"),
    Constant("store_read_cycles", "a100", 8, "clk", "estimate: a store reads its register operands a few clocks on"),
    # -- launches --
    Constant("launch_s", "h100", 2.0e-6, "s",
             f"{_GB} gpu-small-kernels/h200.txt: 10000 back-to-back launches of a 64 kB SCALE kernel run at 26 GB/s "
             "(2.5 us each), less the ~0.5 us that kernel's own work takes in this model"),
    Constant("launch_s", "a100", 2.0e-6, "s", f"{_GB} gpu-small-kernels/a100_80.txt: 15-25 GB/s at 64 kB (2.6-4.4 us)"),
    Constant("graph_launch_s", "h100", 0.85e-6, "s",
             f"{_GB} gpu-small-kernels/h200_graph.txt: 48 GB/s at 64 kB under CUDA graphs (1.35 us), less ~0.5 us"),
    Constant("graph_launch_s", "a100", 0.85e-6, "s", f"{_GB} gpu-small-kernels/a100_80_graph.txt: 23-49 GB/s at 64 kB"),
)  # fmt: skip

_GPU_OF_ARCH = {90: "h100", 80: "a100"}


def constant(name: str, gpu: str) -> float:
    """The value of constant ``name`` for ``gpu`` ("h100" or "a100")."""
    for c in CONSTANTS:
        if c.name == name and c.gpu == gpu:
            return c.value
    raise KeyError(f"no constant {name!r} for {gpu!r}")


@dataclass(frozen=True)
class Machine:
    """The constants of one GPU, as attributes (see ``CONSTANTS`` for their sources)."""

    gpu: str
    arch: int
    values: dict = field(default_factory=dict)

    def __getattr__(self, name: str) -> float:
        values = object.__getattribute__(self, "values")
        if name in values:
            return values[name]
        raise AttributeError(name)

    def cycles(self, seconds: float) -> float:
        return seconds * self.clock_hz

    def seconds(self, cycles: float) -> float:
        return cycles / self.clock_hz


def machine(arch: int = 90) -> Machine:
    """The machine the model predicts for: ``arch`` 90 is an H100 SXM5, 80 an A100 SXM4 80 GB."""
    gpu = _GPU_OF_ARCH[90 if arch >= 90 else 80]
    return Machine(gpu, 90 if arch >= 90 else 80, {c.name: c.value for c in CONSTANTS if c.gpu == gpu})


# ------------------------------------------------------------------------------------------------
# timing one warp through a span (latency)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Latencies:
    """Cycles of the variable-latency producers for one launch."""

    gload: float
    """A global load of no named level, by the launch's rule."""
    levels: dict
    """Cycles of a load served from "dram", "l2", "l1"."""
    smem: float
    mufu: float
    barrier: float
    store_read: float
    mma_fixed: float
    mma_flops_per_clk: dict


def _walk(ops: Sequence[Op], lat: Latencies, passes: int) -> list[float]:
    """Issue times at the end of each of ``passes`` walks of ``ops`` by one warp: stall counts, scoreboard waits,
    barriers, cp.async groups (``LDGDEPBAR`` / ``DEPBAR.LE``) and wgmma groups (``WARPGROUP.DEPBAR.LE``)."""
    ready = [0.0] * 8
    t = 0.0
    groups: list[float] = []  # completion times of committed cp.async groups
    open_group = 0.0
    mmas: list[float] = []  # completion of issued wgmma / mma
    tensor_free = 0.0
    ends = []
    for _ in range(passes):
        for op in ops:
            if op.wait:
                t = max([t] + [ready[b] for b in range(6) if op.wait >> b & 1])
            if op.kind == "depbar":
                pending = groups[: max(0, len(groups) - op.arg)]
                t = max([t] + pending)
                groups = groups[len(pending) :]
            elif op.kind == "wgdepbar":
                pending = mmas[: max(0, len(mmas) - op.arg)]
                t = max([t] + pending)
                mmas = mmas[len(pending) :]
            elif op.kind == "bar":
                t += lat.barrier
            done = t
            if op.kind == "gload":
                done = t + (lat.levels[op.level] if op.level else lat.gload)
                open_group = max(open_group, done)
            elif op.kind == "ldgdepbar":
                groups.append(open_group)
                open_group = 0.0
            elif op.kind in ("smem", "mio", "atom"):
                done = t + (lat.smem if op.kind != "atom" else lat.gload)
            elif op.kind == "mufu":
                done = t + lat.mufu
            elif op.kind == "store":
                done = t + lat.store_read
            elif op.kind == "mma":
                rate = lat.mma_flops_per_clk["wg" if op.warpgroup else "warp"]
                start = max(t, tensor_free)
                tensor_free = start + op.tensor_flops / rate
                done = tensor_free + lat.mma_fixed
                mmas.append(done)
            if op.wbar != 7:
                ready[op.wbar] = max(ready[op.wbar], done)
            if op.rbar != 7:
                ready[op.rbar] = max(ready[op.rbar], t + lat.store_read if op.kind != "store" else done)
            t += max(op.stall, 1)
        ends.append(t)
    return ends


def warp_period(span: Span, lat: Latencies) -> float:
    """Steady-state cycles one warp needs per pass of a loop body (the 4th walk minus the 3rd)."""
    if not span.ops:
        return 0.0
    ends = _walk(span.ops, lat, 4)
    return ends[3] - ends[2]


def warp_once(span: Span, lat: Latencies) -> float:
    """Cycles of one straight-line walk of ``span`` (the prologue and epilogue of a CTA)."""
    return _walk(span.ops, lat, 1)[0] if span.ops else 0.0


# ------------------------------------------------------------------------------------------------
# per CTA-iteration costs
# ------------------------------------------------------------------------------------------------

_PIPE_RATE = {"alu": "pipe_alu", "fmaheavy": "pipe_fmaheavy", "fp32": "pipe_fp32", "fp16x2": "pipe_fp16x2",
              "fp64": "pipe_fp64", "mufu": "pipe_mufu", "uniform": "pipe_uniform"}  # fmt: skip


def _tensor_rate(m: Machine, kind: str, warpgroup: bool) -> float:
    """Dense tensor flops per clock per SM for ``kind`` (fp16 / bf16 the reference; tf32 half, fp8 and int8
    double), HMMA at ``tc_hmma_fraction`` of the wgmma rate."""
    scale = {"fp16": 1.0, "tf32": 0.5, "fp8": 2.0, "int8": 2.0, "fp64": 1 / 16}.get(kind, 1.0)
    rate = m.tc_fp16_flops_per_clk * scale
    return rate if warpgroup else rate * m.tc_hmma_fraction


def throughput_cycles(span: Span, warps: int, m: Machine) -> dict[str, float]:
    """Cycles of the SM's pipes that one CTA-pass of ``span`` occupies, per resource (its max binds)."""
    out = {"issue": span.instructions * warps / m.issue_per_sm}
    for pipe, n in span.pipes.items():
        if pipe in _PIPE_RATE:
            out[pipe] = n * warps / getattr(m, _PIPE_RATE[pipe])
    # one 128 B/clk path carries global and shared traffic; MMA operands read from shared memory use it too
    out["lsu"] = (span.lsu_cycles + span.mma_smem_bytes / m.lsu_bytes_per_clk) * warps
    hg = any(op.warpgroup for op in span.ops if op.kind == "mma")
    out["tensor"] = sum(f * warps / _tensor_rate(m, k, hg) for k, f in span.tensor_flops.items())
    return out


# ------------------------------------------------------------------------------------------------
# a launch and its prediction
# ------------------------------------------------------------------------------------------------


@dataclass
class Launch:
    """One kernel launch: its binary (``profile``), grid and work.

    ``trips(cta)`` gives the iterations of each of the profile's loops for CTA number ``cta`` (launch order,
    x fastest); loops it does not name run once. ``hbm_bytes``: unique bytes the launch reads and writes in DRAM.
    """

    name: str
    profile: Profile
    grid: int
    trips: Callable[[int], Sequence[int]]
    hbm_bytes: float
    launches: int = 1
    flops: float = 0.0
    weights: float = 0.0
    """Weights the launch reads (for the fraction-of-HBM and the first model's issue bound)."""
    prefetch: int = 1
    """Iterations ahead that the DRAM loads are issued (a what-if: their DRAM wait divided by it)."""
    dram_loads: str = "blend"
    """Where global loads of no named level (``Op.level``) are served from: "all" (DRAM: every load streams data read
    once), "marked" (L2: the streams are the marked or named loads), or "blend" (DRAM in the proportion of unique
    HBM bytes to requested bytes, L2 for the rest - a GEMM re-reading its tiles)."""


@dataclass
class Prediction:
    name: str
    seconds: float
    """Kernel time plus launch overhead (``launches`` stream launches)."""
    graph_seconds: float
    """The same under CUDA-graph replay."""
    kernel_seconds: float
    bounds: dict[str, float]
    """Device-level seconds of each bound: hbm, latency (CTAs alone, no sharing), every pipe, issue, launch."""
    binding: str
    ctas_per_sm: int
    occupancy_limit: str
    waves: float
    empty_ctas: int
    grid: int
    hbm_fraction: float
    """HBM bytes / (kernel seconds x achievable bandwidth)."""
    bytes_in_flight_per_sm: float
    bytes_needed_per_sm: float
    """Achievable bandwidth x loaded DRAM latency / SMs: what Little's law asks of each SM."""
    dram_latency_s: float
    detail: dict = field(default_factory=dict)


def _latencies(m: Machine, f_dram: float, u: float, loads: str = "blend", prefetch: int = 1) -> Latencies:
    dram = m.cycles(m.dram_latency_s) * (1 + m.dram_latency_growth * min(max(u, 0.0), 1.0)) / prefetch
    wg = m.tc_fp16_flops_per_clk  # a warpgroup's wgmma uses all four sub-partitions' tensor cores
    other = {"all": dram, "marked": m.l2_latency_cycles}.get(loads, f_dram * dram + (1 - f_dram) * m.l2_latency_cycles)
    levels = {"dram": dram, "l2": m.l2_latency_cycles, "l1": m.l1_latency_cycles}
    return Latencies(
        gload=other, levels=levels, smem=m.l1_latency_cycles,
        mufu=m.mufu_latency_cycles, barrier=m.barrier_cycles, store_read=m.store_read_cycles,
        mma_fixed=m.mma_latency_cycles, mma_flops_per_clk={"wg": wg, "warp": wg * m.tc_hmma_fraction / 4},
    )  # fmt: skip


def _makespan(works: list[tuple[float, float]], occ: int, sms: int) -> float:
    """Fluid processor-sharing simulation of CTAs ``(alone cycles, SM throughput cycles)``, dispatched in launch order
    breadth-first over ``sms`` SMs with ``occ`` slots each and refilled from the queue as CTAs finish. With resident set
    R an SM advances CTA i at ``s / alone_i`` per cycle, ``s = min(1, 1 / Σ_R tp_j / alone_j)``: each CTA at its own
    latency-bound pace while the pipes have room, all slowed alike when they do not."""
    if not works:
        return 0.0
    queue = list(range(len(works)))[::-1]
    resident: list[dict[int, float]] = [{} for _ in range(sms)]  # cta -> remaining fraction of its work
    for _ in range(occ):
        for s in range(sms):
            if queue:
                resident[s][queue.pop()] = 1.0
    clock = [0.0] * sms

    def rates(res: dict[int, float]) -> dict[int, float]:
        load = sum(works[i][1] / works[i][0] for i in res if works[i][0] > 0)
        scale = 1.0 if load <= 1.0 else 1.0 / load
        return {i: (scale / works[i][0] if works[i][0] > 0 else math.inf) for i in res}

    def next_finish(s: int) -> float:
        r = rates(resident[s])
        return clock[s] + min(resident[s][i] / r[i] if r[i] != math.inf else 0.0 for i in resident[s])

    heap = [(next_finish(s), s) for s in range(sms) if resident[s]]
    heapq.heapify(heap)
    while heap:
        t, s = heapq.heappop(heap)
        res, r = resident[s], rates(resident[s])
        dt = t - clock[s]
        for i in list(res):
            res[i] = 0.0 if r[i] == math.inf else res[i] - dt * r[i]
            if res[i] <= 1e-9:
                del res[i]
        clock[s] = t
        while queue and len(res) < occ:
            res[queue.pop()] = 1.0
        if res:
            heapq.heappush(heap, (next_finish(s), s))
    return max(clock)


def predict(launch: Launch, m: Machine | None = None, iterations: int = 5) -> Prediction:
    """Predict one launch (see the module docstring for the composition)."""
    m = m or machine(launch.profile.arch)
    p = launch.profile
    occ_info = _sass.occupancy(m.arch, max(p.regs, 1), p.num_warps, p.shared_bytes)
    occ = max(1, occ_info.ctas_per_sm)
    w = p.num_warps
    trips = [tuple(launch.trips(i)) for i in range(launch.grid)]

    def loop_trips(t: Sequence[int], j: int) -> int:
        return t[j] if j < len(t) else 1

    requested = sum(
        p.fixed.gload_bytes * w + sum(loop_trips(t, j) * lp.gload_bytes * w for j, lp in enumerate(p.loops))
        for t in trips
    )
    f_dram = 1.0 if requested <= 0 else min(1.0, launch.hbm_bytes / requested)
    tp = [throughput_cycles(lp, w, m) for lp in p.loops]
    tp_fixed = throughput_cycles(p.fixed, w, m)
    tp_max = [max(x.values()) for x in tp]
    t_hbm = launch.hbm_bytes / m.hbm_bytes_per_s
    u, kernel_s, detail = 0.5, 0.0, {}
    for _ in range(iterations):
        lat = _latencies(m, f_dram, u, launch.dram_loads, launch.prefetch)
        alone = [
            max(warp_period(lp, lat), math.ceil(w / 4) * lp.instructions, tp_max[j]) for j, lp in enumerate(p.loops)
        ]
        fixed = max(warp_once(p.fixed, lat), max(tp_fixed.values()))
        works = [
            (fixed + sum(loop_trips(t, j) * alone[j] for j in range(len(p.loops))),
             max(tp_fixed.values()) + sum(loop_trips(t, j) * tp_max[j] for j in range(len(p.loops))))
            for t in trips
        ]  # fmt: skip
        t_sm = m.seconds(_makespan(works, occ, m.sms))
        kernel_s = max(t_sm, t_hbm)
        u_new = min(1.0, t_hbm / kernel_s) if kernel_s > 0 else 0.0
        detail = {"alone_cycles": alone, "fixed_cycles": fixed, "throughput_cycles": tp, "t_sm": t_sm, "u": u_new}
        if abs(u_new - u) < 1e-3:
            break
        u = u_new
    # device-level bounds
    bounds = {"hbm": t_hbm}
    lat_only = m.seconds(_makespan([(a, 0.0) for a, _ in works], occ, m.sms))
    bounds["latency"] = lat_only
    totals: dict[str, float] = {}
    for t in trips:
        for key, v in tp_fixed.items():
            totals[key] = totals.get(key, 0.0) + v
        for j, x in enumerate(tp):
            for key, v in x.items():
                totals[key] = totals.get(key, 0.0) + loop_trips(t, j) * v
    for key, v in totals.items():
        bounds[key] = m.seconds(v / m.sms)
    bounds["launch"] = launch.launches * m.launch_s
    resident = min(occ, launch.grid / m.sms) if launch.grid else 0
    it_bytes = [lp.gload_bytes * w for lp in p.loops]
    main = max(range(len(p.loops)), key=lambda j: sum(loop_trips(t, j) for t in trips)) if p.loops else None
    in_flight = 0.0
    dram_s = m.dram_latency_s * (1 + m.dram_latency_growth * u)
    if main is not None and detail["alone_cycles"][main] > 0:
        # Little's law per SM: a CTA keeps its iteration's loads in flight for the DRAM latency of each period
        in_flight = resident * it_bytes[main] * min(1.0, m.cycles(dram_s) / detail["alone_cycles"][main])
    empty = sum(1 for t in trips if p.loops and all(loop_trips(t, j) == 0 for j in range(len(p.loops))))
    binding = _binding(bounds, kernel_s)
    seconds = kernel_s + launch.launches * m.launch_s
    return Prediction(
        launch.name, seconds, kernel_s + launch.launches * m.graph_launch_s, kernel_s, bounds, binding, occ,
        occ_info.limit, launch.grid / (occ * m.sms), empty, launch.grid,
        min(1.0, t_hbm / kernel_s) if kernel_s else 0.0, in_flight, m.hbm_bytes_per_s * dram_s / m.sms, dram_s, detail,
    )  # fmt: skip


def _binding(bounds: dict[str, float], kernel_s: float) -> str:
    """The largest device-level bound (launch overhead apart): "hbm", "latency" (CTAs each alone: bytes in flight,
    dependence chains, waves), a pipe ("alu", "fp32", "lsu", "tensor", ...) or "issue"."""
    cands = {k: v for k, v in bounds.items() if k not in ("launch", "smem")}
    return max(cands, key=lambda k: cands[k])


def streaming_time(nbytes: float, flops: float = 0.0, m: Machine | None = None, launches: int = 1) -> float:
    """A bandwidth-bound kernel (cuBLAS GEMV, an elementwise pass) in this model: one DRAM round trip, then the
    larger of bytes at the achievable bandwidth and flops at the dense fp16 tensor peak, plus its launches."""
    m = m or machine(90)
    peak = m.tc_fp16_flops_per_clk * m.sms * m.clock_hz
    return m.dram_latency_s + max(nbytes / m.hbm_bytes_per_s, flops / peak) + launches * m.launch_s


def _main(argv: list[str] | None = None) -> int:
    import argparse

    # the launch shapes and the report live one module up (they import this one): imported here, at run time only
    from fastpeft.kernels import _perf_launches

    ap = argparse.ArgumentParser(prog="python -m fastpeft.kernels._perf", description=__doc__.splitlines()[0])
    ap.add_argument("--report", action="store_true", help="print fastpeft's kernels at Llama-3-8B shapes")
    ap.add_argument("--arch", type=int, default=90, choices=(80, 90))
    ap.add_argument("--markdown", metavar="FILE", help="also write the report to FILE")
    ap.add_argument("--constants", action="store_true", help="print the constants table")
    args = ap.parse_args(argv)
    if args.constants:
        print(format_constants())
    if args.report or not args.constants:
        text = _perf_launches.format_report(_perf_launches.report(args.arch), args.arch)
        print(text)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(text)
    return 0


def format_constants() -> str:
    """``CONSTANTS`` as a Markdown table."""
    rows = ["| constant | GPU | value | unit | source |", "|---|---|---|---|---|"]
    rows += [f"| {c.name} | {c.gpu} | {c.value:g} | {c.unit} | {c.source} |" for c in CONSTANTS]
    return "\n".join(rows)


if __name__ == "__main__":
    import sys

    sys.exit(_main())
