"""Cross-entropy loss and its logits gradient in one kernel, in place of the logits.

For one chunk of the causal-LM loss (``fastpeft.ops.linear_cross_entropy``): logits ``z [T, V]`` in the
head's dtype (the GEMM's output), labels ``y [T]`` (already clamped: ignored tokens carry scale 0) and
per-token scales ``s [T]`` (``valid / n``)::

    lse_t    = log Σ_v exp(z_tv)                      (float32)
    loss_t   = s_t · (lse_t − z_t,y_t)                (float32, written to loss [T])
    z_tv    <- s_t · (exp(z_tv − lse_t) − [v = y_t])  (∂loss/∂z, rounded into z's dtype, in place)

One program per token: a first sweep over V keeps a running maximum and sum per lane (online
log-sum-exp), a second sweep writes the gradient over the logits it read. A program is 32 warps while the launch's
programs are all resident at once (a loss chunk has about one token per SM, so its loads in flight per SM are one
program's) and 16 past that (``CE_WARPS``). A head cut into vocabulary slices (an NF4 head, dequantized a slice
at a time) runs the two sweeps as two launches per slice: the slice's log-sum-exp and label logit, combined across
slices by the caller, then the slice's gradient from the whole row's log-sum-exp (``label_offset`` places the label
in the slice). The chunk's logits are read twice and written once in their 16-bit dtype; eager torch's ``float()``,
``log_softmax`` and its backward instead sweep float32 ``[T, V]`` copies about ten times and hold two at once.
"""

from __future__ import annotations

import functools
import itertools

import torch
import triton
import triton.language as tl

from fastpeft.kernels._gate import GateCase
from fastpeft.kernels.reference import check_cross_entropy_args
from fastpeft.kernels.rounding import cast_out

__all__ = [
    "CE_WARPS",
    "INTERPRET_SMS",
    "ce_warps",
    "compile_gate_cases",
    "cross_entropy_grad_",
    "cross_entropy_slice_grad_",
    "cross_entropy_slice_stats",
    "stats_loads",
]

_FULL, _STATS, _GRAD = (True, True), (True, False), (False, True)
"""(STATS, GRAD) of the three launches: a whole vocabulary; a slice's statistics; a slice's gradient."""


@triton.jit
def _exp(x):
    """``exp(x) = 2^(x·log2 e)``, the product ``tl.exp`` forms too, on one MUFU.EX2: ``exp2`` compiles to the
    flush-to-zero ``ex2``, where ``tl.exp``'s ``ex2.approx.f32`` adds four instructions per logit to scale subnormal
    results. Results below 2^-126 (x < -87.3) become 0, beside a sum of at least 1 and gradients rounded to 16 bits;
    the floor minus a logit overflows to -inf in the product, whose power is 0 as it should be."""
    return tl.math.exp2(x * 1.4426950408889634)


@triton.jit
def _cross_entropy_kernel(
    z_ptr, label_ptr, scale_ptr, loss_ptr, lse_ptr, V, stride_z, label_offset,
    BLOCK_V: tl.constexpr, STATS_LOADS: tl.constexpr, STATS: tl.constexpr, GRAD: tl.constexpr,
    GROUPED: tl.constexpr,
):  # fmt: skip
    """One token per program. ``STATS and GRAD``: the whole vocabulary (loss, then ∂loss/∂z over z).
    ``STATS`` alone: a vocabulary slice's log-sum-exp into ``lse`` and the label's logit (0 when the label
    is in another slice) into ``loss``. ``GRAD`` alone: a slice's ∂loss/∂z over z from the whole row's
    log-sum-exp read from ``lse``. ``label_offset``: the slice's first vocabulary row."""
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    offs = tl.arange(0, BLOCK_V)
    label = tl.load(label_ptr + row) - label_offset  # the label's column in this slice
    inside = (label >= 0) & (label < V)
    # as int32, -1 when in another slice: the gradient sweep compares it with 32-bit columns (one ISETP a logit,
    # where the int64 label took a sign extension and two compares)
    label = tl.where(inside, label, -1).to(tl.int32)
    if STATS:
        # a finite floor, not -inf: exp(run_max - new_max) is then never exp(-inf - -inf) = NaN, and masked
        # lanes (loaded as -inf) add exp(-inf) = 0
        # GROUPED (rows 16-byte aligned): one running maximum and sum per 8 consecutive logits, a lane's 16-byte
        # load, so one exp per logit plus one per 8; otherwise per logit (two exps each), which unaligned
        # 16-bit loads compile better to
        G: tl.constexpr = 8 if GROUPED else 1
        # STATS_LOADS 16-byte loads per lane and step (2: both issued before the first exp, two in flight)
        BLOCK_S: tl.constexpr = BLOCK_V * STATS_LOADS
        offs_s = tl.arange(0, BLOCK_S)
        run_max = tl.full((BLOCK_S // G,), -3.0e38, tl.float32)
        run_sum = tl.zeros((BLOCK_S // G,), tl.float32)
        for v0 in range(0, V, BLOCK_S):
            v = v0 + offs_s
            z = tl.load(z_row + v, mask=v < V, other=float("-inf")).to(tl.float32)
            if GROUPED:
                z = tl.reshape(z, (BLOCK_S // G, G))
                new_max = tl.maximum(run_max, tl.max(z, axis=1))
                run_sum = run_sum * _exp(run_max - new_max) + tl.sum(_exp(z - new_max[:, None]), axis=1)
            else:
                new_max = tl.maximum(run_max, z)
                # tl.exp: with _exp's shorter body ptxas issues half the row's loads after the first exp waits
                run_sum = run_sum * tl.exp(run_max - new_max) + tl.exp(z - new_max)
            run_max = new_max
        row_max = tl.max(run_max, axis=0)
        lse = row_max + tl.log(tl.sum(run_sum * _exp(run_max - row_max), axis=0))
        picked = tl.load(z_row + label, mask=inside, other=0.0).to(tl.float32)
        if GRAD:
            tl.store(loss_ptr + row, tl.load(scale_ptr + row) * (lse - picked))
        else:
            tl.store(lse_ptr + row, lse)
            tl.store(loss_ptr + row, picked)
    else:
        lse = tl.load(lse_ptr + row)
    if GRAD:
        scale = tl.load(scale_ptr + row)
        for v0 in range(0, V, BLOCK_V):
            v = v0 + offs
            mask = v < V
            z = tl.load(z_row + v, mask=mask, other=0.0).to(tl.float32)
            p = scale * (_exp(z - lse) - tl.where(offs == label - v0, 1.0, 0.0))
            tl.store(z_row + v, cast_out(p, z_ptr.dtype.element_ty), mask=mask)


CE_WARPS = (16, 32)
"""Warps per token program: 32 (1024 threads, two programs per SM) while every program of the launch is resident at
once (tokens <= 2 x SMs), else 16. A loss chunk holds about as many tokens as an H100 has SMs (64 MiB of float32
logits over Llama 3's 128,256-word vocabulary: 130 tokens), so one program per SM must keep enough loads in flight
alone: at 16 warps it holds 8 KB (a sweep step's 16-byte load per lane) for a DRAM latency of ~0.5 us, about half
of the ~12 KB per SM that Little's law asks at full bandwidth; 32 warps hold 16 KB and halve the sweep steps. Past
2 x SMs the programs come in waves, where 16 warps (four programs per SM) keep more SMs busy in the last one."""


def ce_warps(tokens: int, sms: int) -> int:
    """Warps of the token programs of a launch over ``tokens`` rows on a GPU of ``sms`` SMs (see ``CE_WARPS``)."""
    return CE_WARPS[1] if tokens <= 2 * sms else CE_WARPS[0]


def stats_loads(warps: int, grouped: bool) -> int:
    """16-byte loads per lane and step of the statistics sweep (``STATS_LOADS``): 2 for 32-warp programs over
    16-byte aligned rows, both issued before the first exp (32 KB in flight per program, half the steps, no more
    registers: 31 on sm_90a); 1 otherwise, where ptxas issues a second load only after the first one's maxima."""
    return 2 if warps == CE_WARPS[1] and grouped else 1


def _block_v(interpret: bool, warps: int = CE_WARPS[0]) -> int:
    # warps x 32 lanes x 8 elements: one 16-byte load of 16-bit logits per lane and sweep step
    return 64 if interpret else warps * 32 * 8


INTERPRET_SMS = 132
"""The SM count the interpreter's launches pick their configuration by (an H100's), so tests run both."""


@functools.cache
def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _grouped(z: torch.Tensor) -> bool:
    """The vocabulary and row stride are multiples of 16 and z is 16-byte aligned: Triton's divisibility
    hints, with which it vectorizes the loads (and the binary the gate checks for GROUPED)."""
    return z.shape[1] % 16 == 0 and z.stride(0) % 16 == 0 and z.data_ptr() % 16 == 0


def _launch(z, labels, scale, loss, lse, label_offset: int, mode: tuple[bool, bool]) -> None:
    if z.shape[0] == 0:
        return
    interpret = z.device.type != "cuda"
    warps, grouped = ce_warps(z.shape[0], INTERPRET_SMS if interpret else _sms(z.device)), _grouped(z)
    _cross_entropy_kernel[(z.shape[0],)](
        z, labels, scale, loss, lse, z.shape[1], z.stride(0), label_offset,
        BLOCK_V=_block_v(interpret, warps), STATS_LOADS=stats_loads(warps, grouped), STATS=mode[0], GRAD=mode[1],
        GROUPED=grouped, num_warps=warps,
    )  # fmt: skip


def cross_entropy_grad_(z: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-token losses ``[T]`` float32; ``z [T, V]`` is overwritten by ∂loss/∂z (see the module docstring).

    Args:
        z: logits, float32/float16/bfloat16, unit stride along V. labels: ``[T]`` int64 in ``[0, V)``.
        scale: ``[T]`` float32 (0 for tokens without a loss).
    """
    check_cross_entropy_args(z, labels, scale)
    loss = torch.empty(z.shape[0], dtype=torch.float32, device=z.device)
    _launch(z, labels, scale, loss, loss, 0, _FULL)  # lse unused: any float32 pointer
    return loss


def cross_entropy_slice_stats(
    z: torch.Tensor, labels: torch.Tensor, label_offset: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """For logits ``z [T, S]`` of vocabulary rows ``label_offset .. label_offset + S``: each token's
    log-sum-exp over the slice and its label's logit (0 when the label lies outside the slice), float32."""
    scale = torch.empty(z.shape[0], dtype=torch.float32, device=z.device)  # unread by this launch
    check_cross_entropy_args(z, labels, scale)
    lse, picked = torch.empty_like(scale), torch.empty_like(scale)
    _launch(z, labels, scale, picked, lse, label_offset, _STATS)
    return lse, picked


def cross_entropy_slice_grad_(
    z: torch.Tensor, labels: torch.Tensor, label_offset: int, scale: torch.Tensor, lse: torch.Tensor
) -> None:
    """Overwrite a slice's logits ``z [T, S]`` with ``scale·(exp(z − lse) − onehot(labels − label_offset))``,
    ``lse [T]`` float32 being each token's log-sum-exp over the whole vocabulary."""
    check_cross_entropy_args(z, labels, scale, lse)
    _launch(z, labels, scale, scale, lse, label_offset, _GRAD)  # the loss pointer is unread


_GATE_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def compile_gate_cases() -> list[GateCase]:
    """The kernel in its three launches (a whole vocabulary, a slice's statistics, a slice's gradient) for
    each logits dtype, as the GPU launchers run them on contiguous rows: a vocabulary that is a multiple of 16
    (Llama 3's 128,256, Triton then gives V and the row stride divisibility hints) and one that is not
    (GPT-2's 50,257). Slices start at a nonzero vocabulary row."""
    cases = []
    modes = {"": (_FULL, 0), ",slice_stats": (_STATS, 32_768), ",slice_grad": (_GRAD, 32_768)}
    for ty, warps in itertools.product(_GATE_TYPES.values(), CE_WARPS):
        wide = "" if warps == CE_WARPS[0] else f",warps={warps}"
        for (tag, vocab), (mode_tag, (mode, offset)) in itertools.product(
            (("", 128_256), (",odd_vocab", 50_257)), modes.items()
        ):
            cases.append(
                GateCase(
                    f"cross_entropy[{ty}{tag}{mode_tag}{wide}]", __name__, "_cross_entropy_kernel",
                    {"z_ptr": f"*{ty}", "label_ptr": "*i64", "scale_ptr": "*fp32", "loss_ptr": "*fp32",
                     "lse_ptr": "*fp32", "V": "i32", "stride_z": "i32", "label_offset": "i32"},
                    {"BLOCK_V": _block_v(False, warps), "STATS_LOADS": stats_loads(warps, not tag), "STATS": mode[0],
                     "GRAD": mode[1], "GROUPED": not tag},
                    num_warps=warps,
                    args={"V": vocab, "stride_z": vocab, "label_offset": offset},
                )
            )  # fmt: skip
    return cases
