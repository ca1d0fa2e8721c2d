"""Prompt and prefix tuning beyond causal LMs, as HF PEFT runs them: sequence classification and encoder-decoders.

- ``SEQ_CLS`` (BERT, Llama, ... ``ForSequenceClassification``), prompt tuning: the virtual tokens go in front of
  the input embeddings, the attention mask and ``token_type_ids`` (zeros) grow by as many, the labels (one per
  sequence) stay. The classification head (``classifier`` / ``score``) trains in full, as a
  ``modules_to_save`` copy per adapter (``fastpeft.peft.saved_modules``), stored beside ``prompt_embeddings`` as
  ``base_model.<head>.<param>``.
  Prefix tuning is refused there: HF PEFT 0.21 cannot run it on transformers 5 either (the models take no
  ``past_key_values``).
- ``SEQ_2_SEQ_LM`` (T5, BART), prompt tuning: ``num_transformer_submodules`` is 2 (HF PEFT's default), so the
  table holds ``2 * num_virtual_tokens`` rows, of which the first ``num_virtual_tokens`` go in front of the
  encoder's input embeddings; the decoder and the labels are untouched. Prefix tuning: the decoder's
  self-attention gets the prefix as a pre-filled cache, laid out exactly as HF PEFT lays it (its table doubled
  along the layer axis, then cut into groups of four per layer: self-attention key and value, then a
  cross-attention pair that is discarded for a fresh cache), and the decoder's attention mask grows by
  ``num_virtual_tokens``; the encoder is untouched.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fastpeft.peft.config import PrefixTuningConfig, _PromptLearningConfig

if TYPE_CHECKING:
    from fastpeft.peft.model import PeftModel

__all__ = ["TASKS", "cache_kwarg", "check_task", "seq2seq_forward", "seq2seq_generate", "seq_cls_forward"]

TASKS = ("CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM")


def check_task(config: _PromptLearningConfig, model: nn.Module | None = None) -> None:
    """Refuse the task types prompt learning does not run, or that ``model`` is not, naming them."""
    name = type(config).__name__
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    if model is not None and (config.task_type == "SEQ_2_SEQ_LM") != encoder_decoder and config.task_type in TASKS:
        kind = "an encoder-decoder" if encoder_decoder else "not an encoder-decoder"
        raise ValueError(f"{name}: task_type={config.task_type!r} but {type(model).__name__} is {kind}")
    if config.task_type not in TASKS:
        raise ValueError(
            f"{name}: task_type={config.task_type!r} is not supported; prompt learning runs {', '.join(TASKS)}"
        )
    if config.task_type == "SEQ_CLS" and isinstance(config, PrefixTuningConfig):
        raise ValueError(
            "PrefixTuningConfig: task_type='SEQ_CLS' is not supported (transformers 5's classification models "
            "take no cache; HF PEFT 0.21 refuses it there too): use PromptTuningConfig or LoRA"
        )
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 2 if config.task_type == "SEQ_2_SEQ_LM" else 1
    if config.num_transformer_submodules == 2 and config.task_type != "SEQ_2_SEQ_LM":
        raise ValueError(f"{name}: num_transformer_submodules=2 needs an encoder-decoder (task_type='SEQ_2_SEQ_LM')")
    if config.modules_to_save and config.task_type != "SEQ_CLS":
        raise ValueError(f"{name}: modules_to_save is supported for task_type='SEQ_CLS' (its head) only")


# -- forward ------------------------------------------------------------------------------------------


def _ones(batch: int, n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.ones(batch, n, dtype=like.dtype, device=like.device)


def seq_cls_forward(pm: PeftModel, table: torch.Tensor, input_ids: Any, attention_mask: Any, inputs_embeds: Any,
                    labels: Any, kwargs: dict[str, Any]) -> Any:  # fmt: skip
    """Prompt tuning for sequence classification (module doc); ``table [B, n, hidden]``."""
    model = pm.base_model
    batch, n = table.shape[0], table.shape[1]
    if attention_mask is not None:
        attention_mask = torch.cat((_ones(batch, n, attention_mask), attention_mask), dim=1)
    kwargs["position_ids"] = None  # recomputed over prompt + input, as HF PEFT does
    if kwargs.get("token_type_ids") is not None:
        tt = kwargs["token_type_ids"]
        kwargs["token_type_ids"] = torch.cat((torch.zeros(batch, n, dtype=tt.dtype, device=tt.device), tt), dim=1)
    if inputs_embeds is None:
        inputs_embeds = model.get_input_embeddings()(input_ids)
    inputs_embeds = torch.cat((table.to(inputs_embeds.dtype), inputs_embeds), dim=1)
    return model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)


def prefix_cache(config: PrefixTuningConfig, table: torch.Tensor) -> Any:
    """The encoder-decoder cache HF PEFT builds from a prefix table ``[B, n, num_layers * 2 * token_dim]``."""
    from transformers import DynamicCache, EncoderDecoderCache

    batch, n, heads = table.shape[0], config.num_virtual_tokens, config.num_attention_heads
    kv = table.view(batch, n, config.num_layers * 2, heads, config.token_dim // heads)
    kv = torch.cat([kv, kv], dim=2).permute(2, 0, 3, 1, 4)  # [layers * 4, batch, heads, n, head_dim]
    cache = EncoderDecoderCache(kv.split(4))
    cache.cross_attention_cache = DynamicCache()  # the encoder's output is computed afresh
    for layer in cache.is_updated:
        cache.is_updated[layer] = False
    return cache


def cache_kwarg(model: nn.Module) -> str:
    """The name the model's forward gives its KV cache (``cache`` in transformers 5, ``past_key_values`` before)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def seq2seq_forward(pm: PeftModel, table: torch.Tensor, input_ids: Any, attention_mask: Any, inputs_embeds: Any,
                    labels: Any, kwargs: dict[str, Any]) -> Any:  # fmt: skip
    """Prompt or prefix tuning of an encoder-decoder (module doc); ``table`` the active adapter's, ``[B, rows, w]``."""
    config = pm.active_peft_config
    model = pm.base_model
    batch, n = table.shape[0], config.num_virtual_tokens
    kwargs.pop("token_type_ids", None)
    if isinstance(config, PrefixTuningConfig):
        mask = kwargs.get("decoder_attention_mask")
        if mask is not None:
            kwargs["decoder_attention_mask"] = torch.cat((_ones(batch, n, mask), mask), dim=1)
        kwargs[cache_kwarg(model)] = prefix_cache(config, table.to(pm.base_model.dtype))
        return model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels,
                     **kwargs)  # fmt: skip
    kwargs.pop("position_ids", None)
    if inputs_embeds is None:
        inputs_embeds = model.get_input_embeddings()(input_ids)
    if attention_mask is not None:
        attention_mask = torch.cat((_ones(batch, n, attention_mask), attention_mask), dim=1)
    inputs_embeds = torch.cat((table[:, :n].to(inputs_embeds.dtype), inputs_embeds), dim=1)
    return model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)


def seq2seq_generate(pm: PeftModel, table: torch.Tensor, input_ids: torch.Tensor, kwargs: dict[str, Any]) -> Any:
    """``generate`` of an encoder-decoder with the active prompt: the prompt goes in front of the encoder's input
    embeddings; returns the decoder's tokens, as the model's own ``generate`` does."""
    config = pm.active_peft_config
    if isinstance(config, PrefixTuningConfig):
        raise NotImplementedError(
            "generate() with prefix tuning on an encoder-decoder is not supported (transformers' generate "
            "replaces a pre-filled decoder cache); the forward (training, scoring) is"
        )
    model = pm.base_model
    n = config.num_virtual_tokens
    mask = kwargs.pop("attention_mask", None)
    if mask is None:
        mask = torch.ones_like(input_ids)
    embeds = model.get_input_embeddings()(input_ids)
    kwargs["attention_mask"] = torch.cat((_ones(input_ids.shape[0], n, mask), mask), dim=1)
    return model.generate(inputs_embeds=torch.cat((table[:, :n].to(embeds.dtype), embeds), dim=1), **kwargs)
