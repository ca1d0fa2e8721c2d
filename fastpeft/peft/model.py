"""``PeftModel`` and ``get_peft_model``: HF PEFT's model API over fastpeft's layers.

Module layout mirrors HF PEFT so parameter names (and so checkpoints and optimizer code) carry
over: for LoRA and bottleneck adapters ``peft_model.base_model`` is a ``TunerModel`` whose ``.model``
is the user's model (``base_model.model.<path>.lora_A.default.weight``); for prompt and prefix
tuning ``base_model`` is the user's model and the learned tables live in
``prompt_encoder.<adapter>``. Attribute lookups the wrapper does not answer go to the model
(``config``, ``generation_config``, ``gradient_checkpointing_enable``, ...).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastpeft import nn as fnn
from fastpeft.nn.checks import check_adapter_name
from fastpeft.peft import adapters as adp
from fastpeft.peft import interop, lora, prompt, saved_modules
from fastpeft.peft.card import card_text, write_card_text
from fastpeft.peft.composition import (
    AdapterComposition,
    Fuse,
    Parallel,
    flatten,
    fusions,
    parse_setup,
    trained_names,
)
from fastpeft.peft.config import (
    AdapterConfig,
    LoraConfig,
    PeftConfigBase,
    config_from_dict,
)
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
from fastpeft.peft.model_lora import LoraMethods, _batch_input
from fastpeft.peft.tuner import TunerModel

__all__ = ["LoadResult", "PeftModel", "TunerModel", "get_peft_model"]

# HF PEFT's parameter prefix per method (peft.utils.PEFT_TYPE_TO_PREFIX_MAPPING): an adapter name
# contained in it makes HF PEFT's key renaming misfire.
_PEFT_PREFIX = {"LORA": "lora_"}


def _kind(config: PeftConfigBase) -> str:
    if isinstance(config, LoraConfig):
        return "lora"
    if isinstance(config, AdapterConfig):
        return "adapter"
    if config.is_prompt_learning:
        return "prompt"
    raise TypeError(f"unsupported config type {type(config).__name__}")


class PeftModel(LoraMethods, nn.Module):
    """A model with one or more named adapters of one kind (LoRA, bottleneck adapters, or prompt learning), or
    LoRA and bottleneck adapters together.

    Bottleneck adapters compose with AdapterHub's blocks (``fastpeft.peft.composition``):
    ``set_active_adapters(Stack("lang", "task"))``; ``set_adapter(["lora_name", "adapter_name"])`` runs (and
    trains) a LoRA adapter and a bottleneck adapter (or a block) at once.

    Args:
        model: the model to adapt (modified in place for LoRA and bottleneck adapters).
        peft_config: the first adapter's config.
        adapter_name: its name.
        autocast_adapter_dtype: adapter weights created in float16 / bfloat16 (those of a 16-bit base)
            are kept in float32, as HF PEFT does by default; the fused kernels still run in the base's dtype
            with float32 accumulation, and the optimizer state is float32.
        low_cpu_mem_usage: accepted for HF PEFT compatibility; fastpeft builds adapters directly where
            their base lives (they are small), so there is nothing to defer.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> PeftModel:
        # a peft.PeftModel too where peft is installed, so that transformers, accelerate and TRL take it as one
        return super().__new__(interop.hf_peft_class(cls))

    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfigBase,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(peft_config, PeftConfigBase):
            raise TypeError(f"peft_config must be a config such as LoraConfig, got {type(peft_config).__name__}")
        nn.Module.__init__(self)  # named, not super(): see fastpeft.peft.interop
        self.peft_config: dict[str, PeftConfigBase] = {}
        self._peft_kind = _kind(peft_config)
        if self._peft_kind == "prompt":
            self.base_model = model
            self.prompt_encoder = nn.ModuleDict()
        else:
            self.base_model = TunerModel(model, self)
        self._active_adapters = [adapter_name]
        self._composition: AdapterComposition | None = None  # the active block of bottleneck adapters, if any
        self._fusions: dict[str, Fuse] = {}  # AdapterFusion layers added, by Fuse.name
        self._disabled = False
        self.add_adapter(adapter_name, peft_config, autocast_adapter_dtype=autocast_adapter_dtype)
        self.set_adapter(adapter_name)
        self.train(model.training)

    # -- structure -------------------------------------------------------------------------------

    def get_base_model(self) -> nn.Module:
        """The user's model (with the injected layers for LoRA / adapters)."""
        return self.base_model if self._peft_kind == "prompt" else self.base_model.model

    @property
    def active_adapter(self) -> str | list[str]:
        """The active adapter's name (a list when several LoRA adapters are active, as HF PEFT)."""
        names = self._active_adapters
        return names[0] if len(names) == 1 else list(names)

    @property
    def active_adapters(self) -> list[str]:
        """The names of the active adapters (those of the active composition block among them)."""
        return list(self._active_adapters)

    @property
    def active_composition(self) -> AdapterComposition | None:
        """The active composition block of bottleneck adapters (``Stack(...)``, ...), or None."""
        return self._composition

    def _names_of(self, kind: str) -> list[str]:
        return [n for n, c in self.peft_config.items() if _kind(c) == kind]

    @property
    def modules_to_save(self) -> set[str] | None:
        """The module names trained in full, over all adapters (HF PEFT's property)."""
        names = {m for c in self.peft_config.values() for m in getattr(c, "modules_to_save", None) or []}
        return names or None

    @property
    def targeted_module_names(self) -> list[str]:
        """Paths (in the user's model) of the modules the adapters wrap."""
        if not self._names_of("lora"):
            return []
        return sorted(n for n, m in lora.lora_layers(self.get_base_model()) if not n.endswith(".base_layer.out_proj"))

    @property
    def prefix(self) -> str:
        """The parameter-name prefix of this model's adapters (HF PEFT's ``LoraModel.prefix``)."""
        return {"lora": "lora_", "adapter": "bottleneck", "prompt": "prompt_encoder"}[self._peft_kind]

    @property
    def active_peft_config(self) -> PeftConfigBase:
        """The config of the (first) active adapter."""
        return self.peft_config[self._active_adapters[0]]

    def __getattr__(self, name: str) -> Any:
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            if name.startswith("_") or name == "base_model":
                raise
            if name == "model" and self._peft_kind != "prompt":
                return self.base_model.model  # HF PEFT reaches it through its LoraModel: peft_model.model
            return getattr(self.get_base_model(), name)

    # -- adapters by name ------------------------------------------------------------------------

    def add_adapter(
        self,
        adapter_name: str,
        peft_config: PeftConfigBase,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Add adapter ``adapter_name`` (same kind as the existing ones); the active adapter does not change.

        Every way an adapter enters (``get_peft_model``, ``from_pretrained``, ``load_adapter``) passes
        here, and the name is checked first, before anything is built.

        Raises:
            TypeError / ValueError: a bad name (letters, digits, ``_`` and ``-`` only, since a saved
                adapter's files go in ``<dir>/<name>/``; never part of HF PEFT's parameter prefix such as
                ``lora_``, which HF PEFT warns breaks loading), a name in use, or a config of another kind.
        """
        check_adapter_name(adapter_name)
        prefix = _PEFT_PREFIX.get(getattr(peft_config, "peft_type", ""))
        if prefix and adapter_name in prefix:
            raise ValueError(
                f"adapter name {adapter_name!r} is part of the {peft_config.peft_type} parameter prefix {prefix!r}; "
                "HF PEFT mis-loads such adapters, choose another name"
            )
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists")
        kind = _kind(peft_config)
        if kind != self._peft_kind and {kind, self._peft_kind} != {"lora", "adapter"}:
            # LoRA and bottleneck adapters live side by side; prompt learning changes the inputs instead
            raise ValueError(f"cannot mix a {kind} adapter into a PeftModel holding {self._peft_kind} adapters")
        if kind == "lora" and self._names_of("lora") and peft_config.bias != "none":
            # One shared base bias cannot be trained by two adapters; HF PEFT refuses this too.
            raise ValueError(
                f"adapter {adapter_name!r} has bias={peft_config.bias!r}: LoRA supports only 1 adapter with bias. "
                "When using multiple adapters, set bias='none' for every adapter but the first"
            )
        model = self.get_base_model()
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        try:
            if kind == "lora":
                if peft_config.task_type == "SEQ_CLS":
                    # HF PEFT trains and saves the classification head in full for this task type.
                    extra = [n for n in ("classifier", "score") if n not in (peft_config.modules_to_save or [])]
                    peft_config.modules_to_save = list(peft_config.modules_to_save or []) + extra
                lora.inject_lora(model, peft_config, adapter_name)
            elif kind == "adapter":
                adp.inject_adapters(model, peft_config, adapter_name)
                saved_modules.wrap(model, peft_config, adapter_name)  # SEQ_CLS heads, modules_to_save
            else:
                existing = next(iter(self.peft_config.values()), None)
                if existing is not None and existing.peft_type != peft_config.peft_type:
                    raise ValueError(f"cannot mix {peft_config.peft_type} with {existing.peft_type} adapters")
                self.prompt_encoder[adapter_name] = prompt.build_prompt_encoder(model, peft_config)
                saved_modules.wrap(model, peft_config, adapter_name)  # SEQ_CLS: the head trains in full
        except BaseException:
            self._remove_partial(adapter_name, kind)
            raise
        self.peft_config[adapter_name] = peft_config
        if autocast_adapter_dtype and kind == "lora":
            lora.cast_adapter_dtype(model, adapter_name)
        # Keep the active adapters' trainable state; the new one stays frozen until set_adapter.
        active = [a for a in self._active_adapters if a in self.peft_config]
        if active and active != [adapter_name]:
            self.set_adapter(self._active_setup())

    def _active_setup(self) -> list[str | AdapterComposition]:
        """What ``set_adapter`` takes to activate again what is active now (the composition block included)."""
        active = [a for a in self._active_adapters if a in self.peft_config]
        block = self._composition
        if block is None or not all(n in self.peft_config for n in block.flatten()):
            return active
        return [a for a in active if _kind(self.peft_config[a]) == "lora"] + [block]

    def _remove_partial(self, adapter_name: str, kind: str) -> None:
        """Take out what a failed ``add_adapter`` put into the model (all of it for the first adapter)."""
        model = self.get_base_model()
        if kind == "lora":
            lora.delete_lora_adapter(model, adapter_name, drop_empty=True)
        elif kind == "adapter":
            adp.delete_adapter(model, adapter_name, drop_empty=True)
        elif adapter_name in self.prompt_encoder:
            del self.prompt_encoder[adapter_name]

    def set_adapter(
        self,
        adapter_name: str | AdapterComposition | list[str | AdapterComposition],
        inference_mode: bool = False,
    ) -> None:
        """Make ``adapter_name`` the adapter used in forward and trained (frozen if it was loaded for
        inference, or with ``inference_mode``). LoRA adapters may be activated together with a list of
        names: their updates add up, and all of them train. Bottleneck adapters run together through one
        composition block (``Stack``, ``Parallel``, ``Average``, ``BatchSplit``; see
        ``fastpeft.peft.composition``), all of its adapters training; a list may hold LoRA names beside one
        bottleneck adapter or block, and then both run and train.

        Raises:
            ValueError: an unknown name, a list for prompt learning, two bottleneck adapters outside a block, or
                a block fastpeft does not run (``Fuse``, ``Parallel`` nested, a block naming an unknown adapter).
        """
        items = [adapter_name] if isinstance(adapter_name, (str, AdapterComposition)) else list(adapter_name)
        if not items:
            raise ValueError("set_adapter needs at least one adapter name")
        bottleneck = self._names_of("adapter")
        lora_names: list[str] = []
        setups: list[str | AdapterComposition] = []
        for item in items:
            if isinstance(item, AdapterComposition):
                setups.append(parse_setup(item, bottleneck, list(self._fusions)))
            elif not isinstance(item, str) or item not in self.peft_config:
                raise ValueError(f"Adapter {item} does not exist (have {sorted(self.peft_config)})")
            elif _kind(self.peft_config[item]) == "lora":
                lora_names.append(item)
            else:
                setups.append(item)
        if self._peft_kind == "prompt" and len(setups) > 1:
            raise ValueError(f"only LoRA adapters can be active together, these are {self._peft_kind} adapters")
        if len(setups) > 1:
            raise ValueError(
                "only LoRA adapters can be active together by a list of names; to run several bottleneck adapters at "
                "once, activate one composition block of them: Stack, Parallel, Average or BatchSplit "
                "(fastpeft.peft.composition)"
            )
        setup = setups[0] if setups else None
        names = lora_names + flatten(setup) if setup is not None else lora_names
        # a Fuse's adapters may have been loaded for inference: only the fusion layer trains then
        trained = lora_names + trained_names(setup)
        trainable = not inference_mode and not any(self.peft_config[n].inference_mode for n in trained)
        model = self.get_base_model()
        if self._peft_kind == "prompt":
            for p in model.parameters():
                p.requires_grad_(False)
            for name, enc in self.prompt_encoder.items():
                enc.requires_grad_(trainable and name == names[0])
            saved_modules.set_active(model, names[0], trainable)
        elif not self._names_of("lora"):  # bottleneck adapters alone
            adp.set_active_setup(model, setup, trainable)
            saved_modules.set_active(model, self._head_adapter(names), trainable)
        else:
            # freezes everything first, then unfreezes the LoRA adapters' weights (and their modules_to_save)
            lora.set_lora_adapter(model, self.peft_config, lora_names, trainable)
            if bottleneck:
                adp.set_active_setup(model, setup, trainable, freeze=False)
                if setup is not None:
                    self._activate_heads(names, trainable)
        self._composition = setup if isinstance(setup, AdapterComposition) else None
        self._active_adapters = names

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

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name``; deleting an active one leaves the other active ones (or, if none is left,
        the first remaining adapter) active. The last adapter can be deleted too: the model then runs its base.

        Raises:
            ValueError: an unknown name.
        """
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist (have {sorted(self.peft_config)})")
        model = self.get_base_model()
        kind = _kind(self.peft_config[adapter_name])
        if kind == "lora":
            lora.delete_lora_adapter(model, adapter_name)
        elif kind == "adapter":
            adp.delete_adapter(model, adapter_name)
            lora.delete_lora_adapter(model, adapter_name)  # its modules_to_save copies
        else:
            del self.prompt_encoder[adapter_name]
            lora.delete_lora_adapter(model, adapter_name)  # its modules_to_save copies (SEQ_CLS heads)
        del self.peft_config[adapter_name]
        for fuse in list(self._fusions.values()):
            if adapter_name in fuse.children:
                self.delete_adapter_fusion(fuse)
        block = self._composition
        if block is not None and adapter_name in block.flatten():
            # a block that loses an adapter means something else: its first remaining adapter stays active
            self._composition = None
            kept = [n for n in block.flatten() if n != adapter_name][:1]
            self._active_adapters = [a for a in self._active_adapters if a not in block.flatten()] + kept
        remaining = [a for a in self._active_setup() if a != adapter_name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        if remaining:
            self.set_adapter(remaining)
        else:
            self._active_adapters = []
            self._composition = None

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context manager: inside it the model computes exactly the base model, and the adapters' weights
        do not require grad (HF PEFT's rule); both come back as they were on exit."""
        model = self.get_base_model()
        if self._peft_kind == "lora" and not self._names_of("adapter"):
            previous = lora.set_lora_disabled(model, True)
        elif self._peft_kind in ("lora", "adapter"):
            previous = adp.set_adapters_disabled(model, True) + lora.set_lora_disabled(model, True)
        else:
            previous = lora.set_lora_disabled(model, True)  # the SEQ_CLS heads' copies
        grads = [(p, p.requires_grad) for p in self.parameters()]
        for p, _ in grads:
            p.requires_grad_(False)
        old = self._disabled
        self._disabled = True
        try:
            yield
        finally:
            self._disabled = old
            for module, state in previous:
                module.disable_adapters = state
            for p, state in grads:
                p.requires_grad_(state)

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Merge LoRA adapters into the base layers and return the plain model (HF PEFT's signature).

        Args:
            progressbar: accepted for compatibility; merging here is quick and silent.
            safe_merge: refuse (``ValueError``) a merge that produces non-finite weights.
            adapter_names: the adapters to merge (default: the active one).
        """
        if self._peft_kind != "lora" or self._names_of("adapter"):
            kind = "BOTTLENECK_ADAPTER" if self._names_of("adapter") else self.active_peft_config.peft_type
            raise ValueError(
                f"merge_and_unload: merging is not applicable to {kind} adapters "
                "(use unload() to get the base model back; merge_adapter merges LoRA adapters in place)"
            )
        for name in adapter_names or []:
            if name not in self.peft_config:
                raise ValueError(f"Adapter {name} does not exist (have {sorted(self.peft_config)})")
        return lora.unload_lora(self.get_base_model(), merge=True, safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the plain model."""
        model = self.get_base_model()
        if self._peft_kind == "lora" and not self._names_of("adapter"):
            return lora.unload_lora(model, merge=False)
        if self._peft_kind in ("lora", "adapter"):
            return saved_modules.unwrap(lora.unload_lora(adp.unload_adapters(model), merge=False))
        return saved_modules.unwrap(model)

    # -- counting --------------------------------------------------------------------------------

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts; a 4-bit weight (NF4Linear or bitsandbytes) counts its original
        number of elements."""
        trainable = total = 0
        for p in self.parameters():
            if p.dtype == torch.uint8:
                continue  # packed 4-bit storage, counted through its NF4Linear below
            total += p.numel()
            if p.requires_grad:
                trainable += p.numel()
        for m in self.modules():
            if isinstance(m, fnn.NF4Linear) or lora._is_bnb4(m):  # bitsandbytes' 4-bit layers not wrapped by LoRA
                total += m.in_features * m.out_features
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print HF PEFT's one-line summary (this method's whole purpose is console output)."""
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    # -- running ---------------------------------------------------------------------------------

    def forward(
        self,
        *args: Any,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        adapter_names: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """The adapted model's forward (for prompt learning: virtual tokens / prefixes added first).

        Args:
            adapter_names: LoRA only: one adapter name per sample (``"__base__"``: no adapter), so one batch
                serves several adapters (HF PEFT's mixed-adapter batches; inference only).
        """
        if self._peft_kind == "prompt" and not self._disabled:
            if adapter_names is not None:
                raise ValueError("adapter_names (mixed-adapter batches) works with LoRA adapters only")
            if args:
                input_ids, args = args[0], args[1:]
            if args:
                raise TypeError("prompt-learning forward takes input_ids positionally, the rest by keyword")
            return prompt.forward(self, input_ids, attention_mask, inputs_embeds, labels, **kwargs)
        named = dict(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels)
        kwargs.update({k: v for k, v in named.items() if v is not None})
        args, kwargs = self._parallel_inputs(args, kwargs)
        with self._mixed_batch(adapter_names, args, kwargs):
            return self.get_base_model()(*args, **kwargs)

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

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """The model's ``generate``, with the prompt / prefix in place for prompt learning."""
        if self._peft_kind == "prompt" and not self._disabled:
            return prompt.generate(self, *args, **kwargs)
        args, kwargs = self._parallel_inputs(args, kwargs)
        with self._mixed_batch(adapter_names, args, kwargs, generating=True):
            return self.get_base_model().generate(*args, **kwargs)

    # -- files -----------------------------------------------------------------------------------

    def _file_params(
        self, adapter_name: str, state_dict: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        config = self.peft_config[adapter_name]
        model = self.get_base_model()
        kind = _kind(config)
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
        if fuse.name not in self._fusions:
            raise ValueError(f"adapter_names: no fusion {fuse.name!r} (have {sorted(self._fusions)})")
        adp.delete_fusion(self.get_base_model(), fuse.name)
        del self._fusions[fuse.name]
        block = self._composition
        if block is not None and any(f.name == fuse.name for f in fusions(block)):
            self._composition = None
            kept = [n for n in block.flatten() if n in self.peft_config][:1]
            self._active_adapters = [a for a in self._active_adapters if a not in block.flatten()] + kept
            if self._active_adapters:
                self.set_adapter(self._active_adapters)

    def save_adapter_fusion(self, save_directory: str | os.PathLike, adapter_names: Fuse | list[str] | str) -> None:
        """Write a fusion's layers to ``save_directory``: ``adapter_config.json`` (``peft_type``
        ``"BOTTLENECK_ADAPTER_FUSION"``, its ``adapters``) and ``adapter_model.safetensors`` with keys
        ``base_model.model.<P>.fusion.{query,key,value}.{weight,bias}`` (fastpeft's layout; the adapters themselves
        are saved with ``save_pretrained``)."""
        fuse = self._fuse(adapter_names)
        if fuse.name not in self._fusions:
            raise ValueError(f"adapter_names: no fusion {fuse.name!r} (have {sorted(self._fusions)})")
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
        params = adp.fusion_file_params(self.get_base_model(), fuse.name)
        try:
            check_state_dict(directory / WEIGHTS_NAME, tensors, {k: t.shape for k, t in params.items()})
            check_tensor_values(
                directory / WEIGHTS_NAME, tensors, params, _compute_dtype(self.get_base_model()), allow_non_finite
            )
        except Exception:
            if fresh:
                self.delete_adapter_fusion(fuse)
            raise
        with torch.no_grad():
            for key, t in params.items():
                t.copy_(tensors[key].to(device=t.device, dtype=t.dtype))
        if set_active:
            self.set_adapter(fuse)
        return fuse

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
        for name in names:
            if name not in self.peft_config:
                raise ValueError(f"Adapter {name} does not exist (have {sorted(self.peft_config)})")
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
        check_adapter_name(adapter_name)
        ignore_mismatched = bool(kwargs.pop("ignore_mismatched_sizes", False))
        allow = bool(kwargs.pop("allow_non_finite", False))
        directory = local_adapter_dir(model_id, key_mapping, kwargs)
        cfg_dict, tensors = read_adapter_dir(directory)
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
        compute = _compute_dtype(self.get_base_model())
        if self._peft_kind == "prompt":
            weight = self.prompt_encoder[adapter_name].embedding.weight
            heads = saved_modules.params(self.get_base_model(), adapter_name)
            check_tensor_values(source, tensors, {"prompt_embeddings": weight, **heads}, compute, allow_non_finite)
            prompt.load_embeddings(self, adapter_name, tensors, source, {k: t.shape for k, t in heads.items()})
            with torch.no_grad():
                for key, t in heads.items():
                    t.copy_(tensors[key].to(device=t.device, dtype=t.dtype))
            return
        params = self._file_params(adapter_name)
        if ignore_mismatched_sizes:  # keep the fresh values where the file's shape does not fit (a resized vocab)
            bad = {k for k, t in params.items() if k in tensors and tensors[k].shape != t.shape}
            params = {k: t for k, t in params.items() if k not in bad}
            tensors = {k: t for k, t in tensors.items() if k not in bad}
        check_state_dict(source, tensors, {k: t.shape for k, t in params.items()})
        check_tensor_values(source, tensors, params, compute, allow_non_finite)
        with torch.no_grad():
            for key, t in params.items():
                t.copy_(tensors[key].to(device=t.device, dtype=t.dtype))

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
        check_adapter_name(adapter_name)
        ignore_mismatched = bool(kwargs.pop("ignore_mismatched_sizes", False))
        allow = bool(kwargs.pop("allow_non_finite", False))
        directory = local_adapter_dir(model_id, key_mapping, kwargs)
        cfg_dict, tensors = read_adapter_dir(directory)
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


def _compute_dtype(model: nn.Module) -> torch.dtype | None:
    """The narrowest-range floating dtype among the model's frozen weights: what its layers compute in, and so
    what the adapters' values must fit (float16 holds only up to 65504)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point() and not p.requires_grad}
    return min(dtypes, key=lambda d: torch.finfo(d).max) if dtypes else None


def get_peft_model(
    model: nn.Module,
    peft_config: PeftConfigBase,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Inject the adapter ``peft_config`` describes into ``model`` and return the ``PeftModel``.

    The base model's parameters are frozen; only the adapter's (and ``modules_to_save`` copies') train.

    Args:
        model: the model (modified in place for LoRA and bottleneck adapters).
        peft_config: the adapter's config.
        adapter_name: its name.
        mixed: must be False (HF PEFT's PeftMixedModel, mixing adapter types, is not implemented).
        autocast_adapter_dtype: keep 16-bit adapters in float32 (HF PEFT's default; see ``PeftModel``).
        revision: recorded as the config's ``revision`` (the base model's revision).
        low_cpu_mem_usage: accepted (see ``PeftModel``).
    """
    if mixed:
        raise ValueError("get_peft_model(mixed=True) is not supported: fastpeft has no PeftMixedModel")
    if revision is not None:
        peft_config.revision = revision
    return PeftModel(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                     low_cpu_mem_usage=low_cpu_mem_usage)  # fmt: skip
