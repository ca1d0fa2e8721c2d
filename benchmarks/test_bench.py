"""The suite's cases under pytest-benchmark: ``pytest benchmarks/ --benchmark-only``.

The same cases ``fastpeft bench --quick`` measures (on a GPU: the DESIGN.md goal cases and one case of every
provider; without one: the small CPU cases, no speed claim), timed by pytest-benchmark's own loop with
its statistics, comparison and ``--benchmark-json`` export. A provider whose package is missing is skipped
with the reason. The end-to-end step is left to ``fastpeft bench`` (one subprocess per provider).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from .core import Case, provider_missing
from .plan import order
from .spec import OPS, Spec
from .suite import collect

_GPU = torch.cuda.is_available()


def _cases() -> list[Case]:
    spec = Spec(ops=tuple(op for op in OPS if op != "finetune_step"), device="cuda" if _GPU else "cpu", quick=True)
    if not _GPU:
        spec = spec.cpu_variant()
    cases = order(collect(spec))
    return [c for c in cases if c.value > 20.0] if _GPU else cases


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    """On the CPU one intra-op thread, as ``fastpeft bench`` runs it (steadier on a shared machine)."""
    threads = torch.get_num_threads()
    if not _GPU:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c.describe().replace(" ", "-"))
def test_case(benchmark, case: Case) -> None:
    reason = provider_missing(case.family)
    if reason:
        pytest.skip(reason)
    prep = case.prepare()
    fn = prep.fn
    if _GPU:

        def call() -> None:
            fn()
            torch.cuda.synchronize()
    else:
        call = fn
    call()  # warm-up: compile, autotune
    benchmark.extra_info.update({k: v for k, v in dataclasses.asdict(case).items() if isinstance(v, (str, int, float))})
    benchmark.extra_info["device"] = "cuda" if _GPU else "cpu (no speed claim)"
    benchmark(call)
