"""Ahead-of-time build of the C library (``libfastpeft_kernels``): which kernel binaries it ships, built by the
compile gate, and the C sources that embed them. ``CMakeLists.txt`` runs ``build``; the tests run ``verify``.

**Variants.** The library has one C entry point per op; behind it, each kernel family (NF4 dequantize, the
decode-size NF4 + LoRA forward, the skinny ``U = X·Aᵀ`` product, the dense tiled GEMM with the LoRA epilogue)
has a list of variants. A variant is a ``GateCase``: the compile gate's own case, or one *derived* from a gate
case by changing only its runtime integers (``args``). Kernel, pointer types, constexprs, warps, stages and
options stay those of the gate case, so a derived variant is the same gated configuration; what changes is
Triton's specialization of the integers (a value of 1 becomes a constant, a multiple of 16 gets a
divisibility hint). Each family keeps the gate's hinted cases for the common shapes and adds an ``any``
variant built from values that are neither 1 nor multiples of 16, which accepts every shape. At run time the
C code takes the first variant whose specialization the call satisfies; the specialization of each variant
is read from the gate's binding (``_gate.bind_case``), never re-derived here.

**Tiled GEMM configuration.** One per arch, from ``lora_linear_kernels``' tiled autotune list: 128x128x64, 8
warps, 3 stages on both sm_80 and sm_90a. The gate's estimates give both listed tiles the same occupancy
(8 warps per SM: 254 registers), and the 128-row tile reuses each loaded operand element over 64 products
against 43 for the 64-row one; on sm_90a its two warpgroups each run a 64-row wgmma. The library sends
M <= 64 with ``K % 64 == 0`` to the decode kernel, so the 64-row tile would serve only the rare rest.
Unmeasured: correct it from GPU timings.

**Build.** Every (variant, arch) is compiled by ``_gate.build`` (its cache, its binding), in ``jobs`` child
processes without ``TRITON_INTERPRET``. The embedded cubin is the gate's artifact byte for byte, compiled from
this checkout (``_check_source_dir``). Triton's launch metadata (kernel name, warps, shared memory, scratch
sizes) comes from ``triton.compile`` on the same binding (compiled afresh when Triton's cache holds another
checkout's build of the same source), whose cubin must equal the gate's, and the kernel's
PTX parameters must be those the C launcher passes (``_check_entry``). The gate's verdict (spills, shared
memory, MMA) is recorded per binary in ``manifest.json``; it does not stop the build. Command line::

    python -m fastpeft.kernels._aot build --out DIR [--set full|minimal] [--blob NAME=ARCH=CUBIN ...] [--jobs N]
        [--source CHECKOUT]
    python -m fastpeft.kernels._aot verify --lib LIBRARY [--set full|minimal]
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import inspect
import json
import multiprocessing
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from fastpeft.kernels import _gate
from fastpeft.kernels._gate import GateCase

ARCHS = (80, 90)
FAMILIES = {
    "dequant": ("fastpeft.kernels.nf4", "_nf4_dequantize_kernel", "out_ptr"),
    "decode": ("fastpeft.kernels.lora_linear_decode", "_nf4_decode_kernel", "x_ptr"),
    "skinny": ("fastpeft.kernels.lora_linear_kernels", "_lora_skinny_kernel", "in_ptr"),
    "gemm": ("fastpeft.kernels.lora_linear_kernels", "_lora_gemm_kernel", "in_ptr"),
}
"""Kernel family -> (module, kernel, the pointer whose element type is the variant's dtype)."""
DTYPES = {"fp32": 0, "fp16": 1, "bf16": 2}
"""Triton element type -> ``fastpeft_dtype`` of the C header."""
GEMM_TILE = {80: "128x128x64", 90: "128x128x64"}
"""The tiled GEMM configuration the library ships per arch (see the module docstring)."""
_PARAM_TYPES = {"i32": "FP_I32", "i64": "FP_I64", "fp32": "FP_F32"}
_DIMS = (("BLOCK_M",), ("BLOCK_N", "BLOCK_P"), ("BLOCK_K", "BLOCK_Q"), ("BLOCK_R",), ("BLOCK",))
"""The tile constexprs the C launch rules read, as ``fp_variant``'s block_m, block_n, block_k, block_r, block."""
_ANY = 4095
"""A size that is neither 1 nor a multiple of 16: built with it, an argument carries no specialization."""


@dataclass(frozen=True)
class Variant:
    """One binary of the library: a kernel family's variant (a gate case) built for one arch."""

    family: str
    case: GateCase
    arch: int
    parent: str
    """The compile-gate case this variant is, or is derived from by its runtime integers alone."""


def _derive(parent: GateCase, suffix: str, args: dict) -> GateCase:
    return dataclasses.replace(parent, name=f"{parent.name}+{suffix}", args={**(parent.args or {}), **args})


def _dequant_variants(gate: dict[str, GateCase], ty: str, dq: bool) -> list[tuple[GateCase, str]]:
    parent = gate[f"nf4_dequantize[{ty},double_quant={dq}]"]
    numel = _ANY * 4097 - 2  # odd, and so is its byte count
    return [(parent, parent.name), (_derive(parent, "any", {"numel": numel, "n_bytes": (numel + 1) // 2}), parent.name)]


def _decode_variants(gate: dict[str, GateCase], ty: str, dq: bool) -> list[tuple[GateCase, str]]:
    kind = "nf4dq" if dq else "nf4"
    out = []
    for block_m, ms in ((16, (1, 16)), (32, (32,)), (64, (64,))):
        cases = [gate[f"nf4_decode[{ty},{kind},BLOCK_M={block_m},M={m}]"] for m in ms]
        out += [(c, c.name) for c in cases]
        # any M of the block, any N and rank (K % 64 == 0 is the kernel's contract: K stays hinted)
        m_any = {16: 5, 32: 21, 64: 37}[block_m]
        args = {"M": m_any, "N": _ANY, "R": 7, "stride_um": 7, "stride_bn": 7, "stride_om": _ANY}
        out.append((_derive(cases[-1], "any", args), cases[-1].name))
    return out


def _skinny_args(m: int, k: int) -> dict:
    # U = X·Aᵀ for contiguous X [M, K], A [R, K] (MAT[k, r] = A[r, k]), no dropout mask
    return {
        "M": m, "Q": k, "R": 7, "stride_im": k, "stride_iq": 1, "stride_mq": 1, "stride_mr": k,
        "stride_km": 0, "stride_kq": 0, "scale": 1.0, "has_mask": 0, "split_k": 2,
    }  # fmt: skip


def _skinny_variants(gate: dict[str, GateCase], ty: str, block_m: int, block_r: int) -> list[tuple[GateCase, str]]:
    parent = gate[f"lora_skinny[{ty},BLOCK_M={block_m},BLOCK_R={block_r}]"]
    m = 5 if block_m == 16 else 37
    return [
        (_derive(parent, "k16", _skinny_args(m, 4096)), parent.name),
        (_derive(parent, "any", _skinny_args(m, _ANY)), parent.name),
    ]


def _gemm_args(n: int, k: int, r: int) -> dict:
    # Y = X·Wᵀ + bias + s·U·Bᵀ, X [M, K], W [N, K], U [M, R], B [N, R] contiguous, Y [M, N] stored directly;
    # m_bucket only keys the autotuner (the C code passes a multiple of 16); W's absmax pointer is the 16-entry
    # code placeholder, as the dense launch passes it
    return {
        "M": _ANY, "P": n, "Q": k, "R": r, "m_bucket": 4096, "n_blocks": 16, "blocksize_shift": 0,
        "stride_im": k, "stride_iq": 1, "stride_wq": 1, "stride_wp": k, "stride_lm": r, "stride_lr": 1,
        "stride_rr": 1, "stride_rp": r, "stride_km": 0, "stride_kp": 0, "stride_om": n, "stride_op": 1,
        "lora_scale": 2.0, "has_bias": 1, "has_mask": 0, "split_k": 1,
    }  # fmt: skip


def _gemm_variants(gate: dict[str, GateCase], ty: str, arch: int) -> list[tuple[GateCase, str]]:
    parent = gate[f"lora_gemm_fwd[{ty},dense,{GEMM_TILE[arch]},R=16]"]
    # rows that are not 16-byte aligned take the launcher's smaller tile (lora_linear_kernels' prune rule):
    # the large tile at unaligned strides loads element by element and spills
    unaligned = gate[f"lora_gemm_fwd[{ty},dense,128x64x32,R=16,M=1000,N=4097,K=4095]"]
    return [
        (_derive(parent, "n16k16r16", _gemm_args(4096, 4096, 16)), parent.name),
        (_derive(unaligned, "any", _gemm_args(_ANY, _ANY + 2, 7)), unaligned.name),
    ]


def library_variants(kernel_set: str = "full") -> list[Variant]:
    """Every binary the library embeds, in dispatch order within each family (the first match wins).

    ``minimal`` is the bfloat16 double-quantized dequantize alone (its gate case and its ``any`` variant), for
    tests that check the library's build, symbols and binaries in seconds.
    """
    gate = {c.name: c for c in _gate.all_cases()}
    out: list[Variant] = []

    def add(family: str, pairs: list[tuple[GateCase, str]], archs: tuple[int, ...] = ARCHS) -> None:
        out.extend(Variant(family, case, arch, parent) for arch in archs for case, parent in pairs)

    if kernel_set == "minimal":
        add("dequant", _dequant_variants(gate, "bf16", True))
        return out
    if kernel_set != "full":
        raise ValueError(f"kernel_set must be 'full' or 'minimal', got {kernel_set!r}")
    for ty in ("fp32", "fp16", "bf16"):
        for dq in (False, True):
            add("dequant", _dequant_variants(gate, ty, dq))
    for ty in ("fp16", "bf16"):
        for dq in (False, True):
            add("decode", _decode_variants(gate, ty, dq))
        for block_m in (16, 64):
            for block_r in (16, 32, 64):
                add("skinny", _skinny_variants(gate, ty, block_m, block_r))
        for arch in ARCHS:
            add("gemm", _gemm_variants(gate, ty, arch), (arch,))
    return out


# ------------------------------------------------------------------------------------------------
# building one binary (in a child process: compiling needs TRITON_INTERPRET unset)
# ------------------------------------------------------------------------------------------------


def _param_specs(variant: Variant) -> list[dict]:
    """Each runtime parameter of the kernel, in order: its type and what the binary assumes of its value."""
    fn = _gate.jit_function(variant.case)
    src, _ = _gate.bind_case(variant.case, variant.arch, fn)
    specs = []
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            continue
        ty = src.signature[p.name]
        if ty == "constexpr":  # an int the binder made a constant (a value of 1)
            value = src.constants[(i,)]
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{variant.case.name}: {p.name} specialized to {value!r}, not an integer")
            specs.append({"name": p.name, "type": "FP_I32", "spec": "FP_CONST", "value": value})
            continue
        div16 = ["tt.divisibility", 16] in src.attrs.get((i,), [])
        c_type = "FP_PTR" if ty.startswith("*") else _PARAM_TYPES.get(ty)
        if c_type is None:
            raise ValueError(f"{variant.case.name}: parameter {p.name} has type {ty!r}, which the C side lacks")
        specs.append({"name": p.name, "type": c_type, "spec": "FP_DIV16" if div16 else "FP_ANY", "value": 0})
    return specs


_PTX_TYPES = {"FP_PTR": "u64", "FP_I64": "u64", "FP_I32": "u32", "FP_F32": "f32"}


def _check_entry(ptx: str, params: list[dict], what: str) -> None:
    """The kernel's PTX parameters are what the C launcher passes: each parameter not folded into a constant,
    then Triton's two scratch pointers."""
    start = ptx.index(".entry")
    entry = ptx[start : ptx.index(")", start)]
    found = re.findall(r"\.param \.(\w+)", entry)
    want = [_PTX_TYPES[p["type"]] for p in params if p["spec"] != "FP_CONST"] + ["u64", "u64"]
    if found != want:
        raise RuntimeError(f"{what}: the kernel takes parameters {found}, the C launcher would pass {want}")


def _check_source_dir(cubin: bytes, case: GateCase, arch: int) -> None:
    """The cubin was compiled from this checkout's kernel file. Its line info names the file's directory, which
    neither the gate's cache key nor Triton's holds (both hash source text): a cache shared with another
    checkout of the same sources can hand out that checkout's build, the same code with other debug bytes."""
    source = Path(inspect.getsourcefile(_gate.jit_function(case).fn))
    if not any(str(d).encode() in cubin for d in (source.parent, source.resolve().parent)):
        raise RuntimeError(
            f"{case.name} on sm_{arch}: the cached cubin was compiled from another directory than {source.parent}; "
            "give this checkout its own caches (FASTPEFT_GATE_CACHE, TRITON_CACHE_DIR)"
        )


def _build_one(index: int, kernel_set: str) -> dict:
    """Compile variant ``index`` through the gate; its cubin, launch metadata, parameters and the gate's verdict."""
    import triton
    from triton.backends.compiler import GPUTarget

    variant = library_variants(kernel_set)[index]
    case, arch = variant.case, variant.arch
    report = _gate.build(case, arch)
    if report.error:
        raise RuntimeError(f"{case.name} on sm_{arch}: {report.error}")
    cubin = _gate.cubin_bytes(report)
    _check_source_dir(cubin, case, arch)
    src, options = _gate.bind_case(case, arch)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options.__dict__)
    if compiled.asm["cubin"] != cubin:  # Triton's cache may hold another checkout's build of the same source
        compiled = _gate.compile_fresh(src, options, arch)
    if compiled.asm["cubin"] != cubin:
        raise RuntimeError(f"{case.name} on sm_{arch}: triton.compile and the gate built different cubins")
    meta = compiled.metadata
    if meta.global_scratch_size or meta.profile_scratch_size or meta.num_ctas != 1:
        raise RuntimeError(f"{case.name} on sm_{arch}: needs scratch memory or clusters, which the C launcher lacks")
    if meta.launch_cooperative_grid or meta.launch_pdl:
        raise RuntimeError(f"{case.name} on sm_{arch}: needs a cooperative or PDL launch")
    params = _param_specs(variant)
    _check_entry(compiled.asm["ptx"], params, f"{case.name} on sm_{arch}")
    dims = {k: v for k, v in case.constexprs.items() if k.startswith("BLOCK") or k == "DOUBLE_QUANT"}
    return {
        "index": index, "family": variant.family, "case": case.name, "parent": variant.parent, "arch": arch,
        "kernel": meta.name, "num_warps": meta.num_warps, "shared": meta.shared, "cubin": cubin,
        "params": params, "dims": dims, "gate_problems": report.problems(case),
        "pointer_dtype": case.signature[FAMILIES[variant.family][2]].lstrip("*"),
    }  # fmt: skip


def build_all(kernel_set: str, jobs: int | None = None) -> list[dict]:
    """Build every variant of ``kernel_set`` in ``jobs`` child processes (default ``os.cpu_count()``)."""
    n = len(library_variants(kernel_set))
    env_interpret = os.environ.pop("TRITON_INTERPRET", None)  # the children compile
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # as the gate's runs: the same cache keys
    try:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max(1, min(jobs or os.cpu_count() or 1, n)), ctx) as pool:
            return list(pool.map(_build_one, range(n), [kernel_set] * n))
    finally:
        if env_interpret is not None:
            os.environ["TRITON_INTERPRET"] = env_interpret


# ------------------------------------------------------------------------------------------------
# the generated C sources
# ------------------------------------------------------------------------------------------------


def _c_ident(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text)


def _decode_tables() -> list[list[int]]:
    import torch

    from fastpeft.kernels.lora_linear_decode import decode_tables

    return [decode_tables(dt, torch.device("cpu")).tolist() for dt in (torch.float16, torch.bfloat16)]


def _params_header(built: list[dict]) -> str:
    lines = ["/* Generated by python -m fastpeft.kernels._aot: kernel families and their parameters. */", ""]
    lines += ["#pragma once", "", f"#define FP_DECODE_TABLE_WORDS {len(_decode_tables()[0])}", "", "enum {"]
    lines += [f"  FP_FAMILY_{f.upper()} = {i}," for i, f in enumerate(FAMILIES)]
    lines += [f"  FP_NFAMILIES = {len(FAMILIES)}", "};"]
    for family in FAMILIES:
        mine = [b for b in built if b["family"] == family]
        if not mine:
            continue
        names = [p["name"] for p in mine[0]["params"]]
        if any([p["name"] for p in b["params"]] != names for b in mine):
            raise RuntimeError(f"{family}: variants disagree on the kernel's parameters")
        prefix = f"FP_{family.upper()}_"
        lines += ["", "enum {"] + [f"  {prefix}{_c_ident(n)} = {i}," for i, n in enumerate(names)]
        lines += [f"  {prefix}NPARAMS = {len(names)}", "};", f"#define {prefix}PRESENT 1"]
    return "\n".join(lines) + "\n"


def _c_floats(values) -> str:
    # hexadecimal literals: each float32 exactly
    return ", ".join(f"{float(v).hex()}f" for v in values)


def _constants() -> list[str]:
    from fastpeft.kernels.formats import dynamic_map, nf4_code

    out = [f"const float fp_nf4_code[16] = {{{_c_floats(nf4_code().tolist())}}};"]
    out.append(f"const float fp_dynamic_map[256] = {{{_c_floats(dynamic_map().tolist())}}};")
    out.append("const int32_t fp_decode_tables[2][FP_DECODE_TABLE_WORDS] = {")
    out += [f"  {{{', '.join(f'(int32_t){v}' for v in t)}}}," for t in _decode_tables()]
    return [*out, "};"]


def _data_source(built: list[dict], blobs: list[tuple[str, int, str]]) -> str:
    lines = [
        "/* Generated by python -m fastpeft.kernels._aot: the embedded binaries and their launch data. */",
        "#include <stdint.h>", '#include "fastpeft_internal.h"', "",
    ]  # fmt: skip
    for b in built:
        params = ", ".join(f"{{{p['type']}, {p['spec']}, {p['value']}}}" for p in b["params"])
        lines.append(f"static const fp_param fp_params_{b['index']}[] = {{{params}}};")
    for i in range(len(built) + len(blobs)):
        lines.append(f"extern const unsigned char fp_blob_{i}[], fp_blob_{i}_end[];")
    lines += ["", "const fp_variant fp_variants[] = {"]
    for b in built:
        d = b["dims"]
        dims = [int(d.get("DOUBLE_QUANT", 0))]
        dims += [next((d[k] for k in keys if k in d), 0) for keys in _DIMS]
        lines.append(
            f"  {{FP_FAMILY_{b['family'].upper()}, {b['arch']}, {DTYPES[b['pointer_dtype']]}, "
            f'{", ".join(map(str, dims))}, {b["num_warps"]}, {b["shared"]}, "{b["kernel"]}", "{b["case"]}", '
            f"fp_blob_{b['index']}, fp_blob_{b['index']}_end, {len(b['params'])}, fp_params_{b['index']}}},"
        )
    lines += ["};", f"const int fp_nvariants = {len(built)};", "", "const fp_blob fp_extra_blobs[] = {"]
    for i, (name, arch, _) in enumerate(blobs):
        k = len(built) + i
        lines.append(f'  {{"{name}", {arch}, fp_blob_{k}, fp_blob_{k}_end}},')
    lines += ["  {0, 0, 0, 0}", "};", f"const int fp_nextra_blobs = {len(blobs)};", ""]
    return "\n".join(lines + _constants()) + "\n"


def _blobs_asm(paths: list[str]) -> str:
    lines = ["/* Generated by python -m fastpeft.kernels._aot: the cubins, embedded byte for byte. */"]
    lines.append(".section .rodata")
    for i, path in enumerate(paths):
        if '"' in path or "\\" in path:
            raise ValueError(f"cannot embed {path!r}: quote or backslash in the path")
        lines += [".balign 64", f".globl fp_blob_{i}", f".hidden fp_blob_{i}", f".globl fp_blob_{i}_end"]
        lines += [f".hidden fp_blob_{i}_end", f"fp_blob_{i}:", f'.incbin "{path}"', f"fp_blob_{i}_end:"]
    lines.append('.section .note.GNU-stack,"",@progbits')
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def build(out: Path, kernel_set: str, blobs: list[tuple[str, int, str]], jobs: int | None = None) -> list[dict]:
    """Build the variants and write ``fastpeft_kernels_params.h``, ``fastpeft_kernels_data.c``,
    ``fastpeft_kernels_blobs.S`` and ``manifest.json`` into ``out``. ``blobs``: other cubins to embed, as
    ``(name, arch, path)`` (the C cast kernels)."""
    out.mkdir(parents=True, exist_ok=True)
    built = build_all(kernel_set, jobs)
    cubins = out / "cubins"
    cubins.mkdir(exist_ok=True)
    for b in built:  # the build tree keeps its own copies: the gate's cache may be pruned
        dest = cubins / f"{b['index']:03d}.sm_{b['arch']}.cubin"
        data = b.pop("cubin")
        if not dest.exists() or dest.read_bytes() != data:
            dest.write_bytes(data)
        b["cubin"] = str(dest.resolve())
        b["sha256"] = hashlib.sha256(data).hexdigest()
    _write(out / "fastpeft_kernels_params.h", _params_header(built))
    _write(out / "fastpeft_kernels_data.c", _data_source(built, blobs))
    _write(out / "fastpeft_kernels_blobs.S", _blobs_asm([b["cubin"] for b in built] + [p for _, _, p in blobs]))
    _write(out / "manifest.json", json.dumps({"kernel_set": kernel_set, "binaries": built}, indent=1))
    return built


# ------------------------------------------------------------------------------------------------
# verifying a built library against the gate
# ------------------------------------------------------------------------------------------------


def embedded_binaries(lib: Path) -> list[tuple[str, int, bytes]]:
    """``(case or blob name, arch, bytes)`` of every binary in the library, read through its own API."""
    import ctypes

    so = ctypes.CDLL(str(lib))
    name, arch, data, size = ctypes.c_char_p(), ctypes.c_int(), ctypes.c_void_p(), ctypes.c_size_t()
    refs = [ctypes.byref(v) for v in (name, arch, data, size)]
    out = []
    for i in range(so.fastpeft_kernels_binary_count()):
        if so.fastpeft_kernels_binary(i, *refs):
            raise RuntimeError(f"fastpeft_kernels_binary({i}) failed")
        out.append((name.value.decode(), arch.value, ctypes.string_at(data.value, size.value)))
    return out


def verify(lib: Path, kernel_set: str) -> list[str]:
    """Differences between the library's Triton binaries and what the gate builds now for the same cases."""
    want = {(v.case.name, v.arch): v for v in library_variants(kernel_set)}
    found = {(n, a): data for n, a, data in embedded_binaries(lib) if "[" in n}
    problems = [f"missing from the library: {n} sm_{a}" for n, a in sorted(set(want) - set(found))]
    problems += [f"not a variant of the '{kernel_set}' set: {n} sm_{a}" for n, a in sorted(set(found) - set(want))]
    for key in sorted(set(want) & set(found)):
        report = _gate.build(want[key].case, key[1])
        if report.error:
            problems.append(f"{key[0]} sm_{key[1]}: the gate failed to build it: {report.error}")
        elif _gate.cubin_bytes(report) != found[key]:
            problems.append(f"{key[0]} sm_{key[1]}: the embedded cubin differs from the gate's")
    return problems


def _main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m fastpeft.kernels._aot", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="compile the library's kernels and write its generated sources")
    b.add_argument("--out", required=True, type=Path)
    b.add_argument("--set", default="full", choices=("full", "minimal"))
    b.add_argument("--blob", action="append", default=[], metavar="NAME=ARCH=CUBIN", help="another cubin to embed")
    b.add_argument("--jobs", type=int)
    b.add_argument("--source", type=Path, help="the checkout being built: its kernels/ must be the ones imported")
    v = sub.add_parser("verify", help="compare a built library's cubins with the gate's builds")
    v.add_argument("--lib", required=True, type=Path)
    v.add_argument("--set", default="full", choices=("full", "minimal"))
    args = p.parse_args(argv)
    if args.cmd == "build":
        here = Path(__file__).resolve().parent
        if args.source is not None and here != (args.source / "kernels").resolve():
            p.error(f"this Python imports fastpeft's kernels from {here}, not from {args.source}: pip install -e it")
        blobs = []
        for spec in args.blob:
            name, arch, path = spec.split("=", 2)
            blobs.append((name, int(arch), str(Path(path).resolve())))
        built = build(args.out, args.set, blobs, args.jobs)
        failing = [f"{b['case']} sm_{b['arch']}: {'; '.join(b['gate_problems'])}" for b in built if b["gate_problems"]]
        print(f"{len(built)} kernel binaries in {args.out}; the gate fails {len(failing)} of them")
        for line in failing:
            print(f"  gate: {line}")
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        p.error("unset TRITON_INTERPRET: the gate compiles")
    problems = verify(args.lib, args.set)
    for line in problems:
        print(line)
    print(f"{len(problems)} differences")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(_main())
