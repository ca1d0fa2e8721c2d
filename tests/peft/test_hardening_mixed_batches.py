"""Mixed-adapter batches given odd arguments (issue 25 item 9, issue 26 item 7): a str for ``adapter_names``, a name a
layer does not hold, ``position_ids`` before ``input_ids``."""

from __future__ import annotations

import pytest
import torch
from tiny_models import batch, build, max_diff, randomize
from torch import nn

from fastpeft import LoraConfig, get_peft_model
from fastpeft.nn import LoraLinear


def _model():
    pm = get_peft_model(build("llama"), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    pm.add_adapter("b", LoraConfig(r=4, target_modules=["v_proj"], init_lora_weights=False))
    randomize(pm, ("lora_",))
    return pm.eval()


def _alone(pm, inputs, names):
    rows = []
    for i, name in enumerate(names):
        pm.set_adapter(name)
        with torch.no_grad():
            rows.append(pm(**{k: v[i : i + 1] for k, v in inputs.items()}).logits)
    return torch.cat(rows)


@pytest.mark.parametrize("names", ["bbb", "default"])
def test_issue25_item9_issue26_item7_a_str_is_refused_not_split(names):
    pm = _model()
    ids = batch(n=len(names), t=5)["input_ids"]
    with pytest.raises(TypeError, match=r"adapter_names must be a list of str, one adapter name per sample"):
        pm(input_ids=ids, adapter_names=names)
    layer = LoraLinear(nn.Linear(8, 8), adapter_name="b").eval()
    with pytest.raises(TypeError, match=r"adapter_names must be a list of str, one adapter name per row"):
        layer(torch.randn(len(names), 8), adapter_names=names)


def test_issue25_item9_layer_refuses_an_unknown_name_and_the_model_still_routes():
    layer = LoraLinear(nn.Linear(8, 8), adapter_name="a").eval()
    with pytest.raises(ValueError, match=r"no adapter named \['nope'\] in this layer; it has \['a'\]"):
        layer(torch.randn(2, 8), adapter_names=["a", "nope"])
    pm = _model()  # "a" on q_proj only, "b" on v_proj only: each layer lacks one of them
    inputs = batch(n=3, t=6)
    names = ["b", "default", "b"]
    with torch.no_grad():
        got = pm(**inputs, adapter_names=names).logits
    assert max_diff(got, _alone(pm, inputs, names)) < 1e-5
    with pytest.raises(ValueError, match="non-existing adapter"):
        pm(**inputs, adapter_names=["b", "default", "zzz"])


def test_issue26_item7_position_ids_before_input_ids_are_accepted():
    pm = _model()
    inputs = batch(n=2, t=6)
    positions = torch.arange(6).unsqueeze(0)  # [1, T]: broadcast over the batch
    names = ["default", "b"]
    with torch.no_grad():
        got = pm(position_ids=positions, input_ids=inputs["input_ids"], adapter_names=names).logits
        want = _alone(pm, {"input_ids": inputs["input_ids"]}, names)
    assert max_diff(got, want) < 1e-5
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        pm(position_ids=positions, input_ids=inputs["input_ids"], adapter_names=["b"])
