"""A QLoRA training script written for HF PEFT runs unchanged with ``fastpeft`` in place of ``peft``: the same
function body, handed either module, on twin bitsandbytes 4-bit models (bf16 autocast, and fp16 autocast with a
gradient scaler, the recipe that fails with 16-bit adapters)."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from tiny_models import batch, build
from torch import nn

import fastpeft
from fastpeft.nn import LoraLinear, NF4Linear


def _bnb_llama() -> nn.Module:
    """A tiny Llama whose projections are bitsandbytes 4-bit layers (what a 4-bit transformers load holds)."""
    bnb = pytest.importorskip("bitsandbytes")
    model = build("llama", hidden_size=64)
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and name != "lm_head":
            l4 = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=m.bias is not None, quant_type="nf4",
                                   compute_dtype=torch.bfloat16)  # fmt: skip
            l4.weight = bnb.nn.Params4bit(m.weight.data.clone(), requires_grad=False, quant_type="nf4")
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, l4.to("cpu"))  # bitsandbytes quantizes on the move
    model.is_loaded_in_4bit = True
    return model


def recipe(lib, model: nn.Module, amp: torch.dtype, out_dir) -> tuple[list[float], dict, nn.Module]:
    """The script, as written against HF PEFT's names: ``lib`` is ``peft`` or ``fastpeft``."""
    model = lib.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    config = lib.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, bias="none", target_modules=["q_proj", "v_proj"],
        task_type=lib.TaskType.CAUSAL_LM,
    )  # fmt: skip
    torch.manual_seed(0)  # the adapters' initialization
    model = lib.get_peft_model(model, config)
    model.print_trainable_parameters()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", enabled=amp == torch.float16)
    inputs = batch(2, 9, seed=7)
    model.train()
    losses = []
    for _ in range(3):
        with torch.autocast("cpu", dtype=amp):
            loss = model(**inputs, labels=inputs["input_ids"]).loss
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        losses.append(loss.item())
    state = lib.get_peft_model_state_dict(model)
    model.save_pretrained(out_dir)
    return losses, state, model


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16], ids=["bf16", "fp16+scaler"])
def test_peft_qlora_script_runs_unchanged_on_fastpeft(amp, tmp_path, capsys):
    base = _bnb_llama()
    theirs_losses, theirs_state, _ = recipe(peft, copy.deepcopy(base), amp, tmp_path / "peft")
    ours_losses, ours_state, model = recipe(fastpeft, base, amp, tmp_path / "fastpeft")
    printed = capsys.readouterr().out.splitlines()
    summaries = [line for line in printed if line.startswith("trainable params")]
    assert len(summaries) == 2 and summaries[0] == summaries[1], f"print_trainable_parameters: {summaries}"
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert layers and all(isinstance(m.get_base_layer(), NF4Linear) for m in layers)
    assert all(m.lora_A["default"].weight.dtype == torch.float32 for m in layers), "adapters must stay float32"
    assert sorted(ours_state) == sorted(theirs_state)
    # Same data, same initialization, same NF4 bytes: the runs agree to 16-bit rounding of the activations.
    for step, (a, b) in enumerate(zip(ours_losses, theirs_losses, strict=True)):
        assert abs(a - b) <= 2e-2 * abs(b), f"step {step}: loss {a:.5f} vs HF PEFT {b:.5f}"
    assert ours_losses[-1] < ours_losses[0], f"no training progress: {ours_losses}"
    saved = json.loads((tmp_path / "fastpeft" / "adapter_config.json").read_text())
    assert saved["task_type"] == "CAUSAL_LM" and saved["target_modules"] == ["q_proj", "v_proj"]
    loaded = peft.PeftModel.from_pretrained(_bnb_llama(), tmp_path / "fastpeft")  # HF PEFT reads the result
    for key, value in peft.get_peft_model_state_dict(loaded).items():
        assert torch.equal(value, ours_state[key].to(value.dtype)), key
