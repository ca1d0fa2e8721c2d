"""Trainable tokens (HF PEFT's ``trainable_token_indices``): train a few rows of a frozen embedding.

New or special tokens need their embeddings trained while the rest of the vocabulary stays frozen;
training the whole table (``modules_to_save``) costs a full copy per adapter. Instead the wrapper keeps
the table frozen and, per adapter, a delta ``[n_tokens, dim]`` holding the trained rows: forward looks
the ids up in ``W`` with rows ``token_indices`` replaced by the delta (``index_copy``, so gradients reach
the delta only).

Module layout and file keys are HF PEFT's: ``<emb>.token_adapter.base_layer`` is the frozen embedding,
``<emb>.token_adapter.trainable_tokens_delta.<adapter>`` the rows (file key without the adapter name),
``...trainable_tokens_original.<adapter>`` a buffer with the rows' original values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TrainableTokensLayer", "TrainableTokensWrapper"]


class _BufferDict(nn.Module):
    """Buffers by adapter name (state-dict keys ``<path>.<adapter>``, as HF PEFT's ``BufferDict``)."""


class TrainableTokensLayer(nn.Module):
    """The frozen embedding and the per-adapter trained rows (see module doc)."""

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__()
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        self.trainable_tokens_delta = nn.ParameterDict()
        self.trainable_tokens_original = _BufferDict()
        self.token_indices: dict[str, list[int]] = {}

    def update(self, adapter_name: str, token_indices: Sequence[int]) -> None:
        """Add adapter ``adapter_name`` training rows ``token_indices`` (their current values as the start).

        Raises:
            ValueError: an index outside the table.
        """
        n = self.base_layer.num_embeddings
        bad = [i for i in token_indices if not 0 <= i < n]
        if bad:
            raise ValueError(f"trainable_token_indices {bad} are outside the embedding's {n} rows")
        idx = list(dict.fromkeys(token_indices))
        rows = self.base_layer.weight.detach()[idx].clone()
        self.trainable_tokens_delta[adapter_name] = nn.Parameter(rows.clone())
        self.trainable_tokens_original.register_buffer(adapter_name, rows)
        self.token_indices[adapter_name] = idx

    def table(self, adapter_name: str) -> torch.Tensor:
        """The embedding table with adapter ``adapter_name``'s rows in place (differentiable in the delta)."""
        w = self.base_layer.weight
        idx = torch.tensor(self.token_indices[adapter_name], device=w.device)
        return w.index_copy(0, idx, self.trainable_tokens_delta[adapter_name].to(w.dtype))

    def embed(self, x: torch.Tensor, adapter_name: str | None) -> torch.Tensor:
        base = self.base_layer
        if adapter_name is None or adapter_name not in self.trainable_tokens_delta:
            return base(x)
        return F.embedding(x, self.table(adapter_name), base.padding_idx, base.max_norm, base.norm_type,
                           base.scale_grad_by_freq, base.sparse)  # fmt: skip


class TrainableTokensWrapper(nn.Module):
    """Stands in for an ``nn.Embedding``: the active adapter's trained rows over the frozen table."""

    def __init__(self, embedding: nn.Embedding, adapter_name: str, token_indices: Sequence[int]) -> None:
        super().__init__()
        if not isinstance(embedding, nn.Embedding):
            raise ValueError(f"trainable_token_indices needs an nn.Embedding, got {type(embedding).__name__}")
        self.token_adapter = TrainableTokensLayer(embedding)
        self.active_adapter: str | None = adapter_name
        self.disable_adapters = False
        self.update(adapter_name, token_indices)

    @property
    def original_module(self) -> nn.Embedding:
        return self.token_adapter.base_layer

    def update(self, adapter_name: str, token_indices: Sequence[int]) -> None:
        self.token_adapter.update(adapter_name, token_indices)

    def has_adapter(self, adapter_name: str) -> bool:
        return adapter_name in self.token_adapter.trainable_tokens_delta

    @property
    def active_adapters(self) -> list[str]:
        """The active adapter if it has trained rows here (HF PEFT's rule), else none."""
        return (
            [self.active_adapter] if self.active_adapter is not None and self.has_adapter(self.active_adapter) else []
        )

    def adapter_names(self) -> list[str]:
        return list(self.token_adapter.trainable_tokens_delta)

    def delete_adapter(self, adapter_name: str) -> None:
        del self.token_adapter.trainable_tokens_delta[adapter_name]
        delattr(self.token_adapter.trainable_tokens_original, adapter_name)
        del self.token_adapter.token_indices[adapter_name]

    def file_params(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return {"token_adapter.trainable_tokens_delta": self.token_adapter.trainable_tokens_delta[adapter_name]}

    @torch.no_grad()
    def merged_module(self, adapter_names: list[str] | None) -> nn.Module:
        """The embedding with the trained rows of the first of ``adapter_names`` (default: the active
        adapter) written into it, for ``merge_and_unload``."""
        emb = self.original_module
        for name in adapter_names if adapter_names is not None else [self.active_adapter]:
            if self.has_adapter(name):
                emb.weight.copy_(self.token_adapter.table(name))
                break
        return emb

    def forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        if self.disable_adapters:
            return self.original_module(x)
        if adapter_names is None:
            return self.token_adapter.embed(x, self.active_adapter)
        out = self.original_module(x)
        for name in dict.fromkeys(adapter_names):
            if self.has_adapter(name):
                rows = [i for i, n in enumerate(adapter_names) if n == name]
                out[rows] = self.token_adapter.embed(x[rows], name)
        return out

    def __getattr__(self, name: str) -> Any:
        # Model code reads embedding attributes (``embed_tokens.weight``, ``num_embeddings``, ``padding_idx``).
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.token_adapter.base_layer, name)
