"""fastpeft's DoRA linear as its launchers run it, for the cost model (kernels/_perf.py) and the report's "DoRA vs
LoRA" table; the LoRA side is ``_perf_launches`` (``decode_op``, ``qlora_step``), which this module builds on.

What a DoRA training step issues (``nn.lora_dora.dora_forward`` without dropout, ``ops.dora``, ``kernels/dora_linear``),
with float32 adapter parameters (A, B, m); the layer's casts of A and B to x's dtype are LoRA's too, not counted, and
the row norm's pass over the base takes that cast of A:

1. the row norm ``‖W + s·B·A‖``, every training forward (A and B change each step; eval keeps it): ``A·Wᵀ`` as
   ``nf4_linear`` of the bf16 A (the decode kernel, R rows, base only), then one launch for the rank-sized rest
   that also writes ``f = m / norm``, ``s·f`` and ``f ⊙ B`` (``kernels/dora_norm.py``, streamed);
   ``‖W‖²`` is cached by the layer (free after the first call);
2. decode sizes: LoRA's launches (``decode_op``: one without dropout), the kernel forming ``f = m / norm`` in its
   epilogue (a runtime flag of the same binary). Training sizes (NF4, K % 64 == 0): U, ``nf4_dequantize_scaled``
   writing ``f ⊙ W`` into the scratch, cuBLAS + addmm with ``f ⊙ B`` (LoRA's path).

The backward (NF4, no bias): the scaled dequantize again, LoRA's backward on the scaled scratch (dX by cuBLAS + addmm
at rank 2R, G, dA), dB's skinny pass reading Y beside dY for ``Σ dY`` and ``Σ dY ⊙ Y`` (the weight-gradient kernel's
``HAS_YSUM``: no column pass), then one launch for ``dm = Σ / m`` from those partials (``dora_dm``; its
zero-magnitude branch idle: no magnitude is 0; no host sync). dB's row scaling by ``s·f`` replaces LoRA's by ``s``
(neither modeled). A dense base runs ``torch.mm`` + the epilogue kernel (``dora_epilogue``) forward; backward, dB's
pass also writes ``G ⊙ f`` (``WRITE_XF``), on which LoRA's dX and dA run. Estimates, like every figure of the
model.
"""

from __future__ import annotations

import math

import torch

from fastpeft.kernels import _perf
from fastpeft.kernels import _perf_launches as pl
from fastpeft.kernels.lora_linear_wgrad import _wgrad_config, _wgrad_rows

__all__ = ["dequantize_scaled_op", "dora_decode_op", "dora_rows", "dora_step",
           "epilogue_launch", "format_dora", "row_norm_preds"]  # fmt: skip

DORA_DECODE_M = (1, 16)
DORA_TRAIN_M = (2048, 8192)


def dequantize_scaled_op(n: int, k: int, arch: int = 90, dtype: str = "bf16", scaled: bool = True) -> pl.OpPrediction:
    """``nf4_dequantize(row_scale=f)`` (``scaled``) or plain: ``dequantize_op``'s grid with the gate's binary for
    ``dtype``, the output's bytes at its width (4 for float32), f read when scaled."""
    m = _perf.machine(arch)
    case = f"nf4_dequantize{'_scaled' if scaled else ''}[{dtype},double_quant=True]"
    numel = n * k
    full, grid = numel // 4096, min(math.ceil(numel / 4096), 32 * m.sms)

    def trips(i: int) -> tuple[int]:
        return (max(0, math.ceil((full - i) / grid)),)

    out_bytes = 4 if dtype == "fp32" else 2
    hbm = numel * (0.5 + 1 / 64 + out_bytes) + numel / 64 / 256 * 4 + (n * 4 if scaled else 0)
    launch = _perf.Launch(f"dequantize {'f·W ' if scaled else ''}{dtype} {n}x{k}", pl.profile(case, arch), grid,
                          trips, hbm, weights=numel, dram_loads="marked")  # fmt: skip
    return pl._total(launch.name, [_perf.predict(launch, m)], hbm, m)


def row_norm_preds(n: int, k: int, r: int = 16, arch: int = 90) -> list[_perf.Prediction]:
    """``dora_norm_factors`` on an NF4 base with float32 A and B, the layer's bf16 cast of A and the cached
    ``‖W‖²`` (module docstring, step 1)."""
    m = _perf.machine(arch)
    # A·Wᵀ: the decode kernel over the packed base (R rows of the bf16 A, no LoRA term), written in bf16
    preds = [_perf.predict(pl.decode_launch(n, k, r, 0, arch), m)]
    # the rest in one launch (kernels/dora_norm.py, R <= 32): A·Aᵀ per program from L2, B, m and A·Wᵀ read once;
    # norm, F [2, N] and f ⊙ B written; streamed here (its loop is not profiled)
    nbytes = 4 * (r * k + n * r + 3 * n) + 2 * r * n + 3 * 4 * n + 2 * n * r
    preds.append(pl._stream("dora_norm kernel", nbytes, 2.0 * r * n * (r + 1), m))
    return preds


def dora_decode_op(
    n: int, k: int, m_rows: int, r: int = 16, arch: int = 90, norm_kept: bool = False
) -> pl.OpPrediction:
    """The NF4 DoRA forward at decode size: the row norm (unless kept: eval mode, ``nn.lora_dora._row_norm``), then
    LoRA's decode launches, the kernel forming f = m / norm in its epilogue (``col_norm``; a runtime flag of the same
    binary)."""
    m = _perf.machine(arch)
    preds = ([] if norm_kept else row_norm_preds(n, k, r, arch)) + pl.decode_op(n, k, m_rows, r, arch).launches
    return pl._total(f"NF4+DoRA decode {n}x{k} M={m_rows}", preds, n * k * (0.5 + 1 / 64) + m_rows * (k + n) * 2, m)


def epilogue_launch(n: int, m_rows: int, r: int = 16, arch: int = 90, dtype: str = "bf16") -> _perf.Launch:
    """``dora_epilogue`` in place over Y: grid (M / 64, N / 128), the rank loop R / 16 steps; Y read and written,
    U and B read, f read."""
    prof = pl.profile(f"dora_epilogue[{dtype},bias=False]", arch)
    grid = math.ceil(m_rows / 64) * math.ceil(n / 128)
    steps = (math.ceil(r / 16),) * len(prof.loops)
    hbm = 2 * (2 * m_rows * n + r * (m_rows + n)) + 4 * n
    return _perf.Launch(f"DoRA epilogue {m_rows}x{n}", prof, grid, lambda i: steps, hbm, dram_loads="all")


def _dm_pred(n: int, m_rows: int, r: int, m: _perf.Machine) -> _perf.Prediction:
    """``dora_dm``: dB's pass's [2, slices, N] partials read once, m read, dm written (no zero magnitude: its branch
    idle)."""
    cfg = _wgrad_config(torch.bfloat16, interpret=False)
    splits = math.ceil(m_rows / _wgrad_rows(m_rows, n, r, cfg, pl.TARGET_PROGRAMS_PER_SM * m.sms))
    return pl._elementwise("dm = Σ / m, zero-magnitude check", (2 * splits + 2) * n * 4, m)


def dora_step(n: int, k: int, m_rows: int = 8192, r: int = 16, arch: int = 90, path: str = "nf4") -> dict:
    """Forward and forward + backward seconds of one DoRA linear at ``m_rows`` without dropout or bias, mirroring
    ``qlora_step(path="cublas")``: ``path`` "nf4" (the scaled scratch, module docstring) or "dense" (a bf16 base:
    torch.mm + the epilogue kernel; dB's pass writes ``G ⊙ f``; the row norm's A·Wᵀ then a bf16 F.linear)."""
    m = _perf.machine(arch)
    u = pl._skinny_stream("U", m_rows, k, r, m)
    wgrad = [pl._skinny_stream(w, m_rows, width, r, m) for w, width in (("G", n), ("dA", k))]
    if path == "nf4":
        norm = row_norm_preds(n, k, r, arch)
        deq = dequantize_scaled_op(n, k, arch).launches
        fwd = norm + [u] + deq + pl.cublas_lora_op(n, k, m_rows, r, arch).launches
        bwd = deq + pl.cublas_lora_op(k, n, m_rows, 2 * r, arch).launches + wgrad
        # dB's pass reads Y beside dY for the two column sums; its partials [2, slices, N] summed by torch
        dbytes = 2 * (2 * m_rows * n + r * (m_rows + n))
        bwd.append(pl._stream("dB + Σ dY, Σ dY·Y", dbytes, 2.0 * m_rows * n * (r + 1), m))
    else:
        norm = [pl._stream("A·Wᵀ (bf16)", 2 * (n * k + r * k + r * n), 2.0 * r * n * k, m)] + row_norm_preds(
            n, k, r, arch
        )[1:]
        ep = _perf.predict(epilogue_launch(n, m_rows, r, arch), m)
        fwd = norm + [u] + pl.cublas_gemm(n, k, m_rows, arch).launches + [ep]
        # dB's pass reads Y beside dY for the two column sums and writes G ⊙ f for dX and dA (WRITE_XF)
        dbytes = 2 * (3 * m_rows * n + r * (m_rows + n))
        bwd = [pl._stream("dB + Σ dY, Σ dY·Y, G ⊙ f", dbytes, 2.0 * m_rows * n * (r + 1), m)]
        bwd += pl.cublas_lora_op(k, n, m_rows, 2 * r, arch).launches + wgrad
    # dbias and dm = Σ / m from the partials, the zero-magnitude branch idle (kernels/dora_linear.py dora_dm)
    bwd.append(_dm_pred(n, m_rows, r, m))
    t_fwd = sum(p.seconds for p in fwd)
    return {"fwd": t_fwd, "fwd_bwd": t_fwd + sum(p.seconds for p in bwd), "launches": len(fwd) + len(bwd)}


def _lora_dense_step(n: int, k: int, m_rows: int, r: int, arch: int) -> dict:
    """fastpeft LoRA on a bf16 base: ``qlora_step``'s cuBLAS path without its two dequantizes."""
    q = pl.qlora_step(n, k, m_rows, r, arch, path="cublas")
    deq = pl.dequantize_op(n, k, arch).seconds
    return {"fwd": q["fwd"] - deq, "fwd_bwd": q["fwd_bwd"] - 2 * deq}


def dora_rows(arch: int = 90, shapes=pl.LLAMA3_8B) -> list[tuple[str, int, int, str, float, float]]:
    """``(what, N, K, M, DoRA s, LoRA s)`` per row: NF4 decode forward, NF4 and dense fwd+bwd at training sizes."""
    rows = []
    for n, k in shapes:
        for mr in DORA_DECODE_M:
            lora = pl.decode_op(n, k, mr, arch=arch).seconds
            kept = dora_decode_op(n, k, mr, arch=arch, norm_kept=True).seconds
            rows.append(("NF4 fwd, eval (norm kept)", n, k, mr, kept, lora))
            rows.append(("NF4 fwd, training (norm each call)", n, k, mr, dora_decode_op(n, k, mr, arch=arch).seconds,
                         lora))  # fmt: skip
        for mr in DORA_TRAIN_M:
            rows.append(("NF4 fwd+bwd", n, k, mr, dora_step(n, k, mr, arch=arch)["fwd_bwd"],
                         pl.qlora_step(n, k, mr, arch=arch, path="cublas")["fwd_bwd"]))  # fmt: skip
            rows.append(("bf16 fwd+bwd", n, k, mr, dora_step(n, k, mr, arch=arch, path="dense")["fwd_bwd"],
                         _lora_dense_step(n, k, mr, 16, arch)["fwd_bwd"]))  # fmt: skip
    return rows


def format_dora(rows: list) -> list[str]:
    """The "DoRA vs LoRA" Markdown table."""
    out = ["", "## DoRA vs LoRA (fastpeft, r = 16, bf16, no dropout or bias; kernels/_perf_dora.py)", "",
           "In training DoRA's forward recomputes the row norm every call (A·Wᵀ as bf16 A through the decode kernel, "
           "then one kernel for the rest, f, s·f and f ⊙ B); in eval it keeps it. Decode: LoRA's one "
           "launch, f = m / norm formed in its epilogue; training (NF4): the scaled dequantize over LoRA's cuBLAS + "
           "addmm path, the column sums riding dB's pass, one launch for dm = Σ / m.", "",
           "| case | W [N, K] | M | fastpeft DoRA us | fastpeft LoRA us | ratio |",
           "|---|---|---|---|---|---|"]  # fmt: skip
    for what, n, k, mr, d, lo in rows:
        out.append(f"| {what} | {n}x{k} | {mr} | {pl._us(d)} | {pl._us(lo)} | {d / lo:.2f} |")
    return out
