"""DoRA linear: fastpeft's DoRA against fastpeft's own LoRA on the same base, HF PEFT's DoRA and the eager twin.

Ops: ``dora`` (an NF4 base with double quantization: QDoRA) and ``dora_dense`` (a 16-bit base);
``Y = f ⊙ (X·Wᵀ + s·(X·Aᵀ)·Bᵀ)``, ``f = m / ‖W + s·B·A‖`` (the norm detached), r = 16, s = 2, modes ``fwd``
and ``fwd+bwd`` (gradients for X, A, B and the magnitude m; the base is frozen). A and B are in the run's
dtype, as the LoRA op's; m is float32, as HF PEFT keeps it. Training semantics: every call recomputes the
row norm (A and B change every step), ``‖W‖²`` cached as the layer caches it. Providers:

* ``fastpeft``: ``fastpeft.ops.dora.dora_norm_factors`` then ``dora_linear`` with its factors, as a training step
  of the layer runs them (NF4 forward at M <= 64: the decode kernel forming f in its epilogue; larger M: ``f ⊙ W``
  dequantized into the scratch, then LoRA's GEMM).
* ``fastpeft-eval`` (fwd, M <= 64): ``dora_linear`` with the norm computed once and kept, as the layer keeps it
  in eval mode; no dense weight is cached.
* ``fastpeft-lora``: ``fastpeft.ops.lora.lora_linear`` on the same base and factors, the anchor of the DoRA
  goals (DoRA's cost is ``fastpeft / fastpeft-lora - 1``).
* ``reference``: the eager twin (``kernels/reference.py``'s row norm from ``A·Wᵀ``,
  ``kernels/reference_dora.py``'s forward; an NF4 base dequantized every call).
* ``bnb`` (dora): bitsandbytes ``Linear4bit`` (nf4, double quant) wrapped by HF PEFT's DoRA
  (``LoraConfig(use_dora=True)``); ``peft`` (dora_dense): HF PEFT's DoRA on an ``nn.Linear``. PEFT forms
  ``W + s·B·A`` for the norm on every call, in eval too.

Counted work: LoRA's (``bench_lora_linear``) plus, where the call computes the row norm, ``A·Wᵀ``:
``2·R·N·K`` flops and one more read of the base as stored. Forward calls at M <= 64 run in a CUDA graph
with the operands rotated past L2 (``core.copies_past_l2``).

Predicted column (``dora``, bf16): ``kernels/_perf_dora.py`` for fastpeft's DoRA (``dora_decode_op`` at M <= 64,
``dora_step`` above) and ``kernels/_perf_launches.py`` for the LoRA anchor (``decode_op``,
``qlora_step(path="cublas")``), the pair the model itself compares (``_perf_dora.dora_rows``). No figure for
fwd+bwd at M <= 64 (the split-K backward, which neither model describes), for PEFT, bitsandbytes or the twin, nor
for ``dora_dense``: there the model's cuBLAS GEMM, at its tensor-core peak (~950 TFLOP/s at its clock), is most of
the call, above the suite's 790 TFLOP/s reference, so the fraction would read above 1 (``_perf_dora.format_dora``
has the dense pair's ratio). The predictor bounds these figures by the suite's roofline, as it bounds the gate's.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .bench_lora_linear import _Layer, _peft_module, _weight_bytes, timed_calls
from .bench_lora_linear import _path as _lora_path
from .core import Case, OperandCache, Prepared, copies_past_l2
from .predict import Component
from .spec import Shape, Spec

__all__ = ["OPS", "PROVIDERS_OF", "cases", "components", "release"]

OPS = ("dora", "dora_dense")
SCALING = 2.0
DECODE_M_MAX = 64  # kernels/lora_linear_decode.py
SMALL_M_MAX = 16  # kernels/lora_linear_kernels.py
PROVIDERS_OF = {
    "dora": ("fastpeft", "fastpeft-eval", "fastpeft-lora", "reference", "bnb"),
    "dora_dense": ("fastpeft", "fastpeft-eval", "fastpeft-lora", "reference", "peft"),
}
_FAMILY = {"peft": "peft", "bnb": "bitsandbytes+peft"}
_NO_NORM = ("fastpeft-eval", "fastpeft-lora")
_CACHE = OperandCache(size=2)


@dataclass
class _DoraLayer(_Layer):
    magnitude: torch.Tensor  # m [N] float32
    weight_sq: torch.Tensor  # ‖W_n‖² [N] float32, cached


def _runs(provider: str, mode: str, m: int) -> bool:
    return provider != "fastpeft-eval" or (mode == "fwd" and m <= DECODE_M_MAX)


def _work(op: str, provider: str, mode: str, m: int, n: int, k: int, r: int, es: int) -> tuple[float, float]:
    """(flops, bytes) of one call."""
    w, act = _weight_bytes(n, k, op == "dora", es), es * m * (k + n)
    base, lora = 2.0 * m * n * k, 2.0 * m * r * (k + n)
    norm = (0.0, 0.0) if provider in _NO_NORM else (2.0 * r * n * k, w + es * r * (k + n))
    if mode == "fwd":
        return base + lora + norm[0], w + act + norm[1]
    return 2 * base + 3 * lora + norm[0], 2 * w + 2 * act + norm[1]


def _path(op: str, provider: str, mode: str, m: int, es: int) -> str:
    """fastpeft's dispatch for this call (kernels/dora_linear.py), forward | backward."""
    if provider == "fastpeft-lora":
        return _lora_path("qlora_linear" if op == "dora" else "lora_linear", mode, m, es)
    norm = "" if provider == "fastpeft-eval" else "norm + "
    if op == "dora":
        fwd = "decode" if m <= DECODE_M_MAX and es == 2 else "scaled dequant+GEMM"
        bwd = "colsum+small" if m <= SMALL_M_MAX and es == 2 else "colsum+scaled dequant+GEMM"
    else:
        fwd, bwd = "GEMM+epilogue", "colsum+GEMM"
    return norm + (fwd if mode == "fwd" else f"{fwd} | {bwd}")


def _latency(case: Case, n: int, k: int, r: int) -> Callable[[int], tuple[float, str]] | None:
    """The launch model of fastpeft's call on ``sm_<arch>``: ``(seconds, basis)``; None where it has none."""
    m, fwd = case.m, case.mode == "fwd"
    lora = case.provider == "fastpeft-lora"
    if case.op != "dora" or m <= DECODE_M_MAX and not fwd:
        return None
    if m <= DECODE_M_MAX:

        def decode(arch: int) -> tuple[float, str]:
            from fastpeft.kernels import _perf_dora, _perf_launches

            kept = case.provider == "fastpeft-eval"
            op = (_perf_launches.decode_op(n, k, m, r, arch=arch) if lora else
                  _perf_dora.dora_decode_op(n, k, m, r, arch=arch, norm_kept=kept))  # fmt: skip
            return op.graph_seconds, f"latency model: {op.name}, {len(op.launches)} launch(es) (CUDA graph)"

        return decode

    def step(arch: int) -> tuple[float, str]:
        from fastpeft.kernels import _perf_dora, _perf_launches

        key = "fwd" if fwd else "fwd_bwd"
        if lora:
            return _perf_launches.qlora_step(n, k, m, r, arch, path="cublas")[key], "latency model: qlora_step cublas"
        return _perf_dora.dora_step(n, k, m, r, arch, path="nf4")[key], "latency model: dora_step nf4"

    return step


def components(case: Case, spec: Spec) -> list[Component] | None:
    """fastpeft's call as one launch-model component (None for providers and sizes without a model)."""
    if not case.provider.startswith("fastpeft") or case.dtype != "bfloat16":
        return None
    shape = case.extra["shape"]
    model = _latency(case, shape.n, shape.k, spec.rank)
    if model is None:
        return None
    return [Component(f"{case.provider} {case.op} {case.mode}", case.flops, case.nbytes, model=model)]


def _layers(op: str, shape: Shape, spec: Spec, copies: int) -> list[_DoraLayer]:
    def build() -> list[_DoraLayer]:
        from fastpeft import quantize_nf4
        from fastpeft.ops.dora import dora_row_norm, dora_weight_sq

        out = []
        for _ in range(copies):
            w = (torch.randn(shape.n, shape.k, device=spec.device) * 0.02).to(spec.dtype)
            nf4 = quantize_nf4(w, double_quant=True).kernel_args() if op == "dora" else None
            a = (torch.randn(spec.rank, shape.k, device=spec.device) * 0.02).to(spec.dtype).requires_grad_()
            b = (torch.randn(shape.n, spec.rank, device=spec.device) * 0.02).to(spec.dtype).requires_grad_()
            base = None if nf4 is not None else w
            sq = dora_weight_sq(base, nf4)
            # the layer's initial magnitude (the row norms), perturbed as training would
            m = dora_row_norm(base, nf4, a, b, SCALING, sq) * (1 + 0.1 * torch.rand(shape.n, device=spec.device))
            out.append(_DoraLayer(w, nf4, a, b, m.requires_grad_(), sq))
        return out

    return _CACHE.get((op, shape.name, spec.dtype_name, spec.device, copies), build)


def _reference(x: torch.Tensor, L: _DoraLayer) -> torch.Tensor:
    """The eager twin: the base as a tensor (NF4 dequantized), the row norm from ``A·Wᵀ``, the forward."""
    from fastpeft.kernels.reference import dora_row_norm_reference, nf4_dequantize_reference
    from fastpeft.kernels.reference_dora import dora_linear_fwd_reference

    w, q = L.weight, L.nf4
    if q is not None:
        numel = q.shape[0] * q.shape[1]
        w = nf4_dequantize_reference(q.packed, q.absmax, numel, x.dtype, blocksize=q.blocksize,
                                     nested_absmax=q.nested_absmax, offset=q.offset,
                                     nested_blocksize=q.nested_blocksize).view(q.shape)  # fmt: skip
    with torch.no_grad():
        a, b = L.lora_a.detach(), L.lora_b.detach()
        norm = dora_row_norm_reference(L.weight_sq, (a.float() @ w.float().t()), a.float(), b.float(), SCALING)
    return dora_linear_fwd_reference(x, w, None, L.lora_a, L.lora_b, SCALING, L.magnitude, norm)[0]


def _provider_fn(p: str, L: _DoraLayer, rank: int) -> tuple[Callable[[torch.Tensor], torch.Tensor], list]:
    """``f(x) -> y`` of provider ``p`` on layer ``L`` and the tensors whose gradients it makes."""
    from fastpeft.ops.dora import dora_linear, dora_norm_factors, dora_row_norm
    from fastpeft.ops.lora import lora_linear

    a, b, m, q = L.lora_a, L.lora_b, L.magnitude, L.nf4
    w = L.weight if q is None else None
    if p == "fastpeft":

        def f(x: torch.Tensor) -> torch.Tensor:
            norm, factors, fb = dora_norm_factors(w, q, a, b, SCALING, m, x.dtype, L.weight_sq, lora_a_cast=a)
            return dora_linear(x, w, None, a, b, SCALING, m, norm, nf4=q, factors=factors, scaled_b=fb)

        return f, [a, b, m]
    if p == "fastpeft-eval":
        kept = dora_row_norm(w, q, a, b, SCALING, L.weight_sq)
        return (lambda x: dora_linear(x, w, None, a, b, SCALING, m, kept, nf4=q)), [a, b, m]
    if p == "fastpeft-lora":
        return (lambda x: lora_linear(x, w, None, a, b, SCALING, nf4=q)), [a, b]
    if p == "reference":
        return (lambda x: _reference(x, L)), [a, b, m]
    if p in ("peft", "bnb"):
        model, params = _peft_module(L, p == "bnb", rank, magnitude=m)
        return model, params
    raise ValueError(f"dora: unknown provider {p!r}")


def _prepare(case: Case, shape: Shape, spec: Spec) -> Prepared:
    es = torch.finfo(spec.dtype).bits // 8
    graph = spec.is_gpu and case.mode == "fwd" and case.m <= DECODE_M_MAX
    set_bytes = _weight_bytes(shape.n, shape.k, case.op == "dora", es) + es * case.m * shape.k
    copies = copies_past_l2(set_bytes, spec.device) if graph else 1
    layers = _layers(case.op, shape, spec, copies)
    return timed_calls(case, shape, spec, [_provider_fn(case.provider, L, spec.rank) for L in layers], graph, copies)


def _costs(case: Case) -> None:
    """The window plan's priors (seconds on a GPU) and one-time costs shared through ``warm_key``."""
    case.cost_s = 2.0 if case.mode == "fwd+bwd" else 1.5
    if case.provider.startswith("fastpeft"):
        case.warm_key, case.warm_cost_s = f"fastpeft:{case.op}:{case.path}:{case.dtype}", 20.0
        if "GEMM" in case.path:
            case.cost_s += 3.0  # a new (M, N, K) autotunes the GEMM's configs
    elif case.provider in ("bnb", "peft"):
        case.warm_key, case.warm_cost_s = f"import:{case.provider}", 5.0


def cases(spec: Spec) -> list[Case]:
    """Every (op, provider, mode, shape, M) of ``spec`` for the DoRA linear."""
    out = []
    es = torch.finfo(spec.dtype).bits // 8
    for op in (o for o in OPS if o in spec.ops):
        for shape, m, mode, provider in itertools.product(spec.shapes, spec.ms, spec.modes, PROVIDERS_OF[op]):
            if not spec.wants(provider) or not _runs(provider, mode, m):
                continue
            flops, nbytes = _work(op, provider, mode, m, shape.n, shape.k, spec.rank, es)
            fast = provider.startswith("fastpeft")
            case = Case(op, provider, mode, shape.name, m, spec.dtype_name, flops, nbytes,
                        family=_FAMILY.get(provider, "fastpeft" if fast else "torch"),
                        path=_path(op, provider, mode, m, es) if fast else "")  # fmt: skip
            case.prepare = lambda case=case, shape=shape: _prepare(case, shape, spec)
            case.extra["shape"] = shape
            _costs(case)
            out.append(case)
    return out


def release() -> None:
    """Drop the cached operands (the run is over)."""
    _CACHE.clear()
