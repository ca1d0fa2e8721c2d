"""``PeftModel`` methods for bottleneck adapters: the active composition block's pieces (the ``modules_to_save``
copies that answer, ``Parallel``'s repeated inputs; see fastpeft.peft.composition) and AdapterFusion
(AdapterHub's ``add_adapter_fusion``, ``delete_adapter_fusion``, ``save_adapter_fusion``, ``load_adapter_fusion``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from fastpeft.peft import adapters as adp
from fastpeft.peft import lora
from fastpeft.peft.composition import AdapterComposition, Fuse, Parallel, fusions
from fastpeft.peft.io import CONFIG_NAME, WEIGHTS_NAME, read_adapter_dir, write_adapter_dir
from fastpeft.peft.model_files import compute_dtype, load_values
from fastpeft.peft.model_lora import _batch_input

__all__ = ["AdapterMethods"]


class AdapterMethods:
    """Mixed into ``PeftModel``; the methods apply to bottleneck adapters."""

    # -- composition -----------------------------------------------------------------------------

    def _head_adapter(self, names: list[str]) -> str:
        """The one adapter of an active composition whose ``modules_to_save`` copies answer (the first name)."""
        with_heads = [n for n in names if getattr(self.peft_config[n], "modules_to_save", None)]
        if len(with_heads) > 1:
            raise ValueError(
                f"adapters {with_heads} each train their own copy of modules_to_save (or a SEQ_CLS head); only one "
                "adapter with modules_to_save can be active at a time"
            )
        return with_heads[0] if with_heads else names[0]

    def _activate_heads(self, names: list[str], trainable: bool) -> None:
        """modules_to_save copies when LoRA and bottleneck adapters are active together: each wrapper answers with
        the active adapter that has a copy there."""
        for _, wrapper in lora._wrappers(self.get_base_model()):
            present = [n for n in names if wrapper.has_adapter(n)]
            if len(present) > 1:
                raise ValueError(
                    f"adapters {present} each train their own copy of the same module (modules_to_save); only one "
                    "of them can be active"
                )
            if present:
                wrapper.active_adapter = present[0]
                wrapper.modules_to_save[present[0]].requires_grad_(trainable)

    def set_active_adapters(
        self, adapter_setup: str | AdapterComposition | list[str | AdapterComposition], inference_mode: bool = False
    ) -> None:
        """AdapterHub's name for ``set_adapter``: ``set_active_adapters(Stack("lang", "task"))``."""
        self.set_adapter(adapter_setup, inference_mode=inference_mode)

    def _parallel_inputs(self, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        """Under an active ``Parallel`` block: every input with the batch's rows repeated once per adapter
        (``[x; x; ...]``), so adapter ``i`` gets rows ``i·B ... (i+1)·B - 1`` (see fastpeft.peft.composition)."""
        block = self._composition
        if not isinstance(block, Parallel) or self._disabled:
            return args, kwargs
        first = _batch_input(args, kwargs)
        if first is None:
            raise ValueError("Parallel: found no batch input (input_ids or inputs_embeds) to repeat per adapter")
        rows, n = first.shape[0], len(block.children)

        def rep(v: Any) -> Any:
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == rows:
                return v.repeat(n, *([1] * (v.dim() - 1)))
            return v

        return tuple(rep(a) for a in args), {k: rep(v) for k, v in kwargs.items()}

    # -- AdapterFusion ---------------------------------------------------------------------------

    @staticmethod
    def _fuse_block(adapter_names: Fuse | list[str] | tuple[str, ...] | str) -> Fuse:
        if isinstance(adapter_names, str):
            adapter_names = adapter_names.split(",")  # AdapterHub's fusion name, "a,b"
        return adapter_names if isinstance(adapter_names, Fuse) else Fuse(*adapter_names)

    def _fuse(self, adapter_names: Fuse | list[str] | tuple[str, ...] | str) -> Fuse:
        fuse = self._fuse_block(adapter_names)
        if not all(isinstance(c, str) for c in fuse.children):
            raise ValueError(f"adapter_names: a fusion takes adapter names only, got {fuse!r}")
        bottleneck = self._names_of("adapter")
        unknown = [n for n in fuse.children if n not in bottleneck]
        if unknown:
            raise ValueError(f"adapter_names: no bottleneck adapter(s) {unknown} (have {sorted(bottleneck)})")
        return fuse

    def _require_fusion(self, fuse: Fuse) -> None:
        if fuse.name not in self._fusions:
            raise ValueError(f"adapter_names: no fusion {fuse.name!r} (have {sorted(self._fusions)})")

    def add_adapter_fusion(self, adapter_names: Fuse | list[str] | str, set_active: bool = False) -> None:
        """Add an AdapterFusion layer over ``adapter_names`` (a ``Fuse`` block or the names) in every wrapped layer
        holding one of them (AdapterHub's method); activate it with ``set_active_adapters(Fuse(...))``, which
        trains the fusion and freezes its adapters (see fastpeft.peft.composition).

        Raises:
            ValueError: a name that is not a bottleneck adapter, or a fusion of these adapters already added.
        """
        fuse = self._fuse(adapter_names)
        if fuse.name in self._fusions:
            raise ValueError(f"adapter_names: fusion {fuse.name!r} already exists")
        adp.add_fusion(self.get_base_model(), fuse)
        self._fusions[fuse.name] = fuse
        if set_active:
            self.set_adapter(fuse)
        else:
            self.set_adapter(self._active_setup())  # the new layers stay frozen unless active

    def delete_adapter_fusion(self, adapter_names: Fuse | list[str] | str) -> None:
        """Remove a fusion (an active block using it is dropped: its first adapter stays active)."""
        fuse = self._fuse_block(adapter_names)
        self._require_fusion(fuse)
        adp.delete_fusion(self.get_base_model(), fuse.name)
        del self._fusions[fuse.name]
        block = self._composition
        if block is not None and any(f.name == fuse.name for f in fusions(block)):
            self._drop_block(block)
            if self._active_adapters:
                self.set_adapter(self._active_adapters)

    def save_adapter_fusion(self, save_directory: str | os.PathLike, adapter_names: Fuse | list[str] | str) -> None:
        """Write a fusion's layers to ``save_directory``: ``adapter_config.json`` (``peft_type``
        ``"BOTTLENECK_ADAPTER_FUSION"``, its ``adapters``) and ``adapter_model.safetensors`` with keys
        ``base_model.model.<P>.fusion.{query,key,value}.{weight,bias}`` (fastpeft's layout; the adapters themselves
        are saved with ``save_pretrained``)."""
        fuse = self._fuse(adapter_names)
        self._require_fusion(fuse)
        config = {"peft_type": "BOTTLENECK_ADAPTER_FUSION", "adapters": list(fuse.children), "fusion": "dynamic"}
        write_adapter_dir(save_directory, config, adp.fusion_file_params(self.get_base_model(), fuse.name))

    def load_adapter_fusion(
        self, model_id: str | os.PathLike, set_active: bool = False, allow_non_finite: bool = False
    ) -> Fuse:
        """Load a fusion written by ``save_adapter_fusion`` over adapters this model has (added or loaded first);
        a fusion that exists gets the file's values. Returns its ``Fuse`` block.

        Raises:
            FileNotFoundError: a file is missing.
            ValueError: not a fusion directory, adapters the model lacks, or tensors that do not fit (named).
        """
        directory = Path(model_id)
        cfg, tensors = read_adapter_dir(directory)
        cfg_path = directory / CONFIG_NAME
        names = cfg.get("adapters")
        if cfg.get("peft_type") != "BOTTLENECK_ADAPTER_FUSION" or not isinstance(names, list) or not names:
            raise ValueError(f"{cfg_path}: not an adapter fusion (peft_type {cfg.get('peft_type')!r})")
        if cfg.get("fusion", "dynamic") != "dynamic":
            raise ValueError(f"{cfg_path}: fusion {cfg.get('fusion')!r} is not supported (fastpeft's is 'dynamic')")
        try:
            fuse = self._fuse([str(n) for n in names])
        except ValueError as e:
            raise ValueError(f"{cfg_path}: {e}") from None
        fresh = fuse.name not in self._fusions
        if fresh:
            self.add_adapter_fusion(fuse)
        model = self.get_base_model()
        params = adp.fusion_file_params(model, fuse.name)
        try:
            load_values(directory / WEIGHTS_NAME, tensors, params, compute_dtype(model), allow_non_finite)
        except Exception:
            if fresh:
                self.delete_adapter_fusion(fuse)
            raise
        if set_active:
            self.set_adapter(fuse)
        return fuse
