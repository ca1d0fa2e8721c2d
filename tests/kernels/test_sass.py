"""The compile gate's SASS reader and cost model on canned cuobjdump output (nothing is compiled)."""

from __future__ import annotations

import dataclasses

import pytest

from fastpeft.kernels import _gate, _sass

USAGE = """
Resource usage:
 Common:
  GLOBAL:0
 Function {name}:
  REG:{regs} STACK:{stack} SHARED:1024 LOCAL:0 CONSTANT[0]:736 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def sass(body: list[str], name: str = "k", regs: int = 96, stack: int = 0) -> str:
    """cuobjdump-style text for ``body``: one instruction per entry, addresses 0x10 apart, each followed by
    the encoding line cuobjdump prints (which the parser must skip)."""
    lines = [USAGE.format(name=name, regs=regs, stack=stack), "\tcode for sm_90a", f"\t\tFunction : {name}"]
    for i, text in enumerate(body):
        lines.append(f"        /*{16 * i:04x}*/                   {text} ;   /* 0x000fe200078e00ff */")
        lines.append("                                                  /* 0x000fc40008011609 */")
    return "\n".join(lines) + "\n\t\t..........\n"


def at(i: int) -> str:
    return f"0x{16 * i:x}"


REAL = """
\t\tFunction : _nf4_dequantize_kernel
\t.headerflags\t@"EF_CUDA_ACCELERATORS EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                                 /* 0x00000a00ff017b82 */
                                                                                          /* 0x000fe20000000800 */
        /*01c0*/              @!P3 LDG.E.U8 R27, desc[UR6][R6.64] ;                       /* 0x00000006061bb981 */
                                                                                          /* 0x0000a2000c1e1100 */
        /*01d0*/                   SHF.R.U64 R8, R8, UR10, R9 ;                           /* 0x0000000a08087c19 */
        /*01e0*/              @!UP0 BRA.U 0x0 ;                                           /* 0x0000000a08087c19 */
        /*145a0*/                   BRA 0x145a0;                                          /* 0x000fc0000383ffff */
        /*145b0*/                   NOP;                                                  /* 0x0000000000007918 */
"""


def test_parser_reads_cuobjdump_lines():
    ins = _sass.parse_sass(REAL)["_nf4_dequantize_kernel"]
    assert [x.addr for x in ins] == [0x0, 0x1C0, 0x1D0, 0x1E0, 0x145A0, 0x145B0]
    ldg = ins[1]
    assert (ldg.pred, ldg.opcode, ldg.base, ldg.modifiers) == ("@!P3", "LDG.E.U8", "LDG", ["E", "U8"])
    assert ldg.operands == "R27, desc[UR6][R6.64]"
    assert ins[3].pred == "@!UP0" and ins[3].branch_target() == 0
    assert ins[4].branch_target() == 0x145A0 and ins[5].opcode == "NOP"
    assert ins[2].branch_target() is None


def test_resource_usage():
    usage = _sass.parse_resource_usage(USAGE.format(name="_lora_gemm_kernel", regs=255, stack=168))
    assert usage == {
        "_lora_gemm_kernel": {
            "REG": 255, "STACK": 168, "SHARED": 1024, "LOCAL": 0, "CONSTANT": 736, "TEXTURE": 0, "SURFACE": 0,
            "SAMPLER": 0,
        }
    }  # fmt: skip


@pytest.mark.parametrize(
    "text, cls",
    [
        ("LDG.E.EF.64 R2, desc[UR4][R2.64]", "global"),
        ("LDGSTS.E.BYPASS.128 [R97], desc[UR32][R110.64], P4", "global"),
        ("UTMALDG.2D [UR8], [UR4]", "global"),
        ("STS.U16 [R3], R4", "shared"),
        ("LDSM.16.M88.4 R4, [R3]", "shared"),
        ("STL [R1+0x8], R4", "local"),
        ("HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8].tnspB, R24", "mma"),
        ("HMMA.16816.F32.BF16 R4, R8, R12, R4", "mma"),
        ("PRMT R27, RZ, 0x7610, R27", "int"),
        ("LOP3.LUT R3, R2, 0x7f, RZ, 0xc0, !PT", "int"),
        ("SHF.R.U64 R37, R37, UR10, R34", "int"),
        ("IMAD.WIDE.U32 R18, R4, 0x400, RZ", "int"),
        ("UIADD3 UR4, UR4, 0x1, URZ", "int"),
        ("FSEL R4, R5, R6, P0", "float"),
        ("HFMA2.MMA R4, -RZ, RZ, 0, 0", "float"),
        ("F2FP.BF16.F32.PACK_AB R4, R5, R4", "convert"),
        ("I2FP.F32.U32 R4, R4", "convert"),
        ("BAR.SYNC.DEFER_BLOCKING 0x0", "control"),
        ("WARPGROUP.DEPBAR.LE gsb0, 0x0", "control"),
        ("S2R R4, SR_CTAID.X", "other"),
        ("ULDC.64 UR4, c[0x0][0x208]", "other"),
    ],
)
def test_classes(text, cls):
    (ins,) = _sass.parse_sass(sass([text]))["k"]
    assert _sass.classify(ins) == cls


def test_main_loop_is_the_innermost_loop_of_the_w_loads():
    body = [
        "S2R R0, SR_TID.X",  # 0
        "LDG.E R4, desc[UR4][R2.64]",  # 1  outer loop starts
        "LDG.E.EF.64 R6, desc[UR4][R8.64]",  # 2  inner loop: the W loads
        "PRMT R10, R6, 0x7610, R10",  # 3
        "LDG.E.EF.128 R12, desc[UR4][R8.64+0x100]",  # 4
        "FFMA R16, R10, R4, R16",  # 5
        f"@P0 BRA {at(2)}",  # 6  inner back edge
        "HMMA.16816.F32.BF16 R20, R4, R12, R20",  # 7
        f"@P1 BRA {at(1)}",  # 8  outer back edge
        "LDG.E R4, desc[UR4][R2.64]",  # 9  epilogue loop: a load and an MMA, no W
        "HMMA.16816.F32.BF16 R20, R4, R12, R20",  # 10
        "IADD3 R2, R2, 0x40, RZ",  # 11
        "IADD3 R3, R3, 0x40, RZ",  # 12
        "ISETP.GE.AND P2, PT, R2, R3, PT",  # 13
        f"@!P2 BRA {at(9)}",  # 14
        "EXIT",  # 15
        f"BRA {at(16)}",  # 16 the trap after EXIT
    ]
    stats = _sass.analyze_kernel(sass(body), "k")
    assert (stats.loop.start, stats.loop.end, len(stats.loop.instructions)) == (0x20, 0x60, 5)
    assert stats.loop_classes["global"] == 2 and stats.loop_classes["int"] == 1 and stats.loop_classes["float"] == 1
    assert sum(stats.loop_classes.values()) == 5
    assert (stats.w_load_bits, stats.w_load_marker, stats.w_loads_per_iteration) == (64, "EF", 2)
    assert stats.mma == ["HMMA"]
    # without a packed-W mark the innermost loops with a load or MMA compete, and the larger one is taken
    unmarked = [x.replace(".EF", "") for x in body]
    stats = _sass.analyze_kernel(sass(unmarked), "k")
    assert (stats.loop.start, len(stats.loop.instructions), stats.w_load_bits) == (0x90, 6, 0)


def test_loop_free_kernel_is_counted_whole_up_to_its_last_exit():
    body = [
        "S2R R0, SR_TID.X",
        "@P0 EXIT",
        "LDG.E.EF.U8 R4, desc[UR4][R2.64]",
        "LDG.E.EF R5, desc[UR4][R2.64+0x4]",
        "STG.E.U16 desc[UR4][R6.64], R4",
        "EXIT",
        f"BRA {at(6)}",
        "NOP",
        "NOP",
    ]
    stats = _sass.analyze_kernel(sass(body), "k")
    assert stats.loop.whole_kernel and len(stats.loop.instructions) == 6
    assert stats.loop.describe() == "whole kernel"
    assert (stats.w_load_bits, stats.w_loads_per_iteration) == (8, 2)


def test_spills_are_stack_bytes_and_ldl_stl():
    body = ["STL [R1], R4", "LDL R4, [R1]", "LDL.64 R6, [R1+0x8]", "LDS R8, [R2]", "EXIT"]
    stats = _sass.analyze_kernel(sass(body, regs=255, stack=168), "k")
    assert (stats.regs, stats.stack_bytes, stats.local_bytes, stats.spill_instructions) == (255, 168, 0, 3)
    clean = _sass.analyze_kernel(sass(["LDS R8, [R2]", "EXIT"]), "k")
    assert (clean.stack_bytes, clean.spill_instructions) == (0, 0)
    with pytest.raises(ValueError, match="no function"):
        _sass.analyze_kernel(sass(["EXIT"]), "other")


def test_cp_async_w_loads_are_found_by_their_cache_policy_descriptor():
    # cp.async loses .EF; sm_90a keeps the evict_first policy as a descriptor built in the kernel
    body = [
        "ULDC.64 UR32, c[0x0][0x208]",  # the default memory descriptor
        "UMOV UR7, 0x120",
        "USHF.L.U32 UR7, UR7, 0x14, URZ",  # a cache-policy descriptor
        "UMOV UR40, UR32",  # a copy of the default one is no policy
        "LDGSTS.E.BYPASS.128 [R97], desc[UR32][R110.64], P4",  # 4: X, default descriptor
        "LDGSTS.E.64 [R19+0x6000], desc[UR7][R6.64], !P2",  # 5: W
        "LDGSTS.E.BYPASS.128 [R19+0x6800], desc[UR40][R8.64], P4",  # 6: default, copied
        "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8].tnspB, R24",
        f"@P0 BRA {at(4)}",
        "EXIT",
    ]
    stats = _sass.analyze_kernel(sass(body), "k")
    assert (stats.w_load_marker, stats.w_load_bits, stats.w_loads_per_iteration) == ("policy descriptor", 64, 1)
    assert len(stats.loop.instructions) == 5


@pytest.mark.parametrize(
    "arch, regs, warps, smem, ctas, limit",
    [
        (90, 255, 8, 40_000, 1, "registers"),  # 8192 registers a warp: 8 warps fill the file
        (90, 242, 4, 25_088, 2, "registers"),  # rounded to 7936 a warp: 2 warps per sub-partition
        (90, 24, 4, 4096, 16, "threads"),  # 64 warps
        (90, 48, 4, 0, 10, "registers"),  # 1536 a warp: 10 per sub-partition
        (80, 64, 4, 98_304, 1, "shared memory"),  # 96 KB + 1 KB reserved of 164 KB
        (90, 64, 4, 98_304, 2, "shared memory"),  # of 228 KB
        (90, 16, 1, 0, 32, "CTAs"),
    ],
)
def test_occupancy(arch, regs, warps, smem, ctas, limit):
    occ = _sass.occupancy(arch, regs, warps, smem)
    assert (occ.ctas_per_sm, occ.warps_per_sm, occ.limit) == (ctas, ctas * warps, limit)


def test_bounds_reproduce_the_issue_figures():
    # 39 thread-instructions per weight: issue-bound near 0.76 T weights/s against 5.8 T from HBM (13 %)
    assert _sass.issue_bound(39) == pytest.approx(4 * 32 * 132 * 1.755e9 / 39)
    assert _sass.issue_bound(39) == pytest.approx(7.60e11, rel=1e-3)
    assert _sass.memory_bound(0.516) == pytest.approx(5.814e12, rel=1e-3)
    # memory-bound below ~5.1 instructions per weight at 0.516 B per weight
    assert _sass.issue_bound(5.0) > _sass.memory_bound(0.516) > _sass.issue_bound(5.2)


def _analyzed(case: _gate.GateCase, body: list[str]) -> _gate.GateReport:
    report = _gate.GateReport(case.name, 90, path=case.path)
    _gate._analyze(report, case, {"kernel": "k", "shared": 2048}, sass(body, regs=64))
    return report


def test_gate_record_of_a_decode_loop():
    loop = ["LDG.E.EF.64 R6, desc[UR4][R8.64]"] + ["PRMT R10, R6, 0x7610, R10"] * 30 + [f"@P0 BRA {at(1)}"]
    body = ["S2R R0, SR_TID.X", *loop, "EXIT"]
    case = _gate.GateCase(
        "d", "m", "k", {}, {}, num_warps=4, path="decode", weights_per_iteration=1024, bytes_per_weight=0.516
    )
    r = _analyzed(case, body)
    assert (r.loop_instructions, r.threads_per_program, r.w_load_bits) == (32, 128, 64)
    assert r.thread_instructions_per_weight == pytest.approx(32 * 128 / 1024)  # 4.0
    assert r.predicted_roofline_fraction == 1.0 and not r.model_error
    assert r.issue_bound_weights_per_s == pytest.approx(_sass.issue_bound(4.0))
    assert (r.ctas_per_sm, r.warps_per_sm, r.occupancy_limit) == (8, 32, "registers")
    assert "thread_instructions_per_weight" in r.estimated and "predicted_roofline_fraction" in r.estimated
    slow = _analyzed(dataclasses.replace(case, weights_per_iteration=128), body)
    assert slow.thread_instructions_per_weight == pytest.approx(32.0)
    assert slow.predicted_roofline_fraction == pytest.approx(_sass.issue_bound(32.0) / _sass.memory_bound(0.516))
    # a case that declares a path but not its weights cannot be modelled, and that fails the gate
    bare = _analyzed(_gate.GateCase("d", "m", "k", {}, {}, path="decode"), body)
    assert bare.model_error and bare.predicted_roofline_fraction is None
    assert any("cost model" in p for p in bare.problems(case))
