"""Tiny local checkpoints and data files for the CLI tests (written into tmp dirs; nothing downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fastpeft.data import byte_tokenizer

VOCAB = 260  # fastpeft.data.byte_tokenizer: 4 special tokens + 256 bytes


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
