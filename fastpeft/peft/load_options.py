"""The loading and saving options HF PEFT's ``from_pretrained`` / ``load_adapter`` / ``save_pretrained`` take,
checked in one place: the ones that apply to a local directory are honoured, hub arguments are accepted
and unused (fastpeft never downloads), and options fastpeft does not implement raise naming the option.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from fastpeft.nn.lora_init import is_weight_init
from fastpeft.peft.config import LoraConfig, PeftConfigBase, PromptTuningConfig

__all__ = ["LoadResult", "check_save_options", "local_adapter_dir", "named_source", "without_init"]


class LoadResult(NamedTuple):
    """What ``load_adapter`` / ``set_peft_model_state_dict`` return (HF PEFT returns torch's
    ``_IncompatibleKeys``, which has these two fields)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


# Keyword arguments HF PEFT hands to the hub; accepted and unused for local directories.
_HUB_KWARGS = frozenset(
    {"revision", "cache_dir", "token", "use_auth_token", "local_files_only", "force_download", "proxies",
     "resume_download", "push_to_hub", "commit_message", "private", "create_pr", "max_shard_size", "variant",
     "device_map", "max_memory", "offload_folder", "offload_dir", "offload_index", "use_safetensors",
     "adapter_name", "subfolder", "user_agent"}
)  # fmt: skip


def local_adapter_dir(model_id: str | os.PathLike, key_mapping: dict | None, kwargs: dict[str, Any]) -> Path:
    """The local directory to read, after checking the loading options HF PEFT takes."""
    if key_mapping:
        raise ValueError("key_mapping is not supported: fastpeft reads HF PEFT's own key names")
    unknown = set(kwargs) - _HUB_KWARGS
    if unknown:
        raise TypeError(f"unexpected keyword arguments {sorted(unknown)}")
    directory = Path(model_id)
    if kwargs.get("subfolder"):
        directory = directory / kwargs["subfolder"]
    if not directory.exists() and not os.path.isabs(model_id) and str(model_id).count("/") == 1:
        raise FileNotFoundError(
            f"{model_id}: no such local directory; fastpeft never downloads (fetch it first, e.g. with "
            "huggingface_hub.snapshot_download, and pass the local path)"
        )
    return directory


def check_save_options(
    safe_serialization: bool,
    save_embedding_layers: str | bool,
    path_initial_model_for_weight_conversion: str | None,
    kwargs: dict[str, Any],
) -> None:
    """Refuse the ``save_pretrained`` options fastpeft does not implement, naming each.

    Raises:
        ValueError: ``safe_serialization=False`` (fastpeft never writes pickle files; HF PEFT reads the
            safetensors file as well), ``save_embedding_layers=True``, a PiSSA / OLoRA conversion path.
        TypeError: an unknown keyword argument.
    """
    if not safe_serialization:
        raise ValueError(
            "save_pretrained(safe_serialization=False): fastpeft writes adapter_model.safetensors only "
            "(never pickle files); HF PEFT loads those as well"
        )
    if save_embedding_layers not in ("auto", False):
        raise ValueError(f"save_pretrained(save_embedding_layers={save_embedding_layers!r}) is not supported")
    if path_initial_model_for_weight_conversion is not None:
        raise ValueError(
            "save_pretrained(path_initial_model_for_weight_conversion=...) is not supported: save the "
            "PiSSA / OLoRA adapter as it is and keep its residual base model beside it"
        )
    unknown = set(kwargs) - _HUB_KWARGS
    if unknown:
        raise TypeError(f"save_pretrained() got unexpected keyword arguments {sorted(unknown)}")


@contextlib.contextmanager
def named_source(path: Path) -> Iterator[None]:
    """A ``ValueError`` building an adapter from a file's config is about that file: say so."""
    try:
        yield
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def without_init(config: PeftConfigBase) -> PeftConfigBase:
    """The config to build an adapter whose weights a file will overwrite: no TEXT init (no tokenizer needed),
    and no PiSSA / OLoRA init, which would rewrite the base weights the user handed in (a PiSSA adapter loads
    onto the residual base it was saved with)."""
    if isinstance(config, PromptTuningConfig) and config.prompt_tuning_init == "TEXT":
        return dataclasses.replace(config, prompt_tuning_init="RANDOM")
    if isinstance(config, LoraConfig) and is_weight_init(config.init_lora_weights):
        return dataclasses.replace(config, init_lora_weights=False)
    return config
