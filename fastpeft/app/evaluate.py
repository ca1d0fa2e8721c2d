"""Evaluation in ``fastpeft finetune``: the held-out examples, their loss, the eval history and the best step.

- ``read_examples``: the examples of an ``--eval-data`` path, read as ``--data`` is.
- ``held_out``: ``--eval-data``'s examples, or ``--eval-split``'s seeded share of the training examples (disjoint
  from those trained on).
- ``eval_batches``: the held-out examples batched as the training set is (packed rows where it packs).
- ``eval_loss``: the token-weighted mean next-token loss over the whole eval set, with dropout off (``model.eval()``)
  and no gradients; under ``torchrun`` every rank evaluates its rows of each batch and the sums are reduced.
  Packing is exact (``fastpeft.app.packing``), so packed and padded batches give the same loss.
- ``EvalHistory``: the ``{step, eval_loss}`` records, when the next one is due, the best step (lowest eval loss, the
  earliest on a tie) and, with ``--save-best``, a CPU copy of the adapter at that step. It travels in the checkpoint
  (``trainer_state.json`` and ``best_adapter.safetensors``), so ``--resume`` continues it exactly.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fastpeft.app import data as fdata
from fastpeft.app import packing

__all__ = ["EvalHistory", "check_eval_flags", "eval_batches", "eval_loss", "held_out", "read_examples", "snapshot"]


def read_examples(path: str, tokenizer: Any, seq_len: int) -> fdata.Examples:
    """The examples of the data file ``path``, read and tokenized as ``--data`` is (JSONL, chat ``messages``,
    ``datasets`` directories and Parquet files: ``fastpeft.app.data.read_records``)."""
    return fdata.encode_records(fdata.read_records(path), tokenizer, seq_len)


def check_eval_flags(eval_data: str | None, eval_split: float | None, eval_steps: int | None, save_best: bool) -> None:
    """The evaluation flags agree with each other (``ValueError`` naming the flag, before anything is loaded)."""
    if eval_data is not None and eval_split is not None:
        raise ValueError("--eval-data and --eval-split both given: evaluate on a file or on a split, not both")
    if eval_split is not None and not (math.isfinite(eval_split) and 0 < eval_split < 1):
        raise ValueError(f"--eval-split must be a fraction between 0 and 1 (exclusive), got {eval_split}")
    evaluating = eval_data is not None or eval_split is not None
    if eval_steps is not None:
        if eval_steps < 1:
            raise ValueError(f"--eval-steps must be at least 1, got {eval_steps}")
        if not evaluating:
            raise ValueError("--eval-steps needs an eval set: --eval-data FILE or --eval-split FRACTION")
    if save_best and not evaluating:
        raise ValueError("--save-best needs an eval set: --eval-data FILE or --eval-split FRACTION")


def held_out(
    examples: Sequence[fdata.Example],
    eval_data: str | None,
    eval_split: float | None,
    seed: int,
    tokenizer: Any,
    seq_len: int,
) -> tuple[list[fdata.Example], list[fdata.Example]]:
    """``(train, eval)`` examples: ``examples`` and ``eval_data``'s, or ``examples`` split by ``eval_split``.

    The split draws ``round(eval_split * n)`` examples by a permutation seeded with ``seed`` (the same split for
    the same data and seed); both parts keep the data's order.

    Raises:
        ValueError: the split leaves no example on one side.
    """
    if eval_data is not None:
        return list(examples), list(read_examples(eval_data, tokenizer, seq_len))
    if eval_split is None:
        return list(examples), []
    n = len(examples)
    k = round(eval_split * n)
    if k < 1 or k >= n:
        raise ValueError(
            f"--eval-split {eval_split}: {n} training example(s) leave {k} to evaluate on and {n - k} to train on; "
            "both need at least one"
        )
    chosen = set(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].tolist())
    train = [ex for i, ex in enumerate(examples) if i not in chosen]
    return train, [ex for i, ex in enumerate(examples) if i in chosen]


def eval_batches(train: fdata.Batches, examples: Sequence[fdata.Example]) -> fdata.Batches:
    """``examples`` batched as ``train`` batches: the same batch size, padding id and packing."""
    if isinstance(train, packing.PackedBatches):
        return packing.PackedBatches(examples, train.batch_size, train.pad_id, train.seed, train.seq_len)
    return fdata.Batches(examples, train.batch_size, train.pad_id, train.seed)


def _each(batches: fdata.Batches) -> Iterator[dict[str, torch.Tensor]]:
    """Every batch of one epoch (each example once; the order does not change a sum)."""
    for _, _, batch in itertools.islice(batches.iterate(0, 0), batches.batches_per_epoch):
        yield batch


def eval_loss(model: Any, batches: fdata.Batches, device: torch.device, chunked_loss: bool = True,
              run: Any = None) -> float:  # fmt: skip
    """The mean next-token loss over every label token of ``batches`` (a token-weighted mean, not a mean of means).

    Args:
        model: the PEFT model; evaluated in eval mode (no dropout) without gradients, its mode restored after.
        batches: the eval set, as ``eval_batches`` returns it (global batches under ``torchrun``).
        device: where the model computes.
        chunked_loss: compute the loss in chunks (``fastpeft.app.savers.causal_lm_loss``) as training does.
        run: the ``fastpeft.app.distributed.DistributedRun`` under ``torchrun``: every rank takes its rows of
            each batch and the sums are reduced, so each rank returns the global mean.
    """
    from fastpeft.app.savers import causal_lm_loss

    was_training = model.training
    model.eval()
    try:
        if run is not None:
            total, count = run.loss_sums(_each(batches))
        else:
            autocast = (
                torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
            )
            sums = torch.zeros(2, dtype=torch.float64, device=device)
            with torch.no_grad():
                for batch in _each(batches):
                    n = int((batch["labels"][:, 1:] != fdata.IGNORE_INDEX).sum())
                    if n == 0:
                        continue
                    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                    with autocast:
                        loss = causal_lm_loss(model, batch) if chunked_loss else model(**batch).loss
                    sums[0] += loss.detach().double() * n
                    sums[1] += n
            total, count = sums.tolist()
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("the eval set has no token to evaluate on")
    return total / count


def snapshot(named: list[tuple[str, nn.Parameter]]) -> dict[str, torch.Tensor]:
    """CPU copies of the trainable tensors (FSDP2's shards gathered: every rank must call it)."""
    out = {}
    for n, p in named:
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[n] = t.detach().to("cpu", copy=True).contiguous()
    return out


@dataclass
class EvalHistory:
    """The evaluations of a run: every ``every`` steps (None: at the end only) and at step ``total``.

    Attributes:
        records: ``{"step": int, "eval_loss": float}`` in step order.
        best: with ``keep_best``, CPU copies of the trainable tensors at ``best_step``.
    """

    every: int | None
    total: int
    keep_best: bool = False
    records: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, torch.Tensor] | None = None

    def due(self, step: int) -> bool:
        return step == self.total or (self.every is not None and step % self.every == 0)

    @property
    def best_record(self) -> dict[str, Any] | None:
        """The record with the lowest eval loss (the earliest of equal ones), None before any."""
        return min(self.records, key=lambda r: r["eval_loss"]) if self.records else None

    @property
    def last_loss(self) -> float | None:
        return self.records[-1]["eval_loss"] if self.records else None

    def add(self, step: int, loss: float, named: list[tuple[str, nn.Parameter]]) -> None:
        """Record ``loss`` at ``step``; with ``keep_best``, copy the adapter when it is the lowest so far."""
        previous = self.best_record
        self.records.append({"step": step, "eval_loss": loss})
        if self.keep_best and (previous is None or loss < previous["eval_loss"]):
            self.best = snapshot(named)

    def restore(self, records: list[dict[str, Any]], best: dict[str, torch.Tensor] | None, where: str,
                named: list[tuple[str, nn.Parameter]]) -> None:  # fmt: skip
        """Continue from a checkpoint's records and best tensors (``ValueError`` naming ``where`` if unfit)."""
        self.records = [dict(r) for r in records]
        if not self.keep_best or not self.records:
            return
        shapes = {n: tuple(p.shape) for n, p in named}
        if best is None:
            raise ValueError(
                f"{where}: --save-best, but the checkpoint holds no best adapter (best_adapter.safetensors)"
            )
        got = {n: tuple(t.shape) for n, t in best.items()}
        if got != shapes:
            raise ValueError(f"{where}: best_adapter.safetensors does not hold this run's trainable tensors")
        self.best = best

    def metrics(self) -> dict[str, Any]:
        """``eval_loss`` (the last), ``eval_history``, ``best_step`` and ``best_eval_loss`` (None without eval)."""
        best = self.best_record
        return {
            "eval_loss": self.last_loss,
            "eval_history": [dict(r) for r in self.records],
            "best_step": best["step"] if best else None,
            "best_eval_loss": best["eval_loss"] if best else None,
        }
