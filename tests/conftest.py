"""Test harness: Triton's interpreter on CPU-only machines, markers, one tolerance table."""

from __future__ import annotations

import os
import zlib

import torch

# Before anything imports Triton: without a GPU, run every Triton kernel in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Elementwise tolerances per dtype, for results computed in that dtype from identical inputs.
# fp32: torch.testing's defaults. fp16 / bf16: a few units in the last place of the format
# (eps 9.8e-4 and 7.8e-3), the spread between fused and unfused rounding of one result.
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"atol": 1e-5, "rtol": 1.3e-6},
    torch.float16: {"atol": 1e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 1e-2, "rtol": 1.6e-2},
    torch.float64: {"atol": 1e-7, "rtol": 1e-7},
}


def stable_seed(*key) -> int:
    """A seed derived from ``key`` that is the same in every process (``hash()`` of str is not)."""
    return zlib.crc32(repr(key).encode())


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, msg: str = "") -> None:
    """``torch.testing.assert_close`` with the table's tolerance for ``dtype`` (default: ``actual``'s)."""
    tol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual, expected.to(actual.dtype), **tol, msg=lambda m: f"{msg}\n{m}")


FP32_ULPS_FLOOR = 8


def assert_oracle(
    actual: torch.Tensor, exact: torch.Tensor, eager: torch.Tensor, msg: str = "", slack: float = 2.0
) -> None:
    """The oracle rule for matmul paths: ``actual``'s error against the fp64 ``exact`` result is at
    most ``slack`` x the error of eager torch at the same precision, plus a floor of a few fp32 ulps of
    the result's scale: a float32 reduction in another order may by chance land a few ulps further from
    fp64 than eager did, while a real defect (a masked tile, a wrong scale) is off by far more."""
    exact = exact.double()
    err = (actual.double() - exact).abs()
    eager_err = (eager.double() - exact).abs().max().item()
    floor = FP32_ULPS_FLOOR * torch.finfo(torch.float32).eps * max(exact.abs().max().item(), 1.0)
    bound = slack * eager_err + floor
    worst = err.max().item()
    if worst > bound:
        idx = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        raise AssertionError(
            f"{msg}: max abs error {worst:.3e} at {idx} exceeds {slack}x eager's {eager_err:.3e} (+{floor:.1e})"
        )


def failing_move(fail_at: int):
    """A function for ``module._apply`` that "moves" tensors (copies them) and raises on call
    ``fail_at + 1``, as running out of memory on the target device halfway through a move does."""
    calls = [0]

    def fn(t: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if calls[0] > fail_at:
            raise RuntimeError("out of memory (injected)")
        return t.clone()

    return fn


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
