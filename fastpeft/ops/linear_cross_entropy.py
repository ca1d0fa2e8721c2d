"""Causal-LM loss through the output head, chunked: the float32 ``[tokens, vocab]`` logits never exist.

For hidden states ``h [T, H]``, a head ``W [V, H]`` (dense, or NF4), optional ``bias [V]`` and labels
``y [T]`` (``ignore_index`` marks tokens without a loss), with ``n`` the number of labelled tokens::

    z_t  = W·h_t + b                               (computed in h's dtype, then float32, as eager torch)
    loss = (1/n) Σ_t valid_t · (logsumexp(z_t) − z_t[y_t])
    ∂loss/∂z_t = valid_t / n · (softmax(z_t) − onehot(y_t))
    ∂h_t = (∂loss/∂z_t)·W,   ∂W = Σ_t (∂loss/∂z_t)ᵀ h_t,   ∂b = Σ_t ∂loss/∂z_t

The forward walks the tokens in chunks sized so that one logits block would be ``chunk_bytes`` in float32 (the
16-bit block that exists is half that), and computes the gradients right there (the loss is the last op of the
graph, so ∂loss/∂z is known in the forward). It keeps ``∂h`` (``[T, H]``, the size of ``h`` itself) for the
backward, which only scales it by the incoming gradient. Eager torch instead keeps the 16-bit logits, their
float32 copy and log-softmax, and the backward allocates two more ``[T, V]`` float32 tensors: 2 GiB each for a
128k vocabulary at 2,048 tokens.

An NF4 head (``nf4``) is dequantized one vocabulary slice at a time (slices cut on whole
double-quantization groups, so each is an ordinary NF4 tensor). Each chunk's logits come from a GEMM in
h's dtype (cuBLAS on a GPU), what eager ``F.linear`` returns, and go straight to the cross-entropy op,
the Triton kernel ``fastpeft.kernels.cross_entropy`` on a GPU and its reference otherwise: a dense head
(one slice) takes one launch that writes the per-token losses and overwrites the logits with ∂loss/∂z in
their own dtype (what eager torch's backward feeds its GEMMs too); with several slices a first pass
gathers each slice's log-sum-exp and label logit (``fastpeft::cross_entropy_slice_stats``), combined
across slices, and a second recomputes each slice's logits and overwrites them with their gradient
(``fastpeft::cross_entropy_slice_grad_``). No float32 ``[tokens, vocab]`` block exists on either path.
``torch.autocast`` picks the compute dtype as for ``nn.Linear``.

Tracing memory on fake tensors (``fastpeft memory``) runs inside ``trace_repeated_chunks_once()``: the chunks
between the second and the last allocate and free exactly what the second does, so they are skipped there and
the trace costs the same for a billion tokens as for three chunks (the recorded peak is unchanged; fake tensors
hold no values to get wrong). Tensors with values always run every chunk.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator

import torch
from torch._subclasses.fake_tensor import is_fake

from fastpeft.kernels import reference
from fastpeft.kernels.formats import NF4Args
from fastpeft.ops._dispatch import use_triton
from fastpeft.ops.nf4 import nf4_dequantize

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "cross_entropy_grad_",
    "cross_entropy_slice_grad_",
    "cross_entropy_slice_stats",
    "linear_cross_entropy",
    "chunk_starts",
    "trace_repeated_chunks_once",
    "vocab_slices",
]

Tensor = torch.Tensor

DEFAULT_CHUNK_BYTES = 64 << 20  # one float32 logits block (and one 16-bit NF4 head slice)


_TRACE_ONCE: contextvars.ContextVar[bool] = contextvars.ContextVar("fastpeft_lce_trace_once", default=False)


@contextlib.contextmanager
def trace_repeated_chunks_once() -> Iterator[None]:
    """Within it, the loss over fake tensors runs its first two token chunks and its last only (see module doc)."""
    token = _TRACE_ONCE.set(True)
    try:
        yield
    finally:
        _TRACE_ONCE.reset(token)


def chunk_starts(tokens: int, chunk: int, hidden: Tensor) -> list[int] | range:
    """Where the token chunks of ``hidden`` start (the loss's, and ``fastpeft.app.seq_chunks``' sequence chunks).

    Chunk 1 meets chunk 0's leftovers (its logits block, freed only as the next
    one is made), every later chunk meets a full chunk's, the last its predecessor's: under
    ``trace_repeated_chunks_once`` a fake run keeps chunks 0, 1 and the last, whose allocations, frees and so
    peaks are those of every chunk in between."""
    starts = range(0, tokens, chunk)
    if len(starts) > 3 and _TRACE_ONCE.get() and is_fake(hidden):
        return [starts[0], starts[1], starts[-1]]
    return starts


def vocab_slices(vocab: int, hidden: int, chunk_bytes: int, nf4: NF4Args | None) -> list[tuple[int, int]]:
    """Row ranges ``[(v0, v1), ...]`` of the head that are materialized at once.

    A dense head is one slice. An NF4 head is cut into slices of about ``chunk_bytes`` in 16 bits, each
    starting on a whole (nested) absmax block and an even element, so it dequantizes on its own.
    """
    if nf4 is None:
        return [(0, vocab)]
    group = nf4.blocksize * (nf4.nested_blocksize if nf4.absmax.dtype == torch.uint8 else 1)
    group = math.lcm(group, 2)
    step = group // math.gcd(hidden, group)  # rows per whole group
    rows = max(step, (chunk_bytes // (2 * hidden)) // step * step)
    return [(v0, min(v0 + rows, vocab)) for v0 in range(0, vocab, rows)]


def _nf4_rows(nf4: NF4Args, v0: int, v1: int, dtype: torch.dtype) -> Tensor:
    """Rows ``v0:v1`` of an NF4 ``[V, H]`` weight, dequantized to ``dtype`` (``v0`` on a whole group)."""
    hidden = nf4.shape[1]
    e0, e1 = v0 * hidden, v1 * hidden
    b0, b1 = e0 // nf4.blocksize, -(-e1 // nf4.blocksize)
    nested = None
    if nf4.nested_absmax is not None:
        nested = nf4.nested_absmax[b0 // nf4.nested_blocksize : -(-b1 // nf4.nested_blocksize)]
    flat = nf4_dequantize(
        nf4.packed.reshape(-1)[e0 // 2 : -(-e1 // 2)], nf4.absmax[b0:b1], e1 - e0, dtype, nf4.blocksize, nested,
        nf4.offset, nf4.quant_map, nf4.nested_quant_map, nf4.nested_blocksize,
    )  # fmt: skip
    return flat.view(v1 - v0, hidden)


def _logits(h: Tensor, w: Tensor, b: Tensor | None, v0: int, v1: int) -> Tensor:
    """Logits of vocabulary rows ``v0:v1`` (``w`` holds those rows) in h's dtype, what eager F.linear returns."""
    return torch.mm(h, w.t()) if b is None else torch.addmm(b[v0:v1], h, w.t())


@torch.library.custom_op("fastpeft::cross_entropy_grad_", mutates_args=("z",))
def cross_entropy_grad_(z: Tensor, labels: Tensor, scale: Tensor) -> Tensor:
    """Per-token losses ``scale·(logsumexp(z) − z[labels])`` (float32 ``[T]``), with ``z [T, V]`` overwritten
    by ``scale·(softmax(z) − onehot(labels))`` in its own dtype: ``fastpeft.kernels.cross_entropy`` or its
    reference."""
    if use_triton(z):
        from fastpeft.kernels.cross_entropy import cross_entropy_grad_ as launch

        return launch(z, labels, scale)
    return reference.cross_entropy_grad_reference(z, labels, scale)


@cross_entropy_grad_.register_fake
def _(z: Tensor, labels: Tensor, scale: Tensor) -> Tensor:
    return z.new_empty(z.shape[:1], dtype=torch.float32)


@torch.library.custom_op("fastpeft::cross_entropy_slice_stats", mutates_args=())
def cross_entropy_slice_stats(z: Tensor, labels: Tensor, label_offset: int) -> tuple[Tensor, Tensor]:
    """A vocabulary slice's per-token log-sum-exp and label logit (0 outside the slice), float32 ``[T]``."""
    if use_triton(z):
        from fastpeft.kernels.cross_entropy import cross_entropy_slice_stats as launch

        return launch(z, labels, label_offset)
    return reference.cross_entropy_slice_stats_reference(z, labels, label_offset)


@cross_entropy_slice_stats.register_fake
def _(z: Tensor, labels: Tensor, label_offset: int) -> tuple[Tensor, Tensor]:
    return z.new_empty(z.shape[:1], dtype=torch.float32), z.new_empty(z.shape[:1], dtype=torch.float32)


@torch.library.custom_op("fastpeft::cross_entropy_slice_grad_", mutates_args=("z",))
def cross_entropy_slice_grad_(z: Tensor, labels: Tensor, label_offset: int, scale: Tensor, lse: Tensor) -> None:
    """A vocabulary slice's logits overwritten by ∂loss/∂z, from the whole row's log-sum-exp ``lse``."""
    if use_triton(z):
        from fastpeft.kernels.cross_entropy import cross_entropy_slice_grad_ as launch

        launch(z, labels, label_offset, scale, lse)
    else:
        reference.cross_entropy_slice_grad_reference(z, labels, label_offset, scale, lse)


@cross_entropy_slice_grad_.register_fake
def _(z: Tensor, labels: Tensor, label_offset: int, scale: Tensor, lse: Tensor) -> None:
    return None


class _LinearCrossEntropy(torch.autograd.Function):
    """loss = mean over labelled tokens of CE(h·Wᵀ + b, y); backward: ∂h = g·P·W, ∂W = g·Pᵀ·h, ∂b = g·Σ P,
    with ``P = valid/n · (softmax − onehot)`` formed chunk by chunk in the forward (see module doc)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, nf4, ignore_index, chunk_bytes):  # noqa: ANN001, ANN205
        tokens, width = hidden.shape
        vocab = weight.shape[0] if weight is not None else nf4.shape[0]
        need_dh, need_dw, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        valid = labels != ignore_index
        # 1/n as a tensor: no host sync, and it traces under fake tensors. No labelled token: loss 0.
        scale = valid.float() / valid.sum().clamp(min=1).float()
        target = torch.where(valid, labels, 0).unsqueeze(1)
        slices = vocab_slices(vocab, width, chunk_bytes, nf4)
        widest = max(v1 - v0 for v0, v1 in slices)
        chunk = max(1, min(tokens, chunk_bytes // (4 * widest)))
        dh = torch.empty_like(hidden) if need_dh else None
        dw = torch.zeros(vocab, width, dtype=torch.float32, device=hidden.device) if need_dw else None
        db = torch.zeros(vocab, dtype=torch.float32, device=hidden.device) if need_db else None

        def rows(v0: int, v1: int) -> Tensor:
            return weight[v0:v1] if weight is not None else _nf4_rows(nf4, v0, v1, hidden.dtype)

        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for t0 in chunk_starts(tokens, chunk, hidden):
            h, y, s = hidden[t0 : t0 + chunk], target[t0 : t0 + chunk], scale[t0 : t0 + chunk].unsqueeze(1)
            if len(slices) == 1:
                w = rows(0, vocab)
                z = _logits(h, w, bias, 0, vocab)
                loss += cross_entropy_grad_(z, y.squeeze(1), s.squeeze(1)).sum()  # z <- ∂loss/∂z
                if need_dh:
                    dh[t0 : t0 + chunk] = torch.mm(z, w)
                if need_dw:
                    dw.addmm_(z.t().float(), h.float())
                if need_db:
                    db += z.float().sum(0)
                continue
            # -- pass 1: log-sum-exp and the label's logit, slice by slice --
            y1, s1 = y.squeeze(1), s.squeeze(1)
            lse = torch.full((h.shape[0],), -math.inf, dtype=torch.float32, device=h.device)
            picked = torch.zeros((h.shape[0],), dtype=torch.float32, device=h.device)
            for v0, v1 in slices:
                slice_lse, slice_picked = cross_entropy_slice_stats(_logits(h, rows(v0, v1), bias, v0, v1), y1, v0)
                lse = torch.logaddexp(lse, slice_lse)
                picked += slice_picked
            loss += ((lse - picked) * s1).sum()
            # -- pass 2: the logits again, overwritten by their gradient; ∂h accumulated in float32 --
            acc = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if need_dh else None
            for v0, v1 in slices:
                w = rows(v0, v1)
                p = _logits(h, w, bias, v0, v1)
                cross_entropy_slice_grad_(p, y1, v0, s1, lse)
                if need_dh:
                    acc += torch.mm(p, w).float()
                if need_dw:
                    dw[v0:v1].addmm_(p.t().float(), h.float())
                if need_db:
                    db[v0:v1] += p.float().sum(0)
            if need_dh:
                dh[t0 : t0 + chunk] = acc
        ctx.save_for_backward(dh, dw, db)
        ctx.dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        dh, dw, db = ctx.saved_tensors
        out = [None] * 7
        if dh is not None:
            out[0] = dh * grad.to(dh.dtype)
        if dw is not None:
            out[1] = (dw * grad).to(ctx.dtypes[0])
        if db is not None:
            out[2] = (db * grad).to(ctx.dtypes[1])
        return tuple(out)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor | None,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    nf4: NF4Args | None = None,
    ignore_index: int = -100,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Tensor:
    """Mean cross-entropy of ``hidden·Wᵀ + bias`` against ``labels`` without materializing the logits.

    Equal to ``F.cross_entropy(F.linear(hidden, W, bias).float(), labels, ignore_index=ignore_index)``
    (0 instead of NaN when no token is labelled), with gradients for ``hidden``, and for ``weight`` and
    ``bias`` when they require grad. Under ``torch.autocast`` the operands are cast to the autocast dtype.

    Args:
        hidden: ``[T, H]`` (flatten the batch first; shift the labels for a causal LM).
        weight: dense head ``[V, H]``, or None when ``nf4`` gives it (frozen).
        labels: ``[T]`` integer class ids, ``ignore_index`` where no loss is taken.
        bias: ``[V]`` or None.
        nf4: an NF4-quantized head ``[V, H]`` instead of ``weight``.
        ignore_index: the label that marks tokens without a loss.
        chunk_bytes: size of one float32 logits block (tokens per chunk follow from it).

    Returns:
        the scalar float32 loss.

    Raises:
        ValueError: neither or both of ``weight`` and ``nf4``; shapes that do not match; ``chunk_bytes`` < 1.
    """
    if (weight is None) == (nf4 is None):
        raise ValueError("pass exactly one of weight (a dense head) and nf4 (a quantized head)")
    vocab, width = (weight.shape[0], weight.shape[1]) if weight is not None else nf4.shape
    if hidden.dim() != 2 or hidden.shape[1] != width:
        raise ValueError(f"hidden must be [tokens, {width}], got {tuple(hidden.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must be [{hidden.shape[0]}], got {tuple(labels.shape)}")
    if bias is not None and bias.shape != (vocab,):
        raise ValueError(f"bias must be [{vocab}], got {tuple(bias.shape)}")
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    with torch.autocast(device, enabled=False):
        w = weight.to(dtype) if weight is not None else None
        b = bias.to(dtype) if bias is not None else None
        return _LinearCrossEntropy.apply(hidden.to(dtype), w, b, labels, nf4, ignore_index, chunk_bytes)
