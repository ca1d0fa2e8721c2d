"""Reading a kernel for the cost model (kernels/_perf.py): cuobjdump text -> ``Profile``.

Each instruction becomes an ``Op`` with the fields of its control word that the timing walk needs (stall count,
write and read scoreboards, wait mask: the second 64-bit word of every Volta+ instruction, bits 105-121; Jia et al.
2018, arXiv:1804.06826), the pipe it issues to, the bytes it moves through the SM's load/store path and the tensor
flops it multiplies (HGMMA / HMMA shapes). Code is cut into the loops that hold a global load or an MMA (innermost
backward branches, kernels/_sass.py's loop finder) and the fixed span around them, each with per-warp costs of one
pass. A ``Profile`` is plain data (``to_dict`` / ``from_dict``), so that a profile of someone else's binary can be
stored and re-predicted without the binary.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from fastpeft.kernels import _sass

__all__ = ["Op", "Profile", "Span", "profile_from_sass"]

# ------------------------------------------------------------------------------------------------
# reading a kernel: ops with their control words, loops, per-pass costs
# ------------------------------------------------------------------------------------------------

_PIPE_OF = {
    "alu": "IADD3 IADD IADD32I LOP3 LOP LOP32I PRMT SHF SHL SHR LEA ISETP ISCADD IMNMX VIMNMX IABS SGXT BMSK SEL MOV "
    "PLOP3 P2R R2P ICMP FSEL FSETP FMNMX FMNMX3 FSET HSETP2 HSET2 HMNMX2 VABSDIFF VABSDIFF4 FSWZADD",
    "fmaheavy": "IMAD IMUL VIADD VIADD3 IDP IDP4A",
    "fp32": "FFMA FADD FMUL FFMA32I FADD32I FMUL32I FRND FCHK",
    "fp16x2": "HFMA2 HADD2 HMUL2",
    "fp64": "DADD DMUL DFMA DSETP DMNMX",
    "mufu": "MUFU FLO POPC BREV F2F F2I I2F F2FP I2FP F2IP I2IP I2I",
    "mma": "HMMA HGMMA IMMA IGMMA QGMMA BMMA BGMMA DMMA",
}
_PIPE = {op: pipe for pipe, ops in _PIPE_OF.items() for op in ops.split()}
_GLOBAL_LOAD = {"LDG", "LD", "LDGSTS", "UTMALDG", "UBLKCP"}
_SMEM_LOAD = {"LDS", "LDSM", "ATOMS"}
_STORE = {"STG", "ST", "STS", "STSM", "RED", "REDG", "STL", "UTMASTG"}
_ATOM = {"ATOM", "ATOMG"}
_MIO = {"S2R", "S2UR", "LDC", "SHFL", "VOTE", "MATCH", "BAR", "CS2R"}
_WIDTH_BYTES = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16, "256": 32}
_MMA_SHAPE = re.compile(r"^(\d+)x(\d+)x(\d+)$")
_HMMA_SHAPE = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4), "16832": (16, 8, 32), "8816": (8, 8, 16)}
_ELEM_BYTES = {"F16": 2, "BF16": 2, "TF32": 4, "E4M3": 1, "E5M2": 1, "S8": 1, "U8": 1, "F64": 8}


@dataclass(frozen=True)
class Op:
    """One instruction for the timing walk: its kind, control word fields and what it moves or multiplies."""

    addr: int
    kind: str
    """gload, smem, store, atom, mio, mufu, mma, bar, depbar, ldgdepbar, wgdepbar, other."""
    stall: int
    wbar: int
    rbar: int
    wait: int
    arg: int = 0
    """The count of ``DEPBAR.LE`` / ``WARPGROUP.DEPBAR.LE``."""
    tensor_flops: float = 0.0
    """Per warp (a warpgroup's HGMMA is shared by its 4 warps)."""
    warpgroup: bool = False
    level: str = ""
    """Where a global load is served from: "dram" (marked evict-first - ``.EF`` or a cache-policy descriptor - or
    named so: a stream read once), "l2" or "l1" (named so), "" (the launch's ``dram_loads`` rule decides)."""


@dataclass
class Span:
    """A span of code: a loop body (``loop`` True) or the code outside every loop, with per-warp costs of one pass."""

    start: int
    end: int
    loop: bool
    ops: list[Op] = field(default_factory=list)
    instructions: int = 0
    pipes: dict[str, float] = field(default_factory=dict)
    lsu_cycles: float = 0.0
    """Clocks of the SM's 128 B/clk load/store data path: max(1, bytes / 128) per memory instruction."""
    smem_bytes: float = 0.0
    """Shared-memory bytes moved by loads, stores, cp.async and the MMA operands read from shared memory."""
    mma_smem_bytes: float = 0.0
    gload_bytes: float = 0.0
    tensor_flops: dict[str, float] = field(default_factory=dict)
    barriers: int = 0


@dataclass
class Profile:
    """What the model needs of one compiled kernel; JSON-serializable (``to_dict`` / ``from_dict``)."""

    kernel: str
    arch: int
    regs: int
    shared_bytes: int
    num_warps: int
    loops: list[Span]
    fixed: Span
    source: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Profile:
        def span(s: dict) -> Span:
            return Span(**{**s, "ops": [Op(**o) for o in s["ops"]]})

        return cls(**{**d, "loops": [span(s) for s in d["loops"]], "fixed": span(d["fixed"])})


_CTRL = re.compile(r"/\*\s*0x([0-9a-f]{16})\s*\*/\s*$")
_ADDR = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s")


def _controls(text: str, kernel: str) -> dict[int, tuple[int, int, int, int]]:
    """``{address: (stall, write barrier, read barrier, wait mask)}`` from the second encoding word of each
    instruction (Volta+ control bits 105-121: stall 4 bits, yield, write and read scoreboards 3 bits each (7 = none),
    wait mask 6; Jia et al. 2018, arXiv:1804.06826)."""
    out: dict[int, tuple[int, int, int, int]] = {}
    current, pending = None, None
    for line in text.splitlines():
        m = _sass._FUNCTION.match(line)
        if m:
            current, pending = m.group(1), None
            continue
        if current != kernel:
            continue
        a = _ADDR.match(line)
        if a:
            pending = int(a.group(1), 16)
            continue
        c = _CTRL.search(line)
        if c and pending is not None:
            hi = int(c.group(1), 16)
            out[pending] = ((hi >> 41) & 0xF, (hi >> 46) & 7, (hi >> 49) & 7, (hi >> 52) & 0x3F)
            pending = None
    return out


def _bytes_per_lane(mods: list[str]) -> int:
    widths = [_WIDTH_BYTES[m] for m in mods if m in _WIDTH_BYTES]
    return max(widths) if widths else 4


def _mma(ins: _sass.Instruction) -> tuple[float, str, bool, float]:
    """(flops per warp, element kind, warpgroup-wide, shared-memory bytes per warp) of an MMA instruction."""
    mods = ins.modifiers
    elem = next((m for m in mods if m in _ELEM_BYTES), "F16")
    kind = {"F16": "fp16", "BF16": "fp16", "TF32": "tf32", "E4M3": "fp8", "E5M2": "fp8", "S8": "int8", "U8": "int8",
            "F64": "fp64"}[elem]  # fmt: skip
    if ins.base in ("HGMMA", "IGMMA", "QGMMA", "BGMMA"):
        m, n, k = next((tuple(map(int, s.groups())) for mm in mods if (s := _MMA_SHAPE.match(mm))), (64, 8, 16))
        flops = 2.0 * m * n * k / 4  # the warpgroup's product, a quarter per warp
        a_in_regs = re.match(r"\s*R\d+\s*,\s*R\d+", ins.operands) is not None
        smem = ((0 if a_in_regs else m * k) + n * k) * _ELEM_BYTES[elem] / 4
        return flops, kind, True, smem
    m, n, k = next((_HMMA_SHAPE[mm] for mm in mods if mm in _HMMA_SHAPE), (16, 8, 16))
    return 2.0 * m * n * k, kind, False, 0.0


def _op(ins: _sass.Instruction, ctrl: tuple[int, int, int, int], level: str) -> tuple[Op, str, float, float, float]:
    """The timing op of ``ins`` and its (pipe, LSU clocks, shared bytes, global load bytes) per warp."""
    base, mods = ins.base, ins.modifiers
    stall, wbar, rbar, wait = ctrl
    lane = _bytes_per_lane(mods)
    lsu = smem = gload = 0.0
    kind, arg, flops, wg = "other", 0, 0.0, False
    pipe = _PIPE.get(base) or ("uniform" if base.startswith("U") else "other")
    if base in _GLOBAL_LOAD or base in _SMEM_LOAD or base in _STORE or base in _ATOM:
        pipe = "lsu"
        nbytes = 32 * lane
        if base == "LDSM" or base == "STSM":
            nbytes = 128 * next((int(m) for m in mods if m in ("1", "2", "4")), 1)
        lsu = max(1.0, nbytes / 128.0)
        if base in _GLOBAL_LOAD:
            kind, gload = "gload", nbytes
            if base == "LDGSTS":
                smem = nbytes
        elif base in _SMEM_LOAD:
            kind, smem = "smem", nbytes
        elif base in _ATOM:
            kind = "atom"
        else:
            kind = "store"
            if base in ("STS", "STSM"):
                smem = nbytes
    elif base in ("MUFU",) or (pipe == "mufu" and wbar != 7):
        kind = "mufu"
    elif pipe == "mma":
        flops, _, wg, smem = _mma(ins)
        kind = "mma"
    elif base == "BAR":
        kind = "bar"
    elif base == "DEPBAR":
        kind, arg = "depbar", int(ins.operands.split(",")[-1].strip(), 0)
    elif base == "LDGDEPBAR":
        kind = "ldgdepbar"
    elif base == "WARPGROUP" and "DEPBAR" in mods:
        kind, arg = "wgdepbar", int(ins.operands.split(",")[-1].strip(), 0)
    elif base in _MIO:
        kind = "mio"
    op = Op(ins.addr, kind, stall, wbar, rbar, wait, arg, flops, wg, level if kind == "gload" else "")
    return op, pipe, lsu, smem, gload


def _span(
    ins_list: list[_sass.Instruction], ctrls: dict, loop: bool, tensor_kinds: dict[int, str], levels: dict[int, str]
) -> Span:
    sp = Span(ins_list[0].addr if ins_list else 0, ins_list[-1].addr if ins_list else 0, loop)
    for ins in ins_list:
        op, pipe, lsu, smem, gload = _op(ins, ctrls.get(ins.addr, (1, 7, 7, 0)), levels.get(ins.addr, ""))
        sp.ops.append(op)
        sp.instructions += 1
        sp.pipes[pipe] = sp.pipes.get(pipe, 0.0) + 1.0
        sp.lsu_cycles += lsu
        sp.smem_bytes += smem
        if op.kind == "mma":
            sp.mma_smem_bytes += smem
        sp.gload_bytes += gload
        if op.kind == "mma":
            k = tensor_kinds[ins.addr]
            sp.tensor_flops[k] = sp.tensor_flops.get(k, 0.0) + op.tensor_flops
        sp.barriers += op.kind == "bar"
    return sp


def profile_from_sass(
    text: str,
    kernel: str,
    arch: int,
    num_warps: int,
    shared_bytes: int,
    not_taken: Sequence[tuple[int, int]] = (),
    levels: dict[int, str] | None = None,
    source: str = "",
) -> Profile:
    """The model's view of ``kernel`` in cuobjdump output ``text`` (``--dump-resource-usage --dump-sass``).

    ``shared_bytes``: dynamic shared memory of the launch (the static part is read from the resource usage).
    ``not_taken``: address spans ``[start, end)`` of code a branch skips at the launches to be predicted (a tail
    path, say); they are left out of every span. ``levels``: ``{address: "dram" | "l2" | "l1"}`` for global loads
    whose source the kernel does not mark (which stream is read once, which table stays in L1). The loops are the
    innermost backward branches whose body holds a global load or an MMA, in address order; everything else is the
    fixed span, which after the last loop stops at the first ``EXIT``.
    """
    functions = _sass.parse_sass(text)
    usage = _sass.parse_resource_usage(text).get(kernel, {})
    if kernel not in functions:
        raise ValueError(f"no function {kernel!r} in the SASS (found {sorted(functions)})")
    instrs = [x for x in functions[kernel] if not any(a <= x.addr < b for a, b in not_taken)]
    exits = [i for i, x in enumerate(instrs) if x.base == "EXIT"]
    instrs = instrs[: exits[-1] + 1] if exits else instrs
    ctrls = _controls(text, kernel)
    tensor_kinds = {x.addr: _mma(x)[1] for x in instrs if _PIPE.get(x.base) == "mma"}
    marked = {x.addr for x in instrs if x.base in _GLOBAL_LOAD and "EF" in x.modifiers}
    marked |= _sass._policy_descriptors(instrs) if not marked else set()
    levels = {**dict.fromkeys(marked, "dram"), **(levels or {})}

    def busy(lp: _sass.Loop) -> bool:
        return any(x.base in _GLOBAL_LOAD or _PIPE.get(x.base) == "mma" for x in lp.instructions)

    loops = [lp for lp in _sass.find_loops(instrs) if busy(lp)]
    inner = [a for a in loops if not any(b is not a and a.start <= b.start and b.end <= a.end for b in loops)]
    inner = sorted({(lp.start, lp.end): lp for lp in inner}.values(), key=lambda lp: lp.start)
    in_loop = {x.addr for lp in inner for x in lp.instructions}
    spans = [_span(lp.instructions, ctrls, True, tensor_kinds, levels) for lp in inner]
    # after the last loop, code past the first EXIT (conditional ones included) runs in some CTAs only - a masked
    # tail tile, one program's remainder - so a CTA's fixed cost stops there
    last = max((lp.end for lp in inner), default=-1)
    stop = next((x.addr for x in instrs if x.base == "EXIT" and x.addr > last), None) if inner else None
    rest = [x for x in instrs if x.addr not in in_loop and (stop is None or x.addr <= stop)]
    fixed = _span(rest, ctrls, False, tensor_kinds, levels)
    shared = shared_bytes + max(usage.get("SHARED", 0), 0)
    return Profile(kernel, arch, usage.get("REG", 0), shared, num_warps, spans, fixed, source)
