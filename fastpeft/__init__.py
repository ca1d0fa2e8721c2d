"""fastpeft: parameter-efficient fine-tuning on fused Triton kernels."""

from __future__ import annotations

from fastpeft.quant import NF4Weight, quantize_nf4

__version__ = "0.1.0"

__all__ = ["NF4Weight", "quantize_nf4", "__version__"]
