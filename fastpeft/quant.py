"""NF4 weights: ``quantize_nf4`` and the ``NF4Weight`` container, byte-compatible with bitsandbytes.

An ``NF4Weight`` holds exactly what bitsandbytes' ``QuantState`` serializes for a 4-bit
``Linear4bit`` (transformers' "bnb-4bit" checkpoints): the packed codes, the absmax (float32, or
uint8 with ``nested_absmax`` and ``offset`` under double quantization), the two code maps and a JSON
blob with the remaining fields. ``to_bnb_state_dict`` / ``from_bnb_state_dict`` read and write those
six keys under a layer prefix.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

import torch

from fastpeft.kernels.formats import NESTED_BLOCKSIZE, NF4Args, check_blocksize, dynamic_map, nf4_code
from fastpeft.ops import nf4 as nf4_ops

__all__ = ["NF4Weight", "quantize_nf4"]

_BLOB_KEY = "quant_state.bitsandbytes__nf4"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class NF4Weight:
    """A weight quantized to NF4 in bitsandbytes' layout.

    Attributes:
        packed: ``[(numel + 1) // 2, 1]`` uint8, two codes a byte, even element in the high nibble.
        absmax: ``[n_blocks]`` float32, or uint8 codes when double-quantized.
        shape: the original weight's shape.
        dtype: the original weight's dtype (what ``dequantize()`` returns by default).
        blocksize: elements per absmax block.
        quant_map: the 16 NF4 values (float32).
        nested_absmax: ``[ceil(n_blocks / 256)]`` float32 (double quantization only).
        offset: one-element float32, the mean that was subtracted from absmax (double quantization only).
        nested_quant_map: the 256-value dynamic map (double quantization only).
        nested_blocksize: absmax values per nested block.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    quant_map: torch.Tensor | None = None
    nested_absmax: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    nested_quant_map: torch.Tensor | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    def __post_init__(self) -> None:
        self.shape = torch.Size(self.shape)
        if self.quant_map is None:
            self.quant_map = nf4_code(self.packed.device)
        if self.double_quant and self.nested_quant_map is None:
            self.nested_quant_map = dynamic_map(self.packed.device)
        self.check_finite()

    def check_finite(self) -> None:
        """Refuse float statistics holding NaN or ±inf: every weight of such a block would dequantize to NaN
        without a word. Tensors without values (meta, fake, traced) are not inspected.

        Raises:
            ValueError: naming the field (``absmax``, ...; ``from_bnb_state_dict`` puts the key in front) and how
                many values are not finite.
        """
        for name in ("absmax", "nested_absmax", "offset", "quant_map", "nested_quant_map"):
            t = getattr(self, name)
            if t is None or not t.is_floating_point() or not _has_values(t):
                continue
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise ValueError(f"{name} holds {bad} non-finite value(s) of {t.numel()}: the weight would dequantize "
                                 "to NaN (a corrupt checkpoint?)")  # fmt: skip

    @property
    def double_quant(self) -> bool:
        return self.absmax.dtype == torch.uint8

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def nbytes(self) -> int:
        """Bytes held on the device (codes, absmax and the nested statistics)."""
        tensors = [self.packed, self.absmax, self.quant_map, self.nested_absmax, self.offset, self.nested_quant_map]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as a dense ``shape`` tensor of ``dtype`` (default: the original dtype)."""
        flat = nf4_ops.nf4_dequantize(
            self.packed,
            self.absmax,
            self.numel,
            dtype or self.dtype,
            self.blocksize,
            self.nested_absmax,
            self.offset,
            self.quant_map,
            self.nested_quant_map,
            self.nested_blocksize,
        )
        return flat.view(self.shape)

    def kernel_args(self) -> NF4Args:
        """This weight as the fused kernels take it (``fastpeft.kernels.formats.NF4Args``).

        Raises:
            ValueError: the weight is not 2-D (``[N, K]``, a Linear weight).
        """
        if len(self.shape) != 2:
            raise ValueError(f"kernel_args needs a 2-D [out, in] weight, got shape {tuple(self.shape)}")
        return NF4Args(
            packed=self.packed,
            absmax=self.absmax,
            shape=(int(self.shape[0]), int(self.shape[1])),
            blocksize=self.blocksize,
            nested_absmax=self.nested_absmax,
            offset=self.offset,
            quant_map=self.quant_map,
            nested_quant_map=self.nested_quant_map,
            nested_blocksize=self.nested_blocksize,
        )

    def to(self, device: torch.device | str) -> NF4Weight:
        """A copy with every tensor on ``device``."""
        moved = {
            name: getattr(self, name).to(device)
            for name in ("packed", "absmax", "quant_map", "nested_absmax", "offset", "nested_quant_map")
            if getattr(self, name) is not None
        }
        return replace(self, **moved)

    def to_bnb_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The six keys transformers writes for a bitsandbytes 4-bit Linear weight under ``prefix``.

        ``prefix`` names the layer (``"model.layers.0.self_attn.q_proj"``, with or without a trailing
        dot); keys are ``<prefix>.weight`` and ``<prefix>.weight.<field>``.
        """
        p = _weight_key(prefix)
        blob: dict[str, object] = {
            "quant_type": "nf4",
            "blocksize": self.blocksize,
            "dtype": _dtype_name(self.dtype),
            "shape": list(self.shape),
        }
        sd = {p: self.packed, f"{p}.absmax": self.absmax, f"{p}.quant_map": self.quant_map}
        if self.double_quant:
            sd[f"{p}.nested_absmax"] = self.nested_absmax
            sd[f"{p}.nested_quant_map"] = self.nested_quant_map
            blob.update(
                nested_blocksize=self.nested_blocksize,
                nested_dtype="float32",
                nested_offset=float(self.offset.reshape(()).item()),
            )
        data = json.dumps(blob).encode("utf-8")
        sd[f"{p}.{_BLOB_KEY}"] = torch.tensor(list(data), dtype=torch.uint8)
        return sd

    @classmethod
    def from_bnb_state_dict(cls, state_dict: dict[str, torch.Tensor], prefix: str = "") -> NF4Weight:
        """Read a bitsandbytes / transformers 4-bit weight from ``state_dict`` (inverse of ``to_bnb_state_dict``).

        Raises:
            ValueError: a key is missing, mis-shaped or of the wrong dtype, a statistic holds NaN or ±inf, or
                the JSON blob is unreadable or describes something other than NF4.
        """
        p = _weight_key(prefix)

        def get(key: str) -> torch.Tensor:
            if key not in state_dict:
                near = sorted(k for k in state_dict if k.startswith(p))[:8]
                raise ValueError(f"missing key {key!r} in the 4-bit state dict (keys under {p!r}: {near})")
            if not isinstance(state_dict[key], torch.Tensor):
                raise ValueError(f"{key}: expected a tensor, got {type(state_dict[key]).__name__}")
            return state_dict[key]

        blob_t = get(f"{p}.{_BLOB_KEY}")
        if blob_t.is_floating_point() or blob_t.is_complex() or blob_t.dim() != 1:
            raise ValueError(f"{p}.{_BLOB_KEY} must be a 1-D tensor of JSON bytes, got {tuple(blob_t.shape)}")
        try:
            blob = json.loads(bytes(blob_t.to("cpu").tolist()).decode("utf-8"))
        except (ValueError, RecursionError) as e:  # bytes out of range, not UTF-8, not JSON, nested too deep
            raise ValueError(f"{p}.{_BLOB_KEY} does not hold a JSON quant state: {e}") from None
        if not isinstance(blob, dict):
            raise ValueError(f"{p}.{_BLOB_KEY} must hold a JSON object, got {type(blob).__name__}")
        if blob.get("quant_type") != "nf4":
            raise ValueError(f"{p}: quant_type {blob.get('quant_type')!r} is not supported (only 'nf4')")
        for field in ("blocksize", "dtype", "shape"):
            if field not in blob:
                raise ValueError(f"{p}.{_BLOB_KEY} lacks {field!r}")
        if not isinstance(blob["dtype"], str) or blob["dtype"] not in _DTYPES:
            raise ValueError(f"{p}: unsupported dtype {blob['dtype']!r}")
        shape = blob["shape"]
        if not isinstance(shape, list) or not shape or not all(_is_int(d) and d > 0 for d in shape):
            raise ValueError(f"{p}.{_BLOB_KEY}: shape must be a list of positive ints, got {shape!r}")
        blocksize, shape = _int_field(p, blob, "blocksize"), torch.Size(shape)
        check_blocksize(blocksize)
        numel = math.prod(shape)
        n_blocks = -(-numel // blocksize)

        packed = get(p)
        if packed.dtype != torch.uint8:  # bitsandbytes allows other storage dtypes for the same bytes
            packed = packed.contiguous().view(-1).view(torch.uint8).reshape(-1, 1)
        _expect(f"{p}", packed, torch.uint8, (numel + 1) // 2)
        quant_map = get(f"{p}.quant_map")
        _expect(f"{p}.quant_map", quant_map, torch.float32, 16)
        absmax = get(f"{p}.absmax")
        fields = dict(packed=packed.reshape(-1, 1), shape=shape, dtype=_DTYPES[blob["dtype"]], blocksize=blocksize,
                      quant_map=quant_map)  # fmt: skip
        if "nested_blocksize" in blob or f"{p}.nested_absmax" in state_dict:
            _expect(f"{p}.absmax", absmax, torch.uint8, n_blocks)
            for field in ("nested_blocksize", "nested_offset"):
                if field not in blob:
                    raise ValueError(f"{p}.{_BLOB_KEY} lacks {field!r}")
            nested_blocksize = _int_field(p, blob, "nested_blocksize")
            if nested_blocksize != NESTED_BLOCKSIZE:
                raise ValueError(f"{p}: nested_blocksize is {nested_blocksize}; bitsandbytes writes {NESTED_BLOCKSIZE}")
            nested_absmax = get(f"{p}.nested_absmax")
            _expect(f"{p}.nested_absmax", nested_absmax, torch.float32, -(-n_blocks // nested_blocksize))
            nested_quant_map = get(f"{p}.nested_quant_map")
            _expect(f"{p}.nested_quant_map", nested_quant_map, torch.float32, 256)
            offset = blob["nested_offset"]
            if not isinstance(offset, (int, float)) or isinstance(offset, bool) or not math.isfinite(offset):
                raise ValueError(f"{p}.{_BLOB_KEY}: nested_offset must be a finite number, got {offset!r}")
            offset = torch.tensor(float(offset), dtype=torch.float32, device=packed.device)
            if not torch.isfinite(offset):
                raise ValueError(f"{p}.{_BLOB_KEY}: nested_offset {blob['nested_offset']!r} overflows float32")
            fields.update(nested_absmax=nested_absmax, offset=offset, nested_quant_map=nested_quant_map,
                          nested_blocksize=nested_blocksize)  # fmt: skip
        else:
            _expect(f"{p}.absmax", absmax, torch.float32, n_blocks)
        try:
            return cls(absmax=absmax, **fields)
        except ValueError as e:  # check_finite: name the field by its key
            raise ValueError(f"{p}.{e}") from None


def _has_values(t: torch.Tensor) -> bool:
    """Whether ``t``'s values can be read: not meta, not a fake tensor, not traced by ``torch.compile``."""
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type != "meta" and not is_fake(t) and not torch.compiler.is_compiling()


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_field(p: str, blob: dict, field: str) -> int:
    if not _is_int(blob[field]):
        raise ValueError(f"{p}.{_BLOB_KEY}: {field} must be an int, got {blob[field]!r}")
    return blob[field]


def _weight_key(prefix: str) -> str:
    return f"{prefix.rstrip('.')}.weight" if prefix else "weight"


def _expect(key: str, t: torch.Tensor, dtype: torch.dtype, numel: int) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.numel() != numel:
        got = f"{t.dtype} with {t.numel()} elements" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{key}: expected {dtype} with {numel} elements, got {got}")


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize a float weight to NF4 exactly as bitsandbytes' ``quantize_4bit(quant_type="nf4")``.

    Args:
        w: float32/float16/bfloat16 tensor of any shape (a Linear weight is ``[out, in]``); finite.
        blocksize: elements per absmax block (64 as in QLoRA; 128 ... 4096 also accepted).
        double_quant: also quantize the absmax to 8 bits (bitsandbytes' ``compress_statistics``).

    Raises:
        TypeError: ``w`` is not a floating tensor, or ``blocksize`` not an int.
        ValueError: ``w`` is empty, on the meta device or holds inf/NaN, or the blocksize is unsupported.
    """
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if not _is_int(blocksize):
        raise TypeError(f"blocksize must be an int, got {type(blocksize).__name__} {blocksize!r}")
    if w.device.type == "meta":
        raise ValueError("w is on the meta device: it has no values to quantize (load the weights first)")
    with torch.no_grad():
        packed, absmax = nf4_ops.nf4_quantize(w.contiguous(), blocksize)
        if not double_quant:
            return NF4Weight(packed, absmax, w.shape, w.dtype, blocksize)
        offset = absmax.mean()  # float32, as bitsandbytes computes it (the codes depend on its rounding)
        if not torch.isfinite(offset):
            # The float32 sum overflows for |w| beyond ~1e35 (bitsandbytes then stores inf): take the
            # mean in float64; it is at most the largest absmax, so it fits float32 again.
            offset = absmax.double().mean().float()
        codes, nested_absmax = nf4_ops.dynamic8_quantize(absmax - offset, NESTED_BLOCKSIZE)
    return NF4Weight(packed, codes, w.shape, w.dtype, blocksize, nested_absmax=nested_absmax, offset=offset)
