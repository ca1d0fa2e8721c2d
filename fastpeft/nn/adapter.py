"""``BottleneckAdapter``: a trainable bottleneck inside a frozen transformer block (Houlsby et al., 2019).

``forward(h, residual=None) = (h if residual is None else residual) + s·up(act(down(h)))`` through the
fused ``fastpeft::bottleneck_adapter_fwd`` op. ``up`` starts at zero, so a new adapter is the identity
and training starts from the base model's function. Sequential placements (Houlsby, Pfeiffer) call it
with the sublayer output only; the parallel placement passes the sublayer's input as ``h`` and its
output as ``residual``.
"""

from __future__ import annotations

import torch
from torch import nn

from fastpeft.nn.checks import check_input, is_finite_number
from fastpeft.ops.adapter import ACTIVATION_ALIASES, bottleneck_adapter, canonical_activation

__all__ = ["AdapterFusion", "BottleneckAdapter"]


class BottleneckAdapter(nn.Module):
    """Down-projection, activation, up-projection and a residual add in one fused op.

    Args:
        hidden_size: ``H``, the width of the hidden states.
        bottleneck_size: ``b``; up to 256 runs the fused GPU kernel, wider runs unfused torch ops.
        non_linearity: ``relu``, ``silu`` / ``swish``, ``gelu`` (exact erf) or ``gelu_new`` (tanh
            approximation; ``gelu_tanh`` and ``gelu_pytorch_tanh`` are accepted too).
        scaling: ``s``, the adapter output's multiplier.

    Submodules ``down = nn.Linear(H, b)`` and ``up = nn.Linear(b, H)`` (weights ``[b, H]`` and ``[H, b]``).
    Their parameters are cast to h's dtype in the forward (the cast is differentiable), so float32 master
    weights serve bfloat16 activations.
    """

    def __init__(
        self, hidden_size: int, bottleneck_size: int, non_linearity: str = "relu", scaling: float = 1.0
    ) -> None:
        super().__init__()
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        if not isinstance(bottleneck_size, int) or bottleneck_size < 1:
            raise ValueError(f"bottleneck_size must be a positive int, got {bottleneck_size!r}")
        if not is_finite_number(scaling):
            raise ValueError(f"scaling must be a finite number, got {scaling!r}")
        if not isinstance(non_linearity, str) or non_linearity not in ACTIVATION_ALIASES:
            raise ValueError(f"non_linearity must be one of {sorted(ACTIVATION_ALIASES)}, got {non_linearity!r}")
        self.hidden_size = hidden_size
        self.bottleneck_size = bottleneck_size
        self.non_linearity = non_linearity
        self.activation = canonical_activation(non_linearity)
        self.scaling = float(scaling)
        self.down = nn.Linear(hidden_size, bottleneck_size)
        self.up = nn.Linear(bottleneck_size, hidden_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``down`` keeps nn.Linear's init; ``up`` is zeroed so the adapter starts as the identity."""
        self.down.reset_parameters()
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None = None, weight: float = 1.0) -> torch.Tensor:
        """``(residual or h) + weight·s·up(act(down(h)))``.

        Args:
            h: ``[..., H]`` hidden states fed to the adapter.
            residual: ``[..., H]`` added to the adapter output instead of h (parallel placement).
            weight: a multiplier on top of ``scaling`` (``Average`` passes each adapter's weight).

        Returns:
            ``[..., H]`` in h's dtype.

        Raises:
            TypeError: ``h`` is not a floating tensor.
        """
        check_input(h)
        if h.shape[-1] != self.hidden_size:
            raise ValueError(f"h's last dim must be hidden_size={self.hidden_size}, got shape {tuple(h.shape)}")
        dt = h.dtype
        return bottleneck_adapter(
            h,
            self.down.weight.to(dt),
            self.down.bias.to(dt),
            self.up.weight.to(dt),
            self.up.bias.to(dt),
            self.scaling if weight == 1.0 else self.scaling * float(weight),
            self.activation,
            residual,
        )

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        """``s·up(act(down(h)))`` alone (what ``AdapterFusion`` attends over)."""
        return self(h, residual=torch.zeros_like(h))

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, bottleneck_size={self.bottleneck_size}, "
            f"non_linearity={self.non_linearity!r}, scaling={self.scaling}"
        )


class AdapterFusion(nn.Module):
    """AdapterFusion (Pfeiffer et al., 2021): attention over several adapters' outputs at one layer.

    With the layer's adapter input ``h`` ``[..., H]`` as the query and the adapters' deltas ``δ₁ … δₙ``
    (``δᵢ = Aᵢ(h) - residual``) as keys and values::

        q = query(h),  kᵢ = key(δᵢ),  vᵢ = value(δᵢ),  pᵢ = softmax over i of (q·kᵢ),  out = Σ pᵢ·vᵢ

    ``query`` and ``key`` start as ``N(0, 0.02)`` weights with zero biases, ``value`` as the identity, so a new
    fusion returns a softmax-weighted mix of the deltas. Weights are cast to h's dtype in the forward, like
    ``BottleneckAdapter``'s.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        self.hidden_size = hidden_size
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.query, self.key):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        with torch.no_grad():
            self.value.weight.copy_(torch.eye(self.hidden_size))
        nn.init.zeros_(self.value.bias)

    def forward(self, h: torch.Tensor, deltas: list[torch.Tensor]) -> torch.Tensor:
        """``Σ pᵢ·value(δᵢ)`` ``[..., H]`` for query input ``h`` and deltas ``δᵢ`` (each shaped like h)."""
        dt = h.dtype

        def lin(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.linear(x, layer.weight.to(dt), layer.bias.to(dt))

        d = torch.stack(deltas, dim=-2)  # [..., n, H]
        q = lin(self.query, h).unsqueeze(-1)  # [..., H, 1]
        scores = (lin(self.key, d) @ q).squeeze(-1)  # [..., n]
        probs = torch.softmax(scores.float(), dim=-1).to(dt)
        return (probs.unsqueeze(-2) @ lin(self.value, d)).squeeze(-2)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}"
