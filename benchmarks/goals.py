"""DESIGN.md's performance goals as data, and their verdicts from one run's rows.

Each goal names the rows it compares: an op and mode, fastpeft's provider (``ours``) and the anchor
(``base``) measured in the same run, and the shapes and token counts it covers. Its value over those cases
is the worst one (the smallest speedup or fraction, the largest overhead or memory ratio). The verdict is
``met`` / ``missed`` from rows measured on a GPU, else ``unmeasured``; the cost model's estimate
(``predicted`` columns) stands beside it, never in its place. The two static goals of the decode kernel
are read from the compile gate's records (they are static by definition).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .core import LABEL_MEASURED

__all__ = ["GOALS", "Goal", "GoalResult", "evaluate", "priority"]


def _dims(shape: str) -> tuple[int, int]:
    n, _, k = shape.partition("x")
    return (int(n), int(k)) if n.isdigit() and k.isdigit() else (0, 0)


@dataclass(frozen=True)
class Goal:
    key: str
    case: str
    target: str
    op: str = ""
    mode: str = ""
    ours: str = "fastpeft"
    base: str = ""
    kind: str = "speedup"
    """speedup (base / ours time >= threshold), overhead (ours / base - 1 <= threshold), fraction (ours'
    fraction of peak >= threshold), memory (ours / base peak memory <= threshold), static-ipw, static-roofline."""
    threshold: float = 1.0
    shapes: Callable[[int, int], bool] = field(default=lambda n, k: True)
    ms: Callable[[int], bool] = field(default=lambda m: True)
    priority: float = 50.0

    def covers(self, op: str, mode: str, provider: str, shape: str, m: int) -> bool:
        if self.kind.startswith("static") or op != self.op or mode != self.mode:
            return False
        if provider not in (self.ours, self.base):
            return False
        n, k = _dims(shape)
        return (self.op == "finetune_step" or self.shapes(n, k)) and self.ms(int(m))


_WIDE = lambda n, k: max(n, k) >= 14336  # noqa: E731  the 14336-wide projections of Llama-3-8B and wider
GOALS = (
    Goal("small-m-wide", "NF4+LoRA forward, M ≤ 16, 14336-wide", "≥ 3.0× bf16 F.linear", "qlora_linear", "fwd",
         base="dense-bf16-nolora", threshold=3.0, shapes=_WIDE, ms=lambda m: m <= 16, priority=100),
    Goal("small-m-square", "NF4+LoRA forward, M ≤ 16, 4096²-class (N = K)", "≥ 2.2× bf16 F.linear", "qlora_linear",
         "fwd", base="dense-bf16-nolora", threshold=2.2, shapes=lambda n, k: n == k, ms=lambda m: m <= 16, priority=99),
    Goal("decode-ipw", "NF4 decode kernel, M ≤ 16 (static)", "≤ 6 thread-instructions per decoded weight",
         kind="static-ipw", threshold=6.0),
    Goal("decode-roofline", "NF4 decode kernel, M ≤ 16 (static)", "≥ 80 % predicted roofline",
         kind="static-roofline", threshold=0.8),
    Goal("mid-m", "NF4+LoRA forward, M = 32–64, ≥ 8192-wide", "≥ 2× bf16 F.linear", "qlora_linear", "fwd",
         base="dense-bf16-nolora", threshold=2.0, shapes=lambda n, k: max(n, k) >= 8192, ms=lambda m: 32 <= m <= 64,
         priority=70),
    Goal("qlora-train-dense", "QLoRA fwd+bwd, M = 8192", "≥ 0.95× dense bf16 cuBLAS + LoRA", "qlora_linear",
         "fwd+bwd", base="dense-bf16", threshold=0.95, ms=lambda m: m == 8192, priority=95),
    Goal("qlora-train-bnb", "QLoRA fwd+bwd, M = 8192", "≥ 1.5× bitsandbytes + HF PEFT", "qlora_linear", "fwd+bwd",
         base="bnb", threshold=1.5, ms=lambda m: m == 8192, priority=94),
    Goal("lora-overhead-large", "LoRA overhead (NF4 forward), M ≥ 2048", "≤ 5 % over the same kernel without LoRA",
         "qlora_linear", "fwd", base="fastpeft-nolora", kind="overhead", threshold=0.05, ms=lambda m: m >= 2048,
         priority=80),
    Goal("lora-overhead-small", "LoRA overhead (NF4 forward), M ≤ 64", "≤ 10 % over the same kernel without LoRA",
         "qlora_linear", "fwd", base="fastpeft-nolora", kind="overhead", threshold=0.10, ms=lambda m: m <= 64,
         priority=79),
    Goal("dora-train", "QDoRA fwd+bwd, M = 2048–8192", "≤ 10 % over fastpeft LoRA on the same NF4 base", "dora",
         "fwd+bwd", base="fastpeft-lora", kind="overhead", threshold=0.10, ms=lambda m: 2048 <= m <= 8192,
         priority=78),
    Goal("dora-train-dense", "DoRA fwd+bwd (bf16 base), M = 2048–8192", "≤ 10 % over fastpeft LoRA on the same base",
         "dora_dense", "fwd+bwd", base="fastpeft-lora", kind="overhead", threshold=0.10,
         ms=lambda m: 2048 <= m <= 8192, priority=77),
    Goal("dora-decode", "QDoRA forward, M ≤ 16, eval (norm kept, no dense weight cached)",
         "≤ 5 % over fastpeft LoRA on the same NF4 base", "dora", "fwd", ours="fastpeft-eval", base="fastpeft-lora",
         kind="overhead", threshold=0.05, ms=lambda m: m <= 16, priority=76),
    Goal("dequant-bandwidth", "NF4 dequantize kernel", "≥ 90 % of HBM bandwidth", "nf4_dequant", "fwd",
         kind="fraction", threshold=0.9, priority=85),
    Goal("adapter-eager", "bottleneck adapter fwd+bwd, M ≥ 2048", "≥ 2× torch eager", "adapter", "fwd+bwd",
         base="reference", threshold=2.0, ms=lambda m: m >= 2048, priority=75),
    Goal("adapter-bandwidth", "bottleneck adapter fwd+bwd, M ≥ 2048", "≥ 70 % of HBM bandwidth", "adapter", "fwd+bwd",
         kind="fraction", threshold=0.7, ms=lambda m: m >= 2048, priority=74),
    Goal("step-speed", "end-to-end QLoRA step, Llama-3-8B shape",
         "≥ 2.5× tokens/s of transformers + PEFT + bitsandbytes", "finetune_step", "fwd+bwd+adamw", base="bnb",
         threshold=2.5, priority=90),
    Goal("step-memory", "end-to-end QLoRA step, Llama-3-8B shape", "≤ 0.3× its peak memory", "finetune_step",
         "fwd+bwd+adamw", base="bnb", kind="memory", threshold=0.3, priority=89),
)  # fmt: skip


def priority(op: str, mode: str, provider: str, shape: str, m: int) -> float:
    """The highest priority of the goals a case serves (0 for none)."""
    return max((g.priority for g in GOALS if g.covers(op, mode, provider, shape, m)), default=0.0)


@dataclass
class GoalResult:
    goal: Goal
    measured: float | None = None
    measured_at: str = ""
    measured_cases: int = 0
    predicted: float | None = None
    predicted_at: str = ""
    predicted_basis: str = ""
    """"cost model" when fastpeft's side rests on compile-gate records or the latency model, "roofline only" when
    on rooflines alone."""
    cases: int = 0
    verdict: str = "unmeasured"
    note: str = ""


def _num(value: object) -> float | None:
    try:
        return float(value) if value not in ("", None) else None
    except (TypeError, ValueError):
        return None


def _worse(goal: Goal, a: float, b: float) -> bool:
    """Whether ``a`` is worse than ``b`` for ``goal`` (the goal reports its worst case)."""
    return a < b if goal.kind in ("speedup", "fraction", "static-roofline") else a > b


def _met(goal: Goal, value: float) -> bool:
    return (
        value >= goal.threshold if goal.kind in ("speedup", "fraction", "static-roofline") else value <= goal.threshold
    )


def _value(goal: Goal, ours: dict, base: dict | None, measured: bool) -> float | None:
    if goal.kind == "fraction":
        return _num(ours.get("frac_of_peak" if measured else "predicted"))
    if base is None:
        return None
    if goal.kind == "memory":
        a, b = _num(ours.get("peak_mem_bytes")), _num(base.get("peak_mem_bytes"))
        return a / b if measured and a and b else None
    col = "p50_ms" if measured else "predicted_ms"
    a, b = _num(ours.get(col)), _num(base.get(col))
    if not a or not b:
        return None
    return b / a if goal.kind == "speedup" else a / b - 1.0


def _static(goal: Goal, records: list[dict]) -> GoalResult:
    res = GoalResult(goal)
    field_name = "thread_instructions_per_weight" if goal.kind == "static-ipw" else "predicted_roofline_fraction"
    for rec in records:
        v = _num(rec.get(field_name))
        if v is not None and (res.measured is None or _worse(goal, v, res.measured)):
            res.measured, res.measured_at = v, rec["case"]
        res.cases += 1
    res.measured_cases = res.cases
    if res.measured is None:
        res.note = "no compile-gate record"
    else:
        res.verdict = "met" if _met(goal, res.measured) else "missed"
        res.note = "static count from the compile gate (sm_90a), not a timing"
    return res


def evaluate(rows: list[dict], decode_records: list[dict] | None = None) -> list[GoalResult]:
    """Every goal's worst measured and predicted value over this run's rows, and its verdict."""
    results = []
    for goal in GOALS:
        if goal.kind.startswith("static"):
            results.append(_static(goal, decode_records or []))
            continue
        res = GoalResult(goal)
        groups: dict[tuple, dict[str, dict[str, dict]]] = {}
        for row in rows:
            if not goal.covers(row["op"], row["mode"], row["provider"], row["shape"], int(row["M"])):
                continue
            kind = "measured" if row.get("label") == LABEL_MEASURED else "other"
            groups.setdefault((row["shape"], int(row["M"])), {}).setdefault(kind, {})[row["provider"]] = row
            if row.get("predicted_ms") not in ("", None):
                groups[(row["shape"], int(row["M"]))].setdefault("predicted", {})[row["provider"]] = row
        for (shape, m), kinds in sorted(groups.items()):
            res.cases += 1
            where = f"{shape} M={m}"
            for kind, measured in (("measured", True), ("predicted", False)):
                found = kinds.get(kind, {})
                if goal.ours not in found:
                    continue
                v = _value(goal, found[goal.ours], found.get(goal.base), measured)
                if v is None:
                    continue
                if measured:
                    res.measured_cases += 1
                    if res.measured is None or _worse(goal, v, res.measured):
                        res.measured, res.measured_at = v, where
                elif res.predicted is None or _worse(goal, v, res.predicted):
                    res.predicted, res.predicted_at = v, where
                    basis = str(found[goal.ours].get("basis", ""))
                    gate = "gate " in basis or "latency model" in basis
                    res.predicted_basis = "cost model" if gate else "roofline only"
        if res.measured is not None:
            res.verdict = "met" if _met(goal, res.measured) else "missed"
            if res.measured_cases < res.cases:
                res.note = f"{res.measured_cases} of {res.cases} cases measured"
        results.append(res)
    return results
