"""The benchmark suite's parts on their own: cases, CSV schema, window plan, goal verdicts, predictions, CLI.

The suite runs end to end in tests/test_bench_quick.py; these checks are cheap and need no measurement.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastpeft.app import cli
from fastpeft.benchmarks import core, goals, plan, predict, spec, suite
from fastpeft.kernels._gate import GateCase

ROOT = Path(__file__).resolve().parents[1]


def _case(op="qlora_linear", provider="fastpeft", mode="fwd", shape="14336x4096", m=1, cost=1.0, **kw) -> core.Case:
    return core.Case(op, provider, mode, shape, m, "bfloat16", 1.0, 1.0, cost_s=cost, **kw)


def test_every_op_has_a_module_with_cases_for_each_provider():
    s = spec.Spec(device="cuda")
    cases = suite.collect(s)
    assert {c.op for c in cases} == set(spec.OPS)
    for op in spec.OPS:
        assert {c.provider for c in cases if c.op == op} == set(suite.providers_of(op)), op
    # nothing touches a device or builds operands while the matrix is listed
    assert all(c.prepare is not None or c.measure_fn is not None for c in cases)
    assert len({c.key for c in cases}) == len(cases)


def test_shapes_and_token_counts_parse():
    assert [s.name for s in spec.parse_shapes(["llama3-8b"])] == ["4096x4096", "1024x4096", "14336x4096", "4096x14336"]
    assert [(s.n, s.k) for s in spec.parse_shapes(["4096,1024 llama3-70b"])][:2] == [(4096, 1024), (8192, 8192)]
    assert spec.parse_ints("1, 16,64", "--m") == (1, 16, 64)
    for bad in (["llama3-9b"], ["4096"], ["0,5"]):
        with pytest.raises(ValueError, match="--shapes"):
            spec.parse_shapes(bad)
    with pytest.raises(ValueError, match="--m"):
        spec.parse_ints("1,x", "--m")


def test_csv_has_the_design_schema_first_and_refuses_unknown_columns(tmp_path):
    rows = [{"op": "nf4_dequant", "provider": "fastpeft", "M": 0, "p50_ms": 0.125, "label": core.LABEL_CPU}]
    core.write_csv(tmp_path / "r.csv", rows)
    header = (tmp_path / "r.csv").read_text().splitlines()[0].split(",")
    assert header[: len(core.COLUMNS)] == core.COLUMNS and "predicted" in header and "bitsandbytes" in header
    back = core.read_csv(tmp_path / "r.csv")
    assert back[0]["p50_ms"] == "0.125" and back[0]["gpu"] and back[0]["git_sha"]
    with pytest.raises(ValueError, match="outside the schema"):
        core.write_csv(tmp_path / "bad.csv", [{"op": "x", "speed": 1}])
    assert not (tmp_path / "bad.csv").exists()


def test_plan_puts_goal_cases_first_covers_every_provider_and_keeps_the_budget():
    cases = [
        _case(provider="compiled", m=256, cost=1.0),
        _case(provider="reference", m=256, cost=1.0),
        _case(provider="reference", m=2048, cost=1.0),
        _case(provider="fastpeft", m=1, cost=1.0),  # goal: small M, 14336-wide
        _case(provider="dense-bf16-nolora", m=16, cost=1.0),  # its anchor
        _case(provider="fastpeft", m=256, cost=1.0),
    ]
    ordered = plan.order(cases)
    assert [(c.provider, c.m) for c in ordered[:2]] == [("fastpeft", 1), ("dense-bf16-nolora", 16)]
    # then the first case of each provider not yet covered, before the rest of the matrix
    assert {(c.provider, c.m) for c in ordered[2:4]} == {("reference", 256), ("compiled", 256)}
    assert ordered[-1].provider == "reference" and ordered[-1].m == 2048

    p = plan.Plan(budget_s=10.0, reserve_s=2.0)
    warm = _case(cost=1.0, warm_key="autotune", warm_cost_s=4.0)
    assert p.admit(warm) is None and p.estimate(warm) == pytest.approx(5.0)
    p.record(warm, 10.0)  # took twice the estimate: later estimates double, the warm-up is paid
    assert p.scale == pytest.approx(2.0)
    again = _case(cost=1.0, warm_key="autotune", warm_cost_s=4.0)
    assert p.estimate(again) == pytest.approx(2.0)
    reason = p.admit(again)
    assert reason is not None and reason.startswith("budget:") and "--budget 10" in reason
    assert plan.Plan(budget_s=None).admit(again) is None


def _row(provider, shape, m, p50=None, label=core.LABEL_MEASURED, predicted_ms=None, op="qlora_linear", mode="fwd"):
    row = {"op": op, "provider": provider, "mode": mode, "shape": shape, "M": m, "label": label, "basis": ""}
    row["p50_ms"] = "" if p50 is None else p50
    row["predicted_ms"] = "" if predicted_ms is None else predicted_ms
    return row


def test_goal_verdicts_come_from_measurements_and_estimates_stand_beside_them():
    by_key = {}
    rows = [
        _row("fastpeft", "14336x4096", 1, p50=0.010),
        _row("dense-bf16-nolora", "14336x4096", 1, p50=0.035),  # 3.5x
        _row("fastpeft", "4096x14336", 16, p50=0.012),
        _row("dense-bf16-nolora", "4096x14336", 16, p50=0.030),  # 2.5x: the worst case decides
        _row("fastpeft", "4096x4096", 1, label=core.LABEL_ESTIMATE, predicted_ms=0.003),
        _row("dense-bf16-nolora", "4096x4096", 1, label=core.LABEL_ESTIMATE, predicted_ms=0.011),
        _row("fastpeft", "384x256", 1, p50=1.0, label=core.LABEL_CPU),  # a CPU row is no measurement
        _row("dense-bf16-nolora", "384x256", 1, p50=9.0, label=core.LABEL_CPU),
    ]
    for res in goals.evaluate(rows, [{"case": "decode-m1", "thread_instructions_per_weight": 6.5}]):
        by_key[res.goal.key] = res
    wide = by_key["small-m-wide"]
    assert wide.verdict == "missed" and wide.measured == pytest.approx(2.5) and wide.measured_at == "4096x14336 M=16"
    square = by_key["small-m-square"]
    assert square.verdict == "unmeasured" and square.measured is None
    assert square.predicted == pytest.approx(11 / 3) and square.predicted_basis == "roofline only"
    assert by_key["decode-ipw"].verdict == "missed" and by_key["decode-ipw"].measured == 6.5
    assert by_key["decode-roofline"].verdict == "unmeasured"  # no record carries the field
    assert all(r.verdict == "unmeasured" for k, r in by_key.items() if k not in ("small-m-wide", "decode-ipw"))
    met = goals.evaluate(
        [_row("fastpeft", "14336x4096", 1, p50=0.01), _row("dense-bf16-nolora", "14336x4096", 1, p50=0.04)]
    )
    assert next(r for r in met if r.goal.key == "small-m-wide").verdict == "met"


def _gate_case(name, path, m=None, block_m=None, dq=True):
    constexprs = {"DOUBLE_QUANT": dq, **({"BLOCK_M": block_m} if block_m else {})}
    return GateCase(name, "m", "k", {"x_ptr": "*bf16"}, constexprs, args={"M": m} if m else {}, path=path)


def test_predictions_take_the_gate_record_of_the_launched_configuration():
    cases = [
        _gate_case("decode16_m1", "decode", m=1, block_m=16),
        _gate_case("decode16_m16", "decode", m=16, block_m=16),
        _gate_case("decode64_m64", "decode", m=64, block_m=64),
        _gate_case("dequant", "dequant"),
    ]

    def rec(name, frac, mb=5.0e12, ipw=5.0):
        keys = ("case", "arch", "memory_bound_weights_per_s", "predicted_roofline_fraction")
        return {**dict(zip(keys, (name, 90, mb, frac), strict=True)), "thread_instructions_per_weight": ipw}

    records = [rec("decode16_m1", 1.0), rec("decode16_m16", 0.5), rec("decode64_m64", 0.8), rec("dequant", 1.0, 1e12)]
    pred = predict.Predictor(records, cases, arch=90)
    for m, name in ((1, "decode16_m1"), (5, "decode16_m16"), (16, "decode16_m16"), (40, "decode64_m64")):
        assert pred.gate_case(predict.Component("d", gate_path="decode", m=m)).name == name, m
    comp = predict.Component("decode", gate_path="decode", weights=10**9, m=16)
    out = pred.predict(0.0, 0.5e9, [comp])
    assert out["predicted_ms"] == pytest.approx(1e9 / (5e12 * 0.5) * 1e3)
    assert "gate decode16_m16 sm_90" in out["basis"] and "50% of roofline" in out["basis"]
    # a GEMM has no cost model: the roofline, said so
    gemm = predict.gemm("tiled GEMM", 8192, 4096, 4096, 2)
    out = pred.predict(gemm.flops, gemm.nbytes, [gemm])
    assert out["predicted_ms"] == pytest.approx(gemm.flops / predict.REFERENCE["bf16_flops_per_s"] * 1e3)
    assert out["predicted"] == pytest.approx(1.0) and "roofline: tiled GEMM" in out["basis"]
    # no record for the path: the roofline, and the basis names what is missing
    fp16 = predict.Component("decode", 0.0, 6e5, gate_path="decode", weights=10**6, m=1, dtype="fp16")
    out = pred.predict(0.0, 6e5, [fp16])
    assert "no gate record" in out["basis"] and out["predicted_ms"] == pytest.approx(6e5 / 3e12 * 1e3)


def test_fastpeft_bench_is_a_cli_subcommand_and_python_m_benchmarks_explains_itself():
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--help"])
    assert e.value.code == 0
    assert cli.main(["bench", "--ops", "nf4_dequant,matmul", "--no-progress"]) == cli.EXIT_BAD_INPUT
    out = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--budget" in out.stdout and "--quick" in out.stdout


def test_cpu_runs_measure_small_shapes_and_keep_the_gpu_matrix_for_estimates():
    s = spec.Spec(device="cuda", shapes=tuple(spec.SHAPE_SETS["llama3-8b"]))
    cpu = s.cpu_variant()
    assert cpu.device == "cpu" and all(sh.n * sh.k < 1 << 20 for sh in cpu.shapes) and set(cpu.ms) <= set(spec.CPU_M)
    assert core.copies_past_l2(1 << 20, "cpu") == 1
    assert core.short_call(2 * 16 * 4096 * 4096, 4096 * 4096 // 2) and not core.short_call(2 * 8192 * 4096**2, 1e8)
    assert torch.get_num_threads() >= 1


def test_a_gpu_run_reports_measured_rows_beside_their_predictions(tmp_path, monkeypatch):
    """The GPU path of a run with the measurements faked (no GPU here): rows, predictions, verdicts, plots."""
    from fastpeft.kernels import _gate

    records = [
        {"case": c.name, "arch": 90, "memory_bound_weights_per_s": 3.0e12 / c.bytes_per_weight,
         "predicted_roofline_fraction": 0.9, "thread_instructions_per_weight": 5.0}
        for c in _gate.all_cases() if c.path
    ]  # fmt: skip
    (tmp_path / "gate.json").write_text(__import__("json").dumps(records))
    peaks = core.Peaks(700.0, 3000.0, "cuda", "8192^3 bf16 matmul", "1 GiB copy")

    def fake_measure(case, spec_, peaks_):
        seconds = case.flops / 600e12 + case.nbytes / 2.5e12 + 4e-6  # a plausible machine, not a result
        if case.provider == "fastpeft" and case.op == "qlora_linear" and case.m <= 64:
            seconds = case.nbytes / 2.5e12 * 0.3  # decode: far ahead of the dense read
        ms = seconds * 1e3
        return core.row_for(case, core.Timing(ms, ms * 0.98, ms * 1.03, 1 << 20), peaks_, core.LABEL_MEASURED)

    monkeypatch.setattr(suite, "measure_peaks", lambda *a, **k: peaks)
    monkeypatch.setattr(suite, "_measure_case", fake_measure)
    monkeypatch.setattr(suite, "env_info", lambda: {**core.env_info(), "gpu": "Fake GPU 80GB"})
    s = spec.Spec(device="cuda", ms=(1, 16, 64, 8192), shapes=tuple(spec.SHAPE_SETS["llama3-8b"]), quick=True)
    result = suite.run(s, tmp_path / "out", budget_s=None, gate_json=tmp_path / "gate.json", progress=False)

    measured = [r for r in result.rows if r["label"] == core.LABEL_MEASURED]
    assert measured and not [r for r in result.rows if r["label"] == core.LABEL_CPU]
    for r in measured:
        # DoRA: the NF4 op's launch models, forward at every M, fwd+bwd above M = 64 (bench_dora's docstring)
        dora = r["op"] == "dora" and r["provider"].startswith("fastpeft") and (r["mode"] == "fwd" or r["M"] > 64)
        others = r["op"] not in ("finetune_step", "dora", "dora_dense") and r["provider"] in ("fastpeft", "dense-bf16")
        if dora or others:
            assert r.get("predicted", "") != "" and r["predicted_ms"] > 0, r
    verdicts = {g.goal.key: g for g in result.goals}
    assert verdicts["small-m-wide"].verdict == "met" and verdicts["small-m-wide"].predicted is not None
    assert verdicts["decode-ipw"].verdict == "met"  # the faked records: 5.0 per weight
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert summary.startswith("# fastpeft bench — Fake GPU 80GB") and "`measured` ran on this GPU" in summary
    assert (tmp_path / "out" / "speedup_vs_m.png").stat().st_size > 10_000
    assert result.manifest["gate"]["error"] == ""


def test_bench_help_states_every_default(capsys):
    import argparse

    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    sub = next(a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["bench"]
    for action in [a for a in sub._actions if a.option_strings and a.nargs != 0]:
        formatter = sub._get_formatter()
        formatter.add_argument(action)
        entry = " ".join(formatter.format_help().split())
        said = f"default: {action.default}" if action.default is not None else "default"
        assert entry in text and said in entry, entry


def test_dora_providers_compute_one_function_and_every_case_runs_on_the_cpu():
    """The DoRA op's providers get the same base, factors and magnitude (so their timings compare like with like),
    and each quick CPU case of every installed provider runs forward and backward."""
    from conftest import assert_close

    from fastpeft.benchmarks import bench_dora

    s = spec.Spec(ops=bench_dora.OPS, device="cpu", quick=True).cpu_variant()
    shape = s.shapes[0]
    for op in bench_dora.OPS:
        layer = bench_dora._layers(op, shape, s, 1)[0]
        x = torch.randn(17, shape.k, dtype=s.dtype)
        with torch.no_grad():
            want = bench_dora._reference(x, layer)
            for p in bench_dora.PROVIDERS_OF[op]:
                if p == "fastpeft-lora" or core.provider_missing(bench_dora._FAMILY.get(p, "")):
                    continue
                got = bench_dora._provider_fn(p, layer, s.rank)[0](x)
                assert_close(got.float(), want.float(), s.dtype, msg=f"{op} {p}")
            lora = bench_dora._provider_fn("fastpeft-lora", layer, s.rank)[0](x)
            assert (lora - want).abs().max() > 1e-2, "the magnitude scaling left out: DoRA equals LoRA"
    ran = set()
    for case in bench_dora.cases(s):
        if core.provider_missing(case.family):
            continue
        case.prepare().fn()
        ran.add((case.op, case.provider, case.mode))
    assert ("dora", "fastpeft-eval", "fwd") in ran and ("dora", "fastpeft-eval", "fwd+bwd") not in ran
    assert {(op, p) for op, p, _ in ran} >= {(op, "fastpeft") for op in bench_dora.OPS}


def test_dora_predictions_come_from_the_dora_and_lora_launch_models():
    from fastpeft.benchmarks import bench_dora

    s = spec.Spec(ops=("dora",), device="cuda", shapes=(spec.SHAPE_SETS["llama3-8b"][2],), ms=(1, 16, 8192))
    by = {(c.provider, c.mode, c.m): c for c in bench_dora.cases(s)}
    assert bench_dora.components(by[("bnb", "fwd", 1)], s) is None
    assert bench_dora.components(by[("reference", "fwd+bwd", 8192)], s) is None
    assert bench_dora.components(by[("fastpeft", "fwd+bwd", 16)], s) is None  # the split-K backward: no model
    pred = predict.Predictor([])
    ms = {}
    for key in (("fastpeft", "fwd", 1), ("fastpeft-eval", "fwd", 1), ("fastpeft-lora", "fwd", 1),
                ("fastpeft", "fwd+bwd", 8192), ("fastpeft-lora", "fwd+bwd", 8192)):  # fmt: skip
        case = by[key]
        out = pred.predict(case.flops, case.nbytes, bench_dora.components(case, s))
        assert "latency model" in out["basis"] and 0 < out["predicted"] <= 1.0, (key, out)
        ms[key] = out["predicted_ms"]
    assert "NF4+DoRA decode" in pred.predict(1, 1, bench_dora.components(by[("fastpeft-eval", "fwd", 1)], s))["basis"]
    # training recomputes the norm (A·Wᵀ: one more pass over the base), eval keeps it: LoRA's one launch
    assert ms[("fastpeft", "fwd", 1)] > 1.5 * ms[("fastpeft-lora", "fwd", 1)]
    assert ms[("fastpeft-eval", "fwd", 1)] == pytest.approx(ms[("fastpeft-lora", "fwd", 1)], rel=0.05)
    assert ms[("fastpeft", "fwd+bwd", 8192)] > ms[("fastpeft-lora", "fwd+bwd", 8192)]
    # where the latency model cannot run, the component's counted work at the roofline, said so
    failing = dataclasses.replace(bench_dora.components(by[("fastpeft", "fwd", 1)], s)[0], model=lambda arch: 1 / 0)
    assert "latency model unavailable" in pred.predict(1.0, 1e6, [failing])["basis"]
