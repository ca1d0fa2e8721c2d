"""Bottleneck adapter benchmark: fastpeft's fused op vs torch eager and torch.compile, on a GPU.

Goal (DESIGN.md): forward+backward >= 2x torch eager and >= 70% of HBM bandwidth, the peak measured
by a device-to-device copy in the same run. Default case: M = 8192 tokens, H = 4096, b = 256, bf16.

Bytes counted (the unavoidable traffic of the math, not of any one implementation): forward reads h
and writes y (2·M·H elements); backward reads dY and h and writes dh (3·M·H); plus the weights and
their gradients (4·H·b each way, small). FLOPs: 4·M·H·b forward, 8·M·H·b backward.

    python benchmarks/bench_adapter.py --out benchmarks/results/adapter.csv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench, copy_bandwidth, measure_peak_memory, write_rows  # noqa: E402

DEVICE = "cuda"
_TORCH_ACT = {
    "relu": F.relu,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
}


class EagerAdapter(nn.Module):
    """The same adapter in plain torch: ``r + s·up(act(down(h)))`` (what HF / AdapterHub layers run)."""

    def __init__(self, hidden: int, bottleneck: int, act: str, scaling: float) -> None:
        super().__init__()
        self.down, self.up = nn.Linear(hidden, bottleneck), nn.Linear(bottleneck, hidden)
        self.act, self.scaling = _TORCH_ACT[act], scaling

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.scaling * self.up(self.act(self.down(h)))


def _providers(hidden: int, bottleneck: int, act: str, dtype: torch.dtype):
    from fastpeft.nn import BottleneckAdapter

    torch.manual_seed(0)
    eager = EagerAdapter(hidden, bottleneck, act, 0.5).to(DEVICE, dtype)
    nn.init.normal_(eager.up.weight, std=0.02)  # non-zero, so every gradient path does real work
    ours = BottleneckAdapter(hidden, bottleneck, act, scaling=0.5).to(DEVICE, dtype)
    ours.load_state_dict(eager.state_dict())
    yield "fastpeft", ours
    yield "torch-eager", eager
    yield "torch-compile", torch.compile(eager)


def run(m: int, hidden: int, bottleneck: int, act: str, dtype: torch.dtype, peak_gbps: float) -> list[dict]:
    h = torch.randn(m, hidden, device=DEVICE, dtype=dtype).requires_grad_()
    dy = torch.randn_like(h)
    el = h.element_size()
    w_bytes = 2 * hidden * bottleneck * el
    traffic = {"fwd": 2 * m * hidden * el + w_bytes, "fwd+bwd": 5 * m * hidden * el + 3 * w_bytes}
    flops = {"fwd": 4 * m * hidden * bottleneck, "fwd+bwd": 12 * m * hidden * bottleneck}
    rows, reference_y = [], None
    for provider, module in _providers(hidden, bottleneck, act, dtype):
        params = list(module.parameters())
        with torch.no_grad():
            y = module(h)
        if reference_y is None:
            reference_y = y.float()
        diff = (y.float() - reference_y).abs().max().item()

        def fwd(module=module):
            with torch.no_grad():
                module(h)

        def fwd_bwd(module=module):
            module(h).backward(dy)

        for mode, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            fn()  # warm-up (compilation, autotune) outside the measurement and the memory peak
            t = bench(fn, grad_to_none=[h, *params])
            gbps = traffic[mode] / (t["p50_ms"] * 1e-3) / 1e9
            row = dict(
                op="bottleneck_adapter", provider=provider, mode=mode, shape=f"{hidden}x{bottleneck}", M=m,
                dtype=str(dtype).removeprefix("torch."), **t, tflops=flops[mode] / (t["p50_ms"] * 1e-3) / 1e12,
                gbps=gbps, frac_of_peak=gbps / peak_gbps, peak_mem_bytes=measure_peak_memory(fn),
            )  # fmt: skip
            rows.append(row)
            print(f"{provider:14s} {mode:8s} {t['p50_ms']:8.3f} ms  {gbps:7.1f} GB/s ({gbps / peak_gbps:4.0%} of copy)"
                  f"  {row['tflops']:6.1f} TFLOP/s  max |y - fastpeft| {diff:.2e}")  # fmt: skip
    by = {(r["provider"], r["mode"]): r["p50_ms"] for r in rows}
    for mode in ("fwd", "fwd+bwd"):
        print(f"{mode}: {by[('torch-eager', mode)] / by[('fastpeft', mode)]:.2f}x eager, "
              f"{by[('torch-compile', mode)] / by[('fastpeft', mode)]:.2f}x torch.compile")  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/adapter.csv"))
    p.add_argument("--m", type=int, default=8192, help="tokens (rows of h)")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--bottleneck", type=int, nargs="+", default=[256])
    p.add_argument("--activation", choices=sorted(_TORCH_ACT), default="relu")
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_adapter: needs a CUDA GPU", file=sys.stderr)
        return 2
    peak = copy_bandwidth()
    print(f"copy bandwidth {peak:.0f} GB/s on {torch.cuda.get_device_name()}")
    rows = []
    for b in args.bottleneck:
        rows += run(args.m, args.hidden, b, args.activation, getattr(torch, args.dtype), peak)
    write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
