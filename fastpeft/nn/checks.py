"""Argument checks the layers share (and the PEFT API reuses): adapter names, inputs, scalars."""

from __future__ import annotations

import math
import re
from numbers import Real

import torch
from torch import nn

__all__ = ["check_adapter_name", "check_input", "is_finite_number"]

_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]+")
_MODULEDICT_ATTRIBUTES = frozenset(dir(nn.ModuleDict()))  # instance attributes too ("training")


def check_adapter_name(name: object) -> None:
    """Refuse an adapter name that is not letters, digits, ``_`` and ``-`` (a saved adapter's files go
    in a directory of that name, its modules under ``nn.ModuleDict`` keys), or that is an attribute of
    ``nn.ModuleDict`` (``"keys"``, ``"training"``, ...: torch cannot hold a module under it).

    Raises:
        TypeError: ``name`` is not a str.
        ValueError: the name breaks the rule (the message gives it).
    """
    if not isinstance(name, str):
        raise TypeError(f"adapter name must be a str, got {type(name).__name__}")
    if _ADAPTER_NAME.fullmatch(name) is None:
        raise ValueError(f"adapter name {name!r} must be letters, digits, '_' or '-' (it names a directory)")
    if name in _MODULEDICT_ATTRIBUTES:
        raise ValueError(f"adapter name {name!r} is an attribute of nn.ModuleDict; choose another")


def check_input(x: object) -> None:
    """``TypeError`` unless ``x`` is a floating tensor: integer and bool inputs would otherwise be cast,
    or computed in integers, without a word, where ``nn.Linear`` raises."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype} (cast it first, e.g. x.float())")


def is_finite_number(value: object) -> bool:
    """True for an int or float (not a bool) that is finite as a float."""
    if not isinstance(value, Real) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int beyond float range
        return False
