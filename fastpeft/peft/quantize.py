"""QLoRA's base: turn a model's linear layers into frozen NF4 layers, one layer at a time.

``quantize_model`` walks the model and replaces each ``nn.Linear`` (name not matched by ``skip``) by
``NF4Linear.from_linear`` on the layer's own device, then drops the 16-bit original before touching
the next one, so the peak is the quantized model plus about one layer's 16-bit weight. Layers a
transformers + bitsandbytes 4-bit load already holds (``bitsandbytes.nn.Linear4bit``) become
``NF4Linear.from_bnb`` over the same bytes: nothing is dequantized or requantized.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from torch import nn

from fastpeft import nn as fnn
from fastpeft.peft.lora import conv1d_class, linear_from_conv1d

__all__ = ["is_skipped", "quantize_model"]


def is_skipped(name: str, skip: Iterable[str]) -> bool:
    """Whether module ``name`` is one of ``skip``: an exact name, a ``.suffix`` of it, or a parent path."""
    return any(name == s or name.endswith(f".{s}") or name.startswith(f"{s}.") for s in skip)


def quantize_model(
    model: nn.Module, skip: Iterable[str] = ("lm_head",), double_quant: bool = True, blocksize: int = 64
) -> nn.Module:
    """Replace the linear layers of ``model`` (in place) by ``fastpeft.nn.NF4Linear``.

    Args:
        model: any ``nn.Module``; a transformers model loaded with bitsandbytes 4-bit is accepted as is.
        skip: module names (exact, ``.suffix`` or a parent path) left in 16 bits; by default the LM head.
        double_quant: quantize the absmax statistics too (QLoRA's double quantization).
        blocksize: elements per absmax block.

    Returns:
        ``model``, with every non-skipped ``nn.Linear`` / ``Linear4bit`` / transformers ``Conv1D`` now an
        ``NF4Linear``.
    """
    skip = tuple(skip)
    bnb = sys.modules.get("bitsandbytes")
    linear4bit = bnb.nn.Linear4bit if bnb is not None else None
    conv1d = conv1d_class()
    kinds = (nn.Linear, fnn.NF4Linear) if conv1d is None else (nn.Linear, fnn.NF4Linear, conv1d)
    names = [n for n, m in model.named_modules() if n and isinstance(m, kinds)]
    if linear4bit is not None:
        names += [n for n, m in model.named_modules() if n and isinstance(m, linear4bit)]
    for name in names:
        if is_skipped(name, skip):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child)
        if isinstance(module, fnn.NF4Linear):
            continue
        if linear4bit is not None and isinstance(module, linear4bit):
            new = fnn.NF4Linear.from_bnb(module)
        elif conv1d is not None and isinstance(module, conv1d):
            # GPT-2's Conv1D stores [in, out]: quantize the [out, in] transpose, as a Linear would hold it.
            new = fnn.NF4Linear.from_linear(linear_from_conv1d(module), double_quant=double_quant, blocksize=blocksize)
        else:
            new = fnn.NF4Linear.from_linear(module, double_quant=double_quant, blocksize=blocksize)
        setattr(parent, child, new)
        # Free the 16-bit weight now rather than when the model is collected: this bounds the peak.
        module.weight = None
        del module
    return model
