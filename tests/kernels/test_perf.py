"""The latency-aware cost model (kernels/_perf.py): its composition on synthetic kernels, its constants' sources, the
calibration table (benchmarks/calibration.json) recomputed from its own numbers, and the report.

Synthetic kernels are cuobjdump-style text with explicit control words (stall count, scoreboards), so every
expected figure below follows from the module docstring's rules by hand."""

from __future__ import annotations

import json
import math

import pytest

from fastpeft.kernels import _perf

USAGE = """
Resource usage:
 Function {name}:
  REG:{regs} STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:600 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def control(stall: int = 1, wbar: int = 7, rbar: int = 7, wait: int = 0) -> int:
    """The second encoding word with Volta+ control bits: stall 105-108, scoreboards 110-115, wait mask 116-121."""
    return (stall << 41) | (wbar << 46) | (rbar << 49) | (wait << 52)


def kernel(body: list[tuple[str, int]], name: str = "k", regs: int = 32) -> str:
    """cuobjdump text for ``body``: ``(instruction, control word)`` per line, addresses 0x10 apart."""
    lines = [USAGE.format(name=name, regs=regs), f"\t\tFunction : {name}"]
    for i, (text, ctrl) in enumerate(body):
        lines.append(f"        /*{16 * i:04x}*/                   {text} ;   /* 0x0000000000000000 */")
        lines.append(f"                                                  /* 0x{ctrl:016x} */")
    return "\n".join(lines) + "\n"


def loop_kernel(load: str, alu: int, name: str = "k", regs: int = 32) -> str:
    """A loop: one global load (scoreboard 0), ``alu`` integer ops, a use that waits for the load, the branch back."""
    body = [("MOV R1, c[0x0][0x28]", control())]
    body.append((f"{load} R2, desc[UR4][R4.64]", control(wbar=0)))
    body += [(f"IADD3 R{6 + i % 8}, R6, 0x1, RZ", control()) for i in range(alu)]
    body.append(("FFMA R3, R2, R2, R3", control(wait=1)))
    body.append(("ISETP.NE.AND P0, PT, R6, RZ, PT", control()))
    body.append(("@P0 BRA 0x10", control()))
    body.append(("EXIT", control()))
    return kernel(body, name, regs)


def launch(text: str, grid: int, trips: int, hbm: float, warps: int = 4, **kw) -> _perf.Launch:
    prof = _perf.profile_from_sass(text, "k", 90, warps, 0)
    return _perf.Launch("synthetic", prof, grid, lambda i: (trips,), hbm, **kw)


def test_control_words_and_loop_costs():
    prof = _perf.profile_from_sass(loop_kernel("LDG.E.128", 10), "k", 90, 4, 0)
    (lp,) = prof.loops
    assert lp.instructions == 14 and lp.pipes["alu"] == 11  # 10 IADD3 + ISETP
    assert lp.gload_bytes == 32 * 16 and lp.lsu_cycles == 4  # 512 B through the 128 B/clk path
    ld = next(o for o in lp.ops if o.kind == "gload")
    use = next(o for o in lp.ops if o.wait)
    assert (ld.wbar, use.wait, ld.stall) == (0, 1, 1)
    m = _perf.machine(90)
    tp = _perf.throughput_cycles(lp, 4, m)
    assert tp["alu"] == pytest.approx(11 * 4 / m.pipe_alu) and tp["issue"] == pytest.approx(14)


def test_memory_bound_case():
    # many CTAs, a tiny loop: bytes at the achievable bandwidth bind
    m = _perf.machine(90)
    hbm = 64e9
    p = _perf.predict(launch(loop_kernel("LDG.E.128", 2), 132 * 8, 1000, hbm, dram_loads="all"), m)
    assert p.binding == "hbm"
    assert p.kernel_seconds == pytest.approx(hbm / m.hbm_bytes_per_s)
    assert p.seconds == pytest.approx(p.kernel_seconds + m.launch_s)
    assert p.hbm_fraction == pytest.approx(1.0)


def test_issue_bound_case():
    # a long integer loop with few bytes: the ALU pipe (half rate) binds, above the issue slots
    m = _perf.machine(90)
    p = _perf.predict(launch(loop_kernel("LDG.E", 400, regs=32), 132 * 16, 200, 1e6, dram_loads="all"), m)
    assert p.binding == "alu"
    work = 132 * 16 * 200 * 401 * 4 / m.pipe_alu / 132  # ALU warp-instructions per SM at 2 per clock
    assert p.kernel_seconds == pytest.approx(m.seconds(work), rel=0.02)
    assert p.bounds["alu"] > p.bounds["issue"] > p.bounds["hbm"]


def test_latency_bound_case():
    # one CTA per SM, 1 warp doing a DRAM round trip per iteration: Little's law, not bandwidth, binds
    m = _perf.machine(90)
    text = loop_kernel("LDG.E", 4)
    p = _perf.predict(launch(text, 132, 100, 132 * 100 * 32 * 4, warps=1, dram_loads="all"), m)
    assert p.binding == "latency"
    dram = m.cycles(m.dram_latency_s) * (1 + m.dram_latency_growth * p.detail["u"])
    period = p.detail["alone_cycles"][0]
    assert dram < period < dram + 40  # the load's latency, then a dozen single-clock instructions
    assert p.kernel_seconds == pytest.approx(m.seconds(100 * period + p.detail["fixed_cycles"]), rel=1e-3)
    assert p.hbm_fraction < 0.05
    # twice the bytes in flight (loads one iteration ahead) nearly halves it
    fast = _perf.predict(launch(text, 132, 100, 132 * 100 * 32 * 4, warps=1, dram_loads="all", prefetch=2), m)
    assert fast.kernel_seconds < 0.6 * p.kernel_seconds


def test_wave_quantisation():
    # identical latency-bound CTAs: one more CTA than a full wave costs a whole extra wave
    m = _perf.machine(90)
    text = loop_kernel("LDG.E", 4, regs=255)  # 255 registers x 128 threads: 2 CTAs per SM
    full = 132 * 2
    one = _perf.predict(launch(text, full, 50, 1e3, dram_loads="all"), m)
    two = _perf.predict(launch(text, full + 1, 50, 1e3, dram_loads="all"), m)
    assert one.ctas_per_sm == 2 and one.waves == pytest.approx(1.0)
    assert two.kernel_seconds == pytest.approx(2 * one.kernel_seconds, rel=0.02)
    # empty CTAs (no loop iterations) still take a slot and pay their fixed part, but cost no loop time
    prof = one  # noqa: F841
    lp = launch(text, full, 50, 1e3, dram_loads="all")
    half = _perf.Launch("split", lp.profile, 2 * full, lambda i: (50 if i < full else 0,), 1e3, dram_loads="all")
    p = _perf.predict(half, m)
    assert p.empty_ctas == full and p.kernel_seconds < 1.2 * one.kernel_seconds


def test_makespan_processor_sharing():
    # two CTAs on one SM that each need half the SM's pipes run alone; four take twice as long
    assert _perf._makespan([(100.0, 50.0)] * 2, occ=4, sms=1) == pytest.approx(100.0)
    assert _perf._makespan([(100.0, 50.0)] * 4, occ=4, sms=1) == pytest.approx(200.0)
    # refill: 3 CTAs, 2 slots: the third starts when the first finishes
    assert _perf._makespan([(10.0, 0.0)] * 3, occ=2, sms=1) == pytest.approx(20.0)
    assert _perf._makespan([], occ=2, sms=4) == 0.0


def test_launch_count_and_overhead():
    m = _perf.machine(90)
    one = _perf.streaming_time(1e6, m=m, launches=1)
    six = _perf.streaming_time(1e6, m=m, launches=6)
    assert six - one == pytest.approx(5 * m.launch_s)
    p = _perf.predict(launch(loop_kernel("LDG.E", 2), 132, 1, 1e3, launches=3, dram_loads="all"), m)
    assert p.seconds - p.kernel_seconds == pytest.approx(3 * m.launch_s)
    assert p.graph_seconds - p.kernel_seconds == pytest.approx(3 * m.graph_launch_s)


def test_every_constant_has_a_source_and_both_gpus():
    names = {c.name for c in _perf.CONSTANTS}
    for c in _perf.CONSTANTS:
        assert len(c.source) > 20, c
        assert c.value > 0 and c.unit, c
    for gpu in ("h100", "a100"):
        have = {c.name for c in _perf.CONSTANTS if c.gpu == gpu}
        assert have == names, f"{gpu} lacks {sorted(names - have)}"
        m = _perf.machine(90 if gpu == "h100" else 80)
        assert all(getattr(m, n) == _perf.constant(n, gpu) for n in names)
    assert "Hz" in _perf.format_constants() and _perf.format_constants().count("\n") == len(_perf.CONSTANTS) + 1


def test_profile_round_trips_through_json():
    prof = _perf.profile_from_sass(loop_kernel("LDG.E.EF.64", 3), "k", 90, 4, 1024)
    assert next(o for o in prof.loops[0].ops if o.kind == "gload").level == "dram"  # marked evict-first: read once
    back = _perf.Profile.from_dict(json.loads(json.dumps(prof.to_dict())))
    assert back == prof


# ------------------------------------------------------------------------------------------------
# the calibration table
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibration():
    from benchmarks import calibration

    return calibration, json.loads(calibration.JSON_PATH.read_text())


def test_calibration_errors_recomputed_from_the_table(calibration):
    mod, table = calibration
    assert table["error_bound"] == mod.ERROR_BOUND == 0.25
    assert len(table["points"]) >= 4
    for row in table["points"]:
        error = row["predicted"] / row["measured"] - 1
        assert error == pytest.approx(row["error"]), row["key"]
        assert row["within_bound"] == (abs(error) <= mod.ERROR_BOUND)
        assert row["within_bound"] or len(row["why_off"]) > 100, f"{row['key']} is off by {error:+.0%}, unexplained"
        assert row["source"].startswith("http") or "github.com" in row["source"]


CALIBRATION_TRITON = "3.9.0"
"""The Triton whose compiler built the binaries benchmarks/calibration.json was predicted from."""


@pytest.mark.compile_gate
def test_calibration_prediction_reproduces_from_the_binary(calibration):
    # the one calibration kernel this repository holds: rebuilt, re-read and re-predicted with the current model;
    # another Triton's compiler builds another binary (Triton 3.6: 5.61e-05 s predicted instead of 5.76e-05)
    import triton

    if triton.__version__ != CALIBRATION_TRITON:
        pytest.skip(f"the table's binaries are Triton {CALIBRATION_TRITON}'s; this is Triton {triton.__version__}")
    mod, table = calibration
    point = next(p for p in mod.points() if p.key == "triton_matmul_fp8_h100_3584")
    stored = next(r for r in table["points"] if r["key"] == point.key)
    profiles = _gate_free_build(point)
    predicted, _ = point.predict(profiles)
    assert predicted == pytest.approx(stored["predicted"], rel=1e-6)
    assert [b["regs"] for b in stored["binaries"]] == [p.regs for p in profiles]
    assert all(r["key"] in mod.MD_PATH.read_text() or r["kernel"] in mod.MD_PATH.read_text() for r in table["points"])


def _gate_free_build(point):
    """Build a point's profiles in a child process without Triton's interpreter (the suite runs under it)."""
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "p.json")
        code = (
            "import json; from benchmarks import calibration as c; "
            f"p = next(x for x in c.points() if x.key == {point.key!r}); "
            f"open({out!r}, 'w').write(json.dumps([q.to_dict() for q in p.build({{}})]))"
        )
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True)
        return [_perf.Profile.from_dict(d) for d in json.loads(Path(out).read_text())]


def test_calibration_covers_the_required_kernels(calibration):
    _, table = calibration
    kernels = " ".join(r["kernel"] for r in table["points"])
    for needle in ("bitsandbytes", "Triton tutorial matmul", "Liger"):
        assert needle in kernels
    inside = [r for r in table["points"] if r["within_bound"]]
    assert len(inside) >= len(table["points"]) // 2


# ------------------------------------------------------------------------------------------------
# the report (the gate's cache makes its builds free after the first run)
# ------------------------------------------------------------------------------------------------


@pytest.mark.compile_gate
def test_report_runs():
    from fastpeft.kernels import _perf_launches

    rows = _perf_launches.report(90, m_values=(1,))
    text = _perf_launches.format_report(rows)
    assert "What would move the decode number" in text and "Cross-entropy" in text
    op, ref = rows["decode"][0]
    # no dropout: one launch (U summed inside); 4096x4096 at M = 1: 32 tiles x 11 slices of 6 steps (3 per SM would
    # be 12 slices, the last one empty), one wave
    assert len(op.launches) == 1 and math.isfinite(op.seconds) and op.seconds > ref.seconds * 0.1
    main = op.launches[0]
    assert main.grid == 352 and main.empty_ctas == 0
    drop = _perf_launches.decode_op(4096, 4096, 1, dropout=True)  # with dropout: U from the masked X, then decode
    assert len(drop.launches) == 2 and drop.launches[1].grid == 512 and drop.launches[1].empty_ctas == 0


@pytest.mark.compile_gate
def test_report_models_the_path_that_runs_at_large_m():
    # M = 8192 on the Llama-3-8B projections: the launchers take cuBLAS + addmm (lora_linear.cublas_path), which the
    # model puts between dense bf16 cuBLAS + LoRA (no dequantize) and the tiled GEMM it replaced
    from fastpeft.kernels import _perf_launches
    from fastpeft.kernels.lora_linear import cublas_path

    for n, k in _perf_launches.LLAMA3_8B:
        assert cublas_path(8192, n, k) and cublas_path(8192, k, n), (n, k)
        tiled, cublas, dense = (_perf_launches.qlora_step(n, k, path=p) for p in ("tiled", "cublas", "dense"))
        for what in ("fwd", "fwd_bwd"):
            assert dense[what] < cublas[what] < tiled[what], (n, k, what, tiled, cublas, dense)


@pytest.mark.compile_gate
def test_dora_rows_build_from_their_launches():
    # the DoRA vs LoRA rows: each DoRA figure is the sum of the launches the DoRA path issues, its LoRA figure the
    # LoRA functions', so the ratio is theirs; at decode size DoRA runs LoRA's launches (the factor formed in the
    # decode kernel's epilogue) plus, in training, the row norm
    from fastpeft.kernels import _perf_dora, _perf_launches

    n, k = 4096, 4096
    rows = _perf_dora.dora_rows(90, shapes=((n, k),))
    eval_, train = "NF4 fwd, eval (norm kept)", "NF4 fwd, training (norm each call)"
    assert [(r[0], r[3]) for r in rows] == [(eval_, 1), (train, 1), (eval_, 16), (train, 16), ("NF4 fwd+bwd", 2048),
                                            ("bf16 fwd+bwd", 2048), ("NF4 fwd+bwd", 8192), ("bf16 fwd+bwd", 8192)]
    lora = _perf_launches.decode_op(n, k, 1)
    kept = _perf_dora.dora_decode_op(n, k, 1, norm_kept=True)
    dec = _perf_dora.dora_decode_op(n, k, 1)
    norm = _perf_dora.row_norm_preds(n, k)
    assert [p.name for p in kept.launches] == [p.name for p in lora.launches] and kept.seconds == lora.seconds
    assert [p.name for p in dec.launches] == [p.name for p in norm + lora.launches]
    assert math.isclose(dec.seconds, sum(p.seconds for p in norm) + lora.seconds)
    assert rows[0][4:] == (kept.seconds, lora.seconds) and rows[1][4:] == (dec.seconds, lora.seconds)
    what, _, _, m_rows, dora_s, lora_s = rows[6]
    assert lora_s == _perf_launches.qlora_step(n, k, 8192, path="cublas")["fwd_bwd"]
    step = _perf_dora.dora_step(n, k, 8192)
    assert dora_s == step["fwd_bwd"] and step["fwd"] < dora_s
    # DoRA adds launches to LoRA's path and removes none: never faster in this model, equal where the norm is kept
    assert all(d > lo for w, *_, d, lo in rows if w != eval_), rows
    text = "\n".join(_perf_dora.format_dora(rows))
    assert "DoRA vs LoRA" in text and f"{dora_s / lora_s:.2f}" in text
