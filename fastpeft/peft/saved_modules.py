"""``modules_to_save`` for the methods other than LoRA (prompt learning, bottleneck adapters): a trainable copy of a
module per adapter, in the ``ModulesToSaveWrapper`` LoRA uses, and for ``task_type="SEQ_CLS"`` the classification
head (``classifier`` / ``score``), as HF PEFT trains it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fastpeft.peft.lora import ModulesToSaveWrapper, _set_submodule, _wrappers, match_module, wrapper_file_params

__all__ = ["HEADS", "params", "set_active", "unwrap", "wrap"]

HEADS = ("classifier", "score")  # what HF PEFT trains in full for SEQ_CLS
_PREFIX = "base_model."  # a prompt-learning PeftModel holds the user's model as ``base_model``


def wrap(model: nn.Module, config: Any, adapter_name: str) -> None:
    """Give adapter ``adapter_name`` a trainable copy of each ``config.modules_to_save`` module, and for SEQ_CLS of
    the classification head (LoRA does this in ``inject_lora``)."""
    if config.task_type == "SEQ_CLS":
        config.modules_to_save = list(config.modules_to_save or []) + [
            h for h in HEADS if h not in (config.modules_to_save or [])
        ]
    if not config.modules_to_save:
        return
    found = False
    for name, module in list(model.named_modules()):
        if not name or not match_module(name, config.modules_to_save):
            continue
        if isinstance(module, ModulesToSaveWrapper):
            module.update(adapter_name)
        elif not any(name.startswith(f"{w}.") for w, _ in _wrappers(model)):
            _set_submodule(model, name, ModulesToSaveWrapper(module, adapter_name).train(module.training))
        found = True
    if not found:
        raise ValueError(f"{type(config).__name__}: modules_to_save={config.modules_to_save} matched no module")


def params(model: nn.Module, adapter_name: str, prefix: str = _PREFIX) -> dict[str, torch.Tensor]:
    """File key -> live tensor of the adapter's copies (HF PEFT's ``base_model.<head>.<param>`` for prompt
    learning; ``prefix`` the method's key prefix otherwise)."""
    return wrapper_file_params(model, adapter_name, prefix)


def set_active(model: nn.Module, adapter_name: str, trainable: bool) -> None:
    """The wrapped modules answer with ``adapter_name``'s copy, trained when ``trainable`` (call after freezing)."""
    for _, wrapper in _wrappers(model):
        wrapper.active_adapter = adapter_name
        if adapter_name in wrapper.modules_to_save:
            wrapper.modules_to_save[adapter_name].requires_grad_(trainable)


def unwrap(model: nn.Module) -> nn.Module:
    """Put the original modules back (``unload``)."""
    for name, wrapper in _wrappers(model):
        _set_submodule(model, name, wrapper.original_module)
    return model
