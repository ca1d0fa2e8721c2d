"""NF4 dequantize: fastpeft's Triton kernel against eager torch, torch.compile and bitsandbytes.

Op ``nf4_dequant``: a double-quantized NF4 weight ``[N, K]`` (QLoRA's format) to a dense 16-bit one.
Providers: ``fastpeft`` (``NF4Weight.dequantize``: the kernel on a GPU, the reference on the CPU),
``reference`` (``kernels/reference.py``'s ``nf4_dequantize_reference``, eager torch), ``compiled``
(``torch.compile`` of it) and ``bnb`` (bitsandbytes ``dequantize_4bit`` of the same weight quantized by
bitsandbytes). Goal (DESIGN.md): >= 90 % of HBM bandwidth, the peak measured by a device-to-device copy
in the same run. Bytes per call: the packed codes (``N·K/2``), the uint8 absmax and its nested float32
statistics, and the 16-bit output (``2·N·K``); no flops are counted.
"""

from __future__ import annotations

import itertools

import torch

from .core import Case, OperandCache, Prepared, copies_past_l2, short_call
from .predict import Component
from .spec import Spec

__all__ = ["OPS", "PROVIDERS", "cases", "components", "release"]

OPS = ("nf4_dequant",)
PROVIDERS = ("fastpeft", "reference", "compiled", "bnb")
_FAMILY = {"fastpeft": "fastpeft", "reference": "torch", "compiled": "compile", "bnb": "bitsandbytes"}
_CACHE = OperandCache(size=2)


def _bytes(n: int, k: int, es: int) -> int:
    numel = n * k
    return numel // 2 + numel // 64 + 4 * (numel // 64 // 256) + es * numel


def components(case: Case, spec: Spec) -> list[Component] | None:
    if case.provider != "fastpeft":
        return None
    shape = case.extra["shape"]
    dt = {"bfloat16": "bf16", "float16": "fp16"}.get(case.dtype, "fp32")
    return [Component("dequant", 0.0, case.nbytes, gate_path="dequant", weights=shape.n * shape.k, dtype=dt, n=shape.n,
                      k=shape.k)]  # fmt: skip


def _operands(shape, spec: Spec, copies: int, bnb: bool) -> list:
    def build() -> list:
        from fastpeft import quantize_nf4

        out = []
        for _ in range(copies):
            w = (torch.randn(shape.n, shape.k, device=spec.device) * 0.02).to(spec.dtype)
            if bnb:
                import bitsandbytes.functional as BF

                packed, state = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
                state.dtype = spec.dtype
                out.append((packed, state))
            else:
                out.append(quantize_nf4(w, double_quant=True))
        return out

    return _CACHE.get((shape.name, spec.dtype_name, spec.device, copies, bnb), build)


def _prepare(case: Case, spec: Spec) -> Prepared:
    shape = case.extra["shape"]
    graph = spec.is_gpu and short_call(case.flops, case.nbytes)
    copies = copies_past_l2(int(case.nbytes), spec.device) if graph else 1
    ops = _operands(shape, spec, copies, case.provider == "bnb")
    numel, dtype = shape.n * shape.k, spec.dtype
    if case.provider == "fastpeft":
        fns = [lambda q=q: q.dequantize(dtype) for q in ops]
    elif case.provider == "bnb":
        import bitsandbytes.functional as BF

        fns = [lambda p=p, s=s: BF.dequantize_4bit(p, s) for p, s in ops]
    else:
        from fastpeft.kernels.reference import nf4_dequantize_reference

        def ref(packed, absmax, nested, offset):
            return nf4_dequantize_reference(packed, absmax, numel, dtype, nested_absmax=nested, offset=offset)

        if case.provider == "compiled":
            torch._dynamo.reset()
            ref = torch.compile(ref, dynamic=False)
        fns = [lambda q=q, ref=ref: ref(q.packed, q.absmax, q.nested_absmax, q.offset) for q in ops]
    it = itertools.cycle(fns)
    note = f"{copies} operand copies rotated past L2" if copies > 1 else ""
    return Prepared(lambda: next(it)(), cuda_graph=graph, note=note)


def cases(spec: Spec) -> list[Case]:
    if "nf4_dequant" not in spec.ops:
        return []
    es = torch.finfo(spec.dtype).bits // 8
    out = []
    for shape, provider in itertools.product(spec.shapes, PROVIDERS):
        if not spec.wants(provider):
            continue
        nbytes = float(_bytes(shape.n, shape.k, es))
        case = Case("nf4_dequant", provider, "fwd", shape.name, 0, spec.dtype_name, 0.0, nbytes,
                    family=_FAMILY[provider], path="dequant" if provider == "fastpeft" else "")  # fmt: skip
        case.extra["shape"] = shape
        case.prepare = lambda case=case: _prepare(case, spec)
        case.cost_s = 1.5
        if provider == "compiled":
            case.warm_key, case.warm_cost_s = f"compile:{case.key}", 20.0 if spec.is_gpu else 8.0
        elif provider == "fastpeft":
            case.warm_key, case.warm_cost_s = f"fastpeft:dequant:{spec.dtype_name}", 5.0
        elif provider == "bnb":
            case.warm_key, case.warm_cost_s = "import:bnb", 5.0
        out.append(case)
    return out


def release() -> None:
    """Drop the cached operands (the run is over)."""
    _CACHE.clear()
