"""DoRA linear kernels (Triton's interpreter on CPU) against kernels/reference_dora.py: the epilogue, the column
pass, the row-scaled NF4 dequantize, each launcher path of the op forward and backward, the m = 0 case, and that
every launch is a gated binary. bfloat16 dot products are wrong in the interpreter: the dot paths run float32 and
float16 here (bfloat16 on a GPU)."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import INTERPRET, assert_close, assert_oracle, stable_seed

from fastpeft.kernels import _gate, dora_linear, nf4, reference, reference_dora
from fastpeft.kernels import lora_linear as L
from fastpeft.kernels import lora_linear_decode as decode
from fastpeft.kernels.formats import NF4Args

pytestmark = pytest.mark.skipif(not INTERPRET, reason="runs the kernels in Triton's interpreter")


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(stable_seed(*key))


def _rnd(g, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def _nf4(w: torch.Tensor, double_quant: bool) -> NF4Args:
    packed, absmax = reference.nf4_quantize_reference(w, 64)
    if not double_quant:
        return NF4Args(packed, absmax, tuple(w.shape), 64)
    offset = absmax.mean()
    codes, nested = reference.dynamic8_quantize_reference(absmax - offset)
    return NF4Args(packed, codes, tuple(w.shape), 64, nested, offset.reshape(1))


# ----------------------------------------------------------------------------------------------
# the kernels against their twins
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(3, 128), (33, 192)])  # one masked tile; a full 4096-weight tile and a tail
def test_row_scaled_dequantize_matches_reference(dtype, double_quant, shape):
    g = _gen("scaled dequant", dtype, double_quant, shape)
    w = _rnd(g, *shape, scale=0.1)
    q = _nf4(w, double_quant)
    scale = torch.rand(shape[0], generator=g) + 0.5
    kw = {"blocksize": 64, "nested_absmax": q.nested_absmax, "offset": q.offset}
    got = nf4.nf4_dequantize(q.packed, q.absmax, w.numel(), dtype, row_scale=scale, row_len=shape[1], **kw)
    want = reference_dora.nf4_dequantize_scaled_reference(q.packed, q.absmax, w.numel(), dtype, row_scale=scale,
                                                          row_len=shape[1], **kw)  # fmt: skip
    # the kernel folds the row scale into the block scale (one product a row), the twin scales each weight:
    # float32 products in another order, one rounding of the output either way
    assert_close(got, want, msg=f"scaled dequantize {dtype} dq={double_quant} {shape}")
    plain = nf4.nf4_dequantize(q.packed, q.absmax, w.numel(), torch.float32, **kw).view(shape)
    assert not torch.allclose(plain, got.float().view(shape)), "the scale changed nothing: the check proves nothing"


def test_row_scaled_dequantize_refuses_rows_that_are_not_whole_64_weight_groups():
    q = _nf4(torch.randn(4, 96), False)
    with pytest.raises(ValueError, match="row_len"):
        nf4.nf4_dequantize(q.packed, q.absmax, 4 * 96, torch.float16, row_scale=torch.ones(4), row_len=96)
    q = _nf4(torch.randn(4, 128), False)
    with pytest.raises(TypeError, match="row_scale"):
        nf4.nf4_dequantize(q.packed, q.absmax, 4 * 128, row_scale=torch.ones(4, dtype=torch.float16), row_len=128)
    with pytest.raises(ValueError, match="row_scale"):
        nf4.nf4_dequantize(q.packed, q.absmax, 4 * 128, row_scale=torch.ones(3), row_len=128)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m, n, r", [(1, 33, 1), (17, 33, 8), (40, 70, 20)])
@pytest.mark.parametrize("bias", [False, True])
def test_epilogue_matches_reference(dtype, m, n, r, bias):
    g = _gen("epilogue", dtype, m, n, r, bias)
    base, u, b = _rnd(g, m, n, dtype=dtype), _rnd(g, m, r, dtype=dtype), _rnd(g, n, r, dtype=dtype, scale=0.3)
    f = torch.rand(n, generator=g) + 0.5
    bb = _rnd(g, n, dtype=dtype) if bias else None
    want = reference_dora.dora_epilogue_reference(base, f, u, b, 0.7, bb)
    got = dora_linear.dora_epilogue(base.clone(), f, u, b, 0.7, bb)
    assert_close(got, want, msg=f"epilogue {dtype} {m}x{n} r={r} bias={bias}")
    inplace = base.clone()
    assert dora_linear.dora_epilogue(inplace, f, u, b, 0.7, bb, out=inplace) is inplace
    assert_close(inplace, want, msg="epilogue in place")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m, n", [(1, 33), (37, 19), (70, 40)])
@pytest.mark.parametrize("bias, write_gf", [(False, False), (True, True), (True, False)])
def test_column_pass_matches_reference(dtype, m, n, bias, write_gf):
    g = _gen("colsum", dtype, m, n, bias, write_gf)
    dy, y = _rnd(g, m, n, dtype=dtype), _rnd(g, m, n, dtype=dtype)
    f = torch.rand(n, generator=g) + 0.5
    bb = _rnd(g, n, dtype=dtype) if bias else None
    part, gf = dora_linear.dora_colsum(dy, y, bb, f, write_gf)
    want = reference_dora.dora_colsum_reference(dy, y, bb, f, write_gf)
    assert part.shape[:1] == (2,) and part.shape[2] == n, part.shape
    for what, a, b in zip(("sum dY", "sum dY(Y - bias)"), part.sum(1), want[:2], strict=True):
        assert_close(a, b, msg=f"{what} {dtype} {m}x{n}")
    if write_gf:
        assert_close(gf, want[2], msg=f"dY * f {dtype} {m}x{n}")
    else:
        assert gf is None


# ----------------------------------------------------------------------------------------------
# the op's launchers, path by path
# ----------------------------------------------------------------------------------------------

# (name, M, K, N, dtype, base, cuBLAS forced): which launcher path each takes is asserted below
PATHS = [
    ("dense tiled", 17, 70, 33, torch.float32, "dense", False),
    ("dense small-M", 5, 70, 33, torch.float16, "dense", False),
    ("dense cuBLAS", 20, 64, 33, torch.float32, "dense", True),
    ("nf4 scaled scratch, tiled", 17, 128, 33, torch.float32, "nf4dq", False),
    ("nf4 scaled scratch, cuBLAS", 70, 128, 33, torch.float16, "nf4", True),
    ("nf4 in-GEMM decode (K % 64 != 0)", 5, 70, 33, torch.float16, "nf4dq", False),
    ("nf4 unscaled scratch (K % 64 != 0)", 20, 70, 33, torch.float32, "nf4", False),
    ("nf4 decode kernel", 3, 128, 33, torch.float16, "nf4dq", False),
]


def _op_problem(m, k, n, dtype, base, seed_key, r=8, bias=True):
    g = _gen("dora op", *seed_key)
    w = torch.randn(n, k, generator=g) * 0.1
    p = {
        "x": _rnd(g, m, k, dtype=dtype), "bias": _rnd(g, n, dtype=dtype) if bias else None,
        "lora_a": _rnd(g, r, k, dtype=dtype, scale=0.2), "lora_b": _rnd(g, n, r, dtype=dtype, scale=0.2),
        "scaling": 0.75, "magnitude": torch.rand(n, generator=g) + 0.5, "norm": torch.rand(n, generator=g) + 0.5,
    }  # fmt: skip
    p["weight"], p["nf4"] = (w.to(dtype), None) if base == "dense" else (None, _nf4(w, base == "nf4dq"))
    return p, _rnd(g, m, n, dtype=dtype)


def _autograd_formula(p, dy, dtype):
    """``(Y, dX, dA, dB, dbias, dm)`` of ``f ⊙ (X·Wᵀ + s·X·Aᵀ·Bᵀ) + bias`` by torch autograd in ``dtype``, the norm
    a constant (W dequantized in float32 first)."""
    w = p["weight"] if p["nf4"] is None else reference._base_weight(None, p["nf4"], torch.float32)
    x, a, b, bias, mag = (p[key].detach().to(dtype).requires_grad_() for key in ("x", "lora_a", "lora_b", "bias",
                                                                                   "magnitude"))  # fmt: skip
    f = (mag / p["norm"].to(dtype)).to(dtype)
    y = f * (x @ w.to(dtype).t() + p["scaling"] * ((x @ a.t()) @ b.t())) + bias
    y.backward(dy.to(dtype))
    return y.detach(), x.grad, a.grad, b.grad, bias.grad, mag.grad


def _fwd_args(p):
    return (p["x"], p["weight"], p["bias"], p["lora_a"], p["lora_b"], p["scaling"], p["magnitude"], p["norm"])


@pytest.mark.parametrize("name, m, k, n, dtype, base, cublas", PATHS, ids=[p[0] for p in PATHS])
def test_each_path_matches_the_reference_forward_and_backward(monkeypatch, name, m, k, n, dtype, base, cublas):
    if cublas:
        monkeypatch.setattr(L, "cublas_path", lambda m, p, q: True)
    calls = {"epilogue": 0, "scaled": 0}
    epilogue, dequantized = dora_linear.dora_epilogue, L._dequantized

    def spy_epilogue(*args, **kwargs):
        calls["epilogue"] += 1
        return epilogue(*args, **kwargs)

    def spy_dequantized(nf4_args, dt, device, row_scale=None):
        calls["scaled"] += row_scale is not None
        return dequantized(nf4_args, dt, device, row_scale)

    monkeypatch.setattr(dora_linear, "dora_epilogue", spy_epilogue)
    monkeypatch.setattr(L, "_dequantized", spy_dequantized)
    p, dy = _op_problem(m, k, n, dtype, base, (name,))
    y, u = dora_linear.dora_linear_fwd(*_fwd_args(p), nf4=p["nf4"])
    y_ref, u_ref = reference_dora.dora_linear_fwd_reference(*_fwd_args(p), nf4=p["nf4"])
    assert_close(u, u_ref, msg=f"{name}: U")
    if dtype == torch.float32:  # one rounding in both; 16-bit paths round the base first (cuBLAS + epilogue)
        assert_close(y, y_ref, msg=f"{name}: Y")
    decode_path = base != "dense" and decode.decode_supported(p["x"], p["nf4"])
    assert decode_path == (name == "nf4 decode kernel"), f"{name}: decode path {decode_path}"
    scaled_path = not decode_path and base != "dense" and k % 64 == 0 and not L._fuse_nf4(m, dtype)
    assert calls["scaled"] == int(scaled_path), f"{name}: scaled dequantize calls {calls['scaled']}"
    assert calls["epilogue"] == int(not scaled_path and not decode_path), f"{name}: epilogue calls {calls}"
    bwd_kw = {"nf4": p["nf4"], "needs_dbias": True}
    bwd_args = (dy, p["x"], p["weight"], p["bias"], p["lora_a"], p["lora_b"], u_ref, y_ref, p["scaling"],
                p["magnitude"], p["norm"])  # fmt: skip
    colsum = dora_linear.dora_colsum
    monkeypatch.setattr(dora_linear, "dora_colsum", lambda *a: calls.__setitem__("colsum", 1) or colsum(*a))
    got = dora_linear.dora_linear_bwd(*bwd_args, **bwd_kw)
    # dm's and dbias' sums (and G ⊙ f off the scaled scratch) ride along dB's pass: no column pass of their own
    assert calls.get("colsum", 0) == 0, f"{name}: column pass {calls}"
    # oracle rule: against float64 autograd of the formula, at most 2x the error of eager autograd in x's dtype
    # (each path rounds dY ⊙ f, f ⊙ B or f ⊙ W once to x's dtype, as eager's chain rounds its intermediates)
    exact, eager = _autograd_formula(p, dy, torch.float64), _autograd_formula(p, dy, dtype)
    assert_oracle(y, exact[0], eager[0], msg=f"{name}: Y")
    for what, a, e, ea in zip(("dX", "dA", "dB", "dbias", "dm"), got, exact[1:], eager[1:], strict=True):
        assert_oracle(a, e, ea, msg=f"{name}: {what}")
    # B frozen: the column pass gives the sums (and G ⊙ f off the scaled scratch); dX, dA, dbias, dm as with dB
    frozen_b = dora_linear.dora_linear_bwd(*bwd_args, **bwd_kw, needs_db=False)
    assert calls.get("colsum", 0) == 1 and frozen_b[2] is None, f"{name}: column pass {calls}"
    for what, a, b in zip(("dX", "dA"), frozen_b[:2], got[:2], strict=True):
        assert torch.equal(a, b), f"{name}: {what} differs without dB"
    for what, a, b in zip(("dbias", "dm"), frozen_b[3:], got[3:], strict=True):  # other slices: summed apart
        assert_close(a, b, msg=f"{name}: {what} without dB")
    # the gradients that were not asked for are not computed
    none = dora_linear.dora_linear_bwd(*bwd_args, nf4=p["nf4"], needs_dx=False, needs_da=False, needs_db=False,
                                       needs_dm=False)  # fmt: skip
    assert none == (None,) * 5


@pytest.mark.parametrize("name, m, k, n, dtype, base, cublas", PATHS, ids=[p[0] for p in PATHS])
def test_factors_from_the_norm_launch_change_no_bit(monkeypatch, name, m, k, n, dtype, base, cublas):
    """Given ``dora_norm_factors``' F and f ⊙ B, each path computes exactly what it computes forming them itself
    (forward and backward, zero magnitudes included), and forms neither f nor f ⊙ B itself."""
    if cublas:
        monkeypatch.setattr(L, "cublas_path", lambda m, p, q: True)
    p, dy = _op_problem(m, k, n, dtype, base, ("given factors", name))
    p["magnitude"][[1, 7]] = 0.0
    factors, fb = reference_dora.dora_factors_reference(p["norm"], p["magnitude"], p["lora_b"], p["scaling"], dtype)
    plain_y, plain_u = dora_linear.dora_linear_fwd(*_fwd_args(p), nf4=p["nf4"])
    bwd_args = (dy, p["x"], p["weight"], p["bias"], p["lora_a"], p["lora_b"], plain_u, plain_y, p["scaling"],
                p["magnitude"], p["norm"])  # fmt: skip
    plain = dora_linear.dora_linear_bwd(*bwd_args, nf4=p["nf4"], needs_dbias=True)
    formed = []
    for fn in ("_factor", "_scaled_b"):
        real = getattr(dora_linear, fn)
        monkeypatch.setattr(dora_linear, fn, lambda *a, fn=fn, real=real: formed.append(fn) or real(*a))
    given = {"nf4": p["nf4"], "factors": factors, "scaled_b": fb}
    y, u = dora_linear.dora_linear_fwd(*_fwd_args(p), **given)
    grads = dora_linear.dora_linear_bwd(*bwd_args, **given, needs_dbias=True)
    assert torch.equal(y, plain_y) and torch.equal(u, plain_u), f"{name}: forward"
    for what, a, b in zip(("dX", "dA", "dB", "dbias", "dm"), grads, plain, strict=True):
        assert torch.equal(a, b), f"{name}: {what} differs given the factors"
    assert not formed, f"{name}: formed {formed} though given"
    with pytest.raises(ValueError, match="factors must be"):
        dora_linear.dora_linear_fwd(*_fwd_args(p), nf4=p["nf4"], factors=factors[:1], scaled_b=fb)


@pytest.mark.parametrize(("base", "r"), [("dense", 8), ("nf4", 8), ("nf4dq", 20), ("dense", 33)])
def test_zero_magnitude_columns_get_the_gradient_from_recomputed_outputs(monkeypatch, base, r):
    """Where m_n = 0, Y's column is the bias and (Y − bias) / m is 0 / 0: those columns' Y0 is recomputed on the
    device (dense or NF4 rows, ranks past one 16-wide step), and dm equals float64 autograd of the formula there too
    (never a NaN or a silent zero), with no host synchronization in the backward."""
    m, k, n = 17, 128, 300  # three programs of 128 columns; zeros in the first and the last
    p, dy = _op_problem(m, k, n, torch.float32, base, ("zero magnitude", base, r), r=r)
    p["magnitude"][[0, 5, 299]] = 0.0
    y, u = dora_linear.dora_linear_fwd(*_fwd_args(p), nf4=p["nf4"])

    def no_sync(*_):
        raise AssertionError("the DoRA backward asked the host for a device value")

    with monkeypatch.context() as mp:
        mp.setattr(torch.Tensor, "__bool__", no_sync)
        mp.setattr(torch.Tensor, "item", no_sync)
        grads = dora_linear.dora_linear_bwd(dy, p["x"], p["weight"], p["bias"], p["lora_a"], p["lora_b"], u, y,
                                            p["scaling"], p["magnitude"], p["norm"], nf4=p["nf4"],
                                            needs_dbias=True)  # fmt: skip
        dm, dbias = grads[4], grads[3]
    assert_close(dbias, dy.sum(0), msg=f"dbias beside zero magnitudes ({base})")  # fmt: skip
    w = p["weight"] if p["nf4"] is None else reference._base_weight(None, p["nf4"], torch.float32)
    y0 = p["x"].double() @ w.double().t() + p["scaling"] * (u.double() @ p["lora_b"].double().t())
    want = (dy.double() * y0).sum(0) / p["norm"].double()
    assert torch.isfinite(dm).all()
    assert_close(dm, want, msg=f"dm with zero magnitudes ({base})")
    dm_ref = reference_dora.dora_linear_bwd_reference(dy, p["x"], p["weight"], p["bias"], p["lora_a"], p["lora_b"],
                                                      u, y, p["scaling"], p["magnitude"], p["norm"],
                                                      nf4=p["nf4"])[4]  # fmt: skip
    assert_close(dm_ref, want, msg=f"reference dm with zero magnitudes ({base})")


# r = 80: two rank tiles, of which only the first writes dY ⊙ f (N = 20: one column tile, so M is still sliced)
@pytest.mark.parametrize(("dtype", "bias", "r"), [(torch.float32, True, 8), (torch.float16, False, 8),
                                                  (torch.float16, True, 80)])  # fmt: skip
def test_db_pass_sums_y_beside_dy_as_the_column_twin(monkeypatch, dtype, bias, r):
    """dB's weight-gradient pass with Y (HAS_YSUM), and also writing dY ⊙ f (WRITE_XF): dYᵀ·U as LoRA's dB pass
    gives it, its unsummed [2, S, N] partials sum to ``dora_colsum_reference``'s Σ dY and Σ dY ⊙ (Y − bias), dY ⊙ f
    is its twin's, and each launch is a gated binary."""
    from test_gate_coverage import _mismatch, _Recorder

    from fastpeft.kernels import lora_linear_wgrad as wg
    from fastpeft.kernels.lora_linear_wgrad import _wgrad

    g = _gen("db pass with y", str(dtype), bias, r)
    m, n = 70, 40 if r <= 64 else 20
    dy, y, u = _rnd(g, m, n, dtype=dtype), _rnd(g, m, n, dtype=dtype), _rnd(g, m, r, dtype=dtype)
    bb = _rnd(g, n, dtype=dtype) if bias else None
    keep = L._keep(None, dy.device)
    f = torch.rand(n, generator=g) + 0.5
    gf = torch.full_like(dy, float("nan"))
    grad_b, part = _wgrad(dy, u, keep, colsum=True, maskable=False, y=y, bias=bb)
    grad_f, part_f = _wgrad(dy, u, keep, colsum=True, maskable=False, y=y, bias=bb, scale_into=(f, gf))
    plain, _ = _wgrad(dy, u, keep, colsum=False, maskable=False)
    want = reference_dora.dora_colsum_reference(dy, y, bb, f, True)
    assert part.shape[0] == 2 and part.shape[1] > 1 and part.shape[2] == n, part.shape  # several slices
    assert torch.equal(grad_b, plain) and torch.equal(grad_f, plain), "Y's sums or dY ⊙ f changed dB's product"
    assert torch.equal(part_f, part), "writing dY ⊙ f changed the sums"
    for what, a, b in zip(("sum dY", "sum dY(Y - bias)"), part.sum(1), want[:2], strict=True):
        assert_close(a, b, msg=f"{what} {dtype} bias={bias}")
    assert_close(gf, want[2], msg=f"dY * f {dtype} bias={bias}")  # every element written (no NaN left)
    rec = _Recorder("_lora_wgrad_kernel", wg._lora_wgrad_kernel)  # records the launches, runs nothing
    monkeypatch.setattr(wg, "_lora_wgrad_kernel", rec)
    _wgrad(dy, u, keep, colsum=True, maskable=False, y=y, bias=bb)
    _wgrad(dy, u, keep, colsum=True, maskable=False, y=y, bias=bb, scale_into=(f, gf))
    cases = [c for c in _gate.all_cases() if c.name.startswith("lora_wgrad_dB_dora[")]
    for launch in rec.launches:
        reasons = [_mismatch(c, launch) for c in cases]
        assert cases and not all(reasons), min(reasons, key=len)


DM_CASES = [("dense", torch.float32, 8), ("nf4", torch.float16, 20), ("nf4dq", torch.float32, 33),
            ("dense", torch.bfloat16, 4)]  # fmt: skip


@pytest.mark.parametrize(("base", "dtype", "r"), DM_CASES)
def test_dm_kernel_matches_its_twin(base, dtype, r):
    """``dora_dm`` on three slices of partials against ``dora_dm_reference``: dbias in dy's dtype, dm = Σ / m, and
    zero-magnitude columns recomputed (dense and NF4 rows, ranks past one 16-wide step, a strided dY)."""
    m, k, n = 13, 128, 150
    p, dy = _op_problem(m, k, n, torch.float32, base, ("dm twin", base, str(dtype), r), r=r)
    g = _gen("dm twin parts", base, r)
    p["magnitude"][[2, 149]] = 0.0
    part = torch.randn(2, 3, n, generator=g)
    dy_t = dy.to(dtype).t().contiguous().t()  # [M, N] with strides (1, M)
    x, u, b = p["x"].to(dtype), _rnd(g, m, r, dtype=dtype), p["lora_b"].to(dtype)
    weight = None if p["weight"] is None else p["weight"].to(dtype)
    args = (dy_t, x, weight, p["nf4"], b, u, p["scaling"], p["magnitude"], p["norm"])
    dbias, dm = dora_linear.dora_dm(part, True, *args)
    want_bias, want_dm = reference_dora.dora_dm_reference(part, True, *args)
    assert dbias.dtype == dtype and dm.dtype == torch.float32
    assert_close(dbias, want_bias, msg=f"dbias {base} {dtype}")
    assert_close(dm, want_dm, msg=f"dm {base} {dtype} r={r}")
    assert bool(want_dm[[2, 149]].abs().min() > 0), "the zero columns' dm is 0: the check would prove nothing"
    assert dora_linear.dora_dm(part, False, *args)[0] is None


def test_launchers_refuse_bad_dora_arguments():
    p, _ = _op_problem(5, 70, 33, torch.float32, "dense", ("refuse",))
    with pytest.raises(TypeError, match="norm"):
        dora_linear.dora_linear_fwd(*_fwd_args({**p, "norm": p["norm"].half()}))
    with pytest.raises(ValueError, match="magnitude"):
        dora_linear.dora_linear_fwd(*_fwd_args({**p, "magnitude": p["magnitude"][:5]}))
    with pytest.raises(TypeError, match="magnitude"):
        dora_linear.dora_linear_fwd(*_fwd_args({**p, "magnitude": torch.ones(33, dtype=torch.int64)}))


# ----------------------------------------------------------------------------------------------
# every launch is a gated binary
# ----------------------------------------------------------------------------------------------

KERNELS = {
    dora_linear: ["_dora_epilogue_kernel", "_dora_colsum_kernel", "_dora_dm_kernel"],
    nf4: ["_nf4_dequantize_scaled_kernel"],
}
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.uint8: "u8"}
TILE_KEYS = {"BLOCK_M", "BLOCK_N", "BLOCK", "num_warps", "num_stages"}


def test_every_dora_launch_is_a_gated_binary(monkeypatch):
    from test_gate_coverage import _mismatch, _Recorder

    recs = {}
    for module, names in KERNELS.items():
        for name in names:
            recs[name] = _Recorder(name, getattr(module, name))
            monkeypatch.setattr(module, name, recs[name])
    for dtype, bias, write_gf in itertools.product((torch.float32, torch.float16, torch.bfloat16), (0, 1), (0, 1)):
        base, u, b = torch.zeros(5, 33, dtype=dtype), torch.zeros(5, 8, dtype=dtype), torch.zeros(33, 8, dtype=dtype)
        bb = torch.zeros(33, dtype=dtype) if bias else None
        dora_linear.dora_epilogue(base, torch.ones(33), u, b, 0.5, bb, out=base)
        dora_linear.dora_colsum(base, base, bb, torch.ones(33), bool(write_gf))
        for double_quant in (False, True):
            q = _nf4(torch.randn(3, 128), double_quant)
            nf4.nf4_dequantize(q.packed, q.absmax, 3 * 128, dtype, nested_absmax=q.nested_absmax, offset=q.offset,
                               row_scale=torch.ones(3), row_len=128)  # fmt: skip
        if not bias and not write_gf:  # the zero-magnitude pass: dense and NF4 bases (a zero m makes it work)
            x, g, m = torch.zeros(5, 128, dtype=dtype), torch.zeros(5, 3, dtype=dtype), torch.tensor([1.0, 0.0, 1.0])
            u3, b3 = torch.zeros(5, 8, dtype=dtype), torch.zeros(3, 8, dtype=dtype)
            for base_w, q in ((torch.zeros(3, 128, dtype=dtype), None), (None, _nf4(torch.randn(3, 128), False)),
                              (None, _nf4(torch.randn(3, 128), True))):  # fmt: skip
                for dbias in (False, True):
                    part = torch.zeros(2, 2, 3)
                    dora_linear.dora_dm(part, dbias, g, x, base_w, q, b3, u3, 0.5, m, torch.ones(3))
    cases: dict[str, list[_gate.GateCase]] = {}
    for case in _gate.all_cases():
        cases.setdefault(case.kernel, []).append(case)
    problems = set()
    for name, rec in recs.items():
        assert rec.launches, f"{name}: never launched"
        for launch in rec.launches:
            reasons = [_mismatch(c, launch) for c in cases.get(name, [])]
            if not reasons or all(reasons):
                problems.add(f"{name}: {min(reasons, key=len) if reasons else 'no gate case at all'}")
    assert not problems, "launches the compile gate does not cover:\n" + "\n".join(sorted(problems))
