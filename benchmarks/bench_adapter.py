"""Bottleneck adapter: fastpeft's fused op against eager torch and torch.compile.

Op ``adapter``: ``y = h + s·up(act(down(h)))``, ``h [M, H]``, bottleneck ``b`` (256 by default), ReLU.
Providers: ``fastpeft`` (``fastpeft.nn.BottleneckAdapter``), ``reference`` (the same adapter as eager
``nn.Linear`` modules in the input dtype: what HF / AdapterHub layers run) and ``compiled``
(``torch.compile`` of it). Goal (DESIGN.md): forward+backward >= 2x eager torch and >= 70 % of HBM
bandwidth (the peak of a device-to-device copy in the same run).

Bytes counted (the unavoidable traffic of the math, not of one implementation): the forward reads h and
writes y (``2·M·H`` elements); the backward reads dY and h and writes dh (``3·M·H``); plus the weights
(and their gradients). FLOPs: ``4·M·H·b`` forward, ``8·M·H·b`` backward.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from .core import Case, OperandCache, Prepared, copies_past_l2, short_call
from .predict import Component, gemm, pointwise
from .spec import Spec

__all__ = ["OPS", "PROVIDERS", "EagerAdapter", "cases", "components", "release"]

OPS = ("adapter",)
PROVIDERS = ("fastpeft", "reference", "compiled")
_FAMILY = {"fastpeft": "fastpeft", "reference": "torch", "compiled": "compile"}
SCALING = 0.5
_CACHE = OperandCache(size=2)


class EagerAdapter(nn.Module):
    """The adapter in plain torch: ``h + s·up(relu(down(h)))``."""

    def __init__(self, hidden: int, bottleneck: int, scaling: float) -> None:
        super().__init__()
        self.down, self.up = nn.Linear(hidden, bottleneck), nn.Linear(bottleneck, hidden)
        self.scaling = scaling

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.scaling * self.up(F.relu(self.down(h)))


def _work(mode: str, m: int, hidden: int, b: int, es: int) -> tuple[float, float]:
    w = 2 * hidden * b * es
    if mode == "fwd":
        return 4.0 * m * hidden * b, 2.0 * m * hidden * es + w
    return 12.0 * m * hidden * b, 5.0 * m * hidden * es + 3 * w


def components(case: Case, spec: Spec) -> list[Component] | None:
    m, hidden, b = case.m, case.extra["hidden"], spec.bottleneck
    es = 4 if case.dtype == "float32" else 2
    if case.provider == "fastpeft":
        fl, nb = _work("fwd", m, hidden, b, es)
        out = [Component("adapter forward kernel", fl, nb)]
        if case.mode == "fwd+bwd":
            out.append(
                Component("adapter backward kernels", 8.0 * m * hidden * b, 3.0 * m * hidden * es + 4 * hidden * b * es)
            )
        return out
    if case.provider == "reference":
        mh = m * hidden
        out = [gemm("eager down", m, b, hidden, es), pointwise("eager relu", m * b, 2, es),
               gemm("eager up", m, hidden, b, es), pointwise("eager s·", mh, 2, es),
               pointwise("eager residual add", mh, 3, es)]  # fmt: skip
        if case.mode == "fwd+bwd":
            out += [pointwise("eager s·dY", m * hidden, 2, es), gemm("eager d(act)", m, b, hidden, es),
                    gemm("eager dW_up", hidden, b, m, es), pointwise("eager db_up", m * hidden, 1, es),
                    pointwise("eager relu'", m * b, 3, es), gemm("eager dh", m, hidden, b, es),
                    gemm("eager dW_down", b, hidden, m, es), pointwise("eager dh sum", m * hidden, 3, es)]  # fmt: skip
        return out
    return None


def _modules(provider: str, hidden: int, spec: Spec, copies: int) -> list[nn.Module]:
    def build() -> list[nn.Module]:
        from fastpeft.nn import BottleneckAdapter

        out = []
        for _ in range(copies):
            eager = EagerAdapter(hidden, spec.bottleneck, SCALING).to(spec.device, spec.dtype)
            nn.init.normal_(eager.up.weight, std=0.02)  # non-zero, so every gradient path does real work
            if provider == "fastpeft":
                ours = BottleneckAdapter(hidden, spec.bottleneck, "relu", scaling=SCALING).to(spec.device, spec.dtype)
                ours.load_state_dict(eager.state_dict())
                out.append(ours)
            else:
                out.append(eager)
        return out

    return _CACHE.get((provider == "fastpeft", hidden, spec.dtype_name, spec.device, copies), build)


def _prepare(case: Case, spec: Spec) -> Prepared:
    hidden = case.extra["hidden"]
    graph = spec.is_gpu and case.mode == "fwd" and short_call(case.flops, case.nbytes)
    copies = copies_past_l2(int(case.nbytes), spec.device) if graph else 1
    modules = _modules(case.provider, hidden, spec, copies)
    if case.provider == "compiled":
        torch._dynamo.reset()
        modules = [torch.compile(mod, dynamic=False) for mod in modules]
    hs = [torch.randn(case.m, hidden, device=spec.device, dtype=spec.dtype) for _ in modules]
    note = f"{copies} operand copies rotated past L2" if copies > 1 else ""
    if case.mode == "fwd":
        it = itertools.cycle(list(zip(modules, hs, strict=True)))

        def fwd() -> None:
            mod, h = next(it)
            with torch.no_grad():
                mod(h)

        return Prepared(fwd, cuda_graph=graph, note=note)
    hs = [h.requires_grad_() for h in hs]
    dy = torch.randn(case.m, hidden, device=spec.device, dtype=spec.dtype)
    it = itertools.cycle(list(zip(modules, hs, strict=True)))

    def fwd_bwd() -> None:
        mod, h = next(it)
        mod(h).backward(dy)

    grads = hs + [p for mod in modules for p in mod.parameters()]
    return Prepared(fwd_bwd, grad_to_none=grads, note=note)


def cases(spec: Spec) -> list[Case]:
    if "adapter" not in spec.ops:
        return []
    es = torch.finfo(spec.dtype).bits // 8
    hiddens = list(dict.fromkeys(s.hidden for s in spec.shapes))
    out = []
    for hidden, m, mode, provider in itertools.product(hiddens, spec.ms, spec.modes, PROVIDERS):
        if not spec.wants(provider):
            continue
        flops, nbytes = _work(mode, m, hidden, spec.bottleneck, es)
        case = Case("adapter", provider, mode, f"{hidden}x{spec.bottleneck}", m, spec.dtype_name, flops, nbytes,
                    family=_FAMILY[provider], path="fused" if provider == "fastpeft" else "")  # fmt: skip
        case.extra["hidden"] = hidden
        case.prepare = lambda case=case: _prepare(case, spec)
        case.cost_s = 1.5
        if provider == "compiled":
            case.warm_key, case.warm_cost_s = f"compile:{case.key}", 25.0 if spec.is_gpu else 8.0
        elif provider == "fastpeft":
            case.warm_key, case.warm_cost_s = f"fastpeft:adapter:{spec.dtype_name}:{mode}", 10.0
        out.append(case)
    return out


def release() -> None:
    """Drop the cached operands (the run is over)."""
    _CACHE.clear()
