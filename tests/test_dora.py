"""DoRA on LoraLinear: the row norm from low-rank terms against the dense norm, no [N, K] temporary, forward
and gradients against float64 autograd of the formula (dense and NF4 bases, bias, dropout), merge / unmerge."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import INTERPRET, assert_close, assert_oracle, stable_seed
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fastpeft import quantize_nf4
from fastpeft.kernels import reference
from fastpeft.nn import LoraLinear, NF4Linear
from fastpeft.ops.dora import dora_linear, dora_row_norm

SHAPES = [(29, 37, 1), (64, 130, 8), (17, 64, 16), (48, 40, 4)]  # (N, K, r): primes, odd K, tails of 64


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(stable_seed(*key))


def _operands(n: int, k: int, r: int, *key) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = _gen(*key)
    return (
        torch.randn(n, k, generator=g) * 0.2,
        torch.randn(r, k, generator=g) * 0.3,
        torch.randn(n, r, generator=g) * 0.3,
    )


class _Allocations(TorchDispatchMode):
    """Records the shape of every new tensor an aten op returns (views of an input are not new)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = [*args, *(kwargs or {}).values()]
        inputs = {t.untyped_storage().data_ptr() for t in flat if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.shapes.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize(("n", "k", "r"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_norm_from_low_rank_terms_equals_the_dense_norm(n, k, r, dtype):
    w, a, b = _operands(n, k, r, "norm", n, k, r)
    w = w.to(dtype)
    s = 1.7
    exact = torch.linalg.vector_norm(w.double() + s * b.double() @ a.double(), dim=1)
    eager = torch.linalg.vector_norm(w + (s * b @ a).to(dtype), dim=1)  # HF PEFT: W + s·B·A in the weight's dtype
    assert_oracle(dora_row_norm(w, None, a, b, s), exact, eager, msg=f"dense {dtype} norm N={n} K={k} r={r}")


@pytest.mark.parametrize(("n", "k", "r"), SHAPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_row_norm_equals_the_dequantized_norm_in_chunks_of_rows(n, k, r, double_quant):
    w, a, b = _operands(n, k, r, "nf4", n, k, r, double_quant)
    q = quantize_nf4(w, double_quant=double_quant)
    deq = q.dequantize(torch.float32).double()
    for chunk in (1, 3 * k + 1, 1 << 20):  # one row, chunks ending inside a byte for odd K, all rows
        got = reference.dora_weight_sq_reference(None, q.kernel_args(), chunk_elements=chunk)
        assert_close(got, deq.square().sum(1), msg=f"‖W_n‖² in chunks of {chunk}")
    s = 0.6
    exact = torch.linalg.vector_norm(deq + s * b.double() @ a.double(), dim=1)
    eager = torch.linalg.vector_norm(deq.float() + s * b @ a, dim=1)
    assert_oracle(dora_row_norm(None, q.kernel_args(), a, b, s), exact, eager, msg=f"NF4 norm N={n} K={k}")


def test_no_dense_temporary_in_the_norm_forward_or_backward():
    n, k, r = 48, 40, 4
    layer = LoraLinear(nn.Linear(k, n), r=r, lora_alpha=8, use_dora=True)
    nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    x = torch.randn(3, k, requires_grad=True)
    layer(x).sum().backward()  # the cached ‖W_n‖² exists
    with _Allocations() as seen:
        layer(x).sum().backward()
    dense = [(f, s) for f, s in seen.shapes if s in ((n, k), (k, n))]
    assert not dense, f"a [N, K] temporary was created: {dense}"
    q = quantize_nf4(torch.randn(n, k) * 0.2)
    with _Allocations() as seen:
        reference.dora_weight_sq_reference(None, q.kernel_args(), chunk_elements=4 * k)
    biggest = max(torch.Size(s).numel() for _, s in seen.shapes)
    assert biggest < n * k, f"NF4 ‖W_n‖²: a temporary of {biggest} elements for a weight of {n * k}"


def _dora_formula(x, w, bias, a, b, m, s, keep=None, p=0.0):
    """HF PEFT's DoRA forward written out; ``keep``: the dropout mask (training with dropout ``p``)."""
    v = w + s * b @ a
    f = m / torch.linalg.vector_norm(v, dim=1).detach()
    if keep is None:
        y = f * (x @ v.t())
    else:
        dropped = x * keep / (1 - p)
        y = x @ w.t() + (f - 1) * (dropped @ w.t()) + f * s * (dropped @ a.t() @ b.t())
    return y if bias is None else y + bias


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_forward_and_gradients_equal_float64_autograd_of_the_formula(quantized, bias, dropout):
    n, k, r, s = 29, 37, 4, 2.0
    g = _gen("dora layer", quantized, bias, dropout)
    base = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        base.weight.copy_(torch.randn(n, k, generator=g) * 0.2)
    base = NF4Linear.from_linear(base) if quantized else base
    layer = LoraLinear(base, r=r, lora_alpha=r * s, lora_dropout=dropout, use_dora=True).train()
    with torch.no_grad():
        layer.lora_B["default"].weight.copy_(torch.randn(n, r, generator=g) * 0.2)
        layer.lora_magnitude_vector["default"].weight.mul_(1 + 0.5 * torch.rand(n, generator=g))
    x = torch.randn(5, k, generator=g, requires_grad=True)
    torch.manual_seed(11)
    y = layer(x)
    dy = torch.randn(y.shape, generator=g)
    y.backward(dy)
    torch.manual_seed(11)  # the same mask: the layer's first random draw is F.dropout on x
    keep = (F.dropout(x.detach(), dropout, training=True) != 0).float() if dropout else None
    w = (base.dequantize(torch.float32) if quantized else base.weight).detach().double()
    b0 = base.bias.detach().double() if bias else None
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight,
              layer.lora_magnitude_vector["default"].weight]  # fmt: skip
    leaves = [t.detach().double().requires_grad_() for t in [x, *params]]
    want = _dora_formula(leaves[0], w, b0, *leaves[1:], s, None if keep is None else keep.double(), dropout)
    want.backward(dy.double())
    leaves32 = [t.detach().clone().requires_grad_() for t in [x, *params]]
    eager = _dora_formula(leaves32[0], w.float(), None if b0 is None else b0.float(), *leaves32[1:], s, keep, dropout)
    eager.backward(dy)
    where = f"quantized={quantized} bias={bias} dropout={dropout}"
    assert_oracle(y, want, eager, msg=f"{where}: output")
    for name, got, exact, e in zip(["x", "A", "B", "magnitude"], [x, *params], leaves, leaves32, strict=True):
        assert bool(exact.grad.abs().max() > 0), f"{where}: d{name} is zero, the check would prove nothing"
        assert_oracle(got.grad, exact.grad, e.grad, msg=f"{where}: d{name}")


@pytest.mark.parametrize("quantized", [False, True])
def test_magnitude_starts_as_the_row_norms_and_merge_unmerge_round_trip(quantized):
    n, k, r = 24, 40, 4
    base = nn.Linear(k, n)
    base = NF4Linear.from_linear(base) if quantized else base
    layer = LoraLinear(copy.deepcopy(base), r=r, lora_alpha=8, init_lora_weights=False, use_dora=True).eval()
    w = (base.dequantize(torch.float32) if quantized else base.weight).detach().double()
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    norms = torch.linalg.vector_norm(w + 2.0 * b @ a, dim=1)
    assert_close(layer.lora_magnitude_vector["default"].weight, norms, msg="initial magnitude")
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(1.3)
    x = torch.randn(6, k)
    with torch.no_grad():
        before = layer(x)
        layer.merge()
        merged = layer(x)
        layer.unmerge()
        after = layer(x)
    assert_close(merged, before, msg="merged forward vs unmerged")
    assert_close(after, before, msg="after unmerge vs before merge")
    if not quantized:
        assert_close(layer.base_layer.weight, base.weight, msg="unmerged base weight")


def test_two_dora_adapters_merge_against_the_unmerged_base():
    layer = LoraLinear(nn.Linear(20, 12), r=2, init_lora_weights=False, use_dora=True).eval()
    layer.update_layer("other", 3, 6, init_lora_weights=False, use_dora=True)
    layer.set_adapter(["default", "other"])
    x = torch.randn(4, 20)
    with torch.no_grad():
        before = layer(x)
        layer.merge(adapter_names=["default"])
        layer.merge(adapter_names=["other"])  # unmerges "default" first: its norm is the unmerged base's
        merged = layer(x)
        layer.unmerge()
    assert layer.merged_adapters == []
    assert_close(merged, before, msg="two DoRA adapters merged one after the other")


def test_dora_refuses_lora_bias():
    with pytest.raises(ValueError, match="lora_bias"):
        LoraLinear(nn.Linear(8, 4), r=2, lora_bias=True, use_dora=True)


@pytest.mark.parametrize("quantized", [False, True])
def test_mixed_batch_rows_equal_their_own_adapter(quantized):
    """A mixed batch with DoRA, LoRA and base rows: each row's output and gradients equal those of a batch run
    through that row's adapter alone (DoRA per row: its adapter's magnitude and norm)."""
    n, k = 19, 64
    base = nn.Linear(k, n)
    base = NF4Linear.from_linear(base) if quantized else base
    layer = LoraLinear(base, r=3, lora_alpha=6, init_lora_weights=False, use_dora=True).eval()
    layer.update_layer("lora", 2, 4, init_lora_weights=False)
    layer.update_layer("dora2", 4, 4, init_lora_weights=False, use_dora=True)
    with torch.no_grad():
        for name in ("default", "dora2"):
            layer.lora_magnitude_vector[name].weight.mul_(1 + torch.rand(n, generator=_gen("mixed m", name)))
    names = ["dora2", "__base__", "default", "lora", "dora2", "default"]
    params = {p: t for p, t in layer.named_parameters() if p.startswith("lora_")}
    for t in params.values():
        t.requires_grad_(True)
    x = torch.randn(len(names), 3, k, generator=_gen("mixed x", quantized))
    dy = torch.randn(len(names), 3, n, generator=_gen("mixed dy", quantized))
    y = layer(x, adapter_names=names)
    y.backward(dy)
    got = {p: t.grad.clone() for p, t in params.items()}
    layer.zero_grad()
    for name in dict.fromkeys(names):
        rows = [i for i, m in enumerate(names) if m == name]
        if name == "__base__":
            want = layer.base_layer(x[rows])
        else:
            layer.set_adapter(name)
            for t in params.values():  # set_adapter trains the active adapter only
                t.requires_grad_(True)
            want = layer(x[rows])
            want.backward(dy[rows])
        assert_close(y[rows], want, msg=f"rows of {name} (quantized={quantized})")
    for p, t in params.items():
        assert t.grad is not None and bool(got[p].abs().max() > 0), f"{p}: no gradient"
        assert_close(got[p], t.grad, msg=f"gradient of {p} (quantized={quantized})")


def _layer_grads(layer: LoraLinear, x: torch.Tensor, dy: torch.Tensor) -> list[torch.Tensor]:
    layer.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(5)  # the same dropout mask on every path
    y = layer(x)
    y.backward(dy)
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight,
              layer.lora_magnitude_vector["default"].weight]  # fmt: skip
    return [y.detach(), x.grad, *(p.grad for p in params)]


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_triton_backend_matches_reference(monkeypatch, quantized, dropout):
    """The DoRA layer over the Triton lora_linear / nf4_linear launchers (the interpreter here) equals the
    reference path: the row scaling and the second base pass sit outside the fused op."""
    n, k, r = 33, 70, 4
    base = nn.Linear(k, n)
    base = NF4Linear.from_linear(base) if quantized else base
    layer = LoraLinear(base, r=r, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False, use_dora=True)
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(1.2)
    x = torch.randn(17, k, generator=_gen("triton x", quantized, dropout))
    dy = torch.randn(17, n, generator=_gen("triton dy", quantized, dropout))
    results = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("FASTPEFT_BACKEND", backend)
        results[backend] = _layer_grads(layer.train(), x, dy)
    for what, got, want in zip(["y", "dx", "dA", "dB", "dm"], results["triton"], results["reference"], strict=True):
        # two float32 computations summing in different orders (the kernels' tiles, torch's matmul): a few ulps of
        # the largest term apart (dA with dropout: 2.3e-6 relative at 9.7), past the table's 1.3e-6 for one rounding
        torch.testing.assert_close(
            got,
            want,
            rtol=1e-5,
            atol=1e-5,
            msg=lambda m, what=what: f"triton vs reference {what} ({quantized=}, {dropout=})\n{m}",
        )


@pytest.mark.gpu
@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_the_cpu_reference(quantized, dtype):
    n, k, r = 1024 // 4 + 3, 4096 // 4 + 64, 16  # not multiples of the tiles
    base = nn.Linear(k, n).to(dtype)
    base = NF4Linear.from_linear(base) if quantized else base
    layer = LoraLinear(base, r=r, lora_alpha=32, init_lora_weights=False, use_dora=True).eval()
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(1.2)
    x = torch.randn(300, k, generator=_gen("cuda x", quantized)).to(dtype)
    dy = torch.randn(300, n, generator=_gen("cuda dy", quantized)).to(dtype)
    want = _layer_grads(layer, x, dy)
    got = _layer_grads(copy.deepcopy(layer).cuda(), x.cuda(), dy.cuda())
    for what, g, w in zip(["y", "dx", "dA", "dB", "dm"], got, want, strict=True):
        assert g.is_cuda and g.dtype == w.dtype, f"{what}: {g.dtype} on {g.device}"
        assert_close(g.cpu(), w, dtype=torch.bfloat16, msg=f"cuda vs cpu {what} ({dtype}, quantized={quantized})")


def _dense_norms(layer: LoraLinear) -> torch.Tensor:
    base = layer.get_base_layer()
    w = (base.dequantize(torch.float32) if isinstance(base, NF4Linear) else base.weight).detach().double()
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    return torch.linalg.vector_norm(w + layer._scale("default") * b @ a, dim=1)


@pytest.mark.parametrize("quantized", [False, True])
def test_row_norm_is_kept_in_eval_until_a_or_b_change(monkeypatch, quantized):
    """In eval mode ‖W + s·B·A‖ (a pass over the whole base) is computed once and kept; an in-place step on B, a
    new A tensor or a scaling change recomputes it; in training it is computed on every forward."""
    import fastpeft.nn.lora_dora as lora_dora

    calls = []
    real = lora_dora.dora_row_norm
    monkeypatch.setattr(lora_dora, "dora_row_norm", lambda *a: calls.append(1) or real(*a))
    n, k, r = 21, 64, 4
    g = _gen("norm cache", quantized)
    base = nn.Linear(k, n)
    base = NF4Linear.from_linear(base) if quantized else base
    layer = LoraLinear(base, r=r, lora_alpha=8, init_lora_weights=False, use_dora=True)
    m = layer.lora_magnitude_vector["default"].weight

    def check(what: str, computed: int) -> None:
        calls.clear()
        for _ in range(3):
            got = lora_dora.dora_factor(layer, "default")
        assert len(calls) == computed, f"{what}: the row norm computed {len(calls)} times in 3 calls, want {computed}"
        assert_close(got, m.double() / _dense_norms(layer), msg=f"{what}: factor vs the dense formula")

    layer.eval()
    check("eval, first calls", 1)
    check("eval, unchanged", 0)
    with torch.no_grad():
        layer.lora_B["default"].weight.add_(torch.randn(n, r, generator=g) * 0.1)
    check("B stepped in place", 1)
    layer.lora_A["default"].weight = nn.Parameter(torch.randn(r, k, generator=g) * 0.1)
    check("a new A tensor", 1)
    layer.scaling["default"] = layer.scaling["default"] * 2
    check("another scaling", 1)
    layer.train()
    check("training", 3)


@pytest.mark.parametrize("quantized", [False, True])
def test_cached_weight_norms_are_computed_once_and_dropped_when_the_base_changes(monkeypatch, quantized):
    """‖W_n‖² is computed once per frozen base; an in-place write, a new weight tensor or a new base module
    drops it (the factor then equals the dense formula on the new base)."""
    import fastpeft.nn.lora_dora as lora_dora

    calls = []
    real = lora_dora.dora_weight_sq
    monkeypatch.setattr(lora_dora, "dora_weight_sq", lambda w, q: calls.append(1) or real(w, q))
    n, k, r = 21, 64, 4
    g = _gen("cache", quantized)
    base = nn.Linear(k, n)
    with torch.no_grad():
        base.weight.copy_(torch.randn(n, k, generator=g) * 0.2)
    base = NF4Linear.from_linear(base) if quantized else base
    layer = LoraLinear(base, r=r, lora_alpha=8, init_lora_weights=False, use_dora=True)
    m = layer.lora_magnitude_vector["default"].weight

    def check(what: str, computed: int) -> None:
        calls.clear()
        for _ in range(3):
            got = lora_dora.dora_factor(layer, "default")
        assert len(calls) == computed, f"{what}: ‖W_n‖² computed {len(calls)} times in 3 calls, want {computed}"
        assert_close(got, m.double() / _dense_norms(layer), msg=f"{what}: factor vs the dense formula")

    check("unchanged base", 0)  # cached when the magnitude was initialized
    if quantized:
        other = quantize_nf4(torch.randn(n, k, generator=g) * 0.3)
        with torch.no_grad():  # in place: same storage, the version counter moves
            base.packed.copy_(other.packed)
        check("NF4 codes rewritten in place", 1)
        layer.base_layer = NF4Linear.from_linear(nn.Linear(k, n))
        check("a new NF4 base module", 1)
    else:
        with torch.no_grad():
            base.weight.mul_(1.5)
        check("weight scaled in place", 1)
        base.weight = nn.Parameter(torch.randn(n, k, generator=g) * 0.1, requires_grad=False)
        check("a new weight tensor", 1)
        with torch.no_grad():
            layer.merge()
            layer.unmerge()
        check("after merge / unmerge", 1)


def test_no_tensor_of_n_by_k_elements_in_forward_and_backward():
    """Dense base, N·K far above every other size: no op output in DoRA's forward or backward reaches N·K
    elements (the norm comes from ‖W_n‖², A·Wᵀ [r, N] and rank-sized products)."""
    n, k, r, m = 256, 192, 8, 5
    layer = LoraLinear(nn.Linear(k, n), r=r, lora_alpha=16, init_lora_weights=False, use_dora=True).train()
    x = torch.randn(m, k, requires_grad=True)
    layer(x).sum().backward()  # the cached ‖W_n‖² exists
    with _Allocations() as seen:
        layer(x).square().sum().backward()
    biggest = max(seen.shapes, key=lambda fs: torch.Size(fs[1]).numel())
    assert torch.Size(biggest[1]).numel() < n * k // 8, f"largest new tensor {biggest} for a weight of {n}x{k}"
    assert layer.lora_magnitude_vector["default"].weight.grad.abs().max() > 0


# ----------------------------------------------------------------------------------------------
# the fused op (fastpeft.ops.dora.dora_linear): the layer's forward without dropout
# ----------------------------------------------------------------------------------------------


def _op_operands(n: int, k: int, r: int, quantized: bool, bias: bool, *key):
    g = _gen("dora op", n, k, r, quantized, bias, *key)
    w = torch.randn(n, k, generator=g) * 0.2
    nf4 = quantize_nf4(w, double_quant=True).kernel_args() if quantized else None
    w_used = reference._base_weight(None, nf4, torch.float32) if quantized else w
    leaves = {
        "x": torch.randn(7, k, generator=g), "lora_a": torch.randn(r, k, generator=g) * 0.3,
        "lora_b": torch.randn(n, r, generator=g) * 0.3, "magnitude": torch.rand(n, generator=g) + 0.5,
        "bias": torch.randn(n, generator=g) if bias else None,
    }  # fmt: skip
    norm = torch.rand(n, generator=g) + 0.5
    return (None if quantized else w), nf4, w_used, leaves, norm


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_op_gradients_equal_float64_autograd_of_the_formula(monkeypatch, backend, quantized, bias):
    """``dora_linear``'s output and gradients in x, A, B, m and bias (the norm a constant) against float64 autograd
    of ``f ⊙ (X·Wᵀ + s·X·Aᵀ·Bᵀ) + bias``; K = 128 takes the scaled NF4 scratch, a dense base the epilogue kernel."""
    monkeypatch.setenv("FASTPEFT_BACKEND", backend)
    n, k, r, s = 33, 128, 4, 1.5
    weight, nf4, w, leaves, norm = _op_operands(n, k, r, quantized, bias, backend)
    names = [name for name, t in leaves.items() if t is not None]

    def run(dtype, op):
        ts = {name: leaves[name].detach().to(dtype).clone().requires_grad_() for name in names}
        xb = ts["x"].reshape(1, 7, k)  # leading dims go through the op's reshape
        if op:
            y = dora_linear(xb, weight, ts.get("bias"), ts["lora_a"], ts["lora_b"], s, ts["magnitude"], norm, nf4=nf4)
        else:
            f = ts["magnitude"] / norm.to(dtype)
            wd = w.to(dtype)
            y = f * (xb @ wd.t() + s * (xb @ ts["lora_a"].t()) @ ts["lora_b"].t())
            y = y if "bias" not in ts else y + ts["bias"]
        y.backward(dy.to(dtype).reshape(y.shape))
        return y.detach().reshape(7, n), [ts[name].grad for name in names]

    dy = torch.randn(7, n, generator=_gen("dora op dy", quantized, bias))
    y, grads = run(torch.float32, True)
    want, exact = run(torch.float64, False)
    eager, eager_grads = run(torch.float32, False)
    where = f"backend={backend} quantized={quantized} bias={bias}"
    assert_oracle(y, want, eager, msg=f"{where}: output")
    for name, got, e, ea in zip(names, grads, exact, eager_grads, strict=True):
        assert bool(e.abs().max() > 0), f"{where}: d{name} is zero, the check would prove nothing"
        assert_oracle(got, e, ea, msg=f"{where}: d{name}")


def test_layer_without_dropout_runs_the_fused_op(monkeypatch):
    """The layer's forward without dropout (eval, or p = 0 in training) is one ``dora_linear`` call; with dropout in
    training it keeps the two-pass form."""
    import fastpeft.nn.lora_dora as lora_dora

    calls = []
    real = lora_dora.dora_linear
    monkeypatch.setattr(lora_dora, "dora_linear", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for p, train, want in ((0.0, True, 1), (0.25, False, 1), (0.25, True, 0)):
        calls.clear()
        layer = LoraLinear(nn.Linear(40, 24), r=4, lora_alpha=8, lora_dropout=p, init_lora_weights=False,
                           use_dora=True).train(train)  # fmt: skip
        layer(torch.randn(3, 40))
        assert len(calls) == want, f"p={p} training={train}: {len(calls)} dora_linear calls"


@pytest.mark.skipif(not INTERPRET, reason="FASTPEFT_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("quantized", [False, True])
def test_a_training_step_takes_f_and_f_times_b_from_the_norm_launch(monkeypatch, quantized):
    """In training each forward runs one norm launch that also forms f, s·f and f ⊙ B; the op's forward and
    backward form none of them again (in eval the kept norm goes in alone)."""
    from fastpeft.kernels import dora_linear as dl
    from fastpeft.kernels import dora_norm

    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    calls = []
    for mod, fn in ((dora_norm, "dora_norm_factors_fwd"), (dl, "_factor"), (dl, "_scaled_b")):
        real = getattr(mod, fn)
        monkeypatch.setattr(mod, fn, lambda *a, fn=fn, real=real: calls.append(fn) or real(*a))
    base = nn.Linear(128, 40)
    layer = LoraLinear(NF4Linear.from_linear(base) if quantized else base, r=4, lora_alpha=8, init_lora_weights=False,
                       use_dora=True)  # fmt: skip
    x = torch.randn(20, 128, generator=_gen("factors step", quantized))
    layer(x).square().sum().backward()
    assert calls == ["dora_norm_factors_fwd"], calls
    assert layer.lora_magnitude_vector["default"].weight.grad.abs().max() > 0
    calls.clear()
    with torch.no_grad():
        layer.eval()(x)
    assert "dora_norm_factors_fwd" not in calls, calls


@pytest.mark.parametrize("quantized", [False, True])
def test_no_n_by_k_tensor_in_the_fused_op_on_the_triton_path(monkeypatch, quantized):
    """The Triton launchers (the interpreter here): no op output in the fused op's forward or backward has N·K / 8
    elements or more, besides the dequantize-once scratch (allocated by the warm-up call, then reused)."""
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    n, k, r = 256, 192, 8
    weight, nf4, _, leaves, norm = _op_operands(n, k, r, quantized, True, "no [N, K]")
    ts = {name: t.clone().requires_grad_() for name, t in leaves.items()}

    def step():
        y = dora_linear(ts["x"], weight, ts["bias"], ts["lora_a"], ts["lora_b"], 0.5, ts["magnitude"], norm, nf4=nf4)
        y.square().sum().backward()

    step()
    with _Allocations() as seen:
        step()
    biggest = max(seen.shapes, key=lambda fs: torch.Size(fs[1]).numel())
    assert torch.Size(biggest[1]).numel() < n * k // 8, f"largest new tensor {biggest} for a weight of {n}x{k}"
    assert ts["magnitude"].grad.abs().max() > 0
