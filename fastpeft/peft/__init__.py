"""The thin PEFT API: HF PEFT's configs, model wrapper and adapter files over fastpeft's layers.

Switching from HF PEFT is an import change; adapter directories move both ways::

    from fastpeft import LoraConfig, PeftModel, get_peft_model, quantize_model

    model = quantize_model(model)  # QLoRA: NF4 base (or a bitsandbytes 4-bit model, reused as is)
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    peft_model.print_trainable_parameters()
    ...  # train
    peft_model.save_pretrained("out")  # adapter_config.json + adapter_model.safetensors, as HF PEFT
    peft_model = PeftModel.from_pretrained(base_model, "out")  # ours or HF PEFT's

Methods: LoRA / rsLoRA / QLoRA (``LoraConfig``), prompt tuning (``PromptTuningConfig``), prefix
tuning (``PrefixTuningConfig``) and bottleneck adapters (``AdapterConfig``; fastpeft's own file
layout, see ``fastpeft.peft.adapters``). HF PEFT options outside this subset raise ``ValueError``.
"""

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
