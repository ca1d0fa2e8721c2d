"""Bottleneck adapters placed in transformer blocks: Houlsby, Pfeiffer and parallel.

Placement (per block; ``A(h) = h + s * up(act(down(h)))``, zero-initialized ``up``, so a fresh
adapter is the identity):

- ``pfeiffer``: one adapter on the feed-forward output, before the residual add.
- ``houlsby``: one on the attention output projection and one on the feed-forward output.
- ``parallel``: one beside the feed-forward: ``ffn(x) + s * up(act(down(x)))``.

Blocks are found by structure, so any head class of these families works:

| family (examples)           | attention output      | feed-forward output | parallel around |
|-----------------------------|-----------------------|---------------------|-----------------|
| Llama, Qwen2, Mistral       | ``self_attn.o_proj``  | ``mlp``             | ``mlp``         |
| GPT-2                       | ``attn.c_proj``       | ``mlp``             | ``mlp``         |
| BERT, RoBERTa               | ``attention.output.dense`` | ``output.dense`` | ``output`` (its residual input) |

Each adapted submodule is replaced on the model instance by an ``AdapterWrapper`` holding the
original as ``base_layer`` and one ``BottleneckAdapter`` per adapter name in ``bottleneck``.

File layout (``adapter_model.safetensors``; ``adapter_config.json`` has ``peft_type``
``"BOTTLENECK_ADAPTER"``): for a wrapper at module path ``P`` the keys are
``base_model.model.P.bottleneck.down.weight`` ``[b, hidden]``, ``...down.bias`` ``[b]``,
``...up.weight`` ``[hidden, b]``, ``...up.bias`` ``[hidden]`` (the adapter name is not in the key,
as in HF PEFT's LoRA files; in memory it is ``P.bottleneck.<name>.down.weight``).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

from fastpeft import nn as fnn
from fastpeft.peft.config import AdapterConfig
from fastpeft.peft.sizes import check_fits

__all__ = [
    "AdapterWrapper",
    "adapter_file_params",
    "delete_adapter",
    "inject_adapters",
    "set_active_adapter",
    "set_adapters_disabled",
    "unload_adapters",
]

PREFIX = "base_model.model."

# family -> (required submodule paths, attention-output path, ffn-output path, (parallel path, mode))
_FAMILIES: dict[str, tuple[tuple[str, ...], str, str, tuple[str, str]]] = {
    "llama-like": (("self_attn.o_proj", "mlp"), "self_attn.o_proj", "mlp", ("mlp", "parallel")),
    "gpt2-like": (("attn.c_proj", "mlp"), "attn.c_proj", "mlp", ("mlp", "parallel")),
    "bert-like": (
        ("attention.output.dense", "intermediate", "output.dense"),
        "attention.output.dense",
        "output.dense",
        ("output", "residual_input"),
    ),
}


class AdapterWrapper(nn.Module):
    """Runs ``base_layer`` and applies the active bottleneck adapter.

    Modes: ``"after"`` returns ``A(base(x))``; ``"parallel"`` returns ``A(x, residual=base(x))``;
    ``"residual_input"`` (BERT's ``BertOutput(h, input_tensor)``, which computes
    ``LN(dense(h) + input_tensor)``) passes ``A(input_tensor, residual=input_tensor)`` as the
    residual input, which adds the adapter beside the whole feed-forward.
    """

    def __init__(self, base_layer: nn.Module, mode: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.mode = mode
        self.bottleneck = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disable_adapters = False

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        adapter = None
        if not self.disable_adapters and self.active_adapter in self.bottleneck:
            adapter = self.bottleneck[self.active_adapter]
        if adapter is None:
            return self.base_layer(x, *args, **kwargs)
        if self.mode == "residual_input":
            input_tensor = args[0] if args else kwargs.pop("input_tensor")
            return self.base_layer(x, adapter(input_tensor, residual=input_tensor), *args[1:], **kwargs)
        out = self.base_layer(x, *args, **kwargs)
        if self.mode == "parallel":
            return adapter(x, residual=out)
        return adapter(out)


def _family(block: nn.Module) -> str | None:
    for family, (required, *_rest) in _FAMILIES.items():
        if all(_has(block, p) for p in required):
            return family
    return None


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def _find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList, str]:
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            families = {_family(b) for b in module}
            if len(families) == 1 and None not in families:
                return name, module, families.pop()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    raise ValueError(
        f"cannot place bottleneck adapters in {type(model).__name__} (model_type={model_type!r}): no list of "
        "Llama/Qwen2/Mistral-, GPT-2- or BERT-style blocks found"
    )


def _hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot tell the hidden size of {type(model).__name__}: its config has no hidden_size")


def _wrap_points(config: AdapterConfig, family: str) -> list[tuple[str, str]]:
    _, attn_out, ffn_out, parallel = _FAMILIES[family]
    if config.placement == "pfeiffer":
        return [(ffn_out, "after")]
    if config.placement == "houlsby":
        return [(attn_out, "after"), (ffn_out, "after")]
    return [parallel]


def inject_adapters(model: nn.Module, config: AdapterConfig, adapter_name: str) -> list[str]:
    """Add adapter ``adapter_name`` to the blocks of ``model`` (in place); returns the wrapped paths.

    Raises:
        ValueError: the architecture has no recognizable blocks, or ``target_layers`` names a block
            that does not exist.
    """
    blocks_name, blocks, family = _find_blocks(model)
    hidden = _hidden_size(model)
    size = config.bottleneck_size or max(1, hidden // config.reduction_factor)
    indices = list(range(len(blocks))) if config.target_layers is None else config.target_layers
    bad = [i for i in indices if not 0 <= i < len(blocks)]
    if bad:
        raise ValueError(f"AdapterConfig.target_layers {bad} out of range: the model has {len(blocks)} blocks")
    points = _wrap_points(config, family)
    ref = next(itertools.chain(model.parameters(), model.buffers()), None)
    per_adapter = 4 * (2 * hidden * size + size + hidden)  # float32 down and up, weights and biases
    what = f"{len(indices) * len(points)} bottleneck adapters of size {size}"
    check_fits(per_adapter * len(indices) * len(points), ref.device if ref is not None else torch.device("cpu"), what)
    paths = []
    for i in indices:
        block = blocks[i]
        for sub, mode in points:
            wrapper = block.get_submodule(sub)
            if not isinstance(wrapper, AdapterWrapper):
                base = wrapper
                wrapper = AdapterWrapper(base, mode).train(base.training)
                parent_name, _, child = sub.rpartition(".")
                setattr(block.get_submodule(parent_name) if parent_name else block, child, wrapper)
            elif wrapper.mode != mode:
                raise ValueError(f"{blocks_name}.{i}.{sub} already holds a {wrapper.mode} adapter; cannot add {mode}")
            adapter = fnn.BottleneckAdapter(hidden, size, non_linearity=config.non_linearity, scaling=config.scaling)
            # Buffers too: an all-NF4 block (no biases) holds its weights in buffers only.
            ref = next(itertools.chain(wrapper.base_layer.parameters(), wrapper.base_layer.buffers()), None)
            if ref is not None:
                # float32 master weights: BottleneckAdapter casts them to the activations' dtype itself.
                adapter.to(device=ref.device)
            wrapper.bottleneck[adapter_name] = adapter.train(wrapper.training)
            paths.append(f"{blocks_name}.{i}.{sub}")
    return paths


def _wrappers(model: nn.Module) -> list[tuple[str, AdapterWrapper]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterWrapper)]


def adapter_file_params(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """File key -> live tensor for adapter ``adapter_name`` (layout in the module doc)."""
    out = {}
    for path, wrapper in _wrappers(model):
        if adapter_name in wrapper.bottleneck:
            for k, t in wrapper.bottleneck[adapter_name].state_dict(keep_vars=True).items():
                out[f"{PREFIX}{path}.bottleneck.{k}"] = t
    return out


def set_active_adapter(model: nn.Module, adapter_name: str, trainable: bool) -> None:
    """Activate ``adapter_name`` everywhere; only its weights train (none when not ``trainable``)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for _, wrapper in _wrappers(model):
        wrapper.active_adapter = adapter_name
        if trainable and adapter_name in wrapper.bottleneck:
            wrapper.bottleneck[adapter_name].requires_grad_(True)


def delete_adapter(model: nn.Module, adapter_name: str, drop_empty: bool = False) -> None:
    """Remove ``adapter_name`` from every wrapper (the wrappers stay, running their base alone, unless
    ``drop_empty``: then a wrapper left without adapters gives its place back to its base)."""
    for path, wrapper in _wrappers(model):
        if adapter_name in wrapper.bottleneck:
            del wrapper.bottleneck[adapter_name]
        if drop_empty and not len(wrapper.bottleneck):
            parent_name, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapper.base_layer)


def set_adapters_disabled(model: nn.Module, disabled: bool) -> list[tuple[nn.Module, bool]]:
    """Set ``disable_adapters`` on every wrapper; returns the previous states to restore."""
    previous = []
    for _, wrapper in _wrappers(model):
        previous.append((wrapper, wrapper.disable_adapters))
        wrapper.disable_adapters = disabled
    return previous


def unload_adapters(model: nn.Module) -> nn.Module:
    """Put every wrapped submodule back; returns ``model`` without adapters."""
    for path, wrapper in _wrappers(model):
        parent_name, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapper.base_layer)
    return model
