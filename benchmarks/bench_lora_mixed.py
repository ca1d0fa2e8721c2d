"""Mixed-adapter batches: every row through its own LoRA adapter, fastpeft's batched op against PEFT's loop.

Op ``lora_mixed`` (forward, inference): a dense base ``W [N, K]`` in the run's dtype, ``ADAPTERS`` adapters of
rank ``spec.rank`` in the same dtype, ``M`` rows assigned round robin (serving: one request per row).
Providers: ``fastpeft`` (``fastpeft.nn.LoraLinear(x, adapter_names=...)``: the base once, then one shrink
and one expand launch for every adapter) and ``peft`` (HF PEFT's ``LoraLayer`` with the same argument:
the base once, then a sub-batch gather, two matmuls and a scatter per adapter).

Work counted: ``2·M·N·K + 2·M·r·(K + N)`` FLOPs; bytes read once: ``W``, ``x``, ``y`` and every adapter a row uses.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from .core import Case, OperandCache, Prepared, short_call
from .predict import Component, gemm, pointwise
from .spec import Spec

__all__ = ["ADAPTERS", "OPS", "PROVIDERS", "cases", "components", "release"]

OPS = ("lora_mixed",)
PROVIDERS = ("fastpeft", "peft")
ADAPTERS = 4
SCALING = 2.0
_FAMILY = {"fastpeft": "fastpeft", "peft": "peft"}
_CACHE = OperandCache(size=2)


def _names(m: int) -> list[str]:
    return [f"a{i % ADAPTERS}" for i in range(m)]


def _weights(n: int, k: int, spec: Spec) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    def build():
        g = torch.Generator().manual_seed(0)
        w = (torch.randn(n, k, generator=g) * 0.02).to(spec.device, spec.dtype)
        adapters = [((torch.randn(spec.rank, k, generator=g) * 0.02).to(spec.device, spec.dtype),
                     (torch.randn(n, spec.rank, generator=g) * 0.02).to(spec.device, spec.dtype))
                    for _ in range(ADAPTERS)]  # fmt: skip
        return w, adapters

    return _CACHE.get((n, k, spec.dtype_name, spec.device, spec.rank), build)


def _fastpeft_layer(w: torch.Tensor, adapters, r: int) -> nn.Module:
    from fastpeft.nn import LoraLinear

    base = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    base.weight = nn.Parameter(w, requires_grad=False)
    layer = LoraLinear(base, r=r, lora_alpha=SCALING * r, adapter_name="a0")
    for i in range(1, ADAPTERS):
        layer.update_layer(f"a{i}", r=r, lora_alpha=SCALING * r)
    _load(layer, adapters)
    return layer.eval()


def _peft_layer(w: torch.Tensor, adapters, r: int) -> nn.Module:
    import peft

    class One(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
            self.proj.weight = nn.Parameter(w, requires_grad=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    config = peft.LoraConfig(r=r, lora_alpha=SCALING * r, target_modules=["proj"], lora_dropout=0.0)
    model = peft.get_peft_model(One(), config, adapter_name="a0", autocast_adapter_dtype=False)
    for i in range(1, ADAPTERS):
        model.add_adapter(f"a{i}", config)
    layer = model.base_model.model.proj
    _load(layer, adapters)
    return layer.eval()


def _load(layer: nn.Module, adapters) -> None:
    with torch.no_grad():
        for i, (a, b) in enumerate(adapters):
            layer.lora_A[f"a{i}"].weight.copy_(a)
            layer.lora_B[f"a{i}"].weight.copy_(b)


def components(case: Case, spec: Spec) -> list[Component]:
    """The kernels of one call at the roofline: the base GEMM, then fastpeft's shrink (x re-read, float32
    partials written) and expand (y read and written), or PEFT's per-adapter gather, two matmuls, scale and
    scatter-add."""
    m, n, k, r = case.m, case.extra["n"], case.extra["k"], spec.rank
    es = torch.finfo(spec.dtype).bits // 8
    base = gemm("cuBLAS x·Wᵀ", m, n, k, es)
    if case.provider == "fastpeft":
        used = min(m, ADAPTERS)
        shrink = Component("batched shrink", 2.0 * m * r * k, es * (m * k + used * r * k) + 4.0 * m * r)
        expand = Component("batched expand", 2.0 * m * r * n, es * (2 * m * n + used * r * n) + 4.0 * m * r)
        return [base, shrink, expand]
    out = [base]
    for i in range(ADAPTERS):
        rows = len(range(i, m, ADAPTERS))
        if rows:
            out += [pointwise(f"gather x ({i})", rows * k, 2, es), gemm(f"x·Aᵀ ({i})", rows, r, k, es),
                    gemm(f"u·Bᵀ ({i})", rows, n, r, es), pointwise(f"s· ({i})", rows * n, 2, es),
                    pointwise(f"y[rows] += ({i})", rows * n, 3, es)]  # fmt: skip
    return out


def _prepare(case: Case, spec: Spec) -> Prepared:
    n, k = case.extra["n"], case.extra["k"]
    w, adapters = _weights(n, k, spec)
    build = _fastpeft_layer if case.provider == "fastpeft" else _peft_layer
    layer = build(w, adapters, spec.rank)
    x = torch.randn(case.m, k, device=spec.device, dtype=spec.dtype)
    names = _names(case.m)

    def fwd() -> None:
        with torch.no_grad():
            layer(x, adapter_names=names)

    # the host builds each call's row plan from the names: no CUDA graph, the timing includes it
    return Prepared(fwd, note=f"{ADAPTERS} adapters, rows round robin")


def cases(spec: Spec) -> list[Case]:
    if "lora_mixed" not in spec.ops or "fwd" not in spec.modes:
        return []
    es = torch.finfo(spec.dtype).bits // 8
    out = []
    for shape, m, provider in itertools.product(spec.shapes, spec.ms, PROVIDERS):
        if not spec.wants(provider):
            continue
        n, k, r = shape.n, shape.k, spec.rank
        flops = 2.0 * m * n * k + 2.0 * m * r * (k + n)
        nbytes = float(es * (n * k + m * (k + n) + min(m, ADAPTERS) * r * (k + n)))
        case = Case("lora_mixed", provider, "fwd", shape.name, m, spec.dtype_name, flops, nbytes,
                    family=_FAMILY[provider], path="batched" if provider == "fastpeft" else "loop")  # fmt: skip
        case.extra.update(n=n, k=k)
        case.prepare = lambda case=case: _prepare(case, spec)
        case.cost_s = 1.0 if short_call(flops, nbytes) else 1.5
        case.value = 5.0
        out.append(case)
    return out


def release() -> None:
    """Drop the cached operands (the run is over)."""
    _CACHE.clear()
