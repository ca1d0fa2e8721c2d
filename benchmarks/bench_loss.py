"""Causal-LM loss through the output head: fastpeft's chunked linear + cross-entropy against eager and compiled torch.

Op ``lm_loss`` (forward + backward, the head frozen as in LoRA / QLoRA training): hidden states ``h [M, H]``,
a head ``W [V, H]`` in the run's dtype, labels ``[M]``; the loss is the mean cross-entropy of ``h·Wᵀ`` and
the backward gives ``∂h``. Providers: ``fastpeft`` (``fastpeft.ops.linear_cross_entropy``: chunks of
tokens, one GEMM and one cross-entropy kernel each, no float32 ``[M, V]`` block), ``reference`` (eager
``F.cross_entropy(F.linear(h, W).float(), y)``, what transformers' models run) and ``compiled``
(``torch.compile`` of it). The peak-memory column is the point as much as the time.

Heads: the model's vocabulary and hidden size (Llama 3: 128,256 words; 4,096 wide for 8B, 8,192 for 70B;
on a CPU-only machine a small head). Work counted: ``4·M·V·H`` FLOPs (logits and ∂h); bytes: the head read
twice, ``h`` read and ``∂h`` written (16-bit), the logits written and read once in 16 bits.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from .core import Case, OperandCache, Prepared
from .predict import Component, gemm, pointwise
from .spec import Spec

__all__ = ["HEADS", "OPS", "PROVIDERS", "cases", "components", "release"]

OPS = ("lm_loss",)
PROVIDERS = ("fastpeft", "reference", "compiled")
_FAMILY = {"fastpeft": "fastpeft", "reference": "torch", "compiled": "compile"}
HEADS = {"llama3-8b": (128_256, 4096), "llama3-70b": (128_256, 8192), "cpu-small": (2048, 256)}
"""Model -> (vocabulary, hidden size) of its output head."""
_CACHE = OperandCache(size=2)


def _eager(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(h, w).float(), labels)


def _operands(m: int, vocab: int, hidden: int, spec: Spec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    def build():
        g = torch.Generator().manual_seed(0)
        w = (torch.randn(vocab, hidden, generator=g) * hidden**-0.5).to(spec.device, spec.dtype)
        h = torch.randn(m, hidden, generator=g).to(spec.device, spec.dtype)
        labels = torch.randint(0, vocab, (m,), generator=g).to(spec.device)
        return w, h, labels

    return _CACHE.get((m, vocab, hidden, spec.dtype_name, spec.device), build)


def components(case: Case, spec: Spec) -> list[Component] | None:
    """The kernels of one step at the roofline: the logits and ∂h GEMMs, then fastpeft's cross-entropy kernel
    (16-bit logits read twice, gradient written once) or eager torch's float copy, log-softmax, NLL and their
    backward over float32 ``[M, V]`` tensors."""
    m, vocab, hidden = case.m, case.extra["vocab"], case.extra["hidden"]
    es = torch.finfo(spec.dtype).bits // 8
    out = [gemm("logits h·Wᵀ", m, vocab, hidden, es), gemm("∂h = ∂z·W", m, hidden, vocab, es)]
    if case.provider == "fastpeft":
        return out + [pointwise("cross-entropy kernel", m * vocab, 3, es)]
    if case.provider == "reference":
        mv = m * vocab
        return out + [pointwise("float()", mv, 1, es), pointwise("float() write", mv, 1, 4),
                      pointwise("log_softmax", mv, 2, 4), pointwise("log_softmax backward", mv, 3, 4),
                      pointwise("∂z to 16 bits", mv, 1, 4), pointwise("∂z write", mv, 1, es)]  # fmt: skip
    return None


def _prepare(case: Case, spec: Spec) -> Prepared:
    from fastpeft.ops.linear_cross_entropy import linear_cross_entropy

    w, h, labels = _operands(case.m, case.extra["vocab"], case.extra["hidden"], spec)
    h = h.detach().requires_grad_()
    if case.provider == "fastpeft":
        fn = linear_cross_entropy
    elif case.provider == "reference":
        fn = _eager
    else:
        torch._dynamo.reset()
        fn = torch.compile(_eager, dynamic=False)

    def step() -> None:
        fn(h, w, labels).backward()

    return Prepared(step, grad_to_none=[h])


def cases(spec: Spec) -> list[Case]:
    if "lm_loss" not in spec.ops or "fwd+bwd" not in spec.modes:
        return []
    es = torch.finfo(spec.dtype).bits // 8
    models = list(dict.fromkeys(s.model for s in spec.shapes if s.model in HEADS))
    out = []
    for model, m, provider in itertools.product(models, spec.ms, PROVIDERS):
        if not spec.wants(provider):
            continue
        vocab, hidden = HEADS[model]
        flops = 4.0 * m * vocab * hidden
        nbytes = float(es * (2 * vocab * hidden + 2 * m * hidden + 2 * m * vocab))
        case = Case("lm_loss", provider, "fwd+bwd", f"{vocab}x{hidden}", m, spec.dtype_name, flops, nbytes,
                    family=_FAMILY[provider], path="chunked" if provider == "fastpeft" else "")  # fmt: skip
        case.extra.update(vocab=vocab, hidden=hidden)
        case.prepare = lambda case=case: _prepare(case, spec)
        case.cost_s = 2.0
        case.value = 4.0
        if provider == "compiled":
            case.warm_key, case.warm_cost_s = f"compile:{case.key}", 20.0 if spec.is_gpu else 8.0
        out.append(case)
    return out


def release() -> None:
    """Drop the cached operands (the run is over)."""
    _CACHE.clear()
