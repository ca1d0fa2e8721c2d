"""Loss curves of a ``fastpeft finetune`` run: ``loss.png`` with the results, TensorBoard events while it trains.

- ``plot_losses``: train loss per step and eval loss at its steps in one PNG, drawn with matplotlib's Agg canvas
  (no pyplot, no GUI backend, no global state changed), imported only when called. Without matplotlib it draws
  nothing and logs one line.
- ``check_report_to`` / ``tensorboard``: ``--report-to tensorboard`` writes ``train/loss``, ``train/lr`` and
  ``eval/loss`` through ``torch.utils.tensorboard.SummaryWriter`` into ``OUT/tensorboard/``. The tensorboard package
  is checked before training starts; a resumed run drops the events past its checkpoint (``purge_step``), so the
  curves show each step once.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["REPORT_TO", "TENSORBOARD_DIR", "check_report_to", "plot_losses", "tensorboard"]

log = logging.getLogger("fastpeft.app.train")

REPORT_TO = ("none", "tensorboard")
TENSORBOARD_DIR = "tensorboard"  # inside --out


def plot_losses(path: Path, losses: Sequence[float], evals: Sequence[dict[str, Any]]) -> bool:
    """Draw the train losses (step 1, 2, ...) and the eval records (``{step, eval_loss}``) into the PNG ``path``.

    Returns:
        whether ``path`` was written (False: matplotlib is not installed, or there is nothing to draw).
    """
    if not losses and not evals:
        return False
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log.info("matplotlib is not installed: no loss.png (pip install matplotlib)")
        return False
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if losses:
        ax.plot(range(1, len(losses) + 1), losses, label="train loss", linewidth=1.2)
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(str(path), format="png")
    return True


def check_report_to(report_to: str) -> None:
    """``--report-to`` names a known sink whose package is installed: checked before anything is loaded.

    Raises:
        ValueError: an unknown sink.
        ImportError: ``tensorboard`` without the tensorboard package.
    """
    if report_to not in REPORT_TO:
        raise ValueError(f"--report-to must be one of {', '.join(REPORT_TO)}, got {report_to!r}")
    if report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise ImportError("--report-to tensorboard needs the tensorboard package (pip install tensorboard)")


class _Board:
    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def step(self, step: int, loss: float, lr: float) -> None:
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/lr", lr, step)

    def eval(self, step: int, loss: float) -> None:
        self.writer.add_scalar("eval/loss", loss, step)

    def flush(self) -> None:
        self.writer.flush()


@contextlib.contextmanager
def tensorboard(out: Path, enabled: bool, start_step: int) -> Iterator[_Board | None]:
    """A TensorBoard writer into ``out/tensorboard`` while the run trains (None when not ``enabled``).

    ``start_step``: the step a resumed run continues from; events at or after it are dropped from earlier files.
    """
    if not enabled:
        yield None
        return
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out / TENSORBOARD_DIR), purge_step=start_step + 1 if start_step else None)
    try:
        yield _Board(writer)
    finally:
        writer.close()
