"""Packed training rows: several examples in one row of ``seq_len`` tokens, none attending to another.

Right-padding a batch of instruction data wastes about half of it on padding. ``PackedBatches`` puts the
examples into rows of ``seq_len`` tokens instead (best fit, longest first, once for the run, so the rows never
change between epochs or on resume) and serves the rows in a seeded order per epoch, exactly as ``Batches``
serves examples. Inside a row each example gets positions ``0, 1, ...`` again, and a batch carries
``position_ids`` and no ``attention_mask``: transformers (5.x, every attention implementation) then reads the
example boundaries from where the positions restart and masks attention across them, which on a GPU is its
padding-free / varlen path. The forward must run with ``use_cache=False``: transformers reads the boundaries
only when no cache is in play (a model builds one unless told not to). An example's first token is never a
label (what precedes it in the row is another example), and the padding that fills a short batch's rows is a
segment of its own with no labels. So every real token sees what it sees unpacked, and the loss, a mean over
label tokens, is the unpacked run's.

That holds only for models whose attention follows those position restarts; ``packing_is_exact`` checks it on
the model itself (the loss of two examples packed against the same two apart) before a run packs.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import torch

from fastpeft.app.data import IGNORE_INDEX, Batches, Example

__all__ = ["PackedBatches", "pack", "packing_is_exact", "real_tokens"]


def pack(examples: Sequence[Example], seq_len: int) -> list[list[int]]:
    """Example indices per row: best fit, longest first, each row holding at most ``seq_len`` tokens.

    Deterministic for a given list (ties keep the examples' order).
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens left, row), sorted: the best fit is the first that is large enough
    for i in order:
        n = len(examples[i].input_ids)
        if n > seq_len:
            raise ValueError(f"example {i} has {n} tokens, more than seq_len={seq_len}")
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            left, row = free.pop(at)
        else:
            left, row = seq_len, len(rows)
            rows.append([])
        rows[row].append(i)
        if left - n > 0:
            bisect.insort(free, (left - n, row))
    return rows


class PackedBatches(Batches):
    """Batches of packed rows in a reproducible order: ``fastpeft.app.data.Batches`` over rows instead of examples.

    Epoch ``e`` visits the rows in the permutation drawn from ``torch.Generator`` seeded with ``seed + e``;
    batch ``i`` holds rows ``[i * batch_size, (i + 1) * batch_size)`` of it.

    Args:
        examples: the tokenized examples, each at most ``seq_len`` tokens.
        batch_size: rows per batch.
        pad_id: the id of the padding that fills a row's tail.
        seed: the base seed of the shuffles.
        seq_len: tokens per row.
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, pad_id: int, seed: int, seq_len: int) -> None:
        super().__init__(examples, batch_size, pad_id, seed)
        self.seq_len = seq_len
        self.rows = pack(self.examples, seq_len)

    def _units(self) -> list:
        return self.rows

    def collate(self, rows: Sequence[list[int]]) -> dict[str, torch.Tensor]:
        """``input_ids``, ``position_ids``, ``labels``: each ``[B, L]`` int64, ``L`` the longest row."""
        width = max(sum(len(self.examples[i].input_ids) for i in row) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                ex = self.examples[i]
                n = len(ex.input_ids)
                ids[r, start : start + n] = torch.tensor(ex.input_ids)
                labels[r, start + 1 : start + n] = torch.tensor(ex.labels[1:])  # its first token: no label
                positions[r, start : start + n] = torch.arange(n)
                start += n
            positions[r, start:] = torch.arange(width - start)  # the tail's padding: a segment of its own
        return {"input_ids": ids, "position_ids": positions, "labels": labels}


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The tokens of a batch that are not padding (a padded batch's mask, or a packed batch's examples)."""
    if batch.get("attention_mask") is not None:
        return int(batch["attention_mask"].sum())
    # packed: the padding tail is the last segment of a row, after the last label
    labelled = batch["labels"] != IGNORE_INDEX
    rows, width = labelled.shape
    last = torch.where(labelled.any(1), width - 1 - labelled.flip(1).int().argmax(1), torch.full((rows,), -1))
    return int((last + 1).sum())


def packing_is_exact(model: Any, vocab_size: int, tolerance: float = 1e-4) -> bool:
    """Whether ``model`` gives two examples packed in one row the loss it gives them apart (see module doc).

    Runs two small forwards without gradients (about 24 tokens); the model's train/eval mode is kept.
    """
    g = torch.Generator().manual_seed(0)
    lengths = (7, 5)
    device = next(model.parameters()).device
    examples = [Example(tuple(t.tolist()), tuple(t.tolist())) for t in (torch.randint(0, vocab_size, (n,), generator=g)
                                                                     for n in lengths)]  # fmt: skip
    packed = PackedBatches(examples, 1, 0, 0, sum(lengths) + 3).collate([[0, 1]])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            apart = sum(
                model(input_ids=torch.tensor([ex.input_ids], device=device), use_cache=False,
                      labels=torch.tensor([ex.labels], device=device)).loss.float() * (len(ex.labels) - 1)
                for ex in examples
            ) / sum(n - 1 for n in lengths)  # fmt: skip
            together = model(**{k: v.to(device) for k, v in packed.items()}, use_cache=False).loss.float()
    except (TypeError, ValueError, RuntimeError):  # a model without position_ids, or that refuses them
        return False
    finally:
        model.train(was_training)
    return bool(torch.isfinite(together)) and abs(float(together - apart)) <= tolerance * max(1.0, float(apart.abs()))
