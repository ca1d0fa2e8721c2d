"""DoRA and QDoRA through the PEFT API, with the real ``peft`` package as the oracle: outputs, files in both
directions, gradients and training steps, dropout, merging, NF4 bases against HF PEFT on the dequantized twin."""

from __future__ import annotations

import peft
import pytest
import torch
from safetensors import safe_open
from tiny_models import batch, build, logits, max_diff, nf4_and_dense_twin, train_steps, twin

from fastpeft import LoraConfig, PeftModel, get_base_model_state_dict, get_peft_model

TARGETS = ["q_proj", "v_proj", "down_proj"]
ATOL = 1e-5  # same fp32 math in both libraries; the norm's summation order differs


def _randomize_dora(model, seed: int = 2) -> None:
    """Fresh LoRA weights and magnitudes away from the row norms (so the rescaling is visible)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_A" in n or "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "lora_magnitude_vector" in n:
                p.mul_(1 + 0.5 * torch.rand(p.shape, generator=g))


def _keys(path) -> list[str]:
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        return sorted(f.keys())


def _ours(base, **kw):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True, **kw)
    pm = get_peft_model(base, config)
    _randomize_dora(pm)
    return pm


def _grads(model) -> dict[str, torch.Tensor]:
    return {n.replace(".base_layer", ""): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _backward(model, inputs) -> None:
    model.zero_grad(set_to_none=True)
    model(**inputs, labels=inputs["input_ids"]).loss.backward()


def _same_grads(ours, theirs, where: str) -> None:
    a, b = _grads(ours), _grads(theirs)
    assert sorted(a) == sorted(b), f"{where}: trainable names differ: {sorted(set(a) ^ set(b))}"
    assert any("lora_magnitude_vector" in n for n in a), f"{where}: no magnitude trains"
    for n in a:
        assert a[n].abs().max() > 0, f"{where}: {n} has a zero gradient, the check would prove nothing"
        assert max_diff(a[n], b[n]) < 1e-5, f"{where}: gradient of {n} differs by {max_diff(a[n], b[n]):.3e}"


def test_ours_loads_in_peft_with_the_same_outputs_keys_and_gradients(tmp_path):
    base = build("llama")
    pm = _ours(twin(base))
    pm.save_pretrained(tmp_path / "ours")
    hf = peft.PeftModel.from_pretrained(twin(base), tmp_path / "ours", is_trainable=True)
    inputs = batch()
    got, want = logits(pm, inputs), logits(hf, inputs)
    assert max_diff(got, want) < ATOL, f"fastpeft vs peft DoRA logits: {max_diff(got, want):.3e}"
    assert max_diff(got, logits(base, inputs)) > 1e-3, "the adapter changes nothing: the check would prove nothing"
    hf.save_pretrained(tmp_path / "theirs")
    keys = _keys(tmp_path / "ours")
    assert keys == _keys(tmp_path / "theirs"), "adapter_model.safetensors keys differ from HF PEFT's"
    assert sum(k.endswith(".lora_magnitude_vector") for k in keys) == 2 * len(TARGETS), keys
    pm.train(), hf.train()
    _backward(pm, inputs)
    _backward(hf, inputs)
    _same_grads(pm, hf, "dense DoRA")


def test_peft_file_loads_in_ours_and_trains_like_peft(tmp_path):
    base = build("llama")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True, init_lora_weights=False)
    hf = peft.get_peft_model(twin(base), config)
    _randomize_dora(hf, seed=5)
    hf.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(twin(base), tmp_path, is_trainable=True)
    inputs = batch(seed=3)
    assert max_diff(logits(ours, inputs), logits(hf, inputs)) < ATOL
    ours.train(), hf.train()
    before = {n: p.detach().clone() for n, p in ours.named_parameters() if p.requires_grad}
    for model in (ours, hf):
        train_steps(model, inputs, 3, lr=1e-2)
    changed = {n for n, p in ours.named_parameters() if p.requires_grad and not torch.equal(p.detach(), before[n])}
    assert changed == set(before) and any("lora_magnitude_vector" in n for n in changed), sorted(set(before) - changed)
    theirs = dict(hf.named_parameters())
    for n, p in ours.named_parameters():
        if p.requires_grad:
            assert max_diff(p, theirs[n]) < 1e-5, f"after 3 Adam steps {n} differs by {max_diff(p, theirs[n]):.3e}"
    ours.eval(), hf.eval()
    assert max_diff(logits(ours, inputs), logits(hf, inputs)) < ATOL, "trained logits differ"


def test_dropout_in_training_matches_peft(tmp_path):
    """HF PEFT rescales the base on the dropped-out input in training; the same seed draws the same masks."""
    base = build("llama")
    pm = _ours(twin(base), lora_dropout=0.3)
    pm.save_pretrained(tmp_path)
    hf = peft.PeftModel.from_pretrained(twin(base), tmp_path, is_trainable=True)
    pm.train(), hf.train()
    inputs = batch()
    outs = []
    for model in (pm, hf):
        torch.manual_seed(7)
        _backward(model, inputs)
        torch.manual_seed(7)
        with torch.no_grad():
            outs.append(model(**inputs).logits)
    assert max_diff(*outs) < ATOL, f"training-mode logits with dropout: {max_diff(*outs):.3e}"
    _same_grads(pm, hf, "DoRA with dropout")
    pm.eval()
    with torch.no_grad():
        assert max_diff(pm(**inputs).logits, outs[0]) > 1e-4, "dropout changed nothing: the check would prove nothing"


def test_merge_and_unload_and_unmerge_equal_the_unmerged_forward():
    base = build("llama")
    pm = _ours(twin(base))
    inputs = batch()
    want = logits(pm, inputs)
    weight = pm.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    pm.merge_adapter()
    assert max_diff(logits(pm, inputs), want) < ATOL, "merge_adapter changed the outputs"
    pm.unmerge_adapter()
    assert max_diff(pm.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, weight) < 1e-6
    assert max_diff(logits(pm, inputs), want) < ATOL, "unmerge_adapter changed the outputs"
    merged = pm.merge_and_unload()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert max_diff(logits(merged, inputs), want) < ATOL, "merge_and_unload changed the outputs"


def test_qdora_on_nf4_equals_peft_on_the_dequantized_twin(tmp_path):
    model, dense = nf4_and_dense_twin()
    pm = _ours(model, init_lora_weights=False)
    pm.save_pretrained(tmp_path)
    hf = peft.PeftModel.from_pretrained(dense, tmp_path, is_trainable=True)
    inputs = batch()
    assert max_diff(logits(pm, inputs), logits(hf, inputs)) < 1e-4, "QDoRA vs HF PEFT on dequant(W)"
    pm.train(), hf.train()
    _backward(pm, inputs)
    _backward(hf, inputs)
    _same_grads(pm, hf, "QDoRA")
    fresh = get_peft_model(nf4_and_dense_twin()[0], LoraConfig(r=4, target_modules=TARGETS, use_dora=True))
    assert max_diff(logits(fresh, inputs), logits(fresh.get_base_model(), inputs)) < 1e-5, (
        "a new QDoRA adapter (B = 0, m = ‖W‖) must start as the base"
    )
    merged = pm.eval().merge_and_unload()
    assert max_diff(logits(merged, inputs), logits(hf.eval(), inputs)) < 1e-4, "merged QDoRA"


def test_gpt2_conv1d_dora_matches_peft(tmp_path):
    base = build("gpt2")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], use_dora=True)
    pm = get_peft_model(twin(base), config)
    _randomize_dora(pm)
    pm.save_pretrained(tmp_path)
    hf = peft.PeftModel.from_pretrained(twin(base), tmp_path)
    inputs = batch()
    assert max_diff(logits(pm, inputs), logits(hf, inputs)) < ATOL, "GPT-2 Conv1D DoRA vs peft"


def test_unsupported_dora_targets_and_uses_are_refused_by_name():
    with pytest.raises(ValueError, match="lora_bias"):
        LoraConfig(use_dora=True, lora_bias=True)
    attention = torch.nn.ModuleDict({"mha": torch.nn.MultiheadAttention(8, 2)})  # embeddings and convs take DoRA
    with pytest.raises(ValueError, match="mha.*MultiheadAttention"):
        get_peft_model(attention, LoraConfig(target_modules=["mha"], use_dora=True))
    with pytest.raises(ValueError, match="target_parameters"):
        get_peft_model(build("llama"), LoraConfig(target_parameters=["mlp.up_proj.weight"], use_dora=True))


def test_base_model_state_dict_leaves_out_the_magnitude_vector():
    # HF PEFT's test_get_base_model_state_dict: the base model's keys exactly, the DoRA magnitude is adapter state
    base = build("llama")
    keys = set(base.state_dict())
    pm = get_peft_model(twin(base), LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"], use_dora=True))
    assert any("lora_magnitude_vector" in k for k in pm.state_dict())
    extracted = get_base_model_state_dict(pm)
    assert set(extracted) == keys
    assert all(torch.equal(extracted[k], v) for k, v in base.state_dict().items())


def test_a_fresh_dora_adapter_returns_the_base_output_bit_for_bit_as_peft_does():
    """At initialization (B = 0, m = the row norms) DoRA is a no-op: the layer's output is the base layer's, exactly
    (float32, CPU), in eval and in training without dropout, as HF PEFT's is (its test_lora_use_dora_linear)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(1000, 300)  # wide enough that x·Wᵀ + bias rounds apart from the base's addmm
    x = torch.randn(17, 1000)
    want = lin(x)
    assert not torch.equal(x @ lin.weight.t() + lin.bias, want), "the two orders agree here: the check proves nothing"
    ours = get_peft_model(torch.nn.Sequential(twin(lin)), LoraConfig(r=4, target_modules=["0"], use_dora=True))
    hf = peft.get_peft_model(torch.nn.Sequential(twin(lin)), peft.LoraConfig(r=4, target_modules=["0"], use_dora=True))
    for train in (False, True):
        with torch.no_grad():
            got, theirs = ours.train(train)(x), hf.train(train)(x)
        assert torch.equal(theirs, want), "HF PEFT's own no-op, the premise of this test"
        assert torch.equal(got, want), f"training={train}: {max_diff(got, want):.3e} from the base output"
