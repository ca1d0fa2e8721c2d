"""Decode-size NF4 + LoRA forward (``kernels/lora_linear_decode.py``) and the dequantize-once path.

The kernel runs in Triton's interpreter with its table twin (inline PTX cannot run there); the byte-permute
PTX itself is executed here by a small emulator of the five PTX instructions it uses, against the twin's
table, for every code in every position. Matmul results follow the oracle rule (conftest.assert_oracle).
"""

from __future__ import annotations

import re

import pytest
import torch
import triton
from conftest import assert_oracle, stable_seed
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from fastpeft.kernels import lora_linear as L
from fastpeft.kernels import lora_linear_decode as D
from fastpeft.kernels import reference
from fastpeft.kernels.formats import NF4_CODE, NF4Args

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MASK32 = 0xFFFFFFFF

# ----------------------------------------------------------------------------------------------
# the permute PTX, emulated
# ----------------------------------------------------------------------------------------------


def _prmt(a: int, b: int, c: int) -> int:
    """``prmt.b32 d, a, b, c`` (default mode): byte i of d is byte ``c[4i+2:4i]`` of ``{b, a}``, or that
    byte's sign bit replicated when ``c[4i+3]`` is set."""
    src = ((b & MASK32) << 32) | (a & MASK32)
    out = 0
    for i in range(4):
        sel = (c >> (4 * i)) & 0xF
        byte = (src >> (8 * (sel & 7))) & 0xFF
        if sel & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def _run_ptx(asm: str, operands: list[int]) -> list[int]:
    """Execute the decode PTX on ``$0..`` operands (outputs first); only what the kernel's asm uses."""
    regs = {f"${i}": v & MASK32 for i, v in enumerate(operands)}

    def val(tok: str) -> int:
        tok = tok.strip()
        return int(tok, 0) & MASK32 if tok[0].isdigit() else regs[tok]

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        dst, *src = [t.strip() for t in rest.split(",")]
        if op == "and.b32":
            regs[dst] = val(src[0]) & val(src[1])
        elif op == "or.b32":
            regs[dst] = val(src[0]) | val(src[1])
        elif op == "shr.b32":
            regs[dst] = val(src[0]) >> val(src[1])
        elif op == "mul.hi.u32":
            regs[dst] = (val(src[0]) * val(src[1])) >> 32
        elif op == "prmt.b32":
            regs[dst] = _prmt(val(src[0]), val(src[1]), val(src[2]))
        else:
            raise AssertionError(f"the emulator does not know {op!r}")
    return [regs[f"${i}"] for i in range(4)]


def _twin_words(word: int, halves: list[int]) -> list[int]:
    """What the interpreter's twin computes: pairs (e0, e1) .. (e6, e7), element 2j in byte j's high nibble."""
    codes = []
    for j in range(4):
        byte = (word >> (8 * j)) & 0xFF
        codes += [byte >> 4, byte & 0xF]
    return [halves[codes[2 * t]] | (halves[codes[2 * t + 1]] << 16) for t in range(4)]


@pytest.mark.parametrize("asm", ["mul.hi shifts", "shr shifts"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_permute_ptx_decodes_every_code_in_every_position(dtype, asm):
    tables = D.decode_tables(dtype, torch.device("cpu")).tolist()
    # the permute tables and select mask, the twin's 16-bit patterns, the two shift multipliers (2^16, 2^31)
    permute, halves, shifts = [t & MASK32 for t in tables[:9]], tables[9:25], [t & MASK32 for t in tables[25:]]
    assert shifts == [1 << 16, 1 << 31]
    text = D.DECODE_ASM if asm == "mul.hi shifts" else D.DECODE_ASM_SHR
    assert ("mul.hi.u32" in text) == (asm == "mul.hi shifts")
    assert re.findall(r"^\s*(\w+\.\w+)", text, re.M)  # the emulator runs the shipped text
    g = torch.Generator().manual_seed(stable_seed("ptx", str(dtype)))
    words = [int(w) & MASK32 for w in torch.randint(0, 2**32, (200,), generator=g, dtype=torch.int64)]
    # every code at every nibble position, the rest random
    for pos in range(8):
        for code in range(16):
            words.append((words[pos * 16 + code] & ~(0xF << (4 * pos)) | (code << (4 * pos))) & MASK32)
    for w in words:
        got = _run_ptx(text, [0, 0, 0, 0, w, *permute, *shifts])
        want = _twin_words(w, halves)
        assert got == want, f"word {w:#010x}: {[hex(v) for v in got]} != {[hex(v) for v in want]}"


def test_twin_table_holds_the_codebook():
    for dtype in (torch.float16, torch.bfloat16):
        halves = torch.tensor(D.decode_tables(dtype, torch.device("cpu"))[9:25].tolist(), dtype=torch.int32)
        values = halves.to(torch.int16).view(dtype).float()
        torch.testing.assert_close(values, torch.tensor(NF4_CODE).to(dtype).float(), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# the kernel (interpreter) against the oracle
# ----------------------------------------------------------------------------------------------


def _nf4(n: int, k: int, dq: bool, blocksize: int, g: torch.Generator) -> NF4Args:
    w = torch.randn((n, k), generator=g) * 0.1
    packed, absmax = reference.nf4_quantize_reference(w, blocksize)
    kw = {}
    if dq:
        offset = absmax.mean()
        absmax, nested = reference.dynamic8_quantize_reference(absmax - offset)
        kw = {"nested_absmax": nested.to(DEVICE), "offset": offset.reshape(1).to(DEVICE)}
    return NF4Args(packed.to(DEVICE), absmax.to(DEVICE), (n, k), blocksize, **kw)


def _dense(nf4: NF4Args, dtype: torch.dtype) -> torch.Tensor:
    n, k = nf4.shape
    flat = reference.nf4_dequantize_reference(
        nf4.packed, nf4.absmax, n * k, torch.float32, blocksize=nf4.blocksize,
        nested_absmax=nf4.nested_absmax, offset=nf4.offset,
    )  # fmt: skip
    return flat.view(n, k).to(dtype)


def _check(m, k, n, r, dq, blocksize, dtype, *, bias=True, drop=False, where=""):
    g = torch.Generator().manual_seed(stable_seed(m, k, n, r, dq, blocksize, str(dtype), drop))
    nf4 = _nf4(n, k, dq, blocksize, g)
    x = torch.randn((m, k), generator=g).to(DEVICE, dtype)
    a = (torch.randn((r, k), generator=g) * 0.2).to(DEVICE, dtype)
    b = (torch.randn((n, r), generator=g) * 0.2).to(DEVICE, dtype)
    bb = torch.randn(n, generator=g).to(DEVICE, dtype) if bias else None
    mask = (torch.rand((m, k), generator=g) > 0.25).to(DEVICE) if drop else None
    kw = {"dropout_mask": mask, "dropout_p": 0.25} if drop else {}
    s = 1.5
    assert D.decode_supported(x, nf4)
    y, u = L.lora_linear_fwd(x, None, bb, a, b, s, nf4=nf4, **kw)
    exact_y, exact_u = reference.lora_linear_fwd_reference(
        x.double(), None, None if bb is None else bb.double(), a.double(), b.double(), s, nf4=nf4, **kw
    )
    w = _dense(nf4, dtype)
    eager_u = ((x * mask / 0.75) if drop else x) @ a.t()
    eager_y = torch.nn.functional.linear(x, w, bb) + s * (eager_u @ b.t())
    assert y.shape == (m, n) and y.dtype == dtype and u.shape == (m, r) and u.dtype == dtype
    assert_oracle(u, exact_u, eager_u, msg=f"{where} u")
    assert_oracle(y, exact_y, eager_y, msg=f"{where} y")
    # the base-only linear runs the same kernel with no LoRA term
    yb = L.nf4_linear_fwd(x, bb, nf4)
    exact_b = reference.nf4_linear_fwd_reference(x.double(), None if bb is None else bb.double(), nf4)
    assert_oracle(yb, exact_b, torch.nn.functional.linear(x, w, bb), msg=f"{where} base only")


# (M, K, N, R, double quant, blocksize): K a multiple of 64, N never a multiple of BLOCK_N, M across the
# BLOCK_M = 16 / 32 / 64 tiles
CASES = [
    (1, 192, 200, 4, False, 64),
    (5, 320, 130, 8, True, 128),
    (16, 128, 67, 16, True, 64),
    (33, 256, 50, 1, False, 256),
    (64, 64, 129, 64, True, 64),
    (3, 128, 131, 16, True, 64),
    (17, 192, 257, 8, False, 64),
    (1, 128, 300, 70, True, 64),  # R past 64: two U tiles, two epilogue rank steps
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "M{}K{}N{}R{}{}bs{}".format(*c[:4], "dq" if c[4] else "", c[5]))
def test_decode_forward_matches_oracle(case):
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16  # the interpreter's bf16 dot is wrong
    _check(*case, dtype, bias=case[0] % 2 == 1, where=str(case))


@pytest.mark.parametrize("m", [1, 17])
def test_decode_forward_with_dropout_matches_oracle(m):
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    _check(m, 192, 150, 16, True, 64, dtype, drop=True, where=f"dropout M={m}")


@pytest.mark.parametrize(("m", "bias"), [(1, True), (17, False)])
def test_decode_column_scale_applies_before_the_bias(m, bias):
    # DoRA's epilogue: Y = c ⊙ (X·Wᵀ + s·U·Bᵀ) + bias, c float32 per output feature (zeros and negatives included)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    n, k, r, s = 150, 192, 8, 1.5
    g = torch.Generator().manual_seed(stable_seed("col_scale", m, bias))
    nf4 = _nf4(n, k, True, 64, g)
    x = torch.randn((m, k), generator=g).to(DEVICE, dtype)
    a = (torch.randn((r, k), generator=g) * 0.2).to(DEVICE, dtype)
    b = (torch.randn((n, r), generator=g) * 0.2).to(DEVICE, dtype)
    bb = torch.randn(n, generator=g).to(DEVICE, dtype) if bias else None
    c = torch.randn(n, generator=g) * 2
    c[:3] = 0.0
    c = c.to(DEVICE)
    target = L._target_programs(x.device, DEVICE != "cuda")
    u = D.lora_u_fwd(x, a, L._keep(None, x.device), 1.0, target)
    y = D.nf4_decode_fwd(x, nf4, bb, u, b, s, target, col_scale=c)
    lora, _ = reference.lora_linear_fwd_reference(x.double(), None, None, a.double(), b.double(), s, nf4=nf4)
    exact = c.double() * lora + (0.0 if bb is None else bb.double())
    w = _dense(nf4, dtype)
    eager = c.to(dtype) * (torch.nn.functional.linear(x, w) + s * ((x @ a.t()) @ b.t()))
    eager = eager if bb is None else eager + bb
    assert y.shape == (m, n) and y.dtype == dtype
    assert_oracle(y, exact, eager, msg=f"col_scale M={m}")
    # no scale: the same launch gives the plain LoRA output
    y1 = D.nf4_decode_fwd(x, nf4, bb, u, b, s, target)
    plain, _ = reference.lora_linear_fwd_reference(
        x.double(), None, None if bb is None else bb.double(), a.double(), b.double(), s, nf4=nf4
    )
    assert_oracle(y1, plain, torch.nn.functional.linear(x, w, bb) + s * ((x @ a.t()) @ b.t()), msg="no scale")


@pytest.mark.skipif(DEVICE == "cuda", reason="patches the split rule of the interpreter run")
@pytest.mark.parametrize("target", [1, 7, 1000])
def test_split_k_slices_add_up(monkeypatch, target):
    # 1: one slice; 7: several slices of unequal length (K / 64 = 5 steps); 1000: one step per slice
    monkeypatch.setattr(L, "_target_programs", lambda device, interpret: target)
    _check(3, 320, 70, 8, True, 64, torch.float16, where=f"target {target}")


class _Spy:
    def __init__(self, fn):
        self.fn, self.launches = fn, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.fn[grid](*args, **kwargs)

        return launch


@pytest.mark.skipif(DEVICE == "cuda", reason="counts interpreter launches")
@pytest.mark.parametrize(
    ("m", "k", "dtype", "decoded"),
    [
        (1, 128, torch.float16, True),
        (64, 128, torch.float16, True),
        (65, 128, torch.float16, False),  # past DECODE_M_MAX: dequantize once, dense GEMM
        (4, 96, torch.float16, False),  # K % 64 != 0: the general GEMM decodes in its loop
        (4, 128, torch.float32, False),  # float32: dequantize once
    ],
)
def test_dispatch(monkeypatch, m, k, dtype, decoded):
    spy = _Spy(D._nf4_decode_fused_kernel)
    monkeypatch.setattr(D, "_nf4_decode_fused_kernel", spy)
    g = torch.Generator().manual_seed(m)
    nf4 = _nf4(40, k, True, 64, g)
    x = torch.randn((m, k), generator=g).to(DEVICE, dtype)
    y = L.nf4_linear_fwd(x, None, nf4)
    assert len(spy.launches) == int(decoded), spy.launches
    exact = reference.nf4_linear_fwd_reference(x.double(), None, nf4)
    assert_oracle(y, exact, x @ _dense(nf4, dtype).t(), msg=f"M={m} K={k} {dtype}")
    if decoded:
        assert spy.launches[0]["BLOCK_M"] == max(16, 1 << (m - 1).bit_length())
        assert spy.launches[0]["USE_ASM"] is False


class _Counter:
    """Stands in for a jit kernel: counts its launches and runs it with the dispatch mode below switched off."""

    def __init__(self, name: str, fn, seen: list[str]):
        self.name, self.fn, self.seen = name, fn, seen

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.seen.append(self.name)
            with _disable_current_modes():
                return self.fn[grid](*args, **kwargs)

        return launch


class _TorchOps(TorchDispatchMode):
    """The torch operators a launcher runs outside its kernels (a fill or a cast is a launch on a GPU)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


# what a torch operator costs on a GPU: these run no kernel (allocation, metadata, views)
_NO_KERNEL = {"empty", "new_empty", "view", "reshape", "_reshape_alias", "as_strided", "t", "transpose", "detach",
              "alias", "unsqueeze", "expand", "slice", "select", "_unsafe_view"}  # fmt: skip


def _count_launches(monkeypatch, call) -> tuple[list[str], list[str]]:
    """The Triton launches and the kernel-running torch operators of ``call()`` (after a warm-up call)."""
    seen: list[str] = []
    for module in (D, L, L.kernels, L.wgrad):
        for name, fn in vars(module).items():
            if isinstance(fn, _Counter):
                fn.seen = seen
            jit = isinstance(fn, triton.runtime.JITFunction) or type(fn).__name__ == "InterpretedFunction"
            if jit and name.endswith("_kernel"):  # launched kernels, not the jit helpers they call
                monkeypatch.setattr(module, name, _Counter(name, fn, seen))
    call()  # the first call at a size allocates the zeroed split-K workspace
    seen.clear()
    with _TorchOps() as mode:
        call()
    return seen, [op for op in mode.ops if op not in _NO_KERNEL]


@pytest.mark.skipif(DEVICE == "cuda", reason="counts interpreter launches")
@pytest.mark.parametrize(
    ("m", "r", "bias", "drop", "one"),
    [(1, 16, True, False, True), (17, 8, False, True, False), (16, 64, True, False, True), (32, 8, True, False, False),
     (64, 64, True, False, False), (3, 70, False, False, False)],
)  # fmt: skip
def test_decode_forward_launches(monkeypatch, m, r, bias, drop, one):
    # one launch (U summed inside the decode kernel) without dropout, R <= 64 and M <= 16; else the U kernel first
    g = torch.Generator().manual_seed(stable_seed("launches", m, r))
    k, n = 256, 300
    nf4 = _nf4(n, k, True, 64, g)
    x = torch.randn((m, k), generator=g, dtype=torch.float16)
    a = torch.randn((r, k), generator=g, dtype=torch.float16) * 0.2
    b = torch.randn((n, r), generator=g, dtype=torch.float16) * 0.2
    bb = torch.randn(n, generator=g, dtype=torch.float16) if bias else None
    kw = {"dropout_mask": torch.rand((m, k), generator=g) > 0.3, "dropout_p": 0.3} if drop else {}
    launches, ops = _count_launches(monkeypatch, lambda: L.lora_linear_fwd(x, None, bb, a, b, 0.5, nf4=nf4, **kw))
    want = ["_nf4_decode_fused_kernel"] if one else ["_lora_u_kernel", "_nf4_decode_fused_kernel"]
    assert launches == want, launches
    assert not ops, f"torch operators that launch kernels on a GPU: {ops}"
    launches, ops = _count_launches(monkeypatch, lambda: L.nf4_linear_fwd(x, bb, nf4))
    assert launches == ["_nf4_decode_fused_kernel"] and not ops, (launches, ops)


@pytest.mark.parametrize("m", [1, 3, 64])
def test_decode_calls_leave_no_state(monkeypatch, m):
    # the split-K workspace and counters are reused by every call: each call leaves them at zero, so calls of other
    # shapes in between and the same call again give the same result
    if DEVICE == "cpu":
        monkeypatch.setattr(L, "_target_programs", lambda device, interpret: 7)
    g = torch.Generator().manual_seed(stable_seed("state", m))
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    nf4, other = _nf4(200, 320, True, 64, g), _nf4(70, 128, False, 64, g)
    x = torch.randn((m, 320), generator=g).to(DEVICE, dtype)
    a, b = (torch.randn((8, 320), generator=g) * 0.2).to(DEVICE, dtype), (torch.randn((200, 8)) * 0.2).to(DEVICE, dtype)
    y1, u1 = L.lora_linear_fwd(x, None, None, a, b, 1.5, nf4=nf4)
    L.nf4_linear_fwd(torch.randn((5, 128), generator=g).to(DEVICE, dtype), None, other)
    y2, u2 = L.lora_linear_fwd(x, None, None, a, b, 1.5, nf4=nf4)
    if DEVICE == "cpu":  # one program at a time: the same additions in the same order
        assert torch.equal(y1, y2) and torch.equal(u1, u2)
    else:  # float atomics add in arrival order
        torch.testing.assert_close(y2, y1, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(u2, u1, rtol=1e-2, atol=1e-2)
    ws, cnt = D._SYNC[x.device]
    assert not ws.any() and not cnt.any(), "the workspace or the counters were left non-zero"


@pytest.mark.skipif(DEVICE == "cuda", reason="inspects the process-wide scratch on the CPU")
def test_dequantize_once_scratch_is_one_buffer_of_the_largest_layer(monkeypatch):
    monkeypatch.setattr(L, "_SCRATCH", {})
    g = torch.Generator().manual_seed(3)
    layers = [_nf4(n, 64, False, 64, g) for n in (24, 56, 40)]
    for nf4 in layers:
        x = torch.randn((70, 64), generator=g, dtype=torch.float16)
        y = L.nf4_linear_fwd(x, None, nf4)
        exact = reference.nf4_linear_fwd_reference(x.double(), None, nf4)
        assert_oracle(y, exact, x @ _dense(nf4, torch.float16).t(), msg=f"N={nf4.shape[0]}")
        dx = L.nf4_linear_bwd_dx(y, nf4)
        assert dx.shape == x.shape
    assert list(L._SCRATCH) == [(torch.device("cpu"), torch.float16)]
    assert L.scratch_bytes() == 56 * 64 * 2


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 7, 16, 40, 64])
@pytest.mark.parametrize("dq", [False, True])
def test_cuda_bf16_decode_matches_oracle(m, dq):
    # the inline-PTX permute path, on real hardware, at a Llama-sized K
    _check(m, 4096, 1000, 16, dq, 64, torch.bfloat16, where=f"cuda M={m}")


def test_codebook_check_runs_once_per_tensor(monkeypatch):
    # comparing a device tensor synchronizes: the decode dispatch compares each code map once
    qmap = torch.tensor(NF4_CODE)
    assert D._is_nf4_codebook(qmap)
    calls = []
    monkeypatch.setattr(D.torch, "equal", lambda *a: calls.append(a) or True)
    assert D._is_nf4_codebook(qmap) and not calls
    qmap[3] = 0.5  # an in-place change is seen again
    monkeypatch.undo()
    assert not D._is_nf4_codebook(qmap)
    assert not D._is_nf4_codebook(torch.linspace(-1, 1, 16))
    n = len(D._CODEBOOK_CHECKED)
    del qmap
    assert len(D._CODEBOOK_CHECKED) < n  # the entry left with its tensor


@pytest.mark.compile_gate
def test_split_rule_fills_what_the_binaries_keep_resident():
    # the split-K rule fills one wave of RESIDENT_PER_SM (or _FOLD) programs per SM: every shipped decode binary must
    # fit that many per SM on its arch, or the rule would leave a second, partial wave
    from fastpeft.kernels import _gate

    cases = {c.name: c for c in D.compile_gate_cases() if c.kernel == "_nf4_decode_fused_kernel"}
    for rep in _gate.run_gate(list(cases.values()), (80, 90)):
        case = cases[rep.case]
        want = D.resident_per_sm(rep.arch, case.constexprs["BLOCK_M"], case.constexprs["FOLD_U"], case.args["N"])
        assert rep.ctas_per_sm >= want, f"{rep.case} sm_{rep.arch}: {rep.ctas_per_sm} per SM ({rep.regs} registers)"
