"""``LoraLinear``: LoRA on a frozen ``nn.Linear`` or ``NF4Linear`` (QLoRA), backed by the fused op.

In-memory names and semantics follow HF PEFT's LoRA layer so checkpoints interoperate: ``base_layer``,
``lora_A[name]`` (``nn.Linear(in, r)``, weight ``[r, in]``), ``lora_B[name]`` (``nn.Linear(r, out)``,
weight ``[out, r]``), ``lora_dropout[name]``, and the dicts ``r``, ``lora_alpha``, ``scaling``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fastpeft.nn.checks import check_adapter_name, check_input, is_finite_number
from fastpeft.nn.nf4_linear import NF4Linear
from fastpeft.ops.lora import lora_linear

__all__ = ["LoraLinear"]


class LoraLinear(nn.Module):
    """``y = base(x) + s·B·A·drop(x)`` for the active adapter, one fused op per call.

    Args:
        base_layer: the frozen base, ``nn.Linear`` or ``NF4Linear``; its parameters are frozen here.
        r: rank. lora_alpha: alpha; ``scaling = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
        lora_dropout: dropout probability on the LoRA branch's input.
        adapter_name: name of the first adapter (it becomes the active one).
        init_lora_weights: True (A kaiming-uniform, B zeros: the layer starts as the base), "gaussian"
            (A normal with std 1/r, B zeros) or False (A and B keep ``nn.Linear``'s random init).

    Attributes:
        disable_adapters: True runs the base alone (an adapter merged into the base is unmerged first).
        merged_adapters: names merged into the base, in merge order.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        adapter_name: str = "default",
        init_lora_weights: bool | str = True,
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
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter: str | None = None
        # The NF4 base a merge replaced by a dense layer; a plain attribute so it is neither in the
        # state dict nor counted twice, and unmerge() restores it.
        self.__dict__["_unmerged_nf4"] = None
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights)

    # -- adapters -------------------------------------------------------------------------------

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
    ) -> None:
        """Add (or replace) adapter ``adapter_name``; the first adapter added becomes the active one.

        Only the active adapter's weights require grad: a new non-active adapter starts frozen.

        Raises:
            ValueError: ``r`` not a positive int, ``lora_alpha`` not finite, ``lora_dropout`` outside [0, 1),
                unknown ``init_lora_weights``, a bad ``adapter_name`` (``check_adapter_name``).
        """
        check_adapter_name(adapter_name)
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if not is_finite_number(lora_alpha):
            raise ValueError(f"lora_alpha must be a finite number, got {lora_alpha!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        gaussian = isinstance(init_lora_weights, str) and init_lora_weights.lower() == "gaussian"
        if not (init_lora_weights is True or init_lora_weights is False or gaussian):
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}")
        device, dtype = self._adapter_device_dtype()
        lora_a = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        lora_b = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        if init_lora_weights is not False:
            with torch.no_grad():
                if init_lora_weights is True:
                    # nn.Linear's own init for A, as the LoRA paper's code does; B = 0 so the layer starts as the base.
                    nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
                else:
                    nn.init.normal_(lora_a.weight, std=1 / r)
                nn.init.zeros_(lora_b.weight)
        self.lora_A[adapter_name] = lora_a
        self.lora_B[adapter_name] = lora_b
        self.lora_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.use_rslora[adapter_name] = use_rslora
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        if self._active_adapter is None:
            self._active_adapter = adapter_name
        self._train_only_active()

    def _train_only_active(self) -> None:
        """The active adapter's weights require grad, every other adapter's are frozen (PEFT's rule)."""
        for name in self.lora_A:
            self.lora_A[name].requires_grad_(name == self._active_adapter)
            self.lora_B[name].requires_grad_(name == self._active_adapter)

    def _adapter_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        """Adapters live on the base's device, in its float dtype (float32 for a quantized base, as PEFT)."""
        base = self.get_base_layer()
        if isinstance(base, NF4Linear):
            return base.packed.device, torch.float32
        return base.weight.device, base.weight.dtype

    @property
    def active_adapter(self) -> str | None:
        """The name of the adapter forward applies (None once every adapter is deleted)."""
        return self._active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return [] if self._active_adapter is None else [self._active_adapter]

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the active adapter: its weights trainable, the others frozen.

        A merged base is unmerged first, so the output is always base + the active adapter.

        Raises:
            ValueError: no adapter of that name.
        """
        if adapter_name not in self.lora_A:
            raise ValueError(f"no adapter named {adapter_name!r}; this layer has {list(self.lora_A)}")
        if self.merged:
            self.unmerge()
        self._active_adapter = adapter_name
        self._train_only_active()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name`` (unmerging first if it is merged); the next remaining adapter becomes active.

        Raises:
            ValueError: no adapter of that name.
        """
        if adapter_name not in self.lora_A:
            raise ValueError(f"no adapter named {adapter_name!r}; this layer has {list(self.lora_A)}")
        if adapter_name in self.merged_adapters:
            self.unmerge()
        for table in (self.lora_A, self.lora_B, self.lora_dropout):
            del table[adapter_name]
        for table in (self.r, self.lora_alpha, self.scaling, self.use_rslora):
            del table[adapter_name]
        if self._active_adapter == adapter_name:
            self._active_adapter = next(iter(self.lora_A), None)

    # -- merging --------------------------------------------------------------------------------

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def get_base_layer(self) -> nn.Module:
        """The base layer forward runs (a dense ``nn.Linear`` while an NF4 base is merged)."""
        return self.base_layer

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (PEFT exposes it too; model code reads ``proj.weight.dtype``)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias."""
        return self.base_layer.bias

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s·B·A`` ``[out, in]`` in float32."""
        a = self.lora_A[adapter_name].weight.detach().float()
        b = self.lora_B[adapter_name].weight.detach().float()
        return self.scaling[adapter_name] * (b @ a)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add ``s·B·A`` of each adapter (default: the active one) into the base weight.

        A dense base is updated in place (the sum is formed in float32 and rounded once). An NF4 base is
        replaced by a dense ``nn.Linear`` in the weight's original dtype (16-bit in practice) holding
        ``dequant(W) + s·B·A``; it is never re-quantized, and ``unmerge`` restores the NF4 layer.

        Raises:
            ValueError: an unknown adapter name, or (``safe_merge``) a merged weight that is not finite.
        """
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        for name in names:
            if name not in self.lora_A:
                raise ValueError(f"no adapter named {name!r}; this layer has {list(self.lora_A)}")
        for name in names:
            if name in self.merged_adapters:
                continue
            base = self.base_layer
            current = base.dequantize(torch.float32) if isinstance(base, NF4Linear) else base.weight.float()
            merged = current + self.get_delta_weight(name).to(current.device)
            if safe_merge and not bool(torch.isfinite(merged).all()):
                raise ValueError(f"merging adapter {name!r} gives non-finite weights; the base was left as it was")
            if isinstance(base, NF4Linear):
                self.__dict__["_unmerged_nf4"] = base
                self.base_layer = _dense_like(base, merged.to(base.weight_nf4.dtype))
            else:
                base.weight.copy_(merged)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo every merge: restore the NF4 base, or subtract the deltas from the dense base (in float32)."""
        if not self.merged:
            return
        if self._unmerged_nf4 is not None:
            self.base_layer = self._unmerged_nf4.to(self.base_layer.weight.device)
            self.__dict__["_unmerged_nf4"] = None
        else:
            weight = self.base_layer.weight
            for name in reversed(self.merged_adapters):
                weight.copy_(weight.float() - self.get_delta_weight(name).to(weight.device))
        self.merged_adapters.clear()

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module's signature
        # nn.Module moves child after child: a failure halfway (out of memory on the target device)
        # would leave the base on one device and the adapters on another. Put every tensor back instead.
        before = [(m, dict(m._parameters), dict(m._buffers)) for m in self.modules()]
        data = [(p, p.data, p.grad) for _, params, _ in before for p in params.values() if p is not None]
        try:
            return super()._apply(fn, recurse)
        except BaseException:
            for m, params, buffers in before:
                m._parameters.clear()
                m._parameters.update(params)
                m._buffers.clear()
                m._buffers.update(buffers)
            for p, d, g in data:
                p.data, p.grad = d, g
            raise

    # -- forward --------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in_features] -> [..., out_features]``.

        Raises:
            TypeError: ``x`` is not a floating tensor (``nn.Linear`` refuses integers too).
        """
        check_input(x)
        name = self._active_adapter
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x)
        if self.merged or name is None:
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
        dropout = self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
        bias = base.bias.to(dtype) if base.bias is not None else None
        if isinstance(base, NF4Linear):
            weight, nf4 = None, base.kernel_args()
        else:
            weight, nf4 = base.weight.to(dtype), None
        y = lora_linear(
            x.to(dtype), weight, bias, self.lora_A[name].weight.to(dtype), self.lora_B[name].weight.to(dtype),
            self.scaling[name], nf4=nf4, dropout_p=p, training=self.training,
        )  # fmt: skip
        return y if out_dtype is None else y.to(out_dtype)

    def extra_repr(self) -> str:
        return f"active_adapter={self._active_adapter!r}, r={self.r}, merged={self.merged_adapters}"


def _dense_like(layer: NF4Linear, weight: torch.Tensor) -> nn.Linear:
    """A frozen ``nn.Linear`` holding ``weight`` ``[out, in]`` and ``layer``'s bias."""
    dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=weight.device,
                      dtype=weight.dtype)  # fmt: skip
    dense.weight.copy_(weight)
    if layer.bias is not None:
        dense.bias.copy_(layer.bias)
    return dense.requires_grad_(False)
