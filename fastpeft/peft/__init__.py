"""The thin PEFT API: HF PEFT's configs, model wrapper and adapter files over fastpeft's layers."""

from __future__ import annotations

from fastpeft.peft.config import AdapterConfig, LoraConfig, PrefixTuningConfig, PromptTuningConfig, config_from_dict
from fastpeft.peft.model import PeftModel, get_peft_model
from fastpeft.peft.quantize import quantize_model

__all__ = [
    "AdapterConfig",
    "LoraConfig",
    "PeftModel",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "config_from_dict",
    "get_peft_model",
    "quantize_model",
]
