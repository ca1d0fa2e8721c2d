"""What a run measures: ops, shapes, token counts, modes, dtype and device (``Spec``), and the shape sets.

Shapes are the ``N x K`` (out x in) projections of a model: ``llama3-8b`` is DESIGN.md's set
(q/o 4096x4096, k/v 1024x4096, gate/up 14336x4096, down 4096x14336), ``llama3-70b`` its 70B twin;
``N,K`` adds one. Without a GPU the measured cases run on ``CPU_SHAPES`` (small: the CPU rows only
check that every provider runs), and the GPU cases of the requested shapes get estimates.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

__all__ = [
    "CPU_M",
    "CPU_SHAPES",
    "M_VALUES",
    "MODES",
    "OPS",
    "SHAPE_SETS",
    "Shape",
    "Spec",
    "parse_ints",
    "parse_shapes",
]

OPS = (
    "nf4_dequant", "lora_linear", "qlora_linear", "dora", "dora_dense", "adapter", "lora_mixed", "lm_loss",
    "finetune_step",
)  # fmt: skip
MODES = ("fwd", "fwd+bwd")
M_VALUES = (1, 16, 64, 256, 2048, 8192)


@dataclass(frozen=True)
class Shape:
    """One projection ``[N, K]`` and the model's hidden size (the adapter's width)."""

    name: str
    n: int
    k: int
    hidden: int
    model: str = ""


def _llama(model: str, hidden: int, intermediate: int, kv: int) -> list[Shape]:
    dims = [(hidden, hidden), (kv, hidden), (intermediate, hidden), (hidden, intermediate)]
    return [Shape(f"{n}x{k}", n, k, hidden, model) for n, k in dims]


SHAPE_SETS = {
    "llama3-8b": _llama("llama3-8b", 4096, 14336, 1024),
    "llama3-70b": _llama("llama3-70b", 8192, 28672, 1024),
}
CPU_SHAPES = [Shape("384x256", 384, 256, 256, "cpu-small")]
"""Measured shapes without a GPU: small enough that every CPU provider runs in a second or two."""
CPU_M = (1, 64)


def parse_shapes(values: list[str]) -> list[Shape]:
    """``llama3-8b``, ``llama3-70b`` or ``N,K`` (each value may hold several, space separated)."""
    out: list[Shape] = []
    for value in " ".join(values).split():
        if value in SHAPE_SETS:
            out.extend(SHAPE_SETS[value])
            continue
        parts = value.lower().replace("x", ",").split(",")
        if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"--shapes: {value!r} is neither a shape set ({', '.join(SHAPE_SETS)}) nor N,K")
        n, k = (int(p) for p in parts)
        out.append(Shape(f"{n}x{k}", n, k, k))
    seen: set[str] = set()
    return [s for s in out if not (s.name in seen or seen.add(s.name))]


def parse_ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise ValueError(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{what}: expected positive integers, got {text!r}")
    return values


@dataclass(frozen=True)
class Spec:
    """One run's matrix; ``device`` is where cases run ("cuda" or "cpu")."""

    ops: tuple[str, ...] = OPS
    shapes: tuple[Shape, ...] = tuple(SHAPE_SETS["llama3-8b"])
    ms: tuple[int, ...] = M_VALUES
    modes: tuple[str, ...] = MODES
    dtype: torch.dtype = torch.bfloat16
    device: str = "cuda"
    quick: bool = False
    rank: int = 16
    bottleneck: int = 256
    finetune_layers: int = 4
    finetune_seq: int = 2048
    providers: tuple[str, ...] | None = None
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def is_gpu(self) -> bool:
        return self.device == "cuda"

    def cpu_variant(self) -> Spec:
        """The spec measured on a CPU-only machine: small shapes and token counts."""
        ms = tuple(m for m in self.ms if m in CPU_M) or CPU_M
        return replace(
            self, shapes=tuple(CPU_SHAPES), ms=ms, device="cpu", bottleneck=64, finetune_seq=64, finetune_layers=2
        )

    def wants(self, provider: str) -> bool:
        """Whether ``--providers`` selects ``provider`` ("fastpeft" selects its variants "fastpeft-nolora", ...)."""
        return self.providers is None or any(provider == p or provider.startswith(p + "-") for p in self.providers)
