"""Prompt tuning and prefix tuning for causal LMs, with HF PEFT's semantics and tensors.

Prompt tuning: a table ``embedding.weight [num_virtual_tokens, hidden]`` is prepended to the input
embeddings; the attention mask gets ``num_virtual_tokens`` ones in front and labels ``-100``.

Prefix tuning: a table ``[num_virtual_tokens, num_layers * 2 * kv_dim]`` (learned directly, or the
output of ``Linear(token_dim, encoder_hidden_size) -> tanh -> Linear(.., num_layers * 2 * token_dim)``
over learned ``[num_virtual_tokens, token_dim]`` embeddings when ``prefix_projection``) holds each
layer's key then value prefix, ``kv_dim = head_dim * num_key_value_heads``. It is reshaped to
``[layers * 2, batch, kv_heads, num_virtual_tokens, head_dim]`` and handed to the model as a
transformers ``DynamicCache``; the attention mask gets ones in front and explicit position ids move
by ``num_virtual_tokens``. Files hold one tensor, ``prompt_embeddings``: the prompt table, or the
post-MLP prefix table. A model loaded for inference keeps only that table (no MLP), like HF PEFT.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fastpeft.peft import prompt_tasks
from fastpeft.peft.config import PrefixTuningConfig, PromptTuningConfig, _PromptLearningConfig
from fastpeft.peft.io import check_state_dict
from fastpeft.peft.sizes import check_fits

if TYPE_CHECKING:
    from fastpeft.peft.model import PeftModel

__all__ = [
    "PrefixEncoder",
    "PromptEmbedding",
    "build_prompt_encoder",
    "embeddings_to_save",
    "forward",
    "generate",
    "load_embeddings",
]


def _cfg(model_config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(model_config, name, None)
        if isinstance(value, int):
            return value
    return None


def _fill_dims(model: nn.Module, config: _PromptLearningConfig) -> None:
    """Fill ``num_layers``, ``token_dim``, ``num_attention_heads`` (kv heads for prefix tuning) from the model."""
    mc = getattr(model, "config", None)
    if mc is not None and hasattr(mc, "get_text_config"):
        mc = mc.get_text_config()
    if config.num_layers is None:
        config.num_layers = _cfg(mc, "num_hidden_layers", "num_layers", "n_layer")
    if config.token_dim is None:
        config.token_dim = _cfg(mc, "hidden_size", "n_embd", "d_model")
    if config.num_attention_heads is None:
        config.num_attention_heads = _cfg(mc, "num_attention_heads", "n_head", "num_heads")
        kv_heads = _cfg(mc, "num_key_value_heads")
        if isinstance(config, PrefixTuningConfig) and kv_heads is not None and config.token_dim is not None:
            # Grouped-query attention: the cache holds kv_heads heads of head_dim each.
            head_dim = _cfg(mc, "head_dim") or config.token_dim // config.num_attention_heads
            config.token_dim = head_dim * kv_heads
            config.num_attention_heads = kv_heads
    missing = [n for n in ("num_layers", "token_dim", "num_attention_heads") if getattr(config, n) is None]
    if missing:
        raise ValueError(f"{type(config).__name__}: cannot infer {missing} from the model config; set them")
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 1
    if isinstance(config, PrefixTuningConfig) and config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim
    _check_dims(model, mc, config)


def _check_dims(model: nn.Module, mc: Any, config: _PromptLearningConfig) -> None:
    """The config's dims (set by hand, or read from a file made for another model) must be this model's: a
    prompt table of another width fails deep inside a concatenation, a prefix of other heads inside attention."""
    owner = type(config).__name__
    if isinstance(config, PromptTuningConfig):
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        width = getattr(getattr(embeddings, "weight", None), "shape", (None, None))[1]
        width = width if width is not None else _cfg(mc, "hidden_size", "n_embd", "d_model")
        if width is not None and config.token_dim != width:
            raise ValueError(f"{owner}: token_dim={config.token_dim} does not match the embedding width {width}")
        return
    layers = _cfg(mc, "num_hidden_layers", "num_layers", "n_layer")
    if layers is not None and config.num_layers != layers:
        raise ValueError(f"{owner}: num_layers={config.num_layers} does not match the model's {layers} layers")
    hidden, heads = _cfg(mc, "hidden_size", "n_embd", "d_model"), _cfg(mc, "num_attention_heads", "n_head")
    kv_heads = _cfg(mc, "num_key_value_heads") or heads
    head_dim = _cfg(mc, "head_dim") or (hidden // heads if hidden and heads else None)
    if kv_heads is None or head_dim is None:
        return
    if (config.num_attention_heads, config.token_dim) != (kv_heads, head_dim * kv_heads):
        raise ValueError(
            f"{owner}: num_attention_heads={config.num_attention_heads}, token_dim={config.token_dim} do not match "
            f"the model's cache of {kv_heads} key/value heads of {head_dim} (token_dim {head_dim * kv_heads})"
        )


class PromptEmbedding(nn.Module):
    """``embedding.weight [num_virtual_tokens, token_dim]``: the learned virtual-token embeddings."""

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Module) -> None:
        super().__init__()
        n = config.num_virtual_tokens * config.num_transformer_submodules
        self.embedding = nn.Embedding(n, config.token_dim)
        if config.prompt_tuning_init == "TEXT" and not config.inference_mode:
            tokenizer = config.tokenizer_name_or_path
            if isinstance(tokenizer, (str, Path)):
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
            ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
            if not ids:
                raise ValueError("PromptTuningConfig: prompt_tuning_init_text tokenizes to nothing")
            ids = (ids * math.ceil(n / len(ids)))[:n]  # repeat the text, then cut to length
            weight = word_embeddings.weight
            with torch.no_grad():
                init = word_embeddings(torch.tensor(ids, device=weight.device)).detach().clone().float()
                self.embedding.weight.copy_(init.to(self.embedding.weight.device))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(indices)


class PrefixEncoder(nn.Module):
    """Produces the ``[batch, num_virtual_tokens, num_layers * 2 * token_dim]`` prefix table."""

    def __init__(self, config: PrefixTuningConfig) -> None:
        super().__init__()
        n, dim, layers = config.num_virtual_tokens, config.token_dim, config.num_layers
        self.prefix_projection = config.prefix_projection and not config.inference_mode
        if self.prefix_projection:
            self.embedding = nn.Embedding(n, dim)
            self.transform = nn.Sequential(
                nn.Linear(dim, config.encoder_hidden_size),
                nn.Tanh(),
                nn.Linear(config.encoder_hidden_size, layers * 2 * dim),
            )
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(n, layers * 2 * dim)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        out = self.embedding(indices)
        return self.transform(out) if self.prefix_projection else out


def _check_prompt_fits(model: nn.Module, config: _PromptLearningConfig) -> None:
    """The virtual tokens take positions of the model's context, and their table memory: check both first."""
    mc = getattr(model, "config", None)
    if mc is not None and hasattr(mc, "get_text_config"):
        mc = mc.get_text_config()
    n = config.num_virtual_tokens
    limit = _cfg(mc, "max_position_embeddings", "n_positions")
    if limit is not None and n >= limit:
        raise ValueError(
            f"{type(config).__name__}: num_virtual_tokens={n} leaves no room in the model's "
            f"{limit} positions (max_position_embeddings)"
        )
    dim, layers = config.token_dim, config.num_layers
    if isinstance(config, PromptTuningConfig):
        numel = n * config.num_transformer_submodules * dim
    elif config.prefix_projection and not config.inference_mode:
        hidden = config.encoder_hidden_size
        numel = n * dim + (dim + 1) * hidden + (hidden + 1) * layers * 2 * dim
    else:
        numel = n * layers * 2 * dim
    ref = next(iter(model.parameters()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    check_fits(4 * numel, device, f"{type(config).__name__} with num_virtual_tokens={n}")


def build_prompt_encoder(model: nn.Module, config: _PromptLearningConfig) -> nn.Module:
    """The encoder for ``config`` (model dims filled into ``config``), on the model's device."""
    prompt_tasks.check_task(config, model)  # CAUSAL_LM here; SEQ_CLS and SEQ_2_SEQ_LM in fastpeft.peft.prompt_tasks
    if config.num_virtual_tokens is None:
        raise ValueError(f"{type(config).__name__}: num_virtual_tokens must be set")
    if any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) and isinstance(
        config, PrefixTuningConfig
    ):
        raise ValueError("prefix tuning does not work with gradient checkpointing (the prefix lives in the cache)")
    _fill_dims(model, config)
    _check_prompt_fits(model, config)
    if isinstance(config, PromptTuningConfig):
        encoder = PromptEmbedding(config, model.get_input_embeddings())
    else:
        encoder = PrefixEncoder(config)
    encoder.train(model.training)
    ref = next(iter(model.parameters()), None)
    return encoder.to(ref.device) if ref is not None else encoder


def _table(pm: PeftModel, batch_size: int) -> torch.Tensor:
    """The active adapter's ``[batch, num_virtual_tokens, width]`` table."""
    config = pm.active_peft_config
    encoder = pm.prompt_encoder[pm.active_adapter]
    device = encoder.embedding.weight.device
    if isinstance(config, PrefixTuningConfig) and config.inference_mode:
        return encoder.embedding.weight.repeat(batch_size, 1, 1)
    idx = torch.arange(config.num_virtual_tokens, device=device).unsqueeze(0).expand(batch_size, -1)
    return encoder(idx)


def _prefix_cache(pm: PeftModel, batch_size: int) -> Any:
    from transformers import DynamicCache

    config = pm.active_peft_config
    table = _table(pm, batch_size).to(pm.base_model.dtype)
    heads = config.num_attention_heads
    kv = table.view(batch_size, config.num_virtual_tokens, config.num_layers * 2, heads, config.token_dim // heads)
    kv = kv.permute(2, 0, 3, 1, 4)  # [layers * 2, batch, kv_heads, virtual tokens, head_dim]
    pairs = [(kv[2 * i], kv[2 * i + 1]) for i in range(config.num_layers)]
    try:
        return DynamicCache(pairs)
    except TypeError:  # transformers < 4.56 builds it from the legacy tuple format only
        return DynamicCache.from_legacy_cache(tuple(pairs))


def _batch_size(input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> int:
    if input_ids is None and inputs_embeds is None:
        raise ValueError("give input_ids or inputs_embeds")
    return (input_ids if input_ids is not None else inputs_embeds).shape[0]


def _adjust_ids(config: _PromptLearningConfig, kwargs: dict[str, Any]) -> None:
    if kwargs.get("position_ids") is not None:
        if isinstance(config, PrefixTuningConfig):
            kwargs["position_ids"] = kwargs["position_ids"] + config.num_virtual_tokens
        else:
            kwargs["position_ids"] = None  # positions are recomputed over prompt + input, as in HF PEFT
    kwargs.pop("token_type_ids", None)


def forward(
    pm: PeftModel,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    labels: torch.Tensor | None,
    **kwargs: Any,
) -> Any:
    """Causal-LM forward with the active prompt / prefix (``input_ids [B, T]``, ``attention_mask [B, T]``)."""
    config = pm.active_peft_config
    batch = _batch_size(input_ids, inputs_embeds)
    if config.task_type == "SEQ_CLS":
        return prompt_tasks.seq_cls_forward(pm, _table(pm, batch), input_ids, attention_mask, inputs_embeds, labels,
                                            kwargs)  # fmt: skip
    if config.task_type == "SEQ_2_SEQ_LM":
        return prompt_tasks.seq2seq_forward(pm, _table(pm, batch), input_ids, attention_mask, inputs_embeds, labels,
                                            kwargs)  # fmt: skip
    n = config.num_virtual_tokens
    if attention_mask is not None:
        ones = torch.ones(batch, n, dtype=attention_mask.dtype, device=attention_mask.device)
        attention_mask = torch.cat((ones, attention_mask), dim=1)
    _adjust_ids(config, kwargs)
    model = pm.base_model
    if isinstance(config, PrefixTuningConfig):
        kwargs[_cache_kwarg(model)] = _prefix_cache(pm, batch)
        return model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels,
                     **kwargs)  # fmt: skip
    if inputs_embeds is None:
        inputs_embeds = model.get_input_embeddings()(input_ids)
    if labels is not None:
        labels = torch.cat((torch.full((batch, n), -100, dtype=labels.dtype, device=labels.device), labels), dim=1)
    prompts = _table(pm, batch).to(inputs_embeds.dtype)
    inputs_embeds = torch.cat((prompts, inputs_embeds), dim=1)
    return model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)


_cache_kwarg = prompt_tasks.cache_kwarg


def generate(pm: PeftModel, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``model.generate`` with the active prompt / prefix; returns ``[B, T + new]`` ids like the model's.

    Done purely through generate's inputs, never by hooking the model:

    - prompt tuning: ``inputs_embeds = [prompt; embed(input_ids)]`` with the mask extended; generate
      then returns only the new tokens, and ``input_ids`` is put back in front.
    - prefix tuning: the prefix goes in as a pre-filled cache; generate assumes a cache covers the
      first tokens of ``input_ids``, so ``num_virtual_tokens`` placeholder ids are put in front (their
      positions are the prefix's) and cut from the result.
    """
    config = pm.active_peft_config
    model = pm.base_model
    input_ids = kwargs.pop("input_ids", None)
    if args:
        if input_ids is not None or len(args) > 1:
            raise TypeError("prompt-learning generate() takes input_ids as its only positional argument")
        input_ids = args[0]
    if input_ids is None:
        raise ValueError("prompt-learning generate() needs input_ids")
    if kwargs.get("inputs_embeds") is not None or kwargs.get(_cache_kwarg(model)) is not None:
        raise ValueError("prompt-learning generate() builds inputs_embeds / the cache itself; do not pass them")
    if config.task_type == "SEQ_2_SEQ_LM":
        return prompt_tasks.seq2seq_generate(pm, _table(pm, input_ids.shape[0]), input_ids, kwargs)
    batch, n = input_ids.shape[0], config.num_virtual_tokens
    mask = kwargs.pop("attention_mask", None)
    if mask is None:
        mask = torch.ones_like(input_ids)
    kwargs["attention_mask"] = torch.cat((torch.ones(batch, n, dtype=mask.dtype, device=mask.device), mask), dim=1)
    if isinstance(config, PrefixTuningConfig):
        if kwargs.get("max_length") is not None:
            kwargs["max_length"] += n
        placeholder = torch.zeros(batch, n, dtype=input_ids.dtype, device=input_ids.device)
        kwargs[_cache_kwarg(model)] = _prefix_cache(pm, batch)
        out = model.generate(input_ids=torch.cat((placeholder, input_ids), dim=1), **kwargs)
        return _strip(out, n)
    embeds = model.get_input_embeddings()(input_ids)
    prompts = _table(pm, batch).to(embeds.dtype)
    if kwargs.get("max_length") is not None:
        kwargs["max_length"] += n
    out = model.generate(inputs_embeds=torch.cat((prompts, embeds), dim=1), **kwargs)
    if isinstance(out, torch.Tensor):
        return torch.cat((input_ids, out), dim=1)
    out.sequences = torch.cat((input_ids, out.sequences), dim=1)
    return out


def _strip(out: Any, n: int) -> Any:
    if isinstance(out, torch.Tensor):
        return out[:, n:]
    out.sequences = out.sequences[:, n:]
    return out


def embeddings_to_save(pm: PeftModel, adapter_name: str) -> torch.Tensor:
    """The ``prompt_embeddings`` tensor HF PEFT writes: ``[num_virtual_tokens, width]``."""
    config = pm.peft_config[adapter_name]
    encoder = pm.prompt_encoder[adapter_name]
    if config.inference_mode:
        return encoder.embedding.weight.detach()
    # every row of the table: num_virtual_tokens * num_transformer_submodules for prompt tuning (HF PEFT's file)
    idx = torch.arange(encoder.embedding.num_embeddings, device=encoder.embedding.weight.device).unsqueeze(0)
    with torch.no_grad():
        return encoder(idx)[0].detach()


def load_embeddings(
    pm: PeftModel,
    adapter_name: str,
    tensors: dict[str, torch.Tensor],
    source: Path,
    others: dict[str, torch.Size] | None = None,
) -> None:
    """Load ``prompt_embeddings`` from a file into adapter ``adapter_name``; ``others``: the other keys the file
    must hold (a SEQ_CLS head's), with their shapes, loaded by the caller."""
    encoder = pm.prompt_encoder[adapter_name]
    if isinstance(encoder, PrefixEncoder) and encoder.prefix_projection:
        raise ValueError(
            f"{source}: a prefix_projection adapter stores only its post-MLP table, which cannot be trained "
            "further; load it with is_trainable=False"
        )
    rows, width = encoder.embedding.weight.shape
    check_state_dict(source, tensors, {"prompt_embeddings": torch.Size([rows, width]), **(others or {})})
    with torch.no_grad():
        encoder.embedding.weight.copy_(tensors["prompt_embeddings"].to(encoder.embedding.weight))
