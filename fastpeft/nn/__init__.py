"""Drop-in layers backed by fastpeft's fused ops."""

from __future__ import annotations

from fastpeft.nn.adapter import AdapterFusion, BottleneckAdapter
from fastpeft.nn.lora import LoraLinear
from fastpeft.nn.lora_layers import LoraConv, LoraEmbedding
from fastpeft.nn.lora_mha import LoraMultiheadAttention
from fastpeft.nn.lora_param import LoraParameter
from fastpeft.nn.nf4_linear import NF4Linear

__all__ = [
    "AdapterFusion",
    "BottleneckAdapter",
    "LoraConv",
    "LoraEmbedding",
    "LoraLinear",
    "LoraMultiheadAttention",
    "LoraParameter",
    "NF4Linear",
]
