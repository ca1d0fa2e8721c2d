"""``get_peft_model_state_dict`` / ``set_peft_model_state_dict`` through FSDP, as HF PEFT's
``TestPeftFsdpStateDict``: one CPU process (gloo, world size 1), a PeftModel wrapped by FSDP1
(``FullyShardedDataParallel(use_orig_params=True)``) or by ``fully_shard`` (FSDP2), its adapter taken out and
loaded into a fresh PeftModel; the outputs must agree, and the keys must be HF PEFT's for the same model."""

from __future__ import annotations

import peft
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

import fastpeft


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 12)
        self.lin1 = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


@pytest.fixture(scope="module", autouse=True)
def process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already set up in this process")
    dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _wrap(model: nn.Module, how: str) -> nn.Module:
    if how == "fsdp1":
        return FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"))
    return fully_shard(model, mesh=init_device_mesh("cpu", (1,)))


def _peft_model(lib, use_dora: bool, bias: str = "none") -> nn.Module:
    torch.manual_seed(0)
    base = MLP()
    config = lib.LoraConfig(target_modules=["lin0"], use_dora=use_dora, init_lora_weights=False, bias=bias)
    return lib.get_peft_model(base, config).eval()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("how", ["fsdp1", "fsdp2"])
@pytest.mark.parametrize("use_dora", [False, True])
def test_state_dict_round_trip_through_fsdp(how, use_dora):
    x = torch.randn(9, 10)
    wrapped = _wrap(_peft_model(fastpeft, use_dora), how)
    with torch.no_grad():
        want = wrapped(x)  # after a forward: FSDP2's root keeps its all-gathered parameters until resharded
    state = {k: v.clone() for k, v in fastpeft.get_peft_model_state_dict(wrapped).items()}
    theirs = peft.get_peft_model_state_dict(_peft_model(peft, use_dora))
    assert sorted(state) == sorted(theirs), (
        f"keys: only ours {set(state) - set(theirs)}, only peft's {set(theirs) - set(state)}"
    )
    assert all(type(v) is torch.Tensor for v in state.values()), "DTensor shards left in the state dict"

    fresh = _peft_model(fastpeft, use_dora)
    with torch.no_grad():  # a different adapter: the load must be what makes the outputs agree
        for p in fastpeft.get_peft_model_state_dict(fresh).values():
            p.add_(1.0)
    result = fastpeft.set_peft_model_state_dict(fresh, state)
    assert not result.missing_keys and not result.unexpected_keys, result
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), want, msg=f"{how}: the reloaded adapter computes otherwise")


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("how", ["fsdp1", "fsdp2"])
def test_set_state_dict_into_fsdp_model(how):
    wrapped = _wrap(_peft_model(fastpeft, use_dora=True), how)
    with torch.no_grad():
        wrapped(torch.randn(2, 10))
    new = {k: torch.randn_like(v) for k, v in fastpeft.get_peft_model_state_dict(wrapped).items()}
    result = fastpeft.set_peft_model_state_dict(wrapped, new)
    assert not result.missing_keys and not result.unexpected_keys, result
    got = fastpeft.get_peft_model_state_dict(wrapped)
    for k, v in new.items():
        torch.testing.assert_close(got[k], v, msg=f"{how}: {k} not written into the wrapped model")


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("lib", [pytest.param(fastpeft, id="fastpeft"), pytest.param(peft, id="peft")])
def test_saved_biases_load_into_a_bias_none_adapter(lib):
    """``bias="all"`` saves every bias; loading the dict into an adapter made with ``bias="none"`` still sets
    them (HF PEFT's ``TestPeftFsdpStateDict::test_save_load_roundtrip_fsdp_wrapped_learnable_bias``)."""
    x = torch.randn(9, 10)
    pm = _peft_model(lib, use_dora=True, bias="all")
    with torch.no_grad():
        for m in pm.modules():
            if isinstance(getattr(m, "bias", None), torch.Tensor):
                m.bias.fill_(1.23)
    wrapped = _wrap(pm, "fsdp1")
    with torch.no_grad():
        want = wrapped(x)
    state = {k: v.clone() for k, v in lib.get_peft_model_state_dict(wrapped).items()}
    assert {k for k in state if k.endswith("bias")} == {
        "base_model.model.lin0.base_layer.bias",
        "base_model.model.lin1.bias",
    }
    fresh = _peft_model(lib, use_dora=True)
    result = lib.set_peft_model_state_dict(fresh, state)
    assert not result.unexpected_keys, result
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), want, msg="the saved biases were not loaded")
