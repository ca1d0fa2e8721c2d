"""Checks of the LoRA options that take more than a type test: ``init_lora_weights`` (what fastpeft runs,
and why it refuses the rest), ``trainable_token_indices``, module paths in name lists, and name collections
given as sets."""

from __future__ import annotations

import re
from typing import Any

__all__ = ["_check_init", "_check_megatron", "_check_token_indices", "_listed", "check_module_path"]


def _listed(value: Any) -> Any:
    """A set or tuple of names as a sorted list (for the checks); anything else as it is."""
    return sorted(value) if isinstance(value, (set, frozenset)) else list(value) if isinstance(value, tuple) else value


# Characters a regular expression needs and a module path never has: a list entry holding one was meant as a
# regex (HF PEFT matches list entries literally, so it would silently match nothing).
_REGEX_CHARS = frozenset("()[]{}*+?|^$\\")


def check_module_path(owner: str, name: str, path: str) -> None:
    """A list entry naming modules or parameters: a dotted path (``"lm_head"``, ``"layers.0.mlp"``), matched as the
    whole path or its ``.suffix``.

    Raises:
        ValueError: an empty segment (``"../x"``, ``"a..b"``, ``""``), a path separator or whitespace, or a
            regular-expression character (give a str to match by regex).
    """
    segments = path.split(".")
    if not path or any(not seg for seg in segments):
        raise ValueError(f"{owner}: {name} entry {path!r} is not a module path (empty segment between dots)")
    if any(c in path for c in "/\\") or any(c.isspace() for c in path):
        raise ValueError(f"{owner}: {name} entry {path!r} is not a module path (a path separator or whitespace)")
    bad = sorted({c for c in path if c in _REGEX_CHARS})
    if bad:
        raise ValueError(
            f"{owner}: {name} entry {path!r} holds {''.join(bad)!r}: list entries are module names matched "
            "literally; to match by regular expression give one str instead of a list"
        )


def _check_megatron(use_dora: bool, megatron_config: Any) -> None:
    """``megatron_config`` with ``use_dora``: HF PEFT's refusal, in its words (fastpeft refuses any
    ``megatron_config`` but None: it has no Megatron ``ColumnParallelLinear`` / ``RowParallelLinear`` layers)."""
    if use_dora and megatron_config is not None:
        raise ValueError(
            "LoraConfig: DoRA does not support megatron_core, please set `use_dora=False` (fastpeft has no Megatron "
            "layers at all: megatron_config must be None)"
        )


# init_lora_weights values HF PEFT has that need what fastpeft does not do (calibration data, a
# quantize-and-correct loop, a variant's own forward): each is refused by name.
_INIT_REFUSED = {
    "loftq": "LoftQ alternates quantization and SVD against bitsandbytes' quantizer",
    "corda": "CorDA needs covariance statistics collected by running calibration data",
    "eva": "EVA needs activations collected by running calibration data",
    "lora_ga": "LoRA-GA needs gradients collected by running calibration data",
    "mica": "MiCA freezes lora_B, a LoRA variant fastpeft does not run",
}


def _check_init(value: Any) -> None:
    """``init_lora_weights``: True / False, "gaussian", "pissa", "pissa_niter_<K>", "olora" or "orthogonal"."""
    if value is True or value is False:
        return
    if isinstance(value, str):
        low = value.lower()
        if low in ("gaussian", "pissa", "olora", "orthogonal") or re.fullmatch(r"pissa_niter_\d+", low):
            return
        if low in _INIT_REFUSED:
            raise ValueError(
                f"LoraConfig: option init_lora_weights={value!r} is not supported by fastpeft ({_INIT_REFUSED[low]}); "
                "supported: True, False, 'gaussian', 'pissa', 'pissa_niter_<K>', 'olora', 'orthogonal'"
            )
    raise ValueError(
        f"LoraConfig: init_lora_weights={value!r} is not supported (True, False, 'gaussian', 'pissa', "
        "'pissa_niter_<K>', 'olora' or 'orthogonal')"
    )


def _check_token_indices(value: Any) -> list[int] | dict[str, list[int]] | None:
    """``trainable_token_indices``: None, a list of token ids, or ``{module name: list of ids}``."""
    if value is None or value == [] or value == {}:
        return None if value is None else value

    def ids(v: Any, where: str) -> list[int]:
        if isinstance(v, tuple):
            v = list(v)
        if not isinstance(v, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v):
            raise ValueError(f"LoraConfig: trainable_token_indices{where} must be a list of token ids, got {v!r}")
        return v

    if isinstance(value, dict):
        return {str(k): ids(v, f"[{k!r}]") for k, v in value.items()}
    return ids(value, "")
