"""Which implementation an op runs: Triton for CUDA tensors, ``kernels/reference.py`` otherwise.

``FASTPEFT_BACKEND=triton`` forces the Triton launchers on CPU tensors too; that only works under
Triton's interpreter (``TRITON_INTERPRET=1``) and is how the tests run the kernels end to end.
``FASTPEFT_BACKEND=reference`` forces the reference everywhere (debugging on a GPU).
"""

from __future__ import annotations

import os

import torch

_CHOICES = ("auto", "triton", "reference")


def use_triton(t: torch.Tensor) -> bool:
    """True when ``t``'s op should run the Triton launcher."""
    backend = os.environ.get("FASTPEFT_BACKEND", "auto")
    if backend not in _CHOICES:
        raise ValueError(f"FASTPEFT_BACKEND must be one of {_CHOICES}, got {backend!r}")
    if backend == "auto":
        return t.is_cuda
    return backend == "triton"
