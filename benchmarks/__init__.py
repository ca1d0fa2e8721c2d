"""fastpeft's benchmark suite: ``fastpeft bench`` (or ``python -m benchmarks`` in a checkout).

One measuring core (``core``) and one module per op family (``bench_nf4``, ``bench_lora_linear``,
``bench_adapter``, ``bench_finetune``) that describe cases; ``suite`` runs them in the window plan's order
(``plan``), attaches the compile gate's predictions (``predict``), judges DESIGN.md's goals (``goals``)
and writes the CSV, summary and plots (``report``). Installed as ``fastpeft.benchmarks``.
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv=None) -> int:
    from .cli import main as _main

    return _main(argv)
