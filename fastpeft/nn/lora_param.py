"""``LoraParameter``: LoRA on an ``nn.Parameter`` a module uses directly (HF PEFT's ``target_parameters``).

Mixture-of-experts blocks keep their expert weights as 3-D parameters and call ``torch.bmm`` / custom
kernels on them, so there is no ``nn.Linear`` to wrap. The wrapper keeps the owning module as
``base_layer`` and runs it with the parameter replaced by ``W + s·B·A`` (``torch.func.functional_call``:
nothing in the module is patched, and the gradient reaches A and B through the sum).

Shapes follow HF PEFT's ``ParamWrapper`` so files interoperate:

- 2-D ``W [out, in]``: ``lora_A [r, in]``, ``lora_B [out, r]``, delta ``s·B·A``.
- 3-D ``W [E, out, in]`` (default) or ``[E, in, out]`` (the module sets ``is_transposed = True``):
  ``lora_A [E·r, in]`` holds expert ``e``'s rows at ``e·r ... e·r + r - 1``; ``lora_B [out, E·r]`` holds
  expert ``e``'s columns at ``e, e + E, e + 2E, ...`` (HF PEFT's reshape ``[out, r, E]``).

No dropout (``x`` cannot be factored out of the parameter's use) and no ``lora_bias``, as in HF PEFT.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from fastpeft.nn.lora_base import LoraLayerBase, check_lora_args

__all__ = ["LoraParameter"]


class LoraParameter(LoraLayerBase):
    """LoRA on parameter ``parameter_name`` of ``base_layer`` (see module doc).

    Args:
        base_layer: the module owning the parameter (frozen here); may itself be a ``LoraParameter``
            when several parameters of one module are adapted.
        parameter_name: the attribute name of the 2-D or 3-D parameter.
        r, lora_alpha, use_rslora, adapter_name: as ``LoraLinear``.
        init_lora_weights: True (A kaiming-uniform, B = 0), "gaussian" or False.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        parameter_name: str,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        adapter_name: str = "default",
        init_lora_weights: bool | str = True,
        lora_bias: bool = False,
    ) -> None:
        super().__init__()
        self.parameter_name = parameter_name
        self.base_layer = base_layer
        param = self.get_param()
        if not isinstance(param, nn.Parameter) or param.dim() not in (2, 3):
            raise ValueError(
                f"target parameter {parameter_name!r} must be a 2-D or 3-D nn.Parameter, got "
                f"{type(param).__name__} of shape {tuple(getattr(param, 'shape', ()))}"
            )
        param.requires_grad_(False)
        if param.dim() == 2:
            self.num_experts, (self.out_features, self.in_features) = 1, param.shape
            self._transposed = False
        else:
            self._transposed = bool(getattr(self._owner(), "is_transposed", False))
            e, d1, d2 = param.shape
            self.num_experts = e
            self.in_features, self.out_features = (d1, d2) if self._transposed else (d2, d1)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self._init_tables()
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, lora_bias)

    def _owner(self) -> nn.Module:
        module = self.base_layer
        while isinstance(module, LoraParameter):
            module = module.base_layer
        return module

    def _param_path(self) -> str:
        """The parameter's path relative to ``base_layer`` (through nested wrappers)."""
        path, module = self.parameter_name, self.base_layer
        while isinstance(module, LoraParameter):
            path, module = f"base_layer.{path}", module.base_layer
        return path

    def get_param(self) -> torch.Tensor:
        """The wrapped parameter as stored (without the LoRA delta)."""
        return getattr(self._owner(), self.parameter_name)

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
        """Add (or replace) adapter ``adapter_name``.

        Raises:
            ValueError: bad arguments, ``lora_dropout`` > 0, ``lora_bias``, or an initialization other than
                True / False / "gaussian" (refused as HF PEFT's ``ParamWrapper`` refuses the first two).
        """
        check_lora_args(adapter_name, r, lora_alpha, lora_dropout)
        if lora_dropout:
            raise ValueError("target_parameters does not work with lora_dropout != 0 (x cannot be factored out)")
        if lora_bias:
            raise ValueError("target_parameters does not work with lora_bias=True")
        gaussian = isinstance(init_lora_weights, str) and init_lora_weights.lower() == "gaussian"
        if not (init_lora_weights is True or init_lora_weights is False or gaussian):
            raise ValueError(f"init_lora_weights={init_lora_weights!r} is not supported with target_parameters")
        param = self.get_param()
        factory = dict(device=param.device, dtype=param.dtype)
        lora_a = nn.Linear(self.in_features, r * self.num_experts, bias=False, **factory)
        lora_b = nn.Linear(r * self.num_experts, self.out_features, bias=False, **factory)
        if init_lora_weights is not False:
            with torch.no_grad():
                if init_lora_weights is True:
                    nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
                else:
                    nn.init.normal_(lora_a.weight, std=1 / r)
                nn.init.zeros_(lora_b.weight)
        self.lora_A[adapter_name] = lora_a
        self.lora_B[adapter_name] = lora_b
        self._record(adapter_name, r, lora_alpha, 0.0, use_rslora, False)

    def _delta(self, adapter_name: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        s = self._scale(adapter_name)
        if self.num_experts == 1:
            return s * (b @ a).view(self.get_param().shape)
        e = self.num_experts
        a3 = a.reshape(e, -1, a.shape[-1])  # [E, r, in]
        b3 = b.reshape(b.shape[0], -1, e)  # [out, r, E]
        spec = "ore,eri->eio" if self._transposed else "ore,eri->eoi"
        return s * torch.einsum(spec, b3, a3)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s·B·A`` in the parameter's shape, float32."""
        a = self.lora_A[adapter_name].weight.detach().float()
        b = self.lora_B[adapter_name].weight.detach().float()
        return self._delta(adapter_name, a, b)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the deltas of ``adapter_names`` (default: the active ones) into the parameter (float32 sum).

        Raises:
            ValueError: an unknown name, or (``safe_merge``) a non-finite result (the parameter left as it was).
        """
        param = self.get_param()
        for name in self._merge_names(adapter_names):
            merged = param.float() + self.get_delta_weight(name).to(param.device)
            if safe_merge and not bool(torch.isfinite(merged).all()):
                raise ValueError(f"merging adapter {name!r} gives non-finite weights; the base was left as it was")
            param.copy_(merged)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract every merged delta again (float32), last merged first."""
        param = self.get_param()
        while self.merged_adapters:
            param.copy_(param.float() - self.get_delta_weight(self.merged_adapters.pop()).to(param.device))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The owning module's forward with the parameter replaced by ``W + Σ s·B·A`` of the active adapters."""
        if self.disable_adapters and self.merged:
            self.unmerge()
        names = [] if self.disable_adapters or self.merged else self._present_active()
        if not names:
            return self.base_layer(*args, **kwargs)
        param = self.get_param()
        weight = param
        for name in names:
            a = self.lora_A[name].weight.to(param.dtype)
            b = self.lora_B[name].weight.to(param.dtype)
            weight = weight + self._delta(name, a, b)
        return functional_call(self.base_layer, {self._param_path(): weight}, args, kwargs)

    def unwrap(self) -> nn.Module:
        """The module this wrapper replaced (an inner wrapper, or the owning module)."""
        return self.base_layer

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}, " + super().extra_repr()
