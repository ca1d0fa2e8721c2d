"""GGUF files checked before anything else reads them: llama.cpp's layout parsed with bounds.

A GGUF file (version 2 or 3) is: the magic ``GGUF``, a ``uint32`` version, ``uint64`` tensor and key-value
counts, the key-value pairs (``string`` key, ``uint32`` type, value; arrays hold a ``uint32`` item type and a
``uint64`` count), one info per tensor (name, ``uint32`` dimension count, ``uint64`` dimensions fastest first,
``uint32`` ggml type, ``uint64`` offset), then the tensor data, starting at the next multiple of
``general.alignment`` (32 by default), each tensor at an offset that is a multiple of it.

``read_gguf_info`` walks that layout over a memory map, checking every count and length against the bytes left,
so a truncated, corrupt or hostile file is one ``ValueError`` naming the file (and the tensor or key) instead of
a ``struct.error`` from the ``gguf`` package, an allocation sized by a bogus count, or a loop over a billion
layers. It also refuses what the loaders would fail on later: tensor types the ``gguf`` package cannot
dequantize, data past the end of the file, misaligned or overlapping tensors, and a ``block_count`` that
claims layers the file holds no tensors for.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["GGUF_MAGIC", "GGUFInfo", "GGUFTensor", "is_gguf_file", "read_gguf_info"]

_FLOAT_TYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}

GGUF_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NESTING = 2  # arrays of arrays; llama.cpp writes none deeper
# Value type -> struct format of a scalar (8: string, 9: array are read apart).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MIN_KV, _MIN_TENSOR = 8 + 4 + 1, 8 + 4 + 4 + 8  # the fewest bytes one pair / one tensor info can take
_BLOCK = re.compile(r"blk\.(\d+)\.")


@dataclass
class GGUFTensor:
    """One tensor's info: ``shape`` fastest-varying first (ggml's order), ``offset`` from the start of the file."""

    name: str
    shape: tuple[int, ...]
    type_name: str
    offset: int
    nbytes: int


@dataclass
class GGUFInfo:
    """What ``read_gguf_info`` found: scalar and string metadata (arrays as their length), the tensors."""

    path: Path
    version: int
    metadata: dict[str, Any] = field(default_factory=dict)
    tensors: list[GGUFTensor] = field(default_factory=list)

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    @property
    def weight_dtype(self) -> str:
        """The dtype the file's matrices are stored in: ``float32`` / ``float16`` / ``bfloat16`` where every matrix
        is that float type, else ``bfloat16`` (llama.cpp's block-quantized types have no 16-bit original to keep,
        and bf16 holds their dequantized values' range)."""
        kinds = {t.type_name for t in self.tensors if len(t.shape) >= 2}
        if len(kinds) == 1 and (only := kinds.pop()) in _FLOAT_TYPES:
            return _FLOAT_TYPES[only]
        return "bfloat16"


def is_gguf_file(path: str | os.PathLike) -> bool:
    """True when ``path`` is a regular file that starts with the GGUF magic bytes (whatever its name)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:  # missing, a directory, unreadable
        return False


class _Reader:
    def __init__(self, path: Path, buf: mmap.mmap | bytes) -> None:
        self.path, self.buf, self.pos, self.size = path, buf, 0, len(buf)

    def fail(self, what: str) -> ValueError:
        return ValueError(f"{self.path}: {what}")

    def take(self, n: int, what: str) -> int:
        """Advance by ``n`` bytes; return where they start."""
        if n < 0 or self.pos + n > self.size:
            raise self.fail(
                f"truncated in {what} (needs {n:,d} bytes at offset {self.pos:,d}, the file has {self.size:,d})"
            )
        start = self.pos
        self.pos += n
        return start

    def unpack(self, fmt: str, what: str) -> Any:
        start = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self.buf, start)[0]

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what)
        start = self.take(n, what)
        try:
            return bytes(self.buf[start : start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8 text") from None

    def skip_value(self, vtype: int, what: str, depth: int = 0) -> Any:
        """Read (scalars, strings) or skip (arrays: their length is returned) one value of type ``vtype``."""
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype != _ARRAY or depth >= _MAX_NESTING:
            raise self.fail(f"{what} has an unknown value type {vtype}")
        item, count = self.unpack("<I", what), self.unpack("<Q", what)
        if item in _SCALARS:
            self.take(count * struct.calcsize(_SCALARS[item]), what)
        elif item == _STRING:
            if count * 8 > self.size - self.pos:
                raise self.fail(f"truncated in {what}: it claims {count:,d} strings, more than the bytes left hold")
            for _ in range(count):
                self.take(self.unpack("<Q", what), what)
        elif item == _ARRAY:
            if count * 12 > self.size - self.pos:
                raise self.fail(f"truncated in {what}: it claims {count:,d} arrays, more than the bytes left hold")
            for _ in range(count):
                self.skip_value(_ARRAY, what, depth + 1)
        else:
            raise self.fail(f"{what} is an array of an unknown value type {item}")
        return count


def read_gguf_info(path: str | os.PathLike) -> GGUFInfo:
    """Parse and check a GGUF file's header, metadata and tensor infos (see the module doc); no tensor is read.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a GGUF file, or one the loaders would fail on (named: the file, and the tensor or key).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise ValueError(f"{path}: {size} bytes, too short for a GGUF header (24 bytes)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(_Reader(path, buf))


def _parse(r: _Reader) -> GGUFInfo:
    if bytes(r.buf[:4]) != GGUF_MAGIC:
        raise r.fail("not a GGUF file (it does not start with the magic bytes 'GGUF')")
    r.take(4, "the header")
    version = r.unpack("<I", "the header")
    if version not in _VERSIONS:
        raise r.fail(f"GGUF version {version} is not supported (versions {', '.join(map(str, _VERSIONS))})")
    n_tensors, n_kv = r.unpack("<Q", "the header"), r.unpack("<Q", "the header")
    room = r.size - r.pos
    if n_kv * _MIN_KV > room or n_tensors * _MIN_TENSOR > room:
        raise r.fail(
            f"the header claims {n_tensors:,d} tensors and {n_kv:,d} key-value pairs, more than the file's "
            f"{r.size:,d} bytes can describe (corrupt or truncated)"
        )
    info = GGUFInfo(r.path, version)
    for i in range(n_kv):
        key = r.string(f"the key of key-value pair #{i}")
        vtype = r.unpack("<I", f"key {key!r}")
        info.metadata[key] = r.skip_value(vtype, f"key {key!r}")
    infos = []
    for i in range(n_tensors):
        name = r.string(f"the name of tensor #{i}")
        what = f"the info of tensor {name!r}" if name else f"the info of tensor #{i}"
        n_dims = r.unpack("<I", what)
        if not 1 <= n_dims <= _MAX_DIMS:
            raise r.fail(f"{what}: {n_dims} dimensions (1 to {_MAX_DIMS}): corrupt, or the tensor count is too high")
        shape = tuple(r.unpack("<Q", what) for _ in range(n_dims))
        ttype, offset = r.unpack("<I", what), r.unpack("<Q", what)
        infos.append((i, name, shape, ttype, offset))
    alignment = info.metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise r.fail(f"general.alignment {alignment!r} is not a power of two")
    data_start = -(-r.pos // alignment) * alignment
    info.tensors = [_tensor(r, data_start, alignment, *t) for t in infos]
    _check_layout(r, info)
    return info


def _tensor(r: _Reader, data_start: int, alignment: int, i: int, name: str, shape: tuple, ttype: int,
            offset: int) -> GGUFTensor:  # fmt: skip
    import gguf

    if not name:
        raise r.fail(f"tensor #{i} has an empty name: corrupt, or the tensor count is too high")
    try:
        qtype = gguf.GGMLQuantizationType(ttype)
    except ValueError:
        raise r.fail(f"tensor {name!r} has an unknown ggml type {ttype}") from None
    if not _dequantizable(gguf, qtype):
        raise r.fail(f"tensor {name!r} has type {qtype.name}, which the gguf package cannot dequantize")
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    numel = 1
    for d in shape:
        numel *= d
    if numel == 0 or shape[0] % block:
        raise r.fail(f"tensor {name!r} of shape {list(shape)} does not fit {qtype.name} blocks of {block}")
    if offset % alignment:
        raise r.fail(f"tensor {name!r}: data offset {offset:,d} is not a multiple of the alignment {alignment}")
    nbytes = numel // block * type_size
    start = data_start + offset
    if start + nbytes > r.size:
        raise r.fail(
            f"truncated: tensor {name!r} ({qtype.name} {list(shape)}) needs bytes up to {start + nbytes:,d}, "
            f"the file has {r.size:,d}"
        )
    return GGUFTensor(name, shape, qtype.name, start, nbytes)


def _dequantizable(gguf: Any, qtype: Any) -> bool:
    """What ``gguf.dequantize`` implements: F32, F16 and the types with a quantization class."""
    traits = getattr(gguf.quants, "_type_traits", None)
    if traits is None:  # another gguf release: let dequantize itself decide
        return True
    return qtype.name in ("F32", "F16") or qtype in traits


def _check_layout(r: _Reader, info: GGUFInfo) -> None:
    seen: set[str] = set()
    for t in info.tensors:
        if t.name in seen:
            raise r.fail(f"tensor {t.name!r} appears twice")
        seen.add(t.name)
    ordered = sorted(info.tensors, key=lambda t: t.offset)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if a.offset + a.nbytes > b.offset:
            raise r.fail(f"tensors {a.name!r} and {b.name!r} overlap (corrupt tensor infos)")
    arch = info.architecture
    blocks = info.metadata.get(f"{arch}.block_count") if arch else None
    present = {int(m.group(1)) for t in info.tensors if (m := _BLOCK.match(t.name))}
    if isinstance(blocks, int) and present and blocks > len(present):
        raise r.fail(f"{arch}.block_count is {blocks:,d}, but the file holds tensors for {len(present):,d} blocks")
