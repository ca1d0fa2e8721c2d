"""LoraLinear and the lora_linear op: parity with HF PEFT (dense and bitsandbytes 4-bit bases), gradients,
dropout, adapters, merging, autocast, torch.compile, and the Triton path through the interpreter."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import assert_close, assert_oracle, failing_move
from torch import nn

from fastpeft.kernels import reference
from fastpeft.nn import LoraLinear, NF4Linear
from fastpeft.ops.lora import lora_linear, lora_linear_fwd, make_dropout_mask, nf4_linear

peft = pytest.importorskip("peft")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _linear(k: int, n: int, seed: int, bias: bool = True) -> nn.Linear:
    g = _gen(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.2)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g))
    return lin


def _randomize_adapter(layer: nn.Module, seed: int, name: str = "default") -> None:
    """Give A and B fresh non-zero values (B starts at zero, which would hide every LoRA term)."""
    g = _gen(seed)
    with torch.no_grad():
        for table in (layer.lora_A, layer.lora_B):
            w = table[name].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.3)


def _peft_layer(base: nn.Module, r: int, alpha: float, dropout: float, rslora: bool, four_bit: bool = False):
    """HF PEFT's LoRA layer around a copy of ``base`` (get_peft_model on a one-layer model)."""

    class One(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = copy.deepcopy(base)
            self.is_loaded_in_4bit = four_bit  # what transformers sets; PEFT dispatches Linear4bit on it

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    config = peft.LoraConfig(target_modules=["proj"], r=r, lora_alpha=alpha, lora_dropout=dropout,
                             use_rslora=rslora, init_lora_weights=False)  # fmt: skip
    return peft.get_peft_model(One(), config).base_model.model.proj


def _grads(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y.backward(dy)
    return y.detach(), x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad


# ----------------------------------------------------------------------------------------------
# parity with HF PEFT
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "m,k,n,r,alpha,rslora",
    [(1, 33, 17, 1, 1, False), (17, 70, 33, 8, 16, False), (5, 129, 64, 16, 8, True), (3, 64, 65, 64, 32, True)],
)
def test_dense_parity_with_peft(m, k, n, r, alpha, rslora):
    base = _linear(k, n, seed=k * n, bias=r != 16)  # one case without a bias
    theirs = _peft_layer(base, r, alpha, dropout=0.25, rslora=rslora).eval()  # eval: dropout is identity
    _randomize_adapter(theirs, seed=r)
    ours = LoraLinear(copy.deepcopy(base), r=r, lora_alpha=alpha, lora_dropout=0.25, use_rslora=rslora).eval()
    ours.load_state_dict(theirs.state_dict())  # identical names and shapes: loads strictly
    assert ours.scaling == theirs.scaling, f"scaling {ours.scaling} != PEFT's {theirs.scaling}"
    assert math.isclose(ours.scaling["default"], alpha / math.sqrt(r) if rslora else alpha / r)

    x = torch.randn(2, m, k, generator=_gen(m))
    dy = torch.randn(2, m, n, generator=_gen(m + 1))
    exact = _grads(copy.deepcopy(theirs).double(), x.double(), dy.double())
    eager = _grads(theirs, x, dy)
    got = _grads(ours, x, dy)
    for what, a, e, ex in zip(("y", "dx", "dA", "dB"), got, eager, exact, strict=True):
        assert_oracle(a, ex, e, msg=f"{what} vs PEFT (m={m}, k={k}, n={n}, r={r})")
    assert ours.base_layer.weight.grad is None
    assert ours.base_layer.bias is None or ours.base_layer.bias.grad is None
    # eval mode is deterministic
    assert torch.equal(ours(x), ours(x))


def _bnb_linear4bit(lin: nn.Linear):
    bnb = pytest.importorskip("bitsandbytes")
    l4 = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                           compute_dtype=torch.float32, quant_type="nf4")  # fmt: skip
    l4.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                  compress_statistics=True)  # fmt: skip
    l4.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return l4.to("cpu")


@pytest.mark.parametrize("m,k,n,r,rslora", [(7, 70, 33, 8, False), (16, 128, 96, 4, True)])
def test_qlora_parity_with_peft_over_bitsandbytes(m, k, n, r, rslora):
    l4 = _bnb_linear4bit(_linear(k, n, seed=m + k))
    theirs = _peft_layer(l4, r, 16, dropout=0.1, rslora=rslora, four_bit=True).eval()
    assert type(theirs).__module__ == "peft.tuners.lora.bnb", type(theirs)
    _randomize_adapter(theirs, seed=m)
    ours = LoraLinear(NF4Linear.from_bnb(theirs.base_layer), r=r, lora_alpha=16, lora_dropout=0.1,
                      use_rslora=rslora).eval()  # fmt: skip
    ours.load_state_dict(theirs.state_dict())  # the 4-bit base's six keys included
    assert ours.scaling == theirs.scaling

    x = torch.randn(m, k, generator=_gen(k))
    dy = torch.randn(m, n, generator=_gen(n))
    w = ours.base_layer.dequantize(torch.float64)
    a, b = theirs.lora_A["default"].weight.detach().double(), theirs.lora_B["default"].weight.detach().double()
    s = theirs.scaling["default"]
    xd, dyd = x.double(), dy.double()
    exact = (xd @ w.t() + theirs.base_layer.bias.double() + s * (xd @ a.t()) @ b.t(), dyd @ w + s * (dyd @ b) @ a,
             s * (dyd @ b).t() @ xd, s * dyd.t() @ (xd @ a.t()))  # fmt: skip
    eager = _grads(theirs, x, dy)
    got = _grads(ours, x, dy)
    for what, g, e, ex in zip(("y", "dx", "dA", "dB"), got, eager, exact, strict=True):
        assert_oracle(g, ex, e, msg=f"{what} vs PEFT+bitsandbytes (m={m}, k={k}, n={n}, r={r})")


# ----------------------------------------------------------------------------------------------
# the op: gradients, gradcheck, dropout
# ----------------------------------------------------------------------------------------------


def _operands(m: int, k: int, n: int, r: int, seed: int, dtype: torch.dtype = torch.float32):
    g = _gen(seed)
    x = torch.randn(m, k, generator=g, dtype=dtype)
    w = torch.randn(n, k, generator=g, dtype=dtype) * 0.2
    bias = torch.randn(n, generator=g, dtype=dtype)
    a = torch.randn(r, k, generator=g, dtype=dtype) * 0.3
    b = torch.randn(n, r, generator=g, dtype=dtype) * 0.3
    return x, w, bias, a, b


@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_op_gradients_match_autograd_through_reference_math(nf4, p):
    from fastpeft import quantize_nf4

    m, k, n, r, s = 19, 70, 37, 5, 0.75
    x, w, bias, a, b = _operands(m, k, n, r, seed=int(nf4) * 10 + int(p * 10))
    q = quantize_nf4(w) if nf4 else None
    w_used = q.dequantize() if nf4 else w
    dy = torch.randn(m, n, generator=_gen(3))
    leaves = [t.clone().requires_grad_(True) for t in (x, bias, a, b)]
    torch.manual_seed(1234)
    y = lora_linear(leaves[0], None if nf4 else w, leaves[1], leaves[2], leaves[3], s,
                    nf4=q.kernel_args() if nf4 else None, dropout_p=p)  # fmt: skip
    y.backward(dy)
    torch.manual_seed(1234)
    mask = make_dropout_mask((m, k), p, "cpu").float() / (1 - p) if p > 0 else torch.ones(m, k)
    refs = [t.clone().requires_grad_(True) for t in (x, bias, a, b)]
    y_ref = refs[0] @ w_used.t() + refs[1] + s * ((refs[0] * mask) @ refs[2].t()) @ refs[3].t()
    y_ref.backward(dy)
    assert_close(y, y_ref, msg="forward")
    for what, got, want in zip(("dx", "dbias", "dA", "dB"), leaves, refs, strict=True):
        assert_close(got.grad, want.grad, msg=f"{what} (nf4={nf4}, p={p})")


def test_op_takes_strided_inputs_and_leading_dims():
    x, w, bias, a, b = _operands(4 * 3 * 2, 16, 8, 2, seed=6)
    x = x.view(4, 3, 2, 16).transpose(0, 2)  # [2, 3, 4, 16], not contiguous
    assert not x.is_contiguous()
    x.requires_grad_(True)
    y = lora_linear(x, w, bias, a, b, 0.5)
    want = x @ w.t() + bias + 0.5 * (x @ a.t()) @ b.t()
    assert y.shape == (2, 3, 4, 8)
    assert_close(y, want, msg="strided x")
    dy = torch.randn(8, 4, 3, 2, generator=_gen(7)).permute(3, 2, 1, 0)  # a strided upstream gradient
    (dx,) = torch.autograd.grad(y, x, dy)
    (dx_want,) = torch.autograd.grad(want, x, dy)
    assert_close(dx, dx_want, msg="dx for strided x and dy")


def test_op_skips_gradients_nobody_needs():
    x, w, bias, a, b = _operands(4, 16, 8, 2, seed=5)
    a.requires_grad_(True)
    y = lora_linear(x, w, bias, a, b, 2.0)
    y.sum().backward()
    assert a.grad is not None and x.grad is None and b.grad is None and bias.grad is None


def test_gradcheck_fp64_reference_path():
    from fastpeft import quantize_nf4

    x, w, bias, a, b = _operands(5, 13, 7, 3, seed=7, dtype=torch.float64)
    mask = make_dropout_mask((5, 13), 0.4, "cpu", generator=_gen(8))
    q = quantize_nf4(w.float(), double_quant=True).kernel_args()
    flat_nf4 = (q.packed, q.absmax, 7, 13, q.blocksize, q.nested_absmax, q.offset, q.quant_map, q.nested_quant_map,
                q.nested_blocksize)  # fmt: skip
    no_nf4 = (None, None, 0, 0, 64, None, None, None, None, 256)
    inputs = [t.clone().requires_grad_(True) for t in (x, bias, a, b)]

    def dense(x, bias, a, b):
        return lora_linear_fwd(x, w, bias, a, b, 0.6, *no_nf4, mask, 0.4)[0]

    def quantized(x, bias, a, b):
        return lora_linear_fwd(x, None, bias, a, b, 0.6, *flat_nf4, mask, 0.4)[0]

    assert torch.autograd.gradcheck(dense, inputs)
    assert torch.autograd.gradcheck(quantized, inputs)


def test_dropout_training_matches_reference_with_the_same_mask():
    m, k, n, r, p = 64, 40, 24, 4, 0.35
    layer = LoraLinear(_linear(k, n, seed=9), r=r, lora_alpha=8, lora_dropout=p).train()
    _randomize_adapter(layer, seed=10)
    x = torch.randn(2, m // 2, k, generator=_gen(11))
    torch.manual_seed(77)
    y = layer(x)
    torch.manual_seed(77)
    mask = make_dropout_mask((m, k), p, "cpu")
    kept = mask.float().mean().item()
    assert abs(kept - (1 - p)) < 0.05, f"mask keeps {kept:.3f}, expected about {1 - p}"
    want, _ = reference.lora_linear_fwd_reference(
        x.reshape(m, k), layer.base_layer.weight, layer.base_layer.bias, layer.lora_A["default"].weight,
        layer.lora_B["default"].weight, layer.scaling["default"], dropout_mask=mask, dropout_p=p,
    )  # fmt: skip
    assert_close(y.reshape(m, n), want, msg="training-mode dropout")
    layer.eval()
    y_eval = layer(x)
    assert torch.equal(y_eval, layer(x)), "eval mode must be deterministic"
    assert (y_eval - y).abs().max() > 1e-3, "dropout changed nothing in training mode"


def test_bitsandbytes_layer_must_be_wrapped_first():
    with pytest.raises(TypeError, match="from_bnb"):
        LoraLinear(_bnb_linear4bit(_linear(64, 8, seed=2)))


def test_invalid_arguments_raise():
    x, w, bias, a, b = _operands(3, 8, 4, 2, seed=1)
    with pytest.raises(ValueError, match="exactly one"):
        lora_linear(x, None, bias, a, b, 1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear(x, w, bias, a, b, 1.0, dropout_p=1.0)
    with pytest.raises(ValueError, match="features"):
        lora_linear(x[:, :5], w, bias, a, b, 1.0)
    with pytest.raises(ValueError, match="frozen"):
        lora_linear(x, w.requires_grad_(True), bias, a, b, 1.0)
    with torch.no_grad():
        lora_linear(x, w, bias, a, b, 1.0)  # no autograd: nothing is silently lost
    with pytest.raises(TypeError, match="nn.Linear or an NF4Linear"):
        LoraLinear(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="r must"):
        LoraLinear(nn.Linear(4, 4), r=0)
    with pytest.raises(ValueError, match="init_lora_weights"):
        LoraLinear(nn.Linear(4, 4), init_lora_weights="pissa")


def test_non_finite_alpha_and_bad_adapter_names_are_refused():
    for alpha in (float("nan"), float("inf"), "8", None, 10**400):
        with pytest.raises(ValueError, match="lora_alpha must be a finite number"):
            LoraLinear(nn.Linear(4, 4), lora_alpha=alpha)
    layer = LoraLinear(nn.Linear(4, 4))
    for name in ("a.b", "../x", "/abs", "", "keys", "training", "x y"):
        with pytest.raises(ValueError, match="adapter name"):
            layer.update_layer(name, r=2, lora_alpha=2)
    with pytest.raises(TypeError, match="adapter name must be a str"):
        layer.update_layer(3, r=2, lora_alpha=2)
    assert list(layer.lora_A) == ["default"], "a refused adapter left modules behind"


@pytest.mark.parametrize("quantized", [False, True])
def test_integer_and_bool_inputs_are_refused(quantized):
    base = _linear(64, 32, seed=3)
    layer = LoraLinear(NF4Linear.from_linear(base) if quantized else base, r=4)
    for x in (torch.randint(-3, 3, (2, 64)), torch.ones(2, 64, dtype=torch.bool)):
        with pytest.raises(TypeError, match=f"floating-point tensor, got {x.dtype}"):
            layer(x)
    # The ops themselves: integer operands would run the reference math in integers.
    x, w, bias, a, b = _operands(2, 64, 32, 4, seed=5)
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got torch.int64"):
        lora_linear(x.long(), w, bias, a, b, 1.0)
    with pytest.raises(TypeError, match="lora_b must be a floating-point tensor, got torch.int32"):
        lora_linear(x, w, bias, a, b.int(), 1.0)
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got torch.bool"):
        nf4_linear(x.bool(), None, NF4Linear.from_linear(base).kernel_args())


def test_failed_move_halfway_leaves_the_layer_as_it_was():
    layer = LoraLinear(NF4Linear.from_linear(_linear(70, 33, seed=4)), r=4)
    layer.update_layer("other", r=2, lora_alpha=4)
    _randomize_adapter(layer, seed=5)
    x = torch.randn(3, 70, generator=_gen(6))
    layer(x).sum().backward()  # gradients move too: they must come back as well
    want = layer(x)
    tensors = [*layer.parameters(), *layer.buffers()]
    before = {name: (t, t.data_ptr()) for name, t in [*layer.named_parameters(), *layer.named_buffers()]}
    grads = {name: p.grad for name, p in layer.named_parameters()}
    for fail_at in range(len(tensors) + sum(p.grad is not None for p in layer.parameters())):
        with pytest.raises(RuntimeError, match="injected"):
            layer._apply(failing_move(fail_at))
        now = dict([*layer.named_parameters(), *layer.named_buffers()])
        assert now.keys() == before.keys(), f"failing at tensor {fail_at}: tensors lost"
        changed = [k for k, (t, ptr) in before.items() if now[k] is not t or now[k].data_ptr() != ptr]
        assert not changed, f"failing at tensor {fail_at}: {changed} were left moved"
        assert all(p.grad is grads[n] for n, p in layer.named_parameters()), f"failing at {fail_at}: grads moved"
        assert torch.equal(layer(x), want)


# ----------------------------------------------------------------------------------------------
# adapters: init, several adapters, disabling
# ----------------------------------------------------------------------------------------------


def test_init_lora_weights_variants():
    k, n, r = 96, 40, 8
    base = _linear(k, n, seed=21)
    x = torch.randn(6, k, generator=_gen(22))
    torch.manual_seed(0)
    default = LoraLinear(copy.deepcopy(base), r=r)
    a = default.lora_A["default"].weight
    bound = 1 / math.sqrt(k)  # kaiming_uniform_(a=sqrt(5)) on fan_in k, as nn.Linear and PEFT
    assert a.abs().max() <= bound and a.abs().max() > 0.8 * bound, f"A range {a.abs().max():.4f} vs bound {bound:.4f}"
    assert torch.count_nonzero(default.lora_B["default"].weight) == 0
    assert torch.equal(default(x), base(x)), "B = 0: the layer must start as the base"
    assert default.lora_A["default"].weight.shape == (r, k) and default.lora_B["default"].weight.shape == (n, r)

    gaussian = LoraLinear(copy.deepcopy(base), r=r, init_lora_weights="gaussian")
    std = gaussian.lora_A["default"].weight.std().item()
    assert abs(std - 1 / r) < 0.25 / r, f"gaussian A std {std:.4f}, expected about {1 / r}"
    assert torch.count_nonzero(gaussian.lora_B["default"].weight) == 0

    noisy = LoraLinear(copy.deepcopy(base), r=r, init_lora_weights=False)
    assert torch.count_nonzero(noisy.lora_B["default"].weight) == n * r, "init False leaves B random"
    assert (noisy(x) - base(x)).abs().max() > 1e-3


def test_base_is_frozen_and_only_the_active_adapter_trains():
    layer = LoraLinear(_linear(24, 12, seed=31), r=4, init_lora_weights=False)
    layer.update_layer("other", r=2, lora_alpha=4, lora_dropout=0.1, use_rslora=True, init_lora_weights=False)
    assert not any(p.requires_grad for p in layer.base_layer.parameters())
    assert layer.weight is layer.base_layer.weight and layer.bias is layer.base_layer.bias
    assert layer.get_base_layer() is layer.base_layer
    assert (layer.in_features, layer.out_features) == (24, 12)
    assert layer.active_adapter == "default"
    assert layer.scaling == {"default": 2.0, "other": 4 / math.sqrt(2)}
    trainable = sorted(name for name, p in layer.named_parameters() if p.requires_grad)
    assert trainable == ["lora_A.default.weight", "lora_B.default.weight"], trainable
    assert isinstance(layer.lora_dropout["other"], nn.Dropout)
    assert isinstance(layer.lora_dropout["default"], nn.Identity)
    layer.set_adapter("other")
    trainable = sorted(name for name, p in layer.named_parameters() if p.requires_grad)
    assert trainable == ["lora_A.other.weight", "lora_B.other.weight"], trainable


def test_set_delete_and_disable_adapters():
    base = _linear(24, 12, seed=41)
    layer = LoraLinear(copy.deepcopy(base), r=4, lora_alpha=8, init_lora_weights=False).eval()
    layer.update_layer("second", r=3, lora_alpha=6, init_lora_weights=False)
    x = torch.randn(5, 24, generator=_gen(42))

    def expected(name: str) -> torch.Tensor:
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        return base(x) + layer.scaling[name] * (x @ a.t()) @ b.t()

    assert_close(layer(x), expected("default"), msg="default adapter")
    layer.set_adapter("second")
    assert layer.active_adapter == "second"
    assert_close(layer(x), expected("second"), msg="second adapter")
    with pytest.raises(ValueError, match="no adapter named"):
        layer.set_adapter("missing")
    layer.disable_adapters = True
    assert torch.equal(layer(x), base(x)), "disabled adapters must give the base output"
    layer.disable_adapters = False
    layer.delete_adapter("second")
    assert layer.active_adapter == "default" and list(layer.lora_A) == ["default"] and "second" not in layer.scaling
    assert_close(layer(x), expected("default"), msg="after deleting the active adapter")
    with pytest.raises(ValueError, match="no adapter named"):
        layer.delete_adapter("second")
    layer.delete_adapter("default")
    assert layer.active_adapter is None
    assert torch.equal(layer(x), base(x))


# ----------------------------------------------------------------------------------------------
# merging
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_merge_unmerge_round_trip(dtype):
    base = _linear(70, 33, seed=51).to(dtype)
    layer = LoraLinear(copy.deepcopy(base), r=8, lora_alpha=16, init_lora_weights=False).eval()
    layer.update_layer("b", r=2, lora_alpha=2, init_lora_weights=False)
    x = torch.randn(9, 70, generator=_gen(52)).to(dtype)
    before = layer(x)
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert layer.merged and layer.merged_adapters == ["default"]
    merged_w = layer.base_layer.weight.detach()
    want_w = (w0.double() + layer.get_delta_weight("default").double()).to(dtype)
    assert torch.equal(merged_w, want_w), "merge must round the float32 sum once"
    assert_close(layer(x), before, dtype=dtype, msg="merged output")
    layer.merge(adapter_names=["default", "b"])
    assert layer.merged_adapters == ["default", "b"]
    layer.unmerge()
    assert not layer.merged
    err = (layer.base_layer.weight.detach().double() - w0.double()).abs().max().item()
    ulp = torch.finfo(dtype).eps * w0.abs().max().item()
    assert err <= 2 * ulp, f"unmerge left the weight {err:.2e} away (allowed {2 * ulp:.2e})"
    with pytest.raises(ValueError, match="no adapter named"):
        layer.merge(adapter_names=["nope"])


def test_nf4_merge_replaces_base_with_dense_and_unmerge_restores_it():
    nf4 = NF4Linear.from_linear(_linear(70, 33, seed=61).to(torch.bfloat16))
    packed = nf4.packed.clone()
    layer = LoraLinear(nf4, r=4, lora_alpha=8, init_lora_weights=False).eval()
    x = torch.randn(7, 70, generator=_gen(62)).to(torch.bfloat16)
    before = layer(x)
    layer.merge()
    dense = layer.base_layer
    assert type(dense) is nn.Linear and dense.weight.dtype == torch.bfloat16, "merged base must be a 16-bit Linear"
    want = (nf4.dequantize(torch.float32) + layer.get_delta_weight("default")).to(torch.bfloat16)
    assert torch.equal(dense.weight, want)
    assert not any(p.requires_grad for p in dense.parameters())
    assert_close(layer(x), before, msg="merged NF4 output")
    assert "base_layer.weight.absmax" not in layer.state_dict()
    layer.unmerge()
    assert layer.base_layer is nf4 and torch.equal(nf4.packed, packed), "unmerge must restore the NF4 layer"
    assert torch.equal(layer(x), before)
    # disabling adapters while merged gives the base: unmerges first
    layer.merge()
    layer.disable_adapters = True
    assert_close(layer(x), nf4(x), msg="disabled while merged")
    assert layer.base_layer is nf4


# ----------------------------------------------------------------------------------------------
# dtypes, autocast, torch.compile
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward_and_backward(dtype):
    base = _linear(70, 33, seed=71)
    layer = LoraLinear(copy.deepcopy(base), r=8, init_lora_weights=False)
    _randomize_adapter(layer, seed=72)
    x = torch.randn(2, 9, 70, generator=_gen(73))
    dy = torch.randn(2, 9, 33, generator=_gen(74))
    exact = _grads(copy.deepcopy(layer).double(), x.double(), dy.double())
    eager_ref = _peft_layer(base, 8, 8, 0.0, False)
    eager_ref.load_state_dict(layer.state_dict())
    eager = _grads(eager_ref.to(dtype), x.to(dtype), dy.to(dtype))
    got = _grads(layer.to(dtype), x.to(dtype), dy.to(dtype))
    for what, g, e, ex in zip(("y", "dx", "dA", "dB"), got, eager, exact, strict=True):
        assert g.dtype == dtype, f"{what} is {g.dtype}"
        assert_oracle(g, ex, e, msg=f"{dtype} {what} vs PEFT at the same precision")


def test_autocast_casts_like_nn_linear():
    base = _linear(70, 33, seed=81)
    theirs = _peft_layer(base, 8, 8, 0.0, False)
    _randomize_adapter(theirs, seed=82)
    ours = LoraLinear(copy.deepcopy(base), r=8, init_lora_weights=False)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(9, 70, generator=_gen(83))
    dy = torch.randn(9, 33, generator=_gen(84))
    exact = _grads(copy.deepcopy(ours).double(), x.double(), dy.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = _grads(theirs, x, dy)
        got = _grads(ours, x, dy)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    for what, g, e, ex in zip(("y", "dx", "dA", "dB"), got, eager, exact, strict=True):
        assert_oracle(g, ex, e, msg=f"autocast {what} vs PEFT under autocast")


def _tiny_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        LoraLinear(_linear(32, 48, seed=1), r=4, lora_dropout=0.1, init_lora_weights=False),
        nn.GELU(),
        LoraLinear(NF4Linear.from_linear(_linear(48, 40, seed=2)), r=2, init_lora_weights=False),
        nn.GELU(),
        NF4Linear.from_linear(_linear(40, 8, seed=3)),
    )


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    model = _tiny_model().eval()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    x = torch.randn(3, 5, 32, generator=_gen(91))
    dy = torch.randn(3, 5, 8, generator=_gen(92))
    results = []
    for fn in (compiled, model):
        model.zero_grad()
        xx = x.clone().requires_grad_(True)
        y = fn(xx)
        y.backward(dy)
        results.append([y.detach(), xx.grad] + [p.grad.clone() for p in model.parameters() if p.requires_grad])
    for i, (got, want) in enumerate(zip(*results, strict=True)):
        assert_close(got, want, msg=f"{backend}: output/grad #{i} differs from eager")
    if backend == "aot_eager":  # inductor draws its own random numbers; aot_eager uses torch's
        model.train()
        torch.manual_seed(5)
        y1 = compiled(x)
        torch.manual_seed(5)
        assert_close(y1, model(x), msg="training-mode dropout under compile")


# ----------------------------------------------------------------------------------------------
# the Triton launchers (interpreter on CPU; fp32 because the interpreter's bf16 tl.dot is wrong)
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def launcher_calls(monkeypatch):
    """Count calls into fastpeft.kernels.lora_linear."""
    import fastpeft.kernels.lora_linear as mod

    calls = {"fwd": 0, "bwd": 0}
    for kind in calls:
        real = getattr(mod, f"lora_linear_{kind}")

        def counted(*args, _real=real, _kind=kind, **kwargs):
            calls[_kind] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(mod, f"lora_linear_{kind}", counted)
    return calls


@pytest.mark.parametrize(
    "shape,quantized,p,dtype",
    [
        ((17, 70, 33, 4), False, 0.0, torch.float32),
        ((17, 70, 33, 4), True, 0.0, torch.float32),
        ((17, 70, 33, 4), False, 0.25, torch.float32),
        ((17, 70, 33, 4), True, 0.25, torch.float32),
        ((1, 64, 65, 1), True, 0.0, torch.float32),
        ((2, 5, 129, 31, 8), False, 0.1, torch.float16),  # batch dims; fp16 dot is right in the interpreter
    ],
)
def test_triton_backend_matches_reference(launcher_calls, monkeypatch, shape, quantized, p, dtype):
    *lead, k, n, r = shape
    lin = _linear(k, n, seed=101).to(dtype)
    base = NF4Linear.from_linear(lin) if quantized else lin
    layer = LoraLinear(base, r=r, lora_alpha=8, lora_dropout=p, init_lora_weights=False).train()
    _randomize_adapter(layer, seed=102)
    layer.to(dtype)
    layer.base_layer.bias.requires_grad_(True)  # PEFT's bias="all": dbias through the launcher too
    x = torch.randn(*lead, k, generator=_gen(103)).to(dtype)
    dy = torch.randn(*lead, n, generator=_gen(104)).to(dtype)
    results = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("FASTPEFT_BACKEND", backend)
        layer.zero_grad()
        torch.manual_seed(105)  # the same dropout mask for both backends
        results[backend] = _grads(layer, x, dy) + (layer.base_layer.bias.grad,)
    assert launcher_calls == {"fwd": 1, "bwd": 1}, f"the Triton launchers were not used: {launcher_calls}"
    monkeypatch.setenv("FASTPEFT_BACKEND", "reference")
    exact = None
    if p == 0.0:
        ref64 = copy.deepcopy(layer).double()
        exact = _grads(ref64, x.double(), dy.double()) + (ref64.base_layer.bias.grad,)
    for i, what in enumerate(("y", "dx", "dA", "dB", "dbias")):
        got, ref = results["triton"][i], results["reference"][i]
        where = f"triton {what} (shape={shape}, quantized={quantized}, p={p}, {dtype})"
        assert got.dtype == ref.dtype and got.shape == ref.shape, f"{where}: {got.dtype} {got.shape}"
        if exact is not None:
            assert_oracle(got, exact[i], ref, msg=where)
        else:
            assert_close(got, ref, msg=where)


# ----------------------------------------------------------------------------------------------
# CUDA, bf16 (the production dtype; the interpreter cannot check bf16 dot products)
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("m", [1, 17, 300])
def test_cuda_bf16_forward_backward(quantized, m):
    k, n, r = 4096 // 4 + 64, 1024 // 4 + 3, 16  # not multiples of the tiles
    lin = _linear(k, n, seed=m)
    base = NF4Linear.from_linear(lin.to(torch.bfloat16)) if quantized else lin.to(torch.bfloat16)
    layer = LoraLinear(base, r=r, lora_alpha=32, init_lora_weights=False).cuda().eval()
    _randomize_adapter(layer, seed=m + 1)
    x = torch.randn(m, k, generator=_gen(m + 2)).to("cuda", torch.bfloat16)
    dy = torch.randn(m, n, generator=_gen(m + 3)).to("cuda", torch.bfloat16)
    got = _grads(layer, x, dy)
    w = layer.base_layer.dequantize(torch.float64) if quantized else layer.base_layer.weight.double()
    bias = layer.base_layer.bias
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = layer.scaling["default"]

    def math_(x, w, bias, a, b, dy):  # PEFT's unfused computation, in the dtype it is given
        xl, al, bl = (t.detach().clone().requires_grad_(True) for t in (x, a, b))
        y = xl @ w.t() + bias + s * (xl @ al.t()) @ bl.t()
        y.backward(dy)
        return y.detach(), xl.grad, al.grad, bl.grad

    bf16 = torch.bfloat16
    exact = math_(x.double(), w, bias.double(), a.double(), b.double(), dy.double())
    eager = math_(x, w.to(bf16), bias.to(bf16), a.to(bf16), b.to(bf16), dy)
    # y and dx in bf16; the adapters' gradients in the adapters' dtype (float32 over an NF4 base, as PEFT)
    dtypes = (bf16, bf16, a.dtype, b.dtype)
    for what, g, e, ex, dtype in zip(("y", "dx", "dA", "dB"), got, eager, exact, dtypes, strict=True):
        assert g.dtype == dtype and g.is_cuda, f"{what}: {g.dtype} on {g.device}, expected {dtype}"
        assert_oracle(g, ex, e, msg=f"cuda bf16 {what} (quantized={quantized}, m={m})")
