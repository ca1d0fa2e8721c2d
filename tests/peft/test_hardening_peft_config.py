"""Adapter configs and names from hostile or newer files (issue 25 item 3, issue 26 item 8): module-name lists that
are not module paths, reserved and over-long adapter names, a scaling beyond float32, rank_pattern refusals, and
keys from a newer PEFT release."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import build

from fastpeft import LoraConfig, PeftModel, get_peft_model
from fastpeft.peft import config_from_dict


def _saved(tmp_path, **edits):
    pm = get_peft_model(build("llama"), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    pm.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    data.update(edits)
    path.write_text(json.dumps(data))
    return tmp_path


@pytest.mark.parametrize(
    ("key", "value", "shown"),
    [("modules_to_save", ["../x"], "'../x' is not a module path"),
     ("target_parameters", ["../x"], "'../x' is not a module path"),
     ("exclude_modules", ["(["], "'([' holds"),
     ("target_modules", ["q_proj", "model/layers"], "'model/layers' is not a module path")],
)  # fmt: skip
def test_issue25_item3_module_lists_that_are_not_module_paths_are_refused(tmp_path, key, value, shown):
    directory = _saved(tmp_path, **{key: value})
    with pytest.raises(ValueError, match=rf"adapter_config\.json: .*{key} entry {re.escape(shown)}") as info:
        PeftModel.from_pretrained(build("llama"), directory)
    assert str(info.value).count("\n") == 0
    with pytest.raises(ValueError, match=key):
        LoraConfig(**{"target_modules": ["q_proj"], key: value})


def test_issue25_item3_reserved_and_over_long_adapter_names_are_refused(tmp_path):
    pm = get_peft_model(build("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="'__base__' is reserved"):
        pm.add_adapter("__base__", LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="300 characters; at most 255"):
        pm.add_adapter("a" * 300, LoraConfig(r=2, target_modules=["q_proj"]))
    assert sorted(pm.peft_config) == ["default"]
    pm.add_adapter("a" * 255, LoraConfig(r=2, target_modules=["q_proj"]))  # the longest a file name may be
    pm.save_pretrained(tmp_path)
    assert (tmp_path / ("a" * 255) / "adapter_config.json").is_file()


def test_issue26_item8_lora_alpha_beyond_float32_is_refused(tmp_path):
    for value in (1e308, -1e39):
        with pytest.raises(ValueError, match="lora_alpha must be a finite number within float32's range"):
            LoraConfig(lora_alpha=value)
    with pytest.raises(ValueError, match=r"alpha_pattern\['q_proj'\] must be a finite number within float32"):
        LoraConfig(alpha_pattern={"q_proj": 1e300})
    directory = _saved(tmp_path, lora_alpha=1e308)
    with pytest.raises(ValueError, match=r"adapter_config\.json: .*lora_alpha"):
        PeftModel.from_pretrained(build("llama"), directory)
    assert LoraConfig(lora_alpha=3e38).lora_alpha == 3e38  # within float32: accepted


def test_issue26_item8_rank_pattern_refusal_names_the_patterns_rank():
    config = LoraConfig(r=4, target_modules=["q_proj"], rank_pattern={"q_proj": 10**10})
    with pytest.raises(ValueError, match=r"LoRA with r=10000000000 \(rank_pattern\) on 2 layers needs") as info:
        get_peft_model(build("llama"), config)
    assert "r=4" not in str(info.value)


def test_issue26_item8_keys_from_a_newer_peft_load_with_one_warning(tmp_path):
    directory = _saved(tmp_path, option_from_peft_9=True, another_new_key={"a": 1})
    weights = directory / "adapter_model.safetensors"
    save_file(load_file(str(weights)), str(weights), metadata={"format": "pt"})  # as HF PEFT writes it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = PeftModel.from_pretrained(build("llama"), directory)
    ours = [str(w.message) for w in caught if "option_from_peft_9" in str(w.message)]
    assert len(ours) == 1 and "another_new_key" in ours[0], [str(w.message) for w in caught]
    assert isinstance(pm.peft_config["default"], LoraConfig)
    with pytest.warns(UserWarning, match="ignoring keys"):
        assert config_from_dict({**LoraConfig().to_dict(), "x_new": 1}).r == 8
    assert torch.isfinite(pm(input_ids=torch.tensor([[3, 4, 5]])).logits).all()
