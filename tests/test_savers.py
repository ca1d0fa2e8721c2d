"""The savers finetune runs: the chunked causal-LM loss equals the model's own, checkpointing with host offload
keeps the gradients, and models the chunked loss does not cover take the model's loss."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, stable_seed

from fastpeft.app.savers import causal_lm_loss, chunked_loss_supported, enable_checkpointing
from fastpeft.peft import LoraConfig, PromptTuningConfig, get_peft_model, quantize_model

transformers = pytest.importorskip("transformers")


def _model(arch: str, quantize: bool, checkpointing: bool = False, offload: bool = False) -> torch.nn.Module:
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[arch]
    config = config_cls(vocab_size=301, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(stable_seed("savers", arch))
    base = model_cls(config)
    if quantize:
        quantize_model(base, skip=())  # the head too: the loss dequantizes it slice by slice
    if checkpointing:
        enable_checkpointing(base, offload=offload)
    torch.manual_seed(stable_seed("savers-lora", arch))
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(stable_seed("savers-batch"))
    ids = torch.randint(0, 301, (3, 19), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 13:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :5] = -100  # a prompt without loss
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(("arch", "quantize"), [("llama", False), ("llama", True), ("qwen2", False)])
def test_chunked_loss_equals_model_loss(arch: str, quantize: bool) -> None:
    plain, chunked = _model(arch, quantize), _model(arch, quantize)
    assert chunked_loss_supported(chunked)
    batch = _batch()
    ref = plain(**batch).loss
    ref.backward()
    got = causal_lm_loss(chunked, batch, chunk_bytes=4 * 301 * 7)  # several token chunks
    got.backward()
    assert_close(got, ref, msg=f"loss {arch} quantized={quantize}")
    ref_grads, grads = _grads(plain), _grads(chunked)
    assert ref_grads.keys() == grads.keys()
    for name, g in grads.items():
        assert_close(g, ref_grads[name], msg=f"{name} {arch} quantized={quantize}")


def test_checkpointing_with_offload_keeps_gradients() -> None:
    plain, saved = _model("llama", False), _model("llama", False, checkpointing=True, offload=True)
    offloaded = []
    for layer in saved.get_base_model().model.layers:
        assert layer.gradient_checkpointing
        offloaded.append(layer._gradient_checkpointing_func.func.__name__)
    assert set(offloaded) == {"_offloaded"}
    batch = _batch()
    plain(**batch).loss.backward()
    causal_lm_loss(saved, batch).backward()
    ref_grads = _grads(plain)
    for name, g in _grads(saved).items():
        assert_close(g, ref_grads[name], msg=name)


def test_other_models_take_their_own_loss() -> None:
    config = transformers.GPT2Config(
        vocab_size=101,
        n_embd=32,
        n_layer=1,
        n_head=2,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    gpt2 = get_peft_model(transformers.GPT2LMHeadModel(config), LoraConfig(r=2, target_modules=["c_attn"]))
    assert not chunked_loss_supported(gpt2)
    prompt = get_peft_model(
        _model("llama", False).get_base_model(), PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")
    )
    assert not chunked_loss_supported(prompt)
    batch = {k: v[:, :12] for k, v in _batch().items()}
    batch["input_ids"] = batch["input_ids"] % 101
    batch["labels"] = batch["labels"].where(batch["labels"] < 0, batch["labels"] % 101)
    assert_close(causal_lm_loss(gpt2, batch), gpt2(**batch).loss, msg="gpt2 falls back")
