"""DoRA on embeddings and convolutions (Conv1d, Conv2d) against the real ``peft`` package: initial magnitudes,
file keys and shapes, outputs and gradients with adapter files moved both ways, merge / unmerge."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from conftest import assert_close, stable_seed
from safetensors.torch import load_file
from tiny_models import max_diff
from torch import nn

import fastpeft
from fastpeft import LoraConfig, PeftModel, get_peft_model

TARGETS = ["emb", "conv1", "conv2"]
RTOL = 1e-5  # same float32 math in both libraries, the norm summed in another order: relative to the largest entry


def _same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    diff, scale = max_diff(got, want), max(1.0, want.abs().max().item())
    assert diff <= RTOL * scale, f"{what}: differs by {diff:.3e} (largest entry {scale:.3e})"


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(31, 12)
        self.conv1 = nn.Conv1d(12, 10, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, bias=False)

    def forward(self, ids: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.emb(ids).transpose(1, 2))
        return torch.cat([h.flatten(1), self.conv2(img).flatten(1)], dim=1)


def _inputs(*key) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(stable_seed("dora layers inputs", *key))
    return torch.randint(0, 31, (3, 7), generator=g), torch.randn(3, 4, 9, 11, generator=g)


def _base() -> _Net:
    torch.manual_seed(4)
    return _Net().eval()


def _randomize(model: nn.Module, seed: int) -> None:
    """LoRA weights and magnitudes away from their initial values (so the rescaling is visible)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name and "magnitude" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.5 * torch.rand(p.shape, generator=g))


def _config(cls):
    return cls(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True, init_lora_weights=False)


def _grads(model: nn.Module, inputs) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(*inputs).square().sum().backward()
    return {n.replace(".base_layer", ""): p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_initial_magnitudes_and_file_keys_equal_peft(tmp_path):
    torch.manual_seed(0)
    ours = get_peft_model(_base(), _config(LoraConfig))
    theirs = peft.get_peft_model(_base(), _config(peft.LoraConfig))
    with torch.no_grad():  # the same A and B on both sides: the magnitudes are the norms of W + s·B·A
        theirs_params = dict(theirs.named_parameters())
        for n, p in ours.named_parameters():
            if "lora_" in n and "magnitude" not in n:
                p.copy_(theirs_params[n])
    for module in ours.modules():  # recompute the magnitudes from the copied A and B
        if hasattr(module, "lora_magnitude_vector") and "default" in module.lora_magnitude_vector:
            module._add_magnitude("default", True)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    a = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "theirs" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b), f"keys differ: {sorted(set(a) ^ set(b))}"
    for k in a:
        assert a[k].shape == b[k].shape, f"{k}: shape {tuple(a[k].shape)} vs peft's {tuple(b[k].shape)}"
        assert_close(a[k], b[k], msg=f"{k}: fastpeft vs peft")


@pytest.mark.parametrize("direction", ["ours_to_peft", "peft_to_ours"])
def test_files_move_both_ways_with_equal_outputs_and_gradients(tmp_path, direction):
    torch.manual_seed(1)
    if direction == "ours_to_peft":
        writer = get_peft_model(_base(), _config(LoraConfig))
    else:
        writer = peft.get_peft_model(_base(), _config(peft.LoraConfig))
    _randomize(writer, seed=3)
    writer.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(_base(), str(tmp_path), is_trainable=True)
    theirs = peft.PeftModel.from_pretrained(_base(), str(tmp_path), is_trainable=True)
    inputs = _inputs(direction)
    with torch.no_grad():
        y, want, plain = ours(*inputs), theirs(*inputs), _base()(*inputs)
    assert (y - plain).abs().max() > 1e-2, "the adapter changes nothing: the comparison would prove nothing"
    assert_close(y, want, msg=f"{direction}: outputs")
    a, b = _grads(ours.train(), inputs), _grads(theirs.train(), inputs)
    assert sorted(a) == sorted(b), f"trainable names differ: {sorted(set(a) ^ set(b))}"
    assert sum("lora_magnitude_vector" in n for n in a) == len(TARGETS)
    for n in a:
        assert a[n].abs().max() > 0, f"{n}: zero gradient, the check would prove nothing"
        _same(a[n], b[n], f"{direction}: gradient of {n}")


def test_dropout_training_matches_peft_with_the_same_masks(tmp_path):
    torch.manual_seed(2)
    ours = get_peft_model(_base(), LoraConfig(r=4, lora_alpha=8, target_modules=["conv1", "conv2"], use_dora=True,
                                              lora_dropout=0.3, init_lora_weights=False))  # fmt: skip
    _randomize(ours, seed=5)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(_base(), str(tmp_path), is_trainable=True).train()
    ours.train()
    inputs = _inputs("dropout")
    torch.manual_seed(9)
    y = ours(*inputs)
    torch.manual_seed(9)  # one dropout draw per layer, in the same order in both libraries
    want = theirs(*inputs)
    assert_close(y, want, msg="training with dropout")


def test_merge_and_unload_and_unmerge_match_peft(tmp_path):
    torch.manual_seed(3)
    ours = get_peft_model(_base(), _config(LoraConfig))
    _randomize(ours, seed=7)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(_base(), str(tmp_path))
    inputs = _inputs("merge")
    with torch.no_grad():
        before = ours(*inputs)
        ours.merge_adapter()
        merged = ours(*inputs)
        ours.unmerge_adapter()
        after = ours(*inputs)
        folded = copy.deepcopy(ours).merge_and_unload()
        theirs_folded = theirs.merge_and_unload()
    assert_close(merged, before, msg="merged vs unmerged output")
    assert_close(after, before, msg="after unmerge vs before merge")
    assert isinstance(folded.emb, nn.Embedding) and isinstance(folded.conv2, nn.Conv2d)
    for name in TARGETS:
        got, want = getattr(folded, name).weight, getattr(theirs_folded, name).weight
        assert_close(got, want, msg=f"{name}: merge_and_unload weight vs peft's")
    assert_close(ours.base_model.model.emb.base_layer.weight, _base().emb.weight, msg="unmerged embedding table")


class _Grouped(nn.Module):
    """Grouped convolutions: HF PEFT's norm reads the grouped ``lora_B`` as ``[out/g, r]`` (module doc of
    ``fastpeft.nn.lora_dora_layers``), which only a grouped layer exercises."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(12, 8, 3, padding=1, groups=4)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, groups=2, bias=False)

    def forward(self, seq: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv1(seq).flatten(1), self.conv2(img).flatten(1)], dim=1)


def _grouped() -> _Grouped:
    torch.manual_seed(6)
    return _Grouped().eval()


def _grouped_config(cls):
    return cls(r=8, lora_alpha=8, target_modules=["conv1", "conv2"], use_dora=True, init_lora_weights=False)


def test_grouped_convolution_initial_magnitudes_equal_peft():
    torch.manual_seed(2)
    ours = get_peft_model(_grouped(), _grouped_config(LoraConfig))
    theirs = peft.get_peft_model(_grouped(), _grouped_config(peft.LoraConfig))
    theirs_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "lora_" in n and "magnitude" not in n:
                p.copy_(theirs_params[n])
    for name in ("conv1", "conv2"):
        layer = getattr(ours.base_model.model, name)
        layer._add_magnitude("default", True)
        key = f"base_model.model.{name}.lora_magnitude_vector.default.weight"
        got, want = layer.lora_magnitude_vector["default"].weight, theirs_params[key]
        assert got.shape == want.shape, f"{name}: magnitude shape {tuple(got.shape)} vs peft's {tuple(want.shape)}"
        _same(got, want, f"{name}: initial magnitude")


@pytest.mark.parametrize("direction", ["ours_to_peft", "peft_to_ours"])
def test_grouped_convolution_files_move_both_ways(tmp_path, direction):
    torch.manual_seed(3)
    lib = fastpeft if direction == "ours_to_peft" else peft
    writer = lib.get_peft_model(_grouped(), _grouped_config(lib.LoraConfig))
    _randomize(writer, seed=5)
    writer.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(_grouped(), str(tmp_path), is_trainable=True)
    theirs = peft.PeftModel.from_pretrained(_grouped(), str(tmp_path), is_trainable=True)
    g = torch.Generator().manual_seed(stable_seed("grouped dora inputs", direction))
    inputs = torch.randn(3, 12, 9, generator=g), torch.randn(3, 4, 9, 11, generator=g)
    with torch.no_grad():
        y, want, plain = ours(*inputs), theirs(*inputs), _grouped()(*inputs)
    assert (y - plain).abs().max() > 1e-2, "the adapter changes nothing: the comparison would prove nothing"
    assert_close(y, want, msg=f"{direction}: outputs")
    a, b = _grads(ours.train(), inputs), _grads(theirs.train(), inputs)
    assert sorted(a) == sorted(b), f"trainable names differ: {sorted(set(a) ^ set(b))}"
    for n in a:
        assert a[n].abs().max() > 0, f"{n}: zero gradient, the check would prove nothing"
        _same(a[n], b[n], f"{direction}: gradient of {n}")


def test_grouped_convolution_merge_refused_and_rank_checked():
    model = get_peft_model(_grouped(), _grouped_config(LoraConfig))
    with pytest.raises(ValueError, match="groups > 1"):
        model.merge_adapter()
    assert not model.base_model.model.conv1.merged
    msg = "Targeting a Conv2d with groups=2 and rank 1. Currently, support is limited to conv layers where the rank"
    for lib in (fastpeft, peft):  # HF PEFT's words for a rank the groups do not divide, with DoRA too
        net = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2))
        with pytest.raises(ValueError, match=msg):
            lib.get_peft_model(net, lib.LoraConfig(r=1, target_modules=["0"], use_dora=True))


def test_compiles_with_fullgraph_and_matches_eager():
    torch.manual_seed(5)
    model = get_peft_model(_base(), _config(LoraConfig))
    _randomize(model, seed=11)
    inputs = _inputs("compile")
    want = _grads(model.train(), inputs)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # a graph break raises
    got = {n.removeprefix("_orig_mod."): g for n, g in _grads(compiled, inputs).items()}
    assert sorted(got) == sorted(want)
    for n in want:
        _same(got[n], want[n], f"compiled vs eager gradient of {n}")
