"""The ``fastpeft`` command's entry point, kept where scripts call it (``python -m fastpeft.cli``).

The command line itself lives in the application package, ``fastpeft.app.cli``.
"""

from __future__ import annotations

import sys

from fastpeft.app.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
