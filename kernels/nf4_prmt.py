"""NF4 codes to 16-bit code values by byte permutes (``prmt.b32``), for the decode kernel's main loop.

Decode (``_decode_words``), per 32-bit word of packed W (8 codes, 4 bytes, the even element in the high
nibble, bitsandbytes' layout): the codebook value of each code comes from ``prmt.b32`` byte permutes, not
a select tree or a memory gather. A permute picks 4 bytes out of 8 by 3-bit selectors (bit 3 of a
selector means "replicate the sign", so one permute covers 8 codebook entries): the low and high bytes of
the 16 16-bit code values sit in 8 registers (immediates, hoisted out of the loop by ptxas), two permutes
look up the entries 0-7 and 8-15, a third picks per byte by the code's bit 3, and a last pair interleaves
low and high bytes into packed 16-bit pairs. That is 16 permutes per 8 weights and the selectors' setup:
two logic ops on the integer pipe (the selectors, the select's control) and three right shifts written as
``mul.hi.u32`` by 2^16 or 2^31, which run on the FMA pipe (IMAD.HI) where shifts would take the integer
pipe the permutes bind: 18 integer-pipe instructions per word, ≈ 2.25 per weight (21 with shifts), where the
select tree cost ≈ 19. The multipliers come from the table as opaque registers (as literals ptxas turns the
multiplies back into shifts). The packed pairs come back as int32 and are split into 16-bit halves, which
compiles to register renames.

Under Triton's interpreter (CPU tests) inline PTX cannot run: ``USE_ASM=False`` selects a twin that
builds the same int32 pairs from a 16-entry table of 16-bit code patterns with loads. The permute path
is checked by the compile gate (and on a GPU by the ``gpu`` tests).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fastpeft.kernels.formats import NF4_CODE

__all__ = ["DECODE_ASM", "DECODE_ASM_SHR", "decode_tables"]


def _halves(dtype: torch.dtype) -> list[int]:
    """The 16 NF4 code values as 16-bit patterns of ``dtype`` (round to nearest)."""
    bits = torch.tensor(NF4_CODE, dtype=torch.float32).to(dtype).view(torch.int16)
    return [int(b) & 0xFFFF for b in bits]


def _byte_words(halves: list[int], shift: int) -> list[int]:
    """Four int32 lookup words: byte ``j`` of word ``i`` is byte ``shift // 8`` of code ``4i + j``."""
    words = []
    for i in range(4):
        w = 0
        for j in range(4):
            w |= ((halves[4 * i + j] >> shift) & 0xFF) << (8 * j)
        words.append(w)
    return words


def _decode_asm(shifts_on_fma: bool = True) -> str:
    """PTX that turns one packed word ``$4`` into four int32 words ``$0..$3`` of 16-bit code-value pairs, with
    the permute tables in ``$5..$8`` (low bytes of codes 0-15, four per word) and ``$9..$12`` (high bytes),
    the select mask ``0x44444444`` in ``$13`` (as an immediate, ptxas rebuilds it every use), and 2^16, 2^31
    in ``$14``, ``$15`` (``x >> 16`` and ``x >> 1`` as ``mul.hi``: the FMA pipe instead of the integer one).
    ``shifts_on_fma`` False writes them as shifts (``$14``, ``$15`` unused): two registers fewer, for the builds
    past BLOCK_M = 16 that have none to spare."""
    shr = (lambda d, a, k: f"mul.hi.u32 {d}, {a}, {'$14' if k == 16 else '$15'};") if shifts_on_fma else (
        lambda d, a, k: f"shr.b32 {d}, {a}, {k};")  # fmt: skip
    lines = [
        "{",
        ".reg .b32 s, c, s1, c1, la, lb, ha, hb, l, h;",
        # selectors: the code's low 3 bits; the select's control: byte i from the 0-7 or the 8-15 lookup
        "and.b32 s, $4, 0x77777777;",
        shr("c", "$4", 1),
        "and.b32 c, c, $13;",
        "or.b32 c, c, 0x32103210;",
        shr("s1", "s", 16),
        shr("c1", "c", 16),
    ]
    # bytes of the word, low to high, hold codes (1, 0), (3, 2), (5, 4), (7, 6): selector nibble i of s is
    # code 1, 0, 3, 2 for i = 0..3, so the interleave puts (e0, e1) in $0 and (e2, e3) in $1
    for sel, ctl, out0, out1 in (("s", "c", "$0", "$1"), ("s1", "c1", "$2", "$3")):
        lines += [
            f"prmt.b32 la, $5, $6, {sel};",
            f"prmt.b32 lb, $7, $8, {sel};",
            f"prmt.b32 l, la, lb, {ctl};",
            f"prmt.b32 ha, $9, $10, {sel};",
            f"prmt.b32 hb, $11, $12, {sel};",
            f"prmt.b32 h, ha, hb, {ctl};",
            f"prmt.b32 {out0}, l, h, 0x4051;",
            f"prmt.b32 {out1}, l, h, 0x6273;",
        ]
    lines.append("}")
    return "\n".join(lines)


DECODE_ASM = _decode_asm()
DECODE_ASM_SHR = _decode_asm(shifts_on_fma=False)
_SELECT_MASK = 0x44444444
_DECODE_ASM = tl.constexpr(DECODE_ASM)
_DECODE_ASM_SHR = tl.constexpr(DECODE_ASM_SHR)


@functools.cache
def decode_tables(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """int32 ``[27]``: the permute tables (low bytes, then high bytes of the 16 code values, four per word),
    the select mask ``0x44444444``, the 16-bit pattern of each code value in ``dtype`` (the interpreter
    twin's table), then the shift multipliers 2^16 and 2^31 (as int32)."""
    halves = _halves(dtype)
    words = [w - (1 << 32) if w >= 1 << 31 else w for w in _byte_words(halves, 0) + _byte_words(halves, 8)]
    return torch.tensor([*words, _SELECT_MASK, *halves, 1 << 16, -(1 << 31)], dtype=torch.int32, device=device)


@triton.jit
def _vector_register(x):
    # x + (laneid >> 5), which is x: ptxas cannot prove the value warp-uniform, so it stays in an ordinary
    # register instead of a uniform one that it would copy out again before every permute that reads it
    return tl.inline_asm_elementwise(
        "{.reg .u32 l; mov.u32 l, %laneid; shr.u32 l, l, 5; add.u32 $0, $1, l;}", "=r,r", [x],
        dtype=tl.int32, is_pure=True, pack=1,
    )  # fmt: skip


@triton.jit
def _permute_tables(table_ptr, USE_ASM: tl.constexpr, SHIFTS_ON_FMA: tl.constexpr):
    # the eight permute table words (low bytes of codes 0-15, then high bytes), the select mask and, for the
    # shifts on the FMA pipe, their multipliers: loaded once per program
    if USE_ASM:
        t0 = _vector_register(tl.load(table_ptr + 0))
        t1 = _vector_register(tl.load(table_ptr + 1))
        t2 = _vector_register(tl.load(table_ptr + 2))
        t3 = _vector_register(tl.load(table_ptr + 3))
        t4 = _vector_register(tl.load(table_ptr + 4))
        t5 = _vector_register(tl.load(table_ptr + 5))
        t6 = _vector_register(tl.load(table_ptr + 6))
        t7 = _vector_register(tl.load(table_ptr + 7))
        sel = _vector_register(tl.load(table_ptr + 8))
        if SHIFTS_ON_FMA:
            sh16 = _vector_register(tl.load(table_ptr + 25))
            sh1 = _vector_register(tl.load(table_ptr + 26))
        else:
            sh16, sh1 = 0, 0
    else:  # the interpreter's twin reads the 16-bit table directly
        t0, t1, t2, t3, t4, t5, t6, t7, sel, sh16, sh1 = 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
    return t0, t1, t2, t3, t4, t5, t6, t7, sel, sh16, sh1


@triton.jit
def _decode_words(
    p, table_ptr, t0, t1, t2, t3, t4, t5, t6, t7, sel, sh16, sh1, USE_ASM: tl.constexpr, SHIFTS_ON_FMA: tl.constexpr
):
    # four int32 tensors of 16-bit pairs: (e0, e1), (e2, e3), (e4, e5), (e6, e7) of each packed word p
    if USE_ASM and not SHIFTS_ON_FMA:
        o0, o1, o2, o3 = tl.inline_asm_elementwise(
            _DECODE_ASM_SHR, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r", [p, t0, t1, t2, t3, t4, t5, t6, t7, sel],
            dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1,
        )  # fmt: skip
    elif USE_ASM:
        o0, o1, o2, o3 = tl.inline_asm_elementwise(
            _DECODE_ASM, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r,r,r", [p, t0, t1, t2, t3, t4, t5, t6, t7, sel, sh16, sh1],
            dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1,
        )  # fmt: skip
    else:
        # the interpreter's twin: element 2j sits in the high nibble of byte j
        halves = table_ptr + 9
        e0 = tl.load(halves + ((p >> 4) & 0xF))
        e1 = tl.load(halves + (p & 0xF))
        e2 = tl.load(halves + ((p >> 12) & 0xF))
        e3 = tl.load(halves + ((p >> 8) & 0xF))
        e4 = tl.load(halves + ((p >> 20) & 0xF))
        e5 = tl.load(halves + ((p >> 16) & 0xF))
        e6 = tl.load(halves + ((p >> 28) & 0xF))
        e7 = tl.load(halves + ((p >> 24) & 0xF))
        o0 = e0 | (e1 << 16)
        o1 = e2 | (e3 << 16)
        o2 = e4 | (e5 << 16)
        o3 = e6 | (e7 << 16)
    return o0, o1, o2, o3
