"""BottleneckAdapter: identity at init, activation names, training, the parallel residual, the custom op's
registration, and the Triton path (interpreter) against the reference path end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import INTERPRET, assert_close

from fastpeft.nn import BottleneckAdapter
from fastpeft.ops.adapter import bottleneck_adapter

TORCH_ACTS = {
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
}


def _randomize_up(adapter: BottleneckAdapter, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        adapter.up.weight.copy_(torch.randn(adapter.up.weight.shape, generator=g) * 0.3)
        adapter.up.bias.copy_(torch.randn(adapter.up.bias.shape, generator=g))


@pytest.mark.parametrize("name", sorted(TORCH_ACTS))
def test_identity_at_init(name):
    torch.manual_seed(0)
    adapter = BottleneckAdapter(37, 5, name, scaling=2.0)
    assert torch.count_nonzero(adapter.up.weight) == 0 and torch.count_nonzero(adapter.up.bias) == 0
    assert torch.count_nonzero(adapter.down.weight) > 0
    h = torch.randn(3, 4, 37)
    r = torch.randn(3, 4, 37)
    assert torch.equal(adapter(h), h)
    assert torch.equal(adapter(h, residual=r), r)


@pytest.mark.parametrize("name", sorted(TORCH_ACTS))
def test_activation_names_match_torch(name):
    torch.manual_seed(1)
    adapter = BottleneckAdapter(40, 9, name, scaling=0.6)
    _randomize_up(adapter, 2)
    h = torch.randn(2, 7, 40) * 2
    want = h + 0.6 * adapter.up(TORCH_ACTS[name](adapter.down(h)))
    assert_close(adapter(h), want, msg=f"non_linearity={name}")


@pytest.mark.parametrize("bad", ["tanh", "Gelu_fast", "", "sigmoid"])
def test_bad_activation_names_raise(bad):
    with pytest.raises(ValueError, match="non_linearity must be one of .*gelu_new.*swish"):
        BottleneckAdapter(16, 4, bad)


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="bottleneck_size"):
        BottleneckAdapter(16, 0)
    with pytest.raises(ValueError, match="hidden_size"):
        BottleneckAdapter(-3, 4)
    with pytest.raises(ValueError, match="hidden_size=16"):
        BottleneckAdapter(16, 4)(torch.randn(2, 15))


def test_non_finite_scaling_and_integer_inputs_are_refused():
    for scaling in (float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError, match="scaling must be a finite number"):
            BottleneckAdapter(16, 4, scaling=scaling)
    for h in (torch.randint(-3, 3, (2, 16)), torch.ones(2, 16, dtype=torch.bool)):
        with pytest.raises(TypeError, match=f"floating-point tensor, got {h.dtype}"):
            BottleneckAdapter(16, 4)(h)
    a = BottleneckAdapter(16, 4)
    with pytest.raises(TypeError, match="w_up must be a floating-point tensor, got torch.int64"):
        bottleneck_adapter(torch.randn(2, 16), a.down.weight, a.down.bias, a.up.weight.long(), a.up.bias, 1.0, "relu")


def test_empty_batch_passes_through():
    adapter = BottleneckAdapter(16, 4, "silu")
    _randomize_up(adapter, 1)
    h = torch.randn(0, 5, 16, requires_grad=True)
    y = adapter(h)
    assert y.shape == h.shape
    y.sum().backward()
    assert h.grad.shape == h.shape


def test_trains_with_sgd():
    torch.manual_seed(3)
    adapter = BottleneckAdapter(24, 6, "gelu_new", scaling=1.0)
    h = torch.randn(64, 24)
    g = torch.Generator().manual_seed(1)
    # a shift plus a rank-4 map: within reach of a 6-wide bottleneck
    target = h + 0.5 + h @ (torch.randn(24, 4, generator=g) @ torch.randn(4, 24, generator=g)) * 0.1
    opt = torch.optim.SGD(adapter.parameters(), lr=0.05)
    down_before = adapter.down.weight.detach().clone()
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = (adapter(h) - target).square().sum(-1).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], f"loss went {losses[0]:.4f} -> {losses[-1]:.4f}"
    assert not torch.equal(adapter.down.weight, down_before), "down never trained"


def test_parallel_residual_and_input_gradients():
    # parallel placement: y = ffn_out + s·adapter(ffn_in); both inputs get their gradient
    torch.manual_seed(4)
    adapter = BottleneckAdapter(30, 8, "relu", scaling=0.5)
    _randomize_up(adapter, 5)
    h = torch.randn(3, 11, 30, requires_grad=True)
    r = torch.randn(3, 11, 30, requires_grad=True)
    dy = torch.randn(3, 11, 30)
    adapter(h, residual=r).backward(dy)
    assert torch.equal(r.grad, dy)
    h2 = h.detach().clone().requires_grad_()
    ref = 0.5 * adapter.up(F.relu(adapter.down(h2)))
    ref.backward(dy)
    assert_close(h.grad, h2.grad, msg="dh with a separate residual")


def test_float32_params_with_half_activations():
    torch.manual_seed(6)
    adapter = BottleneckAdapter(32, 4, "silu")
    _randomize_up(adapter, 7)
    h = torch.randn(5, 32).half()
    y = adapter(h)
    assert y.dtype == torch.float16
    y.float().sum().backward()
    assert adapter.up.weight.grad.dtype == torch.float32 and adapter.down.bias.grad.dtype == torch.float32
    assert torch.count_nonzero(adapter.down.weight.grad) > 0


def test_custom_op_registration():
    torch.manual_seed(8)
    args = (
        torch.randn(6, 20, requires_grad=True),
        torch.randn(3, 20, requires_grad=True),
        torch.randn(3, requires_grad=True),
        torch.randn(20, 3, requires_grad=True),
        torch.randn(20, requires_grad=True),
    )
    op = torch.ops.fastpeft.bottleneck_adapter_fwd.default
    for residual in (None, torch.randn(6, 20, requires_grad=True)):
        torch.library.opcheck(op, (*args, residual, 0.5, "gelu_tanh"), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif(not INTERPRET, reason="FASTPEFT_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("name", ["swish", "gelu_new"])
@pytest.mark.parametrize("parallel", [False, True])
def test_triton_backend_matches_reference_backend(monkeypatch, name, parallel):
    torch.manual_seed(9)
    adapter = BottleneckAdapter(36, 10, name, scaling=0.7)
    _randomize_up(adapter, 10)
    h = torch.randn(2, 9, 36)
    r = torch.randn(2, 9, 36) if parallel else None
    dy = torch.randn(2, 9, 36)

    def run(backend):
        monkeypatch.setenv("FASTPEFT_BACKEND", backend)
        adapter.zero_grad()
        x = h.clone().requires_grad_()
        y = adapter(x, residual=r)
        y.backward(dy)
        return [y.detach(), x.grad] + [p.grad.clone() for p in adapter.parameters()]

    ref, tri = run("reference"), run("triton")
    names = ["y", "dh"] + [n for n, _ in adapter.named_parameters()]
    for n, a, b in zip(names, tri, ref, strict=True):
        # float32 chained reductions: the table's float32 tolerance at the scale of the result
        assert_close(a, b, msg=f"{n} triton vs reference ({name}, parallel={parallel})")


def test_bottleneck_wider_than_fused_kernel_runs_unfused(monkeypatch):
    import fastpeft.kernels.adapter as kernels
    from fastpeft.ops.adapter import MAX_FUSED_BOTTLENECK

    def refuse(*args, **kwargs):
        raise AssertionError("the fused launcher must not run for this bottleneck")

    monkeypatch.setattr(kernels, "adapter_fwd", refuse)
    monkeypatch.setattr(kernels, "adapter_bwd", refuse)
    torch.manual_seed(10)
    b = MAX_FUSED_BOTTLENECK + 1
    adapter = BottleneckAdapter(24, b, "relu")
    _randomize_up(adapter, 11)
    h = torch.randn(5, 24)

    def run(backend):
        monkeypatch.setenv("FASTPEFT_BACKEND", backend)
        adapter.zero_grad()
        x = h.clone().requires_grad_()
        y = adapter(x)
        y.sum().backward()
        return [y.detach(), x.grad] + [p.grad.clone() for p in adapter.parameters()]

    for a, r in zip(run("triton"), run("reference"), strict=True):
        assert torch.equal(a, r)
