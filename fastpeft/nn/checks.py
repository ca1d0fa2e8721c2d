"""Argument checks the layers share (and the PEFT API reuses): adapter names, inputs, scalars."""

from __future__ import annotations

import math
import re
from numbers import Real

import torch
from torch import nn

__all__ = [
    "FLOAT32_MAX",
    "RESERVED_ADAPTER_NAMES",
    "MoveChecks",
    "check_adapter_name",
    "check_input",
    "check_move_target",
    "check_scale_value",
    "is_finite_number",
]

_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]+")
# A saved adapter's folder is named after it: 255 bytes is the file-name limit of common file systems.
_MAX_NAME = 255
# "__base__" means "no adapter" for a row of a mixed-adapter batch: an adapter so named could never be chosen.
RESERVED_ADAPTER_NAMES = frozenset({"__base__"})
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_MODULEDICT_ATTRIBUTES = frozenset(dir(nn.ModuleDict()))  # instance attributes too ("training")


def check_adapter_name(name: object) -> None:
    """Refuse an adapter name that is not letters, digits, ``_`` and ``-`` (a saved adapter's files go
    in a directory of that name, its modules under ``nn.ModuleDict`` keys), longer than a file name may be
    (255), reserved (``"__base__"``, the mixed-batch name for "no adapter"), or that is an attribute of
    ``nn.ModuleDict`` (``"keys"``, ``"training"``, ...: torch cannot hold a module under it).

    Raises:
        TypeError: ``name`` is not a str.
        ValueError: the name breaks the rule (the message gives it).
    """
    if not isinstance(name, str):
        raise TypeError(f"adapter name must be a str, got {type(name).__name__}")
    if _ADAPTER_NAME.fullmatch(name) is None:
        raise ValueError(f"adapter name {name!r:.80} must be letters, digits, '_' or '-' (it names a directory)")
    if len(name) > _MAX_NAME:
        raise ValueError(
            f"adapter name {name[:40]!r}... has {len(name)} characters; at most {_MAX_NAME} (it names a directory)"
        )
    if name in RESERVED_ADAPTER_NAMES:
        raise ValueError(f"adapter name {name!r} is reserved: in adapter_names it means a row without an adapter")
    if name in _MODULEDICT_ATTRIBUTES:
        raise ValueError(f"adapter name {name!r} is an attribute of nn.ModuleDict; choose another")


def check_input(x: object, in_features: int | None = None) -> None:
    """``TypeError`` unless ``x`` is a floating tensor: integer and bool inputs would otherwise be cast,
    or computed in integers, without a word, where ``nn.Linear`` raises. With ``in_features``, ``x`` must be
    ``[..., in_features]`` (``ValueError``): a 0-d input, or a wrong width, otherwise fails deep inside the op.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype} (cast it first, e.g. x.float())")
    if in_features is not None:
        if x.dim() == 0:
            raise ValueError(f"x must be [..., {in_features}], got a 0-d tensor")
        if x.shape[-1] != in_features:
            raise ValueError(f"x must be [..., {in_features}], got {tuple(x.shape)}")


def check_move_target(owner: str, args: tuple, kwargs: dict) -> None:
    """Refuse, before anything moves, a ``.to(...)`` / ``.cuda(...)`` target that does not exist here: an
    unknown device string, a CUDA device without a GPU (torch's own error is an assertion deep in its lazy
    initialization) or past the last GPU.

    Raises:
        ValueError: the device is unknown or not available (named, with what is).
    """
    try:
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
    except (RuntimeError, TypeError) as e:
        what = ", ".join([*(repr(a) for a in args), *(f"{k}={v!r}" for k, v in kwargs.items())])
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{owner}.to({what}): not a device, dtype or tensor ({first})") from None
    if device is not None:
        _check_device_available(owner, device)


class MoveChecks:
    """Mixed into a layer (before ``nn.Module``): ``.to(...)`` and ``.cuda(...)`` refuse a device that is unknown or
    not available here with a ``ValueError`` before anything moves (``check_move_target``)."""

    def to(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201 - nn.Module's signature
        check_move_target(type(self).__name__, args, kwargs)
        return super().to(*args, **kwargs)

    def cuda(self, device: int | str | torch.device | None = None):  # noqa: ANN201 - nn.Module's signature
        target = torch.device("cuda", device) if isinstance(device, int) else torch.device(device or "cuda")
        _check_device_available(type(self).__name__, target)
        return super().cuda(device)


def _check_device_available(owner: str, device: torch.device) -> None:
    if device.type in ("cpu", "meta"):
        return
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.xpu, ...; device kinds it cannot ask pass
    is_available = getattr(backend, "is_available", None)
    if callable(is_available) and not is_available():
        raise ValueError(f"{owner}: device {str(device)!r} is not available here (no {device.type} device)")
    count = getattr(backend, "device_count", None)
    if device.index is not None and callable(count) and device.index >= count():
        raise ValueError(f"{owner}: device {str(device)!r} does not exist ({count()} {device.type} device(s))")


def is_finite_number(value: object) -> bool:
    """True for an int or float (not a bool) that is finite as a float."""
    if not isinstance(value, Real) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int beyond float range
        return False


def check_scale_value(owner: str, name: str, value: object) -> None:
    """``value`` (a ``lora_alpha``, a scaling) must be a number whose magnitude float32 holds: every LoRA scaling
    ``alpha / r`` or ``alpha / sqrt(r)`` is then finite in float32, where the kernels apply it.

    Raises:
        TypeError: not a number. ValueError: not finite, or beyond float32's range (~3.4e38).
    """
    if not isinstance(value, Real) or isinstance(value, bool):
        raise TypeError(f"{owner}{name} must be a finite number, got {value!r}")
    if not is_finite_number(value) or abs(float(value)) > FLOAT32_MAX:
        raise ValueError(
            f"{owner}{name} must be a finite number within float32's range (|x| <= {FLOAT32_MAX:.4g}), got {value!r}"
        )
