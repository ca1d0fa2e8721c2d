"""Prompt tuning and prefix tuning, with the real ``peft`` package as the oracle in both directions."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from tiny_models import VOCAB, batch, build, changed_since, max_diff, snapshot, train_steps, trainable_names, twin

from fastpeft import PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model

ATOL = 1e-5


def _run(model, inputs, labels=True):
    with torch.no_grad():
        out = model(**inputs, labels=inputs["input_ids"] if labels else None)
    return out.logits, out.loss


def _gen(model, inputs, n=6):
    return model.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=0)


def _check_generate(pm, where, n=5):
    """generate() against a greedy loop through forward (forward is checked against peft's).

    peft 0.21's own generate() disagrees with its forward under transformers 5.24 (cache kwargs were
    renamed), so it cannot serve as the oracle here. Unpadded rows: a padded row's positions differ
    between generate (from the mask) and a bare forward (from the cache length), by design.
    """
    ids = batch(seed=13)["input_ids"]
    seq = ids
    for _ in range(n):
        with torch.no_grad():
            logits = pm(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[:, -1]
        seq = torch.cat((seq, logits.argmax(-1, keepdim=True)), dim=1)
    got = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                      pad_token_id=0)  # fmt: skip
    assert torch.equal(got, seq), f"{where}: generate differs from greedy forward:\n{got}\n{seq}"
    padded = _gen(pm, batch(seed=14), 3)
    assert padded.shape == (2, 7 + 3) and torch.equal(padded[:, :7], batch(seed=14)["input_ids"])


def _configs(kind):
    if kind == "prompt":
        return dict(task_type="CAUSAL_LM", num_virtual_tokens=5), PromptTuningConfig, peft.PromptTuningConfig
    if kind == "prefix":
        return dict(task_type="CAUSAL_LM", num_virtual_tokens=4), PrefixTuningConfig, peft.PrefixTuningConfig
    kw = dict(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=24)
    return kw, PrefixTuningConfig, peft.PrefixTuningConfig


def _randomize_prompt(pm, encoders, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in encoders.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize(
    ("kind", "arch"),
    [("prompt", "llama"), ("prefix", "llama"), ("prefix_mlp", "llama"), ("prompt", "gpt2"), ("prefix", "gpt2"),
     ("prefix", "mistral"), ("prefix", "llama-head_dim")],
)  # fmt: skip
def test_ours_to_peft_and_back(kind, arch, tmp_path):
    kw, ours_cls, _ = _configs(kind)
    # llama-head_dim: 4 heads of 12 over a 32-wide model, 2 kv heads -> kv_dim 24
    base = build("llama", head_dim=12) if arch == "llama-head_dim" else build(arch)
    oracle_base = twin(base)
    inputs = batch()
    pm = get_peft_model(base, ours_cls(**kw))
    _randomize_prompt(pm, pm.prompt_encoder, seed=11)
    logits, loss = _run(pm, inputs)
    base_logits, _ = _run(oracle_base, inputs)
    assert logits.shape[1] == base_logits.shape[1] + (5 if kind == "prompt" else 0)
    real = logits[:, -base_logits.shape[1] :]
    assert max_diff(real, base_logits) > 1e-3, f"{kind}/{arch}: the prompt changed nothing"
    pm.save_pretrained(tmp_path / "ours")
    hf = peft.PeftModel.from_pretrained(oracle_base, tmp_path / "ours").eval()
    hf_logits, hf_loss = _run(hf, inputs)
    assert max_diff(logits, hf_logits) < ATOL, f"{kind}/{arch}: logits differ by {max_diff(logits, hf_logits):.3e}"
    assert abs(loss.item() - hf_loss.item()) < ATOL, f"{kind}/{arch}: loss {loss.item()} vs {hf_loss.item()}"
    _check_generate(pm, f"{kind}/{arch}")
    hf.save_pretrained(tmp_path / "theirs")
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "theirs" / "adapter_model.safetensors"))
    assert list(a) == ["prompt_embeddings"] and a["prompt_embeddings"].shape == b["prompt_embeddings"].shape
    assert max_diff(a["prompt_embeddings"], b["prompt_embeddings"]) < ATOL


@pytest.mark.parametrize("kind", ["prompt", "prefix", "prefix_mlp"])
def test_peft_to_ours(kind, tmp_path):
    kw, _, hf_cls = _configs(kind)
    base = build("qwen2")
    ours_base = twin(base)
    inputs = batch(seed=5)
    hf = peft.get_peft_model(base, hf_cls(**kw))
    _randomize_prompt(hf, hf.prompt_encoder, seed=12)
    hf.eval()
    hf_logits, hf_loss = _run(hf, inputs)
    hf.save_pretrained(tmp_path)
    pm = PeftModel.from_pretrained(ours_base, tmp_path)
    logits, loss = _run(pm, inputs)
    assert max_diff(logits, hf_logits) < ATOL, f"{kind}: logits differ by {max_diff(logits, hf_logits):.3e}"
    assert abs(loss.item() - hf_loss.item()) < ATOL
    _check_generate(pm, kind)
    assert pm.get_nb_trainable_parameters()[0] == 0


def test_prefix_gqa_shapes_follow_kv_heads():
    pm = get_peft_model(build("mistral"), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    cfg = pm.peft_config["default"]
    # mistral tiny: hidden 32, 4 heads of 8, 1 kv head -> kv_dim 8
    assert (cfg.token_dim, cfg.num_attention_heads, cfg.num_layers) == (8, 1, 2)
    assert pm.prompt_encoder["default"].embedding.weight.shape == (3, 2 * 2 * 8)
    out = pm(**batch())
    assert out.logits.shape == (2, 7, VOCAB)
    pm = get_peft_model(build("llama", head_dim=12), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    assert pm.prompt_encoder["default"].embedding.weight.shape == (3, 2 * 2 * 12 * 2)  # explicit head_dim, 2 kv heads


@pytest.mark.parametrize("kind", ["prompt", "prefix_mlp"])
def test_training_moves_only_the_prompt(kind, tmp_path):
    kw, ours_cls, _ = _configs(kind)
    pm = get_peft_model(build("llama"), ours_cls(**kw))
    pm.train()
    before, trainable = snapshot(pm), trainable_names(pm)
    assert trainable and all(n.startswith("prompt_encoder.default.") for n in trainable), trainable
    inputs = batch(4, 8, seed=9)
    losses = train_steps(pm, inputs, 8, lr=5e-2)
    assert losses[-1] < losses[0] - 0.02, f"{kind}: loss did not go down: {losses}"
    changed = changed_since(pm, before)
    assert changed == trainable, f"changed {sorted(changed - trainable)[:4]}, unchanged {sorted(trainable - changed)}"
    pm.eval()
    logits, _ = _run(pm, inputs)
    pm.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(build("llama"), tmp_path)
    assert max_diff(_run(again, inputs)[0], logits) < ATOL
    with pm.disable_adapter():
        plain, _ = _run(pm, inputs)
    assert max_diff(plain, _run(build("llama"), inputs)[0]) == 0.0


def _tokenizer_dir(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0")
    fast.save_pretrained(str(tmp_path / "tok"))
    return fast, str(tmp_path / "tok")


def test_text_init_matches_peft(tmp_path):
    fast, path = _tokenizer_dir(tmp_path)
    text = "w5 w17 w3"
    kw = dict(task_type="CAUSAL_LM", num_virtual_tokens=7, prompt_tuning_init="TEXT", prompt_tuning_init_text=text)
    ours = get_peft_model(build("llama"), PromptTuningConfig(**kw, tokenizer_name_or_path=fast))
    hf = peft.get_peft_model(build("llama"), peft.PromptTuningConfig(**kw, tokenizer_name_or_path=path))
    table = ours.prompt_encoder["default"].embedding.weight
    want = hf.prompt_encoder["default"].embedding.weight
    assert torch.equal(table, want), f"TEXT init differs by {max_diff(table, want):.3e}"
    emb = ours.get_base_model().get_input_embeddings().weight
    assert torch.equal(table[3], emb[5]) and torch.equal(table[6], emb[5])  # the text repeats to length 7
    ours.save_pretrained(tmp_path / "saved")
    cfg = json.loads((tmp_path / "saved" / "adapter_config.json").read_text())
    assert cfg["prompt_tuning_init"] == "TEXT" and cfg["tokenizer_name_or_path"] in (None, path)
    cfg["tokenizer_name_or_path"] = str(tmp_path / "no-such-tokenizer")  # loading must not need it
    (tmp_path / "saved" / "adapter_config.json").write_text(json.dumps(cfg))
    again = PeftModel.from_pretrained(build("llama"), tmp_path / "saved", is_trainable=True)
    assert torch.equal(again.prompt_encoder["default"].embedding.weight, table)
    assert again.peft_config["default"].prompt_tuning_init == "TEXT"


def test_prefix_projection_file_cannot_resume_training(tmp_path):
    kw, cls, _ = _configs("prefix_mlp")
    get_peft_model(build("llama"), cls(**kw)).save_pretrained(tmp_path)
    victim = build("llama")
    with pytest.raises(ValueError, match="is_trainable=False"):
        PeftModel.from_pretrained(victim, tmp_path, is_trainable=True)
    assert PeftModel.from_pretrained(victim, tmp_path).get_nb_trainable_parameters()[0] == 0


def test_prompt_learning_errors():
    with pytest.raises(ValueError, match="task_type"):
        get_peft_model(build("llama"), PromptTuningConfig(num_virtual_tokens=3))
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        get_peft_model(build("llama"), PrefixTuningConfig(task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="SAMPLE_VOCAB"):
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prompt_tuning_init="SAMPLE_VOCAB")


def test_two_prompt_adapters_switch_and_load_trainable(tmp_path):
    pm = get_peft_model(build("llama"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    pm.add_adapter("long", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    inputs = batch()
    assert _run(pm, inputs)[0].shape[1] == 7 + 2
    pm.set_adapter("long")
    assert _run(pm, inputs)[0].shape[1] == 7 + 4
    assert {n for n, p in pm.named_parameters() if p.requires_grad} == {"prompt_encoder.long.embedding.weight"}
    with pytest.raises(ValueError, match="cannot mix"):
        pm.add_adapter("x", PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build("llama"), tmp_path / "long", is_trainable=True)
    assert loaded.get_nb_trainable_parameters()[0] == 4 * 32
    assert max_diff(_run(loaded, inputs)[0], _run(pm, inputs)[0]) == 0.0
