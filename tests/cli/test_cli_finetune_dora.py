"""``fastpeft finetune --method dora|qdora`` on the CPU: a few steps on a tiny checkpoint, the adapter loaded by
fastpeft and by the real ``peft`` package (QDoRA: on the dequantized NF4 weights it trained against) with the
same logits, the magnitude trained and the checkpoint reloaded as written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_close
from safetensors.torch import load_file
from tinymodels import finetune_args, write_checkpoint, write_qa

from fastpeft.app.cli import main

TARGETS = "q_proj,v_proj,down_proj"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_dora")
    return {"model": write_checkpoint(root / "model", seed=3), "data": write_qa(root)}


@pytest.mark.parametrize("method", ["dora", "qdora"])
def test_dora_trains_and_hf_peft_loads_the_adapter(tiny: dict[str, Path], tmp_path: Path, method: str) -> None:
    import peft
    from transformers import AutoModelForCausalLM

    from fastpeft.loading import dequantize_model, load_causal_lm
    from fastpeft.nn import NF4Linear
    from fastpeft.peft import PeftModel

    out = tmp_path / method
    args = finetune_args(tiny["model"], tiny["data"], out, "--method", method, "--target-modules", TARGETS)
    assert main([*args, "--batch-size", "4", "--lr", "1e-2", "--max-steps", "3"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == method and len(metrics["losses"]) == 3, metrics
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is True, config
    tensors = load_file(str(out / "adapter_model.safetensors"))
    magnitudes = {k: v for k, v in tensors.items() if k.endswith(".lora_magnitude_vector")}
    assert len(magnitudes) == 2 * len(TARGETS.split(",")), sorted(tensors)  # 2 layers x 3 targets

    quantized = method == "qdora"
    ours = PeftModel.from_pretrained(load_causal_lm(tiny["model"], quantize=quantized), str(out)).eval()
    assert any(isinstance(m, NF4Linear) for m in ours.modules()) == quantized
    # HF PEFT on the weights the adapter was trained against: dequant(NF4) for QDoRA, the checkpoint's for DoRA.
    if quantized:
        dense = dequantize_model(load_causal_lm(tiny["model"], quantize=True), torch.float32)
    else:
        dense = AutoModelForCausalLM.from_pretrained(str(tiny["model"]))
    theirs = peft.PeftModel.from_pretrained(dense, str(out)).eval()
    ids = torch.randint(3, 260, (2, 11), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
        with theirs.disable_adapter():
            plain = theirs(input_ids=ids).logits
    assert (a - plain).abs().max() > 1e-3, f"{method}: the adapter changes nothing: the test would prove nothing"
    assert_close(a, b, msg=f"{method}: fastpeft vs HF PEFT logits")

    # The magnitudes trained (they start as the row norms of W + s·B·A, which B = 0 makes ‖W_n‖).
    saved = load_file(str(out / "checkpoint" / "adapter_state.safetensors"))
    params = dict(ours.named_parameters())
    moved = 0.0
    for name, t in saved.items():
        assert torch.equal(params[name].detach(), t), f"{method}: {name} differs after reload"
        if "lora_magnitude_vector" in name:
            module = ours.get_submodule(name.split(".lora_magnitude_vector")[0])
            w = module.get_base_layer()
            w = w.dequantize(torch.float32) if isinstance(w, NF4Linear) else w.weight
            moved = max(moved, (t - torch.linalg.vector_norm(w.float(), dim=1)).abs().max().item())
    assert moved > 1e-4, f"{method}: no magnitude moved from ‖W_n‖ in training (max change {moved:.2e})"
