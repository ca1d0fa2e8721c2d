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
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from fastpeft import nn as fnn
from fastpeft.nn.checks import check_adapter_name
from fastpeft.peft import adapters as adp
from fastpeft.peft import interop, lora, prompt, saved_modules
from fastpeft.peft.composition import AdapterComposition, Fuse, flatten, parse_setup, trained_names
from fastpeft.peft.config import PeftConfigBase
from fastpeft.peft.load_options import LoadResult
from fastpeft.peft.model_adapters import AdapterMethods
from fastpeft.peft.model_files import FileMethods
from fastpeft.peft.model_lora import LoraMethods
from fastpeft.peft.tuner import TunerModel, adapter_kind

__all__ = ["LoadResult", "PeftModel", "TunerModel", "get_peft_model"]

# HF PEFT's parameter prefix per method (peft.utils.PEFT_TYPE_TO_PREFIX_MAPPING): an adapter name
# contained in it makes HF PEFT's key renaming misfire.
_PEFT_PREFIX = {"LORA": "lora_"}


class PeftModel(LoraMethods, AdapterMethods, FileMethods, nn.Module):
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
        self._peft_kind = adapter_kind(peft_config)
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
        return [n for n, c in self.peft_config.items() if adapter_kind(c) == kind]

    def _check_known(self, names: list[str]) -> None:
        for name in names:
            if name not in self.peft_config:
                raise ValueError(f"Adapter {name} does not exist (have {sorted(self.peft_config)})")

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
        kind = adapter_kind(peft_config)
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
        return [a for a in active if adapter_kind(self.peft_config[a]) == "lora"] + [block]

    def _remove_partial(self, adapter_name: str, kind: str) -> None:
        """Take out what a failed ``add_adapter`` put into the model (all of it for the first adapter)."""
        model = self.get_base_model()
        if kind == "lora":
            lora.delete_lora_adapter(model, adapter_name, drop_empty=True)
        elif kind == "adapter":
            adp.delete_adapter(model, adapter_name, drop_empty=True)
        elif adapter_name in self.prompt_encoder:
            del self.prompt_encoder[adapter_name]

    def _drop_block(self, block: AdapterComposition) -> None:
        """Deactivate ``block``, which lost an adapter or a fusion: a block that loses one means something else, so
        its first remaining adapter stays active (beside the active LoRA adapters)."""
        self._composition = None
        kept = [n for n in block.flatten() if n in self.peft_config][:1]
        self._active_adapters = [a for a in self._active_adapters if a not in block.flatten()] + kept

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
            elif adapter_kind(self.peft_config[item]) == "lora":
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

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name``; deleting an active one leaves the other active ones (or, if none is left,
        the first remaining adapter) active. The last adapter can be deleted too: the model then runs its base.

        Raises:
            ValueError: an unknown name, or an adapter merged into the base weights in some layer (HF PEFT
                0.22's rule: deleting it would leave its update baked into the base; ``unmerge_adapter`` first).
        """
        self._check_known([adapter_name])
        model = self.get_base_model()
        if any(adapter_name in layer.merged_adapters for _, layer in lora.lora_layers(model)):
            merged = [adapter_name]
            raise ValueError(f"Cannot delete adapter(s) {merged} while they are merged. Please unmerge them first.")
        before = self._active_setup()
        kind = adapter_kind(self.peft_config[adapter_name])
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
            self._drop_block(block)
        remaining = [a for a in self._active_setup() if a != adapter_name]
        if remaining and remaining == before:
            return  # an inactive adapter went: set_adapter again would unmerge the merged active ones
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
        self._check_known(adapter_names or [])
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

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """The model's ``generate``, with the prompt / prefix in place for prompt learning."""
        if self._peft_kind == "prompt" and not self._disabled:
            return prompt.generate(self, *args, **kwargs)
        args, kwargs = self._parallel_inputs(args, kwargs)
        with self._mixed_batch(adapter_names, args, kwargs, generating=True):
            return self.get_base_model().generate(*args, **kwargs)


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
