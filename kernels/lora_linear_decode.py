"""Decode-size NF4 + LoRA forward: ``Yᵀ = W·Xᵀ`` with W decoded by byte permutes, at the memory roofline.

For ``M <= 16`` rows (token-by-token generation, small batches) a linear reads ``N·K/2`` bytes of packed W
for ``2·M·N·K`` flops: the GPU is bound by how fast it *decodes* weights, not by its tensor cores. This
kernel computes the transposed product ``OUT[m, n] = Σ_k W[n, k]·X[m, k] + s·(U·Bᵀ)[m, n] + bias[n]``
as ``[BLOCK_N, 64]·[64, 16]`` tensor-core products (M padded to 16), so that the decoded W tile is the
large MMA operand and X the small one.

Decode (``_decode_words``), per 32-bit word of packed W (8 codes, 4 bytes, the even element in the high
nibble, bitsandbytes' layout): the codebook value of each code comes from ``prmt.b32`` byte permutes, not
a select tree or a memory gather. A permute picks 4 bytes out of 8 by 3-bit selectors (bit 3 of a
selector means "replicate the sign", so one permute covers 8 codebook entries): the low and high bytes of
the 16 16-bit code values sit in 8 registers (immediates, hoisted out of the loop by ptxas), two permutes
look up the entries 0-7 and 8-15, a third picks per byte by the code's bit 3, and a last pair interleaves
low and high bytes into packed 16-bit pairs. That is 12 permutes and 5 integer instructions per 8 weights
(≈ 2.1 per weight), where the select tree cost ≈ 19. The packed pairs come back as int32 and are split
into 16-bit halves, which compiles to register renames.

Scaling. The codebook values enter the MMA in the input dtype (16 bits) and each row's absmax is
applied once per 64-element block, after the block's partial product (one FMA per output element per
64 weights): ``acc += (code·Xᵀ)·absmax`` instead of ``(code·absmax)·Xᵀ``. The rounding differs from
the reference's, which rounds ``code·absmax`` to 16 bits before the product: here ``code`` is rounded
(relative error ≤ 2⁻⁹ in bfloat16, 2⁻¹¹ in float16) and ``absmax`` stays float32, so each weight carries
at most the same relative error as in the reference, and the tests hold it to the same oracle rule.
Blocks of 64 along K need ``K % 64 == 0`` (every absmax block then lies inside one row); the launcher
takes other shapes, float32 inputs and custom code maps through the general GEMM.

Under Triton's interpreter (CPU tests) inline PTX cannot run: ``USE_ASM=False`` selects a twin that
builds the same int32 pairs from a 16-entry table of 16-bit code patterns with loads. The permute path
is checked by the compile gate (and on a GPU by the ``gpu`` tests).

Split-K: ``N / BLOCK_N`` programs rarely fill a GPU, so K is split over a second grid axis until about two
programs per SM exist; slices add into a zeroed float32 ``[M, N]`` workspace with atomics, the first slice
adding the LoRA term and bias.
"""

from __future__ import annotations

import functools
import os
import weakref

import torch
import triton
import triton.language as tl

from fastpeft.kernels._gate import GateCase
from fastpeft.kernels.formats import NESTED_BLOCKSIZE, NF4_CODE, NF4Args, dynamic_map

__all__ = ["DECODE_M_MAX", "compile_gate_cases", "decode_supported", "nf4_decode_fwd"]

BLOCK_N = 128
"""Output features per program: two 64-row warpgroup MMAs (sm_90) or four warps of HMMA (sm_80)."""
BLOCK_K = 64
"""K per main-loop iteration: one absmax block of the smallest blocksize."""
DECODE_M_MAX = 64
"""Rows up to which the NF4 forward takes this kernel (X padded to ``BLOCK_M`` = 16, 32 or 64 rows)."""
NUM_WARPS = 4


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


def _decode_asm() -> str:
    """PTX that turns one packed word ``$4`` into four int32 words ``$0..$3`` of 16-bit code-value pairs, with
    the permute tables in ``$5..$8`` (low bytes of codes 0-15, four per word) and ``$9..$12`` (high bytes),
    and the select mask ``0x44444444`` in ``$13`` (as an immediate, ptxas rebuilds it every use)."""
    lines = [
        "{",
        ".reg .b32 s, c, s1, c1, la, lb, ha, hb, l, h;",
        # selectors: the code's low 3 bits; the select's control: byte i from the 0-7 or the 8-15 lookup
        "and.b32 s, $4, 0x77777777;",
        "shr.b32 c, $4, 1;",
        "and.b32 c, c, $13;",
        "or.b32 c, c, 0x32103210;",
        "shr.b32 s1, s, 16;",
        "shr.b32 c1, c, 16;",
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
_SELECT_MASK = 0x44444444
_DECODE_ASM = tl.constexpr(DECODE_ASM)


@functools.cache
def decode_tables(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """int32 ``[25]``: the permute tables (low bytes, then high bytes of the 16 code values, four per word),
    the select mask ``0x44444444``, then the 16-bit pattern of each code value in ``dtype`` (the interpreter
    twin's table)."""
    halves = _halves(dtype)
    words = [w - (1 << 32) if w >= 1 << 31 else w for w in _byte_words(halves, 0) + _byte_words(halves, 8)]
    return torch.tensor([*words, _SELECT_MASK, *halves], dtype=torch.int32, device=device)


@triton.jit
def _vector_register(x):
    # x + (laneid >> 5), which is x: ptxas cannot prove the value warp-uniform, so it stays in an ordinary
    # register instead of a uniform one that it would copy out again before every permute that reads it
    return tl.inline_asm_elementwise(
        "{.reg .u32 l; mov.u32 l, %laneid; shr.u32 l, l, 5; add.u32 $0, $1, l;}", "=r,r", [x],
        dtype=tl.int32, is_pure=True, pack=1,
    )  # fmt: skip


@triton.jit
def _permute_tables(table_ptr, USE_ASM: tl.constexpr):
    # the eight permute table words (low bytes of codes 0-15, then high bytes), loaded once per program
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
    else:  # the interpreter's twin reads the 16-bit table directly
        t0, t1, t2, t3, t4, t5, t6, t7, sel = 0, 0, 0, 0, 0, 0, 0, 0, 0
    return t0, t1, t2, t3, t4, t5, t6, t7, sel


@triton.jit
def _decode_words(p, table_ptr, t0, t1, t2, t3, t4, t5, t6, t7, sel, USE_ASM: tl.constexpr):
    # four int32 tensors of 16-bit pairs: (e0, e1), (e2, e3), (e4, e5), (e6, e7) of each packed word p
    if USE_ASM:
        o0, o1, o2, o3 = tl.inline_asm_elementwise(
            _DECODE_ASM, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r", [p, t0, t1, t2, t3, t4, t5, t6, t7, sel],
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


@triton.jit(do_not_specialize=["lora_scale", "has_bias", "split_k"])
def _nf4_decode_kernel(
    x_ptr, w_ptr, absmax_ptr, qmap_ptr, nested_ptr, offset_ptr, table_ptr,
    bias_ptr, u_ptr, b_ptr, out_ptr,
    M, N, K, R, blocksize_shift,
    stride_xm, stride_xk, stride_um, stride_ur, stride_bn, stride_br, stride_om, stride_on,
    lora_scale, has_bias, split_k,
    DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, USE_ASM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # OUT[m, n] += Σ_k W[n, k]·X[m, k] over this program's K slice (+ s·U·Bᵀ + bias on the first slice)
    dtype = x_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_w = tl.arange(0, BLOCK_K // 8)  # int32 words of a row's 64-element block
    offs_k = tl.arange(0, BLOCK_K)
    steps = K // BLOCK_K
    per_split = tl.cdiv(steps, split_k)
    k_first = pid_k * per_split
    k_last = tl.minimum(k_first + per_split, steps)
    # packed W as int32 words: row n's block k0 starts at word (n·K + k0) / 8 (K % 64 == 0: 32-byte aligned)
    row_words = offs_n.to(tl.int64) * (K // 8)
    offset = tl.load(offset_ptr)
    t0, t1, t2, t3, t4, t5, t6, t7, sel = _permute_tables(table_ptr, USE_ASM)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for kb in range(k_first, k_last):
        k0 = kb * BLOCK_K
        # -- load: 32 bytes per row, streamed once --
        words = tl.load(
            w_ptr + row_words[:, None] + (k0 // 8 + offs_w)[None, :], mask=mask_n[:, None], other=0,
            eviction_policy="evict_first",
        )  # fmt: skip
        # -- decode: [BLOCK_N, 8] words -> [BLOCK_N, 64] code values in x's dtype --
        o0, o1, o2, o3 = _decode_words(words, table_ptr, t0, t1, t2, t3, t4, t5, t6, t7, sel, USE_ASM)
        pairs = tl.join(tl.join(o0, o2), tl.join(o1, o3)).reshape(BLOCK_N, BLOCK_K // 2)
        lo = pairs.to(tl.int16).to(dtype, bitcast=True)
        hi = (pairs >> 16).to(tl.int16).to(dtype, bitcast=True)
        w = tl.join(lo, hi).reshape(BLOCK_N, BLOCK_K)
        # -- Xᵀ block [64, BLOCK_M] --
        xt = tl.load(
            x_ptr + offs_m[None, :] * stride_xm + (k0 + offs_k)[:, None] * stride_xk, mask=mask_m[None, :], other=0.0
        )
        part = tl.dot(w, xt)
        # -- absmax of each row's block (one value per row, decoded here under double quantization) --
        blk = (offs_n.to(tl.int64) * K + k0) >> blocksize_shift
        if DOUBLE_QUANT:
            a8 = tl.load(absmax_ptr + blk, mask=mask_n, other=0).to(tl.int32)
            nested = tl.load(nested_ptr + blk // NESTED_BLOCKSIZE, mask=mask_n, other=0.0)
            absmax = tl.load(qmap_ptr + a8) * nested + offset
        else:
            absmax = tl.load(absmax_ptr + blk, mask=mask_n, other=0.0)
        acc += part * absmax[:, None]
    # -- epilogue: s·B·Uᵀ and bias, once per output tile (the first K slice) --
    if pid_k == 0:
        lora = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < R
            bt = tl.load(
                b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                mask=mask_n[:, None] & mask_r[None, :], other=0.0,
            )  # fmt: skip
            ut = tl.load(
                u_ptr + offs_m[None, :] * stride_um + offs_r[:, None] * stride_ur,
                mask=mask_m[None, :] & mask_r[:, None], other=0.0,
            )  # fmt: skip
            lora = tl.dot(bt, ut, lora)
        acc += lora_scale * lora
        if has_bias:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    out = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None] * stride_on
    tl.atomic_add(out, acc, mask=mask_n[:, None] & mask_m[None, :], sem="relaxed")


# ----------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------


def decode_supported(x: torch.Tensor, nf4: NF4Args) -> bool:
    """Whether ``nf4_decode_fwd`` takes this forward: 16-bit x with at most ``DECODE_M_MAX`` rows, ``K % 64 == 0``,
    the NF4 codebook (a custom code map goes through the general GEMM) and packed bytes aligned for 64-bit loads."""
    n, k = nf4.shape
    packed = nf4.packed
    return (
        x.dtype in (torch.float16, torch.bfloat16)
        and x.shape[0] <= DECODE_M_MAX
        and k % BLOCK_K == 0
        and nf4.blocksize >= BLOCK_K
        and packed.is_contiguous()
        and packed.data_ptr() % 16 == 0
        and (nf4.quant_map is None or _is_nf4_codebook(nf4.quant_map))
    )


_CODEBOOK_CHECKED: dict[int, tuple[int, bool]] = {}
"""``id(code map) -> (its version counter, holds the NF4 values)``; an entry leaves with its tensor."""


def _is_nf4_codebook(quant_map: torch.Tensor) -> bool:
    """Whether a code map holds the NF4 values, compared once per tensor (and again after an in-place change):
    comparing a CUDA tensor waits for the device, which must not happen on every forward."""
    key = id(quant_map)
    seen = _CODEBOOK_CHECKED.get(key)
    if seen is not None and seen[0] == quant_map._version:
        return seen[1]
    same = quant_map.numel() == 16 and torch.equal(quant_map.detach().float().cpu(), torch.tensor(NF4_CODE))
    if seen is None:
        weakref.finalize(quant_map, _CODEBOOK_CHECKED.pop, key, None)
    _CODEBOOK_CHECKED[key] = (quant_map._version, same)
    return same


def _block_m(m: int) -> int:
    return max(16, triton.next_power_of_2(m))


def nf4_decode_fwd(
    x: torch.Tensor,
    nf4: NF4Args,
    bias: torch.Tensor | None,
    u: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scaling: float,
    target_programs: int,
) -> torch.Tensor:
    """``Y = X·dequant(W)ᵀ + bias + s·U·Bᵀ`` for a ``decode_supported`` call (arguments validated by the caller).

    Args:
        x: ``[M, K]`` float16 / bfloat16, M <= ``DECODE_M_MAX``. nf4: an NF4 ``[N, K]`` weight.
        bias: ``[N]`` or None. u: ``[M, R]`` and lora_b: ``[N, R]`` in x's dtype, or both None (no LoRA term).
        scaling: ``s``. target_programs: programs that fill the device (split-K stops there).

    Returns:
        ``y [M, N]`` in x's dtype.
    """
    m, k = x.shape
    n = nf4.shape[0]
    device = x.device
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    tables = decode_tables(x.dtype, device)
    # packed bytes as int32 words: 8 codes each; K % 64 == 0 puts every row's 64-block on 8 whole words
    words = nf4.packed.reshape(-1).view(torch.int32)
    double_quant = nf4.absmax.dtype == torch.uint8
    if double_quant:
        qmap = nf4.nested_quant_map if nf4.nested_quant_map is not None else dynamic_map(device)
        qmap = qmap.to(device=device, dtype=torch.float32).contiguous()
        nested, offset = nf4.nested_absmax, nf4.offset.reshape(1).to(torch.float32)
    else:
        qmap = nested = offset = nf4.absmax  # unread placeholders of the signature's type
    if u is None:
        r, u, lora_b = 0, x, x  # R = 0: the epilogue loop runs no step; placeholders keep one signature
    else:
        r = u.shape[1]
    tiles = triton.cdiv(n, BLOCK_N)
    steps = k // BLOCK_K
    split = max(1, min(steps, triton.cdiv(target_programs, tiles)))
    out = torch.zeros((m, n), dtype=torch.float32, device=device)
    _nf4_decode_kernel[(tiles, split)](
        x, words, nf4.absmax, qmap, nested, offset, tables, x if bias is None else bias, u, lora_b, out,
        m, n, k, r, nf4.blocksize.bit_length() - 1,
        x.stride(0), x.stride(1), u.stride(0), u.stride(1), lora_b.stride(0), lora_b.stride(1),
        out.stride(0), out.stride(1),
        float(scaling), int(bias is not None), split,
        DOUBLE_QUANT=double_quant, NESTED_BLOCKSIZE=nf4.nested_blocksize, USE_ASM=not interpret,
        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_M=_block_m(m), BLOCK_R=16, num_warps=NUM_WARPS, num_stages=1,
    )  # fmt: skip
    # the [M, N] float32 workspace cast is a negligible pass next to the weight read
    return out.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# compile gate
# ----------------------------------------------------------------------------------------------


def _gate_case(dtype: torch.dtype, dq: bool, block_m: int, m: int, n: int = 4096, k: int = 4096) -> GateCase:
    ty = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    signature = {
        "x_ptr": f"*{ty}", "w_ptr": "*i32", "absmax_ptr": "*u8" if dq else "*fp32", "qmap_ptr": "*fp32",
        "nested_ptr": "*fp32", "offset_ptr": "*fp32", "table_ptr": "*i32", "bias_ptr": f"*{ty}",
        "u_ptr": f"*{ty}", "b_ptr": f"*{ty}", "out_ptr": "*fp32",
        **dict.fromkeys(("M", "N", "K", "R", "blocksize_shift"), "i32"),
        **dict.fromkeys(("stride_xm", "stride_xk", "stride_um", "stride_ur", "stride_bn", "stride_br",
                         "stride_om", "stride_on"), "i32"),
        "lora_scale": "fp32", "has_bias": "i32", "split_k": "i32",
    }  # fmt: skip
    shape = "" if (n, k) == (4096, 4096) else f",{n}x{k}"
    return GateCase(
        name=f"nf4_decode[{ty},{'nf4dq' if dq else 'nf4'},BLOCK_M={block_m},M={m}{shape}]",
        module=__name__,
        kernel="_nf4_decode_kernel",
        signature=signature,
        constexprs={
            "DOUBLE_QUANT": dq,
            "NESTED_BLOCKSIZE": NESTED_BLOCKSIZE,
            "USE_ASM": True,
            "BLOCK_N": BLOCK_N,
            "BLOCK_K": BLOCK_K,
            "BLOCK_M": block_m,
            "BLOCK_R": 16,
        },  # fmt: skip
        num_warps=NUM_WARPS,
        num_stages=1,
        tensor_cores=True,
        args={
            "M": m,
            "N": n,
            "K": k,
            "R": 16,
            "blocksize_shift": 6,
            "stride_xm": k,
            "stride_xk": 1,
            "stride_um": 16,
            "stride_ur": 1,
            "stride_bn": 16,
            "stride_br": 1,
            "stride_om": n,
            "stride_on": 1,
            "lora_scale": 2.0,
            "has_bias": 1,
            "split_k": 8,
        },  # fmt: skip
        path="decode",
        weights_per_iteration=BLOCK_N * BLOCK_K,
        bytes_per_weight=0.5 + (1.0 if dq else 4.0) / 64,
    )


def compile_gate_cases() -> list[GateCase]:
    """The decode kernel per 16-bit dtype x plain / double-quantized absmax x each ``BLOCK_M`` the launcher
    picks, at the Llama-3-8B 4096 x 4096 projection (M = 1 compiles its own binary: Triton makes an int equal
    to 1 a constant), plus one unaligned shape."""
    cases = []
    for dtype in (torch.float16, torch.bfloat16):
        for dq in (False, True):
            for block_m, m in ((16, 1), (16, 16), (32, 32), (64, 64)):
                cases.append(_gate_case(dtype, dq, block_m, m))
    cases.append(_gate_case(torch.bfloat16, True, 16, 5, n=4097, k=4160))
    return cases
