"""``torch.compile(fullgraph=True)`` of ``get_peft_model`` models: LoRA, QLoRA, DoRA, QDoRA, bottleneck adapters,
prefix and prompt tuning.

``fullgraph=True`` makes any graph break an error, so a compile that runs proves fastpeft's ops (and the
layers around them) trace whole. Each case compiles a forward and a training step (loss, backward through
AOTAutograd, an AdamW update) and compares them with the same model run eagerly; a second step after the
update, and for LoRA a new scaling, must reuse the compiled graph (``error_on_recompile``). On the CPU the
reference path is compiled with ``aot_eager``; the ``gpu`` twins compile the Triton path with inductor.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import HAS_CUDA, assert_close
from torch import nn

KINDS = ("lora", "qlora", "dora", "qdora", "adapter", "prefix", "prompt")
LORA_KINDS = ("lora", "qlora", "dora", "qdora")
VOCAB = 96
# LoRA on two projections; with QLoRA the other linear layers are plain NF4 layers (the nf4_linear op)
TARGETS = ["q_proj", "v_proj"]


def _tiny_llama() -> nn.Module:
    """A 1-layer Llama, width 32 (GQA 4/2 heads), seeded; compile time grows with the layers traced."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def _peft(kind: str, device: str, dtype: torch.dtype) -> nn.Module:
    """The PEFT model of ``kind`` in training mode, its trainable tensors random (never zeros)."""
    from fastpeft.peft import (
        AdapterConfig,
        LoraConfig,
        PrefixTuningConfig,
        PromptTuningConfig,
        get_peft_model,
        quantize_model,
    )

    model = _tiny_llama().to(device=device, dtype=dtype)
    if kind in ("qlora", "qdora"):
        quantize_model(model, skip=("lm_head",))
    config = {
        "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM"),
        "qlora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM"),
        "dora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM", use_dora=True),
        "qdora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM", use_dora=True),
        "adapter": lambda: AdapterConfig(bottleneck_size=8, task_type="CAUSAL_LM"),
        "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
        "prompt": lambda: PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
    }[kind]()
    model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.train()


def _batch(device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, VOCAB, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def _step(fn, model: nn.Module, opt: torch.optim.Optimizer, batch: dict) -> tuple[torch.Tensor, dict]:
    """One training step through ``fn`` (the compiled or the eager model): the loss, the gradients, the update."""
    loss = fn(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _set_scale(model: nn.Module, scale: float) -> None:
    from fastpeft.nn.lora_base import LoraLayerBase

    layers = [m for m in model.modules() if isinstance(m, LoraLayerBase)]
    assert layers
    for m in layers:
        m.set_scale("default", scale)


def _check(kind: str, device: str, dtype: torch.dtype, backend: str) -> None:
    torch._dynamo.reset()
    ours = _peft(kind, device, dtype)
    eager = copy.deepcopy(ours)
    compiled = torch.compile(ours, fullgraph=True, backend=backend)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (ours, eager)]
    batch = _batch(device)
    for step in range(2):
        with torch._dynamo.config.patch(error_on_recompile=step > 0):  # the update changed every trainable tensor
            got = _step(compiled, ours, opts[0], batch)
        want = _step(eager, eager, opts[1], batch)
        assert_close(got[0], want[0], msg=f"{kind} step {step}: compiled loss vs eager")
        for name, g in want[1].items():
            assert bool(g.abs().max() > 0), f"{kind}: {name} has a zero gradient, the comparison would prove nothing"
            assert_close(got[1][name], g, msg=f"{kind} step {step}: gradient of {name}, compiled vs eager")
    if kind in LORA_KINDS:
        before = eager(**batch).logits.detach()
        for m in (ours, eager):
            _set_scale(m, 3.0)
        with torch._dynamo.config.patch(error_on_recompile=True):  # grad mode as compiled: no_grad would recompile
            got = compiled(**batch).logits.detach()
        want = eager(**batch).logits.detach()
        assert (want - before).abs().max() > 1e-3, "the new scaling changes nothing: the check would prove nothing"
        assert_close(got, want, msg=f"{kind}: compiled logits after set_scale vs eager")


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_training_step_equals_eager(kind: str) -> None:
    _check(kind, "cpu", torch.float32, "aot_eager")


def test_scaling_table_is_a_dict_whose_tensors_follow_every_write() -> None:
    from fastpeft.nn.lora_scaling import ScalingTable

    t = ScalingTable(a=2.0)
    first = t.tensor("a")
    t["a"] = 0.5
    t.update(b=4.0)
    t.setdefault("c", 1.5)
    assert isinstance(t, dict) and dict(t) == {"a": 0.5, "b": 4.0, "c": 1.5}
    assert t.tensor("a") is first, "a compiled graph holds this tensor: it must be rewritten in place"
    assert [t.tensor(k).item() for k in "abc"] == [0.5, 4.0, 1.5]
    del t["b"]
    assert t.pop("c") == 1.5 and "b" not in t._tensors and "c" not in t._tensors
    clone = copy.deepcopy(t)
    clone["a"] = 7.0
    assert clone.tensor("a").item() == 7.0 and t.tensor("a").item() == 0.5, "a deep copy shares no tensor"


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_compiled_training_step_equals_eager_gpu(kind: str) -> None:
    assert HAS_CUDA
    _check(kind, "cuda", torch.float32, "inductor")


class _EmbConv(nn.Module):
    """Embedding -> 1x1 convolution (the fused linear path) -> 3-wide convolution -> attention -> linear -> a
    linear adapted through its weight parameter (``target_parameters``)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.pw = nn.Conv1d(16, 24, 1)
        self.conv = nn.Conv1d(24, 8, 3, padding=1)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 4)
        self.mix = nn.Linear(4, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.conv(torch.relu(self.pw(self.emb(ids).transpose(1, 2)))).transpose(1, 2)
        return self.mix(self.head(self.attn(h, h, h, need_weights=False)[0]))


def test_embedding_convolution_and_attention_lora_take_a_new_scaling_without_recompiling() -> None:
    from fastpeft.peft import LoraConfig, get_peft_model

    torch._dynamo.reset()
    torch.manual_seed(5)
    model = get_peft_model(
        _EmbConv(),
        LoraConfig(
            r=4, lora_alpha=8, target_modules=["emb", "pw", "conv", "attn", "head"], target_parameters=["mix.weight"]
        ),
    )
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ids = torch.randint(0, VOCAB, (2, 9), generator=g)
    assert_close(compiled(ids), model(ids), msg="compiled vs eager")
    before = model(ids).detach()
    _set_scale(model, 3.0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = compiled(ids)
    want = model(ids)
    assert (want - before).abs().max() > 1e-3, "the new scaling changes nothing: the check would prove nothing"
    assert_close(got, want, msg="compiled after set_scale vs eager")
