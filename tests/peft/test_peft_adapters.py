"""Bottleneck adapter placements (Pfeiffer, Houlsby, parallel) injected through get_peft_model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import (
    batch,
    build,
    changed_since,
    logits,
    max_diff,
    randomize,
    snapshot,
    train_steps,
    trainable_names,
    twin,
)
from torch import nn

from fastpeft import AdapterConfig, PeftModel, get_peft_model
from fastpeft.peft.adapters import AdapterWrapper

ARCHS = ["llama", "qwen2", "mistral", "gpt2", "bert"]
PLACEMENTS = ["pfeiffer", "houlsby", "parallel"]


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_fresh_adapter_is_exactly_the_base(arch, placement):
    model = build(arch)
    plain = twin(model)
    inputs = batch()
    pm = get_peft_model(model, AdapterConfig(reduction_factor=4, placement=placement, non_linearity="gelu"))
    wrappers = [m for m in pm.modules() if isinstance(m, AdapterWrapper)]
    assert len(wrappers) == 2 * (2 if placement == "houlsby" else 1), f"{arch}/{placement}: {len(wrappers)} wrappers"
    assert max_diff(logits(pm, inputs), logits(plain, inputs)) == 0.0, (
        f"{arch}/{placement}: fresh adapter is not identity"
    )
    randomize(pm, ("bottleneck",), seed=4)
    assert max_diff(logits(pm, inputs), logits(plain, inputs)) > 1e-3, f"{arch}/{placement}: adapter changed nothing"
    assert max_diff(logits(pm.unload(), inputs), logits(plain, inputs)) == 0.0, "unload() did not restore the base"


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_placement_math(placement):
    pm = get_peft_model(build("llama"), AdapterConfig(bottleneck_size=5, placement=placement, scaling=0.7))
    randomize(pm, ("bottleneck",), seed=6)
    layer = pm.get_base_model().model.layers[1]
    x = torch.randn(3, 4, 32)
    mlp = layer.mlp
    assert isinstance(mlp, AdapterWrapper)
    a = mlp.bottleneck["default"]
    with torch.no_grad():
        f = mlp.base_layer(x)
        delta = lambda h: 0.7 * a.up(torch.relu(a.down(h)))  # noqa: E731
        want = f + delta(x) if placement == "parallel" else f + delta(f)
        assert max_diff(mlp(x), want) < 1e-5, f"{placement}: ffn wrapper off by {max_diff(mlp(x), want):.3e}"
        o_proj = layer.self_attn.o_proj
        assert isinstance(o_proj, AdapterWrapper) == (placement == "houlsby")


def test_bert_parallel_adds_beside_the_feed_forward():
    pm = get_peft_model(build("bert"), AdapterConfig(bottleneck_size=6, placement="parallel"))
    randomize(pm, ("bottleneck",), seed=7)
    layer = pm.get_base_model().bert.encoder.layer[0]
    attn_out, inter = torch.randn(2, 5, 32), torch.randn(2, 5, 48)
    a = layer.output.bottleneck["default"]
    inner = layer.output.base_layer
    with torch.no_grad():
        want = inner.LayerNorm(inner.dense(inter) + attn_out + a.up(torch.relu(a.down(attn_out))))
        assert max_diff(layer.output(inter, attn_out), want) < 1e-5


def test_training_save_load_and_unsupported_merge(tmp_path):
    model = build("gpt2")
    plain = twin(model)
    pm = get_peft_model(model, AdapterConfig(bottleneck_size=8, placement="houlsby", target_layers=[1]))
    assert not any(isinstance(m, AdapterWrapper) for m in pm.get_base_model().transformer.h[0].modules())
    pm.train()
    before, trainable = snapshot(pm), trainable_names(pm)
    assert trainable and all(".bottleneck.default." in n for n in trainable), sorted(trainable)[:4]
    inputs = batch(4, 9, seed=8)
    losses = train_steps(pm, inputs, 8, lr=2e-2)
    assert losses[-1] < losses[0] - 0.05, f"loss did not go down: {losses}"
    changed = changed_since(pm, before)
    assert changed == trainable, f"changed outside the adapter: {sorted(changed - trainable)[:4]}"
    pm.eval()
    out = logits(pm, inputs)
    pm.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "BOTTLENECK_ADAPTER" and cfg["placement"] == "houlsby"
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert sorted(keys) == sorted(
        f"base_model.model.transformer.h.1.{p}.bottleneck.{w}.{t}"
        for p in ("attn.c_proj", "mlp")
        for w in ("down", "up")
        for t in ("weight", "bias")
    ), sorted(keys)
    assert keys["base_model.model.transformer.h.1.mlp.bottleneck.down.weight"].shape == (8, 32)
    again = PeftModel.from_pretrained(twin(plain), tmp_path)
    assert max_diff(logits(again, inputs), out) == 0.0, "save -> load changed the outputs"
    with pytest.raises(ValueError, match="not applicable"):
        again.merge_and_unload()
    with again.disable_adapter():
        assert max_diff(logits(again, inputs), logits(plain, inputs)) == 0.0


def test_two_named_adapters_and_delete():
    model = build("qwen2")
    inputs = batch()
    pm = get_peft_model(model, AdapterConfig(bottleneck_size=4))
    pm.add_adapter("b", AdapterConfig(bottleneck_size=6))
    randomize(pm, ("bottleneck",), seed=9)
    out_default = logits(pm, inputs)
    pm.set_adapter("b")
    assert max_diff(logits(pm, inputs), out_default) > 1e-3
    assert all(".bottleneck.b." in n for n, p in pm.named_parameters() if p.requires_grad)
    pm.delete_adapter("b")
    assert pm.active_adapter == "default" and max_diff(logits(pm, inputs), out_default) == 0.0


def test_unknown_architecture_is_named():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])

    with pytest.raises(ValueError, match="Tiny"):
        get_peft_model(Tiny(), AdapterConfig(bottleneck_size=2))
    with pytest.raises(ValueError, match="placement"):
        AdapterConfig(placement="sideways")
    with pytest.raises(ValueError, match="out of range"):
        get_peft_model(build("llama"), AdapterConfig(target_layers=[5]))


def test_adapters_over_a_quantized_base_train():
    from fastpeft import quantize_model
    from fastpeft.nn import NF4Linear

    pm = get_peft_model(quantize_model(build("llama")), AdapterConfig(bottleneck_size=8, placement="houlsby"))
    o_proj = pm.get_base_model().model.layers[0].self_attn.o_proj
    assert isinstance(o_proj, AdapterWrapper) and isinstance(o_proj.base_layer, NF4Linear)
    pm.train()
    inputs = batch(4, 8, seed=10)
    losses = train_steps(pm, inputs, 6, lr=2e-2)
    assert losses[-1] < losses[0] - 0.05, f"loss did not go down: {losses}"
