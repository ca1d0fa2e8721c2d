"""HF PEFT's module-level functions over fastpeft models: adapter and base state dicts, injection
without a ``PeftModel``, and the QLoRA preparation recipes call.

Adapter state dicts use the file keys (``base_model.model.<path>.lora_A.weight``, no adapter name), the
same tensors ``save_pretrained`` writes. For a model that got its adapter from ``inject_adapter_in_model``
(no ``PeftModel`` around it) the keys have no ``base_model.model.`` prefix, as in HF PEFT.

``get_base_model_state_dict`` gives the state dict the model had before any adapter was added: wrapper
levels (``base_layer``, ``original_module``, ``token_adapter``) taken out of the keys, adapter tensors
left out, and a GPT-2 ``Conv1D`` weight transposed back to its ``[in, out]`` layout.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from fastpeft import nn as fnn
from fastpeft.peft import lora
from fastpeft.peft.config import LoraConfig, PeftConfigBase
from fastpeft.peft.load_options import LoadResult
from fastpeft.peft.model import PeftModel

__all__ = [
    "get_base_model_state_dict",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "prepare_model_for_kbit_training",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
]

_ADAPTER_SEGMENTS = frozenset(
    {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_dropout", "lora_magnitude_vector",
     "modules_to_save", "trainable_tokens_delta", "trainable_tokens_original", "prompt_encoder"}
)  # fmt: skip
_WRAPPER_SEGMENTS = frozenset({"base_layer", "original_module", "token_adapter"})


def _unwrap(model: Any) -> Any:
    """The model inside a ``torch.compile`` wrapper and an FSDP1 ``FullyShardedDataParallel`` wrapper (whose
    ``state_dict`` keys are the inner model's, so its tensors keep their file keys). A ``fully_shard`` (FSDP2)
    model is its own class; it is resharded, so its parameters are the DTensors again (after a forward the
    root's are all-gathered copies FSDP may free)."""
    model = getattr(model, "_orig_mod", model)
    if not torch.distributed.is_available():
        return model
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    if isinstance(model, FullyShardedDataParallel):
        return _unwrap(model.module)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return model


def _full(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor: a ``fully_shard`` (FSDP2) DTensor shard is gathered (every rank must call this)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _assign(t: torch.Tensor, value: torch.Tensor) -> None:
    """``t.copy_(value)``; into a DTensor parameter, ``value`` (the whole tensor) is first cut like ``t``."""
    if hasattr(t, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(device=t.device, dtype=t.dtype), t.device_mesh, t.placements)
    t.copy_(value.to(device=t.device, dtype=t.dtype))


def _adapter_params(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """File key -> live tensor for ``adapter_name`` of a PeftModel or of a model with injected LoRA."""
    model = _unwrap(model)
    if isinstance(model, PeftModel):
        if adapter_name not in model.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist (have {sorted(model.peft_config)})")
        return model._file_params(adapter_name)
    config = getattr(model, "_fastpeft_peft_config", {}).get(adapter_name, LoraConfig())
    params = lora.lora_file_params(model, config, adapter_name)
    if not params:
        raise ValueError(f"the model has no adapter {adapter_name!r}")
    return {k.removeprefix(lora.PREFIX): t for k, t in params.items()}


def _memory_names(model: nn.Module) -> dict[int, str]:
    """id(tensor) -> its key in ``model.state_dict()``."""
    names = {}
    for key, t in model.state_dict(keep_vars=True).items():
        names.setdefault(id(t), key)
    return names


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: str | bool = "auto",
) -> dict[str, torch.Tensor]:
    """The tensors of adapter ``adapter_name`` under their file keys (what ``save_pretrained`` writes).

    Args:
        model: a ``PeftModel`` (or a model given an adapter by ``inject_adapter_in_model``), also inside
            ``torch.compile`` or FSDP (``FullyShardedDataParallel``, or ``fully_shard``: its shards are gathered).
        state_dict: take the values from this state dict of ``model`` (its own keys) instead of the model.
        adapter_name: which adapter.
        unwrap_compiled: accepted; a ``torch.compile`` wrapper is always looked through.
        save_embedding_layers: ``"auto"`` or False (fastpeft never saves whole embedding tables).

    Raises:
        ValueError: an unknown adapter, or ``save_embedding_layers=True``.
    """
    if save_embedding_layers not in ("auto", False):
        raise ValueError(f"save_embedding_layers={save_embedding_layers!r} is not supported")
    params = _adapter_params(model, adapter_name)
    if state_dict is None:
        return {k: _full(t.detach()) for k, t in params.items()}
    names = _memory_names(_unwrap(model))
    return {k: _full(state_dict[names[id(t)]]) for k, t in params.items() if names.get(id(t)) in state_dict}


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> LoadResult:
    """Load file-keyed tensors into adapter ``adapter_name`` (the inverse of ``get_peft_model_state_dict``).

    Args:
        model, adapter_name: as ``get_peft_model_state_dict``.
        peft_model_state_dict: file key -> tensor (``base_model.model.<path>.lora_A.weight``, ...).
        ignore_mismatched_sizes: skip tensors whose shape does not fit (else ``ValueError``).
        low_cpu_mem_usage: accepted; adapter weights still on the meta device (``inject_adapter_in_model(...,
            low_cpu_mem_usage=True)``) are replaced by the loaded tensors.

    Returns:
        ``(missing_keys, unexpected_keys)``: the adapter's tensors the dict did not have (by their model
        keys), and the dict's keys neither the adapter nor the model has (a model tensor under its own key,
        such as a saved bias, is loaded).

    Raises:
        ValueError: a tensor of the wrong shape (unless ``ignore_mismatched_sizes``).
    """
    params = _adapter_params(model, adapter_name)
    base = _unwrap(model)
    names = _memory_names(base)
    device = next((p.device for p in base.parameters() if p.device.type != "meta"), torch.device("cpu"))
    missing = []
    with torch.no_grad():
        for key, t in params.items():
            if key not in peft_model_state_dict:
                missing.append(names.get(id(t), key))
                continue
            value = peft_model_state_dict[key]
            if tuple(value.shape) != tuple(t.shape):
                if ignore_mismatched_sizes:
                    continue
                raise ValueError(f"{key}: the state dict has shape {tuple(value.shape)}, the adapter {tuple(t.shape)}")
            if t.device.type == "meta":  # left there by inject_adapter_in_model(low_cpu_mem_usage=True)
                _replace_param(base, names[id(t)], value.detach().to(device=device, dtype=t.dtype).clone())
            else:
                _assign(t, value)
        unexpected = _load_base_tensors(base, {k: v for k, v in peft_model_state_dict.items() if k not in params})
    return LoadResult(missing, unexpected)


def _load_base_tensors(base: nn.Module, extra: dict[str, torch.Tensor]) -> list[str]:
    """Copy the entries that name a tensor of the model itself, not of an adapter (the biases ``bias="all"`` /
    ``"lora_only"`` saved: HF PEFT loads them whatever the receiving adapter's ``bias``); returns the rest."""
    own = base.state_dict(keep_vars=True)
    rest = []
    for key, value in sorted(extra.items()):
        t = own.get(key)
        if t is None or _ADAPTER_SEGMENTS.intersection(key.split(".")) or tuple(t.shape) != tuple(value.shape):
            rest.append(key)
            continue
        _assign(t, value)
    return rest


def _base_entries(model: nn.Module) -> tuple[nn.Module, dict[str, tuple[str, bool]]]:
    """``(module holding the weights, {original key: (key in that module's state dict, transposed)})``."""
    model = _unwrap(model)
    root = model.get_base_model() if isinstance(model, PeftModel) else model
    conv1d = {n for n, m in lora.lora_layers(root) if getattr(m, "_fastpeft_conv1d", False)}
    entries = {}
    for key in root.state_dict(keep_vars=True):
        parts = key.split(".")
        if _ADAPTER_SEGMENTS.intersection(parts):
            continue
        canon = ".".join(p for p in parts if p not in _WRAPPER_SEGMENTS)
        owner = key.rsplit(".base_layer.weight", 1)[0] if key.endswith(".base_layer.weight") else None
        entries[canon] = (key, owner in conv1d)
    return root, entries


def get_base_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict under its original keys, without adapter tensors (see module doc)."""
    root, entries = _base_entries(model)
    current = root.state_dict()
    return {canon: current[key].T if transposed else current[key] for canon, (key, transposed) in entries.items()}


def set_base_model_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True) -> LoadResult:
    """Load a base model state dict (original keys) into the model under its adapters.

    Returns:
        ``(missing_keys, unexpected_keys)`` in the original keys.

    Raises:
        RuntimeError: ``strict`` and keys are missing or unexpected (as ``nn.Module.load_state_dict``).
    """
    root, entries = _base_entries(model)
    renamed = {}
    for canon, value in state_dict.items():
        if canon in entries:
            key, transposed = entries[canon]
            renamed[key] = value.T if transposed else value
    missing = sorted(set(entries) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(entries))
    if strict and (missing or unexpected):
        raise RuntimeError(f"set_base_model_state_dict: missing keys {missing}, unexpected keys {unexpected}")
    root.load_state_dict(renamed, strict=False)
    return LoadResult(missing, unexpected)


def inject_adapter_in_model(
    peft_config: PeftConfigBase,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Add a LoRA adapter to ``model`` in place, without a ``PeftModel`` around it; returns ``model``.

    The base parameters are frozen and the adapter's train (unless ``peft_config.inference_mode``).

    Args:
        peft_config: a ``LoraConfig`` (prompt learning needs a ``PeftModel``'s forward).
        model: the model.
        adapter_name: the adapter's name.
        low_cpu_mem_usage: leave the adapter's tensors on the meta device, to be filled by
            ``set_peft_model_state_dict`` (as HF PEFT).
        state_dict: an adapter state dict; when ``peft_config.target_modules`` is None the targets are the
            modules it has LoRA weights for.

    Raises:
        ValueError: a config other than LoRA, or no targets.
    """
    if not isinstance(peft_config, LoraConfig):
        raise ValueError(f"inject_adapter_in_model supports LoRA configs, got {type(peft_config).__name__}")
    if peft_config.target_modules is None and state_dict:
        marks = (".lora_A.", ".lora_embedding_A")
        found = {k.removeprefix(lora.PREFIX).split(m)[0] for k in state_dict for m in marks if m in k}
        peft_config.target_modules = sorted(found)
    lora.inject_lora(model, peft_config, adapter_name)
    configs = dict(getattr(model, "_fastpeft_peft_config", {}))
    configs[adapter_name] = peft_config
    model.__dict__["_fastpeft_peft_config"] = configs
    lora.set_lora_adapter(model, configs, [adapter_name], trainable=not peft_config.inference_mode)
    if low_cpu_mem_usage:
        names = _memory_names(model)
        for t in lora.lora_file_params(model, peft_config, adapter_name).values():
            _replace_param(model, names[id(t)], torch.empty_like(t, device="meta"))
    return model


def _replace_param(model: nn.Module, key: str, value: torch.Tensor) -> None:
    """Put a new ``nn.Parameter`` holding ``value`` where ``key`` is (moving a tensor off the meta device
    needs a new parameter: its storage cannot be swapped in place)."""
    owner_name, _, attr = key.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    old = getattr(owner, attr)
    setattr(owner, attr, nn.Parameter(value, requires_grad=old.requires_grad))


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
    auto_clear_cache: bool = True,
) -> nn.Module:
    """Prepare a quantized (fastpeft NF4 or bitsandbytes) model for LoRA training, as QLoRA recipes call it.

    What HF PEFT's function does, for fastpeft's NF4 layers too:

    1. Freeze every parameter.
    2. Upcast every float16 / bfloat16 parameter that is not quantized (norms, embedding table, output
       head, biases) to float32, so the residual stream, the norms and the loss run in float32. Each
       ``NF4Linear`` without a compute dtype is given its weight's original 16-bit dtype, as bitsandbytes'
       ``bnb_4bit_compute_dtype``: its float32 input is cast down for the fused kernel and the output back up.
    3. For a quantized model with ``use_gradient_checkpointing``: make the input embeddings' output require
       grad (re-entrant checkpointing needs an input that requires grad when nothing before the first block
       trains) and turn on the model's gradient checkpointing with ``gradient_checkpointing_kwargs``.

    Returns:
        ``model`` (changed in place).
    """
    kwargs = dict(gradient_checkpointing_kwargs or {})
    for p in model.parameters():
        p.requires_grad_(False)
    quantized = bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))
    sixteen = (torch.float16, torch.bfloat16)
    for module in model.modules():
        if isinstance(module, fnn.NF4Linear):
            quantized = True
            if module.compute_dtype is None and module.weight_nf4.dtype in sixteen:
                module.compute_dtype = module.weight_nf4.dtype
    for p in model.parameters():
        # bitsandbytes' packed 4-bit weights are uint8 (or a float storage type marked Params4bit): left alone
        if p.dtype in sixteen and type(p).__name__ != "Params4bit":
            p.data = p.data.float()
    if auto_clear_cache and torch.cuda.is_available():
        torch.cuda.empty_cache()
    if quantized and use_gradient_checkpointing:
        if kwargs.get("use_reentrant", True):
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
            else:
                model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
        enable = getattr(model, "gradient_checkpointing_enable", None)
        if enable is not None:
            takes_kwargs = "gradient_checkpointing_kwargs" in inspect.signature(enable).parameters
            enable(**({"gradient_checkpointing_kwargs": kwargs} if takes_kwargs else {}))
    return model
