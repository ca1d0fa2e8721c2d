"""Cross-entropy loss + logits gradient kernel (interpreter on CPU, the real kernel on a GPU) against
kernels/reference.py, and the reference against float64 autograd of ``F.cross_entropy``."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import HAS_CUDA, INTERPRET, assert_oracle, stable_seed

from fastpeft.kernels import cross_entropy, reference

DEVICE = "cuda" if HAS_CUDA else "cpu"
MODES = ((True, True), (True, False), (False, True))
"""(STATS, GRAD) of the three launches: a whole vocabulary, a slice's statistics, a slice's gradient."""
needs_kernels = pytest.mark.skipif(not (HAS_CUDA or INTERPRET), reason="needs a GPU or Triton's interpreter")


def _data(t: int, v: int, dtype: torch.dtype, key: tuple, spread: float = 4.0):
    g = torch.Generator().manual_seed(stable_seed(*key))
    z = (torch.randn(t, v, generator=g) * spread).to(dtype)
    labels = torch.randint(0, v, (t,), generator=g)
    scale = torch.rand(t, generator=g) + 0.1
    scale[torch.rand(t, generator=g) < 0.3] = 0.0  # tokens without a loss
    return z, labels, scale


def _exact(z: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 autograd: per-token losses and ∂(Σ losses)/∂z."""
    zd = z.double().requires_grad_()
    losses = scale.double() * F.cross_entropy(zd, labels, reduction="none")
    losses.sum().backward()
    return losses.detach(), zd.grad


# (T, V): one token, a vocabulary below one sweep step, primes past several steps; multiples of 16 take the
# grouped first sweep (running statistics per 8 logits, two loads per lane and step while the launch takes 32 warps);
# 270 tokens take 16 warps (more than two programs per SM at the interpreter's 132 SMs), one load per lane
SHAPES = [(1, 7), (5, 64), (9, 1031), (3, 4099), (4, 320), (270, 80), (270, 37)]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("t,v", SHAPES)
def test_kernel_matches_reference(t, v, dtype):
    z, labels, scale = _data(t, v, dtype, (t, v, dtype))
    z, labels, scale = z.to(DEVICE), labels.to(DEVICE), scale.to(DEVICE)
    got_z, want_z = z.clone(), z.clone()
    got = cross_entropy.cross_entropy_grad_(got_z, labels, scale)
    want = reference.cross_entropy_grad_reference(want_z, labels, scale)
    exact_loss, exact_grad = _exact(z.cpu(), labels.cpu(), scale.cpu())
    assert_oracle(got.cpu(), exact_loss, want.cpu(), msg=f"loss {dtype}")
    assert_oracle(got_z.cpu(), exact_grad, want_z.cpu(), msg=f"gradient {dtype}")
    assert torch.equal(got_z.cpu()[scale.cpu() == 0], torch.zeros_like(got_z.cpu()[scale.cpu() == 0]))


@needs_kernels
def test_kernel_is_stable_for_large_logits_and_one_hot_rows():
    # exp never sees a positive argument: logits in the thousands, and a row with one dominant class
    z = torch.full((2, 300), -3000.0)
    z[0, 17] = 3000.0
    z[1] = torch.linspace(-2000, 2000, 300)
    labels, scale = torch.tensor([17, 3]), torch.ones(2)
    got_z = z.clone().to(DEVICE)
    got = cross_entropy.cross_entropy_grad_(got_z, labels.to(DEVICE), scale.to(DEVICE)).cpu()
    exact_loss, exact_grad = _exact(z, labels, scale)
    assert torch.isfinite(got).all() and torch.isfinite(got_z).all()
    torch.testing.assert_close(got.double(), exact_loss, rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(got_z.cpu().double(), exact_grad, rtol=1e-5, atol=1e-6)


def test_reference_matches_float64_autograd():
    z, labels, scale = _data(6, 333, torch.float32, ("ref",))
    got_z = z.clone()
    got = reference.cross_entropy_grad_reference(got_z, labels, scale)
    exact_loss, exact_grad = _exact(z, labels, scale)
    torch.testing.assert_close(got.double(), exact_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_z.double(), exact_grad, rtol=1e-5, atol=1e-6)


def test_bad_arguments_are_refused():
    z, labels, scale = _data(4, 10, torch.float32, ("bad",))
    check = reference.check_cross_entropy_args
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        check(z.double(), labels, scale)
    with pytest.raises(ValueError, match="unit stride"):
        check(torch.zeros(10, 4).t(), labels, scale)
    with pytest.raises(ValueError, match="labels"):
        check(z, labels.int(), scale)
    with pytest.raises(ValueError, match="scale"):
        check(z, labels, scale[:2])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("v", [128_256, 50_257])
def test_kernel_at_llama3_vocabulary_on_gpu(v):
    z, labels, scale = _data(64, v, torch.bfloat16, ("gpu", v))
    z, labels, scale = z.cuda(), labels.cuda(), scale.cuda()
    got_z, want_z = z.clone(), z.clone()
    got = cross_entropy.cross_entropy_grad_(got_z, labels, scale)
    want = reference.cross_entropy_grad_reference(want_z, labels, scale)
    exact_loss, exact_grad = _exact(z.cpu(), labels.cpu(), scale.cpu())
    assert_oracle(got.cpu(), exact_loss, want.cpu(), msg="loss")
    assert_oracle(got_z.cpu(), exact_grad, want_z.cpu(), msg="gradient")


def _sliced(z, labels, scale, cuts, stats, grad_):
    """The loss and gradient of ``z`` computed slice by slice through ``stats`` / ``grad_`` (kernel or reference):
    log-sum-exps combined across slices, then each slice's gradient from the whole row's."""
    lse = torch.full((z.shape[0],), -torch.inf, device=z.device)
    picked = torch.zeros(z.shape[0], device=z.device)
    bounds = list(zip([0, *cuts], [*cuts, z.shape[1]], strict=True))
    for v0, v1 in bounds:
        slice_lse, slice_picked = stats(z[:, v0:v1].clone(), labels, v0)
        lse, picked = torch.logaddexp(lse, slice_lse), picked + slice_picked
    grad = torch.empty_like(z)
    for v0, v1 in bounds:
        part = z[:, v0:v1].clone()  # a copy: a one-row slice view would count as contiguous
        grad_(part, labels, v0, scale, lse)
        grad[:, v0:v1] = part
    return scale * (lse - picked), grad


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("t,v,cuts", [(5, 300, (100, 217)), (9, 1031, (512,)), (1, 70, (1, 69))])
def test_slice_kernels_match_reference_and_the_whole_row(t, v, cuts, dtype):
    z, labels, scale = _data(t, v, dtype, ("slices", t, v, dtype))
    z, labels, scale = z.to(DEVICE), labels.to(DEVICE), scale.to(DEVICE)
    got = _sliced(
        z, labels, scale, cuts, cross_entropy.cross_entropy_slice_stats, cross_entropy.cross_entropy_slice_grad_
    )
    want = _sliced(z, labels, scale, cuts, reference.cross_entropy_slice_stats_reference,
                   reference.cross_entropy_slice_grad_reference)  # fmt: skip
    exact_loss, exact_grad = _exact(z.cpu(), labels.cpu(), scale.cpu())
    assert_oracle(got[0].cpu(), exact_loss, want[0].cpu(), msg=f"sliced loss {dtype}")
    assert_oracle(got[1].cpu(), exact_grad, want[1].cpu(), msg=f"sliced gradient {dtype}")


def test_slice_reference_matches_the_whole_row_reference():
    z, labels, scale = _data(7, 400, torch.float32, ("slice-ref",))
    loss, grad = _sliced(z, labels, scale, (150, 151, 390), reference.cross_entropy_slice_stats_reference,
                         reference.cross_entropy_slice_grad_reference)  # fmt: skip
    whole = z.clone()
    torch.testing.assert_close(loss, reference.cross_entropy_grad_reference(whole, labels, scale))
    torch.testing.assert_close(grad, whole)


def test_every_gpu_launch_is_a_gated_binary():
    # the launcher picks 32 warps while every program is resident at two per SM, else 16; BLOCK_V follows the warps,
    # and 32-warp programs over aligned rows take two loads per lane in the statistics sweep. Each pick, in each
    # launch form and dtype, is a gate case
    cases = cross_entropy.compile_gate_cases()
    assert cross_entropy.ce_warps(130, 132) == 32 and cross_entropy.ce_warps(264, 132) == 32
    assert cross_entropy.ce_warps(265, 132) == 16 and cross_entropy.ce_warps(2048, 108) == 16
    for tokens, sms in itertools.product((1, 130, 216, 217, 264, 265, 2048), (108, 132)):
        warps = cross_entropy.ce_warps(tokens, sms)
        for ty, (stats, grad), grouped in itertools.product(("fp32", "fp16", "bf16"), MODES, (True, False)):
            assert any(
                c.num_warps == warps and c.constexprs["BLOCK_V"] == warps * 32 * 8 and c.signature["z_ptr"] == f"*{ty}"
                and c.constexprs["STATS_LOADS"] == (2 if warps == 32 and grouped else 1)
                and (c.constexprs["STATS"], c.constexprs["GRAD"], c.constexprs["GROUPED"]) == (stats, grad, grouped)
                for c in cases
            ), (tokens, sms, ty, stats, grad, grouped)  # fmt: skip


@pytest.mark.compile_gate
@pytest.mark.parametrize("tokens,floor", [(None, 0.80), (98, 0.80), (64, 0.75)])
def test_loss_chunk_reaches_80_percent_of_hbm_in_the_cost_model(tokens, floor):
    # Llama 3's loss chunk (130 tokens) and shorter last chunks, as the launcher runs them (32 warps, two loads per
    # lane in the statistics sweep). At 16 warps and one load per lane the 130-token chunk was latency-bound at 74 %
    # (8 KB in flight per SM against Little's law's ~12 KB), the 98-token one at 59 %, the 64-token one at 41 %
    from fastpeft.kernels import _perf_launches

    op = _perf_launches.cross_entropy_op(tokens=tokens)
    assert op.hbm_fraction >= floor, (op.name, op.hbm_fraction, op.binding)
    if tokens is None:  # one program on nearly every SM: its loads in flight are the SM's (13.1 of 13.2 KB; was 6.7)
        pred = op.launches[0]
        assert pred.bytes_in_flight_per_sm >= 0.9 * pred.bytes_needed_per_sm, pred
