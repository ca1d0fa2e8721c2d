"""Drop-in layers backed by fastpeft's fused ops."""

from __future__ import annotations

from fastpeft.nn.adapter import BottleneckAdapter

__all__ = ["BottleneckAdapter"]
