"""What stops or paces a ``fastpeft finetune`` run: signals, non-finite numbers, a busy CPU, the run-length log.

- ``stop_requests``: SIGINT / SIGTERM recorded so the loop stops at a step boundary with a checkpoint
  (``TrainingInterrupted``); a second SIGINT raises at once.
- ``NonFinite`` / ``diverged``: a loss, gradient or update that stopped being finite becomes
  ``TrainingDiverged``, naming the step and the likely cause.
- ``threads_for_a_busy_cpu``: CPU training uses only the cores the load average leaves idle.
- ``log_estimate``: one log line with the run's expected length after its first steps.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "ESTIMATE_AFTER",
    "NonFinite",
    "TrainingDiverged",
    "TrainingInterrupted",
    "all_finite",
    "diverged",
    "duration",
    "idle_cpu_threads",
    "log_estimate",
    "stop_requests",
    "threads_for_a_busy_cpu",
]

log = logging.getLogger("fastpeft.app.train")

ESTIMATE_AFTER = (3, 30.0)  # the run's length is estimated after this many steps or seconds, whichever first


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped ``finetune`` at a step boundary, after the checkpoint of that step was written.

    Attributes:
        signum: the signal received.
        step: the last completed (and checkpointed) optimizer step.
        checkpoint: the checkpoint directory ``--resume`` continues from.
    """

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        super().__init__(f"{signal.Signals(signum).name} at step {step}: checkpoint written to {checkpoint}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class TrainingDiverged(RuntimeError):
    """Training stopped because the loss, the gradients or the updated weights stopped being finite.

    Nothing of the failed step is written: the last good checkpoint and any earlier results stay.

    Attributes:
        step: the optimizer step that failed (1-based).
        checkpoint: the step of the last good checkpoint left in ``out/checkpoint``, or None.
    """

    def __init__(self, message: str, step: int, checkpoint: int | None) -> None:
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {round(seconds % 3600 / 60):02d} min"


@contextlib.contextmanager
def stop_requests() -> Iterator[list[int]]:
    """While active, SIGINT and SIGTERM are recorded (the loop stops at the next step boundary) instead of
    raising; a second SIGINT raises ``KeyboardInterrupt`` at once. Outside the main thread, nothing changes."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum: int, frame: Any) -> None:
        if received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        received.append(signum)
        log.warning(
            "%s: stopping after this step with a checkpoint (Ctrl-C again stops at once, without one)",
            signal.Signals(signum).name,
        )

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class NonFinite(Exception):
    def __init__(self, what: str, value: str) -> None:
        super().__init__(f"{what} became {value}")
        self.what, self.value = what, value


def diverged(lr: float, step: int, what: str, value: str, last_saved: int | None, out: Path) -> TrainingDiverged:
    """The error for a step whose loss, gradients or update stopped being finite, with its likely cause."""
    if step == 1 and what in ("the loss", "the gradient norm"):
        cause = "the base model's outputs overflow (its weights, or 16-bit activations) on this data"
    else:
        cause = f"a learning rate too high for this model (--lr {lr:g}): lower it or raise --warmup-steps"
    kept = f"the checkpoint of step {last_saved} in {out / 'checkpoint'} is kept" if last_saved else "nothing saved"
    message = f"step {step}: {what} became {value}; training stopped ({kept}). Likely cause: {cause}"
    return TrainingDiverged(message, step, last_saved)


def all_finite(params: list[nn.Parameter]) -> bool:
    return bool(torch.stack([torch.isfinite(p).all() for p in params]).all()) if params else True


def log_estimate(marks: list[float], left: int, total: int) -> bool:
    """Log how long the rest of the run will take, once ``ESTIMATE_AFTER`` steps or seconds have passed
    (whichever first); returns whether it did. ``marks``: the run's start, then the end of each step. The
    rate comes from the steps after the first, which pays one-off costs (allocator growth, compilation)."""
    done, elapsed = len(marks) - 1, marks[-1] - marks[0]
    if left == 0 or (done < ESTIMATE_AFTER[0] and elapsed < ESTIMATE_AFTER[1]):
        return False
    per_step = (marks[-1] - marks[1]) / (done - 1) if done > 1 else elapsed
    log.info(
        "%d steps took %s: at %.2f s a step, the remaining %d of %d steps take about %s",
        done, duration(elapsed), per_step, left, total, duration(per_step * left),
    )  # fmt: skip
    return True


def idle_cpu_threads(load: float | None = None, cores: int | None = None) -> int:
    """Intra-op threads worth using on a CPU whose 1-minute load average is ``load`` (this process counted as
    one of it): the cores nobody else keeps busy, at least one."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if load is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, int(cores - max(0.0, load - 1.0) + 0.5)))


@contextlib.contextmanager
def threads_for_a_busy_cpu(device: torch.device) -> Iterator[None]:
    """Training on the CPU uses no more torch threads than ``idle_cpu_threads`` while it runs. Threads that
    share cores with other work spin-wait on each other at every op: SmolLM2-135M LoRA on 2 cores at load
    average 7-10 ran 2-14 tokens/s with 2 threads and 55-60 with one (fastpeft and HF PEFT alike)."""
    before = torch.get_num_threads()
    n = idle_cpu_threads() if device.type == "cpu" else before
    if n >= before:
        yield
        return
    log.info("the CPU is busy (load average %.1f): training with %d of %d threads", os.getloadavg()[0], n, before)
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
