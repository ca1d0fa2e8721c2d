"""LoRA and QLoRA linear: fastpeft's fused op against cuBLAS, eager torch, torch.compile, PEFT and bitsandbytes.

Ops: ``lora_linear`` (a dense 16-bit base) and ``qlora_linear`` (an NF4 base with double quantization);
``Y = X·Wᵀ + s·(X·Aᵀ)·Bᵀ``, r = 16, s = 2, modes ``fwd`` and ``fwd+bwd`` (gradients for X and the LoRA
factors; the base is frozen). Providers:

* ``fastpeft``: ``fastpeft.ops.lora.lora_linear``. Its NF4 dispatch (``path``): forward with M <= 64 and
  16-bit inputs runs the decode kernel (``decode``); larger M dequantizes W once (``dequant``) and runs the
  dense tiled GEMM (``tiled``); dX at M <= 16 runs the split-K GEMM decoding NF4 in its loop (``small``).
* ``fastpeft-nolora`` (qlora, fwd): ``fastpeft.ops.lora.nf4_linear``, the same dispatch without the LoRA
  term: the LoRA overhead is ``fastpeft / fastpeft-nolora - 1``.
* ``dense-bf16``: the unquantized layer through cuBLAS (``F.linear``) plus the LoRA term in torch ops;
  ``dense-bf16-nolora`` (fwd): ``F.linear`` alone, the anchor of the small-M goals.
* ``reference``: ``kernels/reference.py``'s twin (eager torch; for an NF4 base it dequantizes every call);
  ``compiled``: ``torch.compile`` of that twin.
* ``peft`` (lora): HF PEFT's LoRA layer on an ``nn.Linear``; ``bnb`` (qlora): bitsandbytes ``Linear4bit``
  (nf4, double quant) wrapped by HF PEFT's LoRA, the QLoRA stack transformers users run.

Counted work: forward ``2·M·N·K + 2·M·R·(K + N)`` flops, fwd+bwd the base product twice (forward, dX) and
the LoRA products three times; bytes: the base weight as stored (NF4: ``N·K/2`` + statistics) plus X and Y
(fwd+bwd: twice the weight, plus dY and dX). Forward calls at M <= 64 are microsecond kernels: timed in a
CUDA graph with the operands rotated past L2 (``core.copies_past_l2``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .core import Case, OperandCache, Prepared, copies_past_l2
from .predict import Component, gemm, pointwise
from .spec import Shape, Spec

__all__ = ["OPS", "PROVIDERS_OF", "cases", "components", "release"]

OPS = ("lora_linear", "qlora_linear")
SCALING = 2.0
DECODE_M_MAX = 64  # kernels/lora_linear_decode.py
SMALL_M_MAX = 16  # kernels/lora_linear_kernels.py
PROVIDERS_OF = {
    "lora_linear": ("fastpeft", "dense-bf16", "reference", "compiled", "peft"),
    "qlora_linear": (
        "fastpeft", "fastpeft-nolora", "dense-bf16", "dense-bf16-nolora", "reference", "compiled", "bnb",
    ),
}  # fmt: skip
_FAMILY = {"compiled": "compile", "peft": "peft", "bnb": "bitsandbytes+peft"}
_FWD_ONLY = ("fastpeft-nolora", "dense-bf16-nolora")
_CACHE = OperandCache(size=2)


@dataclass
class _Layer:
    weight: torch.Tensor
    nf4: object | None  # fastpeft.kernels.formats.NF4Args
    lora_a: torch.Tensor
    lora_b: torch.Tensor


def _weight_bytes(n: int, k: int, nf4: bool, es: int) -> int:
    return n * k // 2 + n * k // 64 + 4 * (n * k // 64 // 256) if nf4 else es * n * k


def _work(op: str, provider: str, mode: str, m: int, n: int, k: int, r: int, es: int) -> tuple[float, float]:
    """(flops, bytes) of one call."""
    nf4 = op == "qlora_linear" and not provider.startswith("dense")
    base = 2.0 * m * n * k
    lora = 0.0 if provider.endswith("-nolora") else 2.0 * m * r * (k + n)
    w, act = _weight_bytes(n, k, nf4, es), es * m * (k + n)
    if mode == "fwd":
        return base + lora, w + act
    return 2 * base + 3 * lora, 2 * w + 2 * act


def _path(op: str, mode: str, m: int, es: int) -> str:
    """fastpeft's dispatch for this call (kernels/lora_linear.py), forward | backward."""
    if op == "qlora_linear":
        fwd = "decode" if m <= DECODE_M_MAX and es == 2 else "dequant+tiled"
        bwd = "small" if m <= SMALL_M_MAX and es == 2 else "dequant+tiled"
    else:
        fwd = bwd = "small" if m <= SMALL_M_MAX else "tiled"
    return fwd if mode == "fwd" else f"{fwd} | {bwd}"


def components(case: Case, spec: Spec) -> list[Component] | None:
    """The kernels one call runs, for the predictor (None for providers without a model)."""
    shape, r = case.extra["shape"], spec.rank
    m, n, k, es = case.m, shape.n, shape.k, 4 if case.dtype == "float32" else 2
    dt = {"bfloat16": "bf16", "float16": "fp16"}.get(case.dtype, "fp32")
    nf4 = case.op == "qlora_linear"
    lora = not case.provider.endswith("-nolora")
    if case.provider.startswith("fastpeft"):
        decode_fwd = nf4 and m <= DECODE_M_MAX and es == 2  # the decode call's model includes its U product
        out: list[Component] = [gemm("skinny U = X·Aᵀ", m, r, k, es)] if lora and not decode_fwd else []
        epilogue = (2.0 * m * n * r, es * (m * r + n * r)) if lora else (0.0, 0.0)
        w_nf4 = _weight_bytes(n, k, True, es)  # gate components fall back to the roofline of these bytes

        def base(mm: int, nn_: int, kk: int, small: bool, name: str) -> list[Component]:
            if nf4 and small:
                return [
                    Component(
                        name,
                        2.0 * m * n * k,
                        w_nf4 + es * m * (n + k),
                        gate_path="decode" if name == "decode" else "small",
                        weights=n * k,
                        m=mm,
                        dtype=dt,
                        **({"n": n, "k": k, "r": r if lora else 0} if name == "decode" else {}),
                    )  # fmt: skip
                ]
            dq = Component("dequant", 0.0, w_nf4 + es * n * k, gate_path="dequant", weights=n * k, dtype=dt, n=n, k=k)
            pre = [dq] if nf4 else []
            g = gemm(f"{name} GEMM + LoRA epilogue" if lora else f"{name} GEMM", mm, nn_, kk, es)
            return [*pre, Component(g.name, g.flops + epilogue[0], g.nbytes + epilogue[1])]

        fwd_small = m <= (DECODE_M_MAX if nf4 else SMALL_M_MAX) and es == 2
        out += base(m, n, k, fwd_small, "decode" if nf4 and fwd_small else "forward")
        if case.mode == "fwd+bwd":
            bwd_small = m <= SMALL_M_MAX and es == 2
            out.append(gemm("skinny G = dY·B", m, r, n, es))
            out += base(m, k, n, bwd_small, "split-K dX" if bwd_small else "dX")
            out.append(Component("LoRA weight gradients", 2.0 * m * r * (k + n), es * m * (k + n)))
        return out
    if case.provider.startswith("dense-bf16"):
        out = [gemm("cuBLAS X·Wᵀ", m, n, k, es)]
        if lora:
            out += [gemm("eager U", m, r, k, es), gemm("eager U·Bᵀ", m, n, r, es), pointwise("eager s·V", m * n, 2, es),
                    pointwise("eager Y + sV", m * n, 3, es)]  # fmt: skip
        if case.mode == "fwd+bwd":
            out += [pointwise("eager s·dY", m * n, 2, es), gemm("eager dU", m, r, n, es),
                    gemm("eager dB", n, r, m, es), gemm("cuBLAS dY·W", m, k, n, es), gemm("eager dU·A", m, k, r, es),
                    pointwise("eager dX sum", m * k, 3, es), gemm("eager dA", r, k, m, es)]  # fmt: skip
        return out
    return None


def _layers(op: str, shape: Shape, spec: Spec, copies: int) -> list[_Layer]:
    def build() -> list[_Layer]:
        from fastpeft import quantize_nf4

        out = []
        for _ in range(copies):
            w = (torch.randn(shape.n, shape.k, device=spec.device) * 0.02).to(spec.dtype)
            nf4 = quantize_nf4(w, double_quant=True).kernel_args() if op == "qlora_linear" else None
            a = (torch.randn(spec.rank, shape.k, device=spec.device) * 0.02).to(spec.dtype).requires_grad_()
            b = (torch.randn(shape.n, spec.rank, device=spec.device) * 0.02).to(spec.dtype).requires_grad_()
            out.append(_Layer(w, nf4, a, b))
        return out

    return _CACHE.get((op, shape.name, spec.dtype_name, spec.device, copies), build)


def _peft_module(
    layer: _Layer, four_bit: bool, r: int, magnitude: torch.Tensor | None = None
) -> tuple[nn.Module, list[torch.Tensor]]:
    """HF PEFT's LoRA (adapter in PEFT's default float32) on an nn.Linear or a bitsandbytes Linear4bit; with
    ``magnitude`` HF PEFT's DoRA (``use_dora=True``) holding it."""
    import peft

    n, k = layer.weight.shape
    device, dtype = layer.weight.device, layer.weight.dtype
    if four_bit:
        import bitsandbytes as bnb

        proj = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
        proj.weight = bnb.nn.Params4bit(layer.weight.detach().cpu(), requires_grad=False, quant_type="nf4",
                                        compress_statistics=True)  # fmt: skip
        proj = proj.to(device)  # bitsandbytes quantizes on the device move
    else:
        proj = nn.Linear(k, n, bias=False, device=device, dtype=dtype)
        proj.weight = nn.Parameter(layer.weight.detach(), requires_grad=False)

    class One(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = proj
            self.is_loaded_in_4bit = four_bit  # what transformers sets; PEFT dispatches Linear4bit on it

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    dora = magnitude is not None
    config = peft.LoraConfig(r=r, lora_alpha=SCALING * r, target_modules=["proj"], lora_dropout=0.0, use_dora=dora)
    model = peft.get_peft_model(One(), config)
    lora = model.base_model.model.proj
    with torch.no_grad():
        lora.lora_A["default"].weight.copy_(layer.lora_a)
        lora.lora_B["default"].weight.copy_(layer.lora_b)
        if dora:
            lora.lora_magnitude_vector["default"].weight.copy_(magnitude)
    return model, [p for p in model.parameters() if p.requires_grad]


def _reference_fn(op: str, shape: Shape) -> Callable[..., torch.Tensor]:
    """The reference twin over explicit tensors (so one torch.compile serves every rotated copy)."""
    from fastpeft.kernels.formats import NF4Args
    from fastpeft.kernels.reference import lora_linear_fwd_reference

    if op == "lora_linear":
        return lambda x, w, a, b: lora_linear_fwd_reference(x, w, None, a, b, SCALING)[0]

    def qlora(x, packed, absmax, nested, offset, a, b):
        nf4 = NF4Args(packed, absmax, (shape.n, shape.k), nested_absmax=nested, offset=offset)
        return lora_linear_fwd_reference(x, None, None, a, b, SCALING, nf4=nf4)[0]

    return qlora


def _provider(case: Case, shape: Shape, spec: Spec, layers: list[_Layer]) -> list[tuple[Callable, list]]:
    """Per rotated copy: ``f(x) -> y`` and the tensors whose gradients it makes."""
    from fastpeft.ops.lora import lora_linear, nf4_linear

    p, op = case.provider, case.op
    out = []
    ref = None
    if p in ("reference", "compiled"):
        ref = _reference_fn(op, shape)
        if p == "compiled":
            torch._dynamo.reset()  # a fresh cache: this case's shapes compile, never an eager fallback
            ref = torch.compile(ref, dynamic=False)
    for L in layers:
        a, b, w, q = L.lora_a, L.lora_b, L.weight, L.nf4
        params = [a, b]
        if p == "fastpeft":
            f = (lambda x, a=a, b=b, q=q: lora_linear(x, None, None, a, b, SCALING, nf4=q)) if q is not None else (
                lambda x, a=a, b=b, w=w: lora_linear(x, w, None, a, b, SCALING))  # fmt: skip
        elif p == "fastpeft-nolora":
            f, params = (lambda x, q=q: nf4_linear(x, None, q)), []
        elif p == "dense-bf16":
            f = lambda x, a=a, b=b, w=w: F.linear(x, w) + SCALING * F.linear(F.linear(x, a), b)  # noqa: E731
        elif p == "dense-bf16-nolora":
            f, params = (lambda x, w=w: F.linear(x, w)), []
        elif ref is not None and q is None:
            f = lambda x, a=a, b=b, w=w, ref=ref: ref(x, w, a, b)  # noqa: E731
        elif ref is not None:
            f = lambda x, a=a, b=b, q=q, ref=ref: ref(x, q.packed, q.absmax, q.nested_absmax, q.offset, a, b)  # noqa: E731
        elif p in ("peft", "bnb"):
            f, params = _peft_module(L, p == "bnb", spec.rank)
        else:
            raise ValueError(f"{op}: unknown provider {p!r}")
        out.append((f, params))
    return out


def _prepare(case: Case, shape: Shape, spec: Spec) -> Prepared:
    es = torch.finfo(spec.dtype).bits // 8
    graph = spec.is_gpu and case.mode == "fwd" and case.m <= DECODE_M_MAX
    set_bytes = _weight_bytes(shape.n, shape.k, case.op == "qlora_linear", es) + es * case.m * shape.k
    copies = copies_past_l2(set_bytes, spec.device) if graph else 1
    layers = _layers(case.op, shape, spec, copies)
    return timed_calls(case, shape, spec, _provider(case, shape, spec, layers), graph, copies)


def timed_calls(case: Case, shape: Shape, spec: Spec, fns: list[tuple[Callable, list]], graph: bool,
                copies: int) -> Prepared:  # fmt: skip
    """The timed closure over ``fns`` (``(f(x) -> y, trained tensors)`` per operand copy, rotated call to call):
    a forward under no_grad (in a CUDA graph where ``graph``), or forward + backward with a fixed dY."""
    xs = [torch.randn(case.m, shape.k, device=spec.device, dtype=spec.dtype) for _ in fns]
    note = f"{copies} operand copies rotated past L2" if copies > 1 else ""
    if case.mode == "fwd":
        it = itertools.cycle(list(zip(fns, xs, strict=True)))

        def fwd() -> None:
            (f, _), x = next(it)
            with torch.no_grad():
                f(x)

        return Prepared(fwd, cuda_graph=graph, note=note)
    xgs = [x.requires_grad_() for x in xs]
    dy = torch.randn(case.m, shape.n, device=spec.device, dtype=spec.dtype)
    it = itertools.cycle(list(zip(fns, xgs, strict=True)))

    def fwd_bwd() -> None:
        (f, _), x = next(it)
        f(x).backward(dy)

    grads = xgs + [t for _, params in fns for t in params]
    return Prepared(fwd_bwd, grad_to_none=grads, note=note)


def _costs(case: Case, shape: Shape, spec: Spec) -> None:
    """The window plan's priors (seconds on a GPU) and one-time costs shared through ``warm_key``."""
    big = shape.n * shape.k * max(case.m, 1) > 2e11
    case.cost_s = 2.0 if big or case.mode == "fwd+bwd" else 1.5
    if case.provider == "compiled":
        case.warm_key, case.warm_cost_s = f"compile:{case.key}", 25.0 if spec.is_gpu else 8.0
    elif case.provider.startswith("fastpeft"):
        kernel = case.path.split(" | ")[-1]
        case.warm_key, case.warm_cost_s = f"fastpeft:{case.op}:{kernel}:{case.dtype}:{case.mode}", 20.0
        if "tiled" in case.path:
            case.cost_s += 3.0  # a new (M, N, K) autotunes the GEMM's configs
    elif case.provider in ("bnb", "peft"):
        case.warm_key, case.warm_cost_s = f"import:{case.provider}", 5.0


def cases(spec: Spec) -> list[Case]:
    """Every (op, provider, mode, shape, M) of ``spec`` for the LoRA and QLoRA linear."""
    out = []
    es = torch.finfo(spec.dtype).bits // 8
    for op in (o for o in OPS if o in spec.ops):
        for shape, m, mode, provider in itertools.product(spec.shapes, spec.ms, spec.modes, PROVIDERS_OF[op]):
            if not spec.wants(provider) or (mode != "fwd" and provider in _FWD_ONLY):
                continue
            flops, nbytes = _work(op, provider, mode, m, shape.n, shape.k, spec.rank, es)
            case = Case(op, provider, mode, shape.name, m, spec.dtype_name, flops, nbytes,
                        family=_FAMILY.get(provider, "fastpeft" if provider.startswith("fastpeft") else "torch"),
                        path=_path(op, mode, m, es) if provider.startswith("fastpeft") else "")  # fmt: skip
            case.prepare = lambda case=case, shape=shape: _prepare(case, shape, spec)
            case.extra["shape"] = shape
            _costs(case, shape, spec)
            out.append(case)
    return out


def release() -> None:
    """Drop the cached operands (the run is over)."""
    _CACHE.clear()
