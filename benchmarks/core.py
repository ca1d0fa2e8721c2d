"""The suite's one measuring core: cases, timing, the run's peaks, work fractions, environment and the CSV.

Every op module (``bench_nf4``, ``bench_lora_linear``, ``bench_adapter``, ``bench_finetune``) describes its
work as ``Case`` objects; ``measure`` times one case the same way for all of them:

* on a GPU, ``triton.testing.do_bench`` (median with p20 / p80; it flushes L2 before every call), or
  ``do_bench_cudagraph`` for microsecond kernels, whose inputs the op rotates past L2 (``copies_past_l2``)
  because a graph replay does not flush it; peak memory from ``torch.cuda.max_memory_allocated``;
* on the CPU, a ``time.perf_counter`` loop with the same quantiles. A CPU row times the reference path
  (fastpeft's CPU dispatch), bitsandbytes' or PEFT's CPU code on small shapes: it checks that the suite
  runs, and is labelled as no speed claim (``LABEL_CPU``).

Peaks come from the same run (``measure_peaks``): a large 16-bit matmul (TFLOP/s) and a device-to-device
copy (GB/s, read + write). A row's ``frac_of_peak`` is the larger of its compute and bandwidth fractions:
how close the call runs to its limiting resource.

The CSV is DESIGN.md's schema followed by ``EXTRA_COLUMNS`` (bitsandbytes version, the row's label, the
fastpeft dispatch path, the cost model's prediction and what it rests on, a note).
"""

from __future__ import annotations

import csv
import datetime
import functools
import importlib.metadata
import importlib.util
import math
import os
import statistics
import subprocess
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = [
    "ALL_COLUMNS",
    "COLUMNS",
    "EXTRA_COLUMNS",
    "LABEL_CPU",
    "LABEL_ESTIMATE",
    "LABEL_MEASURED",
    "Case",
    "OperandCache",
    "Peaks",
    "Prepared",
    "Timing",
    "copies_past_l2",
    "env_info",
    "measure",
    "measure_peaks",
    "provider_missing",
    "read_csv",
    "row_for",
    "short_call",
    "write_csv",
]

COLUMNS = [
    "op", "provider", "mode", "shape", "M", "dtype", "p50_ms", "p20_ms", "p80_ms", "tflops", "gbps",
    "frac_of_peak", "peak_mem_bytes", "gpu", "torch", "triton", "git_sha", "timestamp",
]  # fmt: skip
"""DESIGN.md's result schema, in its order."""
EXTRA_COLUMNS = ["bitsandbytes", "label", "path", "predicted", "predicted_ms", "basis", "note"]
"""``predicted``: the cost model's fraction of peak (an estimate, comparable to ``frac_of_peak``);
``predicted_ms`` the time it implies; ``basis`` which records and assumptions it rests on."""
ALL_COLUMNS = COLUMNS + EXTRA_COLUMNS

LABEL_MEASURED = "measured"
LABEL_CPU = "cpu: not a speed claim"
LABEL_ESTIMATE = "estimate"

_QUANTILES = (0.5, 0.2, 0.8)


@dataclass
class Prepared:
    """A case ready to time: ``fn()`` runs one call; ``grad_to_none`` are reset between calls."""

    fn: Callable[[], object]
    grad_to_none: list[torch.Tensor] | None = None
    cuda_graph: bool = False
    note: str = ""


@dataclass
class Case:
    """One measurement: an op by a provider on a shape, with the work it counts.

    ``prepare`` builds operands and returns the call (operands may come from an op module's cache, so
    cases of one shape share them). ``value`` orders the window plan (higher first) and ``cost_s`` is
    the plan's prior for the seconds it takes on a GPU, warm-up, autotune and compile included.
    ``family`` is the package the provider needs (see ``provider_missing``).
    """

    op: str
    provider: str
    mode: str
    shape: str
    m: int
    dtype: str
    flops: float
    nbytes: float
    prepare: Callable[[], Prepared] | None = None
    family: str = ""
    path: str = ""
    goals: tuple[str, ...] = ()
    value: float = 1.0
    cost_s: float = 1.0
    warm_key: str = ""
    """Cases with the same key share a one-time cost (autotune, torch.compile, a model file) that the first pays."""
    warm_cost_s: float = 0.0
    timeout_s: float | None = None
    measure_fn: Callable[[Case, Peaks], dict[str, object]] | None = None
    """Set by cases that measure themselves (the end-to-end step runs in a subprocess)."""
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str, str, str, int, str]:
        return (self.op, self.provider, self.mode, self.shape, self.m, self.dtype)

    def describe(self) -> str:
        return f"{self.op} {self.provider} {self.mode} {self.shape} M={self.m}"


@dataclass
class Peaks:
    """The run's measured peaks: a large 16-bit matmul and a device-to-device copy."""

    tflops: float
    gbps: float
    device: str
    matmul: str = ""
    copy: str = ""


@dataclass
class Timing:
    p50_ms: float
    p20_ms: float
    p80_ms: float
    peak_mem_bytes: int | None = None
    note: str = ""


def _cpu_quantiles(fn: Callable[[], object], rep_ms: float, min_reps: int = 5, max_reps: int = 200) -> list[float]:
    fn()  # warm-up
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or (time.perf_counter() - start) * 1e3 < rep_ms):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    qs = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return [statistics.median(times), qs[1], qs[7]]


def _gpu_quantiles(prep: Prepared, rep_ms: float) -> tuple[list[float], str]:
    import triton.testing

    if prep.cuda_graph:
        try:
            fn = prep.fn
            fn()  # compile and autotune outside the capture
            torch.cuda.synchronize()
            q = triton.testing.do_bench_cudagraph(
                fn, rep=rep_ms, quantiles=list(_QUANTILES), grad_to_none=prep.grad_to_none
            )
            return list(q), "cuda graph"
        except Exception as e:  # a provider that cannot be captured is timed without a graph
            torch.cuda.synchronize()
            note = f"no cuda graph ({type(e).__name__}), timed eagerly"
    else:
        note = ""
    q = triton.testing.do_bench(prep.fn, rep=rep_ms, quantiles=list(_QUANTILES), grad_to_none=prep.grad_to_none)
    return list(q), note


def _peak_memory(fn: Callable[[], object]) -> int:
    """Peak bytes allocated by one call of ``fn`` above what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def measure(prep: Prepared, device: str, rep_ms: float = 100.0) -> Timing:
    """Median, p20 and p80 milliseconds of ``prep.fn`` (and its peak memory on a GPU)."""
    if device == "cuda":
        prep.fn()  # warm-up: compile, autotune, lazy allocations
        q, note = _gpu_quantiles(prep, rep_ms)
        peak = _peak_memory(prep.fn)
    else:
        q, note, peak = _cpu_quantiles(prep.fn, rep_ms), "", None
    notes = "; ".join(n for n in (prep.note, note) if n)
    return Timing(q[0], q[1], q[2], peak, notes)


class OperandCache:
    """Operands shared by the cases of one shape, built on first use; past ``size`` entries the least
    recently used is dropped (so a run over many large shapes holds a few at a time)."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._items: OrderedDict[Hashable, object] = OrderedDict()

    def get(self, key: Hashable, build: Callable[[], object]) -> object:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        while len(self._items) >= self.size:
            self._items.popitem(last=False)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        value = build()
        self._items[key] = value
        return value

    def clear(self) -> None:
        self._items.clear()


def short_call(flops: float, nbytes: float) -> bool:
    """Whether a call is a microsecond kernel (under ~50 us at 1 PFLOP/s and 3 TB/s), where launch overhead
    would dominate a timing: such calls are timed in a CUDA graph, with inputs rotated past L2."""
    return flops / 1e15 + nbytes / 3e12 < 50e-6


def l2_bytes() -> int:
    """The current GPU's L2 size (50 MiB when torch does not report it)."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 0) or 50 << 20)


def copies_past_l2(nbytes: int, device: str, cap: int = 64) -> int:
    """How many copies of an operand set of ``nbytes`` to rotate through so that two full passes exceed L2
    (1 on the CPU, and for sets already larger than that)."""
    if device != "cuda" or nbytes <= 0:
        return 1
    return max(1, min(cap, math.ceil(2 * l2_bytes() / nbytes)))


def measure_peaks(device: str, dtype: torch.dtype, quick: bool = False) -> Peaks:
    """The run's peaks: a 16-bit ``n³`` matmul (n = 8192 on a GPU) and a device-to-device copy (1 GiB)."""
    if device == "cuda":
        n, nbytes = 8192, 1 << 30
    else:  # small: the CPU peaks only scale the CPU rows, which are no speed claim
        n, nbytes = (512 if quick else 1024), 1 << 26
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t_mm = measure(Prepared(lambda: a @ b), device).p50_ms
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t_cp = measure(Prepared(lambda: dst.copy_(src)), device).p50_ms
    tflops = 2 * n**3 / (t_mm * 1e-3) / 1e12
    gbps = 2 * nbytes / (t_cp * 1e-3) / 1e9
    name = str(dtype).removeprefix("torch.")
    return Peaks(tflops, gbps, device, f"{n}x{n}x{n} {name} matmul", f"{nbytes >> 20} MiB copy")


def row_for(case: Case, timing: Timing, peaks: Peaks, label: str) -> dict[str, object]:
    """A result row: the case, its timing and its work as TFLOP/s, GB/s and the fraction of the run's peaks."""
    seconds = timing.p50_ms * 1e-3
    tflops = case.flops / seconds / 1e12 if seconds > 0 else 0.0
    gbps = case.nbytes / seconds / 1e9 if seconds > 0 else 0.0
    frac = max(tflops / peaks.tflops if peaks.tflops else 0.0, gbps / peaks.gbps if peaks.gbps else 0.0)
    return {
        "op": case.op, "provider": case.provider, "mode": case.mode, "shape": case.shape, "M": case.m,
        "dtype": case.dtype, "p50_ms": timing.p50_ms, "p20_ms": timing.p20_ms, "p80_ms": timing.p80_ms,
        "tflops": tflops, "gbps": gbps, "frac_of_peak": frac,
        "peak_mem_bytes": "" if timing.peak_mem_bytes is None else timing.peak_mem_bytes,
        "label": label, "path": case.path, "note": timing.note,
    }  # fmt: skip


@functools.cache
def provider_missing(family: str) -> str | None:
    """Why a provider family cannot run here (None when it can): a package that is not installed, or
    ``torch.compile`` without a C++ compiler on the CPU. Found by name, not imported (importing
    bitsandbytes or peft takes seconds); a package that is installed but fails to load fails its cases,
    each with the error as its reason."""
    if family in ("", "fastpeft", "torch"):
        return None
    if family == "compile":
        import shutil

        if not torch.cuda.is_available() and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
            return "torch.compile on the CPU needs a C++ compiler (none on PATH)"
        return None
    missing = [m for m in family.split("+") if importlib.util.find_spec(m) is None]
    return f"{', '.join(missing)} not installed" if missing else None


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


@functools.cache
def _git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        )
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def env_info() -> dict[str, str]:
    """The environment columns: GPU name ("cpu" without one), torch, triton and bitsandbytes versions,
    git commit, UTC time."""
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": _version("triton"),
        "bitsandbytes": _version("bitsandbytes"),
        "git_sha": _git_sha(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _cell(value: object) -> object:
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def write_csv(path: Path | str, rows: Sequence[dict[str, object]], env: dict[str, str] | None = None) -> None:
    """Write ``rows`` to ``path`` with the header ``ALL_COLUMNS``, atomically (temp file + rename).

    Environment columns a row leaves out come from ``env`` (default ``env_info()``); a key outside the
    schema is an error."""
    path = Path(path)
    env = env or env_info()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".csv.tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=ALL_COLUMNS)
            w.writeheader()
            for row in rows:
                unknown = set(row) - set(ALL_COLUMNS)
                if unknown:
                    raise ValueError(f"row has columns outside the schema: {sorted(unknown)}")
                w.writerow({k: _cell(v) for k, v in {**env, **row}.items()})
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_csv(path: Path | str) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
