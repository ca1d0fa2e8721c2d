"""Static analysis of a kernel's SASS for the compile gate: spills, the main loop, occupancy, an H100 cost model.

Input is the text of ``cuobjdump --dump-resource-usage --dump-sass`` for one cubin. Nothing here compiles or
runs a kernel; every performance figure below is an **estimate** from instruction counts, to be corrected
from GPU measurements whenever there are some.

**Main loop.** A loop is a backward branch (``BRA`` / ``JMP`` to a lower address); its body is every
instruction from the target to the branch. The main loop is the innermost loop whose body holds the packed-W
loads (below), else the innermost holding a global load or an MMA; of several disjoint candidates the largest
(the conservative choice). A kernel with no such loop is counted whole, up to its last ``EXIT``. The count is
static: code a branch skips inside the body still counts (an over-estimate for masked tails).

**Packed-W loads.** Kernels load packed W with ``eviction_policy="evict_first"``. On sm_80 and sm_90a that
shows as ``LDG.E.EF.<width>``. When Triton's pipeliner (``num_stages > 1``) turns the load into ``cp.async``
(``LDGSTS``), ``.EF`` is gone: the policy survives on sm_90a only as a memory descriptor built in the kernel
(``desc[URn]`` whose ``URn`` is not the default descriptor read from the constant bank), which is the second
marker; on sm_80 such a load carries no mark at all, and ``w_load_bits`` is 0. ``w_load_bits`` is the
narrowest marked load in the main loop (``LDG.E.EF.64`` -> 64, ``.U8`` -> 8, no width -> 32).

**Cost model** (per kernel, for a case that declares its ``weights_per_iteration`` and ``bytes_per_weight``)::

    thread_instructions_per_weight = loop_instructions * threads_per_program / weights_per_iteration
    issue bound   = 4 * 32 * 132 * 1.755e9 / thread_instructions_per_weight   weights/s
    memory bound  = 3.0e12 / bytes_per_weight                                  weights/s
    predicted_roofline_fraction = min(1, issue bound / memory bound)

Assumptions: an H100 SXM (132 SMs at 1.755 GHz, each issuing 4 warp-instructions per clock, one per
scheduler; 3.0 TB/s of usable HBM bandwidth); every instruction costs one issue slot, an MMA included (its
tensor-core time is not modelled, so the model is for decode-bound loops, not for compute-bound GEMM tiles);
the loop runs enough iterations that the code outside it is negligible; memory traffic is what the case
declares per weight (L2 hits and re-reads are not modelled).

**Occupancy** does not enter the bounds: the issue bound assumes every scheduler finds a ready warp each clock.
It is reported beside them (CTAs and warps per SM from registers, shared memory, thread and CTA limits) so
that a reader can judge that assumption: below about 2 warps per scheduler (8 per SM) latency is rarely hidden
and the issue bound is optimistic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = [
    "CLASSES",
    "H100",
    "Instruction",
    "KernelStats",
    "Loop",
    "Occupancy",
    "analyze_kernel",
    "classify",
    "find_loops",
    "issue_bound",
    "main_loop",
    "memory_bound",
    "occupancy",
    "parse_resource_usage",
    "parse_sass",
]

H100 = {"sms": 132, "clock_hz": 1.755e9, "warp_issue_per_clock": 4, "hbm_bytes_per_s": 3.0e12}
"""The machine the bounds are for (DESIGN.md): H100 SXM, 4 warp-instructions per clock per SM, 3.0 TB/s."""

CLASSES = ("global", "shared", "local", "mma", "int", "float", "convert", "control", "other")
_OPCODE_CLASS = {
    "global": "LDG STG LDGSTS LD ST RED REDG ATOM ATOMG UTMALDG UTMASTG UTMAPF UTMAREDG UBLKCP UBLKRED CCTL",
    "shared": "LDS STS LDSM STSM ATOMS",
    "local": "LDL STL",
    "mma": "HMMA HGMMA IMMA IGMMA QGMMA BMMA BGMMA DMMA OMMA UTCHMMA UTCQMMA UTCIMMA",
    "int": "IMAD IADD3 IADD IADD32I LOP3 LOP LOP32I PRMT SHF SHL SHR LEA ISETP ISCADD IMNMX VIMNMX IABS SGXT "
    "BMSK POPC FLO BREV SEL MOV PLOP3 P2R R2P VIADD VIADD3 IDP IDP4A IMUL ICMP VABSDIFF VABSDIFF4",
    "float": "FADD FMUL FFMA FADD32I FMUL32I FFMA32I FMNMX FMNMX3 FSEL FSET FSETP FCHK FRND MUFU HADD2 HMUL2 HFMA2 "
    "HMNMX2 HSETP2 HSET2 DADD DMUL DFMA DSETP DMNMX FSWZADD",
    "convert": "F2F F2I I2F I2FP F2FP I2I F2IP I2IP",
    "control": "BRA BRX JMP JMX CALL RET EXIT BSSY BSYNC BREAK BPT WARPSYNC BAR DEPBAR LDGDEPBAR MEMBAR FENCE "
    "NOP YIELD WARPGROUP SYNCS ERRBAR NANOSLEEP ELECT ACQBULK KILL BMOV ARRIVES",
}
_CLASS_OF = {op: cls for cls, ops in _OPCODE_CLASS.items() for op in ops.split()}
_GLOBAL_LOADS = {"LDG", "LDGSTS", "LD", "UTMALDG", "UBLKCP"}
# a load's width in bits from its modifiers; 32 when it names none
_WIDTH = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128, "256": 256}

_LINE = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(?:(@!?U?P(?:T|\d+))\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)\s*([^;]*);")
_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")
_USAGE = re.compile(r"Function\s+(\S+?):\s*\n\s*([A-Z].*)")
_DESC = re.compile(r"desc\[(UR\d+)\]")
_UR_DEST = re.compile(r"^(UR\d+)")


@dataclass(frozen=True)
class Instruction:
    """One SASS instruction: address, guard predicate (``"@!P3"`` or ``""``), opcode with modifiers, operands."""

    addr: int
    pred: str
    opcode: str
    operands: str

    @property
    def base(self) -> str:
        return self.opcode.split(".", 1)[0]

    @property
    def modifiers(self) -> list[str]:
        return self.opcode.split(".")[1:]

    def branch_target(self) -> int | None:
        """Target address of a direct ``BRA`` / ``JMP``; None for anything else."""
        if self.base not in ("BRA", "JMP"):
            return None
        found = re.findall(r"0x([0-9a-f]+)", self.operands)
        return int(found[-1], 16) if found else None


def parse_sass(text: str) -> dict[str, list[Instruction]]:
    """Instructions of each function in ``cuobjdump --dump-sass`` output, in address order."""
    functions: dict[str, list[Instruction]] = {}
    current: list[Instruction] | None = None
    for line in text.splitlines():
        m = _FUNCTION.match(line)
        if m:
            current = functions.setdefault(m.group(1), [])
            continue
        m = _LINE.match(line)
        if m and current is not None:
            current.append(Instruction(int(m.group(1), 16), m.group(2) or "", m.group(3), m.group(4).strip()))
    return functions


def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    """``{function: {"REG": .., "STACK": .., "SHARED": .., "LOCAL": .., ...}}`` from ``--dump-resource-usage``."""
    out = {}
    for name, fields in _USAGE.findall(text):
        out[name] = {k: int(v) for k, v in re.findall(r"([A-Z]+)(?:\[\d+\])?:(\d+)", fields)}
    return out


def classify(ins: Instruction) -> str:
    """Instruction class (one of ``CLASSES``); uniform-datapath ops (``UIADD3``) count as their vector twin."""
    base = ins.base
    if base in _CLASS_OF:
        return _CLASS_OF[base]
    if base.startswith("U") and base[1:] in _CLASS_OF and base != "ULDC":
        return _CLASS_OF[base[1:]]
    return "other"


def _is_global_load(ins: Instruction) -> bool:
    return ins.base in _GLOBAL_LOADS


def _load_bits(ins: Instruction) -> int:
    widths = [_WIDTH[m] for m in ins.modifiers if m in _WIDTH]
    return min(widths) if widths else 32


def _policy_descriptors(instrs: list[Instruction]) -> set[int]:
    """Addresses of global loads whose memory descriptor was built in the kernel (a cache policy) rather than
    read from the constant bank: the reaching write of its ``URn`` in address order, through ``UMOV`` copies."""
    last_write: dict[str, Instruction] = {}
    out = set()
    for ins in instrs:
        m = _DESC.search(ins.operands) if _is_global_load(ins) else None
        if m:
            src = last_write.get(m.group(1))
            while src is not None and src.base == "UMOV" and re.match(r"UR\d+\s*,\s*UR\d+$", src.operands):
                src = last_write.get(src.operands.split(",")[1].strip())
            if src is not None and src.base != "ULDC":
                out.add(ins.addr)
        d = _UR_DEST.match(ins.operands)
        if d and (ins.base.startswith("U") or ins.base in ("R2UR", "S2UR")):
            last_write[d.group(1)] = ins
            if ".64" in ins.opcode:
                last_write[f"UR{int(d.group(1)[2:]) + 1}"] = ins
    return out


@dataclass
class Loop:
    """A span of instructions: a loop body (target to backward branch) or the whole kernel."""

    start: int
    end: int
    instructions: list[Instruction]
    whole_kernel: bool = False

    def describe(self) -> str:
        return "whole kernel" if self.whole_kernel else f"loop 0x{self.start:x}-0x{self.end:x}"


def find_loops(instrs: list[Instruction]) -> list[Loop]:
    """Every backward branch as a loop (a branch to itself, the trap after the last ``EXIT``, is none)."""
    loops = []
    for i, ins in enumerate(instrs):
        target = ins.branch_target()
        if target is not None and target < ins.addr:
            body = [x for x in instrs[: i + 1] if x.addr >= target]
            loops.append(Loop(target, ins.addr, body))
    return loops


def main_loop(instrs: list[Instruction], w_loads: set[int]) -> Loop:
    """The main loop (see the module docstring), or the whole kernel up to its last ``EXIT``."""

    def innermost(loops: list[Loop]) -> list[Loop]:
        def contains(a: Loop, b: Loop) -> bool:
            return a is not b and a.start <= b.start and b.end <= a.end and (a.start, a.end) != (b.start, b.end)

        return [a for a in loops if not any(contains(a, b) for b in loops)]

    loops = find_loops(instrs)
    with_w = [lp for lp in loops if any(x.addr in w_loads for x in lp.instructions)]
    busy = [lp for lp in loops if any(_is_global_load(x) or classify(x) == "mma" for x in lp.instructions)]
    candidates = innermost(with_w or busy)
    if candidates:
        return max(candidates, key=lambda lp: len(lp.instructions))
    exits = [i for i, x in enumerate(instrs) if x.base == "EXIT"]
    body = instrs[: exits[-1] + 1] if exits else list(instrs)
    return Loop(body[0].addr if body else 0, body[-1].addr if body else 0, body, whole_kernel=True)


@dataclass
class KernelStats:
    """What the SASS and resource usage of one kernel say (static counts, no estimates yet)."""

    regs: int
    stack_bytes: int
    local_bytes: int
    static_shared_bytes: int
    spill_instructions: int
    mma: list[str]
    loop: Loop
    loop_classes: dict[str, int] = field(default_factory=dict)
    w_load_bits: int = 0
    w_load_marker: str = ""
    w_loads_per_iteration: int = 0


def analyze_kernel(text: str, kernel: str) -> KernelStats:
    """Spills, MMA kinds, the main loop and its W loads of function ``kernel`` in cuobjdump's output."""
    functions = parse_sass(text)
    usage = parse_resource_usage(text)
    if kernel not in functions or kernel not in usage:
        raise ValueError(f"cuobjdump output has no function {kernel!r} (found {sorted(functions)})")
    instrs, res = functions[kernel], usage[kernel]
    ef = {x.addr for x in instrs if x.base in ("LDG", "LDGSTS") and "EF" in x.modifiers}
    policy = set() if ef else _policy_descriptors(instrs)
    marked, marker = (ef, "EF") if ef else (policy, "policy descriptor" if policy else "")
    loop = main_loop(instrs, marked)
    classes = dict.fromkeys(CLASSES, 0)
    for x in loop.instructions:
        classes[classify(x)] += 1
    w = [x for x in loop.instructions if x.addr in marked]
    return KernelStats(
        regs=res.get("REG", -1),
        stack_bytes=res.get("STACK", -1),
        local_bytes=res.get("LOCAL", -1),
        static_shared_bytes=res.get("SHARED", -1),
        spill_instructions=sum(x.base in ("LDL", "STL") for x in instrs),
        mma=sorted({x.base for x in instrs if classify(x) == "mma"}),
        loop=loop,
        loop_classes=classes,
        w_load_bits=min((_load_bits(x) for x in w), default=0),
        w_load_marker=marker if w else "",
        w_loads_per_iteration=len(w),
    )


# ------------------------------------------------------------------------------------------------
# occupancy and bounds
# ------------------------------------------------------------------------------------------------

_SM = {
    # registers per SM, per-warp register allocation unit, warps, CTAs, shared memory per SM (bytes)
    80: {"regs": 65536, "reg_unit": 256, "warps": 64, "ctas": 32, "smem": 167_936},
    90: {"regs": 65536, "reg_unit": 256, "warps": 64, "ctas": 32, "smem": 233_472},
}
SMEM_UNIT = 128
"""Shared-memory allocation granularity per CTA (bytes), sm_80 and sm_90."""
RESERVED_SMEM_PER_CTA = 1024
"""Shared memory the driver reserves for each CTA on sm_80 and later (bytes)."""
SCHEDULERS = 4
"""Sub-partitions per SM; each holds a quarter of the register file and keeps its own warps."""


@dataclass
class Occupancy:
    ctas_per_sm: int
    warps_per_sm: int
    limit: str
    """What bounds it: "registers", "shared memory", "threads" or "CTAs"."""


def occupancy(arch: int, regs: int, num_warps: int, shared_bytes: int) -> Occupancy:
    """Resident CTAs and warps per SM (an estimate: the CUDA occupancy rules for sm_80 / sm_90).

    ``shared_bytes`` is the CTA's shared memory (dynamic + static); the driver adds 1 KB per CTA. Registers
    are allocated per warp in units of 256 within one of the 4 sub-partitions (a quarter of the file each).
    """
    sm = _SM[90 if arch >= 90 else 80]
    regs_per_warp = -(-max(regs, 1) * 32 // sm["reg_unit"]) * sm["reg_unit"]
    warps_by_regs = SCHEDULERS * ((sm["regs"] // SCHEDULERS) // regs_per_warp)
    smem = -(-(shared_bytes + RESERVED_SMEM_PER_CTA) // SMEM_UNIT) * SMEM_UNIT
    limits = {
        "registers": warps_by_regs // num_warps,
        "shared memory": sm["smem"] // smem,
        "threads": sm["warps"] // num_warps,
        "CTAs": sm["ctas"],
    }
    limit = min(limits, key=lambda k: limits[k])
    return Occupancy(limits[limit], limits[limit] * num_warps, limit)


def issue_bound(thread_instructions_per_weight: float) -> float:
    """Weights per second an H100 can decode when issue slots are the limit (an estimate)."""
    rate = H100["warp_issue_per_clock"] * 32 * H100["sms"] * H100["clock_hz"]
    return rate / thread_instructions_per_weight


def memory_bound(bytes_per_weight: float) -> float:
    """Weights per second an H100's HBM can deliver at ``bytes_per_weight`` (an estimate)."""
    return H100["hbm_bytes_per_s"] / bytes_per_weight
