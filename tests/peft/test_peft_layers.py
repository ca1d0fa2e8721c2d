"""LoRA on embeddings, convolutions and parameters, and the LoRA options (lora_bias, rank / alpha patterns,
trainable tokens): the real ``peft`` package as the oracle for outputs, gradients and files in both directions."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from conftest import assert_close, stable_seed
from safetensors.torch import load_file
from tiny_models import batch, logits, max_diff, nf4_and_dense_twin
from torch import nn

import fastpeft
from fastpeft.nn import LoraConv, LoraEmbedding, LoraLinear, LoraParameter, NF4Linear


class Net(nn.Module):
    """Every layer kind LoRA wraps: embedding -> linear -> Conv1d -> Conv2d (groups) -> 1x1 Conv3d -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(23, 6, padding_idx=0)
        self.lin = nn.Linear(6, 8)
        self.conv1 = nn.Conv1d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, (3, 1), padding=(1, 0), groups=2)
        self.conv3 = nn.Conv3d(8, 4, 1)
        self.head = nn.Linear(4, 3, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lin(self.emb(ids))).transpose(1, 2)  # [b, 8, t]
        h = torch.tanh(self.conv1(h))
        h = torch.tanh(self.conv2(h[..., None]))  # [b, 8, t, 1]
        h = self.conv3(h[..., None])[..., 0, 0]  # [b, 4, t]
        return self.head(h.transpose(1, 2))


class Experts(nn.Module):
    """A mixture-of-experts block holding its weights as parameters (no nn.Linear to wrap)."""

    def __init__(self, transposed: bool) -> None:
        super().__init__()
        self.is_transposed = transposed
        shape = (3, 6, 5) if transposed else (3, 5, 6)  # [E, in, out] or [E, out, in]
        self.weight = nn.Parameter(torch.randn(shape) * 0.3)
        self.proj = nn.Parameter(torch.randn(4, 5) * 0.3)  # 2-D [out, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [E, t, 6]
        w = self.weight if self.is_transposed else self.weight.transpose(1, 2)
        return torch.bmm(x, w) @ self.proj.T


def _ids(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 23, (3, 7), generator=g)


def _pair(base: nn.Module, seed: int, **cfg) -> tuple[nn.Module, nn.Module]:
    """HF PEFT and fastpeft on twins of ``base`` with the same (random, nonzero) adapter weights."""
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **cfg))
    ours = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(init_lora_weights=False, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in peft.get_peft_model_state_dict(theirs).values():
            t.copy_(torch.randn(t.shape, generator=g) * 0.2)
    result = fastpeft.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    assert result.missing_keys == [] and result.unexpected_keys == [], result
    return theirs, ours


def _same_files(a, b):
    fa, fb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert sorted(fa) == sorted(fb), f"only ours {sorted(set(fa) - set(fb))}, only theirs {sorted(set(fb) - set(fa))}"
    for k in fa:
        assert torch.equal(fa[k], fb[k]), f"{k} differs by {max_diff(fa[k], fb[k]):.3e}"


CASES = {
    "embedding+conv": dict(r=4, lora_alpha=6, target_modules=["emb", "lin", "conv1", "conv2", "conv3"]),
    "lora_bias": dict(r=4, lora_alpha=32, target_modules=["lin", "conv1", "conv3"], lora_bias=True),
    "patterns": dict(r=4, target_modules=["lin", "conv1", "head"], rank_pattern={"conv1": 2, "^head": 6},
                     alpha_pattern={"lin": 3.0}, use_rslora=True),
    "tokens": dict(r=2, target_modules=["lin"], trainable_token_indices={"emb": [3, 0, 17]}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_gradients_and_files_match_peft(case, tmp_path):
    torch.manual_seed(stable_seed("layers", case))
    base = Net()
    theirs, ours = _pair(base, stable_seed("weights", case), **CASES[case])
    ids = _ids(stable_seed("ids", case))
    y_t, y_o = theirs(ids), ours(ids)
    assert max_diff(y_t, copy.deepcopy(base)(ids)) > 1e-3, "the adapter changed nothing"
    assert_close(y_o, y_t, msg=f"{case}: output")
    dy = torch.randn(y_t.shape, generator=torch.Generator().manual_seed(5))
    (y_t * dy).sum().backward()
    (y_o * dy).sum().backward()
    g_t = {k: p.grad for k, p in theirs.named_parameters() if p.requires_grad}
    g_o = {k: p.grad for k, p in ours.named_parameters() if p.requires_grad}
    assert sorted(g_t) == sorted(g_o), f"trainable: only peft {set(g_t) - set(g_o)}, only ours {set(g_o) - set(g_t)}"
    for k in g_t:
        scale = g_t[k].abs().max().item()
        assert max_diff(g_o[k], g_t[k]) <= 1e-5 * max(scale, 1.0), f"{case}: grad {k} off by {max_diff(g_o[k], g_t[k])}"
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    _same_files(tmp_path / "ours", tmp_path / "theirs")
    # each library loads the other's directory and computes the same
    loaded_t = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    loaded_o = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "theirs")
    with torch.no_grad():
        assert_close(loaded_t(ids), y_t.detach(), msg=f"{case}: peft on our file")
        assert_close(loaded_o(ids), y_t.detach(), msg=f"{case}: ours on peft's file")
    # merged into plain layers, the model computes what the adapter did (grouped convolutions cannot merge;
    # peft's own merge of a 1x1x1 Conv3d fails, so the unmerged peft output is the reference)
    if case != "embedding+conv":
        merged = ours.merge_and_unload()
        assert not any(isinstance(m, (LoraLinear, LoraConv)) for m in merged.modules())
        with torch.no_grad():
            assert_close(merged(ids), y_t.detach(), msg=f"{case}: merged")


def test_layer_types_and_grouped_conv_rules():
    torch.manual_seed(0)
    pm = fastpeft.get_peft_model(Net(), fastpeft.LoraConfig(r=4, target_modules=["emb", "lin", "conv1", "conv2"]))
    model = pm.get_base_model()
    kinds = {n: type(getattr(model, n)) for n in ("emb", "lin", "conv1", "conv2")}
    assert kinds == {"emb": LoraEmbedding, "lin": LoraLinear, "conv1": LoraConv, "conv2": LoraConv}, kinds
    ids = _ids(1)
    with torch.no_grad():
        adapted = pm(ids)
        assert torch.equal(adapted, pm.unload()(ids)), "the default init is not a no-op"
    with pytest.raises(ValueError, match="rank is divisible by groups"):
        fastpeft.get_peft_model(Net(), fastpeft.LoraConfig(r=3, target_modules=["conv2"]))
    pm = fastpeft.get_peft_model(Net(), fastpeft.LoraConfig(r=4, target_modules=["conv2"], init_lora_weights=False))
    with pytest.raises(ValueError, match="groups > 1"):
        pm.merge_adapter()
    with pytest.raises(ValueError, match="lora_bias=True is not supported for Embedding"):
        fastpeft.get_peft_model(Net(), fastpeft.LoraConfig(target_modules=["emb"], lora_bias=True))
    with pytest.raises(ValueError, match="lora_dropout is not supported for nn.MultiheadAttention"):
        fastpeft.get_peft_model(Attn(), fastpeft.LoraConfig(target_modules=["mha"], lora_dropout=0.1))


def test_pointwise_conv_runs_the_fused_op_and_matches_the_conv_path():
    torch.manual_seed(3)
    conv = nn.Conv2d(6, 5, 1)
    layer = LoraConv(copy.deepcopy(conv), r=3, lora_alpha=6, init_lora_weights=False, lora_bias=True).eval()
    with torch.no_grad():
        layer.lora_B["default"].bias.normal_()
    x = torch.randn(2, 6, 4, 3)
    assert layer._is_pointwise()
    fused = layer(x)
    plain = conv(x) + layer._branch(x, "default")  # the two-convolution path
    assert_close(fused, plain, msg="1x1 conv: fused op vs convolutions")


@pytest.mark.parametrize("transposed", [False, True])
def test_target_parameters_match_peft(transposed, tmp_path):
    torch.manual_seed(stable_seed("experts", transposed))
    base = nn.Sequential(Experts(transposed))
    theirs, ours = _pair(base, 11, r=2, lora_alpha=5, target_parameters=["0.weight", "proj"])
    x = torch.randn(3, 4, 6)
    assert isinstance(ours.get_base_model()[0], LoraParameter)
    y_t, y_o = theirs(x), ours(x)
    assert max_diff(y_t, base(x)) > 1e-3
    assert_close(y_o, y_t, msg="target_parameters output")
    y_t.sum().backward()
    y_o.sum().backward()
    g_t = {k: p.grad for k, p in theirs.named_parameters() if p.requires_grad}
    g_o = {k: p.grad for k, p in ours.named_parameters() if p.requires_grad}
    assert sorted(g_t) == sorted(g_o)
    for k in g_t:
        assert_close(g_o[k], g_t[k], msg=f"grad {k}")
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    _same_files(tmp_path / "ours", tmp_path / "theirs")
    merged = ours.merge_and_unload()
    assert isinstance(merged[0], Experts)
    with torch.no_grad():
        assert_close(merged(x), y_t.detach(), msg="merged experts")


def test_trainable_tokens_train_only_their_rows():
    torch.manual_seed(4)
    pm = fastpeft.get_peft_model(Net(), fastpeft.LoraConfig(target_modules=["lin"], trainable_token_indices=[2, 5]))
    emb = pm.get_base_model().emb
    before = emb.original_module.weight.detach().clone()
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    pm(_ids(2)).square().mean().backward()
    opt.step()
    assert torch.equal(emb.original_module.weight, before), "the frozen table changed"
    table = emb.token_adapter.table("default").detach()
    changed = (table != before).any(dim=1).nonzero().flatten().tolist()
    assert set(changed) <= {2, 5} and changed, f"rows changed: {changed}"
    merged = pm.merge_and_unload().emb
    assert isinstance(merged, nn.Embedding) and torch.equal(merged.weight, table)


class Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2)
        self.lin0 = nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin0(self.mha(x, x, x)[0])


def test_multihead_attention_lora_is_the_merged_weights_and_peft_reads_its_files(tmp_path):
    torch.manual_seed(8)
    base, x = Attn(), torch.randn(3, 4, 10)
    cfg = dict(r=4, lora_alpha=8, target_modules=["mha"])
    ours = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**cfg))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **cfg))
    sd = peft.get_peft_model_state_dict(theirs)
    assert fastpeft.set_peft_model_state_dict(ours, sd) == ([], [])
    # The reference: a plain attention holding W + s·B·A in both projections (LoRA's definition).
    ref = copy.deepcopy(base)
    key = "base_model.model.mha."
    with torch.no_grad():
        ref.mha.in_proj_weight += 2.0 * sd[key + "lora_B.weight"] @ sd[key + "lora_A.weight"]
        out = key + "base_layer.out_proj."
        ref.mha.out_proj.weight += 2.0 * sd[out + "lora_B.weight"] @ sd[out + "lora_A.weight"]
    y = ours(x)
    assert_close(y, ref(x), msg="LoRA on nn.MultiheadAttention")
    y.square().sum().backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert len(grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert ours.base_model.model.mha.embed_dim == 10 and ours.base_model.model.mha.num_heads == 2
    ours.merge_adapter()
    assert_close(ours(x), ref(x), msg="merged")
    ours.unmerge_adapter()
    with ours.disable_adapter():
        assert_close(ours(x), base(x), msg="disabled")
    ours.save_pretrained(tmp_path)
    assert sorted(load_file(tmp_path / "adapter_model.safetensors")) == sorted(sd)
    peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)  # peft loads our file (its outputs: peft#3774)
    merged = ours.merge_and_unload()
    assert type(merged.mha) is nn.MultiheadAttention and type(merged.mha.out_proj) is not LoraLinear
    assert_close(merged(x), ref(x), msg="merged and unloaded")
    with pytest.raises(ValueError, match="output projection of an nn.MultiheadAttention"):
        fastpeft.get_peft_model(Attn(), fastpeft.LoraConfig(target_modules=["out_proj"]))


def test_embedding_lora_in_a_quantized_model_matches_peft(tmp_path):
    model, twin = nf4_and_dense_twin()  # HF PEFT's side: the dense twin holding the dequantized NF4 weights
    cfg = dict(r=4, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)
    ours = fastpeft.get_peft_model(model, fastpeft.LoraConfig(**cfg))
    assert isinstance(ours.get_base_model().model.embed_tokens, LoraEmbedding)
    layer = ours.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraLinear) and isinstance(layer.get_base_layer(), NF4Linear)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(twin, tmp_path)
    inputs = batch()
    assert_close(logits(ours, inputs), logits(theirs, inputs), msg="embedding + NF4 LoRA vs peft")
    ours.train()
    ours(**inputs, labels=inputs["input_ids"]).loss.backward()
    emb = ours.get_base_model().model.embed_tokens
    assert emb.lora_embedding_A["default"].grad is not None and emb.base_layer.weight.grad is None
