"""Predicted figures for the GPU cases: estimates, never measurements.

A provider's call is a list of kernels (``Component``). The NF4 decode-size call and the dequantize pass (bf16,
double quantization, with their shapes) take the latency-aware model (``kernels/_perf.py`` through
``kernels/_perf_launches.py``: every launch the launcher issues, predicted from its SASS; calibration in
benchmarks/calibration.md); a component may carry its own launch model (``Component.model``: fastpeft's DoRA call
from ``kernels/_perf_dora.py``). Other kernels that decode NF4 weights (path "small", other dtypes) take the compile
gate's first model (``fastpeft.kernels._gate``, the "issue bound"): its
record for the configuration the launcher picks gives ``memory_bound_weights_per_s`` and
``predicted_roofline_fraction`` (issue-bound vs memory-bound from the SASS of the main loop), so the
kernel decodes ``weights`` in ``weights / (memory_bound * predicted_roofline_fraction)`` seconds (never
less than the roofline time of the bytes counted for it, activations included). Every
other kernel (tensor-core GEMM tiles, LoRA's skinny products, eager torch ops, cuBLAS) is put at its
roofline, ``max(flops / peak_flops, bytes / peak_bandwidth)``: the gate's model is for decode-bound loops
and does not model tensor-core time, and a baseline at its roofline is the strictest baseline. A row's
``predicted`` is its counted work as a fraction of those peaks at the predicted time (comparable to the
measured ``frac_of_peak``); ``basis`` names the gate records and the roofline parts.

The machine is the cost model's: an H100 SXM, the latency-aware model's achievable 3.17 TB/s (``_perf.CONSTANTS``;
3.0 TB/s, ``_sass.H100``, without it) and 790 TFLOP/s bf16.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["REFERENCE", "Component", "Predictor", "gemm", "pointwise"]

REFERENCE = {"name": "H100 SXM (cost model)", "bf16_flops_per_s": 790e12, "hbm_bytes_per_s": 3.0e12}
"""DESIGN.md's reference points; the bandwidth is replaced by the gate's own (``_sass.H100``) when it loads."""


@dataclass(frozen=True)
class Component:
    """One kernel of a call. With ``gate_path`` the gate's record for (path, dtype, double quant, M)
    times it from ``weights``; otherwise its ``flops`` and ``nbytes`` at the roofline."""

    name: str
    flops: float = 0.0
    nbytes: float = 0.0
    gate_path: str = ""
    weights: int = 0
    m: int = 0
    dtype: str = "bf16"
    double_quant: bool = True
    n: int = 0
    k: int = 0
    r: int = 0
    """With ``n`` and ``k`` (W ``[N, K]``; ``r`` the LoRA rank, 0 for the base alone) a bf16 "decode" or "dequant"
    component takes the latency-aware model (``kernels/_perf_launches.py``): the whole call as the launcher issues
    it, the LoRA U product of a decode call included."""
    model: Callable[[int], tuple[float, str]] | None = None
    """A launch model of the component on ``sm_<arch>`` (``(seconds, basis)``, e.g. ``kernels/_perf_dora.py``'s
    whole call), used before any gate record; where it cannot run, ``flops`` and ``nbytes`` at the roofline."""


def gemm(name: str, m: int, n: int, k: int, es: int, extra_bytes: float = 0.0) -> Component:
    """``[m, k] x [k, n]`` read once, ``[m, n]`` written once, ``es`` bytes per element."""
    return Component(name, 2.0 * m * n * k, es * (m * k + n * k + m * n) + extra_bytes)


def pointwise(name: str, elements: int, tensors: int, es: int) -> Component:
    """An elementwise kernel touching ``tensors`` tensors (inputs + outputs) of ``elements`` each."""
    return Component(name, 0.0, float(es * elements * tensors))


def _pointer_dtype(name: str) -> str:
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(name, name)


class Predictor:
    """Predicts cases from the gate's records (``records``: dicts with the gate report's fields)."""

    def __init__(self, records: Iterable[dict], gate_cases: Iterable = (), arch: int = 90, error: str = "") -> None:
        self.arch = arch
        self.error = error
        self.records = {r["case"]: r for r in records if r.get("arch") == arch}
        self.gate_cases = list(gate_cases)
        self.flops_per_s = REFERENCE["bf16_flops_per_s"]
        self.bytes_per_s = REFERENCE["hbm_bytes_per_s"]

    # -- building from the gate -------------------------------------------------------------------

    @classmethod
    def from_gate(cls, wanted: Iterable[Component], arch: int = 90, gate_json: Path | None = None) -> Predictor:
        """Build (or read from ``gate_json``, written by ``python -m fastpeft.kernels._gate --json``) the
        gate's records for the configurations ``wanted`` components run. A gate that cannot run leaves an
        empty predictor whose ``error`` says why (its components then take the roofline, and say so)."""
        try:
            from fastpeft.kernels import _gate, _sass
        except Exception as e:  # the compile gate is a development tool: its absence is reported, not fatal
            return cls([], arch=arch, error=f"compile gate unavailable ({type(e).__name__}: {e})")
        pred = cls([], [c for c in _gate.all_cases() if c.path], arch)
        pred.bytes_per_s = float(_sass.H100.get("hbm_bytes_per_s", pred.bytes_per_s))
        try:  # the latency-aware model's achievable bandwidth, which its decode and dequantize figures use
            from fastpeft.kernels import _perf

            pred.bytes_per_s = _perf.machine(arch).hbm_bytes_per_s
        except Exception:
            pass
        names = sorted({c.name for comp in wanted if comp.gate_path for c in [pred.gate_case(comp)] if c})
        try:
            if gate_json is not None:
                records = json.loads(Path(gate_json).read_text())
            else:
                records = _build_records(_gate, [c for c in pred.gate_cases if c.name in names], arch)
        except Exception as e:
            pred.error = f"compile gate failed ({type(e).__name__}: {str(e).strip()[:200]})"
            return pred
        pred.records = {r["case"]: r for r in records if r.get("arch") == arch}
        return pred

    def gate_case(self, comp: Component):
        """The gate case of the configuration the launcher picks for ``comp``: its path, dtype and double
        quantization, the smallest ``BLOCK_M`` that holds ``comp.m`` rows (its own binary where the gate has
        one for exactly ``m``), and the representative shape (the case without a shape suffix)."""
        want = f"*{_pointer_dtype(comp.dtype)}"
        cands = [
            c for c in self.gate_cases
            if c.path == comp.gate_path and want in c.signature.values()
            and c.constexprs.get("DOUBLE_QUANT", comp.double_quant) == comp.double_quant
        ]  # fmt: skip
        if comp.m:
            cands = [c for c in cands if c.constexprs.get("BLOCK_M", comp.m) >= comp.m] or cands
        if not cands:
            return None

        def rank(c) -> tuple:
            m = (c.args or {}).get("M", comp.m)
            # Triton compiles M == 1 as a constant: that binary runs M = 1 only; the atomic decode kernel is the C
            # library's form, the Python launcher runs the fused one
            c_only = c.kernel == "_nf4_decode_kernel"
            return (c_only, m != comp.m, m == 1 != comp.m, c.constexprs.get("BLOCK_M", 0), len(c.name), c.name)

        return min(cands, key=rank)

    def record(self, comp: Component) -> dict | None:
        case = self.gate_case(comp)
        rec = self.records.get(case.name) if case is not None else None
        if rec is None or rec.get("error") or not rec.get("memory_bound_weights_per_s"):
            return None
        if rec.get("predicted_roofline_fraction") is None:
            return None
        return rec

    # -- predicting -------------------------------------------------------------------------------

    def roofline_s(self, comp: Component) -> float:
        return max(comp.flops / self.flops_per_s, comp.nbytes / self.bytes_per_s)

    def predict(self, flops: float, nbytes: float, components: list[Component]) -> dict[str, object]:
        """``predicted`` (fraction of the reference peaks), ``predicted_ms`` and ``basis`` of one call."""
        seconds, gate_parts, roofline_parts = 0.0, [], []
        for comp in components:
            model = self.latency_model(comp)
            rec = self.record(comp) if comp.gate_path and model is None else None
            if model is not None and comp.model is not None:
                # the suite's peaks bound it as they bound a gate record (the model's cuBLAS runs at its own clock)
                seconds += max(model[0], self.roofline_s(comp))
                gate_parts.append(model[1])
            elif model is not None:
                seconds += model[0]
                gate_parts.append(model[1])
            elif rec is not None:
                rate = rec["memory_bound_weights_per_s"] * rec["predicted_roofline_fraction"]
                # never faster than the roofline of the bytes counted for it (X and Y included)
                seconds += max(comp.weights / rate, self.roofline_s(comp))
                ipw = rec.get("thread_instructions_per_weight")
                ipw_text = f"{ipw:.1f} ins/w, " if ipw is not None else ""
                gate_parts.append(
                    f"gate {rec['case']} sm_{self.arch}: {ipw_text}{rec['predicted_roofline_fraction']:.0%} of roofline"
                )
            else:
                seconds += self.roofline_s(comp)
                why = (
                    f" (no gate record: {self.error or f'the gate has no {comp.gate_path} case'})"
                    if comp.gate_path
                    else " (latency model unavailable)"
                    if comp.model is not None
                    else ""
                )
                roofline_parts.append(comp.name + why)
        if seconds <= 0:
            return {"predicted": "", "predicted_ms": "", "basis": "no work counted"}
        frac = max(flops / self.flops_per_s / seconds, nbytes / self.bytes_per_s / seconds)
        basis = list(gate_parts)
        if roofline_parts:
            basis.append("roofline: " + ", ".join(dict.fromkeys(roofline_parts)))
        return {
            "predicted": frac,
            "predicted_ms": seconds * 1e3,
            "basis": f"estimate, {REFERENCE['name']}; " + "; ".join(basis),
        }

    def latency_model(self, comp: Component) -> tuple[float, str] | None:
        """``(seconds, basis)`` of a decode or dequantize component by the latency-aware model, or None where it
        has no profile (other dtypes, no shape, or the model unavailable): a decode-size call under CUDA-graph
        replay, as it is timed; a dequantize pass with its stream launch. A component's own ``model`` first."""
        if comp.model is not None:
            try:
                return comp.model(self.arch)
            except Exception:  # no gate build here (no compiler): the roofline instead
                return None
        if comp.gate_path not in ("decode", "dequant") or not comp.n or comp.dtype != "bf16" or not comp.double_quant:
            return None
        try:
            from fastpeft.kernels import _perf, _perf_launches
        except Exception:  # the compile gate is a development tool: its absence is reported, not fatal
            return None
        try:
            if comp.gate_path == "dequant":
                op = _perf_launches.dequantize_op(comp.n, comp.k, self.arch)
                return op.seconds, f"latency model: {op.name} {op.hbm_fraction:.0%} of HBM (stream launch)"
            if comp.r:
                op = _perf_launches.decode_op(comp.n, comp.k, comp.m, comp.r, arch=self.arch)
                return op.graph_seconds, f"latency model: {op.name}, {len(op.launches)} launch(es) (CUDA graph)"
            pred = _perf.predict(_perf_launches.decode_launch(comp.n, comp.k, comp.m, 0, self.arch))
            return pred.graph_seconds, f"latency model: {pred.name}, base only (CUDA graph)"
        except Exception:  # no gate build here (no compiler): the first model's record or the roofline instead
            return None

    def static_records(self, path: str, dtype: str, ms: Iterable[int]) -> list[dict]:
        """The gate records of ``path`` for the configurations that run each of ``ms`` (double quant)."""
        out = []
        for m in ms:
            rec = self.record(Component("static", gate_path=path, m=m, dtype=dtype))
            if rec is not None and rec not in out:
                out.append(rec)
        return out


def _build_records(gate, cases: list, arch: int) -> list[dict]:
    """The gate's reports for ``cases`` on ``sm_<arch>`` as dicts: built in this process (its artifact cache
    makes a repeat cheap), or through ``run_gate``'s child processes under TRITON_INTERPRET, where
    kernels cannot be compiled in-process."""
    if not cases:
        return []
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [dataclasses.asdict(r) for r in gate.run_gate(cases, (arch,))]
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # as run_gate's children: the same cache keys
    return [dataclasses.asdict(gate.build(c, arch)) for c in cases]
