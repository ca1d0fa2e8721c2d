"""Inputs and expected outputs for the C library's ctest, written by fastpeft's Python path on a CUDA GPU.

    python csrc/test/write_vectors.py DIR       (exit 77, ctest's skip, without a GPU)

``DIR/index.txt`` holds one line per case; each tensor is raw little-endian bytes in ``DIR/<case>.<part>``.

- ``dequant NAME DTYPE NUMEL BLOCKSIZE DQ``: ``expected`` is ``nf4_dequantize``'s output; the library must
  reproduce its bytes (elementwise float32 math without contraction: the same on any launch).
- ``forward NAME DTYPE M N K R BLOCKSIZE DQ HAS_BIAS SCALING BOUND``: ``exact`` is the fp64 result from the
  float32-dequantized weight; ``BOUND`` is tests/conftest.py's oracle rule with the Python launcher
  (``lora_linear_fwd``, or ``nf4_linear_fwd`` for R = 0) as the eager result: 2 x its max error + 8 float32
  ulps of the result's scale. The shapes cover the decode kernel (M <= 64, K % 64 == 0; every BLOCK_M), the
  dequantize + tiled GEMM path, shapes that are not multiples of 16 (the ``any`` variants), R = 0 and R > 64.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

SKIP = 77
FP32_ULPS_FLOOR = 8  # tests/conftest.py
SLACK = 2.0
SANE = 2.0**-6
"""The Python path's own error, relative to the result's scale, past which it is no reference (16-bit outputs
round to 2^-9 or 2^-12 relative)."""

DEQUANT = [  # name, dtype, shape, blocksize, double quantization
    ("dq_bf16_4096", torch.bfloat16, (4096, 4096), 64, True),
    ("dq_f16_odd", torch.float16, (1000, 77), 128, False),
    ("dq_f32_odd", torch.float32, (333, 129), 256, True),
    ("dq_bf16_bs4096", torch.bfloat16, (64, 64), 4096, False),
]
FORWARD = [  # name, dtype, M, N, K, R, blocksize, double quantization, bias
    ("decode_m1", torch.bfloat16, 1, 4096, 4096, 16, 64, True, True),
    ("decode_m5_any", torch.float16, 5, 1000, 1024, 8, 128, False, False),
    ("decode_m16", torch.bfloat16, 16, 4096, 4096, 16, 64, True, True),
    ("decode_m40_r64", torch.float16, 40, 520, 2048, 64, 64, True, True),
    ("decode_m64_nolora", torch.bfloat16, 64, 1024, 512, 0, 64, True, True),
    ("prefill_m200", torch.bfloat16, 200, 4096, 4096, 16, 64, True, True),
    ("prefill_m77_any", torch.float16, 77, 1000, 1000, 8, 64, False, True),
    ("small_m3_k200", torch.bfloat16, 3, 256, 200, 4, 64, True, False),
    ("prefill_m300_r100", torch.float16, 300, 2048, 1024, 100, 256, True, True),
]


def _save(out: Path, name: str, part: str, t: torch.Tensor) -> None:
    t = t.detach().contiguous().cpu()
    (out / f"{name}.{part}").write_bytes(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _save_weight(out: Path, name: str, q) -> None:
    _save(out, name, "packed", q.packed)
    _save(out, name, "absmax", q.absmax)
    if q.nested_absmax is not None:
        _save(out, name, "nested", q.nested_absmax)
        _save(out, name, "offset", q.offset.reshape(1).float())


def main(out: Path) -> int:
    if not torch.cuda.is_available():
        print("no CUDA GPU: skipped")
        return SKIP
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1: the Python path must run its GPU kernels", file=sys.stderr)
        return 1
    from fastpeft import quantize_nf4
    from fastpeft.kernels.lora_linear import lora_linear_fwd, nf4_linear_fwd
    from fastpeft.kernels.nf4 import nf4_dequantize

    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device="cuda").manual_seed(20261201)
    lines = []
    for name, dtype, shape, bs, dq in DEQUANT:
        q = quantize_nf4(torch.randn(shape, device="cuda", generator=gen), blocksize=bs, double_quant=dq)
        nf4 = q.kernel_args()
        y = nf4_dequantize(
            nf4.packed, nf4.absmax, q.numel, dtype, blocksize=bs, nested_absmax=nf4.nested_absmax, offset=nf4.offset
        )
        _save_weight(out, name, nf4)
        _save(out, name, "expected", y)
        lines.append(f"dequant {name} {str(dtype)[6:]} {q.numel} {bs} {int(dq)}")
    for name, dtype, m, n, k, r, bs, dq, has_bias in FORWARD:
        w = torch.randn(n, k, device="cuda", generator=gen) / k**0.5
        q = quantize_nf4(w, blocksize=bs, double_quant=dq)
        nf4 = q.kernel_args()
        x = torch.randn(m, k, device="cuda", generator=gen).to(dtype)
        bias = torch.randn(n, device="cuda", generator=gen).to(dtype) if has_bias else None
        a = (torch.randn(r, k, device="cuda", generator=gen) / k**0.5).to(dtype)
        b = torch.randn(n, r, device="cuda", generator=gen).to(dtype)
        scaling = 2.0
        if r:
            y_py, _ = lora_linear_fwd(x, None, bias, a, b, scaling, nf4=nf4)
        else:
            y_py = nf4_linear_fwd(x, bias, nf4)
        w64 = q.dequantize(torch.float32).double().reshape(n, k)
        exact = x.double() @ w64.T + scaling * (x.double() @ a.double().T) @ b.double().T
        if bias is not None:
            exact += bias.double()
        eager_err = (y_py.double() - exact).abs().max().item()
        scale = max(exact.abs().max().item(), 1.0)
        if not eager_err <= SANE * scale:  # a bound from a broken reference would pass anything
            print(f"{name}: the Python path itself errs by {eager_err:.3e} at scale {scale:.3e}", file=sys.stderr)
            return 1
        floor = FP32_ULPS_FLOOR * torch.finfo(torch.float32).eps * scale
        _save_weight(out, name, nf4)
        _save(out, name, "x", x)
        if bias is not None:
            _save(out, name, "bias", bias)
        if r:
            _save(out, name, "a", a)
            _save(out, name, "b", b)
        _save(out, name, "exact", exact)
        lines.append(
            f"forward {name} {str(dtype)[6:]} {m} {n} {k} {r} {bs} {int(dq)} {int(has_bias)} {scaling} "
            f"{SLACK * eager_err + floor:.17g}"
        )
    (out / "index.txt").write_text("\n".join(lines) + "\n")
    print(f"{len(lines)} cases in {out} ({torch.cuda.get_device_name()})")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} DIR")
    sys.exit(main(Path(sys.argv[1])))
