"""What the 2-process run (``worker.py``) and the single-process references of this folder share.

A tiny Llama from a config (nothing downloaded), its LoRA / QLoRA PEFT model with random adapter weights
(never zeros: a zero ``lora_B`` would leave ``lora_A`` without a gradient), one global batch whose rows
carry different numbers of label tokens (so the ranks' loss weights differ), and the finetune runs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

KINDS = ("lora", "qlora")
STRATEGIES = ("ddp", "fsdp")
LR = 1e-2
FINETUNE_LR = 1e-2
STEPS = 2
BATCH_ROWS = 4  # the global batch; each of the 2 ranks takes 2 rows
VOCAB = 96

# (output directory, flags): run in this order, with --batch-size 2 on 2 processes or 4 on one.
FINETUNE_RUNS = (
    ("ddp_lora", ("--distributed", "ddp", "--method", "lora", "--max-steps", "3")),
    ("fsdp_qlora", ("--distributed", "fsdp", "--method", "qlora", "--max-steps", "2")),
    ("fsdp_qlora", ("--distributed", "fsdp", "--method", "qlora", "--max-steps", "3", "--resume")),
)


def tiny_llama(seed: int = 0) -> nn.Module:
    """A 2-layer Llama, width 32 (GQA 4/2 heads), seeded random weights, in eval mode."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def peft_model(kind: str) -> nn.Module:
    """``tiny_llama`` with LoRA on every linear layer (QLoRA: an NF4 base, head kept dense), random adapters."""
    from fastpeft.peft import LoraConfig, get_peft_model, quantize_model

    model = tiny_llama()
    if kind == "qlora":
        quantize_model(model, skip=("lm_head",))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.train()


def batch() -> dict[str, torch.Tensor]:
    """``BATCH_ROWS`` right-padded rows of 3 to 11 tokens: rank 0's rows hold fewer label tokens than rank 1's."""
    g = torch.Generator().manual_seed(5)
    lengths = (3, 6, 11, 9)
    ids = torch.randint(3, VOCAB, (BATCH_ROWS, max(lengths)), generator=g)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (FSDP2's shards gathered), a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def finetune_args(out: Path, batch_size: int) -> list[str]:
    """``fastpeft finetune`` on the embedded demo model and corpus, short sequences, padded batches (a run under
    torchrun does not pack, and the one-process run it is compared with must draw the same batches)."""
    return ["finetune", "--out", str(out), "--batch-size", str(batch_size), "--seq-len", "32", "--lr", str(FINETUNE_LR),
            "--no-progress", "--packing", "off"]  # fmt: skip
