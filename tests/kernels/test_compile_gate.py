"""Every shipped Triton kernel configuration compiles for sm_80 and sm_90a without spilling;
tensor-core kernels show HMMA (sm_80) / HGMMA (sm_90a) in their SASS."""

from __future__ import annotations

import pytest

from fastpeft.kernels import _gate

CASES = {c.name: c for c in _gate.all_cases()}


@pytest.fixture(scope="session")
def gate_reports():
    reports = _gate.run_gate(list(CASES.values()))
    return {(r.case, r.arch): r for r in reports}


@pytest.mark.compile_gate
@pytest.mark.parametrize("arch", _gate.ARCHS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_compile_gate(gate_reports, name, arch):
    report = gate_reports[(name, arch)]
    problems = report.problems(CASES[name])
    assert not problems, f"{name} on sm_{arch}: {'; '.join(problems)} (registers {report.registers})"
    assert report.registers > 0


@pytest.mark.compile_gate
def test_gate_detects_spills_and_missing_tensor_cores():
    # the gate's verdicts are not vacuous: a report with local memory or without MMA fails
    case = _gate.GateCase(name="x", module="m", kernel="k", signature={}, constexprs={}, tensor_cores=True)
    assert _gate.GateReport("x", 90, registers=255, local_bytes=64, mma=["HGMMA"]).problems(case)
    assert _gate.GateReport("x", 90, registers=96, local_bytes=0, mma=["HMMA"]).problems(case)
    assert not _gate.GateReport("x", 80, registers=96, local_bytes=0, mma=["HMMA"]).problems(case)
    over = _gate.MAX_SHARED_BYTES[80] + 1
    assert _gate.GateReport("x", 80, registers=96, local_bytes=0, shared_bytes=over, mma=["HMMA"]).problems(case)
    assert not _gate.GateReport("x", 90, registers=96, local_bytes=0, shared_bytes=over, mma=["HGMMA"]).problems(case)
