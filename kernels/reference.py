"""Plain-PyTorch twins of every launcher in fastpeft.kernels: same signatures, same contracts.

This file is the CPU path, the test oracle and the readable specification of fastpeft's math.
Each function is named ``<launcher>_reference``.
"""

from __future__ import annotations

import torch

from fastpeft.kernels.formats import (
    NESTED_BLOCKSIZE,
    NF4_CODE,
    NF4Args,
    check_blocksize,
    check_dequantize_args,
    check_finite,
    check_float_tensor,
    dynamic_map,
    nf4_code,
)

__all__ = [
    "ADAPTER_ACTIVATIONS",
    "adapter_act_grad_reference",
    "adapter_act_reference",
    "adapter_bwd_reference",
    "adapter_fwd_reference",
    "check_adapter_args",
    "check_adapter_bwd_args",
    "check_cross_entropy_args",
    "check_lora_batched_args",
    "check_lora_batched_out",
    "cross_entropy_grad_reference",
    "cross_entropy_slice_grad_reference",
    "cross_entropy_slice_stats_reference",
    "dora_row_norm_reference",
    "dora_weight_sq_reference",
    "dynamic8_quantize_reference",
    "lora_batched_delta_reference",
    "lora_batched_expand_reference",
    "lora_linear_bwd_reference",
    "lora_linear_fwd_reference",
    "nf4_dequantize_reference",
    "nf4_linear_bwd_dx_reference",
    "nf4_linear_fwd_reference",
    "nf4_quantize_reference",
]

# ----------------------------------------------------------------------------------------------
# NF4 (kernels/nf4.py)
# ----------------------------------------------------------------------------------------------


def _blockwise_scale(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax of flat fp32 ``x`` and ``x`` scaled into [-1, 1] by the fp32 reciprocal."""
    n = x.numel()
    n_blocks = -(-n // blocksize)
    blocks = torch.nn.functional.pad(x, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1)
    return scaled.flatten()[:n], absmax


def _nearest_code(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted ``code`` values: #{midpoints < x} (ties take the lower)."""
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(x, midpoints, right=False)


def nf4_quantize_reference(w: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    check_float_tensor("w", w)
    check_blocksize(blocksize)
    check_finite("w", w)
    scaled, absmax = _blockwise_scale(w.reshape(-1).float(), blocksize)
    codes = _nearest_code(scaled, nf4_code(w.device)).to(torch.uint8)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), NF4_CODE.index(0.0))])
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed.unsqueeze(1), absmax


def dynamic8_quantize_reference(
    x: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    check_float_tensor("x", x)
    if x.dtype != torch.float32:
        raise TypeError(f"x must be float32, got {x.dtype}")
    check_blocksize(blocksize)
    scaled, absmax = _blockwise_scale(x.reshape(-1), blocksize)
    return _nearest_code(scaled, dynamic_map(x.device)).to(torch.uint8), absmax


def nf4_dequantize_reference(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    numel: int,
    dtype: torch.dtype = torch.float32,
    *,
    blocksize: int = 64,
    nested_absmax: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    quant_map: torch.Tensor | None = None,
    nested_quant_map: torch.Tensor | None = None,
    nested_blocksize: int = NESTED_BLOCKSIZE,
) -> torch.Tensor:
    check_dequantize_args(
        packed, absmax, numel, dtype, blocksize, nested_absmax, offset, nested_blocksize, quant_map, nested_quant_map
    )
    device = packed.device
    code = nf4_code(device) if quant_map is None else quant_map.to(device, torch.float32)
    if absmax.dtype == torch.uint8:
        qmap = dynamic_map(device) if nested_quant_map is None else nested_quant_map.to(device, torch.float32)
        nested = nested_absmax.repeat_interleave(nested_blocksize)[: absmax.numel()]
        absmax = qmap[absmax.long()] * nested + offset.reshape(()).float()
    # Both codes of a byte at once (the even element in the high nibble): one gather from a [256, 2] table
    # of value pairs, then each block's absmax broadcast over it. Three passes over the weights where
    # splitting nibbles, widening them to int64 and repeating absmax took six (the CPU QLoRA path's cost).
    byte = torch.arange(256, device=device)
    pairs = torch.stack([code[byte >> 4], code[byte & 0xF]], dim=1)
    values = pairs.index_select(0, packed.reshape(-1).int()).reshape(-1)[:numel]
    blocks = absmax.numel()
    if numel == blocks * blocksize:
        return (values.view(blocks, blocksize) * absmax.view(blocks, 1)).view(-1).to(dtype)
    return (values * absmax.repeat_interleave(blocksize)[:numel]).to(dtype)


# ----------------------------------------------------------------------------------------------
# Fused LoRA / QLoRA linear (kernels/lora_linear.py)
# ----------------------------------------------------------------------------------------------


def _acc(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float32, or float64 for float64 inputs (gradcheck)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _base_weight(weight: torch.Tensor | None, nf4: NF4Args | None, acc: torch.dtype) -> torch.Tensor:
    """The frozen base ``W [N, K]`` in ``acc``: dense as given, or NF4 dequantized."""
    if nf4 is None:
        return weight.to(acc)
    n, k = nf4.shape
    w = nf4_dequantize_reference(
        nf4.packed, nf4.absmax, n * k, torch.float32,
        blocksize=nf4.blocksize, nested_absmax=nf4.nested_absmax, offset=nf4.offset,
        quant_map=nf4.quant_map, nested_quant_map=nf4.nested_quant_map, nested_blocksize=nf4.nested_blocksize,
    )  # fmt: skip
    return w.view(n, k).to(acc)


def _dropped(x: torch.Tensor, dropout_mask: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
    """``drop(X)``: X where the mask keeps, scaled by 1 / (1 - p); X itself without a mask."""
    if dropout_mask is None:
        return x
    return x * dropout_mask.to(x.dtype) / (1.0 - dropout_p)


def lora_linear_fwd_reference(
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
    """``Y = X·Wᵀ + bias + s·(drop(X)·Aᵀ)·Bᵀ`` and ``U = drop(X)·Aᵀ``.

    Args:
        x: ``[M, K]``. weight: dense ``[N, K]``, or None with ``nf4`` (an NF4 ``[N, K]``).
        bias: ``[N]`` or None. lora_a: ``[R, K]``. lora_b: ``[N, R]``. scaling: ``s``.
        dropout_mask: bool/uint8 ``[M, K]`` (1 keeps) or None; dropout_p: its drop probability.

    Returns:
        ``y [M, N]`` and ``u [M, R]``, both in x's dtype (accumulated in float32; float64 stays float64).
    """
    acc = _acc(x)
    xf = x.to(acc)
    u = _dropped(xf, dropout_mask, dropout_p) @ lora_a.to(acc).t()
    w = _base_weight(weight, nf4, acc).t()
    y = xf @ w if bias is None else torch.addmm(bias.to(acc), xf, w)
    # += s·U·Bᵀ inside the GEMM (addmm's alpha): no [M, N] temporaries, which cost the CPU path ~10 %
    y.addmm_(u.to(x.dtype).to(acc), lora_b.to(acc).t(), alpha=scaling)
    return y.to(x.dtype), u.to(x.dtype)


def lora_linear_bwd_reference(
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
    """Gradients of ``lora_linear_fwd`` (the base ``W`` is frozen and gets none).

    With ``G = dY·B [M, R]``::

        dX    = dY·W + s·mask/(1-p) ⊙ (G·A)
        dA    = s·Gᵀ·drop(X)          [R, K]
        dB    = s·dYᵀ·U               [N, R]
        dbias = Σ_m dY                [N]

    Returns ``(dx, da, db, dbias)`` in the dtypes of ``x, lora_a, lora_b, dy``; None where not asked.
    """
    acc = _acc(dy)
    dyf = dy.to(acc)
    g = dyf @ lora_b.to(acc)
    dx = da = db = dbias = None
    if needs_dx:
        dx = dyf @ _base_weight(weight, nf4, acc)
        if dropout_mask is None:
            dx.addmm_(g, lora_a.to(acc), alpha=scaling)  # += s·G·A inside the GEMM, as in the forward
        else:
            dx += scaling * _dropped(g @ lora_a.to(acc), dropout_mask, dropout_p)
        dx = dx.to(x.dtype)
    if needs_da:
        da = (scaling * g.t() @ _dropped(x.to(acc), dropout_mask, dropout_p)).to(lora_a.dtype)
    if needs_db:
        db = (dyf.t() @ (scaling * u.to(acc))).to(lora_b.dtype)  # s scales the [M, R] operand, not dYᵀ
    if needs_dbias:
        dbias = dyf.sum(0).to(dy.dtype)
    return dx, da, db, dbias


def nf4_linear_fwd_reference(x: torch.Tensor, bias: torch.Tensor | None, nf4: NF4Args) -> torch.Tensor:
    """``Y = X·dequant(W)ᵀ + bias`` for an NF4 ``W [N, K]``: the base-only linear, no LoRA.

    Args:
        x: ``[M, K]``. bias: ``[N]`` or None. nf4: the quantized ``[N, K]`` weight.

    Returns:
        ``y [M, N]`` in x's dtype. W is dequantized in float32 and rounded to x's dtype (the operand the
        kernel's MMA takes), the product accumulated in float32 (float64 stays float64).
    """
    acc = _acc(x)
    y = x.to(acc) @ _base_weight(None, nf4, acc).to(x.dtype).to(acc).t()
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


def nf4_linear_bwd_dx_reference(dy: torch.Tensor, nf4: NF4Args) -> torch.Tensor:
    """``dX = dY·dequant(W)`` ``[M, K]`` in dy's dtype: the input gradient of ``nf4_linear_fwd`` (W, frozen,
    gets none; dbias is ``Σ_m dY``). W rounded to dy's dtype, accumulated in float32, as in the forward."""
    acc = _acc(dy)
    return (dy.to(acc) @ _base_weight(None, nf4, acc).to(dy.dtype).to(acc)).to(dy.dtype)


# ----------------------------------------------------------------------------------------------
# Bottleneck adapter (kernels/adapter.py)
# ----------------------------------------------------------------------------------------------

ADAPTER_ACTIVATIONS = ("relu", "silu", "gelu", "gelu_tanh")
"""Bottleneck activations: ReLU, SiLU (swish), GELU with erf (exact), GELU tanh approximation (``gelu_new``)."""


def check_adapter_args(
    h: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor,
    activation: str,
    residual: torch.Tensor | None = None,
    *,
    allow_float64: bool = True,
) -> None:
    """Shape, dtype and device checks shared by ``adapter_fwd`` and its reference (errors name the argument)."""
    dtypes = (torch.float32, torch.float16, torch.bfloat16) + ((torch.float64,) if allow_float64 else ())
    named = {"h": h, "w_down": w_down, "b_down": b_down, "w_up": w_up, "b_up": b_up}
    if residual is not None:
        named["residual"] = residual
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in dtypes:
            raise TypeError(f"{name} must be one of {dtypes}, got {t.dtype}")
        if t.dtype != h.dtype:
            raise TypeError(f"{name} must have h's dtype {h.dtype}, got {t.dtype}")
        if t.device != h.device:
            raise ValueError(f"{name} is on {t.device}, h on {h.device}")
    if activation not in ADAPTER_ACTIVATIONS:
        raise ValueError(f"activation must be one of {ADAPTER_ACTIVATIONS}, got {activation!r}")
    if h.dim() != 2 or h.shape[0] == 0 or h.shape[1] == 0:
        raise ValueError(f"h must be a non-empty [M, H] matrix, got shape {tuple(h.shape)}")
    m, hidden = h.shape
    if w_down.dim() != 2 or w_down.shape[1] != hidden or w_down.shape[0] == 0:
        raise ValueError(f"w_down must be [b, H={hidden}] with b >= 1, got {tuple(w_down.shape)}")
    b = w_down.shape[0]
    for name, t, want in (("b_down", b_down, (b,)), ("w_up", w_up, (hidden, b)), ("b_up", b_up, (hidden,))):
        if tuple(t.shape) != want:
            raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if residual is not None and tuple(residual.shape) != (m, hidden):
        raise ValueError(f"residual must have h's shape {(m, hidden)}, got {tuple(residual.shape)}")


def check_adapter_bwd_args(
    dy: torch.Tensor, h: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor, z: torch.Tensor, activation: str
) -> None:
    """Checks shared by ``adapter_bwd`` and its reference, beyond the forward's."""
    check_adapter_args(h, w_down, w_down.new_empty(w_down.shape[:1]), w_up, w_up.new_empty(w_up.shape[:1]), activation)
    if not isinstance(dy, torch.Tensor) or dy.shape != h.shape or dy.dtype != h.dtype or dy.device != h.device:
        got = (tuple(dy.shape), dy.dtype, dy.device) if isinstance(dy, torch.Tensor) else type(dy).__name__
        raise ValueError(f"dy must match h {(tuple(h.shape), h.dtype, h.device)}, got {got}")
    want = (h.shape[0], w_down.shape[0])
    if not isinstance(z, torch.Tensor) or tuple(z.shape) != want or z.dtype != _acc(h) or z.device != h.device:
        got = (tuple(z.shape), z.dtype) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"z must be the forward's {want} {_acc(h)} pre-activation, got {got}")
    if not z.is_contiguous():
        raise ValueError("z must be contiguous")


def adapter_act_reference(z: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(z)`` for one of ``ADAPTER_ACTIVATIONS``."""
    if activation == "relu":
        return torch.relu(z)
    if activation == "silu":
        return torch.nn.functional.silu(z)
    return torch.nn.functional.gelu(z, approximate="tanh" if activation == "gelu_tanh" else "none")


def adapter_act_grad_reference(z: torch.Tensor, activation: str) -> torch.Tensor:
    """``act'(z)``, written out (the kernels evaluate the same closed forms)."""
    if activation == "relu":
        return (z > 0).to(z.dtype)
    if activation == "silu":
        sig = torch.sigmoid(z)
        return sig * (1 + z * (1 - sig))
    if activation == "gelu_tanh":
        c = 0.7978845608028654  # sqrt(2 / pi)
        t = torch.tanh(c * (z + 0.044715 * z**3))
        return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * c * (1 + 3 * 0.044715 * z * z)
    return 0.5 * (1 + torch.erf(z * 0.7071067811865476)) + z * torch.exp(-0.5 * z * z) * 0.3989422804014327


def adapter_fwd_reference(
    h: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor,
    scaling: float,
    activation: str,
    residual: torch.Tensor | None = None,
    *,
    save_z: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``y = r + s·(act(z)·W_upᵀ + b_up)`` with ``z = h·W_downᵀ + b_down`` and ``r = residual or h``.

    Args:
        h: ``[M, H]``. w_down: ``[b, H]``. b_down: ``[b]``. w_up: ``[H, b]``. b_up: ``[H]``.
        scaling: ``s``. activation: one of ``ADAPTER_ACTIVATIONS``. residual: ``[M, H]`` or None (``r = h``).

    Returns:
        ``y [M, H]`` in h's dtype and ``z [M, b]`` in float32 (float64 for float64 inputs), kept for the
        backward (None unless ``save_z``). ``act(z)`` is rounded to h's dtype once before the up
        projection, as the kernel feeds it to the tensor cores.
    """
    check_adapter_args(h, w_down, b_down, w_up, b_up, activation, residual)
    acc = _acc(h)
    z = h.to(acc) @ w_down.to(acc).t() + b_down.to(acc)
    a = adapter_act_reference(z, activation).to(h.dtype).to(acc)
    r = h if residual is None else residual
    y = r.to(acc) + scaling * (a @ w_up.to(acc).t() + b_up.to(acc))
    return y.to(h.dtype), (z if save_z else None)


def adapter_bwd_reference(
    dy: torch.Tensor,
    h: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor,
    z: torch.Tensor,
    scaling: float,
    activation: str,
    *,
    residual_is_separate: bool = False,
    needs_dh: bool = True,
    needs_dw: bool = True,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of ``adapter_fwd`` from the saved pre-activation ``z`` (no recomputation of h·W_downᵀ).

    Args:
        dy: ``[M, H]`` in h's dtype. h: ``[M, H]``. w_down: ``[b, H]``. w_up: ``[H, b]``.
        z: ``[M, b]`` float32 from ``adapter_fwd``. scaling, activation: as in the forward.
        residual_is_separate: True when the forward got a ``residual`` (then dY does not flow into dh).

    With ``a = act(z)`` rounded to h's dtype and ``dz = s·(dY·W_up) ⊙ act'(z)`` (rounded to h's dtype
    where it enters a matmul)::

        dh      = dz·W_down + (dY unless the residual is separate)   [M, H]
        dW_down = dzᵀ·h                                              [b, H]
        db_down = Σ_m dz          (summed in float32 before rounding) [b]
        dW_up   = s·dYᵀ·a                                            [H, b]
        db_up   = s·Σ_m dY                                           [H]

    The gradient of a separate residual is ``dY`` itself (the op returns it, no kernel needed).

    Returns:
        ``(dh, dw_down, db_down, dw_up, db_up)`` in h's dtype; ``dh`` is None unless ``needs_dh``, the
        four weight gradients are None unless ``needs_dw``.
    """
    check_adapter_bwd_args(dy, h, w_down, w_up, z, activation)
    acc = _acc(dy)
    dyf = dy.to(acc)
    dz = scaling * (dyf @ w_up.to(acc)) * adapter_act_grad_reference(z.to(acc), activation)
    dzc = dz.to(h.dtype).to(acc)
    dh = dw_down = db_down = dw_up = db_up = None
    if needs_dh:
        dh = dzc @ w_down.to(acc)
        if not residual_is_separate:
            dh = dh + dyf
        dh = dh.to(h.dtype)
    if needs_dw:
        a = adapter_act_reference(z.to(acc), activation).to(h.dtype).to(acc)
        dw_down = (dzc.t() @ h.to(acc)).to(h.dtype)
        db_down = dz.sum(0).to(h.dtype)
        dw_up = (scaling * (dyf.t() @ a)).to(h.dtype)
        db_up = (scaling * dyf.sum(0)).to(h.dtype)
    return dh, dw_down, db_down, dw_up, db_up


# ----------------------------------------------------------------------------------------------
# mixed-adapter LoRA (kernels/lora_batched.py)
# ----------------------------------------------------------------------------------------------

LORA_BATCHED_RANKS = (16, 32, 64, 128)
"""Padded ranks (the stacked adapters' R) the mixed-adapter kernels are built for."""
LORA_BATCHED_DTYPES = {
    (torch.float32, torch.float32),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float16),
    (torch.float32, torch.bfloat16),
}
"""(adapter dtype, output dtype) pairs of mixed-adapter batches: the base's own dtype, or float32 adapters on
a 16-bit base (HF PEFT's ``autocast_adapter_dtype``, and every QLoRA model)."""


def check_lora_batched_args(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor,
    adapter_index: torch.Tensor,
    bias: torch.Tensor | None,
    ranks: tuple[int, ...] | None = None,
    check_index: bool = True,
) -> None:
    """Shapes, dtypes and devices of ``lora_batched_delta``; ``ranks``: the padded ranks allowed (None: any);
    ``check_index``: also the index's range (two reductions; a caller that built the index skips them).

    Raises:
        ValueError: a shape, dtype pair, device or index out of its contract.
    """
    if x.dim() != 2 or not x.is_floating_point() or lora_a.dim() != 3:
        raise ValueError(f"x must be a float [M, K] and lora_a [n, R, K], got {x.dtype} {tuple(x.shape)}, "
                         f"{tuple(lora_a.shape)}")  # fmt: skip
    if lora_a.shape[2] != x.shape[1] or lora_a.dtype != lora_b.dtype:
        raise ValueError(f"lora_a must be [n, R, {x.shape[1]}] in lora_b's dtype, got {lora_a.dtype} "
                         f"{tuple(lora_a.shape)}")  # fmt: skip
    check_lora_batched_out(y, x.shape[0], lora_b, scales, adapter_index, bias, lora_a.shape[:2], ranks, check_index)
    if x.device != y.device or lora_a.device != y.device:
        raise ValueError("x and lora_a must be on y's device")


def check_lora_batched_out(
    y: torch.Tensor,
    rows: int,
    lora_b: torch.Tensor,
    scales: torch.Tensor,
    adapter_index: torch.Tensor,
    bias: torch.Tensor | None,
    n_r: tuple[int, int] | None = None,
    ranks: tuple[int, ...] | None = None,
    check_index: bool = True,
) -> None:
    """The output half of the mixed-adapter checks (``lora_batched_delta`` and ``lora_batched_expand``): ``y
    [rows, N]`` and ``lora_b [n, N, R]`` (``n_r``: the ``(n, R)`` lora_b must have), scales, biases, index."""
    if y.dim() != 2 or y.shape[0] != rows or lora_b.dim() != 3 or lora_b.shape[1] != y.shape[1]:
        raise ValueError(f"y must be [{rows}, N] and lora_b [n, N, R], got {tuple(y.shape)} and {tuple(lora_b.shape)}")
    n, r = lora_b.shape[0], lora_b.shape[2]
    if n_r is not None and (n, r) != tuple(n_r):
        raise ValueError(f"lora_b must be [{n_r[0]}, {y.shape[1]}, {n_r[1]}], got {tuple(lora_b.shape)}")
    if ranks is not None and r not in ranks:
        raise ValueError(f"the padded rank must be one of {ranks}, got {r}")
    if (lora_b.dtype, y.dtype) not in LORA_BATCHED_DTYPES:
        raise ValueError(
            f"adapters {lora_b.dtype} with output {y.dtype}: expected adapters in the output's dtype, or float32 "
            "adapters on a 16-bit output"
        )
    if scales.shape != (n,) or scales.dtype != torch.float32:
        raise ValueError(f"scales must be float32 [{n}], got {scales.dtype} {tuple(scales.shape)}")
    if bias is not None and (tuple(bias.shape) != (n, y.shape[1]) or bias.dtype != lora_b.dtype):
        raise ValueError(f"bias must be {lora_b.dtype} [{n}, {y.shape[1]}], got {bias.dtype} {tuple(bias.shape)}")
    if adapter_index.shape != (rows,) or adapter_index.is_floating_point():
        raise ValueError(f"adapter_index must be an integer [{rows}], got {adapter_index.dtype} "
                         f"{tuple(adapter_index.shape)}")  # fmt: skip
    if check_index and adapter_index.numel() and (int(adapter_index.min()) < -1 or int(adapter_index.max()) >= n):
        raise ValueError(f"adapter_index must lie in [-1, {n}), got [{int(adapter_index.min())}, "
                         f"{int(adapter_index.max())}]")  # fmt: skip
    if len({t.device for t in (y, lora_b, scales) + ((bias,) if bias is not None else ())}) != 1:
        raise ValueError("y, lora_b, scales and bias must share a device")
    if y.stride(1) != 1:
        raise ValueError("y must have unit-stride rows (it is updated in place)")


def lora_batched_delta_reference(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor,
    adapter_index: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Row ``m`` of ``y`` gains adapter ``i = adapter_index[m]``'s update, in place (``i = -1``: none)::

        u = x[m]·A[i]ᵀ                   (float32 sum, rounded to the adapters' dtype)
        y[m] += s[i]·(u·B[i]ᵀ + b[i])    (float32 sum, rounded once into y's dtype)

    ``lora_a [n, R, K]``, ``lora_b [n, N, R]`` (ranks zero-padded to R), ``scales [n]`` float32,
    ``bias [n, N]`` or None. Returns ``y``.
    """
    check_lora_batched_args(y, x, lora_a, lora_b, scales, adapter_index, bias)
    index = adapter_index.to(y.device)
    u = torch.zeros((x.shape[0], lora_a.shape[1]), dtype=torch.float32, device=y.device)
    for i in range(lora_a.shape[0]):
        rows = (index == i).nonzero().squeeze(1)
        u[rows] = (x[rows].to(lora_a.dtype).float() @ lora_a[i].float().t()).to(lora_a.dtype).float()
    return lora_batched_expand_reference(y, u, lora_b, scales, adapter_index, bias)


def lora_batched_expand_reference(
    y: torch.Tensor,
    u: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor,
    adapter_index: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The second half of ``lora_batched_delta_reference`` from given ``u [M, R]`` float32 (a LoRA embedding's
    gathered rows of A): ``y[m] += s[i]·(u[m]·B[i]ᵀ + b[i])``, u rounded to the adapters' dtype first."""
    check_lora_batched_out(y, u.shape[0], lora_b, scales, adapter_index, bias, (lora_b.shape[0], u.shape[1]))
    index = adapter_index.to(y.device)
    for i in range(lora_b.shape[0]):
        rows = (index == i).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        d = u[rows].to(lora_b.dtype).float() @ lora_b[i].float().t()
        if bias is not None:
            d = d + bias[i].float()
        y[rows] = (y[rows].float() + scales[i] * d).to(y.dtype)
    return y


# ----------------------------------------------------------------------------------------------
# cross-entropy and its logits gradient (kernels/cross_entropy.py)
# ----------------------------------------------------------------------------------------------


def check_cross_entropy_args(
    z: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, lse: torch.Tensor | None = None
) -> None:
    """Shapes, dtypes and devices of the ``cross_entropy`` launchers (``lse``: the slice gradient's).

    Raises:
        ValueError: a shape, dtype, device or layout out of its contract.
    """
    if z.dim() != 2 or z.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"z must be a [T, V] float32/float16/bfloat16 tensor, got {z.dtype} {tuple(z.shape)}")
    if z.shape[1] > 0 and z.stride(1) != 1:
        raise ValueError("z must have unit stride along the vocabulary (it is overwritten in place)")
    if labels.shape != z.shape[:1] or labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 [{z.shape[0]}], got {labels.dtype} {tuple(labels.shape)}")
    if scale.shape != z.shape[:1] or scale.dtype != torch.float32:
        raise ValueError(f"scale must be float32 [{z.shape[0]}], got {scale.dtype} {tuple(scale.shape)}")
    if lse is not None and (lse.shape != z.shape[:1] or lse.dtype != torch.float32):
        raise ValueError(f"lse must be float32 [{z.shape[0]}], got {lse.dtype} {tuple(lse.shape)}")
    if len({z.device, labels.device, scale.device} | ({lse.device} if lse is not None else set())) != 1:
        raise ValueError("z, labels, scale and lse must share a device")


def cross_entropy_grad_reference(z: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-token losses ``s·(logsumexp(z) − z[y])`` (float32 ``[T]``); ``z`` is overwritten in place by
    ``s·(softmax(z) − onehot(y))``, rounded into its dtype. ``labels`` must lie in ``[0, V)`` (a token without
    a loss has scale 0 and any valid label)."""
    check_cross_entropy_args(z, labels, scale)
    zf = z.float()
    lse = torch.logsumexp(zf, dim=1)
    loss = scale * (lse - zf.gather(1, labels.unsqueeze(1)).squeeze(1))
    p = (zf - lse.unsqueeze(1)).exp_()
    p.scatter_add_(1, labels.unsqueeze(1), torch.full((z.shape[0], 1), -1.0, device=z.device))
    z.copy_(p.mul_(scale.unsqueeze(1)))
    return loss


def cross_entropy_slice_stats_reference(
    z: torch.Tensor, labels: torch.Tensor, label_offset: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """For logits ``z [T, S]`` of vocabulary rows ``label_offset .. label_offset + S``: each token's
    log-sum-exp over the slice and its label's logit (0 when the label lies outside the slice), float32."""
    check_cross_entropy_args(z, labels, torch.empty(z.shape[0], device=z.device))
    zf = z.float()
    col = labels - label_offset
    inside = (col >= 0) & (col < z.shape[1])
    picked = torch.where(inside, zf.gather(1, col.clamp(0, max(z.shape[1] - 1, 0)).unsqueeze(1)).squeeze(1), 0.0)
    return torch.logsumexp(zf, dim=1), picked


def cross_entropy_slice_grad_reference(
    z: torch.Tensor, labels: torch.Tensor, label_offset: int, scale: torch.Tensor, lse: torch.Tensor
) -> None:
    """Overwrite a slice's logits ``z [T, S]`` with ``scale·(exp(z − lse) − onehot(labels − label_offset))``
    (``lse``: the whole row's log-sum-exp), rounded into z's dtype."""
    check_cross_entropy_args(z, labels, scale, lse)
    p = (z.float() - lse.unsqueeze(1)).exp_()
    col = labels - label_offset
    inside = (col >= 0) & (col < z.shape[1])
    p.scatter_add_(1, col.clamp(0, max(z.shape[1] - 1, 0)).unsqueeze(1), -inside.float().unsqueeze(1))
    z.copy_(p.mul_(scale.unsqueeze(1)))


# ----------------------------------------------------------------------------------------------
# DoRA row norms (fastpeft/ops/dora.py; no Triton kernel: a skinny pass over W and rank-sized terms)
# ----------------------------------------------------------------------------------------------

# Rows of W dequantized at a time by dora_weight_sq_reference: about 1 Mi float32 values per chunk.
DORA_CHUNK_ELEMENTS = 1 << 20


def dora_weight_sq_reference(
    weight: torch.Tensor | None, nf4: NF4Args | None, chunk_elements: int = DORA_CHUNK_ELEMENTS
) -> torch.Tensor:
    """``‖W_n‖²`` for every output row ``n`` of the frozen base ``W [N, K]`` (dense or NF4), float32 ``[N]``.

    Computed over chunks of whole rows (about ``chunk_elements`` weights each), so neither a float32 copy
    of a 16-bit ``W`` nor a dequantized NF4 ``W`` ever exists in full.
    """
    if (weight is None) == (nf4 is None):
        raise ValueError("pass exactly one of weight (a dense base) and nf4 (a quantized base)")
    n, k = weight.shape if nf4 is None else nf4.shape
    rows = max(1, chunk_elements // max(k, 1))
    device = weight.device if nf4 is None else nf4.packed.device
    out = torch.empty(n, dtype=torch.float32, device=device)
    if nf4 is not None:
        code = nf4_code(device) if nf4.quant_map is None else nf4.quant_map.to(device, torch.float32)
        absmax = nf4.absmax
        if absmax.dtype == torch.uint8:  # double quantization: decode the block scales once ([N·K / 64])
            qmap = dynamic_map(device) if nf4.nested_quant_map is None else nf4.nested_quant_map.to(device)
            nested = nf4.nested_absmax.repeat_interleave(nf4.nested_blocksize)[: absmax.numel()]
            absmax = qmap[absmax.long()] * nested + nf4.offset.reshape(()).float()
        byte = torch.arange(256, device=device)
        pairs = torch.stack([code[byte >> 4], code[byte & 0xF]], dim=1)
        packed = nf4.packed.reshape(-1)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        if nf4 is None:
            w = weight[r0:r1].float()
        else:  # elements [r0·K, r1·K) of the flat weight; an odd start sits in a byte's low nibble
            e0, e1 = r0 * k, r1 * k
            values = pairs.index_select(0, packed[e0 // 2 : (e1 + 1) // 2].int()).reshape(-1)
            values = values[e0 % 2 : e0 % 2 + (e1 - e0)]
            scale = absmax.float().index_select(0, torch.arange(e0, e1, device=device) // nf4.blocksize)
            w = (values * scale).view(r1 - r0, k)
        out[r0:r1] = w.square().sum(dim=1)
    return out


def dora_row_norm_reference(
    weight_sq: torch.Tensor, a_wt: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float
) -> torch.Tensor:
    """DoRA's ``‖W_n + s·B_n·A‖`` per output row from the low-rank terms, never forming ``W + s·B·A``::

        ‖W_n + s·B_n·A‖² = ‖W_n‖² + 2s·B_n·(A·W_nᵀ) + s²·B_n·(A·Aᵀ)·B_nᵀ

    Args:
        weight_sq: ``‖W_n‖²`` ``[N]`` (``dora_weight_sq_reference``).
        a_wt: ``A·Wᵀ`` ``[R, N]`` (one pass of the base over the rows of ``A``).
        lora_a: ``A [R, K]``. lora_b: ``B [N, R]``. scaling: ``s``.

    Returns:
        ``[N]`` in float32 (float64 for float64 inputs); the squared sum is clamped at 0 before the root, as
        rounding can take a row whose true norm is 0 slightly below it.
    """
    acc = torch.float64 if weight_sq.dtype == torch.float64 else torch.float32
    a, b = lora_a.to(acc), lora_b.to(acc)
    cross = (b * a_wt.to(acc).t()).sum(dim=1)  # B_n·(A·W_nᵀ)
    low = ((b @ (a @ a.t())) * b).sum(dim=1)  # B_n·(A·Aᵀ)·B_nᵀ = ‖B_n·A‖²
    sq = weight_sq.to(acc) + 2.0 * scaling * cross + scaling * scaling * low
    return sq.clamp_min(0.0).sqrt()
