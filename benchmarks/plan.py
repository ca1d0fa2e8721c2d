"""The window plan: which cases to measure, in what order, within a time budget.

A GPU is often lent for minutes. ``--budget SECONDS`` orders the cases by value and measures them until
the next one would not fit, then lists the rest as skipped with the reason. Value: the priority of the
DESIGN.md goals a case serves (``goals.priority``: fastpeft and its anchor on the goal's shapes) first;
then one case of every (op, provider) not yet covered, so each provider shows up early; then the rest
of the matrix (fastpeft, then the anchors, eager, PEFT and bitsandbytes, ``torch.compile`` last: each
of its cases compiles anew). Ties go to the cheaper case.

A case's estimate is its prior (``Case.cost_s``) scaled by what the run has observed so far (measured /
estimated seconds of the cases done), plus its one-time cost (``warm_cost_s``: autotune, a compile, a
model file) when it is the first of its ``warm_key``. Triton's compiled kernels and, with
``TRITON_CACHE_AUTOTUNING=1`` (benchmarks/gpu_check.sh sets it), its autotune choices are cached on
disk, so a rerun in the same window pays them once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .core import Case
from .goals import priority

__all__ = ["Plan", "order"]

_PROVIDER_VALUE = {
    "fastpeft": 3.0, "fastpeft-nolora": 2.5, "fastpeft-lora": 2.5, "fastpeft-eval": 2.5, "dense-bf16": 2.0,
    "dense-bf16-nolora": 2.0, "bnb": 2.0, "peft": 1.5,
    "reference": 1.0, "compiled": 0.5,
}  # fmt: skip
_COVERAGE_BONUS = 20.0


def order(cases: list[Case]) -> list[Case]:
    """``cases`` by value (highest first), setting each ``Case.value``."""
    for c in cases:
        c.value = priority(c.op, c.mode, c.provider, c.shape, c.m) or 10.0 + _PROVIDER_VALUE.get(c.provider, 1.0)
    covered = {(c.op, c.provider) for c in cases if c.value > 10.0 + max(_PROVIDER_VALUE.values())}
    for c in sorted(cases, key=lambda c: (c.cost_s + c.warm_cost_s, c.m, c.shape)):
        if (c.op, c.provider) not in covered:
            covered.add((c.op, c.provider))
            c.value += _COVERAGE_BONUS
    return sorted(cases, key=lambda c: (-c.value, c.cost_s, c.op, c.shape, c.m, c.provider, c.mode))


@dataclass
class Plan:
    """Admits cases while they fit in ``budget_s`` (None: all), learning how long cases take here."""

    budget_s: float | None = None
    reserve_s: float = 0.0
    """Seconds kept for what follows the measurements (estimates, summary, plots)."""
    elapsed_s: float = 0.0
    warmed: set[str] = field(default_factory=set)
    observed_s: float = 0.0
    estimated_s: float = 0.0

    @property
    def scale(self) -> float:
        """Observed over estimated seconds so far, within [0.25, 4] (1 before the first case)."""
        if self.estimated_s <= 0:
            return 1.0
        return min(4.0, max(0.25, self.observed_s / self.estimated_s))

    def estimate(self, case: Case) -> float:
        warm = case.warm_cost_s if case.warm_key and case.warm_key not in self.warmed else 0.0
        return (case.cost_s + warm) * self.scale

    def admit(self, case: Case) -> str | None:
        """None when ``case`` fits in what is left of the budget, else why it is skipped."""
        if self.budget_s is None:
            return None
        left = self.budget_s - self.reserve_s - self.elapsed_s
        est = self.estimate(case)
        if est > left:
            return f"budget: needs ~{est:.0f} s, {max(left, 0):.0f} s left of --budget {self.budget_s:.0f}"
        return None

    def record(self, case: Case, seconds: float) -> None:
        """Count ``seconds`` spent on ``case`` (measured or failed) against the budget and the estimates."""
        self.estimated_s += case.cost_s + (
            case.warm_cost_s if case.warm_key and case.warm_key not in self.warmed else 0
        )
        self.observed_s += seconds
        self.elapsed_s += seconds
        if case.warm_key:
            self.warmed.add(case.warm_key)
