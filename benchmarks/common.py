"""Shared benchmark plumbing: timing, the run's measured peaks, environment facts and the CSV schema.

Every benchmark script writes rows with the columns of ``COLUMNS`` (DESIGN.md, "Performance targets").
``write_rows`` fills the environment columns (gpu, torch, triton, git_sha, timestamp) a row leaves out
and appends atomically (temp file + rename). Peaks come from the same run: ``copy_bandwidth`` (a
device-to-device copy, GB/s) and ``matmul_peak`` (a large 16-bit matmul, TFLOP/s).

Import from a script in this directory as ``from common import bench, ...`` after putting the directory
on ``sys.path`` (the scripts are run as files, not as a package).
"""

from __future__ import annotations

import csv
import datetime
import functools
import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = [
    "COLUMNS",
    "bench",
    "copy_bandwidth",
    "env_info",
    "matmul_peak",
    "measure_peak_memory",
    "write_rows",
]

COLUMNS = [
    "op", "provider", "mode", "shape", "M", "dtype", "p50_ms", "p20_ms", "p80_ms", "tflops", "gbps",
    "frac_of_peak", "peak_mem_bytes", "gpu", "torch", "triton", "git_sha", "timestamp",
]  # fmt: skip


def bench(
    fn: Callable[[], object],
    *,
    grad_to_none: list[torch.Tensor] | None = None,
    cuda_graph: bool = False,
    rep_ms: int = 100,
) -> dict[str, float]:
    """Median and p20 / p80 milliseconds of ``fn`` on the current CUDA device.

    ``triton.testing.do_bench`` (which flushes L2 between runs) by default; with ``cuda_graph``,
    ``do_bench_cudagraph``, which removes launch overhead for microsecond kernels (``fn`` must then be
    capturable: no host synchronisation, no allocation that changes between calls).
    """
    import triton.testing

    q = [0.5, 0.2, 0.8]
    if cuda_graph:
        fn()  # compile and autotune outside the capture
        torch.cuda.synchronize()
        p50, p20, p80 = triton.testing.do_bench_cudagraph(fn, rep=rep_ms, quantiles=q, grad_to_none=grad_to_none)
    else:
        p50, p20, p80 = triton.testing.do_bench(fn, rep=rep_ms, quantiles=q, grad_to_none=grad_to_none)
    return {"p50_ms": p50, "p20_ms": p20, "p80_ms": p80}


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s, counting read and write bytes: the run's HBM peak."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src))
    return 2 * nbytes / (t["p50_ms"] * 1e-3) / 1e9


def matmul_peak(dtype: torch.dtype = torch.bfloat16, n: int = 8192) -> float:
    """TFLOP/s of a large ``n x n x n`` cuBLAS matmul in ``dtype``: the run's compute peak."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    t = bench(lambda: a @ b)
    return 2 * n**3 / (t["p50_ms"] * 1e-3) / 1e12


def measure_peak_memory(fn: Callable[[], object]) -> int:
    """Peak bytes allocated by one call of ``fn`` above what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


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
    """The environment columns of a row: GPU name, torch and triton versions, git commit, UTC time."""
    import triton

    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "git_sha": _git_sha(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_rows(path: Path | str, rows: list[dict[str, object]]) -> None:
    """Append ``rows`` to the CSV at ``path`` (header when new), atomically: temp file + rename.

    Missing environment columns are filled by ``env_info()``; a key outside ``COLUMNS`` is an error.
    """
    path = Path(path)
    env = env_info()
    full = []
    for row in rows:
        unknown = set(row) - set(COLUMNS)
        if unknown:
            raise ValueError(f"row has columns outside the schema: {sorted(unknown)}")
        full.append({**env, **row})
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text().splitlines(keepends=True) if path.exists() else []
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".csv.tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.writelines(old)
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            if not old:
                w.writeheader()
            w.writerows(full)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
