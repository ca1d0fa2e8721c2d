"""``PeftModel``'s files: ``save_pretrained``, ``load_adapter`` and ``from_pretrained`` in HF PEFT's layout
(``adapter_config.json`` and ``adapter_model.safetensors`` per adapter; fastpeft.peft.io reads and writes them),
and the file keys of an adapter's live tensors (``_file_params``), which saving and loading share.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fastpeft.nn.checks import check_adapter_name
from fastpeft.peft import adapters as adp
from fastpeft.peft import lora, prompt, saved_modules
from fastpeft.peft.card import card_text, write_card_text
from fastpeft.peft.config import PeftConfigBase, config_from_dict
from fastpeft.peft.io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    check_output_dir,
    check_state_dict,
    check_tensor_values,
    read_adapter_dir,
    write_adapter_dir,
)
from fastpeft.peft.load_options import LoadResult, check_save_options, local_adapter_dir, named_source, without_init
from fastpeft.peft.tuner import adapter_kind

if TYPE_CHECKING:
    from fastpeft.peft.model import PeftModel

__all__ = ["FileMethods", "compute_dtype", "copy_values", "load_values"]


class FileMethods:
    """Mixed into ``PeftModel``: saving and loading adapters."""

    def _file_params(
        self, adapter_name: str, state_dict: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        config = self.peft_config[adapter_name]
        model = self.get_base_model()
        kind = adapter_kind(config)
        if kind == "lora":
            params = lora.lora_file_params(model, config, adapter_name)
            wrapped = adp.wrapper_paths(model)
            if wrapped:  # LoRA layers inside bottleneck adapter wrappers: the keys they have without them
                n = len(adp.PREFIX)
                params = {
                    adp.PREFIX + adp.logical_path(model, k[n:], wrapped) if k.startswith(adp.PREFIX) else k: t
                    for k, t in params.items()
                }
        elif kind == "adapter":
            params = adp.adapter_file_params(model, adapter_name)
            params.update(saved_modules.params(model, adapter_name, prefix=adp.PREFIX))
        else:
            params = {"prompt_embeddings": prompt.embeddings_to_save(self, adapter_name)}
            params.update(saved_modules.params(model, adapter_name))
        if state_dict is None:
            return params
        # the same tensors, by their names in the model's state dict (computed ones, such as a prefix
        # table after its MLP, have none and stay as computed)
        names = {id(t): k for k, t in self.state_dict(keep_vars=True).items()}
        return {key: state_dict.get(names.get(id(t), ""), t) for key, t in params.items()}

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        save_embedding_layers: str | bool = "auto",
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: str | None = None,
        state_dict: dict[str, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        """Write each adapter in HF PEFT's layout: ``default`` in ``save_directory``, others in ``<dir>/<name>/``;
        a README.md model card beside each, as HF PEFT writes.

        Args:
            save_directory: the directory (created if needed).
            safe_serialization: must be True: fastpeft writes safetensors only (HF PEFT reads them as well).
            selected_adapters: the adapters to save (default: all).
            save_embedding_layers: ``"auto"`` or False; fastpeft never resizes or saves whole embedding tables.
            is_main_process: False writes nothing (HF PEFT's multi-process convention).
            path_initial_model_for_weight_conversion: not supported (HF PEFT's PiSSA / OLoRA conversion).
            state_dict: the model's state dict to take the adapter's tensors from instead of its parameters, by
                the parameters' names (``transformers.Trainer`` passes one gathered from sharded processes).
            kwargs: HF PEFT passes hub-upload arguments here; none of them applies to a local save.

        Symbolic links inside ``save_directory`` are never written through: an adapter's folder that is a link
        is refused, and a link in place of one of the files is replaced by the file.

        Raises:
            ValueError: an unknown adapter, or an option fastpeft does not implement (named); ``save_directory``
                (or an adapter's folder in it) is a file or, for a folder fastpeft names, a symbolic link; an
                existing README.md there is not UTF-8. Nothing is written then.
            OSError: a file cannot be written (a read-only directory, a full disk), naming the directory.
        """
        check_save_options(safe_serialization, save_embedding_layers, path_initial_model_for_weight_conversion, kwargs)
        if not is_main_process:
            return
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        self._check_known(names)
        root = Path(save_directory)
        check_output_dir(root)
        targets = {name: root if name == "default" else root / name for name in names}
        cards = {}
        for name, target in targets.items():  # everything checked before the first file is written
            check_output_dir(target, inside=None if name == "default" else root)
            cards[name] = card_text(target, self.peft_config[name], self.get_base_model())
        for name, target in targets.items():
            config = self.peft_config[name].to_dict()
            config["inference_mode"] = True  # what HF PEFT writes: a saved adapter loads for inference
            write_adapter_dir(target, config, self._file_params(name, state_dict))
            write_card_text(target, cards[name])

    def push_to_hub(self, repo_id: str, *args: Any, **kwargs: Any) -> None:
        """Not done by fastpeft, which never touches the network.

        Raises:
            NotImplementedError: always; save locally, then upload the directory (for example with
                ``huggingface_hub.upload_folder(repo_id=..., folder_path=...)``).
        """
        raise NotImplementedError(
            f"push_to_hub({repo_id!r}): fastpeft never uploads; save_pretrained(dir) and upload the directory "
            "with huggingface_hub.upload_folder"
        )

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: str | torch.device | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> LoadResult:
        """Add adapter ``adapter_name`` from a directory written by fastpeft or HF PEFT; for a name that exists, the
        file's values replace the adapter's (HF PEFT's rule, which ``transformers.Trainer`` relies on to resume).

        Args:
            model_id: a local adapter directory (``subfolder=`` is joined to it).
            adapter_name: the name to give the adapter.
            is_trainable: keep it trainable; by default it loads frozen for inference.
            torch_device: where to read the tensors to; the adapter lives on its base layers' device anyway.
            autocast_adapter_dtype: as in ``PeftModel``.
            ephemeral_gpu_offload, low_cpu_mem_usage: accepted; nothing to do in fastpeft.
            key_mapping: not supported (fastpeft reads HF PEFT's key names only).
            kwargs: ``subfolder``, ``ignore_mismatched_sizes`` (keep the fresh adapter values for tensors whose
                shape differs, e.g. after resizing the vocabulary), ``allow_non_finite`` (load NaN, ±inf and
                values beyond the model's dtype, which are refused by default), ``device_map`` (adapters follow
                their base layers, so there is nothing to dispatch) and hub arguments (fastpeft reads local
                directories only).

        Returns:
            ``(missing_keys, unexpected_keys)``, both empty: a file that does not match fails instead.

        Raises:
            FileNotFoundError: a file is missing.
            ValueError: a bad ``adapter_name``; a file unreadable, or describing an adapter that does not fit
                the model or the adapter it replaces (the message names the file).
        """
        directory, cfg_dict, tensors, ignore_mismatched, allow = _read_source(
            adapter_name, model_id, key_mapping, kwargs
        )
        cfg_path = directory / CONFIG_NAME
        config = config_from_dict(cfg_dict, str(cfg_path))
        if adapter_name in self.peft_config:
            self._reload_adapter(adapter_name, config, tensors, directory, torch_device, ignore_mismatched, allow)
            if not is_trainable:
                self.eval()
            return LoadResult([], [])
        config.inference_mode = not is_trainable
        with named_source(cfg_path):
            self.add_adapter(adapter_name, without_init(config), autocast_adapter_dtype=autocast_adapter_dtype)
        self.peft_config[adapter_name] = config
        try:
            self._load_tensors(adapter_name, tensors, directory / WEIGHTS_NAME, torch_device, ignore_mismatched, allow)
        except Exception:
            self.delete_adapter(adapter_name)
            raise
        self.set_adapter(self._active_setup())
        return LoadResult([], [])

    def _reload_adapter(
        self,
        adapter_name: str,
        config: PeftConfigBase,
        tensors: dict[str, torch.Tensor],
        directory: Path,
        torch_device: str | torch.device | None,
        ignore_mismatched: bool,
        allow_non_finite: bool = False,
    ) -> None:
        # HF PEFT's rule for a name that exists: the file's values replace the adapter's (what
        # transformers.Trainer does on resume_from_checkpoint); the adapter's shape must be the file's.
        have = self.peft_config[adapter_name]
        if type(config) is not type(have) or getattr(config, "r", None) != getattr(have, "r", None):
            raise ValueError(
                f"{directory / CONFIG_NAME}: a {type(config).__name__} (r={getattr(config, 'r', None)}) cannot "
                f"replace adapter {adapter_name!r}, a {type(have).__name__} (r={getattr(have, 'r', None)})"
            )
        self._load_tensors(
            adapter_name, tensors, directory / WEIGHTS_NAME, torch_device, ignore_mismatched, allow_non_finite
        )

    def _load_tensors(
        self,
        adapter_name: str,
        tensors: dict[str, torch.Tensor],
        source: Path,
        torch_device: str | torch.device | None = None,
        ignore_mismatched_sizes: bool = False,
        allow_non_finite: bool = False,
    ) -> None:
        if torch_device is not None:
            tensors = {k: t.to(torch_device) for k, t in tensors.items()}
        compute = compute_dtype(self.get_base_model())
        if self._peft_kind == "prompt":
            weight = self.prompt_encoder[adapter_name].embedding.weight
            heads = saved_modules.params(self.get_base_model(), adapter_name)
            check_tensor_values(source, tensors, {"prompt_embeddings": weight, **heads}, compute, allow_non_finite)
            prompt.load_embeddings(self, adapter_name, tensors, source, {k: t.shape for k, t in heads.items()})
            copy_values(heads, tensors)
            return
        params = self._file_params(adapter_name)
        if ignore_mismatched_sizes:  # keep the fresh values where the file's shape does not fit (a resized vocab)
            bad = {k for k, t in params.items() if k in tensors and tensors[k].shape != t.shape}
            params = {k: t for k, t in params.items() if k not in bad}
            tensors = {k: t for k, t in tensors.items() if k not in bad}
        load_values(source, tensors, params, compute, allow_non_finite)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfigBase | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        torch_device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        """Load an adapter directory (fastpeft's or HF PEFT's) onto ``model``.

        Args:
            model: the base model (modified in place for LoRA and bottleneck adapters).
            model_id: a local adapter directory.
            adapter_name: the name to give the adapter.
            is_trainable: keep the adapter trainable; by default it loads frozen for inference.
            config: use this config instead of the directory's ``adapter_config.json``.
            autocast_adapter_dtype, torch_device, ephemeral_gpu_offload, low_cpu_mem_usage, key_mapping,
                kwargs: as in ``load_adapter``.

        Raises:
            FileNotFoundError: a file is missing.
            ValueError: a bad ``adapter_name``; a file is unreadable or does not match the model (missing,
                unexpected or mis-shaped keys, a config the model cannot take), named with the file. The
                model is left as it was.
        """
        directory, cfg_dict, tensors, ignore_mismatched, allow = _read_source(
            adapter_name, model_id, key_mapping, kwargs
        )
        cfg_path = directory / CONFIG_NAME
        from_file = config is None
        if from_file:
            config = config_from_dict(cfg_dict, str(cfg_path))
        config.inference_mode = not is_trainable
        with named_source(cfg_path) if from_file else contextlib.nullcontext():
            peft_model = cls(model, without_init(config), adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        peft_model.peft_config[adapter_name] = config
        try:
            peft_model._load_tensors(
                adapter_name, tensors, directory / WEIGHTS_NAME, torch_device, ignore_mismatched, allow
            )
        except Exception:
            peft_model.unload()  # hand the caller's model back as it was
            raise
        peft_model.set_adapter(adapter_name)
        if not is_trainable:
            peft_model.eval()  # loaded for inference: no dropout, as HF PEFT does
        return peft_model


def _read_source(
    adapter_name: str, model_id: str | os.PathLike, key_mapping: dict[str, str] | None, kwargs: dict[str, Any]
) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor], bool, bool]:
    """What ``load_adapter`` and ``from_pretrained`` read first: the name checked, then ``(directory, config dict,
    tensors, ignore_mismatched_sizes, allow_non_finite)``, the two options taken out of ``kwargs``."""
    check_adapter_name(adapter_name)
    ignore_mismatched = bool(kwargs.pop("ignore_mismatched_sizes", False))
    allow = bool(kwargs.pop("allow_non_finite", False))
    directory = local_adapter_dir(model_id, key_mapping, kwargs)
    cfg_dict, tensors = read_adapter_dir(directory)
    return directory, cfg_dict, tensors, ignore_mismatched, allow


def compute_dtype(model: nn.Module) -> torch.dtype | None:
    """The narrowest-range floating dtype among the model's frozen weights: what its layers compute in, and so
    what the adapters' values must fit (float16 holds only up to 65504)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point() and not p.requires_grad}
    return min(dtypes, key=lambda d: torch.finfo(d).max) if dtypes else None


def copy_values(params: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    """Copy each file tensor into the live tensor of the same key (on its device, in its dtype)."""
    with torch.no_grad():
        for key, t in params.items():
            t.copy_(tensors[key].to(device=t.device, dtype=t.dtype))


def load_values(
    source: Path,
    tensors: dict[str, torch.Tensor],
    params: dict[str, torch.Tensor],
    compute: torch.dtype | None,
    allow_non_finite: bool,
) -> None:
    """Check a file's ``tensors`` against the live ``params`` (keys, shapes, values that fit ``compute``), then
    copy them in; nothing is copied when a check fails."""
    check_state_dict(source, tensors, {k: t.shape for k, t in params.items()})
    check_tensor_values(source, tensors, params, compute, allow_non_finite)
    copy_values(params, tensors)
