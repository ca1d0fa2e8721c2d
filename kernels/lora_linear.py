"""Fused LoRA / QLoRA linear: a frozen base (dense, or NF4 dequantized in registers) plus a LoRA update.

Math, for ``X [M, K]``, a frozen ``W [N, K]``, ``bias [N]``, ``A [R, K]``, ``B [N, R]``, scaling ``s``
and an optional dropout keep-mask ``D [M, K]`` with drop probability ``p``::

    U  = drop(X)·Aᵀ                            [M, R]   drop(X) = D ⊙ X / (1 - p)
    Y  = X·Wᵀ + bias + s·U·Bᵀ                  [M, N]
    G  = dY·B                                  [M, R]   (backward)
    dX = dY·W + s·D/(1-p) ⊙ (G·A)              [M, K]
    dA = s·Gᵀ·drop(X)                          [R, K]
    dB = s·dYᵀ·U                               [N, R]
    dbias = Σ_m dY                             [N]

The base-only NF4 linear (``nf4_linear_fwd``: ``Y = X·dequant(W)ᵀ + bias``, ``nf4_linear_bwd_dx``:
``dX = dY·dequant(W)``) is the same GEMM with R = 0.

This module holds the launchers (validate, allocate, grid, launch). The kernels, their autotune configs
and the NF4-in-registers design are in ``lora_linear_kernels.py``; the weight-gradient reduction for
``dA``, ``dB`` and ``dbias`` is in ``lora_linear_wgrad.py``.

Dispatch of an NF4 base, set by the compile gate's cost models (``kernels/_perf.py``, the latency-aware model
whose figures are quoted here unless said otherwise; H100 SXM, estimates, not measurements;
``python -m fastpeft.kernels._perf --report``, tables in benchmarks/model_predictions.md):

- forward, 16-bit x, ``M <= 64`` (``lora_linear_decode.DECODE_M_MAX``), ``K % 64 == 0``: the decode kernel
  (``lora_linear_decode``; split-K reduced inside, output written in x's dtype), one launch without dropout for
  M <= 16 and R <= 64 (U summed inside it), else the ``U`` kernel first. At M = 1, r = 16 the model gives 6.8 us
  for 4096 x 4096 (40 % of HBM for the call, 1.9x its bf16 cuBLAS GEMV), 15.9 us for 14336 x 4096 (60 %, 2.5x);
  the kernels alone reach 58-80 % of HBM at M <= 16 (28-30 % at 1024 x 4096), 52-55 % at M = 64 (latency- or
  integer-pipe-bound; the calibration's error on bandwidth-bound points is -33 % to +3 %:
  benchmarks/calibration.md);
- ``M <= SMALL_M_MAX`` (16), 16-bit, otherwise (dX, or a forward the decode kernel does not take): the
  general GEMM's split-K path decoding NF4 in its main loop (bandwidth-bound sizes; ≈ 39 instructions
  per weight by the first model's count, so far from the roofline: acceptable only because such calls are
  rare — the backward of a 16-token batch);
- everything else (M past those sizes, float32 inputs): W is dequantized once per call into a scratch
  buffer (``_dequantized``; one buffer per device and dtype, the largest layer's 16-bit weight, reused
  by every layer) and the dense tiled GEMM runs with the LoRA epilogue. Fusing the decode into a tiled
  GEMM pays only while few row tiles share a weight tile: each 128-row tile decodes its W tile again, at
  ≈ 38 instructions per weight in the fused tiled kernel this replaced (≈ 1.3 ns per 1,000 weights per
  row tile on an H100), against one dequantize pass of ≈ 2.5 bytes per weight (≈ 0.8 ns per 1,000
  weights, once per call); at M = 8192 the fused path decoded every weight 64 times (estimated 3.4-5x
  slower than dequantize-once + dense GEMM), and even a decode at the decode kernel's ≈ 4.5 instructions
  per weight would cost more than the dequantize pass from ≈ 6 row tiles (M ≈ 360) on.

Past the decode sizes, the base GEMM of the forward and of dX runs in cuBLAS where the cost model says the tiled
Triton GEMM loses to it (``cublas_path``; dense bases and the dequantize-once scratch alike): ``Y = addmm(bias, X,
Wᵀ)`` (bias in cuBLAS's epilogue), then ``Y.addmm_(U, Bᵀ, alpha=s)`` for the LoRA term; ``dX = dY·W``, then
``dX.addmm_(G, A, alpha=s/(1-p))`` (with a dropout mask: ``dX.addcmul_(G·A, mask, value=s/(1-p))``). ``U`` and
``G`` still come from the skinny Triton kernel (dropout fused there). Numerics: cuBLAS accumulates 16-bit GEMMs in
float32 (torch's ``allow_{fp16,bf16}_reduced_precision_reduction`` flags, on by default, let it reduce split-K
partials in 16 bits: the oracle tests run on CPU, where torch accumulates in float32); the LoRA term is added in
float32 in addmm's epilogue onto the base result already rounded to x's dtype, so Y is rounded twice (the tiled
kernel rounds once), as eager torch's chain does; G is split into 16-bit high and low halves (a rank-2R update,
as the tiled kernel's ``LORA_SPLIT``) so the float32 G keeps its precision; with a dropout mask ``G·A`` is rounded
to x's dtype once before the masked add. Transients of the cuBLAS path: U is the op's own output; ``[M, 2R]`` and
``[2R, K]`` for the split G and stacked A; with dropout in dX, ``G·A`` ``[M, K]`` in x's dtype. No persistent
buffer beyond the scratch.

Dense bases: ``M <= SMALL_M_MAX`` takes the split-K path (``BLOCK_M = 16``, wide ``BLOCK_Q``, float32
atomics into a zeroed workspace, then a cast), larger M the tensor-core tiled path (grouped tile order
for L2 reuse, HMMA / HGMMA).

Skinny products ``U`` and ``G`` run ``_lora_skinny_kernel`` into float32; ``dA`` and ``dB`` come from
``Xᵀ·G`` over slices of M, one float32 partial per slice, with the column sums of dY for dbias fused
into dB's pass; a ``sum`` over the few slices finishes the reduction. No atomics on those: results stay
deterministic run to run.
"""

from __future__ import annotations

import torch
import triton

from fastpeft.kernels import lora_linear_decode as decode
from fastpeft.kernels import lora_linear_kernels as kernels
from fastpeft.kernels import lora_linear_wgrad as wgrad
from fastpeft.kernels._gate import GateCase
from fastpeft.kernels.formats import NESTED_BLOCKSIZE, NF4Args, check_dequantize_args, dot_precision
from fastpeft.kernels.lora_linear_kernels import (
    _INTERPRET_SMALL,
    _INTERPRET_TILED,
    _W_DENSE,
    _W_NF4,
    _W_NF4_DQ,
    GEMM_BLOCK_R,
    SMALL_M_MAX,
    _block_r,
    _interpreting,
    _lora_gemm_kernel,
    _lora_skinny_kernel,
    _skinny_config,
    _tables,
    _target_programs,
    gemm_kernel,
)
from fastpeft.kernels.lora_linear_wgrad import _wgrad
from fastpeft.kernels.nf4 import nf4_dequantize

__all__ = [
    "SMALL_M_MAX",
    "cublas_path",
    "scratch_bytes",
    "compile_gate_cases",
    "lora_linear_bwd",
    "lora_linear_fwd",
    "nf4_linear_bwd_dx",
    "nf4_linear_fwd",
]

# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_tensor(name: str, t: object, shape: tuple[int, ...], like: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != like.dtype:
        raise TypeError(f"{name} must have x's dtype {like.dtype}, got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device}, x on {like.device}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def _check_matrix(name: str, t: object, dims: str) -> tuple[int, int]:
    """A non-empty 2-D float32 / float16 / bfloat16 tensor (any strides); returns its shape."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty {dims} matrix, got shape {tuple(t.shape)}")
    return t.shape[0], t.shape[1]


def _check_nf4(nf4: NF4Args, k: int, like_name: str, like: torch.Tensor) -> int:
    """An NF4 ``[N, K]`` weight on ``like``'s device, dequantizable to its dtype; returns N."""
    if not isinstance(nf4, NF4Args):
        raise TypeError(f"nf4 must be an NF4Args, got {type(nf4).__name__}")
    n, k_w = nf4.shape
    if k_w != k:
        raise ValueError(f"nf4.shape is {tuple(nf4.shape)}, {like_name} has K={k} features")
    if n * k >= 2**31:
        raise ValueError(f"nf4 weight has {n * k} elements; the fused kernels index up to 2**31 - 1")
    check_dequantize_args(
        nf4.packed, nf4.absmax, n * k, like.dtype, nf4.blocksize, nf4.nested_absmax, nf4.offset,
        nf4.nested_blocksize, nf4.quant_map, nf4.nested_quant_map,
    )  # fmt: skip
    if nf4.packed.device != like.device:
        raise ValueError(f"nf4.packed is on {nf4.packed.device}, {like_name} on {like.device}")
    return n


def _check_args(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    nf4: NF4Args | None,
    dropout_mask: torch.Tensor | None,
    dropout_p: float,
) -> tuple[int, int, int, int]:
    """Validate the shared arguments; returns ``(M, K, N, R)``."""
    m, k = _check_matrix("x", x, "[M, K]")
    if not isinstance(lora_a, torch.Tensor) or lora_a.dim() != 2 or lora_a.shape[0] == 0:
        raise ValueError(f"lora_a must be an [R, K={k}] matrix with R >= 1, got {getattr(lora_a, 'shape', lora_a)}")
    r = lora_a.shape[0]
    _check_tensor("lora_a", lora_a, (r, k), x)
    if (weight is None) == (nf4 is None):
        raise ValueError("pass exactly one of weight (a dense base) and nf4 (a quantized base)")
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"weight must be an [N, K={k}] matrix, got {getattr(weight, 'shape', weight)}")
        n = weight.shape[0]
        _check_tensor("weight", weight, (n, k), x)
    else:
        n = _check_nf4(nf4, k, "x", x)
    _check_tensor("lora_b", lora_b, (n, r), x)
    if bias is not None:
        _check_tensor("bias", bias, (n,), x)
        if bias.stride(0) != 1:
            raise ValueError("bias must be contiguous")
    if dropout_mask is not None:
        if not isinstance(dropout_mask, torch.Tensor) or dropout_mask.dtype not in (torch.bool, torch.uint8):
            raise TypeError(f"dropout_mask must be a bool or uint8 tensor, got {getattr(dropout_mask, 'dtype', None)}")
        if tuple(dropout_mask.shape) != (m, k) or dropout_mask.device != x.device:
            raise ValueError(f"dropout_mask must be [{m}, {k}] on {x.device}, got {tuple(dropout_mask.shape)}")
        if not 0.0 <= dropout_p < 1.0:
            raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return m, k, n, r


def _keep(dropout_mask: torch.Tensor | None, device: torch.device) -> tuple[torch.Tensor, bool]:
    """The keep-mask as uint8 (a bool tensor is reinterpreted, not copied) and whether there is one."""
    if dropout_mask is None:
        return _tables(device)[2], False
    return (dropout_mask.view(torch.uint8) if dropout_mask.dtype == torch.bool else dropout_mask), True


def _w_operand(
    weight: torch.Tensor | None, nf4: NF4Args | None, device: torch.device, transposed: bool
) -> tuple[tuple[torch.Tensor, ...], int, int, int, dict[str, int]]:
    """Kernel arguments for W read as ``Wt[q, p]``: ``(q, p) = (k, n)`` forward, ``(n, k)`` when ``transposed``.

    Returns the six W pointers (weight/packed, absmax, code, qmap, nested, offset), the two strides,
    ``log2(blocksize)`` (a runtime argument) and the constexprs. Unused pointers get small float32
    placeholders so every launch has one signature.
    """
    code, qmap, _ = _tables(device)
    if nf4 is None:
        s_n, s_k = weight.stride()
        strides = (s_n, s_k) if transposed else (s_k, s_n)
        consts = {"W_KIND": _W_DENSE, "W_T": transposed, "NESTED_BLOCKSIZE": NESTED_BLOCKSIZE}
        return (weight, code, code, code, code, code), *strides, 0, consts
    n, k = nf4.shape
    strides = (k, 1) if transposed else (1, k)
    if nf4.quant_map is not None:
        code = nf4.quant_map.to(device=device, dtype=torch.float32).contiguous()
    if nf4.absmax.dtype == torch.uint8:
        if nf4.nested_quant_map is not None:
            qmap = nf4.nested_quant_map.to(device=device, dtype=torch.float32).contiguous()
        nested, offset = nf4.nested_absmax, nf4.offset.reshape(1).to(torch.float32)
        kind = _W_NF4_DQ
    else:
        qmap = nested = offset = code
        kind = _W_NF4
    consts = {"W_KIND": kind, "W_T": transposed, "NESTED_BLOCKSIZE": nf4.nested_blocksize}
    shift = nf4.blocksize.bit_length() - 1  # supported blocksizes are powers of two
    return (nf4.packed, nf4.absmax, code, qmap, nested, offset), *strides, shift, consts


_SCRATCH: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def scratch_bytes() -> int:
    """Bytes held by the dequantize-once scratch buffers (one per device and dtype, the largest layer's W)."""
    return sum(t.numel() * t.element_size() for t in _SCRATCH.values())


def _dequantized(
    nf4: NF4Args, dtype: torch.dtype, device: torch.device, row_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """W ``[N, K]`` in ``dtype`` (``row_scale ⊙ W`` with a float32 ``[N]`` scale, DoRA's ``f ⊙ W``; ``K % 64 == 0``),
    dequantized into the scratch buffer every layer's call reuses.

    The buffer grows to the largest weight seen and is overwritten by the next call, so a result is only
    valid until then: the GEMM that reads it runs next on the same stream (one stream per process).
    """
    n, k = nf4.shape
    key = (device, dtype)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < n * k:
        _SCRATCH.pop(key, None)  # release the smaller buffer before allocating the larger one
        buf = _SCRATCH[key] = torch.empty(n * k, dtype=dtype, device=device)
    w = nf4_dequantize(
        nf4.packed, nf4.absmax, n * k, dtype, blocksize=nf4.blocksize, nested_absmax=nf4.nested_absmax,
        offset=nf4.offset, quant_map=nf4.quant_map, nested_quant_map=nf4.nested_quant_map,
        nested_blocksize=nf4.nested_blocksize, out=buf, row_scale=row_scale, row_len=k,
    )  # fmt: skip
    return w.view(n, k)


def _fuse_nf4(m: int, dtype: torch.dtype) -> bool:
    """Whether the general GEMM decodes NF4 in its main loop (small M, 16-bit) rather than reading W from
    the dequantize-once scratch (see the module docstring for the cost model behind the threshold)."""
    return m <= SMALL_M_MAX and dtype != torch.float32


CUBLAS_MIN_Q = 1024
CUBLAS_MIN_P = 512
CUBLAS_MAX_P_ANY_M = 4096
CUBLAS_MIN_M = 512


def cublas_path(m: int, p: int, q: int) -> bool:
    """Whether ``OUT [M, P] = IN [M, Q]·Wt [Q, P]`` (+ the LoRA term) runs in cuBLAS rather than the tiled GEMM.

    A rule frozen from the cost model (sm_90, bf16, r = 16; nothing is evaluated at call time): the tiled GEMM
    (``_perf_launches.tiled_gemm_op``, its SASS-based prediction) against cuBLAS + addmm (``cublas_lora_op``:
    cuBLAS's bound plus the LoRA addmm's pass over the output), on a grid of P in 256..28672, Q in 256..14336 and
    M in 65..8192 (480 points). The rule picks cuBLAS at 208 of them, each predicted faster (0.12-0.98x of the
    tiled time; 0.64-0.68x on the Llama-3-8B projections at M = 8192) and never a point where the tiled GEMM wins:
    that happens with Q < 1024 (the addmm's extra pass over the output outweighs a short GEMM: up to 1.55x at
    P = 14336, Q = 256, M = 128), P < 512 (1.17x at 256 x 1024, M = 8192) and, for P > 4096, below M = 512 (up to
    1.40x at 14336 x 1024, M = 128: the tiled grid's waves). The float32 tiled GEMM (FMA) against cuBLAS SGEMM
    takes the same rule. Decode sizes (M <= 64) keep their own paths.
    """
    if m <= decode.DECODE_M_MAX or q < CUBLAS_MIN_Q or p < CUBLAS_MIN_P:
        return False
    return m >= CUBLAS_MIN_M or p <= CUBLAS_MAX_P_ANY_M


def _dense_base(weight: torch.Tensor | None, nf4: NF4Args | None, inp: torch.Tensor) -> torch.Tensor:
    """W ``[N, K]`` as cuBLAS reads it: the dense base, or NF4 dequantized once into the scratch buffer."""
    return weight if nf4 is None else _dequantized(nf4, inp.dtype, inp.device)


def _cublas_fwd(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, u: torch.Tensor | None, lora_b: torch.Tensor, s: float
) -> torch.Tensor:
    """``Y = X·Wᵀ + bias`` in cuBLAS (bias in its epilogue), then ``Y += s·U·Bᵀ`` (float32 in addmm's epilogue)."""
    y = torch.mm(x, w.t()) if bias is None else torch.addmm(bias, x, w.t())
    if u is not None:
        y.addmm_(u, lora_b.t(), alpha=s)
    return y


def _cublas_dx(
    dy: torch.Tensor, w: torch.Tensor, g: torch.Tensor | None, lora_a: torch.Tensor, keep: tuple, s: float
) -> torch.Tensor:
    """``dX = dY·W + s·keep ⊙ (G·A)`` with W ``[N, K]`` in cuBLAS; G float32 ``[M, R]``, split into 16-bit high and
    low halves (one rank-2R GEMM) so the update keeps G's float32 precision."""
    dx = torch.mm(dy, w)
    if g is None:
        return dx
    if dy.dtype == torch.float32:
        gs, a2 = g, lora_a
    else:
        hi = g.to(dy.dtype)
        gs = torch.cat([hi, (g - hi.float()).to(dy.dtype)], dim=1)  # [M, 2R] transient
        a2 = torch.cat([lora_a, lora_a], dim=0)  # [2R, K] transient
    keep_t, has_mask = keep
    if has_mask:
        dx.addcmul_(torch.mm(gs, a2), keep_t, value=s)  # G·A [M, K] transient, rounded to dY's dtype once
    else:
        dx.addmm_(gs, a2, alpha=s)
    return dx


def _nf4_w_operand(nf4: NF4Args, inp: torch.Tensor, transposed: bool) -> tuple:
    """The GEMM's W arguments for an NF4 weight: decoded in the kernel, or dequantized once into the scratch."""
    if _fuse_nf4(inp.shape[0], inp.dtype):
        return _w_operand(None, nf4, inp.device, transposed)
    return _w_operand(_dequantized(nf4, inp.dtype, inp.device), None, inp.device, transposed)


def _gemm(
    inp: torch.Tensor,
    w_args: tuple,
    lt: torch.Tensor,
    rt: torch.Tensor,
    rt_strides: tuple[int, int],
    bias: torch.Tensor | None,
    keep: tuple[torch.Tensor, bool],
    lora_scale: float,
    p: int,
) -> torch.Tensor:
    """``OUT [M, P] = IN·Wt + lora_scale·keep ⊙ (L·Rt) + bias`` in IN's dtype (see ``lora_linear_kernels``)."""
    (w_ptrs, stride_wq, stride_wp, shift, w_consts) = w_args
    m, q = inp.shape
    r = lt.shape[1]
    interpret = _interpreting()
    small = m <= SMALL_M_MAX
    # the small-M path adds split-K slices into a float32 workspace; the tiled path stores directly
    # (zeroed here under the interpreter, by the autotuned configs' pre_hook on a GPU)
    if small:
        out = (torch.zeros if interpret else torch.empty)((m, p), dtype=torch.float32, device=inp.device)
    else:
        out = inp.new_empty((m, p))
    keep_t, has_mask = keep
    args = (
        inp, *w_ptrs, inp if bias is None else bias, lt, rt, keep_t, out,
        m, p, q, r, triton.next_power_of_2(m), w_ptrs[1].numel(), shift,
        inp.stride(0), inp.stride(1), stride_wq, stride_wp, lt.stride(0), lt.stride(1), *rt_strides,
        keep_t.stride(0) if has_mask else 0, keep_t.stride(1) if has_mask else 0, out.stride(0), out.stride(1),
        lora_scale, int(bias is not None), int(has_mask),
    )  # fmt: skip
    consts = dict(
        w_consts, LORA_SPLIT=lt.dtype == torch.float32 and inp.dtype != torch.float32, ATOMIC_OUT=small,
        DOT_PRECISION=dot_precision(inp.dtype), BLOCK_R=GEMM_BLOCK_R,
    )  # fmt: skip
    if interpret:
        cfg = dict(_INTERPRET_SMALL if small else _INTERPRET_TILED)
        split = max(1, min(cfg.pop("split_k"), triton.cdiv(q, cfg["BLOCK_Q"])))
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(p, cfg["BLOCK_P"]), split)
        _lora_gemm_kernel[grid](*args, split_k=split, **consts, **cfg)
    else:

        def grid(meta: dict) -> tuple[int, int]:
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(p, meta["BLOCK_P"]), meta["split_k"])

        gemm_kernel(inp.dtype, small)[grid](*args, **consts)
    # the [M, P] workspace cast is a negligible pass next to the weight read it follows
    return out.to(inp.dtype) if small else out


def _skinny(
    inp: torch.Tensor,
    mat: torch.Tensor,
    mat_strides: tuple[int, int],
    keep: tuple[torch.Tensor, bool],
    scale: float,
    r: int,
) -> torch.Tensor:
    """``scale·(keep ⊙ IN)[M, Q]·MAT[Q, R]`` in float32 ``[M, R]``, with ``MAT[q, r] = mat[q·s0 + r·s1]``."""
    m, q = inp.shape
    interpret = _interpreting()
    block_r = _block_r(r)
    cfg = _skinny_config(m, interpret, block_r)
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(r, block_r)
    steps = triton.cdiv(q, cfg["BLOCK_Q"])
    # split-K until the grid fills the device (decode: one row tile would leave it idle)
    split = max(1, min(steps, triton.cdiv(_target_programs(inp.device, interpret), tiles)))
    out = (torch.zeros if split > 1 else torch.empty)((m, r), dtype=torch.float32, device=inp.device)
    keep_t, has_mask = keep
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(r, block_r), split)
    _lora_skinny_kernel[grid](
        inp, mat, keep_t, out, m, q, r,
        inp.stride(0), inp.stride(1), *mat_strides,
        keep_t.stride(0) if has_mask else 0, keep_t.stride(1) if has_mask else 0,
        scale, int(has_mask), split,
        DOT_PRECISION=dot_precision(inp.dtype), BLOCK_M=cfg["BLOCK_M"], BLOCK_Q=cfg["BLOCK_Q"], BLOCK_R=block_r,
        num_warps=cfg["num_warps"],
    )  # fmt: skip
    return out


def lora_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    *,
    nf4: NF4Args | None = None,
    dropout_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Y = X·Wᵀ + bias + s·(drop(X)·Aᵀ)·Bᵀ`` and ``U = drop(X)·Aᵀ`` (contract: ``lora_linear_fwd_reference``).

    Args:
        x: ``[M, K]`` float16, bfloat16 or float32 (any strides).
        weight: dense ``[N, K]`` in x's dtype, or None with ``nf4`` (an NF4 ``[N, K]``, bitsandbytes layout,
            float32 absmax or uint8 absmax under double quantization).
        bias: ``[N]`` or None. lora_a: ``[R, K]``. lora_b: ``[N, R]``, all in x's dtype. scaling: ``s``.
        dropout_mask: bool/uint8 ``[M, K]`` (1 keeps) or None; dropout_p: its drop probability.

    Returns:
        ``y [M, N]`` and ``u [M, R]`` in x's dtype (accumulated in float32).
    """
    m, k, n, r = _check_args(x, weight, bias, lora_a, lora_b, nf4, dropout_mask, dropout_p)
    keep = _keep(dropout_mask, x.device)
    inv_keep = 1.0 / (1.0 - dropout_p) if keep[1] else 1.0
    if nf4 is not None and decode.decode_supported(x, nf4):
        # decode sizes: one launch (U = X·Aᵀ summed inside the decode kernel, Y and U written in x's dtype; split-K
        # reduced in the kernel: no memsets, no casts), or with dropout two: U from the masked X, then the decode
        target = _target_programs(x.device, _interpreting())
        if decode.fold_u_supported(m, r, keep[1]):
            return decode.nf4_decode_fwd(x, nf4, bias, None, lora_b, float(scaling), target, lora_a=lora_a)
        u = decode.lora_u_fwd(x, lora_a, keep, inv_keep, target)
        return decode.nf4_decode_fwd(x, nf4, bias, u, lora_b, float(scaling), target), u
    # -- U = drop(X)·Aᵀ: MAT[k, r] = A[r, k] --
    u = _skinny(x, lora_a, (lora_a.stride(1), lora_a.stride(0)), keep, inv_keep, r).to(x.dtype)
    # -- Y = X·Wᵀ + bias + s·U·Bᵀ: Rt[r, n] = B[n, r] --
    if cublas_path(m, n, k):
        return _cublas_fwd(x, _dense_base(weight, nf4, x), bias, u, lora_b, float(scaling)), u
    w_args = _w_operand(weight, None, x.device, False) if nf4 is None else _nf4_w_operand(nf4, x, False)
    no_keep = _keep(None, x.device)
    y = _gemm(x, w_args, u, lora_b, (lora_b.stride(1), lora_b.stride(0)), bias, no_keep, float(scaling), n)
    return y, u


def lora_linear_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    u: torch.Tensor,
    scaling: float,
    *,
    nf4: NF4Args | None = None,
    dropout_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    needs_dx: bool = True,
    needs_da: bool = True,
    needs_db: bool = True,
    needs_dbias: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``lora_linear_fwd`` (contract: ``lora_linear_bwd_reference``; the frozen W gets none).

    With ``G = dY·B [M, R]`` (float32)::

        dX    = dY·W + s·mask/(1-p) ⊙ (G·A)     [M, K]   (W dequantized again in the kernel)
        dA    = s·Gᵀ·drop(X)                    [R, K]
        dB    = s·dYᵀ·U                         [N, R]
        dbias = Σ_m dY                          [N]

    Args:
        dy: ``[M, N]`` in x's dtype. x, weight, lora_a, lora_b, nf4, dropout_mask, dropout_p: as in the
            forward. u: the forward's ``[M, R]``. scaling: ``s``.
        needs_dx, needs_da, needs_db, needs_dbias: which gradients to compute (the rest is skipped).

    Returns:
        ``(dx, da, db, dbias)`` in the dtypes of ``x, lora_a, lora_b, dy``; None where not asked.
    """
    m, k, n, r = _check_args(x, weight, None, lora_a, lora_b, nf4, dropout_mask, dropout_p)
    _check_tensor("dy", dy, (m, n), x)
    _check_tensor("u", u, (m, r), x)
    keep = _keep(dropout_mask, x.device)
    inv_keep = 1.0 / (1.0 - dropout_p) if keep[1] else 1.0
    dx = da = db = dbias = None
    g = None
    if needs_dx or needs_da:
        # -- G = dY·B: MAT[n, r] = B[n, r] --
        g = _skinny(dy, lora_b, (lora_b.stride(0), lora_b.stride(1)), _keep(None, x.device), 1.0, r)
    if needs_dx:
        # -- dX = dY·W + s/(1-p)·keep ⊙ (G·A): W read as Wt[n, k], Rt[r, k] = A[r, k] --
        if cublas_path(m, k, n):
            dx = _cublas_dx(dy, _dense_base(weight, nf4, dy), g, lora_a, keep, scaling * inv_keep)
        else:
            w_args = _w_operand(weight, None, x.device, True) if nf4 is None else _nf4_w_operand(nf4, dy, True)
            dx = _gemm(dy, w_args, g, lora_a, (lora_a.stride(0), lora_a.stride(1)), None, keep, scaling * inv_keep, k)
    if needs_da:
        part, _ = _wgrad(x, g, keep, colsum=False)
        da = (part.t() * (scaling * inv_keep)).to(lora_a.dtype).contiguous()
    if needs_db:
        part, sums = _wgrad(dy, u, _keep(None, x.device), colsum=needs_dbias, maskable=False)
        db = (part * scaling).to(lora_b.dtype)
        if needs_dbias:
            dbias = sums.to(dy.dtype)
    elif needs_dbias:
        # without dB there is no pass over dY to fuse the column sums into; torch's reduction reads dY once
        dbias = dy.sum(0, dtype=torch.float32).to(dy.dtype)
    return dx, da, db, dbias


def _empty_lora(m: int, l_like: torch.Tensor, rt_like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-width ``L [M, 0]`` and ``Rt [0, 0]``: views of ``l_like`` and ``rt_like`` (no allocation, valid
    pointers).

    With R = 0 the epilogue loop runs no step, so the base-only launch is the LoRA op's compiled kernel
    with nothing added. The views carry the dtypes the LoRA op's operands have (L: U in x's dtype forward,
    the float32 G in dX; Rt: x's dtype), so both run one binary, the one the compile gate checks.
    """
    return l_like.as_strided((m, 0), (0, 1)), rt_like.as_strided((0, 0), (0, 1))


def nf4_linear_fwd(x: torch.Tensor, bias: torch.Tensor | None, nf4: NF4Args) -> torch.Tensor:
    """``Y = X·dequant(W)ᵀ + bias`` for an NF4 ``W`` (contract: ``nf4_linear_fwd_reference``).

    W is dequantized tile by tile in the GEMM's registers, never materialized; the dispatch on M is
    ``lora_linear_fwd``'s (split-K up to ``SMALL_M_MAX`` rows, tiled past it).

    Args:
        x: ``[M, K]`` float16, bfloat16 or float32 (any strides).
        bias: ``[N]`` in x's dtype (contiguous) or None.
        nf4: an NF4 ``[N, K]`` (bitsandbytes layout, float32 absmax or uint8 absmax under double quantization).

    Returns:
        ``y [M, N]`` in x's dtype (accumulated in float32).
    """
    m, k = _check_matrix("x", x, "[M, K]")
    n = _check_nf4(nf4, k, "x", x)
    if bias is not None:
        _check_tensor("bias", bias, (n,), x)
        if bias.stride(0) != 1:
            raise ValueError("bias must be contiguous")
    if decode.decode_supported(x, nf4):
        return decode.nf4_decode_fwd(x, nf4, bias, None, None, 0.0, _target_programs(x.device, _interpreting()))
    if cublas_path(m, n, k):
        return _cublas_fwd(x, _dense_base(None, nf4, x), bias, None, x, 0.0)
    lt, rt = _empty_lora(m, x, x)
    w_args = _nf4_w_operand(nf4, x, transposed=False)
    return _gemm(x, w_args, lt, rt, (0, 1), bias, _keep(None, x.device), 0.0, n)


def nf4_linear_bwd_dx(dy: torch.Tensor, nf4: NF4Args) -> torch.Tensor:
    """``dX = dY·dequant(W)`` for an NF4 ``W [N, K]`` (contract: ``nf4_linear_bwd_dx_reference``).

    The gradient of ``nf4_linear_fwd`` with respect to x: W is dequantized again in the kernel, read
    transposed (the reduction runs over N), instead of a dense copy kept from the forward.

    Args:
        dy: ``[M, N]`` float16, bfloat16 or float32 (any strides). nf4: as in the forward.

    Returns:
        ``dx [M, K]`` in dy's dtype (accumulated in float32).
    """
    m, n = _check_matrix("dy", dy, "[M, N]")
    if not isinstance(nf4, NF4Args):
        raise TypeError(f"nf4 must be an NF4Args, got {type(nf4).__name__}")
    if nf4.shape[0] != n:
        raise ValueError(f"nf4.shape is {tuple(nf4.shape)}, dy has N={n} columns")
    k = nf4.shape[1]
    _check_nf4(nf4, k, "dy", dy)
    if cublas_path(m, k, n):
        return _cublas_dx(dy, _dense_base(None, nf4, dy), None, dy, (dy, False), 0.0)
    lt, rt = _empty_lora(m, _tables(dy.device)[0], dy)
    w_args = _nf4_w_operand(nf4, dy, transposed=True)
    return _gemm(dy, w_args, lt, rt, (0, 1), None, _keep(None, dy.device), 0.0, k)


# ----------------------------------------------------------------------------------------------
# compile gate
# ----------------------------------------------------------------------------------------------


def compile_gate_cases() -> list[GateCase]:
    """Every shipped configuration of the op's kernels: the GEMM and skinny kernels
    (``lora_linear_kernels``), the weight-gradient kernel (``lora_linear_wgrad``), the decode kernels and DoRA's
    epilogue and column-sum kernels (``dora_linear``)."""
    from fastpeft.kernels import dora_linear  # it builds on this module's launchers

    cases = kernels.compile_gate_cases() + wgrad.compile_gate_cases() + decode.compile_gate_cases()
    return cases + dora_linear.compile_gate_cases()
