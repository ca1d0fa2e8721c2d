"""The LoRA options beside the layer wrapping: ``target_parameters`` and ``trainable_token_indices``.

``target_parameters`` names parameters by path (``"experts.gate_up_proj"``, HF PEFT's rule: the full
path or a ``.suffix`` of it); each owning module is wrapped in ``fastpeft.nn.LoraParameter``, nested when
one module has several targets. ``trainable_token_indices`` (a list: the input embedding; a dict: the
named embeddings) wraps each embedding in ``fastpeft.peft.tokens.TrainableTokensWrapper``.
"""

from __future__ import annotations

from torch import nn

from fastpeft import nn as fnn
from fastpeft.nn.lora_base import LoraLayerBase
from fastpeft.nn.lora_param import LoraParameter
from fastpeft.peft.config import LoraConfig
from fastpeft.peft.tokens import TrainableTokensWrapper

__all__ = ["inject_parameter_lora", "inject_trainable_tokens", "layer_file_params", "token_file_params",
           "token_wrappers"]  # fmt: skip

PREFIX = "base_model.model."


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _owner_path(name: str) -> str:
    """A module path with the parameter wrappers' ``base_layer`` hops taken out."""
    return ".".join(p for p in name.split(".") if p != "base_layer")


def inject_parameter_lora(model: nn.Module, config: LoraConfig, adapter_name: str) -> list[str]:
    """Wrap every parameter ``config.target_parameters`` names; returns the wrapped parameters' paths.

    Raises:
        ValueError: a parameter of the model itself, or of a module that is a LoRA target already.
    """
    if not config.target_parameters:
        return []
    from fastpeft.peft.lora import pattern_value  # the matching rules live with the module targets

    # Parameters as the model owns them: paths through existing wrappers, without their hops.
    owned: dict[str, tuple[str, str]] = {}
    for mod_name, module in model.named_modules():
        if isinstance(module, LoraLayerBase) and not isinstance(module, LoraParameter):
            continue
        for pname, _ in module.named_parameters(recurse=False):
            if ".lora_A." in f".{mod_name}." or ".lora_B." in f".{mod_name}.":
                continue
            full = f"{_owner_path(mod_name)}.{pname}" if mod_name else pname
            owned[full] = (mod_name, pname)
    done: list[str] = []
    for target in config.target_parameters:
        for path in [p for p in owned if p == target or p.endswith(f".{target}")]:
            mod_name, pname = owned[path]
            if not mod_name:
                raise ValueError(
                    f"target_parameters entry {target!r} is a parameter of the model itself; wrap the module "
                    "that owns it in a container (HF PEFT refuses top-level parameters too)"
                )
            inside = _lora_ancestor(model, mod_name)
            if inside is not None:
                raise ValueError(
                    f"Trying to wrap an `nn.Parameter` of layer {inside!r} of type "
                    f"{type(model.get_submodule(inside).get_base_layer()).__name__}, which is not a valid target: "
                    "it is a LoRA target module already"
                )
            r = pattern_value(config.rank_pattern, path, config.r)
            alpha = pattern_value(config.alpha_pattern, path, config.lora_alpha)
            outer_name = _outermost(model, mod_name)
            outer = model.get_submodule(outer_name)
            kwargs = dict(r=r, lora_alpha=alpha, lora_dropout=config.lora_dropout, use_rslora=config.use_rslora,
                          init_lora_weights=config.init_lora_weights, lora_bias=config.lora_bias)  # fmt: skip
            existing = _wrapper_for(outer, pname)
            if existing is not None:
                existing.update_layer(adapter_name, **kwargs)
            else:  # the new wrapper goes around the outermost wrapper of the owner
                layer = LoraParameter(outer, pname, adapter_name=adapter_name, **kwargs)
                layer.train(outer.training)
                _set_submodule(model, outer_name, layer)
            done.append(path)
    return done


def _lora_ancestor(model: nn.Module, mod_name: str) -> str | None:
    """The path of a LoRA layer (other than a parameter wrapper) that ``mod_name`` lies inside, if any."""
    parts = mod_name.split(".")
    for i in range(len(parts)):
        path = ".".join(parts[:i])
        module = model.get_submodule(path) if path else model
        if isinstance(module, LoraLayerBase) and not isinstance(module, LoraParameter):
            return path
    return None


def _outermost(model: nn.Module, mod_name: str) -> str:
    """The path of the outermost parameter wrapper around module ``mod_name`` (itself if none)."""
    name = mod_name
    while name.endswith(".base_layer") or name == "base_layer":
        parent = name.rpartition(".")[0] if "." in name else ""
        if not isinstance(model.get_submodule(parent) if parent else model, LoraParameter):
            break
        name = parent
    return name


def _wrapper_for(outer: nn.Module, pname: str) -> LoraParameter | None:
    module = outer
    while isinstance(module, LoraParameter):
        if module.parameter_name == pname:
            return module
        module = module.base_layer
    return None


def _input_embedding_name(model: nn.Module) -> str:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    for name, module in model.named_modules():
        if emb is not None and module is emb:
            return name
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    if len(names) == 1:
        return names[0]
    raise ValueError(
        "trainable_token_indices is a list but the model's input embedding cannot be told apart "
        f"(no get_input_embeddings, embeddings {names}); give a dict {{module name: indices}}"
    )


def inject_trainable_tokens(model: nn.Module, config: LoraConfig, adapter_name: str) -> None:
    """Wrap the embeddings ``config.trainable_token_indices`` names (see module doc).

    Raises:
        ValueError: a name that matches no ``nn.Embedding``, an embedding LoRA also targets, or bad indices.
    """
    spec = config.trainable_token_indices
    if not spec:
        return
    if isinstance(spec, list):
        spec = {_input_embedding_name(model): spec}
    for target, indices in spec.items():
        hits = [n for n, m in model.named_modules() if n == target or n.endswith(f".{target}")]
        hits = [n for n in hits if isinstance(model.get_submodule(n), (nn.Embedding, TrainableTokensWrapper))]
        if not hits:
            raise ValueError(f"trainable_token_indices: {target!r} matches no nn.Embedding of the model")
        for name in hits:
            module = model.get_submodule(name)
            if isinstance(module, TrainableTokensWrapper):
                module.update(adapter_name, indices)
            elif isinstance(module, fnn.LoraEmbedding):
                raise ValueError(f"{name!r} is a LoRA target and in trainable_token_indices; choose one")
            else:
                _set_submodule(
                    model, name, TrainableTokensWrapper(module, adapter_name, indices).train(module.training)
                )


def token_wrappers(model: nn.Module) -> list[tuple[str, TrainableTokensWrapper]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TrainableTokensWrapper)]


def token_file_params(model: nn.Module, adapter_name: str) -> dict:
    """File key -> tensor for the trainable tokens of ``adapter_name`` (HF PEFT's keys)."""
    out = {}
    for name, wrapper in token_wrappers(model):
        if wrapper.has_adapter(adapter_name):
            for suffix, t in wrapper.file_params(adapter_name).items():
                out[f"{PREFIX}{name}.{suffix}"] = t
    return out


def layer_file_params(layer: LoraLayerBase, adapter_name: str) -> dict:
    """HF PEFT's key suffixes -> tensors of one LoRA layer's adapter (``lora_A.weight``, ``lora_B.weight``,
    ``lora_B.bias``; an embedding's ``lora_embedding_A`` / ``_B``)."""
    if hasattr(layer, "file_params"):
        return layer.file_params(adapter_name)
    out = {"lora_A.weight": layer.lora_A[adapter_name].weight, "lora_B.weight": layer.lora_B[adapter_name].weight}
    if layer.lora_B[adapter_name].bias is not None:
        out["lora_B.bias"] = layer.lora_B[adapter_name].bias
    magnitude = getattr(layer, "lora_magnitude_vector", {})
    if adapter_name in magnitude:  # DoRA
        out["lora_magnitude_vector"] = magnitude[adapter_name].weight  # HF PEFT's key: no ".weight"
    return out
