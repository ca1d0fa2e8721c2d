"""LoRA on ``nn.Embedding`` and ``nn.Conv1d/2d/3d``: HF PEFT's layers, names and math, in plain torch.

``LoraEmbedding`` (``y = E[x] + s·(Aᵀ[x])·Bᵀ``): ``lora_embedding_A[name]`` ``[r, num_embeddings]`` and
``lora_embedding_B[name]`` ``[embedding_dim, r]`` (``nn.Parameter``s, file keys without ``.weight``).
Default init: A = 0, B ~ N(0, 1) (the LoRA paper's embedding init). No dropout, as in HF PEFT.

``LoraConv`` (``y = conv(x) + s·B(A(drop(x)))``): ``lora_A[name]`` is a conv of the base's kind, kernel,
stride, padding and dilation from ``in_channels`` to ``r``; ``lora_B[name]`` a 1×…×1 conv from ``r`` to
``out_channels`` with the base's ``groups`` (so ``r`` must be a multiple of ``groups``), bias with
``lora_bias``. A 1×1 convolution without stride or padding is a linear map over channels: it runs
``fastpeft.ops.lora.lora_linear``, the fused op. Other kernels run the two convolutions: the LoRA update is
``r`` channels wide, and a fused kernel would only save one small intermediate.
Merging needs ``delta W = s·B·A`` in the base weight's shape, which exists only for ``groups == 1``
(a grouped base cannot absorb the ungrouped ``A``): merging a grouped layer raises, as in HF PEFT.

``use_dora`` adds HF PEFT's DoRA to either layer (``lora_magnitude_vector[name]``, ``fastpeft.nn.lora_dora_layers``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastpeft.nn.lora_base import LoraLayerBase, check_lora_args
from fastpeft.nn.lora_dora_layers import (
    DoraLayerMixin,
    dora_conv_step,
    dora_embedding_step,
)
from fastpeft.nn.lora_mixed import embedding_batched_delta
from fastpeft.ops.lora import lora_linear

__all__ = ["LoraConv", "LoraEmbedding"]

_INIT_CHOICES = "True, False or 'gaussian'"


def _check_init(layer: str, init: object) -> None:
    gaussian = isinstance(init, str) and init.lower() == "gaussian"
    if not (init is True or init is False or gaussian):
        raise ValueError(f"init_lora_weights={init!r} is not supported for {layer} layers ({_INIT_CHOICES})")


class LoraEmbedding(DoraLayerMixin, LoraLayerBase):
    """LoRA on a frozen ``nn.Embedding`` (see module doc).

    Args:
        base_layer: the embedding (frozen here).
        r, lora_alpha, lora_dropout, use_rslora, adapter_name: as ``LoraLinear``; dropout is recorded
            but not applied (HF PEFT applies none to embeddings).
        init_lora_weights: True / "gaussian" (A = 0, B ~ N(0, 1)) or False (both N(0, 1)).
        use_dora: DoRA (``fastpeft.nn.lora_dora_layers``).
    """

    adapter_layer_names = ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    other_param_names = (*LoraLayerBase.other_param_names, "use_dora")

    def __init__(
        self,
        base_layer: nn.Embedding,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        adapter_name: str = "default",
        init_lora_weights: bool | str = True,
        lora_bias: bool = False,
        use_dora: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Embedding):
            raise TypeError(f"base_layer must be an nn.Embedding, got {type(base_layer).__name__}")
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self._init_dora()
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, lora_bias,
                          use_dora)  # fmt: skip

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        lora_bias: bool = False,
        use_dora: bool = False,
    ) -> None:
        """Add (or replace) adapter ``adapter_name`` (see ``LoraLinear.update_layer``).

        Raises:
            ValueError: bad arguments, an initialization embeddings do not have, or ``lora_bias`` (an
                embedding's LoRA has no ``lora_B`` module to hold a bias, as in HF PEFT).
        """
        check_lora_args(adapter_name, r, lora_alpha, lora_dropout)
        _check_init("embedding", init_lora_weights)
        self._check_dora(use_dora, lora_bias)
        if lora_bias:
            raise ValueError("lora_bias=True is not supported for Embedding layers (HF PEFT has none either)")
        weight = self.base_layer.weight
        a = torch.randn(r, self.in_features, device=weight.device, dtype=weight.dtype)
        b = torch.randn(self.out_features, r, device=weight.device, dtype=weight.dtype)
        if init_lora_weights is not False:
            a.zero_()
            b.normal_()  # drawn again, as HF PEFT does: one seed gives both libraries the same B
        self.lora_embedding_A[adapter_name] = nn.Parameter(a)
        self.lora_embedding_B[adapter_name] = nn.Parameter(b)
        self._record(adapter_name, r, lora_alpha, lora_dropout, use_rslora, False)
        self._add_magnitude(adapter_name, use_dora)

    def file_params(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """HF PEFT's file key suffixes -> the tensors saved for ``adapter_name``."""
        out = {
            "lora_embedding_A": self.lora_embedding_A[adapter_name],
            "lora_embedding_B": self.lora_embedding_B[adapter_name],
        }
        return self._magnitude_param(adapter_name, out)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s·(B·A)ᵀ`` ``[num_embeddings, embedding_dim]`` in float32."""
        a = self.lora_embedding_A[adapter_name].detach().float()
        b = self.lora_embedding_B[adapter_name].detach().float()
        return self.scaling[adapter_name] * (b @ a).T

    def _embed(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.embedding(x, table, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                           base.sparse)  # fmt: skip

    def _branch(self, x: torch.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor:
        a = self.lora_embedding_A[name].to(dtype)
        b = self.lora_embedding_B[name].to(dtype)
        return self._scale(name) * (self._embed(x, a.T) @ b.T)

    def forward(self, x: torch.Tensor, *args: object, adapter_names: Sequence[str] | None = None) -> torch.Tensor:
        """``x`` integer ids ``[...] -> [..., embedding_dim]``; ``adapter_names`` as ``LoraLinear.forward``."""
        y = self.base_layer(x)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
                y = self.base_layer(x)
            return y
        if adapter_names is not None:
            adapter_names = self._check_adapter_names(adapter_names, x.shape[0] if x.dim() > 1 else 1)
            self._refuse_mixed_dora(adapter_names)
            if embedding_batched_delta(self, x, y, adapter_names):
                return y
            for name in dict.fromkeys(adapter_names):
                if name != "__base__" and self._has(name):
                    rows = [i for i, n in enumerate(adapter_names) if n == name]
                    y[rows] += self._branch(x[rows], name, y.dtype)
            return y
        if self.merged:
            return y
        for name in self._present_active():
            if self.use_dora.get(name):
                y = dora_embedding_step(self, x, y, name)
            else:
                y = y + self._branch(x, name, y.dtype)
        return y


class LoraConv(DoraLayerMixin, LoraLayerBase):
    """LoRA on a frozen ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` (see module doc).

    Args:
        base_layer: the convolution (frozen here); ``r`` must be a multiple of its ``groups``.
        r, lora_alpha, lora_dropout, use_rslora, adapter_name, lora_bias: as ``LoraLinear``.
        init_lora_weights: True (A kaiming-uniform, B = 0), "gaussian" (A ~ N(0, 1/r²)) or False.
        use_dora: DoRA (``fastpeft.nn.lora_dora_layers``); not with ``lora_bias`` or ``groups > 1``.
    """

    adapter_layer_names = ("lora_A", "lora_B", "lora_magnitude_vector")
    other_param_names = (*LoraLayerBase.other_param_names, "use_dora")

    def __init__(
        self,
        base_layer: nn.Module,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        adapter_name: str = "default",
        init_lora_weights: bool | str = True,
        lora_bias: bool = False,
        use_dora: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            raise TypeError(f"base_layer must be an nn.Conv1d, Conv2d or Conv3d, got {type(base_layer).__name__}")
        if base_layer.padding_mode != "zeros":
            raise ValueError(f"LoRA on a convolution needs padding_mode='zeros', got {base_layer.padding_mode!r}")
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self._init_dora()
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, lora_bias,
                          use_dora)  # fmt: skip

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        lora_bias: bool = False,
        use_dora: bool = False,
    ) -> None:
        """Add (or replace) adapter ``adapter_name`` (see ``LoraLinear.update_layer``).

        Raises:
            ValueError: bad arguments, an initialization convolutions do not have, or ``r`` not a multiple of
                the base's ``groups``.
        """
        check_lora_args(adapter_name, r, lora_alpha, lora_dropout)
        _check_init("convolution", init_lora_weights)
        self._check_dora(use_dora, lora_bias)
        base = self.base_layer
        if r % base.groups:
            raise ValueError(
                f"Targeting a {type(base).__name__} with groups={base.groups} and rank {r}. Currently, support is "
                "limited to conv layers where the rank is divisible by groups. Either choose a different rank or do "
                "not target this specific layer."
            )
        kind, ones = type(base), (1,) * len(base.kernel_size)
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        lora_a = kind(self.in_features, r, base.kernel_size, base.stride, base.padding, base.dilation, bias=False,
                      **factory)  # fmt: skip
        lora_b = kind(r, self.out_features, ones, ones, groups=base.groups, bias=bool(lora_bias), **factory)
        if init_lora_weights is not False:
            with torch.no_grad():
                if init_lora_weights is True:
                    nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
                else:
                    nn.init.normal_(lora_a.weight, std=1 / r)
                nn.init.zeros_(lora_b.weight)
                if lora_b.bias is not None:
                    nn.init.zeros_(lora_b.bias)
        self.lora_A[adapter_name] = lora_a
        self.lora_B[adapter_name] = lora_b
        self._record(adapter_name, r, lora_alpha, lora_dropout, use_rslora, lora_bias)
        self._add_magnitude(adapter_name, use_dora)

    def file_params(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """HF PEFT's file key suffixes -> the tensors saved for ``adapter_name``."""
        out = {"lora_A.weight": self.lora_A[adapter_name].weight, "lora_B.weight": self.lora_B[adapter_name].weight}
        if self.lora_B[adapter_name].bias is not None:
            out["lora_B.bias"] = self.lora_B[adapter_name].bias
        return self._magnitude_param(adapter_name, out)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s·B·A`` in the base weight's shape ``[out, in, *kernel]``, float32 (``groups == 1`` only).

        Raises:
            ValueError: a grouped base (its weight cannot hold the ungrouped ``A``).
        """
        if self.base_layer.groups > 1:
            raise ValueError("merging LoRA into a convolution with groups > 1 is not possible (HF PEFT refuses too)")
        a = self.lora_A[adapter_name].weight.detach().float()
        b = self.lora_B[adapter_name].weight.detach().float().flatten(1)
        return self.scaling[adapter_name] * torch.einsum("or,ri...->oi...", b, a)

    def _is_pointwise(self) -> bool:
        base = self.base_layer
        return (
            all(k == 1 for k in base.kernel_size)
            and all(s == 1 for s in base.stride)
            and base.groups == 1
            and (isinstance(base.padding, str) or all(p == 0 for p in base.padding))
        )

    def _branch(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """``s·B(A(drop(x)))`` in ``x``'s dtype."""
        a, b = self.lora_A[name], self.lora_B[name]
        dtype = x.dtype
        h = a._conv_forward(self.lora_dropout[name](x), a.weight.to(dtype), None)
        bias = b.bias.to(dtype) if b.bias is not None else None
        return self._scale(name) * b._conv_forward(h, b.weight.to(dtype), bias)

    def forward(self, x: torch.Tensor, *args: object, adapter_names: Sequence[str] | None = None) -> torch.Tensor:
        """``x [N, C_in, *spatial] -> [N, C_out, *spatial']``; ``adapter_names`` as ``LoraLinear.forward``."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x)
        if adapter_names is not None:
            batched = x.dim() == self.base_layer.weight.dim()  # [N, C, *spatial]; an unbatched input is one row
            adapter_names = self._check_adapter_names(adapter_names, x.shape[0] if batched else 1)
            self._refuse_mixed_dora(adapter_names)
            y = self.base_layer(x)
            for name in dict.fromkeys(adapter_names):
                if name != "__base__" and self._has(name):
                    rows = [i for i, n in enumerate(adapter_names) if n == name]
                    y[rows] += self._branch(x[rows].to(self.lora_A[name].weight.dtype), name).to(y.dtype)
            return y
        names = self._present_active()
        if self.merged or not names:
            return self.base_layer(x)
        if self._is_pointwise() and not self.use_dora.get(names[0]):
            dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
            y, rest = self._pointwise(x.to(dtype), names[0]), names[1:]
        else:
            y, rest = self.base_layer(x), names
        for name in rest:
            xa = x.to(self.lora_A[name].weight.dtype)
            if self.use_dora.get(name):
                y = dora_conv_step(self, xa, y, name)
            else:
                y = y + self._branch(xa, name).to(y.dtype)
        return y

    def _pointwise(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """A 1×1 convolution as the fused linear over the channel axis (channels moved last and back)."""
        base, a, b = self.base_layer, self.lora_A[name], self.lora_B[name]
        dropout = self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
        dtype = x.dtype
        bias = base.bias.to(dtype) if base.bias is not None else None
        scaling, b_weight = self._scale(name), b.weight.flatten(1).to(dtype)
        op_scaling = scaling
        if isinstance(scaling, torch.Tensor):  # torch.compile: s·B is formed in the graph, the op scales by 1
            op_scaling, b_weight = 1.0, b_weight * scaling
        y = lora_linear(
            x.movedim(1, -1), base.weight.flatten(1).to(dtype), bias, a.weight.flatten(1).to(dtype), b_weight,
            op_scaling, dropout_p=p, training=self.training,
        ).movedim(-1, 1)  # fmt: skip
        if b.bias is not None:
            y = y + scaling * b.bias.to(dtype).view(-1, *([1] * (y.dim() - 2)))
        return y
