"""Every shipped Triton kernel configuration compiles for sm_80 and sm_90a as its launcher runs it, without
spilling; tensor-core kernels show HMMA (sm_80) / HGMMA (sm_90a); the cost model's budgets hold on sm_90a.

The gate's cost-model figures are static estimates (kernels/_sass.py); the budgets below are the issue's:
the decode path at most 8 thread-instructions per weight with packed W read by >= 64-bit loads, the NF4
dequantize kernel at >= 80 % of its predicted HBM roofline."""

from __future__ import annotations

import dataclasses
import json
import os
import time

import pytest
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

from fastpeft.kernels import _gate

CASES = {c.name: c for c in _gate.all_cases()}
BUDGET_ARCH = 90
DECODE_MAX_INSTRUCTIONS_PER_WEIGHT = 8.0
DECODE_MIN_W_LOAD_BITS = 64
DEQUANT_MIN_ROOFLINE = 0.80


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
    assert not problems, f"{name} on sm_{arch}: {'; '.join(problems)} (registers {report.regs})"
    assert report.regs > 0 and report.warps_per_sm > 0


@pytest.mark.compile_gate
def test_every_case_is_built_as_its_launcher_runs_it(gate_reports):
    bare = sorted({r.case for r in gate_reports.values() if not r.faithful})
    assert not bare, f"{len(bare)} cases have no launcher args, so the gate compiles their bare signature: {bare}"


@pytest.mark.compile_gate
def test_no_spill_anywhere(gate_reports):
    spills = [
        f"{r.case} sm_{r.arch}: stack {r.stack_bytes}, local {r.local_bytes}, LDL/STL {r.spill_instructions}"
        for r in gate_reports.values()
        if not r.error and (r.stack_bytes or r.local_bytes or r.spill_instructions)
    ]
    assert not spills, "\n".join(spills)


@pytest.mark.compile_gate
def test_budget_paths_exist():
    # the budgets below must not pass for want of cases
    paths = {c.path for c in CASES.values()}
    assert {"decode", "dequant"} <= paths, f"cost-model paths among the cases: {sorted(paths)}"


def _path_reports(gate_reports, path: str) -> list[_gate.GateReport]:
    return [r for r in gate_reports.values() if r.path == path and r.arch == BUDGET_ARCH]


@pytest.mark.compile_gate
def test_decode_budget(gate_reports):
    over = [
        f"{r.case}: {r.thread_instructions_per_weight} thread-instructions per weight (estimate), "
        f"W loads {r.w_load_bits} bits ({r.loop}, {r.loop_instructions} instructions, {r.model_error or r.error})"
        for r in _path_reports(gate_reports, "decode")
        if r.thread_instructions_per_weight is None
        or r.thread_instructions_per_weight > DECODE_MAX_INSTRUCTIONS_PER_WEIGHT
        or r.w_load_bits < DECODE_MIN_W_LOAD_BITS
    ]
    assert not over, "\n".join(over)


@pytest.mark.compile_gate
def test_dequant_budget(gate_reports):
    under = [
        f"{r.case}: predicted {r.predicted_roofline_fraction} of the HBM roofline (estimate; "
        f"{r.thread_instructions_per_weight} thread-instructions per weight, {r.model_error or r.error})"
        for r in _path_reports(gate_reports, "dequant")
        if r.predicted_roofline_fraction is None or r.predicted_roofline_fraction < DEQUANT_MIN_ROOFLINE
    ]
    assert not under, "\n".join(under)


@pytest.mark.compile_gate
def test_gate_detects_spills_and_missing_tensor_cores():
    # the gate's verdicts are not vacuous: stack, local memory, LDL/STL, too much shared memory, a missing MMA
    case = _gate.GateCase(name="x", module="m", kernel="k", signature={}, constexprs={}, tensor_cores=True)
    clean = {"regs": 96, "stack_bytes": 0, "local_bytes": 0, "spill_instructions": 0, "shared_bytes": 0}
    assert not _gate.GateReport("x", 90, **clean, mma=["HGMMA"]).problems(case)
    assert not _gate.GateReport("x", 80, **clean, mma=["HMMA"]).problems(case)
    for field, value in (("stack_bytes", 168), ("local_bytes", 64), ("spill_instructions", 3)):
        assert _gate.GateReport("x", 90, **{**clean, field: value}, mma=["HGMMA"]).problems(case), field
    assert _gate.GateReport("x", 90, **clean, mma=["HMMA"]).problems(case)
    over = {**clean, "shared_bytes": _gate.MAX_SHARED_BYTES[80] + 1}
    assert _gate.GateReport("x", 80, **over, mma=["HMMA"]).problems(case)
    assert not _gate.GateReport("x", 90, **over, mma=["HGMMA"]).problems(case)
    assert _gate.GateReport("x", 90, error="CompilationError: boom").problems(case)
    message = "(C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to ..."
    serial = _gate.GateReport("x", 90, **clean, mma=["HGMMA"], wgmma_serialized=True, wgmma_serialization=[message])
    assert any("C7515" in p for p in serial.problems(case))


# ------------------------------------------------------------------------------------------------
# the gate's binding equals Triton's own launch path
# ------------------------------------------------------------------------------------------------


class _TargetOnlyDriver:
    """Stands in for the CUDA driver: a target to specialize for, a device and stream id; nothing to run on."""

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def _gemm_case_with_args() -> _gate.GateCase:
    case = next(c for c in CASES.values() if c.kernel == "_lora_gemm_kernel" and c.constexprs["W_KIND"] != 0)
    # M = 1 and stride_iq = 1 become constants; multiples of 16 get hints unless do_not_specialize (split_k)
    args = {k: 4096 for k, ty in case.signature.items() if not ty.startswith("*")}
    args.update(M=1, stride_iq=1, m_bucket=1, R=16, n_blocks=262144, blocksize_shift=6, lora_scale=0.5)
    args.update(has_bias=0, has_mask=0, split_k=16, stride_wp=1, stride_op=1, stride_kp=1, stride_rp=1, stride_lr=1)
    return dataclasses.replace(case, args=args)


@pytest.mark.compile_gate
@pytest.mark.parametrize("arch", _gate.ARCHS)
def test_binding_equals_what_the_launch_compiles(monkeypatch, arch):
    case = _gemm_case_with_args()
    src, options = _gate.bind_case(case, arch, fn=_gate.jit_function(case, fresh=True))
    seen = {}

    def capture(*, compile, **_):
        seen.update(compile)
        return True  # skip the compile: the arguments it would get are the point

    monkeypatch.setattr(driver, "_active", _TargetOnlyDriver(arch))
    monkeypatch.setattr(triton.knobs.runtime, "jit_cache_hook", capture)
    fn = _gate.jit_function(case, fresh=True)
    fn[(1,)](**_gate.launch_arguments(case, fn), **{k: case.__dict__[k] for k in ("num_warps", "num_stages")})
    assert seen, "the launch never reached compilation"
    assert seen["signature"] == src.signature
    assert seen["constants"] == src.constants
    assert seen["configs"] == [src.attrs]
    assert json.loads(seen["specialization_data"])["options"] == json.loads(json.dumps(options.__dict__))
    # the specialization Triton applies at launch, visible in what the gate compiles
    names = list(fn.arg_names)
    assert src.signature["M"] == "constexpr" and src.constants[(names.index("M"),)] == 1
    assert src.signature["stride_iq"] == "constexpr"
    hint = [["tt.divisibility", 16]]
    assert src.attrs[(names.index("Q"),)] == hint and src.attrs[(names.index("in_ptr"),)] == hint
    assert (names.index("split_k"),) not in src.attrs and src.signature["split_k"] == "i32"
    assert src.signature["lora_scale"] == "fp32"
    # without args the gate compiles the bare signature: no constants folded, no hints
    bare, _ = _gate.bind_case(dataclasses.replace(case, args=None), arch, fn=fn)
    assert bare.signature["M"] == "i32" and not bare.attrs


@pytest.mark.compile_gate
def test_cli_writes_json_and_dump(tmp_path, gate_reports):
    # served from the cache the session's gate run filled
    name = min(CASES, key=lambda n: (CASES[n].path == "", len(n)))
    rc = _gate._main(["--case", name, "--arch", "90", "--json", str(tmp_path / "r.json"), "--dump", str(tmp_path)])
    (record,) = json.loads((tmp_path / "r.json").read_text())
    assert rc == (1 if gate_reports[(name, 90)].problems(CASES[name]) else 0)
    assert record["case"] == name and record["arch"] == 90 and record["regs"] > 0
    keys = "kernel path stack_bytes spill_instructions loop_instructions weights_per_iteration"
    keys += " thread_instructions_per_weight w_load_bits warps_per_sm predicted_roofline_fraction"
    assert set(keys.split()) <= set(record), set(keys.split()) - set(record)
    stems = {p.suffix for p in tmp_path.iterdir() if p.name.endswith(".sm90" + p.suffix)}
    assert stems == {".cubin", ".sass", ".ptxas", ".json"}
    assert "Compiling entry function" in next(tmp_path.glob("*.sm90.ptxas")).read_text()


def test_cache_prunes_only_stale_entries(tmp_path):
    for name, age_days in (("old", 20), ("fresh", 1)):
        (tmp_path / name).mkdir()
        meta = tmp_path / name / "meta.json"
        meta.write_text("{}")
        stamp = time.time() - age_days * 86400
        os.utime(meta, (stamp, stamp))
    assert _gate.prune_cache(tmp_path, max_age_days=14) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh"]


_TWIN_KERNEL = """
import triton
import triton.language as tl


@triton.jit
def twin_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs) * 2.0)
"""

_TWO_CHECKOUTS = """
import importlib.util, sys, types
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastpeft.kernels import _gate

root = Path(sys.argv[1])
sources = []
for checkout in ("first", "second"):
    spec = importlib.util.spec_from_file_location(f"twin_{checkout}", root / checkout / "twin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sources.append(ASTSource(module.twin_kernel, {"x_ptr": "*fp32", "y_ptr": "*fp32"}, {"BLOCK": 128}))
options, target = {"num_warps": 4}, GPUTarget("cuda", 90, 32)
first = triton.compile(sources[0], target=target, options=options).asm["cubin"]
assert str(root / "first").encode() in first
plain = triton.compile(sources[1], target=target, options=options).asm["cubin"]
assert plain == first, "the second checkout should have hit the first one's cached build"
fresh = _gate.compile_fresh(sources[1], types.SimpleNamespace(**options), 90).asm["cubin"]
assert str(root / "second").encode() in fresh and fresh != first
assert triton.compile(sources[1], target=target, options=options).asm["cubin"] == fresh
print("ok")
"""


@pytest.mark.compile_gate
def test_fresh_compile_ignores_another_checkouts_cached_build(tmp_path):
    # two checkouts of one source share ~/.triton/cache; Triton's key hashes the text, not the path, so a plain
    # compile in the second returns the first one's cubin (its line info names the first directory); the
    # gate's compile_fresh builds the second's own and replaces the cached one
    import subprocess
    import sys

    for checkout in ("first", "second"):
        (tmp_path / checkout).mkdir()
        (tmp_path / checkout / "twin.py").write_text(_TWIN_KERNEL)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    run = subprocess.run(
        [sys.executable, "-c", _TWO_CHECKOUTS, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


_SERIAL_KERNEL = """
import triton
import triton.language as tl


@triton.jit
def dot_kernel(a_ptr, b_ptr, l_ptr, r_ptr, c_ptr, K, R, first, LORA_FIRST: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # C = A·B + L·R, L·R summed into the accumulator under a runtime branch before (LORA_FIRST) or after the main
    # loop; before it, ptxas serializes the main loop's wgmma (C7515), as it did in the LoRA GEMM
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, 16)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if LORA_FIRST:
        if first != 0:
            for r0 in range(0, R, 16):
                lt = tl.load(l_ptr + offs_m[:, None] * R + (r0 + offs_r)[None, :])
                rt = tl.load(r_ptr + (r0 + offs_r)[:, None] * BLOCK_N + offs_n[None, :])
                acc = tl.dot(lt, rt, acc)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + offs_m[:, None] * K + (k0 + offs_k)[None, :])
        b = tl.load(b_ptr + (k0 + offs_k)[:, None] * BLOCK_N + offs_n[None, :])
        acc = tl.dot(a, b, acc)
    if not LORA_FIRST:
        if first != 0:
            for r0 in range(0, R, 16):
                lt = tl.load(l_ptr + offs_m[:, None] * R + (r0 + offs_r)[None, :])
                rt = tl.load(r_ptr + (r0 + offs_r)[:, None] * BLOCK_N + offs_n[None, :])
                acc = tl.dot(lt, rt, acc)
    tl.store(c_ptr + offs_m[:, None] * BLOCK_N + offs_n[None, :], acc)
"""

_BUILD_SERIAL = """
import dataclasses, json, sys

from fastpeft.kernels import _gate

sys.path.insert(0, sys.argv[1])
ptr = dict.fromkeys(("a_ptr", "b_ptr", "l_ptr", "r_ptr"), "*fp16")
signature = {**ptr, "c_ptr": "*fp32", "K": "i32", "R": "i32", "first": "i32"}
out = []
for lora_first in (True, False):
    case = _gate.GateCase(
        name=f"dot[{lora_first}]", module="serial_dot", kernel="dot_kernel", signature=signature,
        constexprs={"LORA_FIRST": lora_first, "BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32},
        num_warps=4, num_stages=3, tensor_cores=True, args={"K": 4096, "R": 32, "first": 0},
    )
    # the second build of each comes from the cache and must carry the verdict
    for _ in range(2):
        report = _gate.build(case, 90)
        out.append({**dataclasses.asdict(report), "problems": report.problems(case)})
print(json.dumps(out))
"""


@pytest.mark.compile_gate
def test_gate_fails_serialized_wgmma(tmp_path):
    # ptxas' C7515 (wgmma serialized) fails a configuration like a spill, read from the build's ptxas -v log, and
    # a cached report carries it; the same kernel with the runtime-branch product after the main loop passes
    import subprocess
    import sys

    (tmp_path / "serial_dot.py").write_text(_SERIAL_KERNEL)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(FASTPEFT_GATE_CACHE=str(tmp_path / "gate"), TRITON_CACHE_DIR=str(tmp_path / "triton"))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run(
        [sys.executable, "-c", _BUILD_SERIAL, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    serial, serial_cached, clean, clean_cached = json.loads(run.stdout.strip().splitlines()[-1])
    for r in (serial, serial_cached, clean, clean_cached):
        assert not r["error"] and "HGMMA" in r["mma"] and r["stack_bytes"] == 0, r
    assert [r["cached"] for r in (serial, serial_cached, clean, clean_cached)] == [False, True, False, True]
    for r in (serial, serial_cached):
        assert r["wgmma_serialized"] and "C7515" in r["wgmma_serialization"][0], r
        assert any("wgmma serialized" in p and "C7515" in p for p in r["problems"]), r["problems"]
    for r in (clean, clean_cached):
        assert not r["wgmma_serialized"] and not r["wgmma_serialization"] and not r["problems"], r


def test_cases_are_selected_by_name_family_or_path():
    cases = list(CASES.values())
    decode = _gate.select(cases, families=["nf4_decode"])
    assert decode and all(c.name.startswith("nf4_decode[") for c in decode)
    tiled = _gate.select(cases, paths=["tiled"])
    assert tiled and all(c.path == "tiled" and c.kernel == "_lora_gemm_kernel" for c in tiled)
    one = next(iter(CASES))
    both = _gate.select(cases, names=[one], families=["nf4_decode"], paths=["tiled"])
    assert {c.name for c in both} == {one} | {c.name for c in decode + tiled}
    assert _gate.select(cases) == cases


def test_launch_options_pass_the_knobs_this_triton_has():
    # JITFunction.run copies instrumentation_mode (Triton >= 3.6) and fpsan_homomorphic_casts (>= 3.9) into the
    # options where its knobs have them; an older backend would refuse an option it does not know
    case = next(iter(CASES.values()))
    kwargs = _gate.launch_options(case, _gate.jit_function(case, fresh=True))
    for name in _gate.LAUNCH_KNOBS:
        assert (name in kwargs) == hasattr(triton.knobs.compilation, name), name
