"""``python -m benchmarks`` (in a checkout) or ``python -m fastpeft.benchmarks``: same as ``fastpeft bench``."""

from __future__ import annotations

import os
import sys

from .cli import main

if __name__ == "__main__":
    # Run from a checkout, its root is on sys.path, and its kernels/ folder would shadow the PyPI package of
    # that name that bitsandbytes probes for (why fastpeft installs it as fastpeft.kernels). This package is
    # imported already and fastpeft comes from its installation, so the root can go.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    sys.exit(main())
