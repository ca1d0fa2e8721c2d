"""What fastpeft's ``PeftModel`` is to transformers, accelerate and TRL: a ``peft.PeftModel``.

Those libraries recognise a PEFT model by ``isinstance(model, peft.PeftModel)`` and then treat it as one:
``Trainer`` checkpoints hold the adapter alone (``save_pretrained`` / ``load_adapter``), accelerate unwraps it
as one, TRL puts its fused LM head on the base model and takes the adapter-disabled model as DPO's reference.
So when ``peft`` can be imported, every fastpeft ``PeftModel`` is created as an instance of one subclass of both
classes, built once, on the first model created:

- fastpeft's methods come first in the method resolution order, and fastpeft's own calls into ``nn.Module``
  name it explicitly, so no method of ``peft.PeftModel`` (written for HF PEFT's internals) ever runs, its
  ``__init__`` included;
- every other member of ``peft.PeftModel`` is masked: the few those libraries read get fastpeft's answer
  (``peft_config``, ``has_active_enabled_adapter``, ``base_model_torch_dtype``, the model-card hooks), the
  rest raise ``NotImplementedError`` naming themselves instead of reading attributes fastpeft does not have.

Without ``peft`` (or with one whose import fails) the class is fastpeft's own; nothing else changes. The
subclass is ``fastpeft.peft.interop.HFPeftModel`` (built on first access, so models pickle by reference).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from torch import nn

__all__ = ["hf_peft_class"]

_log = logging.getLogger(__name__)


def _peft_model_class() -> type | None:
    try:
        from peft import PeftModel
    except ImportError:
        return None
    except Exception as e:  # a broken peft install must not break fastpeft
        _log.info("peft could not be imported (%s): fastpeft models are not peft.PeftModel instances", e)
        return None
    return PeftModel


def _unsupported(name: str) -> Any:
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"PeftModel.{name} is HF PEFT's internal API, which fastpeft's PeftModel lacks")

    method.__name__ = name
    return method


class _PeftFacade:
    """fastpeft's answers to the members of ``peft.PeftModel`` that transformers, accelerate and TRL read."""

    @property
    def peft_config(self) -> dict:
        # fastpeft keeps the configs in the instance; peft.PeftModel's property would read its tuner's
        return self.__dict__["peft_config"]

    @peft_config.setter
    def peft_config(self, value: dict) -> None:
        self.__dict__["peft_config"] = value

    @property
    def has_active_enabled_adapter(self) -> bool:
        return bool(self._active_adapters) and not self._disabled

    @property
    def base_model_torch_dtype(self) -> Any:
        return getattr(self.get_base_model(), "dtype", None)

    def _get_peft_specific_model_tags(self) -> list[str]:
        return []

    def create_or_update_model_card(self, output_dir: str) -> None:
        """fastpeft writes each adapter's model card in ``save_pretrained``; nothing more to do."""

    def prepare_model_for_gradient_checkpointing(self, model: nn.Module) -> nn.Module:
        return self._prepare_model_for_gradient_checkpointing(model)

    def _prepare_model_for_gradient_checkpointing(self, model: nn.Module) -> nn.Module:
        # checkpointed blocks need an input that requires grad when every base weight is frozen
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        return model


@functools.cache
def _combined(cls: type, peft_model: type) -> type:
    facade = {n: v for n, v in vars(_PeftFacade).items() if not n.startswith("__")}
    attrs: dict[str, Any] = {"__module__": __name__, "__qualname__": "HFPeftModel", "__doc__": cls.__doc__}
    for name in vars(peft_model):
        if name.startswith("__") or _defines(cls, name):
            continue
        attrs[name] = facade.get(name) or _unsupported(name)
    return type("PeftModel", (cls, peft_model), attrs)


def _defines(cls: type, name: str) -> bool:
    return any(name in vars(k) for k in cls.__mro__ if k not in (nn.Module, object))


def hf_peft_class(cls: type) -> type:
    """``cls`` (fastpeft's ``PeftModel``) as a subclass of ``peft.PeftModel`` too, when peft can be imported."""
    peft_model = _peft_model_class()
    if peft_model is None or issubclass(cls, peft_model):
        return cls
    return _combined(cls, peft_model)


def __getattr__(name: str) -> Any:
    if name == "HFPeftModel":  # pickle finds the subclass by this name
        from fastpeft.peft.model import PeftModel

        combined = hf_peft_class(PeftModel)
        if combined is PeftModel:
            raise AttributeError("HFPeftModel needs the peft package")
        return combined
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
