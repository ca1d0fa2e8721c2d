"""HF PEFT's everyday surface on fastpeft: keyword arguments, PeftModel methods, module functions and config
methods, each against the real ``peft`` package where both libraries have it."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from conftest import assert_close
from tiny_models import batch, build, logits, max_diff, nf4_and_dense_twin
from torch import nn

import fastpeft
from fastpeft import LoraConfig, PeftModel, TaskType, get_peft_model
from fastpeft.nn import NF4Linear


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 12)
        self.lin1 = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


def _randomized(pm, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in pm.peft_config:
            for t in fastpeft.get_peft_model_state_dict(pm, adapter_name=name).values():
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
    return pm


def _two_adapters(lib, base, **kw):
    pm = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(r=2, target_modules=["lin0", "lin1"], **kw))
    pm.add_adapter("other", lib.LoraConfig(r=3, lora_alpha=5, target_modules=["lin0"], **kw))
    return pm


def _copy_adapters(src, dst):
    for name in src.peft_config:
        sd = peft.get_peft_model_state_dict(src, adapter_name=name)
        result = fastpeft.set_peft_model_state_dict(dst, sd, adapter_name=name)
        assert not result.missing_keys and not result.unexpected_keys, result


def test_multiple_active_adapters_merge_and_layers_switches_match_peft():
    torch.manual_seed(0)
    base, x = MLP(), torch.randn(5, 10)
    theirs = _two_adapters(peft, base, init_lora_weights=False)
    ours = _randomized(_two_adapters(fastpeft, base), 1)
    _copy_adapters(theirs, ours)
    theirs.base_model.set_adapter(["default", "other"])
    ours.base_model.set_adapter(["default", "other"])
    assert ours.active_adapters == ["default", "other"] == theirs.active_adapters
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in theirs.named_parameters() if p.requires_grad}
    want = theirs(x)
    assert_close(ours(x), want, msg="two active adapters")
    ours.merge_adapter()
    assert_close(ours(x), want, msg="merged")
    ours.unmerge_adapter()
    assert_close(ours(x), want, msg="unmerged")
    ours.disable_adapter_layers()
    assert_close(ours(x), base(x), msg="disabled layers")
    assert not any(p.requires_grad for p in ours.parameters())
    ours.enable_adapter_layers()
    assert_close(ours(x), want, msg="enabled again")
    with ours.disable_adapter():
        assert not any(p.requires_grad for p in ours.parameters()), "adapters train inside disable_adapter()"
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == trainable
    ours.set_adapter("other", inference_mode=True)
    assert not any(p.requires_grad for p in ours.parameters())
    with pytest.raises(ValueError, match="supports only 1 adapter with bias"):
        ours.add_adapter("biased", LoraConfig(target_modules=["lin0"], bias="all"))
    ours.delete_adapter("default")
    ours.delete_adapter("other")
    assert ours.peft_config == {} and ours.active_adapters == []
    assert_close(ours(x), base(x), msg="every adapter deleted")


def test_mixed_adapter_batch_matches_peft():
    torch.manual_seed(1)
    base, x = MLP(), torch.randn(4, 10)
    theirs = _two_adapters(peft, base, init_lora_weights=False).eval()
    ours = _two_adapters(fastpeft, base).eval()
    _copy_adapters(theirs, ours)
    names = ["other", "__base__", "default", "other"]
    assert_close(ours(x, adapter_names=names), theirs(x, adapter_names=names), msg="mixed batch")
    with torch.no_grad():  # inference: every adapter of the batch in one batched op
        assert_close(ours(x, adapter_names=names), theirs(x, adapter_names=names), msg="batched op")
    with pytest.raises(ValueError, match="non-existing adapter"):
        ours(x, adapter_names=["nope"] * 4)
    with pytest.raises(ValueError, match="training mode"):
        ours.train()(x, adapter_names=names)


@pytest.mark.parametrize("kind", ["linear", "cat", "svd"])
def test_add_weighted_adapter_matches_peft(kind):
    torch.manual_seed(2)
    base, x = MLP(), torch.randn(5, 10)
    make = lambda lib: lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(r=2, target_modules=["lin0", "lin1"]))  # noqa: E731
    theirs, ours = make(peft), make(fastpeft)
    for lib, pm in ((peft, theirs), (fastpeft, ours)):
        pm.add_adapter("b", lib.LoraConfig(r=2, lora_alpha=6, target_modules=["lin0"]))
    for name in ("default", "b"):
        with torch.no_grad():
            for t in peft.get_peft_model_state_dict(theirs, adapter_name=name).values():
                t.normal_(0, 0.3)
        fastpeft.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs, adapter_name=name), name)
    theirs.add_weighted_adapter(["default", "b"], [0.7, -1.3], "mix", combination_type=kind)
    ours.add_weighted_adapter(["default", "b"], [0.7, -1.3], "mix", combination_type=kind)
    theirs.set_adapter("mix")
    ours.set_adapter("mix")
    assert ours.peft_config["mix"].r == theirs.peft_config["mix"].r
    assert_close(ours(x), theirs(x), msg=f"add_weighted_adapter {kind}")


def test_state_dict_functions_match_peft(tmp_path):
    base = build("gpt2")
    original = {k: v.clone() for k, v in base.state_dict().items()}
    cfg = dict(r=2, target_modules=["c_attn", "c_fc"], modules_to_save=["ln_f"])
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **cfg))
    ours = get_peft_model(base, LoraConfig(**cfg))
    sd = peft.get_peft_model_state_dict(theirs)
    assert fastpeft.set_peft_model_state_dict(ours, sd) == ([], [])
    got = fastpeft.get_peft_model_state_dict(ours)
    assert sorted(got) == sorted(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    from_sd = fastpeft.get_peft_model_state_dict(ours, state_dict=ours.state_dict())
    assert sorted(from_sd) == sorted(sd)
    result = fastpeft.set_peft_model_state_dict(ours, {**sd, "junk": torch.zeros(1)})
    assert result.unexpected_keys == ["junk"] and result.missing_keys == []
    inputs = batch()
    assert max_diff(logits(ours, inputs), logits(theirs, inputs)) < 1e-5
    base_sd = fastpeft.get_base_model_state_dict(ours)
    assert sorted(base_sd) == sorted(original)
    for k, v in original.items():
        assert torch.equal(base_sd[k], v), f"{k}: the base state dict differs (Conv1D layout?)"
    theirs_base = peft.get_base_model_state_dict(theirs)
    assert sorted(theirs_base) == sorted(base_sd)
    perturbed = {k: v + 1 if v.is_floating_point() else v for k, v in original.items()}
    assert fastpeft.set_base_model_state_dict(ours, perturbed) == ([], [])
    assert all(torch.equal(fastpeft.get_base_model_state_dict(ours)[k], perturbed[k]) for k in original)


def test_inject_adapter_in_model_matches_peft():
    torch.manual_seed(3)
    base = MLP()
    cfg = dict(r=2, target_modules=["lin0"])
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**cfg), copy.deepcopy(base))
    ours = fastpeft.inject_adapter_in_model(LoraConfig(**cfg), copy.deepcopy(base))
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in theirs.named_parameters() if p.requires_grad
    }
    sd = peft.get_peft_model_state_dict(theirs)
    assert (
        sorted(fastpeft.get_peft_model_state_dict(ours)) == sorted(sd) == ["lin0.lora_A.weight", "lin0.lora_B.weight"]
    )
    meta = fastpeft.inject_adapter_in_model(LoraConfig(**cfg), copy.deepcopy(base), low_cpu_mem_usage=True)
    assert "meta" in {p.device.type for p in meta.parameters()}
    fastpeft.set_peft_model_state_dict(meta, sd, low_cpu_mem_usage=True)
    assert {p.device.type for p in meta.parameters()} == {"cpu"}


def test_keyword_arguments_peft_accepts(tmp_path):
    torch.manual_seed(4)
    pm = get_peft_model(MLP(), LoraConfig(target_modules=["lin0"]), autocast_adapter_dtype=True, revision="main")
    assert pm.peft_config["default"].revision == "main"
    pm.save_pretrained(tmp_path, safe_serialization=True, save_embedding_layers="auto", is_main_process=True)
    with pytest.raises(ValueError, match="safe_serialization=False"):
        pm.save_pretrained(tmp_path / "bin", safe_serialization=False)
    with pytest.raises(ValueError, match="mixed=True"):
        get_peft_model(MLP(), LoraConfig(target_modules=["lin0"]), mixed=True)
    loaded = PeftModel.from_pretrained(MLP(), tmp_path, torch_device="cpu", device_map="auto", low_cpu_mem_usage=True)
    result = loaded.load_adapter(tmp_path, adapter_name="again", torch_device="cpu")
    assert result.missing_keys == [] and result.unexpected_keys == []
    with pytest.raises(TypeError, match="frobnicate"):
        loaded.load_adapter(tmp_path, adapter_name="x", frobnicate=1)
    card = (tmp_path / "README.md").read_text()
    assert "library_name: peft" in card and "- lora" in card
    (tmp_path / "README.md").write_text("---\nmeta: hello\n---\nmy card\n")
    pm.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "meta: hello" in card and "my card" in card and "library_name: peft" in card


def test_config_surface_and_peft_reads_our_config(tmp_path):
    cfg = LoraConfig(r=4, target_modules=["lin0"], peft_type="ignored", task_type=TaskType.CAUSAL_LM)
    assert cfg.peft_type == "LORA" and cfg.peft_type.value == "LORA" and cfg.task_type == "CAUSAL_LM"
    assert cfg.peft_version.startswith(fastpeft.peft.config.PEFT_FORMAT_VERSION)
    cfg.save_pretrained(tmp_path)
    assert LoraConfig.from_pretrained(tmp_path) == cfg
    assert fastpeft.peft.config.PeftConfigBase.from_pretrained(tmp_path) == cfg
    assert LoraConfig.from_json_file(tmp_path / "adapter_config.json")["r"] == 4
    theirs = peft.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(theirs, peft.LoraConfig) and theirs.r == 4 and theirs.target_modules == {"lin0"}
    with pytest.raises(ValueError, match="Invalid task type"):
        LoraConfig(task_type="nope")
    with pytest.raises(ValueError, match="not a PromptTuningConfig"):
        fastpeft.PromptTuningConfig.from_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_base_trains_float32_adapters_and_fp16_amp_steps(dtype):
    torch.manual_seed(5)
    base = MLP().to(dtype)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False))
    kept = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=["lin0"]), autocast_adapter_dtype=False)
    assert {p.dtype for p in kept.parameters() if p.requires_grad} == {dtype}
    trainable = [p for p in pm.parameters() if p.requires_grad]
    assert {p.dtype for p in trainable} == {torch.float32}
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["lin0", "lin1"]))
    peft.set_peft_model_state_dict(theirs, fastpeft.get_peft_model_state_dict(pm))
    x = torch.randn(6, 10, dtype=dtype)
    y = pm(x)
    assert y.dtype == dtype
    assert_close(y, theirs(x).to(dtype), msg="16-bit base, float32 adapters")
    opt = torch.optim.SGD(trainable, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    scaler.scale(pm(x).float().square().mean()).backward()
    scaler.unscale_(opt)  # raises "Attempting to unscale FP16 gradients" with 16-bit adapters
    scaler.step(opt)
    scaler.update()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)


def test_prepare_model_for_kbit_training_on_nf4():
    model = fastpeft.quantize_model(build("llama").to(torch.bfloat16))
    model = fastpeft.prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": True})
    assert not any(p.requires_grad for p in model.parameters())
    assert {p.dtype for p in model.parameters() if p.is_floating_point()} == {torch.float32}
    nf4 = [m for m in model.modules() if isinstance(m, NF4Linear)]
    assert nf4 and all(m.compute_dtype == torch.bfloat16 for m in nf4)
    assert model.is_gradient_checkpointing
    ids = batch()["input_ids"]
    assert model.get_input_embeddings()(ids).requires_grad
    pm = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type=TaskType.CAUSAL_LM))
    pm.train()
    loss = pm(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in pm.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize(
    "select",
    [dict(layers_to_transform=1), dict(layers_to_transform=[0], layers_pattern="layers"),
     dict(layers_to_transform=[1], layers_pattern=["nope", "layers"])],
)  # fmt: skip
def test_layer_selection_picks_peft_targets(select):
    base = build("llama")
    cfg = dict(r=2, target_modules=["q_proj", "down_proj"], **select)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    ours = get_peft_model(base, LoraConfig(**cfg))
    assert sorted(fastpeft.get_peft_model_state_dict(ours)) == sorted(peft.get_peft_model_state_dict(theirs))
    with pytest.raises(ValueError, match="cannot be used when `target_modules` is a str"):
        LoraConfig(target_modules=".*q_proj", layers_to_transform=[0])


def test_mixed_adapter_batch_on_an_nf4_model_matches_peft(tmp_path, monkeypatch):
    # QLoRA serving: one NF4 llama, two LoRA adapters of different ranks, a batch whose rows pick either or
    # none; HF PEFT runs the same files on the dense twin holding the dequantized weights
    from fastpeft.nn import lora_mixed

    model, twin = nf4_and_dense_twin()
    targets = ["q_proj", "v_proj", "down_proj"]
    ours = get_peft_model(model, LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    ours.add_adapter("other", LoraConfig(r=24, lora_alpha=12, target_modules=targets, init_lora_weights=False))
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(twin, tmp_path)
    theirs.load_adapter(tmp_path / "other", adapter_name="other")
    calls = []
    real = lora_mixed.lora_batched_delta
    monkeypatch.setattr(lora_mixed, "lora_batched_delta", lambda *a, **k: calls.append(1) or real(*a, **k))
    inputs = batch(n=3)
    names = ["other", "__base__", "default"]
    with torch.no_grad():
        got = ours(**inputs, adapter_names=names).logits
        want = theirs(**inputs, adapter_names=names).logits
    assert len(calls) == 2 * len(targets), "every LoRA layer should run the batched op once"
    assert_close(got, want, msg="mixed batch on NF4 vs peft on the dequantized twin")


def test_mixed_adapter_generate_equals_each_row_alone():
    # greedy decoding of a mixed batch (every step through the batched op) equals decoding each row by itself
    # with its adapter active (the base for "__base__")
    model, _ = nf4_and_dense_twin()
    targets = ["q_proj", "v_proj", "o_proj"]
    ours = get_peft_model(model, LoraConfig(r=4, target_modules=targets, init_lora_weights=False)).eval()
    ours.add_adapter("other", LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False))
    ids = batch(n=3)["input_ids"]
    names = ["other", "__base__", "default"]
    settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    mixed = ours.generate(input_ids=ids, adapter_names=names, **settings)
    for i, name in enumerate(names):
        row = ids[i : i + 1]
        if name == "__base__":
            with ours.disable_adapter():
                alone = ours.generate(input_ids=row, **settings)
        else:
            ours.set_adapter(name)
            alone = ours.generate(input_ids=row, **settings)
        assert torch.equal(mixed[i : i + 1], alone), f"row {i} ({name})"
    with ours.disable_adapter():
        base = ours.generate(input_ids=ids, **settings)
    assert not torch.equal(mixed[[0, 2]], base[[0, 2]]), "the adapters change nothing: the check would prove nothing"


def test_mixed_adapter_batch_with_embedding_lora_matches_peft(tmp_path):
    # LoRA on the token embedding and q_proj, two adapters: the embedding's rows go through the batched expand
    base = build("llama")
    targets = ["embed_tokens", "q_proj"]
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    ours.add_adapter("other", LoraConfig(r=8, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    theirs.load_adapter(tmp_path / "other", adapter_name="other")
    inputs, names = batch(n=3), ["other", "default", "__base__"]
    with torch.no_grad():
        got = ours.eval()(**inputs, adapter_names=names).logits
        want = theirs.eval()(**inputs, adapter_names=names).logits
    assert_close(got, want, msg="mixed batch with embedding LoRA vs peft")
