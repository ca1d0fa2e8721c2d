"""fastpeft: parameter-efficient fine-tuning on fused Triton kernels."""

from __future__ import annotations

from fastpeft.peft import (
    AdapterConfig,
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    get_peft_model,
    quantize_model,
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
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "get_peft_model",
    "quantize_model",
]
