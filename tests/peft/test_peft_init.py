"""``init_lora_weights`` variants that start from the base weight (PiSSA, OLoRA, orthogonal): the same
adapter and residual base as HF PEFT from the same seed, and PiSSA on an NF4 base without a 16-bit copy."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from conftest import assert_close, stable_seed
from tiny_models import batch, build, logits, max_diff
from torch import nn

import fastpeft
from fastpeft.nn import LoraLinear, NF4Linear


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 9))


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_3", "olora", "orthogonal"])
def test_weight_based_init_matches_peft(init):
    base = _mlp(stable_seed("init", init))
    cfg = dict(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=init)
    torch.manual_seed(7)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    torch.manual_seed(7)
    ours = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**cfg))
    for idx in ("0", "2"):
        t, o = theirs.base_model.model[int(idx)], ours.base_model.model[int(idx)]
        for what, a, b in [
            ("lora_A", o.lora_A["default"].weight, t.lora_A["default"].weight),
            ("lora_B", o.lora_B["default"].weight, t.lora_B["default"].weight),
            ("residual base", o.base_layer.weight, t.base_layer.weight),
        ]:
            assert_close(a, b, msg=f"{init} layer {idx} {what}")
    x = torch.randn(5, 12)
    with torch.no_grad():
        assert_close(ours(x), base(x), msg=f"{init}: the adapted model must start as the base")
        assert_close(ours(x), theirs(x), msg=f"{init}: vs peft")
    if init != "orthogonal":
        assert max_diff(ours.base_model.model[0].base_layer.weight, base[0].weight) > 1e-3, "base not rewritten"


def test_weight_based_init_refusals():
    with pytest.raises(ValueError, match="rank to be even"):
        fastpeft.get_peft_model(_mlp(0), fastpeft.LoraConfig(r=3, target_modules=["0"], init_lora_weights="orthogonal"))
    with pytest.raises(ValueError, match="r <= min"):
        fastpeft.get_peft_model(_mlp(0), fastpeft.LoraConfig(r=13, target_modules=["0"], init_lora_weights="pissa"))
    for refused in ("loftq", "corda", "eva", "lora_ga", "mica"):
        with pytest.raises(ValueError, match=f"init_lora_weights='{refused}' is not supported by fastpeft"):
            fastpeft.LoraConfig(init_lora_weights=refused)
    emb = fastpeft.LoraConfig(target_modules=["0"], init_lora_weights="pissa")
    with pytest.raises(ValueError, match="not supported for embedding"):
        fastpeft.get_peft_model(nn.Sequential(nn.Embedding(9, 4)), emb)


def test_pissa_on_nf4_requantizes_each_layer_in_place():
    dense = build("llama")
    model = fastpeft.quantize_model(copy.deepcopy(dense), skip=())
    before = {n: m.dequantize(torch.float32) for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    del before["lm_head"]  # all-linear leaves the output head alone
    pm = fastpeft.get_peft_model(
        model, fastpeft.LoraConfig(r=4, lora_alpha=4, target_modules="all-linear", init_lora_weights="pissa")
    )
    layers = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules() if isinstance(m, LoraLinear)}
    assert len(layers) == len(before) and all(isinstance(m.base_layer, NF4Linear) for m in layers.values())
    dense_left = [n for n, m in pm.named_modules() if type(m) is nn.Linear and ".lora_" not in n]
    assert not dense_left, f"a dense weight was kept: {dense_left}"
    for name, layer in layers.items():
        residual = layer.base_layer.dequantize(torch.float32)
        rebuilt = residual + layer.get_delta_weight("default")
        # one NF4 rounding of the residual: at most half the widest code gap (0.30) times its block absmax
        bound = 0.16 * residual.abs().max().item()
        assert max_diff(rebuilt, before[name]) <= bound, f"{name}: base + adapter drifted from the NF4 weight"
        assert max_diff(residual, before[name]) > 10 * bound / 16, f"{name}: the base was not rewritten"
    inputs = batch()
    assert max_diff(logits(pm, inputs), logits(dense, inputs)) < 0.2
