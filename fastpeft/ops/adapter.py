"""Bottleneck adapter op: ``y = r + s·(act(h·W_downᵀ + b_down)·W_upᵀ + b_up)`` with autograd.

Two ``torch.library`` custom ops (``fastpeft::bottleneck_adapter_fwd`` / ``_bwd``), each with a fake
implementation so ``torch.compile`` traces them, and ``register_autograd`` tying them together. Each
runs the Triton launcher (``fastpeft.kernels.adapter``) or its reference (``kernels/reference.py``),
as ``fastpeft.ops._dispatch.use_triton`` decides; a bottleneck wider than ``MAX_FUSED_BOTTLENECK``
(256) runs the reference ops on any device, unfused.

Backward (``dz = s·(dY·W_up) ⊙ act'(z)`` from the saved float32 pre-activation ``z``)::

    dh = dz·W_down (+ dY when r = h),   d_residual = dY
    dW_down = dzᵀ·h,  db_down = Σ_m dz,  dW_up = s·dYᵀ·act(z),  db_up = s·Σ_m dY
"""

from __future__ import annotations

import torch

from fastpeft.kernels import reference
from fastpeft.ops._checks import check_floating
from fastpeft.ops._dispatch import use_triton

__all__ = ["ACTIVATION_ALIASES", "bottleneck_adapter", "canonical_activation"]

ACTIVATION_ALIASES: dict[str, str] = {
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
}
"""AdapterHub / transformers activation names -> the kernels' names (``gelu`` is the exact erf form)."""


def canonical_activation(name: str) -> str:
    """The kernels' name for an activation spelling; ValueError listing the choices otherwise."""
    if not isinstance(name, str) or name.lower() not in ACTIVATION_ALIASES:
        raise ValueError(f"unknown adapter activation {name!r}; choose one of {sorted(ACTIVATION_ALIASES)}")
    return ACTIVATION_ALIASES[name.lower()]


MAX_FUSED_BOTTLENECK = 256
"""Widest bottleneck the fused kernels keep on chip; wider adapters run the unfused reference ops."""


def _triton_path(h: torch.Tensor, w_down: torch.Tensor) -> bool:
    # float64 (gradcheck) always takes the reference: the kernels are float32/16-bit only
    fits = w_down.shape[0] <= MAX_FUSED_BOTTLENECK
    return fits and h.dtype != torch.float64 and use_triton(h)


@torch.library.custom_op("fastpeft::bottleneck_adapter_fwd", mutates_args=())
def _adapter_fwd(
    h: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor,
    residual: torch.Tensor | None,
    scaling: float,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    if _triton_path(h, w_down):
        from fastpeft.kernels.adapter import adapter_fwd as launch
    else:
        launch = reference.adapter_fwd_reference
    return launch(h, w_down, b_down, w_up, b_up, scaling, activation, residual, save_z=True)


@_adapter_fwd.register_fake
def _(h, w_down, b_down, w_up, b_up, residual, scaling, activation):
    z_dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    return torch.empty_like(h, memory_format=torch.contiguous_format), h.new_empty(
        (h.shape[0], w_down.shape[0]), dtype=z_dtype
    )


@torch.library.custom_op("fastpeft::bottleneck_adapter_bwd", mutates_args=())
def _adapter_bwd(
    dy: torch.Tensor,
    h: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor,
    z: torch.Tensor,
    scaling: float,
    activation: str,
    residual_is_separate: bool,
    needs_dh: bool,
    needs_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # gradients not asked for come back as empty tensors: custom ops cannot return None
    if _triton_path(h, w_down):
        from fastpeft.kernels.adapter import adapter_bwd as launch
    else:
        launch = reference.adapter_bwd_reference
    grads = launch(
        dy, h, w_down, w_up, z, scaling, activation,
        residual_is_separate=residual_is_separate, needs_dh=needs_dh, needs_dw=needs_dw,
    )  # fmt: skip
    return tuple(h.new_empty(0) if g is None else g for g in grads)


@_adapter_bwd.register_fake
def _(dy, h, w_down, w_up, z, scaling, activation, residual_is_separate, needs_dh, needs_dw):
    def maybe(flag: bool, shape: tuple[int, ...]) -> torch.Tensor:
        return h.new_empty(shape if flag else (0,))

    m, hidden = h.shape
    b = w_down.shape[0]
    return (
        maybe(needs_dh, (m, hidden)),
        maybe(needs_dw, (b, hidden)),
        maybe(needs_dw, (b,)),
        maybe(needs_dw, (hidden, b)),
        maybe(needs_dw, (hidden,)),
    )


def _setup_context(ctx, inputs, output) -> None:
    h, w_down, _b_down, w_up, _b_up, residual, scaling, activation = inputs
    _y, z = output
    ctx.mark_non_differentiable(z)
    ctx.save_for_backward(h, w_down, w_up, z)
    ctx.scaling, ctx.activation, ctx.separate = scaling, activation, residual is not None


def _backward(ctx, dy, _dz):
    h, w_down, w_up, z = ctx.saved_tensors
    need = ctx.needs_input_grad
    needs_dh, needs_dw = bool(need[0]), any(need[1:5])
    if dy is None or not (needs_dh or needs_dw or need[5]):
        return None, None, None, None, None, None, None, None
    dh = dwd = dbd = dwu = dbu = None
    if needs_dh or needs_dw:
        dh, dwd, dbd, dwu, dbu = _adapter_bwd(
            dy, h, w_down, w_up, z, ctx.scaling, ctx.activation, ctx.separate, needs_dh, needs_dw
        )
    d_residual = dy if (ctx.separate and need[5]) else None
    return (
        dh if needs_dh else None,
        dwd if need[1] else None,
        dbd if need[2] else None,
        dwu if need[3] else None,
        dbu if need[4] else None,
        d_residual,
        None,
        None,
    )


_adapter_fwd.register_autograd(_backward, setup_context=_setup_context)


def bottleneck_adapter(
    h: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor,
    scaling: float,
    activation: str,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(residual or h) + s·(act(h·W_downᵀ + b_down)·W_upᵀ + b_up)``, differentiable in every tensor.

    Args:
        h: ``[..., H]``. w_down: ``[b, H]``. b_down: ``[b]``. w_up: ``[H, b]``. b_up: ``[H]``, all in h's
            dtype. scaling: ``s``. activation: any spelling in ``ACTIVATION_ALIASES``.
        residual: ``[..., H]`` like h, or None (the adapter's own input is the residual).

    Returns:
        ``[..., H]`` in h's dtype.

    Raises:
        TypeError: an operand that is not a floating tensor.
    """
    check_floating(h=h, w_down=w_down, b_down=b_down, w_up=w_up, b_up=b_up, residual=residual)
    act = canonical_activation(activation)
    hidden = h.shape[-1]
    # flattening the leading dims copies only when h is not viewable as [M, H]
    h2 = h.reshape(-1, hidden)
    r2 = None
    if residual is not None:
        if residual.shape != h.shape:
            raise ValueError(f"residual must have h's shape {tuple(h.shape)}, got {tuple(residual.shape)}")
        r2 = residual.reshape(-1, hidden)
    if h2.shape[0] == 0:  # no tokens: nothing for the kernels to do, and the output is the residual
        return (h if residual is None else residual).clone()
    y, _ = _adapter_fwd(h2, w_down, b_down, w_up, b_up, r2, float(scaling), act)
    return y.view(h.shape)
