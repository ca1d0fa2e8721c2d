"""``PeftModel`` methods that apply to LoRA adapters: merging in place, switching layers on and off,
mixed-adapter batches and weighted combinations of adapters (HF PEFT's names and semantics).

``add_weighted_adapter`` builds a new adapter from existing ones, per layer:

- ``"linear"`` (all ranks equal): ``A = Σ sign(wᵢ)·sqrt(|wᵢ·sᵢ|)·Aᵢ``, ``B = Σ sqrt(|wᵢ·sᵢ|)·Bᵢ`` — cheap, and
  only an approximation of ``Σ wᵢ·sᵢ·Bᵢ·Aᵢ`` (the cross terms ``Bᵢ·Aⱼ`` remain);
- ``"cat"``: ``A = [w₁·s₁·A₁; w₂·s₂·A₂; ...]``, ``B = [B₁, B₂, ...]``, exact at rank ``Σ rᵢ``;
- ``"svd"``: the best rank-``svd_rank`` factorization of ``Σ wᵢ·ΔWᵢ`` (``B = U·S``, ``A = Vᵀ``).

The new adapter has ``lora_alpha = r`` (scaling 1) and is not activated, as in HF PEFT.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from fastpeft.nn.lora_base import LoraLayerBase
from fastpeft.nn.lora_layers import LoraConv, LoraEmbedding
from fastpeft.nn.lora_mha import LoraMultiheadAttention
from fastpeft.nn.lora_param import LoraParameter
from fastpeft.peft import adapters, lora
from fastpeft.peft.adapters import AdapterWrapper
from fastpeft.peft.composition import Parallel
from fastpeft.peft.lora import ModulesToSaveWrapper
from fastpeft.peft.tokens import TrainableTokensWrapper

__all__ = ["LoraMethods"]

_COMBINATIONS = ("linear", "cat", "svd")


class LoraMethods:
    """Mixed into ``PeftModel``; every method requires LoRA adapters."""

    def _require_lora(self, what: str) -> None:
        if not self._names_of("lora"):
            raise ValueError(f"{what} applies to LoRA adapters; these are {self._peft_kind} adapters")

    def _lora_layers(self) -> list[tuple[str, LoraLayerBase]]:
        return lora.lora_layers(self.get_base_model())

    # -- merging in place ------------------------------------------------------------------------

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Merge ``adapter_names`` (default: the active ones) into the base weights, keeping the LoRA layers
        (``unmerge_adapter`` undoes it). Forward then runs the merged base alone.

        Raises:
            ValueError: an unknown adapter, or (``safe_merge``) a non-finite merged weight.
        """
        self._require_lora("merge_adapter")
        self._check_known(adapter_names or [])
        for _, layer in self._lora_layers():
            names = layer._present_active() if adapter_names is None else [a for a in adapter_names if layer._has(a)]
            if names:
                layer.merge(safe_merge=safe_merge, adapter_names=names)

    def unmerge_adapter(self) -> None:
        """Undo every ``merge_adapter``."""
        self._require_lora("unmerge_adapter")
        for _, layer in self._lora_layers():
            layer.unmerge()

    def disable_adapter_layers(self) -> None:
        """Run the base alone until ``enable_adapter_layers`` (merged adapters are unmerged first); the
        adapters' weights stop requiring grad meanwhile."""
        self._require_lora("disable_adapter_layers")
        model = self.get_base_model()
        for _, layer in self._lora_layers():
            if layer.merged:
                layer.unmerge()
        lora.set_lora_disabled(model, True)
        adapters.set_adapters_disabled(model, True)  # bottleneck adapters beside the LoRA ones
        for p in model.parameters():
            p.requires_grad_(False)
        self._disabled = True

    def enable_adapter_layers(self) -> None:
        """Undo ``disable_adapter_layers``: the active adapters run (and train) again."""
        self._require_lora("enable_adapter_layers")
        lora.set_lora_disabled(self.get_base_model(), False)
        adapters.set_adapters_disabled(self.get_base_model(), False)
        self._disabled = False
        self.set_adapter(self._active_setup())

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Switch training of the named adapters on or off without changing which ones are active."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._check_known(names)
        for name in names:
            for t in self._file_params(name).values():
                if t.is_floating_point():
                    t.requires_grad_(requires_grad)

    # -- mixed-adapter batches -------------------------------------------------------------------

    @contextlib.contextmanager
    def _mixed_batch(
        self, adapter_names: list[str] | None, args: tuple, kwargs: dict[str, Any], generating: bool = False
    ) -> Iterator[None]:
        """While the model runs, give every LoRA layer and wrapper ``adapter_names`` (one per sample); bottleneck
        adapter wrappers run each row through its adapter too."""
        if adapter_names is None:
            yield
            return
        if self._peft_kind == "prompt":
            raise ValueError("adapter_names (mixed-adapter batches) works with LoRA and bottleneck adapters only")
        if self._composition is not None and isinstance(self._composition, Parallel):
            raise ValueError("adapter_names cannot be combined with an active Parallel block: activate one adapter")
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            # a str would be read as one adapter name per character ("default": seven one-letter names)
            raise TypeError(
                f"adapter_names must be a list of str, one adapter name per sample, got {adapter_names!r:.80} "
                "(for one sample: [name])"
            )
        # (HF PEFT's messages, word for word: code that handles these errors may match them)
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        unknown = sorted(set(adapter_names) - set(self.peft_config) - {"__base__"})
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}")
        if any(layer.merged for _, layer in self._lora_layers()):
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
            )
        for name, layer in self._lora_layers():
            if isinstance(layer, LoraMultiheadAttention):
                raise TypeError(f"lora.MultiheadAttention does not support mixed adapter batches ({name!r})")
            if isinstance(layer, LoraParameter):
                raise TypeError(f"mixed adapter batches are not supported for target_parameters ({name!r})")
        plain = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)
        for name, wrapper in lora._wrappers(self.get_base_model()):
            if not isinstance(wrapper.original_module, plain):
                raise TypeError(
                    "Mixed batching is only supported for the following modules: Linear, Embedding, Conv1d, Conv2d, "
                    f"Conv3d. {name!r} (modules_to_save) is a {type(wrapper.original_module).__name__}."
                )
        first = _batch_input(args, kwargs)
        if first is not None and len(adapter_names) != first.shape[0]:
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {first.shape[0]} respectively."
            )
        names = list(adapter_names)
        if generating:
            beams = kwargs.get("num_beams", 1) * kwargs.get("num_return_sequences", 1)
            names = [n for n in names for _ in range(max(1, beams))] if beams > 1 else names

        held: dict[tuple, list[str]] = {}  # the names as each set of adapters a layer holds sees them

        def hook(module: nn.Module, hook_args: tuple, hook_kwargs: dict[str, Any]) -> tuple:
            rows = hook_args[0].shape[0] if hook_args and isinstance(hook_args[0], torch.Tensor) else len(names)
            # generate() expands beams after the first call on some paths: stretch the names to the rows.
            per = names if rows == len(names) else [n for n in names for _ in range(rows // len(names))]
            if isinstance(module, LoraLayerBase):
                # a layer refuses names it does not hold: the adapters that do not target it run its base
                key = (tuple(module._names()), len(per))
                if key not in held:
                    held[key] = [n if module._has(n) else "__base__" for n in per]
                per = held[key]
            return hook_args, {**hook_kwargs, "adapter_names": per}

        kinds = (LoraLayerBase, ModulesToSaveWrapper, TrainableTokensWrapper, AdapterWrapper)
        handles = [
            m.register_forward_pre_hook(hook, with_kwargs=True)
            for m in self.get_base_model().modules()
            if isinstance(m, kinds)
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    # -- weighted combinations -------------------------------------------------------------------

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
        svd_clamp: float | None = None,
        svd_full_matrices: bool = True,
        svd_driver: str | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
    ) -> None:
        """Add adapter ``adapter_name`` combining ``adapters`` with ``weights`` (see module doc).

        Args:
            adapters: existing LoRA adapters. weights: one weight each (negative subtracts).
            adapter_name: the new adapter's name (not activated).
            combination_type: ``"svd"``, ``"linear"`` or ``"cat"``; HF PEFT's TIES / DARE / magnitude-prune
                variants raise ``ValueError``.
            svd_rank: the rank for ``"svd"`` (default: the largest of the adapters').
            svd_clamp: clamp the SVD factors to this quantile of their values.
            svd_full_matrices, svd_driver: passed to ``torch.linalg.svd``.
            density, majority_sign_method: for the TIES / DARE variants (not supported).

        Raises:
            ValueError: unknown or existing names, mismatched ranks for ``"linear"``, adapters that share a
                ``modules_to_save`` module or use ``target_parameters`` or DoRA, an unsupported combination.
        """
        bottleneck = [a for a in adapters if a in self.peft_config and a in self._names_of("adapter")]
        if bottleneck:
            raise ValueError(
                f"add_weighted_adapter combines LoRA adapters into a new one; bottleneck adapters {bottleneck} cannot "
                "be merged into one adapter (their activation is not linear): run their weighted average with "
                "set_active_adapters(Average(*adapters, weights=weights)) from fastpeft.peft.composition"
            )
        self._require_lora("add_weighted_adapter")
        if combination_type not in _COMBINATIONS:
            raise ValueError(
                f"combination_type={combination_type!r} is not supported by fastpeft (one of {list(_COMBINATIONS)}; "
                "the TIES / DARE / magnitude-prune variants are not implemented)"
            )
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists")
        if len(adapters) != len(weights):
            raise ValueError(f"{len(adapters)} adapters but {len(weights)} weights")
        for name in adapters:
            if name not in self.peft_config:
                raise ValueError(f"Adapter {name} does not exist (have {sorted(self.peft_config)})")
            if self.peft_config[name].target_parameters:
                raise ValueError(f"add_weighted_adapter does not support target_parameters (adapter {name!r})")
            if self.peft_config[name].use_dora:  # a combined B·A needs a magnitude fastpeft has no rule for
                raise ValueError(f"add_weighted_adapter does not support DoRA adapters (adapter {name!r})")
        model = self.get_base_model()
        shared = [w for _, w in lora._wrappers(model) if sum(w.has_adapter(a) for a in adapters) > 1]
        if shared:
            raise ValueError(
                "Cannot add weighted adapters if they target the same module with modules_to_save, but found "
                f"{len(shared)} such instance(s)."
            )
        kind = "linear" if len(adapters) == 1 else combination_type
        configs = [self.peft_config[a] for a in adapters]
        ranks = [max(c.r, *c.rank_pattern.values()) if c.rank_pattern else c.r for c in configs]
        if kind == "linear" and len(set(ranks)) != 1:
            raise ValueError(f"combination_type='linear' needs adapters of one rank, got {ranks}")
        new_rank = ranks[0] if kind == "linear" else sum(ranks) if kind == "cat" else svd_rank or max(ranks)
        new_config = dataclasses.replace(
            configs[0], r=new_rank, lora_alpha=new_rank, target_modules=_union_targets(configs),
            alpha_pattern={}, rank_pattern={}, init_lora_weights=False, trainable_token_indices=None,
        )  # fmt: skip
        self.add_adapter(adapter_name, new_config)
        with torch.no_grad():
            for _, layer in self._lora_layers():
                if not layer._has(adapter_name):
                    continue
                present = [(a, w) for a, w in zip(adapters, weights, strict=True) if layer._has(a)]
                a_new, b_new = _factors(layer, adapter_name)
                if not present:
                    a_new.zero_()
                    b_new.zero_()
                    continue
                a_val, b_val = _combine(layer, present, kind, new_rank, svd_clamp, svd_full_matrices, svd_driver)
                a_new.zero_()
                b_new.zero_()
                a_new[: a_val.shape[0]] = a_val.to(a_new.dtype).reshape(-1, *a_new.shape[1:])
                b_new[:, : b_val.shape[1]] = b_val.to(b_new.dtype).reshape(b_new.shape[0], -1, *b_new.shape[2:])


def _batch_input(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The tensor whose first dimension is the batch: ``input_ids`` or ``inputs_embeds`` (by keyword, or the first
    positional argument), else the first tensor argument. Not simply the first tensor: ``position_ids [1, T]`` or
    a mask may come before them."""
    for key in ("input_ids", "inputs_embeds", "inputs"):
        t = kwargs.get(key)
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return t
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() > 0:
        return args[0]
    return next((t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.dim() > 0), None)


def _union_targets(configs: list) -> list[str] | str:
    kinds = {isinstance(c.target_modules, str) for c in configs}
    if len(kinds) > 1:
        raise ValueError("cannot combine adapters whose target_modules mix a regex string and a list")
    if kinds == {True}:
        return "|".join(f"({c.target_modules})" for c in configs)
    return sorted({t for c in configs for t in c.target_modules or []})


def _factors(layer: LoraLayerBase, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of one adapter as tensors: ``[r, in...]`` and ``[out, r...]``."""
    if isinstance(layer, LoraEmbedding):
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return layer.lora_A[name].weight, layer.lora_B[name].weight


def _combine(
    layer: LoraLayerBase,
    present: list[tuple[str, float]],
    kind: str,
    rank: int,
    clamp: float | None,
    full_matrices: bool,
    driver: str | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The new ``(A, B)`` of one layer in float32 (flattened past the first dim for convolutions)."""
    if kind == "svd":
        delta = sum(w * layer.get_delta_weight(a) for a, w in present)
        if isinstance(layer, LoraEmbedding):
            delta = delta.T  # [dim, num_embeddings], as B·A
        flat = delta.flatten(1)
        u, s, vh = torch.linalg.svd(flat, full_matrices=full_matrices, driver=driver)
        b, a = u[:, :rank] * s[:rank], vh[:rank]
        if clamp is not None:
            hi = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
            b, a = b.clamp(-hi, hi), a.clamp(-hi, hi)
        return a, b
    pairs = [(_factors(layer, a), w * layer.scaling[a]) for a, w in present]
    if kind == "cat":
        a = torch.cat([ws * fa.float().flatten(1) for (fa, _), ws in pairs], dim=0)
        b = torch.cat([fb.float().flatten(1) for (_, fb), _ in pairs], dim=1)
        return a, b
    # linear: the sign goes to A only, so a negative weight negates the product instead of cancelling out.
    a = sum((1.0 if ws >= 0 else -1.0) * abs(ws) ** 0.5 * fa.float().flatten(1) for (fa, _), ws in pairs)
    b = sum(abs(ws) ** 0.5 * fb.float().flatten(1) for (_, fb), ws in pairs)
    if isinstance(layer, LoraConv) and layer.base_layer.groups > 1:
        raise ValueError("add_weighted_adapter does not support convolutions with groups > 1")
    return a, b
