"""Fixed data of fastpeft's formats (no Triton import at module level): the NF4 codebook, the 8-bit dynamic map,
supported block sizes, the argument checks the NF4 launchers and their references share, and three facts
every launcher uses (a dtype's ``tl.dot`` precision, a device's SM count, the installed Triton's version)."""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

import torch

__all__ = [
    "FLOAT_DTYPES",
    "NESTED_BLOCKSIZE",
    "NF4Args",
    "NF4_CODE",
    "SUPPORTED_BLOCKSIZES",
    "check_blocksize",
    "check_dequantize_args",
    "check_finite",
    "check_float_tensor",
    "dot_precision",
    "dynamic_map",
    "fp32_midpoints",
    "nf4_code",
    "sm_count",
    "triton_version",
]

NF4_CODE: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
SUPPORTED_BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s ``input_precision`` for operands of ``dtype``: float32 gets IEEE products (torch's default,
    no TF32); 16-bit operands are exact on the MMA either way."""
    return "ieee" if dtype == torch.float32 else "tf32"


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (its index, or the current one); 4 elsewhere, so that the interpreter
    runs the split paths."""
    if device.type != "cuda":
        return 4
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def triton_version() -> tuple[int, int]:
    """The installed Triton's ``(major, minor)``, for the few tile rules that differ under older compilers (each
    says why at its rule). Imported here on first call: this module itself needs no Triton."""
    import triton

    major, minor = re.match(r"(\d+)\.(\d+)", triton.__version__).groups()
    return int(major), int(minor)


def fp32_midpoints(values: tuple[float, ...]) -> tuple[float, ...]:
    """Midpoints ``(v[i] + v[i+1]) / 2`` computed in float32, as Python floats (exact)."""
    code = torch.tensor(values, dtype=torch.float32)
    return tuple(((code[:-1] + code[1:]) / 2).tolist())


@functools.cache
def _dynamic_map_cpu() -> torch.Tensor:
    # Signed dynamic tree map, 7 exponent bits: for decade i the interval [0.1, 1] is cut into
    # 2**i pieces whose centres are scaled by 10**(i - 6), mirrored for the negative half,
    # plus 0 and 1: 2 * (2**7 - 1) + 2 = 256 values, sorted.
    values: list[float] = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        centres = (edges[:-1] + edges[1:]) / 2.0
        scaled = (10 ** (i - 6)) * centres
        values += scaled.tolist() + (-scaled).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256-entry signed 8-bit dynamic quantization map (float32, ascending)."""
    return _dynamic_map_cpu().to(device)


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 NF4 code values as float32."""
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def check_float_tensor(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def check_blocksize(blocksize: int, name: str = "blocksize") -> None:
    if blocksize not in SUPPORTED_BLOCKSIZES:
        raise ValueError(f"{name} must be one of {SUPPORTED_BLOCKSIZES}, got {blocksize!r}")


def check_finite(name: str, t: torch.Tensor) -> None:
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        first = (~finite).nonzero()[0].tolist()
        raise ValueError(f"{name} holds non-finite values (first at index {first}); refusing to quantize")


def check_dequantize_args(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    numel: int,
    dtype: torch.dtype,
    blocksize: int,
    nested_absmax: torch.Tensor | None,
    offset: torch.Tensor | None,
    nested_blocksize: int,
    quant_map: torch.Tensor | None = None,
    nested_quant_map: torch.Tensor | None = None,
) -> None:
    """TypeError/ValueError naming the first problem with an NF4 dequantize's arguments.

    The kernels index ``absmax`` and ``nested_absmax`` as flat arrays, so both must be contiguous and on
    ``packed``'s device; the maps may live anywhere (the launchers copy them) but must hold 16 / 256
    floats.
    """
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError(f"packed must be a uint8 tensor, got {getattr(packed, 'dtype', type(packed))}")
    if not isinstance(numel, int) or numel <= 0:
        raise ValueError(f"numel must be a positive int, got {numel!r}")
    if packed.numel() != (numel + 1) // 2:
        raise ValueError(f"packed has {packed.numel()} bytes, expected (numel + 1) // 2 = {(numel + 1) // 2}")
    if not packed.is_contiguous():
        raise ValueError("packed must be contiguous")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    check_blocksize(blocksize)
    n_blocks = -(-numel // blocksize)
    if absmax.dtype not in (torch.float32, torch.uint8) or absmax.numel() != n_blocks:
        raise ValueError(
            f"absmax must be float32 or uint8 with {n_blocks} elements, got {absmax.dtype} with {absmax.numel()}"
        )
    if absmax.device != packed.device:
        raise ValueError(f"absmax is on {absmax.device}, packed on {packed.device}")
    if not absmax.is_contiguous():
        raise ValueError("absmax must be contiguous")
    _check_map("quant_map", quant_map, 16)
    if absmax.dtype == torch.uint8:
        if nested_absmax is None or offset is None:
            raise ValueError("uint8 absmax (double quantization) needs nested_absmax and offset")
        if nested_blocksize != NESTED_BLOCKSIZE:
            raise ValueError(
                f"nested_blocksize must be {NESTED_BLOCKSIZE} (bitsandbytes' only one), got {nested_blocksize!r}"
            )
        n_nested = -(-n_blocks // nested_blocksize)
        if nested_absmax.dtype != torch.float32 or nested_absmax.numel() != n_nested:
            raise ValueError(
                f"nested_absmax must be float32 with {n_nested} elements, "
                f"got {nested_absmax.dtype} with {nested_absmax.numel()}"
            )
        if not nested_absmax.is_contiguous():
            raise ValueError("nested_absmax must be contiguous")
        if not isinstance(offset, torch.Tensor) or offset.numel() != 1 or not offset.is_floating_point():
            raise ValueError(f"offset must be a float tensor of one element, got {offset!r}")
        for name, t in (("nested_absmax", nested_absmax), ("offset", offset)):
            if t.device != packed.device:
                raise ValueError(f"{name} is on {t.device}, packed on {packed.device}")
        _check_map("nested_quant_map", nested_quant_map, 256)


def _check_map(name: str, t: torch.Tensor | None, size: int) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() != size:
        raise ValueError(
            f"{name} must be a float tensor of {size} values, got {getattr(t, 'dtype', type(t).__name__)} "
            f"with {getattr(t, 'numel', lambda: '?')()} elements"
        )


class NF4Args(NamedTuple):
    """An NF4 weight ``[N, K]`` as the fused kernels take it (bitsandbytes layout, see ``kernels/nf4.py``).

    ``absmax`` is float32 ``[n_blocks]``, or uint8 with ``nested_absmax`` / ``offset`` under double
    quantization. ``quant_map`` / ``nested_quant_map`` default to NF4 / the dynamic map.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, int]
    blocksize: int = 64
    nested_absmax: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    quant_map: torch.Tensor | None = None
    nested_quant_map: torch.Tensor | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE
