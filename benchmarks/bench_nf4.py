"""NF4 dequantize benchmark: fastpeft's Triton kernel vs bitsandbytes vs torch eager, on a GPU.

Goal (DESIGN.md): >= 80% of HBM bandwidth (measured by a device-to-device copy in the same run) and
>= 1.5x bitsandbytes' ``dequantize_4bit``. Bytes moved per call: packed codes (numel / 2), the
uint8 absmax + nested statistics, and the 16-bit output (2 * numel).

    python benchmarks/bench_nf4.py --out benchmarks/results/nf4.csv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench, copy_bandwidth, measure_peak_memory, write_rows  # noqa: E402

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]


def _providers(w: torch.Tensor, dtype: torch.dtype, double_quant: bool):
    from fastpeft import quantize_nf4
    from fastpeft.kernels.reference import nf4_dequantize_reference

    q = quantize_nf4(w, double_quant=double_quant)
    yield "fastpeft", lambda: q.dequantize(dtype)
    kw = {"nested_absmax": q.nested_absmax, "offset": q.offset} if double_quant else {}
    yield "torch-eager", lambda: nf4_dequantize_reference(q.packed, q.absmax, q.numel, dtype, **kw)
    try:
        import bitsandbytes.functional as F
    except ImportError:
        return
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    state.dtype = dtype
    yield "bitsandbytes", lambda: F.dequantize_4bit(packed, state)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/nf4_dequantize.csv"))
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_nf4: needs a CUDA GPU", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    peak_gbps = copy_bandwidth()
    rows = []
    for n, k in SHAPES:
        w = torch.randn(n, k, device="cuda", dtype=dtype) * 0.02
        for double_quant in (True, False):
            stats = (n * k // 64) * (1 if double_quant else 4) + 4 * (n * k // 64 // 256)
            nbytes = n * k // 2 + stats + n * k * 2
            for provider, fn in _providers(w, dtype, double_quant):
                t = bench(fn)
                gbps = nbytes / (t["p50_ms"] * 1e-3) / 1e9
                rows.append(
                    dict(op="nf4_dequantize", provider=provider, mode="dq" if double_quant else "plain",
                         shape=f"{n}x{k}", M=0, dtype=args.dtype, **t, tflops=0.0, gbps=gbps,
                         frac_of_peak=gbps / peak_gbps, peak_mem_bytes=measure_peak_memory(fn))
                )  # fmt: skip
                print(f"{provider:14s} {n}x{k} dq={double_quant}: {t['p50_ms']:.4f} ms  {gbps:7.1f} GB/s "
                      f"({gbps / peak_gbps:.0%} of copy)")  # fmt: skip
    write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
