r"""LoRA injection: find the target layers, wrap them in fastpeft's LoRA layers on the model instance.

Targets are matched on module paths with HF PEFT's rules (list: exact name or ``.suffix``; str: regex
fullmatch; ``"all-linear"``: every linear layer but the output head). Wrappable layers are
``nn.Linear``, ``fastpeft.nn.NF4Linear``, bitsandbytes ``Linear4bit`` (re-wrapped as ``NF4Linear``
over the same bytes) and transformers' ``Conv1D`` (GPT-2), whose ``[in, out]`` weight becomes an
``nn.Linear`` ``[out, in]`` copy under the LoRA layer and is turned back into a ``Conv1D`` on unload
(all ``LoraLinear``); ``nn.Embedding`` (``LoraEmbedding``); ``nn.Conv1d/2d/3d`` (``LoraConv``);
``nn.MultiheadAttention`` (``LoraMultiheadAttention``).
``rank_pattern`` / ``alpha_pattern`` give a module its own rank / alpha: the first pattern ``P`` for which
``(.*\.)?(P)$`` matches the module path, as HF PEFT's ``get_pattern_key``.

``modules_to_save`` wraps a module in ``ModulesToSaveWrapper``: the frozen original plus a trainable
copy per adapter, named like HF PEFT (``<path>.modules_to_save.<adapter>.<param>`` in memory,
``<path>.<param>`` in files).

File keys are relative to the PeftModel (``base_model.model.<module path>...``) and come from one
function, ``lora_file_params``, used for saving and loading alike.
"""

from __future__ import annotations

import copy
import itertools
import logging
import re
import sys
import warnings
from typing import Any

import torch
from torch import nn

from fastpeft import nn as fnn
from fastpeft.nn.lora_base import LoraLayerBase
from fastpeft.peft import adapters
from fastpeft.peft.config import LoraConfig
from fastpeft.peft.lora_extra import (
    inject_parameter_lora,
    inject_trainable_tokens,
    layer_file_params,
    token_file_params,
    token_wrappers,
)
from fastpeft.peft.sizes import check_fits

__all__ = [
    "ModulesToSaveWrapper",
    "cast_adapter_dtype",
    "conv1d_class",
    "conv1d_from_linear",
    "delete_lora_adapter",
    "inject_lora",
    "is_linear_like",
    "linear_from_conv1d",
    "layer_file_params",
    "lora_file_params",
    "lora_kind",
    "lora_layers",
    "pattern_value",
    "match_module",
    "set_lora_adapter",
    "set_lora_disabled",
    "unload_lora",
]

PREFIX = "base_model.model."
logger = logging.getLogger(__name__)

# HF PEFT's defaults when target_modules is None.
_QV = ["q_proj", "v_proj"]
DEFAULT_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(
        [
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "gemma3_text",
            "gptj",
            "opt",
            "bart",
            "stablelm",
        ],
        _QV,
    ),  # fmt: skip
    "phi": [*_QV, "fc1", "fc2"],
    **dict.fromkeys(["falcon", "gpt_neox", "bloom"], ["query_key_value"]),
    "gpt2": ["c_attn"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "mpt": ["Wqkv"],
}


class ModulesToSaveWrapper(nn.Module):
    """A frozen ``original_module`` plus a trainable deep copy per adapter in ``modules_to_save``."""

    def __init__(self, module_to_save: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.original_module = module_to_save
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter = adapter_name
        self.disable_adapters = False
        self.update(adapter_name)

    def update(self, adapter_name: str) -> None:
        """Add a trainable copy of the original module for ``adapter_name``."""
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)
        self.original_module.requires_grad_(False)

    def has_adapter(self, adapter_name: str) -> bool:
        return adapter_name in self.modules_to_save

    @property
    def active_adapters(self) -> list[str]:
        """The active adapter if it has a copy here (HF PEFT's rule), else none."""
        return [self.active_adapter] if self.active_adapter in self.modules_to_save else []

    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

    def delete_adapter(self, adapter_name: str) -> None:
        del self.modules_to_save[adapter_name]

    def merged_module(self, adapter_names: list[str] | None) -> nn.Module:
        """What ``merge_and_unload`` leaves in place: the first of ``adapter_names`` (default: the active
        adapter) that has a copy here, else the original."""
        for name in adapter_names if adapter_names is not None else [self.active_adapter]:
            if name in self.modules_to_save:
                return self.modules_to_save[name]
        return self.original_module

    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """The active adapter's copy, or the original when disabled / the adapter has no copy here.

        With ``adapter_names`` (one per row of the first argument), each row goes through its adapter's copy.
        """
        if self.disable_adapters:
            return self.original_module(*args, **kwargs)
        if adapter_names is not None:
            x, rest = args[0], args[1:]
            out = None
            for name in dict.fromkeys(adapter_names):
                rows = [i for i, n in enumerate(adapter_names) if n == name]
                module = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
                part = module(x[rows], *rest, **kwargs)
                if out is None:
                    out = part.new_empty((x.shape[0], *part.shape[1:]))
                out[rows] = part
            return out
        if self.active_adapter not in self.modules_to_save:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active_adapter](*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # Callers reach into wrapped modules (``lm_head.weight``, ``classifier.out_features``): answer
        # with the module forward uses, the active copy unless disabled.
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        copies = super().__getattr__("modules_to_save")
        active = self.__dict__.get("active_adapter")
        if not self.__dict__.get("disable_adapters", False) and active in copies:
            return getattr(copies[active], name)
        return getattr(super().__getattr__("original_module"), name)


def conv1d_class() -> type | None:
    """transformers' ``Conv1D`` (GPT-2's ``[in, out]`` linear), or None without transformers."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def _is_bnb4(module: nn.Module) -> bool:
    # Only a model built with bitsandbytes can hold its layers; never import it ourselves.
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def is_linear_like(module: nn.Module) -> bool:
    """True for the layer kinds LoRA can wrap (see module doc)."""
    conv1d = conv1d_class()
    return (
        isinstance(module, (nn.Linear, fnn.NF4Linear))
        or (conv1d is not None and isinstance(module, conv1d))
        or _is_bnb4(module)
    )


def lora_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"embedding"`` or ``"conv"`` for a layer LoRA can wrap, else None."""
    if is_linear_like(module):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    if isinstance(module, nn.MultiheadAttention):
        return "mha"
    return None


def pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    r"""``patterns[P]`` for the first ``P`` where ``(.*\.)?(P)$`` matches ``name``, else ``default``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def match_module(name: str, targets: list[str] | set[str] | str) -> bool:
    """HF PEFT's rule: a str is a regex fullmatch on the path, a list matches exact names or ``.suffix``."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in targets)


def _resolve_targets(model: nn.Module, config: LoraConfig) -> set[str] | str:
    """The config's targets; when None, HF PEFT's default for the model type, written into the config (as HF
    PEFT does, so the saved adapter_config.json names them)."""
    targets = config.target_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if not isinstance(model_type, str) or model_type not in DEFAULT_TARGETS:
            raise ValueError(
                f"LoraConfig.target_modules is None and there is no default for model_type={model_type!r}: "
                "Please specify `target_modules` in `peft_config`"
            )
        targets = config.target_modules = set(DEFAULT_TARGETS[model_type])
    return targets


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def _walk(model: nn.Module):
    """``named_modules`` without descending into LoRA layers or modules_to_save wrappers."""
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(s + ".") for s in skip):
            continue
        if isinstance(module, (LoraLayerBase, ModulesToSaveWrapper)):
            skip.append(name)
        yield name, module


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def linear_from_conv1d(conv: nn.Module) -> nn.Linear:
    """A frozen ``nn.Linear`` ``[out, in]`` computing what ``conv`` (weight ``[in, out]``) computes."""
    in_f, out_f = conv.weight.shape
    lin = nn.Linear(in_f, out_f, bias=conv.bias is not None, device="meta")
    lin.weight = nn.Parameter(conv.weight.detach().t().contiguous(), requires_grad=False)
    if conv.bias is not None:
        lin.bias = nn.Parameter(conv.bias.detach(), requires_grad=False)
    return lin


def conv1d_from_linear(lin: nn.Linear) -> nn.Module:
    """The inverse of ``linear_from_conv1d``: a ``Conv1D`` holding ``lin.weight`` transposed."""
    conv = conv1d_class()(lin.out_features, lin.in_features)
    conv.weight = nn.Parameter(lin.weight.detach().t().contiguous(), requires_grad=False)
    if lin.bias is not None:
        conv.bias = nn.Parameter(lin.bias.detach(), requires_grad=False)
    else:
        conv.bias = None
    return conv


def inject_lora(model: nn.Module, config: LoraConfig, adapter_name: str) -> list[str]:
    """Wrap every matching layer of ``model`` (in place) with a LoRA adapter ``adapter_name``.

    Returns:
        The module paths that got the adapter.

    Raises:
        ValueError: nothing matched (the message names the targets and some module names), or a
            matched module is not a layer kind LoRA wraps (named, with the kinds that are).
    """
    by_module = bool(config.target_modules) or not config.target_parameters
    names = _find_targets(model, config, strict=not config.target_parameters) if by_module else []
    _check_lora_fits(model, names, config)
    if config.use_dora:
        _check_dora_targets(model, names, config)
    if isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear":
        # what HF PEFT records, and so writes into adapter_config.json: the names "all-linear" resolved to
        # (each module's last name component), so the file says which layers the adapter holds
        config.target_modules = sorted({n.rpartition(".")[2] for n in names})
    conv1d = conv1d_class()
    for name in names:
        module = model.get_submodule(name)
        kwargs = dict(
            r=pattern_value(config.rank_pattern, name, config.r),
            lora_alpha=pattern_value(config.alpha_pattern, name, config.lora_alpha),
            lora_dropout=config.lora_dropout,
            use_rslora=config.use_rslora,
            init_lora_weights=config.init_lora_weights,
            lora_bias=config.lora_bias,
        )
        if config.use_dora:
            kwargs["use_dora"] = True
        if isinstance(module, LoraLayerBase):
            module.update_layer(adapter_name, **kwargs)
            continue
        kind = lora_kind(module)
        is_conv1d = conv1d is not None and isinstance(module, conv1d)
        if kind == "linear" and config.fan_in_fan_out and not is_conv1d:
            # HF PEFT's rule: an [out, in] layer cannot be fan-in-fan-out; it resets the flag and warns.
            logger.warning("fan_in_fan_out=True but %s is not a Conv1D; setting fan_in_fan_out=False", name)
            config.fan_in_fan_out = False
        if kind == "embedding":
            layer = fnn.LoraEmbedding(module, adapter_name=adapter_name, **kwargs)
        elif kind == "mha":
            layer = fnn.LoraMultiheadAttention(module, adapter_name=adapter_name, **kwargs)
        elif kind == "conv":
            layer = fnn.LoraConv(module, adapter_name=adapter_name, **kwargs)
        else:
            if is_conv1d:
                config.fan_in_fan_out = True
                module = linear_from_conv1d(module)
            elif _is_bnb4(module):
                module = fnn.NF4Linear.from_bnb(module)
            layer = fnn.LoraLinear(module, adapter_name=adapter_name, **kwargs)
            layer._fastpeft_conv1d = is_conv1d
        layer.train(module.training)  # a new module defaults to training mode; keep the model's mode
        _set_submodule(model, name, layer)
    params = inject_parameter_lora(model, config, adapter_name)
    if config.target_parameters and not params:
        if not names:
            raise ValueError(
                "No `target_modules` passed but also no `target_parameters` found. Please check the values for "
                f"these arguments. (target_parameters={config.target_parameters!r})"
            )
        warnings.warn(
            f"target_parameters={config.target_parameters!r} were set but no parameter was matched.",
            RuntimeWarning,
            stacklevel=3,
        )
    elif config.target_parameters and by_module and not names:
        warnings.warn(
            f"target_modules={config.target_modules!r} were set but no module was matched.",
            RuntimeWarning,
            stacklevel=3,
        )
    names += params
    for name, module in list(_walk(model)):
        if config.modules_to_save and name and match_module(name, config.modules_to_save):
            if isinstance(module, ModulesToSaveWrapper):
                module.update(adapter_name)
            else:
                _set_submodule(model, name, ModulesToSaveWrapper(module, adapter_name).train(module.training))
    inject_trainable_tokens(model, config, adapter_name)
    return names


def _check_dora_targets(model: nn.Module, names: list[str], config: LoraConfig) -> None:
    """DoRA runs on linear (dense, NF4, bitsandbytes 4-bit, Conv1D), embedding and convolution layers, as in HF PEFT:
    refuse the rest before wrapping any."""
    if config.target_parameters:
        raise ValueError("use_dora=True: DoRA is not supported with target_parameters (HF PEFT refuses it too)")
    for name in names:
        module = model.get_submodule(name)
        dora_kinds = (fnn.LoraLinear, fnn.LoraEmbedding, fnn.LoraConv)
        if not isinstance(module, dora_kinds) and lora_kind(module) not in ("linear", "embedding", "conv"):
            raise ValueError(
                f"use_dora=True: target {name!r}: {type(module).__name__} does not support DoRA (yet), please set "
                "use_dora to False or exclude it (fastpeft supports DoRA on linear, embedding and convolution layers)"
            )


def _find_targets(model: nn.Module, config: LoraConfig, strict: bool = True) -> list[str]:
    targets = _resolve_targets(model, config)
    head = _output_head(model)
    all_linear = isinstance(targets, str) and targets.lower() == "all-linear"
    names: list[str] = []
    wrapped = adapters.wrapper_paths(model)  # bottleneck adapter wrappers: targets are matched as if absent
    for name, module in list(_walk(model)):
        if not name or isinstance(module, (ModulesToSaveWrapper, adapters.AdapterWrapper)):
            continue
        if wrapped and any(name.startswith((f"{w}.bottleneck", f"{w}.fusion")) for w in wrapped):
            continue  # the bottleneck adapters' and fusions' own linear layers
        real, name = name, adapters.logical_path(model, name, wrapped)
        if all_linear:
            # Heads trained in full (modules_to_save, SEQ_CLS classifiers) are not LoRA targets either.
            hit = (is_linear_like(module) or isinstance(module, fnn.LoraLinear)) and module is not head
            hit = hit and not (config.modules_to_save and match_module(name, config.modules_to_save))
        else:
            hit = match_module(name, targets) and (isinstance(targets, str) or _layer_selected(name, config))
        if not hit or (config.exclude_modules and match_module(name, config.exclude_modules)):
            continue
        if config.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in config.modules_to_save):
            continue  # trained in full: never also a LoRA target (HF PEFT's rule)
        parent = model.get_submodule(real.rpartition(".")[0]) if "." in real else model
        if isinstance(parent, (nn.MultiheadAttention, LoraLayerBase)) and name.endswith(".out_proj"):
            if all_linear:
                continue  # the attention reads its weight directly: LoRA there goes through the attention
            raise ValueError(
                f"target {name!r} is the output projection of an nn.MultiheadAttention, which reads its weight "
                "directly: target the attention module itself"
            )
        if not (lora_kind(module) or isinstance(module, LoraLayerBase)):
            raise ValueError(
                f"target {name!r} is a {type(module).__name__}; LoRA wraps nn.Linear, NF4Linear, bitsandbytes "
                "Linear4bit, transformers Conv1D, nn.Embedding, nn.Conv1d/2d/3d and nn.MultiheadAttention only"
            )
        names.append(real)
    if not names and strict:
        sample = [n for n, _ in model.named_modules() if n][:20]
        raise ValueError(
            f"target_modules={targets!r} (exclude_modules={config.exclude_modules!r}) matched no module; "
            f"module names look like: {sample}"
        )
    return names


def _layer_selected(name: str, config: LoraConfig) -> bool:
    """``layers_to_transform`` / ``layers_pattern`` (HF PEFT's rule): the first ``<pattern>.<index>.`` in the
    module path (any ``<name>.<index>.`` without a pattern) must give one of the chosen indices."""
    chosen = config.layers_to_transform
    if chosen is None or chosen == []:
        return True
    patterns = config.layers_pattern
    if not patterns:
        found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        found = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            found = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if found is not None:
                break
    if found is None:
        return False
    index = int(found["idx"])
    return index == chosen if isinstance(chosen, int) else index in chosen


def _check_lora_fits(model: nn.Module, names: list[str], config: LoraConfig) -> None:
    """Refuse ranks whose A and B (float32, the most they take) would not fit, before allocating any."""
    nbytes, device, ranks = 0, torch.device("cpu"), set()
    for name in names:
        module = model.get_submodule(name)
        r = pattern_value(config.rank_pattern, name, config.r)
        ranks.add(r)
        if hasattr(module, "in_features"):
            k, n = module.in_features, module.out_features
        elif isinstance(module, nn.Embedding):
            k, n = module.num_embeddings, module.embedding_dim
        elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            k, n = module.weight[0].numel(), module.out_channels
        elif isinstance(module, nn.MultiheadAttention):  # in_proj [3E, E] and out_proj [E, E]
            k, n = 3 * module.embed_dim, 3 * module.embed_dim
        else:  # Conv1D: weight [in, out]
            k, n = module.weight.shape
        nbytes += 4 * r * (k + n)
        ref = next(itertools.chain(module.parameters(), module.buffers()), None)
        device = ref.device if ref is not None else device
    # Name the ranks the layers get: a rank_pattern entry, not the base r, is often what does not fit.
    if ranks - {config.r}:
        shown = f"r={max(ranks)} (rank_pattern)" if len(ranks) == 1 else f"r up to {max(ranks)} (rank_pattern)"
    else:
        shown = f"r={config.r}"
    check_fits(nbytes, device, f"LoRA with {shown} on {len(names)} layers")


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayerBase]]:
    """``(path, layer)`` for every LoRA layer of ``model`` (linear, embedding, conv, parameter); nested
    parameter wrappers come inner first, so unwrapping in this order puts each level back in turn."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayerBase)]
    return sorted(found, key=lambda item: -item[0].count("."))


def _wrappers(model: nn.Module) -> list[tuple[str, ModulesToSaveWrapper]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]


def wrapper_file_params(model: nn.Module, adapter_name: str, prefix: str) -> dict[str, torch.Tensor]:
    """File key -> live tensor of adapter ``adapter_name``'s ``modules_to_save`` copies: ``<prefix><path>.<param>``."""
    out = {}
    for name, wrapper in _wrappers(model):
        if adapter_name in wrapper.modules_to_save:
            for k, t in wrapper.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                out[f"{prefix}{name}.{k}"] = t
    return out


def lora_file_params(model: nn.Module, config: LoraConfig, adapter_name: str) -> dict[str, torch.Tensor]:
    """File key -> the live tensor it stores, for adapter ``adapter_name`` (HF PEFT's key names)."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model):
        if layer._has(adapter_name):
            for suffix, t in layer_file_params(layer, adapter_name).items():
                out[f"{PREFIX}{name}.{suffix}"] = t
    out.update(token_file_params(model, adapter_name))
    wrapped = _wrappers(model)
    out.update(wrapper_file_params(model, adapter_name, PREFIX))
    if config.bias != "none":
        inside = [n for n, _ in wrapped]
        lora_paths = {n for n, _ in lora_layers(model)}
        for pname, p in model.named_parameters():
            if not pname.endswith(".bias") or any(pname.startswith(w + ".") for w in inside):
                continue
            if ".lora_A." in pname or ".lora_B." in pname or ".lora_embedding_" in pname:
                continue
            if config.bias == "lora_only" and pname.removesuffix(".base_layer.bias") not in lora_paths:
                continue
            out[f"{PREFIX}{pname}"] = p
    return out


def set_lora_adapter(
    model: nn.Module, configs: dict[str, LoraConfig], adapter_names: list[str], trainable: bool
) -> None:
    """Make ``adapter_names`` the active adapters; freeze everything but their weights (all of it if not trainable).

    Raises:
        ValueError: two active adapters each have their own trained copy of one module (``modules_to_save``
            or trainable tokens): forward could use only one of them (HF PEFT refuses this too).
    """
    for _, wrapper in _wrappers(model) + token_wrappers(model):
        present = [a for a in adapter_names if wrapper.has_adapter(a)]
        if len(present) > 1:
            raise ValueError(
                f"Only one adapter can be set at a time for {type(wrapper).__name__}: adapters {present} each train "
                "their own copy of the same module"
            )
    for _, layer in lora_layers(model):
        if any(layer._has(a) for a in adapter_names):
            layer.set_adapter(adapter_names)
        else:
            layer._active = list(adapter_names)  # none of them here: the layer runs its base alone
    for _, wrapper in _wrappers(model) + token_wrappers(model):
        present = [a for a in adapter_names if wrapper.has_adapter(a)]
        wrapper.active_adapter = present[0] if present else adapter_names[0] if adapter_names else None
    # After the layers' own set_adapter (which makes the active adapters trainable): freeze all first.
    for p in model.parameters():
        p.requires_grad_(False)
    if trainable:
        for name in adapter_names:
            for t in lora_file_params(model, configs[name], name).values():
                if isinstance(t, nn.Parameter) or t.is_floating_point():
                    t.requires_grad_(True)


def delete_lora_adapter(model: nn.Module, adapter_name: str, drop_empty: bool = False) -> None:
    """Remove ``adapter_name`` from every LoRA layer and modules_to_save wrapper of ``model``; with
    ``drop_empty``, a layer or wrapper left without adapters gives its place back to its base."""
    for name, layer in lora_layers(model):
        if layer._has(adapter_name):
            layer.delete_adapter(adapter_name)
        if drop_empty and not layer._names():
            _set_submodule(model, name, _plain_base(layer))
    for name, wrapper in _wrappers(model) + token_wrappers(model):
        if wrapper.has_adapter(adapter_name):
            wrapper.delete_adapter(adapter_name)
        if drop_empty and not wrapper.adapter_names():
            _set_submodule(model, name, wrapper.original_module)


def _plain_base(layer: LoraLayerBase) -> nn.Module:
    """The module a LoRA layer replaced (a Conv1D turned back from its linear copy)."""
    if hasattr(layer, "unwrap"):
        return layer.unwrap()
    base = layer.get_base_layer()
    if getattr(layer, "_fastpeft_conv1d", False) and isinstance(base, nn.Linear):
        base = conv1d_from_linear(base)
    return base


@torch.no_grad()
def cast_adapter_dtype(model: nn.Module, adapter_name: str) -> None:
    """Keep ``adapter_name``'s weights in float32 where they were made float16 / bfloat16 (HF PEFT's
    ``autocast_adapter_dtype``): 16-bit Adam state loses small updates, and fp16 AMP refuses to unscale
    fp16 gradients. Forward still runs the fused op in the input's dtype."""
    tensors = [
        t for _, layer in lora_layers(model) if layer._has(adapter_name) for t in layer._adapter_tensors(adapter_name)
    ]
    tensors += [w.token_adapter.trainable_tokens_delta[adapter_name] for _, w in token_wrappers(model)
                if w.has_adapter(adapter_name)]  # fmt: skip
    for t in tensors:
        if t.dtype in (torch.float16, torch.bfloat16):
            t.data = t.data.float()


def set_lora_disabled(model: nn.Module, disabled: bool) -> list[tuple[nn.Module, bool]]:
    """Set ``disable_adapters`` on every LoRA layer and wrapper; returns the previous states to restore."""
    previous = []
    for _, m in lora_layers(model) + _wrappers(model) + token_wrappers(model):
        previous.append((m, m.disable_adapters))
        m.disable_adapters = disabled
    return previous


def unload_lora(
    model: nn.Module, merge: bool, safe_merge: bool = False, adapter_names: list[str] | None = None
) -> nn.Module:
    """Put the base layers back, first merging ``adapter_names`` (default: the active ones) when ``merge``."""
    for name, layer in lora_layers(model):
        if merge and adapter_names is not None:
            present = [a for a in adapter_names if layer._has(a)]
            if present:
                layer.merge(safe_merge=safe_merge, adapter_names=present)
        elif merge and not layer.disable_adapters:
            layer.merge(safe_merge=safe_merge)
        _set_submodule(model, name, _plain_base(layer))
    for name, wrapper in _wrappers(model) + token_wrappers(model):
        keep = wrapper.original_module
        if merge:
            keep = wrapper.merged_module(adapter_names)
        _set_submodule(model, name, keep)
    return model
