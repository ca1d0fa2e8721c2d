"""The shape fields of a model config, checked before transformers builds anything from them.

transformers meets a mistyped ``config.json`` (``"hidden_size": "big"``, heads that do not divide the width, a
negative or zero size) with a validation traceback from deep inside its config classes, or builds a model that
fails later with an unnamed tensor-shape error. ``check_config_fields`` names the file and the field instead.
It also bounds ``num_hidden_layers``: a config claiming 100,000 layers would take minutes to build (and hours
to trace for ``fastpeft memory``) before anything could say it is wrong.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MAX_LAYERS", "check_config_fields"]

MAX_LAYERS = 1024  # the largest published models have about 130 layers
# Sizes that must be positive ints where present (transformers' names, and GPT-2's / T5's spellings).
_SIZES = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
          "vocab_size", "max_position_embeddings", "head_dim", "n_embd", "n_head", "n_layer", "n_positions", "n_inner",
          "d_model", "num_layers", "num_heads", "d_ff", "d_kv")  # fmt: skip


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_config_fields(where: str, fields: dict[str, Any]) -> None:
    """Refuse a config whose size fields are not positive ints or do not fit together.

    Args:
        where: the file (or GGUF file) the fields came from, for the message.
        fields: the config as a dict (``config.json``'s object, or a built config's ``to_dict()``); a
            ``text_config`` inside (multimodal models) is checked the same way.

    Raises:
        ValueError: one line naming ``where`` and the field.
    """
    for name in _SIZES:
        value = fields.get(name)
        if value is None:
            continue
        values = value if isinstance(value, list) and value else [value]  # per-layer lists (OpenELM's heads)
        if not all(_is_int(v) and v > 0 for v in values):
            raise ValueError(f"{where}: {name} must be a positive int, got {value!r:.60}")
    layers = fields.get("num_hidden_layers") or fields.get("n_layer")
    if _is_int(layers) and layers > MAX_LAYERS:
        raise ValueError(
            f"{where}: num_hidden_layers={layers:,d} is more layers than fastpeft builds (at most {MAX_LAYERS:,d}; "
            "the largest published models have about 130)"
        )
    hidden = fields.get("hidden_size") or fields.get("n_embd")
    heads = fields.get("num_attention_heads") or fields.get("n_head")
    kv_heads = fields.get("num_key_value_heads")
    if _is_int(hidden) and _is_int(heads) and fields.get("head_dim") is None and hidden % heads:
        raise ValueError(
            f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads {heads} (and no head_dim is given)"
        )
    if _is_int(heads) and _is_int(kv_heads) and heads % kv_heads:
        raise ValueError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    text = fields.get("text_config")
    if isinstance(text, dict):
        check_config_fields(f"{where} (text_config)", text)
