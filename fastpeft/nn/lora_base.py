"""What every LoRA layer shares: named adapters, which ones are active, merging, HF PEFT's names.

A LoRA layer holds a frozen ``base_layer`` and, per adapter name, a low-rank pair whose product
``s·B·A`` has the shape of the base weight (``get_delta_weight``). Several adapters may be active at
once (their updates add up, as in HF PEFT); only active adapters train. Merging adds the deltas into
the base weight in float32 and rounds once; unmerging subtracts them again.

The subclasses (``LoraLinear``, ``LoraEmbedding``, ``LoraConv``) say how the pair is stored and applied.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from fastpeft.nn.checks import MoveChecks, check_adapter_name, check_scale_value, is_finite_number
from fastpeft.nn.lora_scaling import ScalingTable

__all__ = ["LoraLayerBase", "check_lora_args"]


def check_lora_args(adapter_name: str, r: object, lora_alpha: object, lora_dropout: object) -> None:
    """The checks every ``update_layer`` runs before it builds anything.

    Raises:
        ValueError / TypeError: a bad name, ``r`` not a positive int, ``lora_alpha`` not finite,
            ``lora_dropout`` outside [0, 1).
    """
    check_adapter_name(adapter_name)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"r must be a positive int, got {r!r}")
    try:
        check_scale_value("", "lora_alpha", lora_alpha)
    except TypeError as e:
        raise ValueError(str(e)) from None
    if not is_finite_number(lora_dropout) or not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")


class LoraLayerBase(MoveChecks, nn.Module):
    """Adapter bookkeeping for a LoRA layer over ``self.base_layer``.

    Subclasses set ``base_layer``, fill the per-adapter tables and implement ``get_delta_weight``.

    Attributes:
        disable_adapters: True runs the base alone (an adapter merged into the base is unmerged first).
        merged_adapters: names merged into the base, in merge order.
        r, lora_alpha, scaling, use_rslora, lora_bias: per-adapter settings (HF PEFT's dicts).
    """

    # Per-adapter ModuleDict / ParameterDict attributes, and plain dicts, that delete_adapter clears.
    adapter_layer_names: tuple[str, ...] = ("lora_A", "lora_B")
    other_param_names: tuple[str, ...] = ("r", "lora_alpha", "scaling", "use_rslora", "lora_bias", "lora_dropout")

    def _init_tables(self) -> None:
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = ScalingTable()  # a dict; torch.compile reads it as tensors
        self.use_rslora: dict[str, bool] = {}
        self.lora_bias: dict[str, bool] = {}
        self.disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active: list[str] = []

    def _record(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float, use_rslora: bool,
                lora_bias: bool) -> None:  # fmt: skip
        """Store one adapter's settings (its modules are already in place); the first one becomes active."""
        self.lora_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.use_rslora[adapter_name] = bool(use_rslora)
        self.lora_bias[adapter_name] = bool(lora_bias)
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        if not self._active:
            self._active = [adapter_name]
        self._train_only_active()

    # -- names ----------------------------------------------------------------------------------

    def _names(self) -> list[str]:
        return list(getattr(self, self.adapter_layer_names[0]).keys())

    def _has(self, name: str) -> bool:
        return name in getattr(self, self.adapter_layer_names[0])

    def _adapter_tensors(self, name: str) -> list[nn.Parameter]:
        out = []
        for table_name in self.adapter_layer_names:
            table = getattr(self, table_name)
            if name in table:
                item = table[name]
                out.extend(item.parameters() if isinstance(item, nn.Module) else [item])
        return out

    @property
    def active_adapter(self) -> str | list[str] | None:
        """The active adapter's name (a list when several are active, None once all are deleted)."""
        if not self._active:
            return None
        return self._active[0] if len(self._active) == 1 else list(self._active)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def get_base_layer(self) -> nn.Module:
        """The base layer forward runs."""
        return self.base_layer

    def _train_only_active(self) -> None:
        """The active adapters' weights require grad, every other adapter's are frozen (PEFT's rule)."""
        for name in self._names():
            for p in self._adapter_tensors(name):
                p.requires_grad_(name in self._active)

    def set_adapter(self, adapter_names: str | Sequence[str], inference_mode: bool = False) -> None:
        """Make ``adapter_names`` the active adapters: trainable (frozen with ``inference_mode``), others frozen.

        Names this layer does not hold are kept in the active list and skipped in forward, as in HF PEFT
        (a model's adapters need not all target the same layers). A merged base is unmerged first.

        Raises:
            ValueError: none of the names is an adapter of this layer.
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if names and not any(self._has(n) for n in names):
            raise ValueError(f"no adapter named {names!r}; this layer has {self._names()}")
        if self.merged:
            warnings.warn("set_adapter on a merged layer: unmerging it first", UserWarning, stacklevel=2)
            self.unmerge()
        self._active = names
        self._train_only_active()
        if inference_mode:
            for name in self._names():
                for p in self._adapter_tensors(name):
                    p.requires_grad_(False)

    def _check_adapter_names(self, adapter_names: object, rows: int) -> list[str]:
        """``adapter_names`` of a mixed batch as a list, checked: one name per row, each an adapter of this layer or
        ``"__base__"`` (``PeftModel`` hands each layer ``"__base__"`` for the adapters that do not target it).

        Raises:
            TypeError: a str (it would be read as one name per character) or entries that are not str.
            ValueError: a merged layer, a length other than ``rows``, or a name this layer does not hold.
        """
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise TypeError(
                f"adapter_names must be a list of str, one adapter name per row, got {adapter_names!r:.80} "
                "(for one row: [name])"
            )
        names = list(adapter_names)
        if self.merged:
            raise ValueError("adapter_names cannot be used while adapters are merged into the base; unmerge first")
        if len(names) != rows:
            raise ValueError(f"adapter_names has {len(names)} names for a batch of {rows} rows; give one name per row")
        unknown = sorted({n for n in names if n != "__base__" and not self._has(n)})
        if unknown:
            raise ValueError(f"adapter_names: no adapter named {unknown} in this layer; it has {self._names()}")
        return names

    def _present_active(self) -> list[str]:
        return [n for n in self._active if self._has(n)]

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name`` (unmerging first if it is merged); if it was active, the next one takes over.

        Raises:
            ValueError: no adapter of that name.
        """
        if not self._has(adapter_name):
            raise ValueError(f"no adapter named {adapter_name!r}; this layer has {self._names()}")
        if adapter_name in self.merged_adapters:
            self.unmerge()
        for table_name in self.adapter_layer_names + self.other_param_names:
            table = getattr(self, table_name)
            if adapter_name in table:
                del table[adapter_name]
        if adapter_name in self._active:
            self._active = [n for n in self._active if n != adapter_name]
            if not self._active and self._names():
                self._active = [self._names()[0]]
            self._train_only_active()

    # -- scaling (HF PEFT's set_scale / scale_layer / unscale_layer) ----------------------------

    def _scale(self, name: str) -> float | torch.Tensor:
        """Adapter ``name``'s scaling: the float, or under ``torch.compile`` its 0-d tensor (a graph input,
        so a new scaling reaches the compiled model without a recompile)."""
        if torch.compiler.is_compiling():
            return self.scaling.tensor(name)
        return self.scaling[name]

    def set_scale(self, adapter: str, scale: float) -> None:
        """``scaling[adapter] = scale · alpha / r`` (or ``/ sqrt(r)`` for rsLoRA)."""
        if adapter not in self.scaling:
            return
        r = self.r[adapter]
        self.scaling[adapter] = scale * self.lora_alpha[adapter] / (math.sqrt(r) if self.use_rslora[adapter] else r)

    # -- merging --------------------------------------------------------------------------------

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s·B·A`` in the base weight's shape, float32."""
        raise NotImplementedError

    def _bias_delta(self, adapter_name: str) -> torch.Tensor | None:
        """``s·b`` for an adapter with a ``lora_B`` bias (``lora_bias``), float32; else None."""
        if not self.lora_bias.get(adapter_name):
            return None
        return self.scaling[adapter_name] * self.lora_B[adapter_name].bias.detach().float()

    def _merge_names(self, adapter_names: Sequence[str] | None) -> list[str]:
        names = self._present_active() if adapter_names is None else list(adapter_names)
        for name in names:
            if not self._has(name):
                raise ValueError(f"no adapter named {name!r}; this layer has {self._names()}")
        todo = [n for n in names if n not in self.merged_adapters]
        if names and not todo:
            warnings.warn("All adapters are already merged, nothing to do.", UserWarning, stacklevel=3)
        return todo

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        """Add ``s·B·A`` (and ``s·b`` for ``lora_bias``) of each adapter (default: the active ones) into the base.

        The sum is formed in float32 and rounded once into the base weight's dtype.

        Raises:
            ValueError: an unknown adapter name; (``safe_merge``) a merged weight that is not finite, the base
                left as it was; ``lora_bias`` on a base without a bias (nothing to merge it into).
        """
        base = self.get_base_layer()
        for name in self._merge_names(adapter_names):
            merged = base.weight.float() + self.get_delta_weight(name).to(base.weight.device)
            bias_delta = self._bias_delta(name)
            if bias_delta is not None and base.bias is None:
                raise ValueError(
                    f"adapter {name!r} has a lora_B bias (lora_bias=True) but the base layer has no bias to merge into"
                )
            if safe_merge and not bool(torch.isfinite(merged).all()):
                raise ValueError(f"merging adapter {name!r} gives non-finite weights; the base was left as it was")
            base.weight.copy_(merged)
            if bias_delta is not None:
                base.bias.copy_(base.bias.float() + bias_delta.to(base.bias.device))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract every merged delta from the base again (in float32), last merged first."""
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            base.weight.copy_(base.weight.float() - self.get_delta_weight(name).to(base.weight.device))
            bias_delta = self._bias_delta(name)
            if bias_delta is not None:
                base.bias.copy_(base.bias.float() - bias_delta.to(base.bias.device))

    # -- nn.Module ------------------------------------------------------------------------------

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (HF PEFT exposes it too; model code reads ``proj.weight.dtype``)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias."""
        return self.base_layer.bias

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

    def extra_repr(self) -> str:
        return f"active_adapters={self._active!r}, r={self.r}, merged={self.merged_adapters}"
