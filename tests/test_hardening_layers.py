"""Bad input to the drop-in layers and NF4 weights (issue 25, items 8 and 12): NaN statistics, moves to devices
that are not there, 0-d inputs, meta weights; each a ``ValueError`` saying what is wrong, not a traceback from
deep inside torch or the op."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastpeft.nn import LoraLinear, NF4Linear
from fastpeft.quant import NF4Weight, quantize_nf4


def _nf4(double_quant: bool = True) -> NF4Linear:
    torch.manual_seed(0)
    return NF4Linear(quantize_nf4(torch.randn(96, 64), double_quant=double_quant))


@pytest.mark.parametrize(("double_quant", "field"), [(False, "absmax"), (True, "nested_absmax"), (True, "quant_map")])
def test_issue25_item8_nan_statistics_are_refused_by_key(double_quant, field):
    sd = _nf4(double_quant).state_dict(prefix="model.proj.")
    key = f"model.proj.weight.{field}"
    sd[key] = sd[key].clone()
    sd[key][0] = float("nan")
    with pytest.raises(ValueError, match=rf"model\.proj\.weight\.{field} holds 1 non-finite value"):
        NF4Weight.from_bnb_state_dict(sd, "model.proj")
    layer = _nf4(double_quant)
    with pytest.raises(RuntimeError, match=rf"weight\.{field} holds 1 non-finite value"):
        layer.load_state_dict({k.removeprefix("model.proj."): v for k, v in sd.items()})
    assert torch.isfinite(layer.dequantize(torch.float32)).all(), "the refused state dict was installed"


def test_issue25_item8_nan_absmax_is_refused_at_construction():
    w = quantize_nf4(torch.randn(64, 64), double_quant=False)
    absmax = w.absmax.clone()
    absmax[3] = float("inf")
    with pytest.raises(ValueError, match="absmax holds 1 non-finite value"):
        NF4Weight(w.packed, absmax, w.shape, w.dtype)


@pytest.mark.parametrize("kind", ["nf4", "lora"])
@pytest.mark.parametrize("target", ["cuda", "cuda:3", "bogus:0"])
def test_issue25_item12_moves_to_missing_devices_are_value_errors(kind, target):
    if torch.cuda.is_available() and target == "cuda":
        pytest.skip("a GPU is here")
    layer = _nf4() if kind == "nf4" else LoraLinear(nn.Linear(64, 96))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=rf"{type(layer).__name__}.*{target.split(':')[0]}"):
        layer.to(target)
    if target != "bogus:0" and not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not available|does not exist"):
            layer.cuda()
    after = layer.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].device.type == "cpu" for k in before)
    assert layer.to("cpu") is layer and layer.to(torch.float32) is layer


@pytest.mark.parametrize("kind", ["nf4", "lora", "lora-nf4"])
def test_issue25_item12_0d_and_wrong_width_inputs_are_named(kind):
    layer = _nf4() if kind == "nf4" else LoraLinear(_nf4() if kind == "lora-nf4" else nn.Linear(64, 96))
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 64\], got a 0-d tensor"):
        layer(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 64\], got \(3, 65\)"):
        layer(torch.randn(3, 65))
    assert layer(torch.randn(64)).shape == (96,)


def test_issue25_item12_quantizing_a_meta_weight_is_a_value_error():
    with pytest.raises(ValueError, match="w is on the meta device: it has no values to quantize"):
        quantize_nf4(torch.empty(64, 64, device="meta"))
    with pytest.raises(ValueError, match="meta device"):
        NF4Linear.from_linear(nn.Linear(64, 64, device="meta"))
