"""Composition of bottleneck adapters, with AdapterHub's block names: ``Stack``, ``Parallel``, ``Average``,
``BatchSplit`` and ``Fuse``.

``peft_model.set_active_adapters(Stack("lang", "task"))`` (or ``set_adapter``) makes every adapter wrapper of the
model run the block instead of one adapter. In one wrapper, with ``h`` the adapter's input and ``r`` its residual
(``r = h`` for the sequential placements, the sublayer's output for ``parallel``), a single adapter gives
``A(h, r) = r + s·up(act(down(h)))`` and the blocks give:

- ``Stack(a, b, ...)``: ``y₁ = A_a(h, r)``, then each next adapter on the previous output, ``yₖ = A_k(yₖ₋₁, yₖ₋₁)``.
- ``Average(a, b, ..., weights=[...])``: ``r + Σ wᵢ·(Aᵢ(h, r) - r)``, the weighted sum of the adapters' deltas.
  Weights default to ``1/n`` and are divided by their sum unless ``normalize_weights=False``. With weights
  summing to 1 (the default) this is AdapterHub's weighted sum of the adapters' outputs; with
  ``normalize_weights=False`` AdapterHub weights the residual too and fastpeft does not.
- ``BatchSplit(a, b, ..., batch_sizes=[n_a, n_b, ...])``: the first ``n_a`` rows of the batch through ``a``, the
  next ``n_b`` through ``b``, ...; ``batch_sizes`` must add up to the batch (an int: that many rows each).
- ``Parallel(a, b, ...)``: the whole input batch through each adapter: ``PeftModel.forward`` / ``generate`` repeat
  every batch-sized input (``input_ids``, ``attention_mask``, ``labels``, ...) once per adapter, and each wrapper
  runs ``BatchSplit`` with equal parts on the repeated rows, so the output holds ``n·B`` rows, adapter ``i``'s for
  the ``B`` inputs at rows ``i·B ... (i+1)·B - 1``. AdapterHub repeats the hidden states at the first adapter
  layer instead; before that layer every copy is the same, so the outputs agree. Parallel must be the outermost
  block.
- ``Fuse(a, b, ...)``: AdapterFusion, ``r + Σ pᵢ·value(δᵢ)`` with ``δᵢ = Aᵢ(h, r) - r`` and
  ``p = softmax(query(h)·key(δᵢ))`` (``fastpeft.nn.AdapterFusion``: trainable query, key and value per wrapped
  layer). A fusion is added first (``peft_model.add_adapter_fusion(Fuse("a", "b"))``), saved and loaded on its own
  (``save_adapter_fusion`` / ``load_adapter_fusion``, fastpeft's file layout). While a ``Fuse`` is active its
  fusion layers train and its adapters stay frozen (AdapterHub's ``train_adapter_fusion``). AdapterHub's fusion
  options (``static``, temperature, residual before, value regularization) are not there: fastpeft's fusion is
  the ``dynamic`` one with ``value`` starting at the identity.

Nesting: ``Stack``, ``Average`` and ``BatchSplit`` take names or each other (``Stack("lang", Average("t1",
"t2"))``), ``Stack`` also ``Fuse`` (``Stack("lang", Fuse("t1", "t2"))``), ``Parallel`` takes names or the first
three, ``Fuse`` names only; a wrapper that does not hold one of the named adapters (other ``target_layers``) leaves
that adapter out: it passes its input through. Every adapter in the block trains, but those inside a ``Fuse``.

The blocks are data only: ``fastpeft.peft.adapters.AdapterWrapper`` runs them, calling the per-adapter op once per
adapter (the single-adapter path is unchanged).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from fastpeft.nn.checks import is_finite_number

__all__ = [
    "AdapterComposition",
    "Average",
    "BatchSplit",
    "Fuse",
    "Parallel",
    "Stack",
    "flatten",
    "fusions",
    "parse_setup",
    "trained_names",
]


class AdapterComposition:
    """A composition block: its ``children`` are adapter names or nested blocks."""

    def __init__(self, *children: str | AdapterComposition) -> None:
        kind = type(self).__name__
        if len(children) == 1 and isinstance(children[0], (list, tuple)):
            children = tuple(children[0])  # Stack(["a", "b"]) as Stack("a", "b")
        if not children:
            raise ValueError(f"{kind}: children must name at least one adapter")
        for child in children:
            if not isinstance(child, (str, AdapterComposition)):
                raise ValueError(
                    f"{kind}: children must be adapter names or composition blocks, got {type(child).__name__}"
                )
        self.children: tuple[str | AdapterComposition, ...] = tuple(children)
        names = [n for c in self.children for n in ([c] if isinstance(c, str) else c.flatten())]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated and not isinstance(self, (Stack, Parallel, BatchSplit)):
            raise ValueError(f"{kind}: children name adapter(s) {repeated} more than once")

    def __iter__(self) -> Iterator[str | AdapterComposition]:
        return iter(self.children)

    def __len__(self) -> int:
        return len(self.children)

    def flatten(self) -> list[str]:
        """The adapter names in the block, in order (a name once, at its first place)."""
        out: list[str] = []
        for child in self.children:
            for name in [child] if isinstance(child, str) else child.flatten():
                if name not in out:
                    out.append(name)
        return out

    def _extra(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        parts = [repr(c) for c in self.children] + [f"{k}={v!r}" for k, v in self._extra().items()]
        return f"{type(self).__name__}({', '.join(parts)})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.children == self.children and other._extra() == self._extra()

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.children, tuple(sorted(map(str, self._extra().items())))))


class Stack(AdapterComposition):
    """Adapters in sequence within each wrapped layer: each one takes the previous one's output."""


class Parallel(AdapterComposition):
    """Each adapter on its own copy of the whole input batch; the output has ``len(children)·B`` rows."""


class Fuse(AdapterComposition):
    """AdapterFusion: attention over the adapters' deltas with trainable query, key and value (module doc)."""

    @property
    def name(self) -> str:
        """The fusion's name, its adapters joined by commas (AdapterHub's): ``Fuse("a", "b").name == "a,b"``."""
        return ",".join(self.flatten())


class Average(AdapterComposition):
    """The weighted sum of the children's deltas (see the module doc).

    Args:
        children: adapter names or nested ``Stack`` / ``BatchSplit`` / ``Average`` blocks.
        weights: one finite number per child (default: ``1/n`` each).
        normalize_weights: divide the weights by their sum (AdapterHub's default).
    """

    def __init__(
        self,
        *children: str | AdapterComposition,
        weights: Sequence[float] | None = None,
        normalize_weights: bool = True,
    ) -> None:
        super().__init__(*children)
        n = len(self.children)
        if weights is None:
            self.weights = [1.0 / n] * n
            return
        if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
            raise ValueError(f"Average: weights must be a list of numbers, got {weights!r:.80}")
        weights = list(weights)
        if len(weights) != n:
            raise ValueError(f"Average: weights has {len(weights)} entries for {n} children")
        if not all(is_finite_number(w) for w in weights):
            raise ValueError(f"Average: weights must be finite numbers, got {weights!r:.80}")
        weights = [float(w) for w in weights]
        if normalize_weights:
            total = sum(weights)
            if total == 0:
                raise ValueError(f"Average: weights {weights} sum to 0 and cannot be normalized (normalize_weights)")
            weights = [w / total for w in weights]
        self.weights = weights

    def _extra(self) -> dict[str, Any]:
        return {"weights": self.weights}


class BatchSplit(AdapterComposition):
    """Rows of the batch split among the children, in order.

    Args:
        children: adapter names or nested ``Stack`` / ``Average`` / ``BatchSplit`` blocks.
        batch_sizes: rows per child (an int: that many for each); they must add up to the batch.
    """

    def __init__(self, *children: str | AdapterComposition, batch_sizes: int | Sequence[int]) -> None:
        super().__init__(*children)
        n = len(self.children)
        if isinstance(batch_sizes, int) and not isinstance(batch_sizes, bool):
            batch_sizes = [batch_sizes] * n
        if isinstance(batch_sizes, (str, bytes)) or not isinstance(batch_sizes, Sequence):
            raise ValueError(f"BatchSplit: batch_sizes must be an int or a list of ints, got {batch_sizes!r:.80}")
        sizes = list(batch_sizes)
        if len(sizes) != n:
            raise ValueError(f"BatchSplit: batch_sizes has {len(sizes)} entries for {n} children")
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in sizes):
            raise ValueError(f"BatchSplit: batch_sizes must be non-negative ints, got {sizes!r:.80}")
        self.batch_sizes = sizes

    def _extra(self) -> dict[str, Any]:
        return {"batch_sizes": self.batch_sizes}


# which blocks each block may hold (besides adapter names)
_NESTING: dict[type, tuple[type, ...]] = {
    Stack: (Stack, Average, BatchSplit, Fuse),
    Average: (Stack, Average, BatchSplit),
    BatchSplit: (Stack, Average, BatchSplit),
    Parallel: (Stack, Average, BatchSplit),
    Fuse: (),
}


def flatten(setup: str | AdapterComposition) -> list[str]:
    """The adapter names a setup uses."""
    return [setup] if isinstance(setup, str) else setup.flatten()


def fusions(setup: str | AdapterComposition | None) -> list[Fuse]:
    """The ``Fuse`` blocks in a setup."""
    if not isinstance(setup, AdapterComposition):
        return []
    if isinstance(setup, Fuse):
        return [setup]
    return [f for c in setup.children for f in fusions(c)]


def trained_names(setup: str | AdapterComposition | None) -> list[str]:
    """The adapters a setup trains: all it names but those inside a ``Fuse`` (its fusion layer trains instead)."""
    if setup is None:
        return []
    if isinstance(setup, str):
        return [setup]
    if isinstance(setup, Fuse):
        return []
    return list(dict.fromkeys(n for c in setup.children for n in trained_names(c)))


def parse_setup(setup: Any, known: Sequence[str], known_fusions: Sequence[str] = ()) -> str | AdapterComposition:
    """Check a setup (a name or a block) against the bottleneck adapters ``known`` and the fusions added
    (``known_fusions``, by ``Fuse.name``).

    Raises:
        ValueError: an unknown adapter name, a ``Fuse`` not added, a block nested where it is not supported
            (``Parallel`` anywhere but outermost, a block inside ``Fuse``), or a value that is neither a name nor a
            block.
    """
    if isinstance(setup, str):
        if setup not in known:
            raise ValueError(f"Adapter {setup} does not exist (have {sorted(known)})")
        return setup
    if not isinstance(setup, AdapterComposition):
        raise ValueError(f"adapter setup must be an adapter name or a composition block, got {type(setup).__name__}")
    _check_block(setup, known, known_fusions)
    return setup


def _check_block(block: AdapterComposition, known: Sequence[str], known_fusions: Sequence[str]) -> None:
    if isinstance(block, Fuse) and all(isinstance(c, str) for c in block.children):
        unknown = [c for c in block.children if c not in known]
        if not unknown and block.name not in known_fusions:
            raise ValueError(
                f"Fuse: no fusion {block.name!r} was added: call add_adapter_fusion(Fuse({block.name!r}...)) or "
                f"load_adapter_fusion first (have {sorted(known_fusions)})"
            )
    for child in block.children:
        if isinstance(child, str):
            if child not in known:
                raise ValueError(f"{type(block).__name__}: adapter {child} does not exist (have {sorted(known)})")
            continue
        if not isinstance(child, _NESTING[type(block)]):
            allowed = ", ".join(t.__name__ for t in _NESTING[type(block)]) or "none"
            raise ValueError(
                f"{type(block).__name__}: cannot nest {type(child).__name__} inside it (supported blocks inside: "
                f"{allowed}; Parallel only outermost)"
            )
        _check_block(child, known, known_fusions)
