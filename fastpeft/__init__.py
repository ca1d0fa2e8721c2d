"""fastpeft: parameter-efficient fine-tuning on fused Triton kernels.

The names below are imported on first use (PEP 562), so ``import fastpeft.cli`` starts without torch: the command
line handles a Ctrl-C or SIGTERM that lands in its imports.
"""

from __future__ import annotations

import importlib
import re
from importlib import metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

_TRITON_MIN = (3, 6)
"""The oldest Triton whose compiler builds every kernel configuration fastpeft ships (PyTorch 2.10 pins it)."""


def _check_triton() -> None:
    # from the installed distribution's metadata: importing Triton itself is left to the kernels that use it
    try:
        found = metadata.version("triton")
    except metadata.PackageNotFoundError:
        return  # no Triton (not Linux): the CPU reference path needs none
    parsed = re.match(r"(\d+)\.(\d+)", found)
    if parsed and tuple(map(int, parsed.groups())) < _TRITON_MIN:
        need = ".".join(map(str, _TRITON_MIN))
        raise ImportError(f"fastpeft needs Triton >= {need} (PyTorch >= 2.10 brings it); Triton {found} is installed")


_check_triton()

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

_HOME = {name: "fastpeft.quant" if name in ("NF4Weight", "quantize_nf4") else "fastpeft.peft" for name in __all__}
del _HOME["__version__"]


def __getattr__(name: str) -> Any:
    if name in _HOME:
        value = getattr(importlib.import_module(_HOME[name]), name)
        globals()[name] = value
        return value
    try:  # a submodule, as `import fastpeft` made it an attribute before these names were lazy
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})
