"""Drop-in layers backed by fastpeft's fused ops."""

from __future__ import annotations

from fastpeft.nn.adapter import BottleneckAdapter
from fastpeft.nn.lora import LoraLinear
from fastpeft.nn.nf4_linear import NF4Linear

__all__ = ["BottleneckAdapter", "LoraLinear", "NF4Linear"]
