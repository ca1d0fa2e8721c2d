"""DoRA's one-launch row norm (``kernels/dora_norm.py``) against ``dora_row_norm_reference`` (interpreter), and its
launches are gated binaries."""

from __future__ import annotations

import pytest
import torch
from conftest import INTERPRET, assert_oracle, stable_seed

from fastpeft.kernels import _gate, dora_norm, reference

pytestmark = pytest.mark.skipif(not INTERPRET, reason="runs the kernel in Triton's interpreter")


def _operands(n: int, k: int, r: int, awt_dtype: torch.dtype, g: torch.Generator):
    w = torch.randn(n, k, generator=g) * 0.1
    a = torch.randn(r, k, generator=g) * 0.2
    b = torch.randn(n, r, generator=g) * 0.3
    return (w * w).sum(1), (a @ w.t()).to(awt_dtype), a, b, w


@pytest.mark.parametrize(
    ("n", "k", "r", "awt_dtype"),
    [(130, 96, 4, torch.float32), (64, 128, 16, torch.float32), (257, 200, 20, torch.bfloat16),
     (33, 64, 32, torch.float32), (5, 70, 1, torch.bfloat16)],
)  # fmt: skip
def test_norm_matches_the_reference(n, k, r, awt_dtype):
    g = torch.Generator().manual_seed(stable_seed("dora norm", n, k, r, str(awt_dtype)))
    wsq, awt, a, b, w = _operands(n, k, r, awt_dtype, g)
    s = 1.7
    got = dora_norm.dora_row_norm_fwd(wsq, awt, a, b, s)
    exact = torch.linalg.vector_norm(w.double() + s * b.double() @ a.double(), dim=1)
    eager = reference.dora_row_norm_reference(wsq, awt, a, b, s)
    assert got.shape == (n,) and got.dtype == torch.float32
    assert_oracle(got, exact, eager, msg=f"N={n} K={k} R={r} {awt_dtype}")


def test_a_row_of_zero_norm_is_clamped_not_nan():
    # W_0 = -s·B_0·A exactly in the low-rank terms: the squared sum rounds to about 0, possibly below it
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(4, 64, generator=g), torch.randn(8, 4, generator=g)
    w = -0.5 * b @ a
    wsq, awt = (w * w).sum(1), a @ w.t()
    got = dora_norm.dora_row_norm_fwd(wsq, awt, a, b, 0.5)
    assert torch.isfinite(got).all() and (got >= 0).all() and float(got.max()) < 1e-2, got


def test_a_strided_a_w_t_is_read_through_its_strides():
    g = torch.Generator().manual_seed(4)
    wsq, awt, a, b, _ = _operands(50, 64, 8, torch.float32, g)
    t = awt.t().contiguous().t()  # [R, N] with strides (1, R)
    torch.testing.assert_close(dora_norm.dora_row_norm_fwd(wsq, t, a, b, 2.0),
                               dora_norm.dora_row_norm_fwd(wsq, awt, a, b, 2.0))  # fmt: skip


def test_ranks_past_r_max_keep_the_torch_form():
    a = torch.zeros(dora_norm.R_MAX + 1, 64)
    assert dora_norm.supported(a[: dora_norm.R_MAX]) and not dora_norm.supported(a)


def test_every_norm_launch_is_a_gated_binary(monkeypatch):
    from test_gate_coverage import _mismatch, _Recorder

    rec = _Recorder("_dora_norm_kernel", dora_norm._dora_norm_kernel)
    monkeypatch.setattr(dora_norm, "_dora_norm_kernel", rec)
    g = torch.Generator().manual_seed(5)
    for r, awt_dtype in ((4, torch.float32), (20, torch.bfloat16), (32, torch.float32), (16, torch.bfloat16)):
        wsq, awt, a, b, _ = _operands(40, 64, r, awt_dtype, g)
        dora_norm.dora_row_norm_fwd(wsq, awt, a, b, 1.0)
        op_dtype = torch.float16 if r == 4 else awt_dtype  # a float32 dense base under a 16-bit op, and the rest
        dora_norm.dora_norm_factors_fwd(wsq, awt, a, b, 1.0, torch.ones(40), op_dtype)
    cases = [c for c in _gate.all_cases() if c.kernel == "_dora_norm_kernel"]
    assert rec.launches and cases
    problems = {
        min(reasons, key=len) for launch in rec.launches if all(reasons := [_mismatch(c, launch) for c in cases])
    }
    assert not problems, problems


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("n", "r"), [(130, 4), (257, 20), (33, 32)])
def test_factors_equal_the_reference_bit_for_bit(n, r, dtype):
    """The factors launch: the same norm as the plain launch, and f = m / norm, s·f and f ⊙ B (B rounded to
    the op's dtype first) exactly as ``dora_factors_reference`` forms them from that norm, zero magnitudes too."""
    from fastpeft.kernels import reference_dora

    g = torch.Generator().manual_seed(stable_seed("dora factors", n, r, str(dtype)))
    wsq, awt, a, b, _ = _operands(n, 64, r, torch.float32, g)
    mag = torch.rand(n, generator=g) + 0.5
    mag[[0, n // 2]] = 0.0
    s = 1.3
    norm, factors, fb = dora_norm.dora_norm_factors_fwd(wsq, awt.to(dtype), a, b, s, mag, dtype)
    assert torch.equal(norm, dora_norm.dora_row_norm_fwd(wsq, awt.to(dtype), a, b, s))
    want_f, want_fb = reference_dora.dora_factors_reference(norm, mag, b, s, dtype)
    assert factors.shape == (2, n) and fb.dtype == dtype and fb.shape == (n, r)
    assert torch.equal(factors, want_f), (factors - want_f).abs().max()
    if dtype == torch.bfloat16:
        # Triton's interpreter rounds float32 to bfloat16 toward zero (a GPU and torch round to nearest): an ulp
        # for the cast of B and one for that of the product
        torch.testing.assert_close(fb.float(), want_fb.float(), rtol=2.0**-6, atol=0.0)
    else:
        assert torch.equal(fb, want_fb), (fb.float() - want_fb.float()).abs().max()
    assert factors[0, 0] == 0 and factors[1, 0] == 0  # a zero magnitude: f = 0
