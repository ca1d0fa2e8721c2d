"""The C library (CMakeLists.txt, csrc/): it builds from this checkout without a GPU or a driver, exports exactly
its header's functions, embeds sm_80 and sm_90a cubins that are the compile gate's builds byte for byte, checks
its arguments, and its ctest skips cleanly without a GPU.

The default run builds the ``minimal`` kernel set (one kernel, both archs) in ``build/capi-minimal`` and reuses
it (CMake rebuilds what changed). ``slow`` checks the full library in ``build/`` (the README's build directory);
``gpu`` runs its ctest against the Python path.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HAS_CUDA

ROOT = Path(__file__).resolve().parents[1]
HEADER = ROOT / "csrc" / "fastpeft_kernels.h"
CUDA_ERROR_INVALID_VALUE, CUDA_ERROR_NO_DEVICE = 1, 100
FLOAT32, FLOAT16, BFLOAT16 = 0, 1, 2

pytestmark = pytest.mark.skipif(
    not (shutil.which("cmake") and shutil.which("nvcc")), reason="needs cmake and the CUDA toolkit's nvcc"
)


def _env() -> dict[str, str]:
    # the build and the gate compile real cubins: never under the interpreter
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _build(build_dir: Path, kernel_set: str) -> Path:
    if not (build_dir / "CMakeCache.txt").exists():
        cmd = ["cmake", "-S", str(ROOT), "-B", str(build_dir), f"-DFASTPEFT_KERNEL_SET={kernel_set}"]
        subprocess.run([*cmd, f"-DPython3_EXECUTABLE={sys.executable}"], check=True, capture_output=True, env=_env())
    done = subprocess.run(["cmake", "--build", str(build_dir)], capture_output=True, text=True, env=_env())
    assert done.returncode == 0, f"cmake --build {build_dir} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    lib = build_dir / "libfastpeft_kernels.so"
    assert lib.exists()
    return lib


@pytest.fixture(scope="module")
def minimal_lib() -> Path:
    return _build(ROOT / "build" / "capi-minimal", "minimal")


def _header_functions() -> set[str]:
    return set(re.findall(r"FASTPEFT_API\s+\w+\s+(fastpeft_\w+)\(", HEADER.read_text()))


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _verify(libs: list[Path], kernel_set: str, fresh: Path | None = None) -> list[list[str]]:
    """``_aot.verify`` of each library, in a child process that can compile (optionally with empty caches)."""
    env = _env()
    if fresh is not None:  # a real compile now, not the gate's or Triton's cached artifacts
        env["FASTPEFT_GATE_CACHE"], env["TRITON_CACHE_DIR"] = str(fresh / "gate"), str(fresh / "triton")
    code = (
        "import json, sys; from fastpeft.kernels import _aot;"
        f"print(json.dumps([_aot.verify(__import__('pathlib').Path(p), {kernel_set!r}) for p in sys.argv[1:]]))"
    )
    done = subprocess.run([sys.executable, "-c", code, *map(str, libs)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_exports_exactly_the_header_functions(minimal_lib):
    out = subprocess.run(["nm", "-D", "--defined-only", str(minimal_lib)], capture_output=True, text=True, check=True)
    exported = {line.split()[-1] for line in out.stdout.splitlines() if " T " in line}
    assert _header_functions() and exported == _header_functions()


def test_links_without_the_cuda_driver(minimal_lib):
    dyn = subprocess.run(["readelf", "-d", str(minimal_lib)], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\).*\[(.+)\]", dyn)
    assert needed and not [n for n in needed if "cuda" in n], needed
    undef = subprocess.run(["nm", "-D", "--undefined-only", str(minimal_lib)], capture_output=True, text=True).stdout
    assert not [s for s in undef.split() if s.startswith("cu")], "the library links a driver symbol"


def _embedded(lib: Path) -> list[tuple[str, int, bytes]]:
    from fastpeft.kernels import _aot

    return _aot.embedded_binaries(lib)


def _elf_arch(data: bytes, tmp_path: Path) -> str:
    path = tmp_path / "blob.cubin"
    path.write_bytes(data)
    listing = subprocess.run([_tool("cuobjdump"), "--list-elf", str(path)], capture_output=True, text=True, check=True)
    found = re.findall(r"\.(sm_\w+)\.cubin", listing.stdout)
    assert len(found) == 1, listing.stdout
    return found[0]


def test_embedded_cubins_are_sm80_and_sm90a(minimal_lib, tmp_path):
    binaries = _embedded(minimal_lib)
    archs: dict[str, set[str]] = {}
    for name, arch, data in binaries:
        sm = _elf_arch(data, tmp_path)
        assert sm == {80: "sm_80", 90: "sm_90a"}[arch], f"{name}: reported sm_{arch}, the ELF says {sm}"
        archs.setdefault(name, set()).add(sm)
    assert "csrc/cast.cu" in archs and any("[" in n for n in archs), sorted(archs)
    assert all(a == {"sm_80", "sm_90a"} for a in archs.values()), archs


def test_embedded_cubins_are_the_gates_builds(minimal_lib, tmp_path):
    # a copy of the library with one byte of an embedded cubin flipped: the check must see it
    name, arch, data = next(b for b in _embedded(minimal_lib) if "[" in b[0])
    raw = bytearray(minimal_lib.resolve().read_bytes())
    at = raw.find(data) + len(data) // 2
    raw[at] ^= 0xFF
    (tmp_path / "corrupt").mkdir()
    corrupt = tmp_path / "corrupt" / "libfastpeft_kernels.so"
    corrupt.write_bytes(bytes(raw))
    good, bad = _verify([minimal_lib, corrupt], "minimal", fresh=tmp_path / "caches")
    assert good == [], good
    assert bad == [f"{name} sm_{arch}: the embedded cubin differs from the gate's"], bad


def test_the_manifest_records_each_binary(minimal_lib):
    manifest = json.loads((minimal_lib.parent / "generated" / "manifest.json").read_text())
    embedded = {(n, a) for n, a, _ in _embedded(minimal_lib) if "[" in n}
    assert {(b["case"], b["arch"]) for b in manifest["binaries"]} == embedded
    for b in manifest["binaries"]:
        # every variant is a compile-gate case, or derived from one by its runtime integers alone
        assert b["case"] == b["parent"] or b["case"].startswith(b["parent"] + "+"), b["case"]
        assert isinstance(b["gate_problems"], list)


def test_a_cubin_compiled_in_another_checkout_is_refused():
    # the gate's and Triton's caches key on source text: the build must not embed another checkout's build
    from fastpeft.kernels import _aot

    v = _aot.library_variants("minimal")[0]
    _aot._check_source_dir(b"\0" + str(ROOT / "kernels").encode() + b"\0", v.case, v.arch)
    with pytest.raises(RuntimeError, match="another directory"):
        _aot._check_source_dir(b"\0/elsewhere/kernels\0", v.case, v.arch)


def _library(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    ptr = ctypes.c_void_p
    lib.fastpeft_nf4_dequantize.argtypes = [ptr, ptr, ctypes.c_int64, ctypes.c_int, ptr]
    lib.fastpeft_nf4_lora_linear_workspace_bytes.restype = ctypes.c_size_t
    lib.fastpeft_nf4_lora_linear_workspace_bytes.argtypes = [ctypes.c_int] + [ctypes.c_int64] * 4
    fwd = [ctypes.c_void_p, ctypes.c_int] + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 3 + [ctypes.c_int64]
    lib.fastpeft_nf4_lora_linear_forward.argtypes = fwd + [ctypes.c_void_p] * 2 + [ctypes.c_float] + [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
    ]  # fmt: skip
    return lib


class Weight(ctypes.Structure):
    _fields_ = [
        ("packed", ctypes.c_void_p), ("absmax", ctypes.c_void_p), ("nested_absmax", ctypes.c_void_p),
        ("offset", ctypes.c_void_p), ("nested_quant_map", ctypes.c_void_p), ("blocksize", ctypes.c_int),
        ("double_quant", ctypes.c_int),
    ]  # fmt: skip


def _driver_loads() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def test_argument_checks(minimal_lib):
    lib = _library(minimal_lib)
    ok = Weight(0x1000, 0x2000, 0x3000, 0x4000, None, 64, 1)  # never dereferenced: every call below is refused
    bad = [
        (None, 100, BFLOAT16, 0x5000),
        (Weight(0x1008, 0x2000, 0x3000, 0x4000, None, 64, 1), 100, BFLOAT16, 0x5000),  # packed not 16-byte aligned
        (Weight(0x1000, 0x2000, 0x3000, 0x4000, None, 96, 1), 100, BFLOAT16, 0x5000),  # blocksize
        (Weight(0x1000, 0x2000, None, 0x4000, None, 64, 1), 100, BFLOAT16, 0x5000),  # double quant, no nested_absmax
        (ok, 0, BFLOAT16, 0x5000),
        (ok, 2**31, BFLOAT16, 0x5000),
        (ok, 100, 7, 0x5000),
        (ok, 100, BFLOAT16, 0x5004),
    ]
    for i, (w, numel, dtype, out) in enumerate(bad):
        ref = ctypes.byref(w) if w is not None else None
        assert lib.fastpeft_nf4_dequantize(None, ref, numel, dtype, out) == CUDA_ERROR_INVALID_VALUE, i
    size = lib.fastpeft_nf4_lora_linear_workspace_bytes
    # U float32 and 16-bit, then the decode path's float32 [M, N] or the dequantized W, each to 256 bytes
    assert size(BFLOAT16, 1, 4096, 4096, 16) == 256 + 256 + 4 * 4096
    assert size(FLOAT16, 200, 4096, 4096, 16) == 12800 + 6400 + 2 * 4096 * 4096
    assert size(FLOAT16, 3, 100, 200, 0) == 0 + 0 + 40192  # K % 64 != 0: dequantize, 2*100*200 rounded up
    assert size(FLOAT32, 1, 64, 64, 8) == 0 and size(BFLOAT16, 1, 65536, 65536, 8) == 0
    fwd, ws = lib.fastpeft_nf4_lora_linear_forward, 0x100000
    args = dict(dtype=BFLOAT16, m=1, n=4096, k=4096, x=0x6000, w=ctypes.byref(ok), bias=None, r=16, a=0x7000,
                b=0x8000, s=2.0, y=0x9000, ws=ws, ws_bytes=size(BFLOAT16, 1, 4096, 4096, 16))  # fmt: skip
    for change in ({"ws_bytes": 1000}, {"a": None}, {"x": 0x6002}, {"dtype": FLOAT32}, {"r": -1}, {"w": None}):
        assert fwd(None, *{**args, **change}.values()) == CUDA_ERROR_INVALID_VALUE, change
    if not _driver_loads():  # valid arguments get as far as loading the driver
        assert lib.fastpeft_nf4_dequantize(None, ctypes.byref(ok), 100, BFLOAT16, 0x5000) == CUDA_ERROR_NO_DEVICE
        assert fwd(None, *args.values()) == CUDA_ERROR_NO_DEVICE


@pytest.mark.skipif(HAS_CUDA, reason="checks the skip without a GPU")
def test_ctest_skips_without_a_gpu(minimal_lib):
    done = subprocess.run(["ctest", "--test-dir", str(minimal_lib.parent)], capture_output=True, text=True, env=_env())
    assert done.returncode == 0, done.stdout
    for test in ("capi_vectors", "capi_forward"):
        assert re.search(rf"{test} \.+\*+Skipped", done.stdout), done.stdout


@pytest.mark.slow
def test_full_library(tmp_path):
    lib = _build(ROOT / "build", "full")
    binaries = _embedded(lib)
    archs: dict[str, set[int]] = {}
    for name, arch, _ in binaries:
        archs.setdefault(name, set()).add(arch)
    assert all(a == {80, 90} for n, a in archs.items() if not n.startswith("lora_gemm")), archs
    for family in ("nf4_dequantize[", "nf4_decode[", "lora_skinny[", "lora_gemm_fwd["):
        assert any(n.startswith(family) for n in archs), family
    assert _verify([lib], "full") == [[]]
    for data in {d for _, _, d in binaries[:: max(1, len(binaries) // 12)]}:
        assert _elf_arch(data, tmp_path) in ("sm_80", "sm_90a")


@pytest.mark.gpu
@pytest.mark.slow
def test_ctest_against_the_python_path():
    lib = _build(ROOT / "build", "full")
    done = subprocess.run(["ctest", "--test-dir", str(lib.parent), "-V"], capture_output=True, text=True, env=_env())
    assert done.returncode == 0 and "Skipped" not in done.stdout, done.stdout[-6000:]
