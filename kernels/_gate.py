"""Compile gate: build shipped Triton kernel configurations for real GPUs without a GPU.

``triton.compile`` with a ``GPUTarget`` produces sm_80 / sm_90a cubins on any machine; the
``cuobjdump`` shipped in the triton wheel reads their resource usage (registers, ``LOCAL`` spill
memory, shared memory) and SASS (``HMMA`` on sm_80 and ``HGMMA`` on sm_90a mean tensor cores).

Each kernel module exposes ``compile_gate_cases() -> list[GateCase]`` listing every configuration
its launchers can pick (autotune lists included). Compilation must not run under
``TRITON_INTERPRET=1`` (interpreted functions cannot be compiled), so ``run_gate`` compiles in a
child process with that variable removed.

Command line: ``python -m fastpeft.kernels._gate [--arch 80 90] [--json]``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

KERNEL_MODULES = (
    "fastpeft.kernels.nf4",
    "fastpeft.kernels.lora_linear",
    "fastpeft.kernels.adapter",
)
ARCHS = (80, 90)
MAX_SHARED_BYTES = {80: 166_912, 90: 232_448}
"""Shared memory one block may use: 163 KB on A100 (sm_80), 227 KB on H100 (sm_90)."""


@dataclass(frozen=True)
class GateCase:
    """One kernel configuration: the jit function (by module and name) and its specialization."""

    name: str
    module: str
    kernel: str
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    tensor_cores: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    args: dict[str, Any] | None = None
    """Runtime values of the non-constexpr, non-pointer parameters as the launcher passes them for one
    representative shape; the gate specializes them as Triton's binder does at launch (ints equal to 1
    become constants, multiples of 16 get divisibility hints). Pointers are taken as 16-byte aligned."""
    path: str = ""
    """Cost-model path of a kernel that reads weights: "decode" (small-M fused NF4 GEMM), "dequant"
    (NF4 dequantize), "tiled" (tensor-core GEMM tile), "small" (split-K GEMM); "" for kernels that read none."""
    weights_per_iteration: int = 0
    """Weights one program reads (decodes) per main-loop iteration (per program for a kernel without a loop)."""
    bytes_per_weight: float = 0.0
    """HBM bytes moved per weight on this path (NF4 with double quantization reads about 0.516)."""


@dataclass
class GateReport:
    case: str
    arch: int
    registers: int = -1
    local_bytes: int = -1
    shared_bytes: int = -1
    mma: list[str] = field(default_factory=list)
    error: str = ""

    def problems(self, case: GateCase) -> list[str]:
        """What makes this configuration fail the gate (empty when it passes)."""
        if self.error:
            return [f"compile error: {self.error}"]
        out = []
        if self.local_bytes != 0:
            out.append(f"{self.local_bytes} bytes of local memory (register spills)")
        limit = MAX_SHARED_BYTES.get(self.arch)
        if limit is not None and self.shared_bytes > limit:
            out.append(f"{self.shared_bytes} bytes of shared memory, over sm_{self.arch}'s {limit}")
        if case.tensor_cores:
            want = "HGMMA" if self.arch >= 90 else "HMMA"
            if want not in self.mma:
                out.append(f"no {want} in the SASS (found {self.mma or 'no MMA'})")
        return out


def all_cases() -> list[GateCase]:
    """Every module's cases; a module that is missing or lists none is an error, never a skip."""
    cases = []
    for name in KERNEL_MODULES:
        mod_cases = importlib.import_module(name).compile_gate_cases()
        if not mod_cases:
            raise RuntimeError(f"{name}.compile_gate_cases() lists no configuration")
        cases.extend(mod_cases)
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        raise RuntimeError(f"duplicate compile-gate case names: {sorted({n for n in names if names.count(n) > 1})}")
    return cases


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_case(case: GateCase, arch: int) -> GateReport:
    """Compile one case for ``sm_<arch>`` in this process (TRITON_INTERPRET must be unset)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    report = GateReport(case=case.name, arch=arch)
    fn = getattr(importlib.import_module(case.module), case.kernel)
    sig = dict(case.signature)
    for k in case.constexprs:
        sig[k] = "constexpr"
    try:
        src = ASTSource(fn=fn, signature=sig, constexprs=dict(case.constexprs))
        opts = {"num_warps": case.num_warps, "num_stages": case.num_stages, **case.options}
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    except Exception as e:  # the report carries the failure to the test
        report.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        return report
    report.shared_bytes = int(compiled.metadata.shared)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True)
        sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", f.name], capture_output=True, text=True)
    m = re.search(r"REG:(\d+).*?STACK:(\d+).*?LOCAL:(\d+)", usage.stdout, re.S)
    if m is None:
        report.error = f"cuobjdump gave no resource usage: {usage.stderr.strip()[:200]}"
        return report
    # register spills land in STACK (with LDL / STL in the SASS); LOCAL is other local arrays
    report.registers = int(m.group(1))
    spill_ops = len(re.findall(r"\b(?:LDL|STL)\b", sass.stdout))
    report.local_bytes = int(m.group(2)) + int(m.group(3)) + spill_ops
    report.mma = sorted({op for op in ("HGMMA", "HMMA") if re.search(rf"\b{op}\b", sass.stdout)})
    return report


def run_gate(
    cases: list[GateCase] | None = None, archs: tuple[int, ...] = ARCHS, jobs: int | None = None
) -> list[GateReport]:
    """Compile ``cases`` (default: all) for ``archs`` in ``jobs`` child processes without TRITON_INTERPRET."""
    names = [c.name for c in (all_cases() if cases is None else cases)]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(names)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the current default, stated (silences a warning)
    base = [sys.executable, "-m", "fastpeft.kernels._gate", "--json", "--arch", *map(str, archs), "--case"]
    procs = [
        subprocess.Popen([*base, *names[i::jobs]], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for i in range(jobs)
    ]
    reports = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"compile gate process failed:\n{err[-4000:]}")
        reports += [GateReport(**r) for r in json.loads(out)]
    return reports


def _main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m fastpeft.kernels._gate", description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    p.add_argument("--case", nargs="+", help="case names (default: all)")
    p.add_argument("--json", action="store_true", help="print reports as JSON")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        p.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    cases = [c for c in all_cases() if args.case is None or c.name in args.case]
    reports = [compile_case(c, a) for c in cases for a in args.arch]
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in reports]))
        return 0
    by_name = {c.name: c for c in cases}
    print(f"{'case':60s} {'sm':>3s} {'regs':>5s} {'local':>6s} {'smem':>7s}  mma     verdict")
    failed = 0
    for r in reports:
        problems = r.problems(by_name[r.case])
        failed += bool(problems)
        verdict = "ok" if not problems else "; ".join(problems)
        print(f"{r.case:60s} {r.arch:3d} {r.registers:5d} {r.local_bytes:6d} {r.shared_bytes:7d}  "
              f"{','.join(r.mma) or '-':7s} {verdict}")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(_main())
