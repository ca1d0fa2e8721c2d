"""Cross-entropy loss and its logits gradient in one kernel, in place of the logits.

For one chunk of the causal-LM loss (``fastpeft.ops.linear_cross_entropy``): logits ``z [T, V]`` in the
head's dtype (the GEMM's output), labels ``y [T]`` (already clamped: ignored tokens carry scale 0) and
per-token scales ``s [T]`` (``valid / n``)::

    lse_t    = log Σ_v exp(z_tv)                      (float32)
    loss_t   = s_t · (lse_t − z_t,y_t)                (float32, written to loss [T])
    z_tv    <- s_t · (exp(z_tv − lse_t) − [v = y_t])  (∂loss/∂z, rounded into z's dtype, in place)

One program per token: a first sweep over V keeps a running maximum and sum per lane (online
log-sum-exp), a second sweep writes the gradient over the logits it read. The chunk's logits are read
twice and written once in their 16-bit dtype; eager torch's ``float()``, ``log_softmax`` and its backward
instead sweep float32 ``[T, V]`` copies about ten times and hold two of them at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastpeft.kernels._gate import GateCase
from fastpeft.kernels.reference import check_cross_entropy_args
from fastpeft.kernels.rounding import cast_out

__all__ = ["compile_gate_cases", "cross_entropy_grad_"]


@triton.jit
def _cross_entropy_kernel(
    z_ptr, label_ptr, scale_ptr, loss_ptr, V, stride_z, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    offs = tl.arange(0, BLOCK_V)
    # a finite floor, not -inf: exp(run_max - new_max) is then never exp(-inf - -inf) = NaN, and masked lanes
    # (loaded as -inf) add exp(-inf) = 0
    run_max = tl.full((BLOCK_V,), -3.0e38, tl.float32)
    run_sum = tl.zeros((BLOCK_V,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        v = v0 + offs
        z = tl.load(z_row + v, mask=v < V, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(run_max, z)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.exp(z - new_max)
        run_max = new_max
    row_max = tl.max(run_max, axis=0)
    total = tl.sum(run_sum * tl.exp(run_max - row_max), axis=0)
    lse = row_max + tl.log(total)
    label = tl.load(label_ptr + row)
    scale = tl.load(scale_ptr + row)
    picked = tl.load(z_row + label).to(tl.float32)
    tl.store(loss_ptr + row, scale * (lse - picked))
    for v0 in range(0, V, BLOCK_V):
        v = v0 + offs
        mask = v < V
        z = tl.load(z_row + v, mask=mask, other=0.0).to(tl.float32)
        p = scale * (tl.exp(z - lse) - tl.where(v == label, 1.0, 0.0))
        tl.store(z_row + v, cast_out(p, z_ptr.dtype.element_ty), mask=mask)


def _block_v(interpret: bool) -> int:
    # 4 warps x 32 lanes x 8 elements: 16-byte loads of 16-bit logits per lane and sweep step
    return 64 if interpret else 1024


def cross_entropy_grad_(z: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-token losses ``[T]`` float32; ``z [T, V]`` is overwritten by ∂loss/∂z (see the module docstring).

    Args:
        z: logits, float32/float16/bfloat16, unit stride along V. labels: ``[T]`` int64 in ``[0, V)``.
        scale: ``[T]`` float32 (0 for tokens without a loss).
    """
    check_cross_entropy_args(z, labels, scale)
    tokens, vocab = z.shape
    loss = torch.empty(tokens, dtype=torch.float32, device=z.device)
    if tokens == 0:
        return loss
    _cross_entropy_kernel[(tokens,)](
        z, labels, scale, loss, vocab, z.stride(0), BLOCK_V=_block_v(z.device.type != "cuda"), num_warps=4
    )
    return loss


_GATE_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def compile_gate_cases() -> list[GateCase]:
    """The kernel for each logits dtype, as the GPU launcher runs it on contiguous rows: a vocabulary that is
    a multiple of 16 (Llama 3's 128,256: Triton gives V and the row stride divisibility hints) and one that
    is not (GPT-2's 50,257)."""
    cases = []
    for ty in _GATE_TYPES.values():
        for tag, vocab in (("", 128_256), (",odd_vocab", 50_257)):
            cases.append(
                GateCase(
                    f"cross_entropy[{ty}{tag}]", __name__, "_cross_entropy_kernel",
                    {"z_ptr": f"*{ty}", "label_ptr": "*i64", "scale_ptr": "*fp32", "loss_ptr": "*fp32",
                     "V": "i32", "stride_z": "i32"},
                    {"BLOCK_V": _block_v(False)}, num_warps=4, args={"V": vocab, "stride_z": vocab},
                )
            )  # fmt: skip
    return cases
