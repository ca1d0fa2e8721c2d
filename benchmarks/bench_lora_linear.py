"""LoRA / QLoRA linear benchmark: fastpeft's fused kernels against the unfused alternatives, on a GPU.

Providers (a provider whose package is missing is skipped with a notice):

* ``fastpeft-nf4``: ``fastpeft.ops.lora.lora_linear`` on an NF4 (double-quantized) base: the fused
  dequantize-in-registers GEMM with the LoRA epilogue.
* ``fastpeft-nf4-nolora``: ``fastpeft.ops.lora.nf4_linear``, the same compiled GEMM with R = 0 (no LoRA
  term; its backward is dX alone): the LoRA overhead is ``fastpeft-nf4 / fastpeft-nf4-nolora - 1`` in the
  forward (goal: <= 5% at M >= 2048, <= 10% at M <= 64).
* ``fastpeft-dequant-cublas``: dequantize-once: NF4 -> the input dtype with fastpeft's dequantize kernel
  every call, then cuBLAS ``F.linear`` + the LoRA term; autograd keeps the dense W for dX (its memory
  shows in ``peak_mem_bytes``). Beside ``fastpeft-nf4`` it measures where, as M grows, a dense cuBLAS
  GEMM after one dequantize pass overtakes the fused kernel's in-register dequantize: the data for a
  large-M dispatch rule (DESIGN.md: QLoRA fwd+bwd at M = 8192, dequant-once + cuBLAS ≈ 0.96x dense).
* ``fastpeft-dense``: the same op on a dense 16-bit base.
* ``torch-dense``: ``F.linear`` on the dense 16-bit weight + two ``F.linear`` for LoRA (cuBLAS).
* ``torch-dequant-nf4``: dequantize the NF4 weight with fastpeft's reference (torch eager ops) every
  call, then the ``torch-dense`` chain.
* ``bnb-peft-nf4``: bitsandbytes ``Linear4bit`` (nf4, double quant) wrapped by HF PEFT's LoRA.

Shapes: Llama-3-8B projections ``N x K`` = 4096x4096 (q/o), 1024x4096 (k/v), 14336x4096 (gate/up),
4096x14336 (down); ``M`` in {1, 16, 64, 256, 2048, 8192}; r = 16; modes ``fwd`` and ``fwd+bwd``
(gradients for x and the LoRA factors; the base is frozen). Timing: ``triton.testing.do_bench`` median
with p20 / p80 (L2 flushed between runs, so weights are read from HBM as in a real step), CUDA graphs
for the forward at M <= 64 where launch overhead would dominate. Peaks are measured in the same run
(a large matmul and a device-to-device copy); ``frac_of_peak`` is the larger of the compute and the
bandwidth fraction, i.e. how close the call is to its limiting resource. Counted work: forward
``2·M·N·K + 2·M·R·(K + N)`` flops, fwd+bwd twice the base product plus four skinny LoRA products;
bytes: the base weight as stored (NF4: ``N·K/2`` + statistics) plus 16-bit X and Y (and dY, dX).

    python benchmarks/bench_lora_linear.py --out benchmarks/results/lora_linear.csv
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench, copy_bandwidth, matmul_peak, measure_peak_memory, write_rows  # noqa: E402

SHAPES = {
    "4096x4096": (4096, 4096),
    "1024x4096": (1024, 4096),
    "14336x4096": (14336, 4096),
    "4096x14336": (4096, 14336),
}
M_VALUES = (1, 16, 64, 256, 2048, 8192)
PROVIDERS = (
    "fastpeft-nf4",
    "fastpeft-nf4-nolora",
    "fastpeft-dequant-cublas",
    "fastpeft-dense",
    "torch-dense",
    "torch-dequant-nf4",
    "bnb-peft-nf4",
)
# providers whose base is the NF4 weight (bytes counted as stored) and those without a LoRA term
NF4_BASE = ("fastpeft-nf4", "fastpeft-nf4-nolora", "fastpeft-dequant-cublas", "torch-dequant-nf4", "bnb-peft-nf4")
NO_LORA = ("fastpeft-nf4-nolora",)
MODES = ("fwd", "fwd+bwd")


class _Layer:
    """One projection's operands, shared by every provider: the dense weight, its NF4 form, LoRA factors."""

    def __init__(self, n: int, k: int, r: int, dtype: torch.dtype, device: str = "cuda") -> None:
        from fastpeft import quantize_nf4

        self.n, self.k, self.r, self.dtype, self.device = n, k, r, dtype, device
        self.weight = (torch.randn(n, k, device=device) * 0.02).to(dtype)
        self.nf4 = quantize_nf4(self.weight, double_quant=True)
        self.lora_a = (torch.randn(r, k, device=device) * 0.02).to(dtype).requires_grad_()
        self.lora_b = (torch.randn(n, r, device=device) * 0.02).to(dtype).requires_grad_()
        self.scaling = 2.0


def _providers(layer: _Layer, names: tuple[str, ...]) -> Iterator[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
    """``(name, f)`` with ``f(x) -> y`` differentiable in x and the LoRA factors."""
    from fastpeft.kernels.nf4 import nf4_dequantize
    from fastpeft.kernels.reference import nf4_dequantize_reference
    from fastpeft.ops.lora import lora_linear, nf4_linear

    a, b, s, nf4 = layer.lora_a, layer.lora_b, layer.scaling, layer.nf4
    args = nf4.kernel_args()
    if "fastpeft-nf4" in names:
        yield "fastpeft-nf4", lambda x: lora_linear(x, None, None, a, b, s, nf4=args)
    if "fastpeft-nf4-nolora" in names:
        yield "fastpeft-nf4-nolora", lambda x: nf4_linear(x, None, args)

    def dequant_cublas(x: torch.Tensor) -> torch.Tensor:
        w = nf4_dequantize(
            args.packed, args.absmax, layer.n * layer.k, x.dtype, blocksize=args.blocksize,
            nested_absmax=args.nested_absmax, offset=args.offset, quant_map=args.quant_map,
            nested_quant_map=args.nested_quant_map, nested_blocksize=args.nested_blocksize,
        ).view(layer.n, layer.k)  # fmt: skip
        return F.linear(x, w) + s * F.linear(F.linear(x, a), b)

    if "fastpeft-dequant-cublas" in names:
        yield "fastpeft-dequant-cublas", dequant_cublas
    if "fastpeft-dense" in names:
        yield "fastpeft-dense", lambda x: lora_linear(x, layer.weight, None, a, b, s)
    if "torch-dense" in names:
        yield "torch-dense", lambda x: F.linear(x, layer.weight) + s * F.linear(F.linear(x, a), b)

    def dequant_chain(x: torch.Tensor) -> torch.Tensor:
        w = nf4_dequantize_reference(
            nf4.packed, nf4.absmax, layer.n * layer.k, layer.dtype,
            nested_absmax=nf4.nested_absmax, offset=nf4.offset,
        ).view(layer.n, layer.k)  # fmt: skip
        return F.linear(x, w) + s * F.linear(F.linear(x, a), b)

    if "torch-dequant-nf4" in names:
        yield "torch-dequant-nf4", dequant_chain
    if "bnb-peft-nf4" in names:
        model = _bnb_peft_model(layer)
        if model is not None:
            yield "bnb-peft-nf4", model


def _bnb_peft_model(layer: _Layer) -> torch.nn.Module | None:
    try:
        import bitsandbytes as bnb
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        print(f"bnb-peft-nf4: skipped ({e})", file=sys.stderr)
        return None

    class _Proj(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = bnb.nn.Linear4bit(
                layer.k, layer.n, bias=False, compute_dtype=layer.dtype, compress_statistics=True, quant_type="nf4"
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    module = _Proj()
    module.proj.weight = bnb.nn.Params4bit(layer.weight.cpu(), requires_grad=False, quant_type="nf4")
    module = module.to(layer.device)
    config = LoraConfig(r=layer.r, lora_alpha=int(layer.scaling * layer.r), target_modules=["proj"], lora_dropout=0.0)
    model = get_peft_model(module, config)
    # the same adapter values as the other providers (kept in PEFT's default float32, as its users run them)
    proj = model.base_model.model.proj
    with torch.no_grad():
        proj.lora_A["default"].weight.copy_(layer.lora_a.float())
        proj.lora_B["default"].weight.copy_(layer.lora_b.float())
    return model


def _work(layer: _Layer, m: int, mode: str, nf4_base: bool, has_lora: bool = True) -> tuple[float, float]:
    """(flops, bytes) of one call."""
    n, k, r = layer.n, layer.k, layer.r
    base = 2 * m * n * k
    lora = 2 * m * r * (k + n) if has_lora else 0
    w_bytes = n * k // 2 + (n * k // 64) + 4 * (n * k // 64 // 256) if nf4_base else 2 * n * k
    act = 2 * m * (k + n)
    if mode == "fwd":
        return base + lora, w_bytes + act
    return 2 * base + 3 * lora, 2 * w_bytes + 2 * act


def run(layer: _Layer, shape: str, m: int, modes: tuple[str, ...], names: tuple[str, ...], peaks: dict) -> list[dict]:
    rows = []
    x = torch.randn(m, layer.k, device="cuda", dtype=layer.dtype)
    xg = x.clone().requires_grad_()
    dy = torch.randn(m, layer.n, device="cuda", dtype=layer.dtype)
    dtype_name = str(layer.dtype).removeprefix("torch.")
    for provider, f in _providers(layer, names):
        for mode in modes:
            if mode == "fwd":

                def call(f=f) -> None:
                    with torch.no_grad():
                        f(x)

                grads = None
            else:

                def call(f=f) -> None:
                    f(xg).backward(dy)

                grads = [xg, layer.lora_a, layer.lora_b]
            call()  # compile and autotune outside the measurement
            t = None
            if mode == "fwd" and m <= 64:
                try:
                    t = bench(call, cuda_graph=True)
                except Exception as e:  # a provider that cannot be captured is timed without a graph
                    print(f"{provider}: no CUDA graph ({type(e).__name__}), timing eagerly", file=sys.stderr)
            if t is None:
                t = bench(call, grad_to_none=grads)
            flops, nbytes = _work(layer, m, mode, nf4_base=provider in NF4_BASE, has_lora=provider not in NO_LORA)
            tflops = flops / (t["p50_ms"] * 1e-3) / 1e12
            gbps = nbytes / (t["p50_ms"] * 1e-3) / 1e9
            frac = max(tflops / peaks["tflops"], gbps / peaks["gbps"])
            rows.append(
                dict(op="lora_linear", provider=provider, mode=mode, shape=shape, M=m, dtype=dtype_name, **t,
                     tflops=tflops, gbps=gbps, frac_of_peak=frac, peak_mem_bytes=measure_peak_memory(call))
            )  # fmt: skip
            print(f"{shape:>11s} M={m:<5d} {mode:8s} {provider:18s} {t['p50_ms']:9.4f} ms  {tflops:7.1f} TFLOP/s "
                  f"{gbps:7.1f} GB/s  {frac:5.1%} of peak")  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/lora_linear.csv"))
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--m", type=int, nargs="+", default=list(M_VALUES), help="token counts M")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_lora_linear: needs a CUDA GPU", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    peaks = {"gbps": copy_bandwidth(), "tflops": matmul_peak(dtype)}
    print(f"{torch.cuda.get_device_name()}: copy {peaks['gbps']:.0f} GB/s, matmul {peaks['tflops']:.0f} TFLOP/s")
    rows = []
    for shape in args.shapes:
        n, k = SHAPES[shape]
        layer = _Layer(n, k, args.rank, dtype)
        for m in args.m:
            rows += run(layer, shape, m, tuple(args.modes), tuple(args.providers), peaks)
        del layer
        torch.cuda.empty_cache()
    write_rows(args.out, rows)
    print(f"{len(rows)} rows -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
