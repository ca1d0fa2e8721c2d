"""HF PEFT's refusals on fastpeft, in HF PEFT's words, each checked against the real ``peft`` package: deleting
a merged adapter, DoRA on ``nn.MultiheadAttention``, DoRA with ``megatron_config``."""

from __future__ import annotations

import re

import peft
import pytest
import torch
from torch import nn

import fastpeft


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 12)
        self.lin1 = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


class MHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x)[0]


LIBS = [pytest.param(fastpeft, id="fastpeft"), pytest.param(peft, id="peft")]


def _merged_msg(name: str) -> str:
    return re.escape(f"Cannot delete adapter(s) ['{name}'] while they are merged. Please unmerge them first.")


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("use_dora", [False, True])
def test_delete_merged_adapter_raises_and_changes_nothing(lib, use_dora):
    torch.manual_seed(0)
    config = lib.LoraConfig(target_modules=["lin0", "lin1"], use_dora=use_dora, init_lora_weights=False)
    pm = lib.get_peft_model(MLP(), config)
    x = torch.randn(3, 10)
    want = pm(x)
    pm.merge_adapter()
    with pytest.raises(ValueError, match=_merged_msg("default")):
        pm.delete_adapter("default")
    assert "default" in pm.peft_config
    torch.testing.assert_close(pm(x), want, msg="the refused deletion changed the merged model")
    pm.unmerge_adapter()
    torch.testing.assert_close(pm(x), want, msg="unmerge after the refused deletion")
    pm.delete_adapter("default")
    assert "default" not in pm.peft_config


@pytest.mark.parametrize("lib", LIBS)
def test_delete_merged_adapter_refuses_only_the_merged_one(lib):
    torch.manual_seed(0)
    config = lib.LoraConfig(target_modules=["lin0"], use_dora=True, init_lora_weights=False)
    pm = lib.get_peft_model(MLP(), config, adapter_name="adapter0")
    pm.add_adapter("adapter1", config)
    pm.set_adapter("adapter1")
    x = torch.randn(3, 10)
    want = pm(x)
    pm.merge_adapter()
    with pytest.raises(ValueError, match=_merged_msg("adapter1")):
        pm.delete_adapter("adapter1")
    pm.delete_adapter("adapter0")  # not merged: deleting it keeps adapter1 merged
    assert set(pm.peft_config) == {"adapter1"}
    assert pm.base_model.model.lin0.merged, "deleting the unmerged adapter unmerged the other one"
    torch.testing.assert_close(pm(x), want, msg="deleting the unmerged adapter changed the merged model")
    pm.unmerge_adapter()
    pm.delete_adapter("adapter1")
    assert not pm.peft_config


@pytest.mark.parametrize("lib", LIBS)
def test_mha_with_dora_refused_in_peft_words(lib):
    msg = re.escape("MultiheadAttention does not support DoRA (yet), please set use_dora to False")
    with pytest.raises(ValueError, match=msg):
        lib.get_peft_model(MHA(), lib.LoraConfig(target_modules=["mha"], use_dora=True))


@pytest.mark.parametrize("lib", LIBS)
def test_dora_with_megatron_config_refused_in_peft_words(lib):
    with pytest.raises(ValueError, match="DoRA does not support megatron_core"):
        lib.LoraConfig(target_modules=["lin0"], use_dora=True, megatron_config={"tensor_model_parallel_size": 1})


def test_megatron_config_none_only():
    assert fastpeft.LoraConfig(target_modules=["lin0"]).megatron_config is None
    assert peft.LoraConfig(target_modules=["lin0"]).megatron_config is None
    with pytest.raises(ValueError, match="megatron_config"):  # fastpeft has no Megatron layers to put LoRA on
        fastpeft.LoraConfig(target_modules=["lin0"], megatron_config={"tensor_model_parallel_size": 1})
