"""``LoraMultiheadAttention``: LoRA on ``nn.MultiheadAttention``'s fused input projection and its output projection.

``nn.MultiheadAttention`` never calls its projections as modules: ``F.multi_head_attention_forward`` reads
``in_proj_weight`` ``[3E, E]`` and ``out_proj.weight`` ``[E, E]`` directly. So the wrapper runs the
attention with both replaced by ``W + Σ s·B·A`` of the active adapters (``torch.func.functional_call``:
nothing is patched, gradients reach A and B through the sums). Layout as HF PEFT, so files interoperate:
the input projection's ``lora_A [r, E]`` / ``lora_B [3E, r]`` sit on this wrapper, the output projection is
a ``LoraLinear`` at ``base_layer.out_proj`` (keys ``<path>.base_layer.out_proj.lora_A.weight``, ...).

HF PEFT 0.21 adds the output projection's delta twice when it merges (its forward merges, so its outputs
carry ``W_o + 2·s·B·A``; huggingface/peft#3774); fastpeft computes ``W_o + s·B·A``, so the two libraries
agree on files but not on MHA outputs until that fix ships.

Refused, as in HF PEFT: separate q / k / v projection weights (``kdim`` / ``vdim`` differing from
``embed_dim``), ``lora_dropout`` (the input cannot be factored out of a merged weight) and ``lora_bias``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from fastpeft.nn.lora import LoraLinear
from fastpeft.nn.lora_base import LoraLayerBase, check_lora_args

__all__ = ["LoraMultiheadAttention"]


class LoraMultiheadAttention(LoraLayerBase):
    """LoRA on a frozen ``nn.MultiheadAttention`` (see module doc); other attributes read through to it."""

    def __init__(
        self,
        base_layer: nn.MultiheadAttention,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        adapter_name: str = "default",
        init_lora_weights: bool | str = True,
        lora_bias: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.MultiheadAttention):
            raise TypeError(f"base_layer must be an nn.MultiheadAttention, got {type(base_layer).__name__}")
        if not base_layer._qkv_same_embed_dim:
            raise ValueError(
                "Only same embed for query/key/value is supported as of now for MultiheadAttention "
                "(kdim == vdim == embed_dim: one fused in_proj_weight)"
            )
        self.in_features, self.out_features = base_layer.embed_dim, 3 * base_layer.embed_dim
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self._init_tables()
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, lora_bias)

    def __getattr__(self, name: str) -> Any:
        # Model code reads embed_dim, num_heads, batch_first, in_proj_weight, ... off the attention module.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self._modules["base_layer"], name)

    @property
    def out_proj(self) -> nn.Module:
        """The attention's own output projection (its LoRA lives in a ``LoraLinear`` around it)."""
        out = self.base_layer.out_proj
        return out.get_base_layer() if isinstance(out, LoraLinear) else out

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        lora_bias: bool = False,
    ) -> None:
        """Add (or replace) adapter ``adapter_name`` on the input and the output projection.

        Raises:
            ValueError: bad arguments, ``lora_dropout`` > 0, ``lora_bias``, or an initialization other than
                True / False / "gaussian".
        """
        check_lora_args(adapter_name, r, lora_alpha, lora_dropout)
        if lora_dropout:
            raise ValueError(
                "lora_dropout is not supported for nn.MultiheadAttention (its weights are merged per call)"
            )
        if lora_bias:
            raise ValueError("lora_bias=True is not supported for nn.MultiheadAttention")
        gaussian = isinstance(init_lora_weights, str) and init_lora_weights.lower() == "gaussian"
        if not (init_lora_weights is True or init_lora_weights is False or gaussian):
            raise ValueError(f"init_lora_weights={init_lora_weights!r} is not supported for nn.MultiheadAttention")
        w = self.base_layer.in_proj_weight
        lora_a = nn.Linear(self.in_features, r, bias=False, device=w.device, dtype=w.dtype)
        lora_b = nn.Linear(r, self.out_features, bias=False, device=w.device, dtype=w.dtype)
        if init_lora_weights is not False:
            with torch.no_grad():
                if init_lora_weights is True:
                    nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
                else:
                    nn.init.normal_(lora_a.weight, std=1 / r)
                nn.init.zeros_(lora_b.weight)
        self.lora_A[adapter_name] = lora_a
        self.lora_B[adapter_name] = lora_b
        out_proj = self.base_layer.out_proj
        kwargs = dict(r=r, lora_alpha=lora_alpha, use_rslora=use_rslora, init_lora_weights=init_lora_weights)
        if isinstance(out_proj, LoraLinear):
            out_proj.update_layer(adapter_name, **kwargs)
        else:
            self.base_layer.out_proj = LoraLinear(out_proj, adapter_name=adapter_name, **kwargs)
        self._record(adapter_name, r, lora_alpha, 0.0, use_rslora, False)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s·B·A`` ``[3E, E]`` for the input projection, float32."""
        a = self.lora_A[adapter_name].weight.detach().float()
        b = self.lora_B[adapter_name].weight.detach().float()
        return self.scaling[adapter_name] * (b @ a)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Merge into ``in_proj_weight`` (the output projection's ``LoraLinear`` merges itself).

        Raises:
            ValueError: an unknown name, or (``safe_merge``) a non-finite merged weight (nothing changed).
        """
        w = self.base_layer.in_proj_weight
        names = self._merge_names(adapter_names)
        merged = w.float()
        for name in names:
            merged = merged + self.get_delta_weight(name).to(w.device)
        if safe_merge and not bool(torch.isfinite(merged).all()):
            raise ValueError(f"merging adapters {names!r} gives non-finite weights; the base was left as it was")
        w.copy_(merged)
        self.merged_adapters.extend(names)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo every merge into ``in_proj_weight``."""
        w = self.base_layer.in_proj_weight
        while self.merged_adapters:
            w.copy_(w.float() - self.get_delta_weight(self.merged_adapters.pop()).to(w.device))

    def forward(self, query: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """``nn.MultiheadAttention.forward`` with the adapted projection weights."""
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("adapter_names (mixed-adapter batches) is not supported for nn.MultiheadAttention")
        base, out_proj = self.base_layer, self.base_layer.out_proj
        # The attention never calls out_proj as a module: its adapter state is handled here.
        for layer in (self, out_proj):
            if layer.disable_adapters and layer.merged:
                layer.unmerge()
        weights = {}
        names = [] if self.disable_adapters or self.merged else self._present_active()
        if names:
            w = base.in_proj_weight
            weights["in_proj_weight"] = w + sum(self._delta(n, w.dtype) for n in names)
        out_names = [] if out_proj.disable_adapters or out_proj.merged else out_proj._present_active()
        if out_names:
            w = out_proj.base_layer.weight
            weights["out_proj.base_layer.weight"] = w + sum(_linear_delta(out_proj, n, w.dtype) for n in out_names)
        if not weights:
            return base(query, *args, **kwargs)
        return functional_call(base, weights, (query, *args), kwargs)

    def _delta(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        a, b = self.lora_A[name].weight.to(dtype), self.lora_B[name].weight.to(dtype)
        return self._scale(name) * (b @ a)

    def unwrap(self) -> nn.Module:
        """The attention module, its output projection a plain linear layer again."""
        if isinstance(self.base_layer.out_proj, LoraLinear):
            self.base_layer.out_proj = self.base_layer.out_proj.get_base_layer()
        return self.base_layer


def _linear_delta(layer: LoraLinear, name: str, dtype: torch.dtype) -> torch.Tensor:
    a, b = layer.lora_A[name].weight.to(dtype), layer.lora_B[name].weight.to(dtype)
    return layer._scale(name) * (b @ a)
