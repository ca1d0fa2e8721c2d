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
original as ``base_layer`` and one ``BottleneckAdapter`` per adapter name in ``bottleneck``. Its
``active_adapter`` is one adapter name (the fused single-adapter path) or a composition block of
``fastpeft.peft.composition`` (``Stack``, ``Parallel``, ``Average``, ``BatchSplit``), run with the per-adapter op
once per adapter.

LoRA beside bottleneck adapters: a LoRA layer on a submodule an adapter also wraps (``o_proj`` under Houlsby,
the linear layers inside a wrapped ``mlp``) sits inside the wrapper, as its ``base_layer`` or below it;
``logical_path`` drops those ``base_layer`` steps, so each method's file keys are the ones it has alone.

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
from fastpeft.peft.composition import (
    AdapterComposition,
    Average,
    BatchSplit,
    Fuse,
    Parallel,
    Stack,
    fusions,
    trained_names,
)
from fastpeft.peft.config import AdapterConfig
from fastpeft.peft.sizes import check_fits

__all__ = [
    "AdapterWrapper",
    "adapter_file_params",
    "add_fusion",
    "delete_adapter",
    "delete_fusion",
    "fusion_file_params",
    "inject_adapters",
    "logical_path",
    "wrapper_paths",
    "set_active_adapter",
    "set_active_setup",
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
        self.fusion = nn.ModuleDict()  # AdapterFusion layers by Fuse.name ("a,b")
        self.active_adapter: str | AdapterComposition | None = None
        self.disable_adapters = False

    def forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """``adapter_names``: one adapter name per row (a mixed batch; ``"__base__"`` or an adapter this layer
        does not hold runs the base alone), in place of the active adapter or block."""
        setup = None if self.disable_adapters else self.active_adapter
        if adapter_names is not None and not self.disable_adapters:
            return self._forward_with(lambda h, r: self._rows(adapter_names, h, r), x, *args, **kwargs)
        if isinstance(setup, AdapterComposition):
            return self._forward_with(lambda h, r: self._compose(setup, h, r), x, *args, **kwargs)
        adapter = None
        if setup is not None and setup in self.bottleneck:
            adapter = self.bottleneck[setup]
        if adapter is None:
            return self.base_layer(x, *args, **kwargs)
        if self.mode == "residual_input":
            input_tensor = args[0] if args else kwargs.pop("input_tensor")
            return self.base_layer(x, adapter(input_tensor, residual=input_tensor), *args[1:], **kwargs)
        out = self.base_layer(x, *args, **kwargs)
        if self.mode == "parallel":
            return adapter(x, residual=out)
        return adapter(out)

    def _forward_with(self, run: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The base layer with ``run(h, r)`` in the adapter's place (``h`` its input, ``r`` its residual)."""
        if self.mode == "residual_input":
            args = list(args)
            input_tensor = args.pop(0) if args else kwargs.pop("input_tensor")
            return self.base_layer(x, run(input_tensor, input_tensor), *args, **kwargs)
        out = self.base_layer(x, *args, **kwargs)
        if self.mode == "parallel":
            return run(x, out)
        return run(out, out)

    def _rows(self, names: list[str], h: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """Row ``i`` through adapter ``names[i]`` (inference: mixed batches)."""
        if len(names) != h.shape[0]:
            raise ValueError(f"adapter_names has {len(names)} names for a batch of {h.shape[0]} rows")
        out = r.clone()
        for name in dict.fromkeys(names):
            if name in self.bottleneck:
                rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=h.device)
                hr = h.index_select(0, rows)
                adapter = self.bottleneck[name]
                out[rows] = adapter(hr) if r is h else adapter(hr, residual=r.index_select(0, rows))
        return out

    def _compose(self, setup: str | AdapterComposition, h: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """``setup`` on adapter input ``h`` with residual ``r`` (``r is h`` for the sequential placements)."""
        if isinstance(setup, str):
            if setup not in self.bottleneck:
                return r  # an adapter this layer does not hold passes its input through
            adapter = self.bottleneck[setup]
            return adapter(h) if r is h else adapter(h, residual=r)
        if isinstance(setup, Stack):
            y = self._compose(setup.children[0], h, r)
            for child in setup.children[1:]:
                y = self._compose(child, y, y)
            return y
        if isinstance(setup, Fuse):
            present = [n for n in setup.children if n in self.bottleneck]
            if not present or setup.name not in self.fusion:
                return r
            deltas = [self.bottleneck[n].delta(h) for n in present]
            return r + self.fusion[setup.name](h, deltas)
        if isinstance(setup, Average):
            y = r
            for child, w in zip(setup.children, setup.weights, strict=True):
                if isinstance(child, str):
                    if child in self.bottleneck:  # r + w·delta, the running sum as the op's residual
                        y = self.bottleneck[child](h, residual=y, weight=w)
                else:
                    y = y + w * (self._compose(child, h, r) - r)
            return y
        rows = h.shape[0]
        if isinstance(setup, Parallel):
            n = len(setup.children)
            if rows % n:
                raise ValueError(
                    f"Parallel with {n} adapters got {rows} rows, not a multiple of {n}: run the model through "
                    "PeftModel.forward / generate, which repeat the input batch once per adapter"
                )
            sizes = [rows // n] * n
        elif isinstance(setup, BatchSplit):
            sizes = setup.batch_sizes
            if sum(sizes) != rows:
                raise ValueError(
                    f"BatchSplit: batch_sizes {sizes} add up to {sum(sizes)}, but the batch has {rows} rows"
                )
        else:
            raise ValueError(f"{type(setup).__name__} is not supported by fastpeft's bottleneck adapters")
        parts = [
            self._compose(child, hp, hp if r is h else rp)
            for child, hp, rp in zip(setup.children, h.split(sizes), r.split(sizes), strict=True)
        ]
        return torch.cat(parts, dim=0)


def _family(block: nn.Module) -> str | None:
    for family, (required, *_rest) in _FAMILIES.items():
        if all(_has(block, p) for p in required):
            return family
    return None


def _has(module: nn.Module, path: str) -> bool:
    """Whether ``path`` names a submodule, looking through adapter wrappers (a second adapter finds BERT's
    ``output.dense`` inside the wrapper that took ``output``'s place)."""
    for part in path.split("."):
        if isinstance(module, AdapterWrapper) and part not in module._modules:
            module = module.base_layer
        child = module._modules.get(part)
        if child is None:
            return False
        module = child
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


def _member_file_params(model: nn.Module, kind: str, name: str) -> dict[str, torch.Tensor]:
    """File key -> live tensor of ``name`` in every wrapper's ``kind`` dict (``bottleneck`` or ``fusion``):
    ``base_model.model.<P>.<kind>.<key>`` for a wrapper at ``P``."""
    out = {}
    for path, wrapper in _wrappers(model):
        if name in getattr(wrapper, kind):
            for k, t in getattr(wrapper, kind)[name].state_dict(keep_vars=True).items():
                out[f"{PREFIX}{path}.{kind}.{k}"] = t
    return out


def adapter_file_params(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """File key -> live tensor for adapter ``adapter_name`` (layout in the module doc)."""
    return _member_file_params(model, "bottleneck", adapter_name)


def set_active_adapter(model: nn.Module, adapter_name: str, trainable: bool) -> None:
    """Activate ``adapter_name`` everywhere; only its weights train (none when not ``trainable``)."""
    set_active_setup(model, adapter_name, trainable)


def set_active_setup(
    model: nn.Module, setup: str | AdapterComposition | None, trainable: bool, freeze: bool = True
) -> None:
    """Activate ``setup`` (an adapter name, a composition block, or None: no bottleneck adapter) in every wrapper;
    every adapter it names trains when ``trainable``. ``freeze``: first freeze the whole model (False when the
    caller already did, having activated LoRA adapters beside)."""
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    names = trained_names(setup)  # a Fuse's adapters stay frozen: its fusion layer trains
    fused = [f.name for f in fusions(setup)]
    for _, wrapper in _wrappers(model):
        wrapper.active_adapter = setup
        if trainable:
            for name in names:
                if name in wrapper.bottleneck:
                    wrapper.bottleneck[name].requires_grad_(True)
            for name in fused:
                if name in wrapper.fusion:
                    wrapper.fusion[name].requires_grad_(True)


def add_fusion(model: nn.Module, fuse: Fuse) -> int:
    """Give every wrapper holding one of ``fuse``'s adapters a fresh ``AdapterFusion`` named ``fuse.name``;
    returns how many got one."""
    hidden = _hidden_size(model)
    count = 0
    for _, wrapper in _wrappers(model):
        members = [wrapper.bottleneck[n] for n in fuse.children if n in wrapper.bottleneck]
        if not members:
            continue
        device = members[0].down.weight.device
        wrapper.fusion[fuse.name] = fnn.AdapterFusion(hidden).to(device).train(wrapper.training).requires_grad_(False)
        count += 1
    return count


def fusion_file_params(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """File key -> live tensor of fusion ``name``: ``base_model.model.<P>.fusion.{query,key,value}.{weight,bias}``
    for a wrapper at ``P`` (the fusion's name is not in the key, as an adapter's is not)."""
    return _member_file_params(model, "fusion", name)


def delete_fusion(model: nn.Module, name: str) -> None:
    """Remove fusion ``name`` from every wrapper."""
    for _, wrapper in _wrappers(model):
        if name in wrapper.fusion:
            del wrapper.fusion[name]


def wrapper_paths(model: nn.Module) -> set[str]:
    """The module paths of the adapter wrappers in ``model``."""
    return {n for n, _ in _wrappers(model)}


def logical_path(model: nn.Module, path: str, wrappers: set[str] | None = None) -> str:
    """``path`` without the ``.base_layer`` steps of the adapter wrappers on it: where a module sits when no
    bottleneck adapter wraps it (LoRA's target matching and file keys use this). ``wrappers``: the wrapper paths,
    when the caller has them."""
    wrappers = wrapper_paths(model) if wrappers is None else wrappers
    if not wrappers:
        return path
    parts, out, prefix = path.split("."), [], ""
    for part in parts:
        if part == "base_layer" and prefix in wrappers:
            prefix = f"{prefix}.{part}" if prefix else part
            continue
        prefix = f"{prefix}.{part}" if prefix else part
        out.append(part)
    return ".".join(out)


def delete_adapter(model: nn.Module, adapter_name: str, drop_empty: bool = False) -> None:
    """Remove ``adapter_name`` from every wrapper (the wrappers stay, running their base alone, unless
    ``drop_empty``: then a wrapper left without adapters gives its place back to its base)."""
    for path, wrapper in _wrappers(model):
        if adapter_name in wrapper.bottleneck:
            del wrapper.bottleneck[adapter_name]
        if drop_empty and not len(wrapper.bottleneck):
            _unwrap(model, path, wrapper)


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
        _unwrap(model, path, wrapper)
    return model


def _unwrap(model: nn.Module, path: str, wrapper: AdapterWrapper) -> None:
    """Put ``wrapper``'s base layer back in its place at ``path``."""
    parent_name, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapper.base_layer)
