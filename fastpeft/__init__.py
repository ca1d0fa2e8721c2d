"""fastpeft: parameter-efficient fine-tuning on fused Triton kernels."""

from __future__ import annotations

from fastpeft.peft import (
    AdapterConfig,
    LoraConfig,
    PeftModel,
    PeftType,
    PrefixTuningConfig,
    PromptTuningConfig,
    TaskType,
    get_base_model_state_dict,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    prepare_model_for_kbit_training,
    quantize_model,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)
from fastpeft.quant import NF4Weight, quantize_nf4

__version__ = "0.1.0"

__all__ = [
    "NF4Weight",
    "quantize_nf4",
    "__version__",
    "AdapterConfig",
    "LoraConfig",
    "PeftModel",
    "PeftType",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "TaskType",
    "get_base_model_state_dict",
    "get_peft_model",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "prepare_model_for_kbit_training",
    "quantize_model",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
]
