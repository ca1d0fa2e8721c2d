"""The thin PEFT API: HF PEFT's configs, model wrapper and adapter files over fastpeft's layers.

Switching from HF PEFT is an import change; adapter directories move both ways::

    from fastpeft import LoraConfig, PeftModel, get_peft_model, quantize_model  # was: from peft import ...

    model = quantize_model(model)  # QLoRA: NF4 base (or a bitsandbytes 4-bit model, reused as is)
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    peft_model.print_trainable_parameters()
    ...  # train
    peft_model.save_pretrained("out")  # adapter_config.json + adapter_model.safetensors, as HF PEFT
    peft_model = PeftModel.from_pretrained(base_model, "out")  # ours or HF PEFT's

Methods: LoRA / rsLoRA / QLoRA and DoRA / QDoRA (``LoraConfig``; ``use_dora`` on linear layers), prompt
tuning (``PromptTuningConfig``), prefix tuning (``PrefixTuningConfig``) and bottleneck adapters
(``AdapterConfig``; fastpeft's own file layout, see ``fastpeft.peft.adapters``). LoRA wraps linear layers
(dense, NF4, bitsandbytes 4-bit, GPT-2 ``Conv1D``), embeddings, convolutions, ``nn.MultiheadAttention`` and
parameters (``target_parameters``). HF PEFT's functions come along: ``get_peft_model_state_dict`` /
``set_peft_model_state_dict``, ``get_base_model_state_dict`` / ``set_base_model_state_dict``,
``inject_adapter_in_model``, ``prepare_model_for_kbit_training``; and ``TaskType`` / ``PeftType``.

What HF PEFT has and fastpeft does not (each raises naming the option, never passes silently):

- LoRA variants with their own forward or training rule: MiCA, VeLoRA, MonteCLoRA, aLoRA, QA-LoRA, Bd-LoRA,
  KaSA, Arrow. The fused op computes plain LoRA; each needs its own kernels.
- DoRA (``use_dora``) on ``nn.MultiheadAttention``, grouped convolutions and ``target_parameters``; with
  ``adapter_names`` on embeddings and convolutions (linear layers take DoRA rows in mixed batches, which HF
  PEFT refuses) and in ``add_weighted_adapter``. DoRA has no
  fused kernel: the LoRA op is fused, the norm and the magnitude scaling run in plain torch after it.
- ``init_lora_weights`` ``"loftq"``, ``"corda"``, ``"eva"``, ``"lora_ga"``: they need calibration data or
  bitsandbytes' quantize-and-correct loop, which the CLI's streaming loader does not run.
- ``layer_replication``; ``get_peft_model(mixed=True)``;
  ``add_weighted_adapter``'s TIES / DARE / magnitude-prune combinations; methods other than LoRA, prompt
  and prefix tuning (and fastpeft's bottleneck adapters).
- Files: ``save_pretrained(safe_serialization=False)`` (fastpeft never writes or reads pickle files; HF
  PEFT reads the safetensors file), ``save_embedding_layers=True``, PiSSA / OLoRA conversion on save
  (``path_initial_model_for_weight_conversion``; a PiSSA adapter loads onto the residual base it was saved
  with), Hub model ids (local directories only: fastpeft never downloads), unknown keys in
  ``adapter_config.json`` (HF PEFT ignores them with a warning; fastpeft refuses a file it cannot fully read).

Where fastpeft and HF PEFT 0.21 differ on purpose:

- ``nn.MultiheadAttention``: fastpeft applies ``W + s·B·A`` to both projections; HF PEFT 0.21 adds the
  output projection's delta twice (huggingface/peft#3774), so files interoperate but outputs differ.
- ``peft_version`` records the HF PEFT file format fastpeft follows (``"0.21.2@fastpeft"``), not an
  installed PEFT version.
"""

from __future__ import annotations

from fastpeft.peft.config import (
    AdapterConfig,
    LoraConfig,
    PeftType,
    PrefixTuningConfig,
    PromptTuningConfig,
    TaskType,
    config_from_dict,
)
from fastpeft.peft.functional import (
    get_base_model_state_dict,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    prepare_model_for_kbit_training,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)
from fastpeft.peft.model import PeftModel, get_peft_model
from fastpeft.peft.quantize import quantize_model

__all__ = [
    "AdapterConfig",
    "LoraConfig",
    "PeftModel",
    "PeftType",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "TaskType",
    "config_from_dict",
    "get_base_model_state_dict",
    "get_peft_model",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "prepare_model_for_kbit_training",
    "quantize_model",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
]
