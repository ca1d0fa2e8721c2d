"""Mixed-adapter batches through ``LoraLinear``: every row's adapter in one batched op (reference on the CPU,
the Triton kernels under the interpreter or on a GPU), equal to running each row with its adapter active."""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, INTERPRET, assert_close, assert_oracle
from torch import nn

from fastpeft.nn import LoraLinear, NF4Linear, lora_mixed

BACKENDS = ["reference"] + (["triton"] if HAS_CUDA or INTERPRET else [])


def _layer(quantized: bool, seed: int = 0) -> LoraLinear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(64, 40)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(40, 64, generator=g) * 0.2)
        lin.bias.copy_(torch.randn(40, generator=g))
    layer = LoraLinear(NF4Linear.from_linear(lin.to(torch.bfloat16)) if quantized else lin, r=2, lora_alpha=4,
                       adapter_name="a")  # fmt: skip
    layer.update_layer("b", r=8, lora_alpha=8, lora_bias=True)
    layer.update_layer("c", r=20, lora_alpha=10, use_rslora=True)  # padded to 32
    with torch.no_grad():
        for name in ("a", "b", "c"):
            for p in layer._adapter_tensors(name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return layer.eval()


def _row_by_row(layer: LoraLinear, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    """Each row alone with its adapter active (the base for ``__base__``)."""
    rows = []
    with torch.no_grad():
        for i, name in enumerate(names):
            if name == "__base__":
                rows.append(layer.base_layer(x[i : i + 1]))
            else:
                layer.set_adapter(name)
                rows.append(layer(x[i : i + 1]))
    layer.set_adapter("a")
    return torch.cat(rows)


@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = lora_mixed.lora_batched_delta
    monkeypatch.setattr(lora_mixed, "lora_batched_delta", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    return calls


NAMES = ["b", "__base__", "a", "c", "b", "c"]


def _exact(layer: LoraLinear, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    """float64: the base output (as the layer computes it) plus each row's update from the float64 input."""
    with torch.no_grad():
        out = layer.base_layer(x).double()
        for i, name in enumerate(names):
            if name != "__base__":
                a, b = layer.lora_A[name].weight.double(), layer.lora_B[name].weight.double()
                d = x[i].double() @ a.t() @ b.t()
                if layer.lora_B[name].bias is not None:
                    d = d + layer.lora_B[name].bias.double()
                out[i] += layer.scaling[name] * d
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("quantized,dtype", [(False, torch.float32), (True, torch.float32), (True, torch.bfloat16)])
def test_mixed_batch_runs_one_batched_op_equal_to_row_by_row(monkeypatch, spy, backend, quantized, dtype):
    if backend == "triton" and dtype == torch.bfloat16 and not HAS_CUDA:
        pytest.skip("the interpreter's bf16 tl.dot is wrong (triton-lang/triton#11584): the NF4 base runs on a GPU")
    monkeypatch.setenv("FASTPEFT_BACKEND", backend)
    layer = _layer(quantized)
    x = torch.randn(len(NAMES), 3, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        got = layer(x, adapter_names=NAMES)
    assert spy == [(len(NAMES) * 3, 40)], "the batch did not run as one batched op"
    want = _row_by_row(layer, x, NAMES)
    if dtype == torch.float32:
        assert_close(got, want)
    else:  # the loop rounds each update to bf16 before adding it; the batched op rounds the sum once
        assert_oracle(got, _exact(layer, x, NAMES), want, msg="bf16 mixed batch")


def test_training_graph_falls_back_to_the_loop_with_gradients(spy):
    layer = _layer(False).train()
    x = torch.randn(len(NAMES), 64)
    y = layer(x, adapter_names=NAMES)
    assert spy == [], "autograd needs the loop, not the inference-only op"
    y.square().sum().backward()
    assert layer.lora_A["a"].weight.grad is not None and layer.lora_B["a"].weight.grad is not None
    with torch.no_grad():
        assert_close(layer.eval()(x, adapter_names=NAMES), y.detach())
    assert len(spy) == 1


def test_stacked_adapters_follow_weight_and_scaling_changes(spy):
    layer = _layer(False)
    x = torch.randn(len(NAMES), 64)
    with torch.no_grad():
        first = layer(x, adapter_names=NAMES)
        again = layer(x, adapter_names=NAMES)
        assert torch.equal(first, again)
        layer.lora_B["c"].weight.mul_(-2)  # in place, as an optimizer step
        layer.set_scale("a", 3.0)
        changed = layer(x, adapter_names=NAMES)
        assert_close(changed, _row_by_row(layer, x, NAMES))
        assert not torch.allclose(changed, first)
        layer.update_layer("a", r=4, lora_alpha=4)  # replaced: a new parameter object
        assert_close(layer(x, adapter_names=NAMES), _row_by_row(layer, x, NAMES))


def test_names_the_layer_lacks_and_bad_lengths():
    layer = _layer(False)
    x = torch.randn(3, 64)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"no adapter named \['elsewhere'\] in this layer"):  # issue 25 item 9
            layer(x, adapter_names=["elsewhere", "a", "__base__"])
        got = layer(x, adapter_names=["__base__", "a", "__base__"])
        assert_close(got, _row_by_row(layer, x, ["__base__", "a", "__base__"]))
        with pytest.raises(ValueError, match="one name per row"):
            layer(x, adapter_names=["a", "b"])


def test_ranks_past_the_kernels_use_the_loop(spy):
    layer = _layer(False)
    layer.update_layer("wide", r=130, lora_alpha=8)
    with torch.no_grad():
        for p in layer._adapter_tensors("wide"):
            p.normal_(0, 0.1)
        x = torch.randn(2, 64)
        got = layer(x, adapter_names=["wide", "a"])
    assert spy == []
    assert_close(got, _row_by_row(layer, x, ["wide", "a"]))


@pytest.mark.skipif(not (HAS_CUDA or INTERPRET), reason="the tile plan belongs to the Triton path")
def test_one_tile_plan_serves_every_layer_of_a_forward(monkeypatch):
    from fastpeft.kernels import lora_batched

    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    monkeypatch.setattr(lora_mixed, "_PLANS", type(lora_mixed._PLANS)())
    planned = []
    real = lora_batched.plan_tiles
    monkeypatch.setattr(lora_batched, "plan_tiles", lambda *a, **k: planned.append(1) or real(*a, **k))
    first, second = _layer(False, seed=1), _layer(False, seed=2)  # two layers of one model
    x = torch.randn(len(NAMES), 64)
    with torch.no_grad():
        for _ in range(2):  # two forwards of the same batch
            got = [layer(x, adapter_names=NAMES) for layer in (first, second)]
        assert len(planned) == 1, "every layer and the repeated batch should reuse the first plan"
        for layer, y in zip((first, second), got, strict=True):
            assert_close(y, _row_by_row(layer, x, NAMES))
        first(x, adapter_names=list(reversed(NAMES)))
    assert len(planned) == 2


def _embedding_layer() -> nn.Module:
    from fastpeft.nn import LoraEmbedding

    g = torch.Generator().manual_seed(3)
    layer = LoraEmbedding(nn.Embedding(50, 24), r=2, lora_alpha=4, adapter_name="a")
    layer.update_layer("c", r=20, lora_alpha=10)
    with torch.no_grad():
        for name in ("a", "c"):
            for p in layer._adapter_tensors(name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return layer.eval()


@pytest.mark.parametrize("backend", BACKENDS)
def test_embedding_mixed_batch_gathers_and_expands_in_one_op(monkeypatch, backend):
    monkeypatch.setenv("FASTPEFT_BACKEND", backend)
    monkeypatch.setattr(lora_mixed, "_PLANS", type(lora_mixed._PLANS)())
    calls = []
    real = lora_mixed.lora_batched_expand
    monkeypatch.setattr(lora_mixed, "lora_batched_expand", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    layer = _embedding_layer()
    ids = torch.randint(0, 50, (4, 5), generator=torch.Generator().manual_seed(4))
    names = ["c", "__base__", "a", "c"]
    with torch.no_grad():
        got = layer(ids, adapter_names=names)
        want = _row_by_row(layer, ids, names)
    assert calls == [(4 * 5, 32)], "the batch did not run as one expand (rank 20 padded to 32)"
    assert_close(got, want)
    assert not torch.allclose(got[0], layer.base_layer(ids[0])), "the adapter changes nothing"
