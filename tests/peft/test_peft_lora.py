"""LoRA through the PEFT API, with the real ``peft`` package as the oracle in both directions."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors import safe_open
from tiny_models import batch, build, logits, max_diff, randomize, train_steps, twin
from torch import nn

from fastpeft import LoraConfig, PeftModel, get_peft_model
from fastpeft.peft.lora import ModulesToSaveWrapper

CASES = [
    ("llama", ["q_proj", "v_proj", "down_proj"], None),
    ("qwen2", "all-linear", None),
    ("mistral", r".*\.(k_proj|o_proj)", None),
    ("gpt2", ["c_attn", "c_fc"], None),
    ("bert", ["query", "value"], ["classifier"]),
]
ATOL = 1e-5  # same fp32 math in both libraries; only summation order differs


def _file(path):
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def _same_files(ours, theirs, where):
    meta_a, a = _file(ours)
    meta_b, b = _file(theirs)
    assert meta_a.pop("format") == meta_b.pop("format") == "pt", f"{where}: metadata {meta_a} vs {meta_b}"
    assert set(meta_a) == {"fastpeft.adapter_config"}, f"{where}: metadata {meta_a}"
    assert sorted(a) == sorted(b), (
        f"{where}: keys differ: only ours {sorted(set(a) - set(b))}, only theirs {sorted(set(b) - set(a))}"
    )
    for k in a:
        assert a[k].shape == b[k].shape, f"{where}: {k} shape {tuple(a[k].shape)} vs {tuple(b[k].shape)}"
        assert torch.equal(a[k], b[k]), f"{where}: {k} values differ by {max_diff(a[k], b[k]):.3e}"


@pytest.mark.parametrize(("arch", "targets", "to_save"), CASES, ids=[c[0] for c in CASES])
def test_ours_loads_in_peft_and_back(arch, targets, to_save, tmp_path):
    base = build(arch)
    oracle_base = twin(base)
    inputs = batch()
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=12, target_modules=targets, modules_to_save=to_save,
                                         init_lora_weights=False))  # fmt: skip
    randomize(pm, ("modules_to_save",), seed=5)  # the saved copy must differ from the frozen original
    ours = logits(pm, inputs)
    assert max_diff(ours, logits(oracle_base, inputs)) > 1e-3, "the adapter changed nothing"
    pm.save_pretrained(tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["inference_mode"] is True and cfg["r"] == 4

    hf = peft.PeftModel.from_pretrained(oracle_base, tmp_path / "ours").eval()
    theirs = logits(hf, inputs)
    assert max_diff(ours, theirs) < ATOL, f"{arch}: peft on our file differs by {max_diff(ours, theirs):.3e}"
    hf.save_pretrained(tmp_path / "theirs")
    _same_files(tmp_path / "ours", tmp_path / "theirs", arch)


@pytest.mark.parametrize(("arch", "targets", "to_save"), CASES[:4], ids=[c[0] for c in CASES[:4]])
def test_peft_file_loads_in_ours(arch, targets, to_save, tmp_path):
    base = build(arch)
    ours_base = twin(base)
    inputs = batch(seed=3)
    hf = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=targets,
                                                   init_lora_weights=False))  # fmt: skip
    hf.eval()
    theirs = logits(hf, inputs)
    hf.save_pretrained(tmp_path / "theirs")
    pm = PeftModel.from_pretrained(ours_base, tmp_path / "theirs")
    ours = logits(pm, inputs)
    assert max_diff(ours, theirs) < ATOL, f"{arch}: our load of peft's file differs by {max_diff(ours, theirs):.3e}"
    assert pm.get_nb_trainable_parameters()[0] == 0, "an adapter loaded for inference must be frozen"
    pm.save_pretrained(tmp_path / "ours")
    _same_files(tmp_path / "ours", tmp_path / "theirs", arch)


def test_training_changes_only_adapter_and_lowers_loss(tmp_path):
    model = build("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1))
    pm.train()
    trainable, total = pm.get_nb_trainable_parameters()
    names = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert names and all(".lora_A.default." in n or ".lora_B.default." in n for n in names), names[:5]
    assert trainable == sum(p.numel() for n, p in pm.named_parameters() if p.requires_grad) and total > trainable
    inputs = batch(4, 9)
    losses = train_steps(pm, inputs, 8, lr=1e-2, optimizer=torch.optim.AdamW)
    assert losses[-1] < losses[0] - 0.05, f"loss did not go down: {losses}"
    after = dict(pm.get_base_model().named_parameters())
    for n, p in before.items():
        key = n if n in after else n.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(after[key], p), f"base parameter {n} changed"
    pm.eval()
    out = logits(pm, inputs)
    pm.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(build("llama"), tmp_path)
    assert max_diff(logits(again, inputs), out) == 0.0, "save -> load changed the outputs"


def test_adapters_by_name_merge_unload_disable(tmp_path):
    model = build("llama")
    plain = twin(model)
    inputs = batch()
    base_out = logits(plain, inputs)
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    pm.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj"], init_lora_weights=False))
    assert pm.active_adapter == "default" and set(pm.peft_config) == {"default", "other"}
    out_default = logits(pm, inputs)
    pm.set_adapter("other")
    out_other = logits(pm, inputs)
    assert max_diff(out_default, out_other) > 1e-3, "switching adapters changed nothing"
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all(".other." in n for n in trainable), trainable[:4]
    with pm.disable_adapter():
        assert max_diff(logits(pm, inputs), base_out) == 0.0, "disable_adapter() is not the base model"
    assert max_diff(logits(pm, inputs), out_other) == 0.0, "leaving disable_adapter() did not restore"
    pm.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "other" / "adapter_config.json").is_file()
    pm.set_adapter("default")
    pm.delete_adapter("other")
    assert list(pm.peft_config) == ["default"] and not any(".other." in n for n, _ in pm.named_parameters())
    assert pm.config is pm.get_base_model().config  # attribute passthrough
    merged = pm.merge_and_unload()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert max_diff(logits(merged, inputs), out_default) < 1e-5, "merge_and_unload changed the outputs"
    loaded = PeftModel.from_pretrained(build("llama"), tmp_path / "other", adapter_name="other")
    assert max_diff(logits(loaded, inputs), out_other) == 0.0
    loaded.load_adapter(tmp_path, "default")
    both = loaded.merge_and_unload(adapter_names=["default", "other"])
    want = peft.PeftModel.from_pretrained(build("llama"), tmp_path / "other", adapter_name="other")
    want.load_adapter(str(tmp_path), "default")
    want = want.merge_and_unload(adapter_names=["default", "other"])
    assert max_diff(logits(both, inputs), logits(want, inputs)) < 1e-5, "merging two adapters differs from peft"


def test_gpt2_conv1d_unload_gives_conv1d_back():
    from transformers.pytorch_utils import Conv1D

    model = build("gpt2")
    inputs = batch()
    base_out = logits(twin(model), inputs)
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    out = logits(pm, inputs)
    merged = pm.merge_and_unload()
    assert isinstance(merged.transformer.h[0].attn.c_attn, Conv1D)
    assert max_diff(logits(merged, inputs), out) < 1e-5
    pm2 = get_peft_model(merged, LoraConfig(r=2, target_modules=["c_fc"]))
    assert max_diff(logits(pm2.unload(), inputs), out) < 1e-5 and max_diff(out, base_out) > 1e-3


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_modes_match_peft(bias, tmp_path):
    base = build("gpt2")
    oracle_base = twin(base)
    inputs = batch(seed=8)
    cfg = dict(r=4, target_modules=["c_attn", "c_fc"], bias=bias, init_lora_weights=False)
    ours = get_peft_model(base, LoraConfig(**cfg))
    hf_probe = peft.get_peft_model(twin(oracle_base), peft.LoraConfig(**cfg))
    hf_train = sorted(n.replace(".default.", ".") for n, p in hf_probe.named_parameters() if p.requires_grad)
    our_train = sorted(n.replace(".default.", ".") for n, p in ours.named_parameters() if p.requires_grad)
    biases = [n for n in our_train if n.endswith("bias")]
    assert biases and our_train == hf_train, f"{bias}: trainable sets differ: {sorted(set(our_train) ^ set(hf_train))}"
    if bias == "lora_only":
        assert all(".base_layer.bias" in n for n in biases), biases
    with torch.no_grad():  # "trained" biases: they must travel with the adapter
        for n, p in ours.named_parameters():
            if p.requires_grad and n.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.1)
    out = logits(ours, inputs)
    ours.save_pretrained(tmp_path / "ours")
    hf = peft.PeftModel.from_pretrained(oracle_base, tmp_path / "ours").eval()
    assert max_diff(out, logits(hf, inputs)) < ATOL, f"{bias}: peft on our file differs"
    hf.save_pretrained(tmp_path / "theirs")
    _same_files(tmp_path / "ours", tmp_path / "theirs", bias)


def test_modules_to_save_naming():
    pm = get_peft_model(build("bert"), LoraConfig(target_modules=["query"], modules_to_save=["classifier"]))
    head = pm.get_base_model().classifier
    assert isinstance(head, ModulesToSaveWrapper)
    names = [n for n, p in pm.named_parameters() if p.requires_grad and "classifier" in n]
    assert names == [
        "base_model.model.classifier.modules_to_save.default.weight",
        "base_model.model.classifier.modules_to_save.default.bias",
    ], names
    assert not head.original_module.weight.requires_grad


def test_nothing_matched_names_targets_and_modules():
    with pytest.raises(ValueError, match=r"(?s)nope.*model\.layers"):
        get_peft_model(build("llama"), LoraConfig(target_modules=["nope"]))
    with pytest.raises(ValueError, match="LlamaRMSNorm; LoRA wraps"):
        get_peft_model(build("llama"), LoraConfig(target_modules=["input_layernorm"]))


def test_seq_cls_trains_the_head_like_peft(tmp_path):
    base = build("bert")
    oracle_base = twin(base)
    inputs = batch(seed=6)
    pm = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query"], init_lora_weights=False))
    assert isinstance(pm.get_base_model().classifier, ModulesToSaveWrapper)
    randomize(pm, ("modules_to_save",), seed=3)
    ours = logits(pm, inputs)
    pm.save_pretrained(tmp_path)
    hf = peft.PeftModel.from_pretrained(oracle_base, tmp_path).eval()
    assert max_diff(ours, logits(hf, inputs)) < ATOL


def test_exclude_and_regex_targets():
    pm = get_peft_model(
        build("llama"),
        LoraConfig(r=2, target_modules="all-linear", exclude_modules=["q_proj", "model.layers.1.mlp.up_proj"]),
    )
    wrapped = {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if type(m).__name__ == "LoraLinear"}
    assert "model.layers.0.self_attn.k_proj" in wrapped and "model.layers.0.mlp.up_proj" in wrapped
    assert not any(n.endswith("q_proj") for n in wrapped) and "model.layers.1.mlp.up_proj" not in wrapped
    assert "lm_head" not in wrapped and len(wrapped) == 2 * 7 - 2 - 1
    pm = get_peft_model(build("llama"), LoraConfig(r=2, target_modules=r"model\.layers\.1\..*_proj"))
    wrapped = {n for n, m in pm.named_modules() if type(m).__name__ == "LoraLinear"}
    assert len(wrapped) == 7 and all(".layers.1." in n for n in wrapped)


def test_default_targets_follow_peft():
    for arch in ("llama", "gpt2", "bert"):
        ours = get_peft_model(build(arch), LoraConfig(r=2))
        hf = peft.get_peft_model(build(arch), peft.LoraConfig(r=2))
        names = sorted(n for n, m in ours.named_modules() if type(m).__name__ == "LoraLinear")
        want = sorted(n for n, m in hf.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
        assert names == want, f"{arch}: default targets {names} vs peft {want}"
        assert ours.get_nb_trainable_parameters() == hf.get_nb_trainable_parameters()


@pytest.mark.parametrize("when", ["before", "after"])
def test_gradient_checkpointing_still_reaches_lora(when):
    model = build("llama")
    model.train()
    if when == "before":
        model.gradient_checkpointing_enable()
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    if when == "after":
        pm.gradient_checkpointing_enable()
    assert pm.get_base_model().is_gradient_checkpointing
    inputs = batch()
    pm(**inputs, labels=inputs["input_ids"]).loss.backward()
    grads = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    missing = [n for n, g in grads.items() if g is None or not bool(g.abs().sum() > 0)]
    assert grads and not missing, f"no gradient reached {missing[:4]}"


def test_plain_module_with_positional_forward(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(13, 24), nn.Linear(24, 5)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    torch.manual_seed(0)
    net = Net()
    plain = twin(net)
    x = torch.randn(3, 13)
    pm = get_peft_model(net, LoraConfig(r=3, target_modules=["fc1"], modules_to_save=["fc2"], init_lora_weights=False))
    out = pm(x)
    assert out.shape == (3, 5) and max_diff(out, plain(x)) > 1e-3
    pm.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(twin(plain), tmp_path)
    assert max_diff(again(x), out) == 0.0


def test_generate_passes_through_to_the_adapted_model():
    pm = get_peft_model(build("qwen2"), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    ids = batch(seed=11)["input_ids"]
    got = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    with pm.disable_adapter():
        plain = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    merged = pm.merge_and_unload()
    want = merged.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert torch.equal(got, want) and not torch.equal(got, plain), f"{got}\n{want}\n{plain}"
