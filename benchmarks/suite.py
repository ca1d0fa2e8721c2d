"""One run of the suite: collect the cases, skip what cannot run (with the reason), measure in plan order,
attach the cost model's predictions, then write the CSV, ``manifest.json``, ``summary.md`` and the plots.

On a GPU the cases of ``Spec`` are measured there and every one also gets its predicted figure. Without
a GPU the same ops and providers run on small CPU shapes (labelled: no speed claim), and every GPU case
of ``Spec`` that the cost model covers gets an estimate row instead (label ``estimate``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import (
    bench_adapter,
    bench_dora,
    bench_finetune,
    bench_lora_linear,
    bench_lora_mixed,
    bench_loss,
    bench_nf4,
)
from .core import (
    LABEL_CPU,
    LABEL_ESTIMATE,
    LABEL_MEASURED,
    Case,
    env_info,
    measure,
    measure_peaks,
    provider_missing,
    row_for,
    write_csv,
)  # fmt: skip
from .goals import GoalResult, evaluate
from .plan import Plan, order
from .predict import Component, Predictor
from .spec import Spec

__all__ = ["MODULES", "RunResult", "collect", "run"]

MODULES = (bench_nf4, bench_lora_linear, bench_dora, bench_adapter, bench_lora_mixed, bench_loss, bench_finetune)
_MODULE_OF = {op: mod for mod in MODULES for op in mod.OPS}
_CPU_NOTES = {
    "fastpeft": "fastpeft's CPU path: kernels/reference.py",
    "fastpeft-nolora": "fastpeft's CPU path: kernels/reference.py",
    "fastpeft-eval": "fastpeft's CPU path: kernels/reference.py",
    "fastpeft-lora": "fastpeft's CPU path: kernels/reference.py",
    "bnb": "bitsandbytes' CPU backend",
}
STATIC_DECODE_M = (1, 16)
"""Token counts of the decode kernel's static goals (DESIGN.md: M <= 16)."""


@dataclass
class RunResult:
    rows: list[dict]
    goals: list[GoalResult]
    manifest: dict
    files: dict[str, Path] = field(default_factory=dict)


def collect(spec: Spec) -> list[Case]:
    return [c for mod in MODULES for c in mod.cases(spec)]


def providers_of(op: str) -> tuple[str, ...]:
    mod = _MODULE_OF[op]
    return mod.PROVIDERS_OF[op] if hasattr(mod, "PROVIDERS_OF") else mod.PROVIDERS


def _error_text(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


def _measure_case(case: Case, spec: Spec, peaks) -> dict:
    if case.measure_fn is not None:
        return case.measure_fn(case, peaks)
    prep = case.prepare()
    timing = measure(prep, spec.device)
    row = row_for(case, timing, peaks, LABEL_MEASURED if spec.is_gpu else LABEL_CPU)
    if not spec.is_gpu:
        row["note"] = "; ".join(n for n in (_CPU_NOTES.get(case.provider, ""), row["note"]) if n)
    return row


def _predictions(spec: Spec, gpu_cases: list[Case], gate_json: Path | None) -> tuple[Predictor, dict]:
    comps: dict[tuple, list[Component]] = {}
    for c in gpu_cases:
        found = _MODULE_OF[c.op].components(c, spec)
        if found:
            comps[c.key] = found
    dt = {"bfloat16": "bf16", "float16": "fp16"}.get(spec.dtype_name, "fp32")
    static = [Component("static", gate_path="decode", m=m, dtype=dt) for m in STATIC_DECODE_M]
    wanted = [x for found in comps.values() for x in found] + static
    return Predictor.from_gate(wanted, gate_json=gate_json), comps


def run(
    spec: Spec,
    out: Path,
    budget_s: float | None = None,
    gate_json: Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = lambda line: None,
) -> RunResult:
    """Measure ``spec`` (on the CPU variant without a GPU) and write the results under ``out``.

    CPU cases run on one thread: on a shared machine two contending intra-op threads make timings swing
    by orders of magnitude, and the CPU rows are no speed claim either way."""
    threads = torch.get_num_threads()
    if not spec.is_gpu:
        torch.set_num_threads(1)
    try:
        return _run(spec, out, budget_s, gate_json, progress, log)
    finally:
        torch.set_num_threads(threads)


def _run(
    spec: Spec, out: Path, budget_s: float | None, gate_json: Path | None, progress: bool, log: Callable[[str], None]
) -> RunResult:
    from tqdm.auto import tqdm

    start = time.perf_counter()
    gpu = spec.is_gpu
    measured_spec = spec if gpu else spec.cpu_variant()
    cases = order(collect(measured_spec))
    if spec.quick and gpu:  # the goal cases and one case of every provider
        cases = [c for c in cases if c.value > 20.0]
    skipped: list[tuple[Case, str]] = []
    runnable = []
    for c in cases:
        reason = provider_missing(c.family)
        (skipped.append((c, reason)) if reason else runnable.append(c))
    deselected = {(op, p) for op in spec.ops for p in providers_of(op) if not spec.wants(p)}

    peaks = measure_peaks(measured_spec.device, spec.dtype, quick=spec.quick)
    log(f"peaks on {measured_spec.device}: {peaks.tflops:.3g} TFLOP/s ({peaks.matmul}), {peaks.gbps:.3g} GB/s")
    reserve = min(10.0, 0.15 * budget_s) if budget_s else 0.0
    plan = Plan(budget_s, reserve_s=reserve, elapsed_s=time.perf_counter() - start)
    rows: list[dict] = []
    bar = tqdm(runnable, desc="fastpeft bench", unit="case", disable=not progress, leave=False)
    for case in bar:
        reason = plan.admit(case)
        if reason:
            skipped.append((case, reason))
            continue
        bar.set_postfix_str(case.describe()[:60])
        if case.measure_fn is not None:  # a subprocess of its own: give it the GPU memory and the time left
            if budget_s:
                case.timeout_s = max(60.0, budget_s - plan.elapsed_s)
            if gpu:
                for mod in MODULES:
                    getattr(mod, "release", lambda: None)()
                torch.cuda.empty_cache()
        t0 = time.perf_counter()
        try:
            rows.append(_measure_case(case, measured_spec, peaks))
        except Exception as e:  # one provider failing is reported, never the end of the run
            skipped.append((case, f"failed: {_error_text(e)}"))
            if gpu:
                torch.cuda.empty_cache()
        finally:
            plan.record(case, time.perf_counter() - t0)
    bar.close()
    for mod in MODULES:
        getattr(mod, "release", lambda: None)()

    gpu_spec = spec if gpu else dataclasses.replace(spec, device="cuda")
    gpu_cases = cases if gpu else order(collect(gpu_spec))
    predictor, comps = _predictions(gpu_spec, gpu_cases, gate_json)
    by_key = {c.key: c for c in gpu_cases}
    for row in rows if gpu else []:
        key = (row["op"], row["provider"], row["mode"], row["shape"], int(row["M"]), row["dtype"])
        if key in comps:
            row.update(predictor.predict(by_key[key].flops, by_key[key].nbytes, comps[key]))
    measured_keys = {(r["op"], r["provider"], r["mode"], r["shape"], int(r["M"]), r["dtype"]) for r in rows}
    for c in gpu_cases:
        if c.key in comps and c.key not in measured_keys:
            row = {"op": c.op, "provider": c.provider, "mode": c.mode, "shape": c.shape, "M": c.m, "dtype": c.dtype,
                   "gpu": f"estimate for {predictor_gpu_name()}", "label": LABEL_ESTIMATE, "path": c.path}  # fmt: skip
            row.update(predictor.predict(c.flops, c.nbytes, comps[c.key]))
            rows.append(row)

    dt = {"bfloat16": "bf16", "float16": "fp16"}.get(spec.dtype_name, "fp32")
    decode_records = predictor.static_records("decode", dt, STATIC_DECODE_M)
    goals = evaluate(rows, decode_records)
    env = env_info()
    manifest = _manifest(spec, measured_spec, env, peaks, plan, rows, skipped, deselected, predictor, budget_s)
    manifest["elapsed_s"] = round(time.perf_counter() - start, 1)
    files = _write(out, rows, goals, manifest, env)
    manifest["elapsed_s"] = round(time.perf_counter() - start, 1)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return RunResult(rows, goals, manifest, files)


def predictor_gpu_name() -> str:
    from .predict import REFERENCE

    return REFERENCE["name"]


def _manifest(spec, measured_spec, env, peaks, plan, rows, skipped, deselected, predictor, budget_s) -> dict:
    providers: dict[str, dict[str, str]] = {}
    measured = [r for r in rows if r.get("label") != LABEL_ESTIMATE]
    for op in spec.ops:
        status = providers.setdefault(op, {})
        for p in providers_of(op):
            n = sum(1 for r in measured if r["op"] == op and r["provider"] == p)
            if n:
                status[p] = f"measured ({n} cases)"
            elif (op, p) in deselected:
                status[p] = "skipped: not selected (--providers)"
            else:
                reasons = list(dict.fromkeys(reason for c, reason in skipped if c.op == op and c.provider == p))
                status[p] = "skipped: " + (" | ".join(reasons) if reasons else "no case in this matrix")
    return {
        "device": "gpu" if spec.is_gpu else "cpu",
        "cpu_threads": torch.get_num_threads(),
        "label": LABEL_MEASURED if spec.is_gpu else LABEL_CPU,
        "env": env,
        "peaks": dataclasses.asdict(peaks),
        "spec": {
            "ops": list(spec.ops),
            "shapes": [s.name for s in spec.shapes],
            "m": list(spec.ms),
            "modes": list(spec.modes),
            "dtype": spec.dtype_name,
            "quick": spec.quick,
            "measured_shapes": [s.name for s in measured_spec.shapes],
            "measured_m": list(measured_spec.ms),
        },  # fmt: skip
        "providers": providers,
        "plan": {
            "budget_s": budget_s,
            "measure_s": round(plan.elapsed_s, 1),
            "measured": len(measured),
            "skipped": [{"case": c.describe(), "reason": reason} for c, reason in skipped],
        },  # fmt: skip
        "gate": {"arch": predictor.arch, "records": sorted(predictor.records), "error": predictor.error},
    }


def _write(out: Path, rows: list[dict], goals: list[GoalResult], manifest: dict, env: dict) -> dict[str, Path]:
    from . import report

    out.mkdir(parents=True, exist_ok=True)
    files = {"csv": out / "results.csv", "manifest": out / "manifest.json", "summary": out / "summary.md"}
    write_csv(files["csv"], rows, env)
    files.update(report.plots(out, rows))
    (out / "summary.md").write_text(report.summary(rows, goals, manifest, files))
    return files
