"""fastpeft's Triton kernels and their plain-PyTorch twins (``fastpeft.kernels``).

In a source checkout the modules live in the repository's top-level ``kernels/`` folder, which has no
``__init__.py`` on purpose: with the repository root first on ``sys.path`` (``python -m pytest``,
``python -c``, a notebook started there), a folder without one is only a namespace portion, and Python
prefers any regular package of the same name further down the path, such as Hugging Face's ``kernels``,
which transformers imports. This file joins that folder to the package's search path; an installed
wheel carries the modules in this directory itself, where the folder below does not exist.
"""

from __future__ import annotations

import os

_SOURCES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "kernels")
if os.path.isdir(_SOURCES) and _SOURCES not in __path__:
    __path__.append(_SOURCES)
