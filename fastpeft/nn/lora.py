"""``LoraLinear``: LoRA on a frozen ``nn.Linear`` or ``NF4Linear`` (QLoRA), backed by the fused op.

In-memory names and semantics follow HF PEFT's LoRA layer so checkpoints interoperate: ``base_layer``,
``lora_A[name]`` (``nn.Linear(in, r)``, weight ``[r, in]``), ``lora_B[name]`` (``nn.Linear(r, out)``,
weight ``[out, r]``, plus a bias with ``lora_bias``), ``lora_dropout[name]``, and the dicts ``r``,
``lora_alpha``, ``scaling``; with DoRA (``use_dora``) ``lora_magnitude_vector[name].weight [out]``
(``fastpeft.nn.lora_dora``). Adapter bookkeeping (several active adapters, merging) is ``LoraLayerBase``'s.

Adapter weights may be in another dtype than the base (float32 adapters on a 16-bit base, HF PEFT's
``autocast_adapter_dtype``): the fused op runs in the input's (or autocast's) dtype with float32
accumulation, and the adapters' gradients come back in their own dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastpeft.nn.checks import check_input
from fastpeft.nn.lora_base import LoraLayerBase, check_lora_args
from fastpeft.nn.lora_dora import dora_base_operands, dora_branch, dora_factor, dora_forward, dora_magnitude
from fastpeft.nn.lora_init import init_from_weight, is_weight_init
from fastpeft.nn.lora_mixed import batched_delta
from fastpeft.nn.nf4_linear import NF4Linear
from fastpeft.ops.lora import lora_linear
from fastpeft.quant import quantize_nf4

__all__ = ["LoraLinear"]


class LoraLinear(LoraLayerBase):
    """``y = base(x) + Σ s·B·A·drop(x)`` over the active adapters; the first one runs in the fused op.

    Args:
        base_layer: the frozen base, ``nn.Linear`` or ``NF4Linear``; its parameters are frozen here.
        r: rank. lora_alpha: alpha; ``scaling = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
        lora_dropout: dropout probability on the LoRA branch's input.
        adapter_name: name of the first adapter (it becomes the active one).
        init_lora_weights: True (A kaiming-uniform, B zeros: the layer starts as the base), "gaussian"
            (A normal with std 1/r, B zeros), False (A and B keep ``nn.Linear``'s random init), or one of
            ``fastpeft.nn.lora_init``'s (``"pissa"``, ``"pissa_niter_K"``, ``"olora"``, ``"orthogonal"``),
            which rewrite the base weight (an NF4 base is dequantized, corrected and quantized again).
        lora_bias: ``lora_B`` gets a bias (zero-initialized), added as ``s·b``.
        use_dora: DoRA: a trained magnitude per output row rescales ``W + s·B·A`` to norm ``m``
            (``fastpeft.nn.lora_dora``); not with ``lora_bias``.

    Attributes:
        disable_adapters: True runs the base alone (an adapter merged into the base is unmerged first).
        merged_adapters: names merged into the base, in merge order.
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
        if not isinstance(base_layer, NF4Linear | nn.Linear):
            raise TypeError(f"base_layer must be an nn.Linear or an NF4Linear, got {type(base_layer).__name__}")
        if isinstance(base_layer, nn.Linear) and not base_layer.weight.is_floating_point():
            # bitsandbytes' Linear4bit / Linear8bitLt subclass nn.Linear but hold integer codes
            raise TypeError(
                f"base_layer {type(base_layer).__name__} holds a {base_layer.weight.dtype} weight; wrap a "
                "bitsandbytes 4-bit layer as NF4Linear.from_bnb(layer) first"
            )
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self._init_tables()
        self.use_dora: dict[str, bool] = {}
        # DoRA's factors f = m / ‖W + s·B·A‖ of merged adapters, which unmerge divides out again.
        self.__dict__["_dora_factors"] = {}
        # The NF4 base a merge replaced by a dense layer; a plain attribute so it is neither in the
        # state dict nor counted twice, and unmerge() restores it.
        self.__dict__["_unmerged_nf4"] = None
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, lora_bias,
                          use_dora)  # fmt: skip

    # -- adapters -------------------------------------------------------------------------------

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
        """Add (or replace) adapter ``adapter_name``; the first adapter added becomes the active one.

        Only active adapters' weights require grad: a new non-active adapter starts frozen.

        Raises:
            ValueError: ``r`` not a positive int, ``lora_alpha`` not finite, ``lora_dropout`` outside [0, 1),
                unknown ``init_lora_weights``, a bad ``adapter_name`` (``check_adapter_name``), or an
                initialization the weight's shape does not allow (the layer is left as it was); ``use_dora``
                with ``lora_bias``.
        """
        check_lora_args(adapter_name, r, lora_alpha, lora_dropout)
        if not isinstance(use_dora, bool):
            raise TypeError(f"use_dora must be a bool, got {use_dora!r}")
        if use_dora and lora_bias:
            raise ValueError("lora_bias=True is not supported for DoRA (HF PEFT refuses it too); pass use_dora=False")
        gaussian = isinstance(init_lora_weights, str) and init_lora_weights.lower() == "gaussian"
        from_weight = is_weight_init(init_lora_weights)
        if not (init_lora_weights is True or init_lora_weights is False or gaussian or from_weight):
            raise ValueError(
                "init_lora_weights must be True, False, 'gaussian', 'pissa', 'pissa_niter_<K>', 'olora' or "
                f"'orthogonal', got {init_lora_weights!r}"
            )
        device, dtype = self._adapter_device_dtype()
        lora_a = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        lora_b = nn.Linear(r, self.out_features, bias=bool(lora_bias), device=device, dtype=dtype)
        scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        residual = None
        with torch.no_grad():
            if from_weight:
                a, b, residual = init_from_weight(init_lora_weights, self._base_weight_f32(), r, scaling)
                lora_a.weight.copy_(a)
                lora_b.weight.copy_(b)
            elif init_lora_weights is not False:
                if init_lora_weights is True:
                    # nn.Linear's own init for A, as the LoRA paper's code does; B = 0 so the layer starts as the base.
                    nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
                else:
                    nn.init.normal_(lora_a.weight, std=1 / r)
                nn.init.zeros_(lora_b.weight)
            if lora_b.bias is not None and init_lora_weights is not False:
                nn.init.zeros_(lora_b.bias)
        if residual is not None:
            self._set_base_weight(residual)
        self.lora_A[adapter_name] = lora_a
        self.lora_B[adapter_name] = lora_b
        self.use_dora[adapter_name] = use_dora
        if use_dora:  # after any weight-based init rewrote the base: m starts as the norms of the new W + s·B·A
            self.lora_magnitude_vector[adapter_name] = dora_magnitude(self, lora_a.weight, lora_b.weight, scaling,
                                                                      dtype)  # fmt: skip
        elif adapter_name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[adapter_name]
        self._record(adapter_name, r, lora_alpha, lora_dropout, use_rslora, lora_bias)

    def _adapter_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        """Adapters live on the base's device, in its float dtype (float32 for a quantized base, as PEFT)."""
        base = self.get_base_layer()
        if isinstance(base, NF4Linear):
            return base.packed.device, torch.float32
        return base.weight.device, base.weight.dtype

    def _base_weight_f32(self) -> torch.Tensor:
        """The base weight ``[out, in]`` in float32 (an NF4 base dequantized: one layer's worth, freed after use)."""
        base = self.get_base_layer()
        return base.dequantize(torch.float32) if isinstance(base, NF4Linear) else base.weight.detach().float()

    @torch.no_grad()
    def _set_base_weight(self, weight: torch.Tensor) -> None:
        """Replace the base weight by ``weight`` (float32 ``[out, in]``): rounded into a dense base's dtype,
        or quantized again with an NF4 base's blocksize and double quantization."""
        base = self.get_base_layer()
        if isinstance(base, NF4Linear):
            w = quantize_nf4(weight.to(base.weight_nf4.dtype), blocksize=base.blocksize,
                             double_quant=base.nested_absmax is not None)  # fmt: skip
            base._set_weight(w)
        else:
            base.weight.copy_(weight)

    # -- merging --------------------------------------------------------------------------------

    def get_base_layer(self) -> nn.Module:
        """The base layer forward runs (a dense ``nn.Linear`` while an NF4 base is merged)."""
        return self.base_layer

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s·B·A`` ``[out, in]`` in float32."""
        a = self.lora_A[adapter_name].weight.detach().float()
        b = self.lora_B[adapter_name].weight.detach().float()
        return self.scaling[adapter_name] * (b @ a)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        """Add ``s·B·A`` (and ``s·b``) of each adapter (default: the active ones) into the base weight.

        A dense base is updated in place (the sum is formed in float32 and rounded once). An NF4 base is
        replaced by a dense ``nn.Linear`` in the weight's original dtype (16-bit in practice) holding
        ``dequant(W) + s·B·A``; it is never re-quantized, and ``unmerge`` restores the NF4 layer.

        Raises:
            ValueError: an unknown adapter name, or (``safe_merge``) a merged weight that is not finite.
        """
        base = self.base_layer
        dora = adapter_names is None and any(self.use_dora.get(n) for n in self._present_active())
        dora = dora or adapter_names is not None and any(self.use_dora.get(n) for n in adapter_names)
        if not isinstance(base, NF4Linear) and not dora:
            super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
            return
        names = self._merge_names(adapter_names)
        if not names:
            return
        if dora and self.merged:  # DoRA's norms are those of the unmerged base (HF PEFT's rule): merge all again
            names = [*self.merged_adapters, *names]
            self.unmerge()
            base = self.base_layer
        merged = base.dequantize(torch.float32) if isinstance(base, NF4Linear) else base.weight.detach().float()
        bias = base.bias.detach().float() if base.bias is not None else None
        factors = {}
        for name in names:
            merged = merged + self.get_delta_weight(name).to(merged.device)
            if self.use_dora.get(name):  # f ⊙ (W + s·B·A), f from the base before this merge wrote anything
                factors[name] = dora_factor(self, name).detach().to(merged.device)
                merged = factors[name][:, None] * merged
            delta_b = self._bias_delta(name)
            if delta_b is not None:
                if bias is None:
                    raise ValueError(
                        f"adapter {name!r} has a lora_B bias but the base layer has no bias to merge it into"
                    )
                bias = bias + delta_b.to(bias.device)
        if safe_merge and not bool(torch.isfinite(merged).all()):
            raise ValueError(f"merging adapters {names!r} gives non-finite weights; the base was left as it was")
        self.__dict__["_dora_factors"].update(factors)
        if not isinstance(base, NF4Linear):
            base.weight.copy_(merged)
            if bias is not None:
                base.bias.copy_(bias)
            self.merged_adapters.extend(names)
            return
        self.__dict__["_unmerged_nf4"] = base
        self.base_layer = _dense_like(base, merged.to(base.weight_nf4.dtype), bias)
        self.merged_adapters.extend(names)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo every merge: restore the NF4 base, or subtract the deltas from the dense base (in float32)."""
        if not self.merged:
            return
        if self._unmerged_nf4 is not None:
            self.base_layer = self._unmerged_nf4.to(self.base_layer.weight.device)
            self.__dict__["_unmerged_nf4"] = None
            self.merged_adapters.clear()
        elif any(n in self._dora_factors for n in self.merged_adapters):
            base = self.base_layer
            weight = base.weight.detach().float()
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                factor = self._dora_factors.pop(name, None)
                if factor is not None:
                    weight = weight / factor.to(weight.device)[:, None]
                weight = weight - self.get_delta_weight(name).to(weight.device)
                bias_delta = self._bias_delta(name)
                if bias_delta is not None:
                    base.bias.copy_(base.bias.float() - bias_delta.to(base.bias.device))
            base.weight.copy_(weight)
        else:
            super().unmerge()
        self._dora_factors.clear()

    # -- forward --------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args: Any, adapter_names: Sequence[str] | None = None) -> torch.Tensor:
        """``x [..., in_features] -> [..., out_features]``.

        Args:
            x: the input.
            adapter_names: one adapter name per row of ``x`` (``"__base__"`` for none): a mixed batch,
                each row through its own adapter (HF PEFT's ``adapter_names`` forward argument). A list: a str,
                or a name this layer does not hold, is refused.

        Raises:
            TypeError: ``x`` is not a floating tensor (``nn.Linear`` refuses integers too).
            ValueError: ``x`` is not ``[..., in_features]`` (a 0-d tensor, another width).
        """
        check_input(x, self.in_features)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, adapter_names)
        names = self._present_active()
        if self.merged or not names:
            return self.base_layer(x)
        base = self.base_layer
        in_dtype = x.dtype
        out_dtype = None
        if torch.is_autocast_enabled(x.device.type):
            # cast operands to the autocast dtype, as nn.Linear does under autocast
            dtype = torch.get_autocast_dtype(x.device.type)
        elif isinstance(base, NF4Linear) and base.compute_dtype is not None:
            dtype, out_dtype = base.compute_dtype, in_dtype
        else:
            dtype = in_dtype
        name = names[0]
        dropout = self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
        bias = base.bias.to(dtype) if base.bias is not None else None
        if isinstance(base, NF4Linear):
            weight, nf4 = None, base.kernel_args()
        else:
            weight, nf4 = base.weight.to(dtype), None
        xd = x.to(dtype)
        scaling, lora_b = self._scale(name), self.lora_B[name].weight.to(dtype)
        if isinstance(scaling, torch.Tensor):  # torch.compile: s·B is formed in the graph, the op scales by 1
            scaling, lora_b = 1.0, lora_b * scaling
        lora_a = self.lora_A[name].weight.to(dtype)
        if self.use_dora.get(name):
            y = dora_forward(self, xd, weight, nf4, bias, name, lora_a, lora_b, scaling, p)
        else:
            y = lora_linear(xd, weight, bias, lora_a, lora_b, scaling, nf4=nf4, dropout_p=p, training=self.training)
            y = self._add_lora_bias(y, name)
        for other in names[1:]:
            if self.use_dora.get(other):
                y = dora_branch(self, xd, other, y, weight, nf4, bias)
            else:
                y = y + self._lora_branch(xd, other)
        return y if out_dtype is None else y.to(out_dtype)

    def _add_lora_bias(self, y: torch.Tensor, name: str) -> torch.Tensor:
        b = self.lora_B[name].bias
        return y if b is None else y + self._scale(name) * b.to(y.dtype)

    def _lora_branch(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """``s·(B·A·drop(x) + b)`` of one adapter in plain torch, in ``x``'s dtype (the second and later
        active adapters, and mixed batches)."""
        a = self.lora_A[name].weight.to(x.dtype)
        b = self.lora_B[name].weight.to(x.dtype)
        h = F.linear(F.linear(self.lora_dropout[name](x), a), b)
        return self._add_lora_bias(self._scale(name) * h, name)

    def _mixed_batch_forward(self, x: torch.Tensor, adapter_names: Sequence[str]) -> torch.Tensor:
        """Row ``i`` of ``x`` through the base plus adapter ``adapter_names[i]`` (``"__base__"``: none): every
        adapter in one batched op (``fastpeft.nn.lora_mixed``), else one sub-batch per adapter."""
        adapter_names = self._check_adapter_names(adapter_names, x.shape[0] if x.dim() > 1 else 1)
        dora = [n for n in dict.fromkeys(adapter_names) if self.use_dora.get(n)]
        # DoRA rows (HF PEFT refuses them): each row's output is its own adapter's f ⊙ (x·Wᵀ + s·x·Aᵀ·Bᵀ) + bias
        lora_names = ["__base__" if n in dora else n for n in adapter_names]
        y = self.base_layer(x)
        if not batched_delta(self, x, y, lora_names):
            for name in dict.fromkeys(lora_names):
                if name == "__base__" or not self._has(name):
                    continue
                rows = [i for i, n in enumerate(lora_names) if n == name]
                sub = x[rows].to(self.lora_A[name].weight.dtype)
                y[rows] += self._lora_branch(sub, name).to(y.dtype)
        if dora:
            weight, nf4 = dora_base_operands(self)
            bias = self.get_base_layer().bias
            for name in dora:
                rows = [i for i, n in enumerate(adapter_names) if n == name]
                y[rows] = dora_branch(self, x[rows], name, y[rows], weight, nf4, bias)
        return y


def _dense_like(layer: NF4Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A frozen ``nn.Linear`` holding ``weight`` ``[out, in]`` and ``bias`` (``layer``'s, possibly merged into)."""
    dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=weight.device,
                      dtype=weight.dtype)  # fmt: skip
    dense.weight.copy_(weight)
    if bias is not None:
        dense.bias.copy_(bias)
    return dense.requires_grad_(False)
