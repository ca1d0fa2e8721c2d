"""TRL's trainers, taking a fastpeft config as ``peft_config``.

A fastpeft ``PeftModel`` is a ``peft.PeftModel`` to TRL (``fastpeft.peft.interop``), so TRL's own trainers train
one handed over already wrapped. What they cannot take is a fastpeft config as ``peft_config=``: TRL checks
``isinstance(peft_config, peft.PeftConfig)`` and would wrap the model with HF PEFT. The classes here are TRL's,
by the same names, with one step first: a fastpeft config wraps the model with ``fastpeft.get_peft_model``, and
TRL gets the wrapped model and no config::

    from fastpeft import LoraConfig
    from fastpeft.peft.trainers import SFTTrainer  # was: from trl import SFTTrainer

    trainer = SFTTrainer(model=model, args=sft_args, train_dataset=ds, peft_config=LoraConfig(r=16))

As with HF PEFT's ``peft_config=``, DPO-style trainers then take the adapter-disabled model as the reference
(no copy of the model, and no "ref" copy of the adapter). Any other ``peft_config`` goes to TRL unchanged. The
classes are built from ``trl`` on first use (``trl`` is optional).
"""

from __future__ import annotations

import functools
from typing import Any

# built on first access by the module's __getattr__ (trl is optional)
__all__ = ["DPOTrainer", "GRPOTrainer", "KTOTrainer", "RewardTrainer", "SFTTrainer"]  # noqa: F822

_REFERENCE_ADAPTER = "ref"  # the copy of the adapter TRL's preference trainers add to a model passed wrapped


def _wrapped(model: Any, peft_config: Any, args: Any) -> Any:
    from fastpeft.peft.model import get_peft_model

    if isinstance(model, str):  # a model id or directory, loaded as TRL would
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model, **(getattr(args, "model_init_kwargs", None) or {}))
    if model is None:
        raise ValueError("peft_config= with a fastpeft config needs the model")
    return get_peft_model(model, peft_config)


@functools.cache
def _trainer(name: str) -> type:
    import trl

    from fastpeft.peft.config import PeftConfigBase

    base = getattr(trl, name)

    def __init__(self: Any, model: Any = None, *args: Any, peft_config: Any = None, **kwargs: Any) -> None:
        ours = isinstance(peft_config, PeftConfigBase)
        if ours:
            model = _wrapped(model, peft_config, kwargs.get("args", args[0] if args else None))
            peft_config = None
        base.__init__(self, model, *args, peft_config=peft_config, **kwargs)
        peft_model = getattr(self, "model", None)
        if ours and _REFERENCE_ADAPTER in getattr(peft_model, "peft_config", {}):
            # TRL copied the fresh adapter as the reference; HF PEFT's peft_config= path uses the base instead
            peft_model.delete_adapter(_REFERENCE_ADAPTER)

    doc = f"``trl.{name}``; ``peft_config`` may also be a fastpeft config (see ``fastpeft.peft.trainers``)."
    return type(name, (base,), {"__init__": __init__, "__module__": __name__, "__qualname__": name, "__doc__": doc})


def __getattr__(name: str) -> Any:
    if name in __all__:
        return _trainer(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
