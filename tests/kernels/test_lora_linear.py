"""Fused LoRA / QLoRA linear kernels (Triton's interpreter on CPU) against kernels/reference.py.

Matmul results follow the oracle rule (conftest.assert_oracle): the kernel's error against a float64
evaluation of the reference is at most 2x the error of eager torch at the same precision, eager being
the unfused chain a user would write (``F.linear`` for the base, two more for LoRA, NF4 dequantized to
the input dtype first). bfloat16 dot products are wrong in the interpreter, so bfloat16 runs on a GPU only.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, assert_oracle, stable_seed

from fastpeft.kernels import lora_linear as L
from fastpeft.kernels import lora_linear_kernels as K
from fastpeft.kernels import reference
from fastpeft.kernels.formats import NF4Args

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
W_KINDS = ["dense", "nf4", "nf4dq"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _problem(m, k, n, r, dtype, w_kind, *, bias=True, p=0.0, seed=0, blocksize=64, device=DEVICE):
    """Random operands of one call; the NF4 base is quantized from a random dense weight."""
    g = _gen(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(shape, generator=g) * scale).to(device=device, dtype=dtype)

    w = torch.randn((n, k), generator=g) * 0.1
    prob = {
        "x": rnd(m, k),
        "bias": rnd(n) if bias else None,
        "lora_a": rnd(r, k, scale=0.2),
        "lora_b": rnd(n, r, scale=0.2),
        "scaling": float(0.5 + torch.rand((), generator=g)),
        "dy": rnd(m, n),
        "dropout_mask": (torch.rand((m, k), generator=g) >= p).to(device) if p > 0 else None,
        "dropout_p": p,
        "weight": w.to(device=device, dtype=dtype),
        "nf4": None,
    }
    if w_kind != "dense":
        packed, absmax = reference.nf4_quantize_reference(w, blocksize)
        kw = {}
        if w_kind == "nf4dq":
            offset = absmax.mean()
            absmax, nested = reference.dynamic8_quantize_reference(absmax - offset)
            kw = {"nested_absmax": nested.to(device), "offset": offset.reshape(1).to(device)}
        prob["nf4"] = NF4Args(packed.to(device), absmax.to(device), (n, k), blocksize, **kw)
        prob["weight"] = None
    return prob


def _dense_w(prob, dtype) -> torch.Tensor:
    """The base weight as eager torch holds it: dense, or NF4 dequantized to ``dtype``."""
    if prob["nf4"] is None:
        return prob["weight"].to(dtype)
    nf4 = prob["nf4"]
    n, k = nf4.shape
    flat = reference.nf4_dequantize_reference(
        nf4.packed, nf4.absmax, n * k, torch.float32, blocksize=nf4.blocksize,
        nested_absmax=nf4.nested_absmax, offset=nf4.offset,
    )  # fmt: skip
    return flat.view(n, k).to(dtype)


def _as(t, dtype):
    return None if t is None else t.to(dtype)


def _fwd_kwargs(prob):
    return {"nf4": prob["nf4"], "dropout_mask": prob["dropout_mask"], "dropout_p": prob["dropout_p"]}


def _fwd_args(prob, dtype=None):
    names = ("x", "weight", "bias", "lora_a", "lora_b")
    return [prob[a] if dtype is None else _as(prob[a], dtype) for a in names] + [prob["scaling"]]


def _drop(x, prob):
    mask = prob["dropout_mask"]
    return x if mask is None else x * mask.to(x.dtype) / (1 - prob["dropout_p"])


def _eager_fwd(prob):
    """The unfused chain in the inputs' own dtype."""
    x, w = prob["x"], _dense_w(prob, prob["x"].dtype)
    u = F.linear(_drop(x, prob), prob["lora_a"])
    return F.linear(x, w, prob["bias"]) + prob["scaling"] * F.linear(u, prob["lora_b"]), u


def _eager_bwd(prob, u):
    dy, x, s = prob["dy"], prob["x"], prob["scaling"]
    w = _dense_w(prob, x.dtype)
    g = dy @ prob["lora_b"]
    dx = dy @ w + s * _drop(g @ prob["lora_a"], prob)
    return dx, s * (g.t() @ _drop(x, prob)), s * (dy.t() @ u), dy.sum(0)


def _exact_fwd(prob):
    args = _fwd_args(prob, torch.float64)
    return reference.lora_linear_fwd_reference(*args, **_fwd_kwargs(prob))


def _bwd_args(prob, u, dtype=None):
    tensors = [prob["dy"], prob["x"], prob["weight"], prob["lora_a"], prob["lora_b"], u]
    return [t if dtype is None else _as(t, dtype) for t in tensors] + [prob["scaling"]]


def _check_fwd(prob, where: str):
    y, u = L.lora_linear_fwd(*_fwd_args(prob), **_fwd_kwargs(prob))
    m, n, r = prob["x"].shape[0], prob["lora_b"].shape[0], prob["lora_a"].shape[0]
    assert y.shape == (m, n) and u.shape == (m, r), (y.shape, u.shape)
    assert y.dtype == u.dtype == prob["x"].dtype
    exact_y, exact_u = _exact_fwd(prob)
    eager_y, eager_u = _eager_fwd(prob)
    assert_oracle(u, exact_u, eager_u, msg=f"{where}: u")
    assert_oracle(y, exact_y, eager_y, msg=f"{where}: y")
    return y, u


def _check_bwd(prob, u, where: str, **needs):
    flags = {"needs_dx": True, "needs_da": True, "needs_db": True, "needs_dbias": True, **needs}
    got = L.lora_linear_bwd(*_bwd_args(prob, u), **_fwd_kwargs(prob), **flags)
    exact = reference.lora_linear_bwd_reference(*_bwd_args(prob, u, torch.float64), **_fwd_kwargs(prob), **flags)
    eager = _eager_bwd(prob, u)
    like = (prob["x"], prob["lora_a"], prob["lora_b"], prob["dy"][0])
    for name, flag, t, ex, ea, ref in zip(
        ("dx", "da", "db", "dbias"), flags.values(), got, exact, eager, like, strict=True
    ):
        if not flag:
            assert t is None, f"{where}: {name} was not asked for but came back"
            continue
        assert t is not None and t.shape == ref.shape and t.dtype == ref.dtype, f"{where}: {name} {t}"
        assert_oracle(t, ex, ea, msg=f"{where}: {name}")
    return got


# ----------------------------------------------------------------------------------------------
# forward and backward against the oracle
# ----------------------------------------------------------------------------------------------

# (M, K, N, R): M on both sides of SMALL_M_MAX, K and N never multiples of a tile or of 64
SHAPES = [(1, 96, 80, 8), (17, 130, 67, 16), (257, 96, 80, 1), (40, 70, 33, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("w_kind", W_KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_backward_match_oracle(shape, w_kind, dtype):
    m, k, n, r = shape
    seed = stable_seed(shape, w_kind, str(dtype))
    # alternate bias and dropout across the grid so every combination occurs
    bias, p = {0: (True, 0.0), 1: (False, 0.25), 2: (True, 0.1), 3: (False, 0.0)}[SHAPES.index(shape)]
    prob = _problem(m, k, n, r, dtype, w_kind, bias=bias, p=p, seed=seed)
    where = f"M={m} K={k} N={n} R={r} {w_kind} {dtype} bias={bias} p={p}"
    _, u = _check_fwd(prob, where)
    _check_bwd(prob, u, where)


@pytest.mark.parametrize("w_kind", W_KINDS)
def test_rank_above_one_epilogue_tile(w_kind):
    # R = 80: the epilogue loops over two BLOCK_R = 64 chunks; the skinny kernels tile R in the grid
    prob = _problem(20, 70, 33, 80, torch.float32, w_kind, p=0.2, seed=5)
    _, u = _check_fwd(prob, f"R=80 {w_kind}")
    _check_bwd(prob, u, f"R=80 {w_kind}")


def test_nf4_blocksize_128():
    # lines of the flat weight straddle 128-element blocks at other places than 64-element ones
    prob = _problem(19, 200, 45, 8, torch.float32, "nf4dq", seed=7, blocksize=128)
    _, u = _check_fwd(prob, "blocksize 128")
    _check_bwd(prob, u, "blocksize 128")


def test_strided_inputs():
    # x a column slice, lora_a and the weight transposed views: the launchers pass strides, no copies
    prob = _problem(23, 70, 41, 8, torch.float32, "dense", seed=9)
    g = _gen(10)
    wide = torch.randn(23, 100, generator=g).to(DEVICE)
    prob["x"] = wide[:, 10:80]
    prob["weight"] = prob["weight"].t().contiguous().t()
    prob["lora_a"] = prob["lora_a"].t().contiguous().t()
    assert not prob["x"].is_contiguous() and not prob["weight"].is_contiguous()
    _, u = _check_fwd(prob, "strided")
    _check_bwd(prob, u, "strided")


# ----------------------------------------------------------------------------------------------
# dispatch: both paths, split-K, needs_* flags
# ----------------------------------------------------------------------------------------------


class _Spy:
    """Wraps a jit function: records the grid and constexprs of every launch (and the tensor arguments'
    dtypes, the pointer types of the compiled signature), then runs it."""

    def __init__(self, fn):
        self.fn, self.launches, self.arg_dtypes = fn, [], []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, kwargs))
            self.arg_dtypes.append(tuple(a.dtype if isinstance(a, torch.Tensor) else None for a in args))
            return self.fn[grid](*args, **kwargs)

        return launch


@pytest.mark.skipif(DEVICE == "cuda", reason="inspects the interpreter's fixed configurations")
@pytest.mark.parametrize("path", ["small", "tiled"])
@pytest.mark.parametrize("m", [3, 40])
def test_both_dispatch_paths(monkeypatch, path, m):
    # the threshold moved either way, so each M runs each path; the result must not depend on it
    monkeypatch.setattr(L, "SMALL_M_MAX", 10_000 if path == "small" else 0)
    spy = _Spy(L._lora_gemm_kernel)
    monkeypatch.setattr(L, "_lora_gemm_kernel", spy)
    prob = _problem(m, 130, 67, 16, torch.float16, "nf4dq", p=0.3, seed=m)
    _, u = _check_fwd(prob, f"{path} path, M={m}")
    _check_bwd(prob, u, f"{path} path, M={m}", needs_da=False, needs_db=False, needs_dbias=False)
    assert len(spy.launches) == 2, spy.launches  # Y and dX
    for _grid, kwargs in spy.launches:
        assert kwargs["ATOMIC_OUT"] == (path == "small"), kwargs
        assert kwargs["BLOCK_M"] == (16 if path == "small" else L._INTERPRET_TILED["BLOCK_M"])


@pytest.mark.skipif(DEVICE == "cuda", reason="patches the interpreter's fixed configurations")
@pytest.mark.parametrize("split_k", [1, 2, 5])
def test_split_k_counts(monkeypatch, split_k):
    monkeypatch.setitem(L._INTERPRET_SMALL, "split_k", split_k)
    prob = _problem(5, 200, 50, 4, torch.float32, "nf4", seed=split_k)
    _, u = _check_fwd(prob, f"split_k={split_k}")
    _check_bwd(prob, u, f"split_k={split_k}", needs_da=False, needs_db=False)


@pytest.mark.skipif(DEVICE == "cuda", reason="patches the interpreter's fixed configurations")
@pytest.mark.parametrize("tile", [(64, 128), (128, 32)], ids=["16x64x128", "16x128x32"])
def test_nf4_small_tiles_of_every_triton(monkeypatch, tile):
    # the NF4 small-M tile depends on the installed Triton (16x128x32 below 3.7, see _NF4_SMALL_TILE): both
    # run here on any Triton, forward and dX, with double quantization and a K that no tile divides
    assert K._NF4_SMALL_TILE in ((64, 128), (128, 32))
    monkeypatch.setitem(L._INTERPRET_SMALL, "BLOCK_P", tile[0])
    monkeypatch.setitem(L._INTERPRET_SMALL, "BLOCK_Q", tile[1])
    prob = _problem(3, 300, 150, 8, torch.float16, "nf4dq", p=0.2, seed=tile[1])
    _, u = _check_fwd(prob, f"NF4 small tile {tile}")
    _check_bwd(prob, u, f"NF4 small tile {tile}", needs_da=False, needs_db=False)


def test_large_scaling_with_dropout_within_oracle():
    # the scale multiplies L before its 16-bit rounding: a large one (rsLoRA's alpha / sqrt(r) with alpha = 128)
    # and a dropout mask on the LoRA term alone, on both paths, stay within the oracle
    for m in (3, 40):
        prob = _problem(m, 70, 33, 64, torch.float16, "dense", p=0.3, seed=20 + m)
        prob["scaling"] = 16.0
        _, u = _check_fwd(prob, f"scaling 16, M={m}")
        _check_bwd(prob, u, f"scaling 16, M={m}")


def _tiled_named_args(m: int, k: int, n: int, dtype=torch.float16, misalign: bool = False) -> dict:
    """What the tiled autotuner's prune sees for contiguous X [M, K], W [N, K] and Y [M, N] (forward)."""

    def buf(numel: int) -> torch.Tensor:
        return torch.empty(numel + 8, dtype=dtype)[int(misalign) : int(misalign) + numel]

    return {
        "in_ptr": buf(m * k), "w_ptr": buf(n * k), "out_ptr": buf(m * n), "M": m,
        "stride_im": k, "stride_iq": 1, "stride_wq": 1, "stride_wp": k, "stride_om": n, "stride_op": 1,
    }  # fmt: skip


def test_tiled_configs_follow_row_alignment():
    # 16-byte rows take the aligned tiles (the 128-row one only past 64 rows); a stride off a multiple of 8
    # elements or an unaligned pointer takes the one tile whose scalar loads fit in registers
    configs = K.gemm_configs(torch.bfloat16, small=False)
    aligned = K._prune_tiled(configs, _tiled_named_args(8192, 4096, 4096))
    assert aligned and all(c is not K._TILED_UNALIGNED for c in aligned), aligned
    assert [c.kwargs["BLOCK_M"] for c in K._prune_tiled(configs, _tiled_named_args(40, 4096, 4096))] == [64]
    unaligned = {
        "K = 4095": _tiled_named_args(1000, 4095, 4096),
        "N = 4097": _tiled_named_args(1000, 4096, 4097),
        "pointer + 2 bytes": _tiled_named_args(1000, 4096, 4096, misalign=True),
    }
    for what, args in unaligned.items():
        assert K._prune_tiled(configs, args) == [K._TILED_UNALIGNED], what
    # float32 has one tile for every alignment
    fp32 = K.gemm_configs(torch.float32, small=False)
    assert K._prune_tiled(fp32, _tiled_named_args(1000, 4095, 4097, torch.float32)) == fp32


def test_small_configs_by_weight_kind():
    # NF4 runs the split-K tile with a shallower pipeline than dense W (it is issue-bound on the decode, and
    # every stage holds packed bytes in registers); each kind keeps every split count up to the BLOCK_Q steps
    configs = K.gemm_configs(torch.float16, small=True)
    kept = {kind: K._prune_small(configs, {"Q": 4096}, W_KIND=kind) for kind in (K._W_DENSE, K._W_NF4, K._W_NF4_DQ)}
    stages = {kind: {c.num_stages for c in cfgs} for kind, cfgs in kept.items()}
    assert all(len(s) == 1 for s in stages.values()), stages
    assert stages[K._W_NF4] == stages[K._W_NF4_DQ] and max(stages[K._W_NF4]) < min(stages[K._W_DENSE]), stages
    for kind, cfgs in kept.items():
        assert sorted(c.kwargs["split_k"] for c in cfgs) == [1, 2, 4, 8, 16], kind
    steps = -(-300 // configs[0].kwargs["BLOCK_Q"])
    assert all(c.kwargs["split_k"] <= steps for c in K._prune_small(configs, {"Q": 300}, W_KIND=K._W_DENSE))


@pytest.mark.parametrize(
    "needs",
    [
        {"needs_dx": False},
        {"needs_da": False, "needs_db": False},
        {"needs_dx": False, "needs_da": False, "needs_dbias": False},
        {"needs_dx": False, "needs_da": False, "needs_db": False},  # dbias alone
    ],
    ids=lambda d: ",".join(k for k in d),
)
def test_needs_flags_skip_work(needs):
    prob = _problem(18, 70, 33, 8, torch.float32, "nf4", p=0.2, seed=11)
    u = L.lora_linear_fwd(*_fwd_args(prob), **_fwd_kwargs(prob))[1]
    _check_bwd(prob, u, f"needs {needs}", **needs)


def test_dropout_mask_uint8_equals_bool():
    prob = _problem(9, 70, 33, 8, torch.float32, "dense", p=0.4, seed=12)
    y_bool, u_bool = L.lora_linear_fwd(*_fwd_args(prob), **_fwd_kwargs(prob))
    prob["dropout_mask"] = prob["dropout_mask"].to(torch.uint8)
    y_u8, u_u8 = L.lora_linear_fwd(*_fwd_args(prob), **_fwd_kwargs(prob))
    assert torch.equal(y_bool, y_u8) and torch.equal(u_bool, u_u8)


def test_same_contract_as_reference():
    prob = _problem(6, 70, 33, 8, torch.float16, "nf4dq", p=0.2, seed=13)
    y, u = L.lora_linear_fwd(*_fwd_args(prob), **_fwd_kwargs(prob))
    ref_y, ref_u = reference.lora_linear_fwd_reference(*_fwd_args(prob), **_fwd_kwargs(prob))
    assert (y.shape, y.dtype, u.shape, u.dtype) == (ref_y.shape, ref_y.dtype, ref_u.shape, ref_u.dtype)
    # U has no dequantized operand: both sides sum exact fp16 products in float32
    assert_close(u, ref_u, msg="u, kernel vs reference")


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------


def test_launchers_reject_bad_input():
    prob = _problem(4, 70, 33, 8, torch.float32, "dense", seed=14)
    args, kw = _fwd_args(prob), _fwd_kwargs(prob)
    with pytest.raises(ValueError, match="x must be a non-empty"):
        L.lora_linear_fwd(prob["x"][0], *args[1:], **kw)
    with pytest.raises(TypeError, match="x must be float32"):
        L.lora_linear_fwd(prob["x"].double(), *args[1:], **kw)
    with pytest.raises(TypeError, match="lora_b must have x's dtype"):
        L.lora_linear_fwd(*args[:4], prob["lora_b"].half(), args[5], **kw)
    with pytest.raises(ValueError, match="lora_b must have shape"):
        L.lora_linear_fwd(*args[:4], prob["lora_b"][:, :4], args[5], **kw)
    with pytest.raises(ValueError, match="bias must have shape"):
        L.lora_linear_fwd(args[0], args[1], prob["bias"][:5], *args[3:], **kw)
    with pytest.raises(ValueError, match="exactly one of weight"):
        L.lora_linear_fwd(args[0], None, *args[2:], **kw)
    with pytest.raises(ValueError, match="dropout_mask must be"):
        L.lora_linear_fwd(*args, dropout_mask=torch.ones(3, 70, dtype=torch.bool), dropout_p=0.1)
    with pytest.raises(TypeError, match="dropout_mask must be a bool or uint8"):
        L.lora_linear_fwd(*args, dropout_mask=torch.ones(4, 70), dropout_p=0.1)
    nf4 = _problem(4, 70, 33, 8, torch.float32, "nf4", seed=15)["nf4"]
    with pytest.raises(ValueError, match="nf4.shape"):
        L.lora_linear_fwd(args[0], None, *args[2:], nf4=nf4._replace(shape=(33, 71)))
    with pytest.raises(ValueError, match="packed has"):
        L.lora_linear_fwd(args[0], None, *args[2:], nf4=nf4._replace(packed=nf4.packed[:-1]))
    u = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="dy must have shape"):
        L.lora_linear_bwd(prob["dy"][:, :5], prob["x"], prob["weight"], prob["lora_a"], prob["lora_b"], u, 1.0)
    with pytest.raises(ValueError, match="u must have shape"):
        L.lora_linear_bwd(prob["dy"], prob["x"], prob["weight"], prob["lora_a"], prob["lora_b"], u[:, :3], 1.0)


# ----------------------------------------------------------------------------------------------
# CUDA: bfloat16 (the interpreter cannot check bf16 dot products) and the autotuned configs
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("w_kind", W_KINDS)
@pytest.mark.parametrize("m", [1, 16, 17, 300, 2049])
def test_cuda_bf16_matches_oracle(w_kind, m):
    prob = _problem(m, 4096 // 4 + 64 + 3, 1024 // 4 + 3, 16, torch.bfloat16, w_kind, p=0.1, seed=m, device="cuda")
    _, u = _check_fwd(prob, f"cuda bf16 M={m} {w_kind}")
    _check_bwd(prob, u, f"cuda bf16 M={m} {w_kind}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_other_dtypes(dtype):
    prob = _problem(129, 1000, 700, 16, dtype, "nf4dq", p=0.1, seed=3, device="cuda")
    _, u = _check_fwd(prob, f"cuda {dtype}")
    _check_bwd(prob, u, f"cuda {dtype}")


# ----------------------------------------------------------------------------------------------
# the base-only NF4 linear: nf4_linear_fwd / nf4_linear_bwd_dx (the same GEMM with R = 0)
# ----------------------------------------------------------------------------------------------


def _check_nf4_linear(prob, where: str) -> None:
    """Y and dX of the base-only launchers against the oracle (eager: NF4 dequantized to x's dtype, F.linear)."""
    x, bias, dy, nf4 = prob["x"], prob["bias"], prob["dy"], prob["nf4"]
    m, n = dy.shape
    w = _dense_w(prob, x.dtype)
    y = L.nf4_linear_fwd(x, bias, nf4)
    assert y.shape == (m, n) and y.dtype == x.dtype, f"{where}: y {tuple(y.shape)} {y.dtype}"
    exact_y = reference.nf4_linear_fwd_reference(x.double(), _as(bias, torch.float64), nf4)
    assert_oracle(y, exact_y, F.linear(x, w, bias), msg=f"{where}: y")
    dx = L.nf4_linear_bwd_dx(dy, nf4)
    assert dx.shape == x.shape and dx.dtype == dy.dtype, f"{where}: dx {tuple(dx.shape)} {dx.dtype}"
    exact_dx = reference.nf4_linear_bwd_dx_reference(dy.double(), nf4)
    assert_oracle(dx, exact_dx, dy @ w, msg=f"{where}: dx")


# (M, K, N): M on both sides of SMALL_M_MAX and past one tiled row block; K and N off every tile and 64
NF4_LINEAR_SHAPES = [(1, 96, 80), (17, 130, 67), (257, 70, 33)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("w_kind", ["nf4", "nf4dq"])
@pytest.mark.parametrize("shape", NF4_LINEAR_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_nf4_linear_matches_oracle(shape, w_kind, dtype):
    m, k, n = shape
    bias = NF4_LINEAR_SHAPES.index(shape) != 1  # one shape without bias
    prob = _problem(m, k, n, 1, dtype, w_kind, bias=bias, seed=stable_seed(shape, w_kind, str(dtype)))
    _check_nf4_linear(prob, f"nf4_linear M={m} K={k} N={n} {w_kind} {dtype} bias={bias}")


@pytest.mark.parametrize("blocksize", [128, 256])
def test_nf4_linear_other_blocksizes_and_strided_operands(blocksize):
    # absmax blocks straddled at other places; x a column slice and dy a transposed copy: strides, no copies
    prob = _problem(19, 200, 45, 1, torch.float16, "nf4dq", seed=blocksize, blocksize=blocksize)
    g = _gen(blocksize + 1)
    prob["x"] = torch.randn(19, 230, generator=g).to(DEVICE, torch.float16)[:, 20:220]
    prob["dy"] = torch.randn(45, 19, generator=g).to(DEVICE, torch.float16).t()
    assert not prob["x"].is_contiguous() and not prob["dy"].is_contiguous()
    _check_nf4_linear(prob, f"nf4_linear blocksize {blocksize}, strided")


@pytest.mark.skipif(DEVICE == "cuda", reason="inspects the interpreter's fixed configurations")
@pytest.mark.parametrize("path", ["small", "tiled"])
@pytest.mark.parametrize("m", [5, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nf4_linear_dispatch_paths_run_the_lora_binaries(monkeypatch, path, m, dtype):
    # each M on each path; every launch must be the LoRA op's launch of the same path (same constexprs,
    # same pointer types), so the base-only linear runs binaries the compile gate already checks
    monkeypatch.setattr(L, "SMALL_M_MAX", 10_000 if path == "small" else 0)
    spy = _Spy(L._lora_gemm_kernel)
    monkeypatch.setattr(L, "_lora_gemm_kernel", spy)
    prob = _problem(m, 130, 67, 16, dtype, "nf4dq", p=0.3, seed=m + 7)
    _check_nf4_linear(prob, f"nf4_linear {path} path, M={m} {dtype}")
    base = list(zip(spy.launches, spy.arg_dtypes, strict=True))
    spy.launches.clear()
    spy.arg_dtypes.clear()
    _, u = L.lora_linear_fwd(*_fwd_args(prob), **_fwd_kwargs(prob))
    L.lora_linear_bwd(*_bwd_args(prob, u), **_fwd_kwargs(prob), needs_da=False, needs_db=False)
    lora = list(zip(spy.launches, spy.arg_dtypes, strict=True))
    assert len(base) == len(lora) == 2, (base, lora)  # Y and dX
    for what, ((_, base_kw), base_types), ((_, lora_kw), lora_types) in zip(("y", "dx"), base, lora, strict=True):
        assert base_kw["ATOMIC_OUT"] == (path == "small"), f"{what}: {base_kw}"
        assert base_kw == lora_kw, f"{what}: base-only constexprs {base_kw} != the LoRA op's {lora_kw}"
        assert base_types == lora_types, f"{what}: base-only pointer types {base_types} != the LoRA op's {lora_types}"


def test_nf4_linear_launchers_reject_bad_input():
    prob = _problem(4, 70, 33, 1, torch.float32, "nf4dq", seed=16)
    x, bias, dy, nf4 = prob["x"], prob["bias"], prob["dy"], prob["nf4"]
    with pytest.raises(ValueError, match="x must be a non-empty"):
        L.nf4_linear_fwd(x[:0], bias, nf4)
    with pytest.raises(TypeError, match="x must be float32"):
        L.nf4_linear_fwd(x.double(), bias, nf4)
    with pytest.raises(ValueError, match="nf4.shape is"):
        L.nf4_linear_fwd(x[:, :69], bias, nf4)
    with pytest.raises(ValueError, match="bias must have shape"):
        L.nf4_linear_fwd(x, bias[:5], nf4)
    with pytest.raises(TypeError, match="bias must have x's dtype"):
        L.nf4_linear_fwd(x, bias.half(), nf4)
    with pytest.raises(TypeError, match="nf4 must be an NF4Args"):
        L.nf4_linear_fwd(x, bias, (nf4.packed, nf4.absmax))
    with pytest.raises(ValueError, match="packed has"):
        L.nf4_linear_fwd(x, bias, nf4._replace(packed=nf4.packed[:-1]))
    with pytest.raises(ValueError, match="dy has N=32"):
        L.nf4_linear_bwd_dx(dy[:, :32], nf4)
    with pytest.raises(TypeError, match="dy must be float32"):
        L.nf4_linear_bwd_dx(dy.double(), nf4)


@pytest.mark.gpu
@pytest.mark.parametrize("w_kind", ["nf4", "nf4dq"])
@pytest.mark.parametrize("m", [1, 16, 17, 300, 2049])
def test_cuda_bf16_nf4_linear_matches_oracle(w_kind, m):
    prob = _problem(m, 4096 // 4 + 64 + 3, 1024 // 4 + 3, 1, torch.bfloat16, w_kind, seed=m, device="cuda")
    _check_nf4_linear(prob, f"cuda bf16 nf4_linear M={m} {w_kind}")


# ----------------------------------------------------------------------------------------------
# the cuBLAS path past the tiled GEMM's range (lora_linear.cublas_path)
# ----------------------------------------------------------------------------------------------


def test_cublas_rule_follows_the_frozen_thresholds():
    # (M, P, Q) of the output width P and reduction Q: the Llama-3-8B projections at M = 8192, forward and dX
    for n, k in ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)):
        assert L.cublas_path(8192, n, k) and L.cublas_path(8192, k, n), (n, k)
    assert L.cublas_path(65, 4096, 4096)  # P <= 4096: cuBLAS from the first M past the decode sizes
    assert not L.cublas_path(64, 4096, 4096)  # decode sizes keep their paths
    assert not L.cublas_path(128, 14336, 1024)  # wide P below M = 512: the tiled grid wins there
    assert L.cublas_path(512, 14336, 1024)
    assert not L.cublas_path(8192, 14336, 512)  # short reductions: the addmm's pass over the output costs more
    assert not L.cublas_path(8192, 256, 4096)


@pytest.mark.skipif(DEVICE == "cuda", reason="spies on the interpreter's launches")
@pytest.mark.parametrize("w_kind", ["dense", "nf4dq"])
def test_launcher_takes_cublas_where_the_rule_says(monkeypatch, w_kind):
    # M = 65 past the decode sizes, Q = K = 1030 >= 1024, P = N = 520: the rule picks cuBLAS for Y; dX (P = 1030,
    # Q = 520 < 1024) stays on the tiled GEMM. No tiled launch for Y, one for dX; results within the oracle
    m, k, n = 65, 1030, 520
    assert L.cublas_path(m, n, k) and not L.cublas_path(m, k, n)
    spy = _Spy(L._lora_gemm_kernel)
    monkeypatch.setattr(L, "_lora_gemm_kernel", spy)
    prob = _problem(m, k, n, 16, torch.float32, w_kind, p=0.1, seed=stable_seed("cublas rule", w_kind))
    _, u = _check_fwd(prob, f"rule, {w_kind}")
    assert spy.launches == [], "the forward ran the tiled GEMM where the rule picks cuBLAS"
    _check_bwd(prob, u, f"rule, {w_kind}")
    assert len(spy.launches) == 1, spy.launches  # dX


# (M, K, N, R, bias, p): M past one and two row tiles, K and N off 64, ranks 1 / 16 / 64, every bias x dropout pair
CUBLAS_CASES = [
    (65, 70, 33, 1, True, 0.0),
    (129, 130, 67, 16, False, 0.25),
    (65, 96, 80, 64, True, 0.1),
    (129, 70, 130, 16, False, 0.0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("w_kind", W_KINDS)
@pytest.mark.parametrize("case", CUBLAS_CASES, ids=lambda c: "x".join(map(str, c[:4])) + f"-b{int(c[4])}-p{c[5]}")
def test_cublas_path_matches_oracle(monkeypatch, case, w_kind, dtype):
    m, k, n, r, bias, p = case
    monkeypatch.setattr(L, "cublas_path", lambda m, p, q: True)
    spy = _Spy(L._lora_gemm_kernel)
    monkeypatch.setattr(L, "_lora_gemm_kernel", spy)
    prob = _problem(m, k, n, r, dtype, w_kind, bias=bias, p=p, seed=stable_seed("cublas", case, w_kind, str(dtype)))
    where = f"cuBLAS path M={m} K={k} N={n} R={r} {w_kind} {dtype} bias={bias} p={p}"
    _, u = _check_fwd(prob, where)
    _check_bwd(prob, u, where)
    if w_kind != "dense":
        _check_nf4_linear(prob, where)
    assert spy.launches == [], f"{where}: the tiled GEMM ran"
