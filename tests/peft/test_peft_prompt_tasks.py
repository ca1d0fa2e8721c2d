"""Prompt and prefix tuning on encoder-decoders (T5, BART) and classifiers (BERT, Llama): HF PEFT's outputs and files
both ways, the classification head trained in full, and the refusals where HF PEFT cannot run either."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import fastpeft

peft = pytest.importorskip("peft")
tf = pytest.importorskip("transformers")

V = 96


def _t5():
    return tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                                     num_heads=4, decoder_start_token_id=0))  # fmt: skip


def _bart():
    return tf.BartForConditionalGeneration(tf.BartConfig(
        vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
    ))  # fmt: skip


def _llama_cls():
    return tf.LlamaForSequenceClassification(tf.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_labels=3, pad_token_id=0,
    ))  # fmt: skip


def _bert_cls():
    return tf.BertForSequenceClassification(tf.BertConfig(vocab_size=V, hidden_size=32, intermediate_size=48,
                                                          num_hidden_layers=2, num_attention_heads=4, num_labels=3,
                                                          max_position_embeddings=64))  # fmt: skip


CASES = [
    ("t5", _t5, "SEQ_2_SEQ_LM", "PromptTuningConfig"),
    ("t5", _t5, "SEQ_2_SEQ_LM", "PrefixTuningConfig"),
    ("bart", _bart, "SEQ_2_SEQ_LM", "PromptTuningConfig"),
    ("bart", _bart, "SEQ_2_SEQ_LM", "PrefixTuningConfig"),
    ("llama_cls", _llama_cls, "SEQ_CLS", "PromptTuningConfig"),
    ("bert_cls", _bert_cls, "SEQ_CLS", "PromptTuningConfig"),
]


def _inputs(task: str, name: str, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    kw = {"input_ids": ids, "attention_mask": mask}
    kw["labels"] = torch.randint(3, V, (2, 5), generator=g) if task == "SEQ_2_SEQ_LM" else torch.tensor([0, 2])
    if name == "bert_cls":
        kw["token_type_ids"] = torch.zeros_like(ids)
    return kw


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' deprecation notices for HF PEFT's past_key_values
        yield


@pytest.mark.parametrize("name,make,task,kind", CASES, ids=[f"{c[0]}-{c[3][:6]}" for c in CASES])
def test_prompt_learning_matches_hf_peft_both_ways(tmp_path, name, make, task, kind):
    torch.manual_seed(0)
    base = make().eval()
    theirs = peft.get_peft_model(copy.deepcopy(base), getattr(peft, kind)(task_type=task, num_virtual_tokens=3))
    theirs.eval().save_pretrained(tmp_path / "hf")
    ours = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "hf").eval()
    kw = _inputs(task, name)
    with torch.no_grad():
        a, b, plain = theirs(**kw), ours(**kw), base(**kw)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
    assert not torch.allclose(b.logits, plain.logits), "the prompt / prefix changed nothing"
    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        assert torch.equal(back(**kw).logits, b.logits)
    if task == "SEQ_2_SEQ_LM" and kind == "PromptTuningConfig":
        gen = dict(input_ids=kw["input_ids"], attention_mask=kw["attention_mask"], max_new_tokens=4, do_sample=False)
        assert torch.equal(ours.generate(**gen), theirs.generate(**gen))


@pytest.mark.parametrize("make,head", [(_bert_cls, "classifier"), (_llama_cls, "score")], ids=["bert", "llama"])
def test_seq_cls_trains_the_head_and_the_prompt_and_unload_restores_the_head(make, head):
    torch.manual_seed(0)
    base = make()
    original = copy.deepcopy(getattr(base, head).weight.detach())
    pm = fastpeft.get_peft_model(base, fastpeft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3))
    trainable = sorted(n for n, p in pm.named_parameters() if p.requires_grad)
    assert trainable[-1] == "prompt_encoder.default.embedding.weight"
    assert all(f"{head}.modules_to_save.default" in n for n in trainable[:-1]) and len(trainable) > 1
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    pm(**_inputs("SEQ_CLS", "bert_cls" if head == "classifier" else "llama")).loss.backward()
    opt.step()
    trained = pm.get_base_model().get_submodule(head).modules_to_save["default"].weight
    assert not torch.equal(trained, original)
    with pm.disable_adapter(), torch.no_grad():
        assert torch.equal(pm.get_base_model().get_submodule(head)(torch.ones(1, 32)),
                           torch.nn.functional.linear(torch.ones(1, 32), original,
                                                      getattr(pm.get_base_model().get_submodule(head).original_module,
                                                              "bias", None)))  # fmt: skip
    plain = pm.unload()
    assert isinstance(getattr(plain, head), torch.nn.Linear) and torch.equal(getattr(plain, head).weight, original)


def test_the_task_types_hf_peft_cannot_run_either_are_refused_by_name():
    with pytest.raises(ValueError, match="SEQ_CLS.*not supported"):
        fastpeft.get_peft_model(_bert_cls(), fastpeft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3))
    with pytest.raises(ValueError, match="TOKEN_CLS"):
        fastpeft.get_peft_model(_bert_cls(), fastpeft.PromptTuningConfig(task_type="TOKEN_CLS", num_virtual_tokens=3))
    pm = fastpeft.get_peft_model(_t5(), fastpeft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3))
    with pytest.raises(NotImplementedError, match="prefix tuning on an encoder-decoder"):
        pm.generate(input_ids=torch.ones(1, 4, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match="SEQ_2_SEQ_LM.*not an encoder-decoder"):
        fastpeft.get_peft_model(_llama_cls(), fastpeft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM",
                                                                          num_virtual_tokens=3))  # fmt: skip
    with pytest.raises(ValueError, match="CAUSAL_LM.*is an encoder-decoder"):
        fastpeft.get_peft_model(_t5(), fastpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with pytest.raises(ValueError, match="num_transformer_submodules=2"):
        fastpeft.get_peft_model(_llama_cls(), fastpeft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3,
                                                                          num_transformer_submodules=2))  # fmt: skip


@pytest.mark.parametrize("make,head", [(_bert_cls, "classifier"), (_llama_cls, "score")], ids=["bert", "llama"])
def test_bottleneck_adapters_train_the_seq_cls_head_and_save_it(tmp_path, make, head):
    torch.manual_seed(0)
    base = make()
    original = getattr(base, head).weight.detach().clone()
    config = fastpeft.AdapterConfig(task_type="SEQ_CLS", bottleneck_size=4)
    pm = fastpeft.get_peft_model(copy.deepcopy(base), config)
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert any(f"{head}.modules_to_save.default" in n for n in trainable), trainable
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    kw = _inputs("SEQ_CLS", "bert_cls" if head == "classifier" else "llama")
    pm(**kw).loss.backward()
    opt.step()
    assert not torch.equal(pm.get_base_model().get_submodule(head).modules_to_save["default"].weight, original)
    pm.eval().save_pretrained(tmp_path)
    again = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again(**kw).logits, pm(**kw).logits)
