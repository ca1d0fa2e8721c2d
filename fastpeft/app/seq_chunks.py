"""Per-token modules run over sequence chunks: the long-context savers of ``fastpeft finetune``.

A decoder layer's MLP (and its RMSNorms) act on each token alone, so running them over slices of the
sequence and concatenating is the same function. ``SequenceChunks`` does that and keeps for the backward
only the module's input; the backward recomputes one chunk at a time and takes the gradients of the
input and of the trainable parameters from it. The ``[tokens, intermediate]`` tensors (gate, up, their
product, their gradients) then exist for one chunk at once instead of the whole sequence.

Under activation checkpointing (``fastpeft.app.savers.enable_checkpointing``) the layer is recomputed in
the backward, and so the chunked forward runs there too; the cost is one more forward of the chunked
modules per step. The gradients are those of the unchunked step up to the order of the float sums (the
parameter gradients are summed over chunks). With LoRA dropout the masks are drawn per chunk: the same
distribution, other random numbers than an unchunked step (the backward replays the forward's).

``fastpeft.app.memory`` traces the same functions on fake tensors; there, inside
``fastpeft.ops.linear_cross_entropy.trace_repeated_chunks_once``, only the first two chunks and the last run
(each chunk between allocates and frees what the second does), as for the chunked loss. A trace of every chunk
agrees to within one chunk's tensors: under the tracker a finished chunk's graph can wait in a reference cycle
for Python's cycle collector (without the tracker each chunk's graph goes by reference counting as it ends).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fastpeft.ops.linear_cross_entropy import chunk_starts

__all__ = ["PER_TOKEN_MODULES", "SequenceChunks", "chunked_call", "enable_sequence_chunks"]

# A llama-family decoder layer's submodules that act on each token alone (the attention mixes tokens).
PER_TOKEN_MODULES = ("input_layernorm", "mlp", "post_attention_layernorm")


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class SequenceChunks(torch.autograd.Function):
    """``y = fn(x)`` for a per-token ``fn``, computed ``chunk`` tokens at a time along dim 1.

    Forward: ``y[:, s:s+chunk] = fn(x[:, s:s+chunk])`` without grad; saves ``x`` only.
    Backward: per chunk, recompute ``fn`` (same autocast and RNG state as the forward) and take
    ``dL/dx[:, s:s+chunk]`` and ``dL/dθ += (∂y_chunk/∂θ)ᵀ dL/dy_chunk`` for the trainable ``params`` θ
    that ``fn`` reads, which must be passed so autograd routes their gradients here.
    """

    @staticmethod
    def forward(ctx: Any, fn: Callable, chunk: int, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx.fn, ctx.chunk = fn, chunk
        ctx.autocast = _autocast_state(x.device.type)
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        ctx.save_for_backward(x, *params)
        out, xd = None, x.detach()  # plain slices: no view of a tensor that requires grad
        for start in chunk_starts(x.shape[1], chunk, x):
            y = fn(xd[:, start : start + chunk])
            if out is None:  # one output buffer: the chunks' outputs are never all alive beside it
                out = y.new_empty((*x.shape[:2], *y.shape[2:]))
            out[:, start : start + chunk].copy_(y)
            del y
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: D102
        x, *params = ctx.saved_tensors
        want_x = ctx.needs_input_grad[2]
        trainable = [i for i, p in enumerate(params) if ctx.needs_input_grad[3 + i]]
        grad_x = torch.empty_like(x) if want_x else None
        grads: list[torch.Tensor | None] = [None] * len(params)
        enabled, dtype = ctx.autocast
        devices = [x.device] if x.is_cuda else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, x.device)
            for start in chunk_starts(x.shape[1], ctx.chunk, x):
                xc = x[:, start : start + ctx.chunk].detach().requires_grad_(want_x)
                with torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
                    y = ctx.fn(xc)
                inputs = ([xc] if want_x else []) + [params[i] for i in trainable]
                if not inputs:
                    continue
                got = list(torch.autograd.grad(y, inputs, grad_out[:, start : start + ctx.chunk]))
                del y
                if want_x:
                    grad_x[:, start : start + ctx.chunk].copy_(got.pop(0))
                for i, g in zip(trainable, got, strict=True):
                    grads[i] = g if grads[i] is None else grads[i].add_(g)
        return (None, None, grad_x, *grads)


def chunked_call(fn: Callable[[torch.Tensor], torch.Tensor], module: nn.Module, chunk: int, x: torch.Tensor) -> Any:
    """``fn(x)`` (``fn`` per-token, reading ``module``'s parameters) through ``SequenceChunks`` when
    ``x`` ``[batch, seq, ...]`` has more than ``chunk`` tokens and anything needs a gradient."""
    params = [p for p in module.parameters() if p.requires_grad]
    if x.dim() < 3 or x.shape[1] <= chunk or not torch.is_grad_enabled() or not (x.requires_grad or params):
        return fn(x)
    return SequenceChunks.apply(fn, chunk, x, *params)


class _Chunked:
    """The ``forward`` of one module instance, run through ``chunked_call`` (its class' forward at call
    time, so adapters injected after this still run)."""

    def __init__(self, module: nn.Module, chunk: int) -> None:
        self.module, self.chunk = module, chunk
        self.forward = type(module).forward.__get__(module)

    def __call__(self, x: torch.Tensor) -> Any:
        return chunked_call(self.forward, self.module, self.chunk, x)


def enable_sequence_chunks(model: nn.Module, chunk: int, names: tuple[str, ...] = PER_TOKEN_MODULES) -> int:
    """Run every decoder layer's per-token submodules named ``names`` (the MLP and the two RMSNorms), and the
    decoder's final ``norm``, over ``chunk``-token slices of the sequence, in place.

    Only each instance's ``forward`` is set; the module tree and the parameter names stay as they are.

    Returns:
        The number of modules chunked.

    Raises:
        ValueError: ``chunk`` is below 1, or the model has no decoder layer with such a submodule.
    """
    if chunk < 1:
        raise ValueError(f"the chunk must be at least 1 token, got {chunk}")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base
    layers = getattr(decoder, "layers", None)
    found = 0
    for layer in layers or ():
        for name in names:
            module = getattr(layer, name, None)
            if isinstance(module, nn.Module):
                module.forward = _Chunked(module, chunk)
                found += 1
    if found and isinstance(getattr(decoder, "norm", None), nn.Module):
        decoder.norm.forward = _Chunked(decoder.norm, chunk)
        found += 1
    if not found:
        raise ValueError(f"{type(base).__name__}: no decoder layers with {', '.join(names)} to run in chunks")
    return found
