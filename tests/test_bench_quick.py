"""``fastpeft bench --quick`` on the CPU: the output a user without a GPU gets.

The default run keeps it short (a few seconds of measuring: the plan measures what fits and lists the rest
with the reason); the ``slow`` test runs the whole CPU ``--quick`` and holds it to its 2 minutes.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastpeft.benchmarks import core, goals, suite

ROOT = Path(__file__).resolve().parents[1]
GOAL_CASES = {g.case for g in goals.GOALS}


def _run_quick(out: Path, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the gate compiles in-process
    cmd = [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out), "--no-progress", *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    return proc, time.perf_counter() - start


def _check_output(out: Path) -> tuple[list[dict], dict]:
    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == core.ALL_COLUMNS
        rows = list(reader)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["device"] == "cpu" and manifest["label"] == core.LABEL_CPU

    # every provider of every op: measured here, or skipped with its reason
    for op, status in manifest["providers"].items():
        assert set(status) == set(suite.providers_of(op)), op
        for provider, text in status.items():
            assert text.startswith("measured (") or (text.startswith("skipped: ") and len(text) > 12), (op, provider)
    measured = [r for r in rows if r["label"] == core.LABEL_CPU]
    assert measured, "no CPU row at all"
    for r in measured:
        assert r["gpu"] == "cpu" and float(r["p50_ms"]) > 0 and float(r["p20_ms"]) <= float(r["p80_ms"])
        assert r["predicted"] == "", "a CPU row carries no GPU prediction"
    assert {(r["op"], r["provider"]) for r in measured} == {
        (op, p) for op, s in manifest["providers"].items() for p, text in s.items() if text.startswith("measured")
    }

    # every GPU case the cost model covers has an estimate; the NF4 decode call and dequantize pass rest on the
    # latency-aware model's launches
    estimates = [r for r in rows if r["label"] == core.LABEL_ESTIMATE]
    assert manifest["gate"]["error"] == "", manifest["gate"]["error"]
    modelled = {"nf4_dequant": {"fastpeft"}, "qlora_linear": {"fastpeft", "dense-bf16"},
                "lora_linear": {"fastpeft", "dense-bf16"}, "adapter": {"fastpeft", "reference"},
                "dora": {"fastpeft", "fastpeft-eval", "fastpeft-lora"}}  # fmt: skip
    for op, providers in modelled.items():
        got = {r["provider"] for r in estimates if r["op"] == op}
        assert providers <= got, (op, got)
    for r in estimates:
        assert r["p50_ms"] == "" and r["basis"].startswith("estimate"), r
        assert 0 < float(r["predicted"]) <= 1.0 + 1e-6 and float(r["predicted_ms"]) > 0, r
    for r in estimates:
        if r["provider"] == "fastpeft" and r["op"] == "qlora_linear" and r["mode"] == "fwd" and int(r["M"]) <= 64:
            assert "latency model: NF4+LoRA decode" in r["basis"], r["basis"]
        if r["op"] == "dora" and r["mode"] == "fwd" and int(r["M"]) <= 64:
            kind = "LoRA" if r["provider"] == "fastpeft-lora" else "DoRA"
            assert f"latency model: NF4+{kind} decode" in r["basis"], r["basis"]
        if r["provider"] == "fastpeft" and r["op"] == "nf4_dequant":
            assert "latency model: dequantize" in r["basis"], r["basis"]

    # the summary: labels, every goal with a verdict, plots written
    summary = (out / "summary.md").read_text()
    assert "No GPU here" in summary and "estimate" in summary
    table = [ln for ln in summary.splitlines() if ln.startswith("| ") and ln.rstrip().endswith("|")]
    for case in GOAL_CASES:
        line = next(ln for ln in table if ln.startswith(f"| {case} |"))
        verdict = line.rstrip(" |").rsplit("|", 1)[-1].strip()
        assert verdict.startswith(("unmeasured", "met: static", "missed: static")), line
    for name in ("speedup_vs_m.png", "roofline_fraction.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
        assert f"]({name})" in summary
    return rows, manifest


def test_quick_cpu_run_writes_labelled_results_estimates_and_plots(tmp_path):
    proc, _ = _run_quick(tmp_path / "quick", "--budget", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "unmeasured" in proc.stdout
    rows, manifest = _check_output(tmp_path / "quick")
    skipped = manifest["plan"]["skipped"]
    assert skipped and all(s["reason"] for s in skipped)


@pytest.mark.slow
def test_full_quick_cpu_run_measures_every_installed_provider_within_two_minutes(tmp_path):
    proc, seconds = _run_quick(tmp_path / "quick")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows, manifest = _check_output(tmp_path / "quick")
    assert seconds < 120, f"--quick took {seconds:.0f} s"
    for op, status in manifest["providers"].items():
        for provider, text in status.items():
            assert text.startswith("measured") or "not installed" in text, (op, provider, text)
