"""Tiny local checkpoints and data files for the CLI tests (written into tmp dirs; nothing downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fastpeft.app.data import adds_bos, byte_tokenizer

VOCAB = 260  # fastpeft.app.data.byte_tokenizer: 4 special tokens + 256 bytes


def write_checkpoint(
    directory: Path, *, seed: int = 0, tie: bool = False, shard: str | None = None, arch: str = "llama"
) -> Path:
    """A 2-layer causal LM (width 64, GQA 4/2 heads) with seeded random weights, its tokenizer too.

    ``arch``: ``"llama"`` or ``"qwen2"`` (biases on q/k/v). Widths are multiples of 64 so bitsandbytes'
    CPU 4-bit kernels accept the layers.
    """
    import transformers

    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[arch]
    config = config_cls(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=tie,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    if arch == "qwen2":
        with torch.no_grad():  # transformers initializes biases to zero: make them count
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_()
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(str(directory), **kwargs)
    byte_tokenizer().save_pretrained(str(directory))
    return directory


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def qa_records(n: int = 12) -> list[dict]:
    """Prompt/completion pairs with a learnable rule (the completion repeats a word of the prompt)."""
    words = ["cat", "dog", "sun", "moon", "tree", "river", "stone", "bird", "fish", "rain", "snow", "fire"]
    return [{"prompt": f"say {w}: ", "completion": f"{w} {w}."} for w in (words * 2)[:n]]


def write_qa(directory: Path) -> Path:
    """``qa_records()`` as ``directory / "qa.jsonl"``: the training file of the finetune runs."""
    return write_jsonl(directory / "qa.jsonl", qa_records())


def finetune_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """``fastpeft finetune`` arguments for ``model`` trained on ``data`` into ``out``, progress bar off."""
    return ["finetune", "--model", str(model), "--data", str(data), "--out", str(out), "--no-progress", *extra]


def listing(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` with its bytes (to show a directory was left untouched)."""
    if not directory.exists():
        return {}
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _llama_cpp_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's row order for q/k projections: within each head, the two rotary halves interleaved."""
    out = w.shape[0]
    return w.reshape(heads, 2, out // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def write_gguf(path: Path, checkpoint: Path, quantized: str | None = None) -> Path:
    """``checkpoint`` (a ``write_checkpoint`` Llama) as a GGUF file laid out as llama.cpp writes one.

    Metadata under llama.cpp's keys, the byte tokenizer as a GPT-2-style vocabulary, tensors under GGUF
    names with q/k rows permuted. ``quantized``: a ggml type name (``"Q8_0"``) for the 2-D projection
    weights; everything else, and by default everything, is float32.
    """
    import gguf
    from safetensors.torch import load_file

    config = json.loads((checkpoint / "config.json").read_text())
    heads, kv_heads, layers = config["num_attention_heads"], config["num_key_value_heads"], config["num_hidden_layers"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(config["hidden_size"] // heads)
    writer.add_rope_freq_base(float(config.get("rope_theta") or config["rope_parameters"]["rope_theta"]))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    tok = byte_tokenizer()
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in tok.all_special_tokens else 1 for t in tokens])  # 3: control, 1: normal
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_merges([])
    writer.add_bos_token_id(tok.bos_token_id)
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_pad_token_id(tok.pad_token_id)
    writer.add_unk_token_id(tok.unk_token_id)
    writer.add_add_bos_token(adds_bos(tok))  # the tokenizer's own rule, as the checkpoint's

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
    for key, t in load_file(str(checkpoint / "model.safetensors")).items():
        module, _, suffix = key.rpartition(".")
        name = f"{names.get_name(module)}.{suffix}"
        if name.endswith("attn_q.weight"):
            t = _llama_cpp_rows(t, heads)
        elif name.endswith("attn_k.weight"):
            t = _llama_cpp_rows(t, kv_heads)
        data = t.float().numpy()
        if quantized and data.ndim == 2 and name.startswith("blk."):
            qtype = gguf.GGMLQuantizationType[quantized]
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
