"""Tiny transformers models built from configs (nothing downloaded) for the PEFT API tests."""

from __future__ import annotations

import copy

import torch
from torch import nn

VOCAB = 96


def build(arch: str, seed: int = 0, hidden_size: int = 32, **overrides: object) -> nn.Module:
    """A randomly initialized tiny model of family ``arch`` in eval mode (dropout off)."""
    import transformers as tf

    torch.manual_seed(seed)
    inter = 48 if hidden_size == 32 else 2 * hidden_size
    common = dict(vocab_size=VOCAB, hidden_size=hidden_size, intermediate_size=inter, num_hidden_layers=2,
                  num_attention_heads=4, **overrides)  # fmt: skip
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common, num_key_value_heads=2))
    elif arch == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, num_key_value_heads=2))
    elif arch == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**common, num_key_value_heads=1, sliding_window=None))
    elif arch == "gpt2":
        model = tf.GPT2LMHeadModel(
            tf.GPT2Config(vocab_size=VOCAB, n_embd=hidden_size, n_layer=2, n_head=4, n_positions=64)
        )
    elif arch == "bert":
        cfg = tf.BertConfig(**common, max_position_embeddings=64, num_labels=3)
        model = tf.BertForSequenceClassification(cfg)
    else:
        raise ValueError(arch)
    return model.eval()


def twin(model: nn.Module) -> nn.Module:
    """An independent copy with identical weights."""
    return copy.deepcopy(model)


def nf4_and_dense_twin(arch: str = "llama") -> tuple[nn.Module, nn.Module]:
    """A tiny model quantized to NF4 by fastpeft, and a dense float32 twin holding its dequantized weights (what
    HF PEFT runs for the comparison)."""
    import fastpeft
    from fastpeft.nn import NF4Linear

    dense = build(arch)
    model = fastpeft.quantize_model(copy.deepcopy(dense))
    twin = copy.deepcopy(dense)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, NF4Linear):
                twin.get_submodule(name).weight.copy_(m.dequantize(torch.float32))
    return model, twin


def batch(n: int = 2, t: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random token ids with a left-padded attention mask (row 0 has 2 pad positions)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[0, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


def randomize(module: nn.Module, names: tuple[str, ...], seed: int = 2) -> None:
    """Fill parameters whose name contains one of ``names`` with fresh N(0, 0.1) values (never zeros)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if any(s in n for s in names):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits on ``inputs`` without autograd."""
    with torch.no_grad():
        return model(**inputs).logits


def train_steps(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    steps: int,
    lr: float,
    optimizer: type[torch.optim.Optimizer] = torch.optim.Adam,
) -> list[float]:
    """``steps`` optimizer steps on the causal-LM loss of ``inputs`` (labels = input ids); the losses in order.

    Only parameters with ``requires_grad`` are handed to the optimizer.
    """
    opt = optimizer([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed_since(model: nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    """Names of the parameters whose values differ from ``before`` (a ``snapshot`` of the same model)."""
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


def trainable_names(model: nn.Module) -> set[str]:
    """Names of the parameters with ``requires_grad``."""
    return {n for n, p in model.named_parameters() if p.requires_grad}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()
