"""Adapter files whose tensors or shapes do not belong to the model (issue 25, items 7, 10 and 12): non-float
dtypes, NaN / inf, values beyond the model's dtype, a prompt table of another width, a non-module model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import build

from fastpeft import LoraConfig, PeftModel, PromptTuningConfig, get_peft_model

KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def _saved(tmp_path, model=None):
    model = build("llama") if model is None else model
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)).save_pretrained(tmp_path)
    return tmp_path


def _rewrite(directory, key, fn):
    path = directory / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors[key] = fn(tensors[key])
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize(
    "dtype", [torch.int8, torch.uint8, torch.int32, torch.bool, torch.complex64, torch.float8_e4m3fn]
)
def test_issue25_item7_adapter_non_float_tensor_refused_by_key(tmp_path, dtype):
    directory = _saved(tmp_path)
    _rewrite(directory, KEY, lambda t: t.to(dtype))
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(ValueError, match=rf"adapter_model\.safetensors: {KEY} is {name}; adapter weights must be"):
        PeftModel.from_pretrained(build("llama"), directory)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_issue25_item7_adapter_non_finite_values_refused_by_key_unless_allowed(tmp_path, value):
    directory = _saved(tmp_path)
    _rewrite(directory, KEY, lambda t: torch.where(torch.arange(t.numel()).view(t.shape) == 3, value, t))
    with pytest.raises(ValueError, match=rf"{KEY} holds 1 non-finite value\(s\).*allow_non_finite=True"):
        PeftModel.from_pretrained(build("llama"), directory)
    pm = PeftModel.from_pretrained(build("llama"), directory, allow_non_finite=True)
    weight = pm.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert weight.flatten()[3].item() != weight.flatten()[3].item() or weight.flatten()[3].isinf()
    with pytest.raises(ValueError, match=KEY):
        pm.load_adapter(directory, "second")


def test_issue25_item7_values_beyond_the_models_dtype_refused(tmp_path):
    directory = _saved(tmp_path)
    _rewrite(directory, KEY, lambda t: torch.full_like(t, 1e38))  # finite in float32, inf in float16
    with pytest.raises(ValueError, match=rf"{KEY} holds values up to 1e\+38, beyond float16's range"):
        PeftModel.from_pretrained(build("llama").half(), directory)
    pm = PeftModel.from_pretrained(build("llama"), directory)  # a float32 model holds them
    assert torch.isfinite(pm.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight).all()


def test_issue25_item7_prompt_embeddings_checked_too(tmp_path):
    model = build("llama")
    get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).save_pretrained(tmp_path)
    _rewrite(tmp_path, "prompt_embeddings", lambda t: t.fill_(float("nan")))
    with pytest.raises(ValueError, match="prompt_embeddings holds 96 non-finite value"):
        PeftModel.from_pretrained(build("llama"), tmp_path)


def test_issue25_item10_prompt_token_dim_of_another_model_is_refused_at_load(tmp_path):
    with pytest.raises(ValueError, match="token_dim=48 does not match the embedding width 32"):
        get_peft_model(build("llama"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, token_dim=48))
    get_peft_model(build("llama"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).save_pretrained(
        tmp_path
    )
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    data["token_dim"] = 48
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"adapter_config\.json: .*token_dim=48 does not match"):
        PeftModel.from_pretrained(build("llama"), tmp_path)


def test_issue25_item12_get_peft_model_of_a_non_module_is_a_type_error():
    for model in (None, "meta-llama/Llama-3-8B", {"weight": torch.zeros(2)}):
        with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got"):
            get_peft_model(model, LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="peft_config must be a config such as LoraConfig, got dict"):
        get_peft_model(build("llama"), {"r": 8})
