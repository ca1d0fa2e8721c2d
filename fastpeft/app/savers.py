"""Memory savers for a fine-tuning step, shared by ``fastpeft finetune`` and the memory model.

- ``causal_lm_loss``: the model's loss with the output head and cross-entropy chunked
  (``fastpeft.ops.linear_cross_entropy``), so the float32 ``[tokens, vocab]`` logits never exist.
  Decoder-only architectures whose head is a plain linear map (``CHUNKED_LOSS_MODEL_TYPES``); any other
  model, or prompt / prefix tuning, takes the model's own loss.
- ``enable_checkpointing``: activation checkpointing of every decoder layer (recompute in the
  backward), optionally with the layer inputs it keeps offloaded to host memory (``offload``).
- ``lm_head_skip``: the module names a QLoRA quantization keeps in 16 bits, with or without the head.

``memory.py`` runs exactly these functions on fake tensors, so its estimate follows what training runs.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fastpeft.ops.linear_cross_entropy import DEFAULT_CHUNK_BYTES, linear_cross_entropy

__all__ = [
    "CHUNKED_LOSS_MODEL_TYPES",
    "causal_lm_loss",
    "chunked_loss_supported",
    "enable_checkpointing",
    "lm_head_skip",
]

# Architectures whose causal-LM forward is exactly ``lm_head(decoder(...).last_hidden_state)`` and whose
# loss is transformers' shifted mean cross-entropy (no logit soft-capping or scaling).
CHUNKED_LOSS_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
IGNORE_INDEX = -100


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def chunked_loss_supported(model: nn.Module) -> bool:
    """Whether ``causal_lm_loss`` can chunk this model's loss (else it falls back to ``model(...).loss``)."""
    from fastpeft.nn import NF4Linear

    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return False  # virtual tokens / prefixes enter through the wrapper's own forward
    base = _base(model)
    config = getattr(base, "config", None)
    if getattr(config, "model_type", None) not in CHUNKED_LOSS_MODEL_TYPES or not hasattr(base, "get_decoder"):
        return False
    head = base.get_output_embeddings()
    return type(head) in (nn.Linear, NF4Linear)


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Any:
    """The mean next-token cross-entropy of ``batch`` (``input_ids``, ``attention_mask``, ``labels``).

    Equal to ``model(**batch).loss`` (transformers' loss: labels shifted by one, ``-100`` ignored),
    computed through ``linear_cross_entropy`` when ``chunked_loss_supported(model)``.
    """
    if not chunked_loss_supported(model):
        return model(**batch).loss
    from fastpeft.nn import NF4Linear

    base = _base(model)
    hidden = base.get_decoder()(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),  # packed rows (fastpeft.app.packing): where each example starts
        use_cache=False,
    ).last_hidden_state
    labels = batch["labels"]
    # Shift by appending an ignored column rather than slicing the hidden states (no copy of them).
    shifted = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)
    head = base.get_output_embeddings()
    flat = hidden.reshape(-1, hidden.shape[-1])
    if isinstance(head, NF4Linear):
        return linear_cross_entropy(
            flat, None, shifted.reshape(-1), bias=head.bias, nf4=head.kernel_args(), chunk_bytes=chunk_bytes
        )
    return linear_cross_entropy(flat, head.weight, shifted.reshape(-1), bias=head.bias, chunk_bytes=chunk_bytes)


def _offloaded(hooks: Callable[[], contextlib.AbstractContextManager], function: Callable, *args: Any, **kwargs: Any):  # noqa: ANN202
    # The tensors checkpoint keeps for the recompute (the layer's inputs) are saved under ``hooks``;
    # what the layer saves inside is handled by checkpoint itself (recomputed, never stored).
    from torch.utils.checkpoint import checkpoint

    with hooks():
        return checkpoint(function, *args, use_reentrant=False, **kwargs)


def _host_offload() -> contextlib.AbstractContextManager:
    return torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())


def enable_checkpointing(
    model: nn.Module,
    offload: bool = False,
    offload_hooks: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> None:
    """Checkpoint every decoder layer of a transformers model (non-reentrant), in place.

    Args:
        model: a transformers ``PreTrainedModel`` that supports gradient checkpointing.
        offload: keep the layer inputs saved for the recompute in (pinned) host memory instead of on the
            device: ``layers x tokens x hidden`` 16-bit values leave the GPU, at the cost of one copy
            each way per layer and step.
        offload_hooks: the saved-tensor hooks that do the offloading (default
            ``torch.autograd.graph.save_on_cpu``); the memory model passes a fake-tensor twin.

    Raises:
        ValueError: the model does not support gradient checkpointing.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()  # the base is frozen: checkpointed blocks still need a grad path
    if offload:
        fn = functools.partial(_offloaded, offload_hooks or _host_offload)
        for module in model.modules():
            # transformers calls each checkpointed layer through this per-instance attribute
            if getattr(module, "gradient_checkpointing", False) and hasattr(module, "_gradient_checkpointing_func"):
                module._gradient_checkpointing_func = fn


def lm_head_skip(quantize_lm_head: bool) -> tuple[str, ...]:
    """Modules a QLoRA quantization leaves in 16 bits: the output head, unless it is quantized too.

    Quantizing the head (``--quantize-lm-head``) saves ``0.75 x vocab x hidden x 2`` bytes and costs
    quality: the logits then come from 4-bit weights.
    """
    return () if quantize_lm_head else ("lm_head",)
