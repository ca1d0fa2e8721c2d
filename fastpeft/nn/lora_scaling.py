"""``ScalingTable``: a LoRA layer's ``scaling`` dict that ``torch.compile`` reads as a tensor.

HF PEFT keeps each adapter's scaling as a Python float in ``layer.scaling[name]``, and code sets it there
(``set_scale``, ``scale_layer``, or by assignment). Dynamo bakes a float it reads from a module into the
graph as a constant and guards on its value, so every new scaling would recompile the model.

``ScalingTable`` is that dict (same keys, float values, ``isinstance(t, dict)``) and also holds each value
in a 0-d float64 CPU tensor, rewritten in place whenever the value changes by any dict operation. Under
``torch.compile`` the layers read ``table.tensor(name)``: an input of the graph, whose value may change
between calls without a recompile (a CPU scalar tensor multiplies tensors on any device).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["ScalingTable"]


class ScalingTable(dict):
    """``{adapter name: scaling}`` with a 0-d tensor twin per entry (``tensor(name)``), kept equal on every write."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self._tensors: dict[str, torch.Tensor] = {}
        self.update(*args, **kwargs)

    def tensor(self, name: str) -> torch.Tensor:
        """The scaling of ``name`` as a 0-d float64 CPU tensor (the same object for the entry's lifetime)."""
        return self._tensors[name]

    def _store(self, name: str, value: float) -> None:
        t = self._tensors.get(name)
        if t is None:
            self._tensors[name] = torch.tensor(float(value), dtype=torch.float64)
        else:
            with torch.no_grad():
                t.fill_(float(value))  # in place: a compiled graph holding this tensor sees the new value

    # -- every dict write goes through _store / _tensors ----------------------------------------

    def __setitem__(self, name: str, value: float) -> None:
        super().__setitem__(name, value)
        self._store(name, value)

    def __delitem__(self, name: str) -> None:
        super().__delitem__(name)
        self._tensors.pop(name, None)

    def update(self, *args: Any, **kwargs: Any) -> None:
        for name, value in dict(*args, **kwargs).items():
            self[name] = value

    def __ior__(self, other: Any) -> ScalingTable:
        self.update(other)
        return self

    def setdefault(self, name: str, default: float | None = None) -> Any:
        if name not in self:
            self[name] = default
        return self[name]

    def pop(self, name: str, *default: Any) -> Any:
        self._tensors.pop(name, None)
        return super().pop(name, *default)

    def popitem(self) -> tuple[str, Any]:
        name, value = super().popitem()
        self._tensors.pop(name, None)
        return name, value

    def clear(self) -> None:
        super().clear()
        self._tensors.clear()

    def copy(self) -> ScalingTable:
        return ScalingTable(self)

    @classmethod
    def fromkeys(cls, names: Iterable[str], value: float | None = None) -> ScalingTable:
        return cls((name, value) for name in names)

    def __reduce__(self) -> tuple:
        # pickling and deepcopy rebuild through __init__, so the twins are rebuilt too
        return (type(self), (dict(self),))
