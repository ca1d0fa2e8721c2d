"""``TunerModel``: where HF PEFT's ``LoraModel`` sits in the module tree (``peft_model.base_model``), so
parameter names carry over (``base_model.model.<path>...``). It holds the user's model as ``.model``;
attribute lookups it does not answer go to that model, and the adapter methods HF PEFT also offers on
``peft_model.base_model`` (``set_adapter([...])``, ``merge_adapter``, ...) go to the ``PeftModel``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fastpeft.peft.config import AdapterConfig, LoraConfig, PeftConfigBase

__all__ = ["TunerModel", "adapter_kind"]

# PeftModel methods HF PEFT also offers on ``peft_model.base_model`` (its LoraModel); TunerModel forwards them.
_TUNER_METHODS = frozenset(
    {"set_adapter", "delete_adapter", "merge_adapter", "unmerge_adapter", "merge_and_unload", "unload",
     "disable_adapter_layers", "enable_adapter_layers", "add_weighted_adapter", "active_adapter", "active_adapters",
     "peft_config", "set_requires_grad"}
)  # fmt: skip


class TunerModel(nn.Module):
    """Holds the injected model as ``.model`` (HF PEFT's ``LoraModel`` position in the module tree)."""

    def __init__(self, model: nn.Module, owner: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.__dict__["_owner"] = owner  # not a submodule: the PeftModel holds this one

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        owner = self.__dict__.get("_owner")
        if owner is not None and kwargs.get("adapter_names") is not None:
            return owner.forward(*args, **kwargs)
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            owner = self.__dict__.get("_owner")
            if owner is not None and name in _TUNER_METHODS:
                return getattr(owner, name)
            return getattr(super().__getattr__("model"), name)


def adapter_kind(config: PeftConfigBase) -> str:
    """``"lora"``, ``"adapter"`` (bottleneck) or ``"prompt"``: the kind of adapter ``config`` describes (LoRA and
    bottleneck adapters sit under a ``TunerModel``, prompt learning beside the model)."""
    if isinstance(config, LoraConfig):
        return "lora"
    if isinstance(config, AdapterConfig):
        return "adapter"
    if config.is_prompt_learning:
        return "prompt"
    raise TypeError(f"unsupported config type {type(config).__name__}")
