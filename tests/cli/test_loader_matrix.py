"""fastpeft's loader over the architectures transformers' AutoModelForCausalLM loads: logits equal to transformers'
(dense), NF4 where the model has linear layers (GPT-2's Conv1D counted), and transformers' own loader, with one
logged line, where a checkpoint cannot be streamed tensor by tensor."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from fastpeft.loading import load_causal_lm
from fastpeft.nn import NF4Linear
from fastpeft.quant import quantize_nf4

tf = pytest.importorskip("transformers")

V = 128
_COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
# (name, config factory, streamed tensor by tensor)
ARCHS = [
    ("llama", lambda: tf.LlamaConfig(**_COMMON, num_key_value_heads=2), True),
    ("mistral", lambda: tf.MistralConfig(**_COMMON, num_key_value_heads=2), True),
    ("qwen2", lambda: tf.Qwen2Config(**_COMMON, num_key_value_heads=2), True),
    ("qwen3", lambda: tf.Qwen3Config(**_COMMON, num_key_value_heads=2, head_dim=16), True),
    ("gemma2", lambda: tf.Gemma2Config(**_COMMON, num_key_value_heads=2, head_dim=16), False),
    ("phi3", lambda: tf.Phi3Config(**_COMMON, num_key_value_heads=2, pad_token_id=0), True),
    ("gpt2", lambda: tf.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64), True),
    ("gpt_neox", lambda: tf.GPTNeoXConfig(**_COMMON), False),
    ("opt", lambda: tf.OPTConfig(vocab_size=V, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                 num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=64), True),
    ("falcon", lambda: tf.FalconConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4), True),
    ("mixtral", lambda: tf.MixtralConfig(**_COMMON, num_key_value_heads=2, num_local_experts=4,
                                         num_experts_per_tok=2), False),
    ("bert_decoder", lambda: tf.BertConfig(**_COMMON, is_decoder=True), False),
    ("starcoder2", lambda: tf.Starcoder2Config(**_COMMON, num_key_value_heads=2), True),
]  # fmt: skip


@pytest.mark.parametrize("name,make,streamed", ARCHS, ids=[a[0] for a in ARCHS])
def test_loader_matches_transformers_and_quantizes(tmp_path, caplog, name, make, streamed):
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(make()).save_pretrained(tmp_path)
    ref = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))
    with caplog.at_level(logging.WARNING, logger="fastpeft.loading"):
        ours = load_causal_lm(tmp_path)
    fell_back = [r for r in caplog.records if "from_pretrained instead" in r.getMessage()]
    assert len(fell_back) == (0 if streamed else 1), [r.getMessage() for r in caplog.records]
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, ref(input_ids=ids).logits)
    q = load_causal_lm(tmp_path, quantize=True)
    layers = {n: m for n, m in q.named_modules() if isinstance(m, NF4Linear)}
    assert layers, f"{name}: nothing quantized"
    # each NF4 layer holds exactly the NF4 of transformers' weight ([out, in]; GPT-2's Conv1D transposed)
    path, layer = sorted(layers.items())[0]
    w = ref.get_submodule(path).weight.detach()
    w = w.t() if name == "gpt2" else w
    assert torch.equal(layer.dequantize(torch.float32), quantize_nf4(w.contiguous()).dequantize().float())
    with torch.no_grad():
        assert torch.isfinite(q(input_ids=ids).logits).all()


def test_a_checkpoint_short_of_tensors_is_an_error_not_a_fallback(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(tf.GPTNeoXConfig(**_COMMON)).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors.pop("gpt_neox.layers.1.mlp.dense_4h_to_h.weight")
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="dense_4h_to_h"):
        load_causal_lm(tmp_path)


def test_qlora_that_quantizes_nothing_is_refused_by_name(tmp_path):
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(**_COMMON, num_key_value_heads=2)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no linear layer to quantize"):
        load_causal_lm(tmp_path, quantize=True, skip=("model", "lm_head"))


def test_save_quantized_keeps_dense_tensors_in_16_bit_and_nf4_statistics_in_float32(tmp_path):
    from safetensors import safe_open

    from fastpeft.loading import save_quantized

    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(**_COMMON, num_key_value_heads=2)).save_pretrained(tmp_path)
    save_quantized(load_causal_lm(tmp_path, quantize=True), tmp_path / "nf4", compute_dtype=torch.bfloat16)
    with safe_open(tmp_path / "nf4" / "model.safetensors", "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["model.embed_tokens.weight"] == "BF16" and dtypes["lm_head.weight"] == "BF16"
    assert dtypes["model.norm.weight"] == "BF16"
    assert dtypes["model.layers.0.self_attn.q_proj.weight.absmax"] in ("F32", "U8")
    assert dtypes["model.layers.0.self_attn.q_proj.weight.quant_map"] == "F32"
    config = json.loads((tmp_path / "nf4" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "torch_dtype" not in config
    pytest.importorskip("bitsandbytes")
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "nf4")
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
