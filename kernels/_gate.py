"""Compile gate: build every shipped Triton kernel configuration for real GPUs, as the launchers run it,
without a GPU; read spills, occupancy and a cost model from the SASS.

**Build.** ``triton.compile`` with a ``GPUTarget`` produces sm_80 / sm_90a cubins on any machine. A case with
``args`` is built through Triton's own launch path: the binder Triton generates for the kernel
(``create_function_from_signature``) specializes the argument values as ``kernel[grid](...)`` does (ints
equal to 1 become constants; multiples of 16 and 16-byte-aligned pointers get divisibility hints;
``do_not_specialize`` is respected), and ``JITFunction._pack_args`` turns that into the signature,
constexprs and attributes of the ``ASTSource``. Such a build is *faithful*: its registers and SASS are those
of the binary that runs. A case without ``args`` compiles the bare signature (no hints) and is reported
``faithful: false``.

**Read.** ``cuobjdump`` (in the triton wheel) gives registers, ``STACK`` / ``LOCAL`` bytes, shared memory and
the SASS. Register spills show as ``STACK`` bytes and ``LDL`` / ``STL`` instructions; any of those, or
``LOCAL`` bytes, fails the gate, as does shared memory over the arch's limit or a tensor-core kernel
without ``HMMA`` (sm_80) / ``HGMMA`` (sm_90a). So does ptxas serializing a kernel's wgmma, which its ``-v`` log
says as ``(C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to ...`` (or
another reason's code): every wgmma then waits for the one before it, one product in flight at a time. Triton
runs ptxas with ``-v`` and prints that log under ``knobs.nvidia.dump_ptxas_log``; the build captures it. For a
case with a cost-model ``path``, kernels/_sass.py finds the main loop and estimates thread-instructions per
weight and the H100 bounds (formula and assumptions there). Those figures are estimates from static
instruction counts, and every record says so.

**Cache and parallelism.** Cubins, cuobjdump's output and the ptxas log are cached (gzip) under
``$FASTPEFT_GATE_CACHE`` (default ``~/.cache/fastpeft/gate``), keyed by a hash of the kernel's Triton
``cache_key`` (its source, callees and globals), the signature, constexprs, attributes, options, arch, ptxas and
Triton versions and the artifacts' layout (``GATE_FORMAT``); reports are recomputed from the cached text each
run, so a change to the analysis never serves a stale report. Cases compile in ``os.cpu_count()`` child
processes without ``TRITON_INTERPRET`` (interpreted functions cannot be compiled).

Each kernel module exposes ``compile_gate_cases() -> list[GateCase]`` listing every configuration its
launchers can pick. Command line::

    python -m fastpeft.kernels._gate [--report] [--json FILE] [--dump DIR] [--arch 80 90]
                                     [--case NAME ...] [--family FAMILY ...] [--path PATH ...]

``--case``, ``--family`` (a case name's part before ``[``, e.g. ``nf4_decode``, ``lora_gemm_fwd``) and ``--path``
(a cost-model path, e.g. ``tiled``) select the cases that match any of them; without one, every case.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import importlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastpeft.kernels import _sass

KERNEL_MODULES = (
    "fastpeft.kernels.nf4",
    "fastpeft.kernels.lora_linear",
    "fastpeft.kernels.adapter",
    "fastpeft.kernels.lora_batched",
    "fastpeft.kernels.cross_entropy",
)
ARCHS = (80, 90)
MAX_SHARED_BYTES = {80: 166_912, 90: 232_448}
"""Shared memory one block may use: 163 KB on A100 (sm_80), 227 KB on H100 (sm_90)."""
GATE_FORMAT = 4
"""Version of the cached artifacts' layout; part of every cache key (4: the ptxas log is stored)."""
_WGMMA_SERIALIZED = re.compile(
    r"\((C\d+)\)\s*Potential Performance Loss:\s*wgmma\.mma_async instructions are serialized"
)
ESTIMATED_FIELDS = (
    "loop_instructions",
    "thread_instructions_per_weight",
    "ctas_per_sm",
    "warps_per_sm",
    "issue_bound_weights_per_s",
    "memory_bound_weights_per_s",
    "predicted_roofline_fraction",
)
"""Report fields that are static estimates (see kernels/_sass.py), not measurements."""
LAUNCH_KNOBS = ("instrumentation_mode", "fpsan_homomorphic_casts")
"""``triton.knobs.compilation`` fields that ``JITFunction.run`` copies into the launch options where they exist."""
_POINTER_DTYPES = {
    "fp64": "float64", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "i64": "int64", "i32": "int32",
    "i16": "int16", "i8": "int8", "u8": "uint8", "i1": "bool", "fp8e4nv": "float8_e4m3fn", "fp8e5": "float8_e5m2",
}  # fmt: skip


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
    """The products must run on tensor cores: HMMA on sm_80, HGMMA (wgmma) on sm_90a unless ``warpgroup_mma``
    is False."""
    warpgroup_mma: bool = True
    """False for tiles below a warpgroup's 64 rows, which Hopper multiplies with HMMA too."""
    options: dict[str, Any] = field(default_factory=dict)
    args: dict[str, Any] | None = None
    """Runtime values of the non-constexpr, non-pointer parameters as the launcher passes them for one
    representative shape; the gate specializes them as Triton's binder does at launch (ints equal to 1
    become constants, multiples of 16 get divisibility hints). Pointers are taken as 16-byte aligned; a
    pointer parameter listed here as None is passed as None."""
    path: str = ""
    """Cost-model path of a kernel that reads weights: "decode" (small-M fused NF4 GEMM), "dequant"
    (NF4 dequantize), "tiled" (tensor-core GEMM tile), "small" (split-K GEMM); "" for kernels that read none."""
    weights_per_iteration: int = 0
    """Weights one program reads (decodes) per main-loop iteration (per program for a kernel without a loop)."""
    bytes_per_weight: float = 0.0
    """HBM bytes moved per weight on this path (NF4 with double quantization reads about 0.516)."""


@dataclass
class GateReport:
    """What the gate found for one case on one arch; ``ESTIMATED_FIELDS`` are estimates."""

    case: str
    arch: int
    kernel: str = ""
    path: str = ""
    faithful: bool = False
    regs: int = -1
    stack_bytes: int = -1
    local_bytes: int = -1
    spill_instructions: int = -1
    shared_bytes: int = -1
    """Dynamic shared memory the launcher requests (Triton's ``metadata.shared``)."""
    static_shared_bytes: int = -1
    mma: list[str] = field(default_factory=list)
    wgmma_serialized: bool = False
    """ptxas serialized the kernel's wgmma (C7515 and kin, from its ``-v`` log): one product in flight at a time."""
    wgmma_serialization: list[str] = field(default_factory=list)
    """ptxas' messages saying so, as it printed them (without the ``ptxas info :`` prefix)."""
    ctas_per_sm: int = 0
    warps_per_sm: int = 0
    occupancy_limit: str = ""
    # -- cost model (cases with a path) --
    loop: str = ""
    loop_instructions: int = 0
    loop_classes: dict[str, int] = field(default_factory=dict)
    weights_per_iteration: int = 0
    threads_per_program: int = 0
    thread_instructions_per_weight: float | None = None
    w_load_bits: int = 0
    w_load_marker: str = ""
    w_loads_per_iteration: int = 0
    bytes_per_weight: float = 0.0
    issue_bound_weights_per_s: float | None = None
    memory_bound_weights_per_s: float | None = None
    predicted_roofline_fraction: float | None = None
    model_error: str = ""
    estimated: list[str] = field(default_factory=lambda: list(ESTIMATED_FIELDS))
    # -- provenance --
    error: str = ""
    cached: bool = False
    key: str = ""
    artifacts: str = ""

    def problems(self, case: GateCase) -> list[str]:
        """What makes this configuration fail the gate (empty when it passes)."""
        if self.error:
            return [f"compile error: {self.error}"]
        out = []
        if self.stack_bytes != 0 or self.spill_instructions != 0:
            out.append(f"register spills: {self.stack_bytes} bytes of stack, {self.spill_instructions} LDL/STL")
        if self.local_bytes != 0:
            out.append(f"{self.local_bytes} bytes of local memory")
        if self.wgmma_serialized:
            codes = sorted({m.group(1) for m in map(_WGMMA_SERIALIZED.search, self.wgmma_serialization) if m})
            out.append(f"wgmma serialized by ptxas ({', '.join(codes)}): {self.wgmma_serialization[0]}")
        limit = MAX_SHARED_BYTES.get(self.arch)
        if limit is not None and self.shared_bytes > limit:
            out.append(f"{self.shared_bytes} bytes of shared memory, over sm_{self.arch}'s {limit}")
        if case.tensor_cores:
            want = "HGMMA" if self.arch >= 90 and case.warpgroup_mma else "HMMA"
            if want not in self.mma:
                out.append(f"no {want} in the SASS (found {self.mma or 'no MMA'})")
        if self.model_error:
            out.append(f"cost model: {self.model_error}")
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


def family(case: GateCase) -> str:
    """A case's family: its name before the ``[`` of its specialization (``nf4_decode``, ``lora_gemm_fwd``)."""
    return case.name.split("[", 1)[0]


def select(cases: list[GateCase], names=(), families=(), paths=()) -> list[GateCase]:
    """The cases named in ``names``, of a family in ``families`` or on a cost-model path in ``paths``; all of
    them when none is given."""
    if not (names or families or paths):
        return list(cases)
    return [c for c in cases if c.name in names or family(c) in families or (c.path and c.path in paths)]


def cache_root() -> Path:
    """Where compiled artifacts are kept: ``$FASTPEFT_GATE_CACHE`` or ``~/.cache/fastpeft/gate``."""
    return Path(os.environ.get("FASTPEFT_GATE_CACHE") or Path.home() / ".cache" / "fastpeft" / "gate")


CACHE_MAX_AGE_DAYS = 14
"""Cached builds unused for this long are deleted (every kernel edit leaves its old builds behind)."""


def prune_cache(root: Path | None = None, max_age_days: float = CACHE_MAX_AGE_DAYS) -> int:
    """Delete cache entries whose last use is older than ``max_age_days``; returns how many."""
    root = root or cache_root()
    cutoff, removed = time.time() - max_age_days * 86400, 0
    for entry in root.glob("*/meta.json") if root.is_dir() else ():
        try:
            if entry.stat().st_mtime < cutoff:
                shutil.rmtree(entry.parent)
                removed += 1
        except OSError:  # another process pruned or used it meanwhile
            continue
    return removed


# ------------------------------------------------------------------------------------------------
# building a case as its launcher runs it
# ------------------------------------------------------------------------------------------------


def jit_function(case: GateCase, fresh: bool = False):
    """The case's ``JITFunction``. Under ``TRITON_INTERPRET`` (or with ``fresh``) a new one over the same
    Python function and specialization flags: binding needs only its parameters, never its callees."""
    from triton.runtime.jit import JITFunction

    fn = getattr(importlib.import_module(case.module), case.kernel)
    if isinstance(fn, JITFunction) and not fresh:
        return fn
    if isinstance(fn, JITFunction):
        flags = {"do_not_specialize": fn.do_not_specialize, "debug": fn.debug, "noinline": fn.noinline}
        flags["do_not_specialize_on_alignment"] = fn.do_not_specialize_on_alignment
        return JITFunction(fn.fn, **flags)
    return JITFunction(fn.fn, **fn.kwargs)  # an InterpretedFunction keeps triton.jit's arguments


def launch_options(case: GateCase, fn) -> dict[str, Any]:
    """The keyword options of the launch, completed as ``JITFunction.run`` completes them."""
    from triton import knobs

    kwargs = {"num_warps": case.num_warps, "num_stages": case.num_stages, **case.options}
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    # each Triton's run() passes the compilation knobs it has: the instrumentation mode from 3.6 on, the FP
    # sanitizer's cast mode from 3.9 on (an option the older backends do not know)
    for name in LAUNCH_KNOBS:
        if hasattr(knobs.compilation, name):
            kwargs[name] = getattr(knobs.compilation, name)
    return kwargs


def _aligned_pointer(ty: str):
    import torch

    name = _POINTER_DTYPES.get(ty.lstrip("*"))
    if name is None:
        raise ValueError(f"no tensor dtype for pointer type {ty!r}")
    buf = torch.empty(64, dtype=torch.uint8)
    skip = -buf.data_ptr() % 16
    return buf[skip : skip + 16].view(getattr(torch, name))


def launch_arguments(case: GateCase, fn) -> dict[str, Any]:
    """Every parameter's value at launch: ``args``, 16-byte-aligned tensors for pointers, ``constexprs``."""
    values, missing = {}, []
    for p in fn.params:
        if p.is_constexpr and p.name in case.constexprs:
            values[p.name] = case.constexprs[p.name]
        elif not p.is_constexpr and case.args is not None and p.name in case.args:
            values[p.name] = case.args[p.name]
        elif not p.is_constexpr and case.signature.get(p.name, "").startswith("*"):
            values[p.name] = _aligned_pointer(case.signature[p.name])
        elif not p.has_default:
            missing.append(p.name)
    if missing:
        raise ValueError(f"{case.name}: no value for {missing} (args or constexprs)")
    return values


def bind_case(case: GateCase, arch: int, fn=None):
    """``(ASTSource, options)`` of the binary the launcher gets on ``sm_<arch>`` (bare signature without args)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = fn or jit_function(case)
    backend = make_backend(GPUTarget("cuda", arch, 32))
    kwargs = launch_options(case, fn)
    if case.args is None:
        sig = {**case.signature, **dict.fromkeys(case.constexprs, "constexpr")}
        return ASTSource(fn=fn, signature=sig, constexprs=dict(case.constexprs)), backend.parse_options(kwargs)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, opts = binder(**launch_arguments(case, fn), **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, opts)
    return ASTSource(fn, signature, constexprs, attrs), options


def _cache_key(src, options, arch: int) -> str:
    import inspect

    import triton
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.cache import triton_key

    # the cubin's line info names the kernel's source file: two checkouts of one source build different bytes
    source_file = os.path.abspath(inspect.getsourcefile(src.fn.fn) or "")
    parts = [
        f"gate{GATE_FORMAT}", triton.__version__, triton_key(), src.fn.cache_key, src.hash(), options.hash(),
        source_file,
        make_backend(GPUTarget("cuda", arch, 32)).hash(), str(sorted(get_cache_invalidating_env_vars().items())),
    ]  # fmt: skip
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _store(artifacts: Path, compiled, ptxas_log: str, case: GateCase, arch: int) -> None:
    """Write cubin, cuobjdump output, ptxas log and metadata into ``artifacts`` atomically (temp dir + rename)."""
    artifacts.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=artifacts.parent))
    try:
        (tmp / "kernel.cubin").write_bytes(compiled.asm["cubin"])
        dump = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", "--dump-sass", str(tmp / "kernel.cubin")],
            capture_output=True, text=True,
        )  # fmt: skip
        (tmp / "kernel.cubin.gz").write_bytes(gzip.compress((tmp / "kernel.cubin").read_bytes(), compresslevel=6))
        (tmp / "kernel.cubin").unlink()
        if dump.returncode != 0:
            raise RuntimeError(f"cuobjdump failed: {dump.stderr.strip()[:300]}")
        (tmp / "kernel.sass.gz").write_bytes(gzip.compress(dump.stdout.encode(), compresslevel=6))
        (tmp / "ptxas.log.gz").write_bytes(gzip.compress(ptxas_log.encode(), compresslevel=6))
        meta = {"kernel": compiled.metadata.name, "shared": int(compiled.metadata.shared), "case": case.name}
        (tmp / "meta.json").write_text(json.dumps({**meta, "arch": arch}))
        try:
            tmp.rename(artifacts)
        except OSError:  # another process stored the same key first
            if not (artifacts / "meta.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def compile_fresh(src, options, arch: int):
    """``triton.compile`` past Triton's own cache, whose key hashes source text but not the file's path: another
    checkout of the same sources (a shared ``~/.triton/cache``) would hand back its cubin, whose line info names
    that checkout. The fresh build replaces the cached one, so later plain compiles here agree with it."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    with knobs.compilation.scope():
        knobs.compilation.always_compile = True
        return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options.__dict__)


def compile_logged(src, options, arch: int) -> tuple[Any, str]:
    """``compile_fresh`` and the ``-v`` log of its ptxas run. Triton runs ptxas with ``-v`` and prints the log to
    stdout under ``knobs.nvidia.dump_ptxas_log``, captured here; a Triton without that knob gets ptxas run again on
    the compiled PTX with ``-v`` (same arch, register-allocation level and line info as Triton's run)."""
    from triton import knobs

    if not hasattr(knobs.nvidia, "dump_ptxas_log"):
        compiled = compile_fresh(src, options, arch)
        return compiled, _rerun_ptxas(compiled.asm["ptx"], arch)
    with knobs.nvidia.scope(), contextlib.redirect_stdout(io.StringIO()) as log:
        knobs.nvidia.dump_ptxas_log = True
        compiled = compile_fresh(src, options, arch)
    return compiled, log.getvalue()


def _rerun_ptxas(ptx: str, arch: int) -> str:
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "k.ptx").write_text(ptx)
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        cmd = [knobs.nvidia.ptxas.path, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}"]
        run = subprocess.run([*cmd, f"{tmp}/k.ptx", "-o", f"{tmp}/k.cubin"], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"ptxas -v failed: {run.stderr.strip()[:300]}")
    return run.stderr


def wgmma_serialization(ptxas_log: str) -> list[str]:
    """ptxas' messages in a ``-v`` log that say it serialized wgmma instructions (C7515 and the other reasons)."""
    lines = (ln.split(":", 1)[1].strip() if ln.startswith("ptxas") else ln.strip() for ln in ptxas_log.splitlines())
    return [line for line in lines if _WGMMA_SERIALIZED.search(line)]


def build(case: GateCase, arch: int) -> GateReport:
    """Compile (or fetch from the cache) one case for ``sm_<arch>`` and analyse it; needs a non-interpreted
    Triton (TRITON_INTERPRET unset). A failure lands in the report's ``error``."""
    report = GateReport(case.name, arch, kernel=case.kernel, path=case.path, faithful=case.args is not None)
    try:
        src, options = bind_case(case, arch)
        report.key = _cache_key(src, options, arch)
        artifacts = cache_root() / report.key
        report.cached = (artifacts / "meta.json").exists()
        if not report.cached:
            _store(artifacts, *compile_logged(src, options, arch), case, arch)
        else:
            os.utime(artifacts / "meta.json")  # last use, for pruning
        report.artifacts = str(artifacts)
        meta = json.loads((artifacts / "meta.json").read_text())
        _analyze(report, case, meta, gzip.decompress((artifacts / "kernel.sass.gz").read_bytes()).decode())
        report.wgmma_serialization = wgmma_serialization(ptxas_log(report))
        report.wgmma_serialized = bool(report.wgmma_serialization)
    except Exception as e:  # the report carries the failure to the test
        lines = str(e).strip().splitlines()
        report.error = f"{type(e).__name__}: {lines[-1] if lines else ''}"
    return report


def _analyze(report: GateReport, case: GateCase, meta: dict, sass: str) -> None:
    stats = _sass.analyze_kernel(sass, meta["kernel"])
    report.regs, report.stack_bytes, report.local_bytes = stats.regs, stats.stack_bytes, stats.local_bytes
    report.spill_instructions, report.mma = stats.spill_instructions, stats.mma
    report.shared_bytes, report.static_shared_bytes = meta["shared"], stats.static_shared_bytes
    occ = _sass.occupancy(report.arch, stats.regs, case.num_warps, meta["shared"] + stats.static_shared_bytes)
    report.ctas_per_sm, report.warps_per_sm, report.occupancy_limit = occ.ctas_per_sm, occ.warps_per_sm, occ.limit
    if not case.path:
        return
    report.loop, report.loop_instructions = stats.loop.describe(), len(stats.loop.instructions)
    report.loop_classes = stats.loop_classes
    report.w_load_bits, report.w_load_marker = stats.w_load_bits, stats.w_load_marker
    report.w_loads_per_iteration = stats.w_loads_per_iteration
    report.weights_per_iteration, report.bytes_per_weight = case.weights_per_iteration, case.bytes_per_weight
    report.threads_per_program = 32 * case.num_warps
    if case.weights_per_iteration <= 0 or case.bytes_per_weight <= 0:
        report.model_error = f"path {case.path!r} needs weights_per_iteration and bytes_per_weight"
        return
    per_weight = report.loop_instructions * report.threads_per_program / case.weights_per_iteration
    report.thread_instructions_per_weight = per_weight
    report.issue_bound_weights_per_s = _sass.issue_bound(per_weight)
    report.memory_bound_weights_per_s = _sass.memory_bound(case.bytes_per_weight)
    report.predicted_roofline_fraction = min(1.0, report.issue_bound_weights_per_s / report.memory_bound_weights_per_s)


# ------------------------------------------------------------------------------------------------
# running the gate: parallel child processes, table, JSON, dump
# ------------------------------------------------------------------------------------------------


def run_gate(
    cases: list[GateCase] | None = None, archs: tuple[int, ...] = ARCHS, jobs: int | None = None
) -> list[GateReport]:
    """Build ``cases`` (default: all; looked up by name in the child processes) for ``archs`` in ``jobs``
    (default ``os.cpu_count()``) child processes without TRITON_INTERPRET; reports in case x arch order.
    Every child walks the whole list and builds the items it claims first (see ``_claimed``), so a slow
    case delays one process, not a fixed share of the list."""
    names = [c.name for c in (all_cases() if cases is None else cases)]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(names) * len(archs)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the current default, stated (silences a warning)
    reports: dict[tuple[str, int], GateReport] = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.mkdir(os.path.join(tmp, "claims"))
        procs = []
        for i in range(jobs):
            out, log = os.path.join(tmp, f"{i}.json"), open(os.path.join(tmp, f"{i}.log"), "w")
            cmd = [sys.executable, "-m", "fastpeft.kernels._gate", "--worker", out, "--claims", f"{tmp}/claims"]
            cmd += ["--arch", *map(str, archs), "--case", *names]
            procs.append((subprocess.Popen(cmd, stdout=log, stderr=log, env=env), out, log))
        for proc, out, log in procs:
            proc.wait()
            log.close()
            if proc.returncode != 0:
                raise RuntimeError(f"compile gate process failed:\n{Path(log.name).read_text()[-4000:]}")
            for r in json.loads(Path(out).read_text()):
                reports[(r["case"], r["arch"])] = GateReport(**r)
    prune_cache()
    return [reports[(n, a)] for n in names for a in archs]


def _claimed(claims: str | None, item: int) -> bool:
    """Whether this process takes work item ``item``: the first to create its claim file does."""
    if claims is None:
        return True
    try:
        os.close(os.open(os.path.join(claims, str(item)), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _wgmma_column(r: GateReport) -> str:
    if r.wgmma_serialized:
        return "serial"
    return "async" if "HGMMA" in r.mma else "-"


def format_table(reports: list[GateReport], cases: dict[str, GateCase]) -> str:
    """The gate's table: resources and verdict per case and arch; the cost-model columns are estimates."""
    width = max([len(r.case) for r in reports] + [4])
    head = (f"{'case':{width}s}  sm regs stack local ldl/stl   smem warps/SM mma    wgmma  faithful"
            f" | path    loop-ins  w/iter  ins/w w-bits roofline | verdict")  # fmt: skip
    lines = [head]
    for r in reports:
        problems = r.problems(cases[r.case])
        model = f"{r.path or '-':7s} {r.loop_instructions or '-':>8} {r.weights_per_iteration or '-':>7} "
        model += f"{_fmt(r.thread_instructions_per_weight, '6.1f'):>6s} {r.w_load_bits or '-':>6} "
        model += f"{_fmt(r.predicted_roofline_fraction, '8.0%'):>8s}"
        lines.append(
            f"{r.case:{width}s} {r.arch:3d} {r.regs:4d} {r.stack_bytes:5d} {r.local_bytes:5d} "
            f"{r.spill_instructions:7d} {r.shared_bytes:6d} {r.warps_per_sm:8d} {','.join(r.mma) or '-':6s} "
            f"{_wgmma_column(r):6s} "
            f"{'yes' if r.faithful else 'NO':8s} | {model} | {'; '.join(problems) or 'ok'}"
        )
    lines.append(
        "wgmma: serial where ptxas serialized the kernel's wgmma (C7515 and kin), async where it kept them in flight. "
        "loop-ins, ins/w (thread-instructions per weight), warps/SM and roofline (predicted fraction of the H100 "
        "HBM roofline) are static estimates; see fastpeft/kernels/_sass.py"
    )
    return "\n".join(lines)


def ptxas_log(report: GateReport) -> str:
    """The ``ptxas -v`` log of the build a report was made from, read from its cache entry."""
    return gzip.decompress((Path(report.artifacts) / "ptxas.log.gz").read_bytes()).decode()


def cubin_bytes(report: GateReport) -> bytes:
    """The cubin a report was built from, read from its cache entry (gzip-compressed; raw in older entries)."""
    packed, raw = Path(report.artifacts) / "kernel.cubin.gz", Path(report.artifacts) / "kernel.cubin"
    return gzip.decompress(packed.read_bytes()) if packed.exists() else raw.read_bytes()


def _dump(reports: list[GateReport], directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for r in reports:
        safe = re.sub(r"[^A-Za-z0-9._=,+\[\]-]", "_", r.case)
        stem = directory / f"{safe}.sm{r.arch}"
        if r.artifacts:
            Path(f"{stem}.cubin").write_bytes(cubin_bytes(r))
            Path(f"{stem}.sass").write_bytes(gzip.decompress((Path(r.artifacts) / "kernel.sass.gz").read_bytes()))
            Path(f"{stem}.ptxas").write_text(ptxas_log(r))
        Path(f"{stem}.json").write_text(json.dumps(dataclasses.asdict(r), indent=1))


def _main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m fastpeft.kernels._gate", description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    p.add_argument("--case", nargs="+", default=[], help="case names (default: all)")
    p.add_argument("--family", nargs="+", default=[], help="case families: the names' part before '['")
    p.add_argument("--path", nargs="+", default=[], help="cost-model paths: decode, dequant, tiled, small")
    p.add_argument("--report", action="store_true", help="print the table (the default without --json/--dump)")
    p.add_argument("--json", metavar="FILE", help="write one record per case and arch")
    p.add_argument("--dump", metavar="DIR", help="write each case's cubin, SASS, ptxas log and record")
    p.add_argument("--jobs", type=int, help="child processes (default: os.cpu_count())")
    p.add_argument("--worker", metavar="FILE", help=argparse.SUPPRESS)
    p.add_argument("--claims", metavar="DIR", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    everything = all_cases()
    unknown = sorted(set(args.case) - {c.name for c in everything})
    if unknown:
        p.error(f"unknown case names: {unknown}")
    for what, given, known in (
        ("families", args.family, {family(c) for c in everything}),
        ("paths", args.path, {c.path for c in everything if c.path}),
    ):
        if set(given) - known:
            p.error(f"unknown {what}: {sorted(set(given) - known)} (known: {', '.join(sorted(known))})")
    cases = select(everything, args.case, args.family, args.path)
    if args.worker:
        if os.environ.get("TRITON_INTERPRET") == "1":
            p.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
        items = [(c, a) for c in cases for a in args.arch]
        reports = [build(c, a) for i, (c, a) in enumerate(items) if _claimed(args.claims, i)]
        Path(args.worker).write_text(json.dumps([dataclasses.asdict(r) for r in reports]))
        return 0
    reports = run_gate(cases, tuple(args.arch), args.jobs)
    if args.json:
        Path(args.json).write_text(json.dumps([dataclasses.asdict(r) for r in reports], indent=1))
    if args.dump:
        _dump(reports, Path(args.dump))
    by_name = {c.name: c for c in cases}
    if args.report or not (args.json or args.dump):
        print(format_table(reports, by_name))
    return 1 if any(r.problems(by_name[r.case]) for r in reports) else 0


if __name__ == "__main__":
    sys.exit(_main())
