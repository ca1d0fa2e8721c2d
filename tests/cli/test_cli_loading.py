"""Streaming NF4 loading, ``fastpeft quantize`` (transformers + bitsandbytes as the oracle) and ``fastpeft merge``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_close
from safetensors.torch import load_file, save_file
from tinymodels import finetune_args, write_checkpoint, write_qa

from fastpeft.app.cli import main
from fastpeft.loading import load_causal_lm
from fastpeft.nn import NF4Linear

_NF4_BUFFERS = ("packed", "absmax", "quant_map", "nested_absmax", "offset", "nested_quant_map")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    return {
        "plain": write_checkpoint(root / "plain", seed=2),
        "sharded_tied": write_checkpoint(root / "sharded_tied", seed=3, tie=True, shard="40KB"),
        "qwen2_bias": write_checkpoint(root / "qwen2_bias", seed=5, arch="qwen2"),
    }


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(3, 260, (2, 13), generator=torch.Generator().manual_seed(seed))


def _nf4_layers(model: torch.nn.Module) -> dict[str, NF4Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, NF4Linear)}


@pytest.mark.parametrize("which", ["plain", "sharded_tied", "qwen2_bias"])
def test_streaming_qlora_equals_quantize_model(ckpts: dict[str, Path], which: str) -> None:
    from transformers import AutoModelForCausalLM

    from fastpeft.peft import quantize_model

    path = ckpts[which]
    if which == "sharded_tied":
        assert (path / "model.safetensors.index.json").is_file(), "the fixture should be sharded"
    streamed = load_causal_lm(path, quantize=True)
    eager = quantize_model(AutoModelForCausalLM.from_pretrained(str(path)).eval())
    a, b = _nf4_layers(streamed), _nf4_layers(eager)
    assert a.keys() == b.keys() and len(a) == 14, sorted(a)
    for name in a:
        for buf in _NF4_BUFFERS:
            x, y = getattr(a[name], buf), getattr(b[name], buf)
            assert torch.equal(x, y), f"{name}.{buf} differs (max abs diff {(x.float() - y.float()).abs().max():.3e})"
    assert not isinstance(streamed.lm_head, NF4Linear), "the LM head must stay dense"
    if which == "qwen2_bias":
        q = a["model.layers.1.self_attn.q_proj"]
        assert q.bias is not None and torch.equal(q.bias, b["model.layers.1.self_attn.q_proj"].bias), "bias lost"
    if which == "sharded_tied":
        assert streamed.lm_head.weight is streamed.model.embed_tokens.weight, "tied embeddings were not re-tied"
    assert not any(t.is_meta for t in list(streamed.parameters()) + list(streamed.buffers())), "meta tensors remain"
    with torch.no_grad():
        diff = (streamed(_ids(1)).logits - eager(_ids(1)).logits).abs().max().item()
    assert diff == 0.0, f"streamed and eagerly quantized logits differ by {diff:.3e}"


def test_streaming_dense_equals_from_pretrained(ckpts: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    path = ckpts["sharded_tied"]
    ours, ref = load_causal_lm(path), AutoModelForCausalLM.from_pretrained(str(path)).eval()
    with torch.no_grad():
        diff = (ours(_ids(2)).logits - ref(_ids(2)).logits).abs().max().item()
    assert diff == 0.0, f"logits differ by {diff:.3e}"


def _edit_weights(src: Path, dst: Path, edit) -> Path:  # noqa: ANN001 - a small callable
    dst.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (dst / f).write_bytes((src / f).read_bytes())
    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_missing_unexpected_and_misshapen_tensors_are_named(ckpts: dict[str, Path], tmp_path: Path) -> None:
    src = ckpts["plain"]
    key = "model.layers.1.mlp.up_proj.weight"
    missing = _edit_weights(src, tmp_path / "missing", lambda t: t.pop(key))
    with pytest.raises(ValueError, match=r"missing.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_causal_lm(missing, quantize=True)
    extra = _edit_weights(src, tmp_path / "extra", lambda t: t.update({"model.extra.weight": torch.ones(3)}))
    with pytest.raises(ValueError, match=r"unexpected.*model\.extra\.weight"):
        load_causal_lm(extra)
    bad = _edit_weights(src, tmp_path / "bad", lambda t: t.update({key: torch.ones(5, 7)}))
    with pytest.raises(ValueError, match=r"size mismatch for model\.layers\.1\.mlp\.up_proj\.weight"):
        load_causal_lm(bad, quantize=True)


def test_quantize_writes_a_checkpoint_transformers_and_bitsandbytes_load(
    ckpts: dict[str, Path], tmp_path: Path
) -> None:
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    out = tmp_path / "nf4"
    assert main(["quantize", "--model", str(ckpts["plain"]), "--out", str(out), "--compute-dtype", "float32"]) == 0
    config = json.loads((out / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "bitsandbytes" and q["load_in_4bit"] and q["bnb_4bit_quant_type"] == "nf4", q
    assert (out / "tokenizer.json").is_file(), "tokenizer files were not copied"
    ours = load_causal_lm(ckpts["plain"], quantize=True)
    reloaded = load_causal_lm(out)  # the pre-quantized path: the six keys straight into NF4Linear
    # Train mode: bitsandbytes then dequantizes and multiplies in the compute dtype (fp32 here); in eval mode
    # on the CPU it repacks the weight for a bf16 kernel, which is bitsandbytes' precision, not the format's.
    theirs = AutoModelForCausalLM.from_pretrained(str(out)).train()
    for name, layer in _nf4_layers(ours).items():
        for buf in _NF4_BUFFERS:
            assert torch.equal(getattr(layer, buf), getattr(reloaded.get_submodule(name), buf)), f"{name}.{buf}"
        lin4 = theirs.get_submodule(name)
        assert isinstance(lin4, bnb.nn.Linear4bit), f"transformers loaded {name} as {type(lin4).__name__}"
        w = bnb.functional.dequantize_4bit(lin4.weight.data, lin4.weight.quant_state).float()
        diff = (w - layer.dequantize(torch.float32)).abs().max().item()
        assert diff == 0.0, f"{name}: bitsandbytes dequantizes our bytes differently (max abs diff {diff:.3e})"
    with torch.no_grad():
        a, b = ours(_ids(3)).logits, theirs(_ids(3)).logits
    assert_close(a, b, msg="fastpeft vs transformers + bitsandbytes logits")


@pytest.fixture(scope="module")
def qlora_adapter(ckpts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("qlora")
    out = root / "adapter"
    args = finetune_args(ckpts["plain"], write_qa(root), out, "--method", "qlora", "--lr", "2e-2", "--max-steps", "6")
    assert main(args) == 0
    return out


def _check_merged(merged_dir: Path, base: torch.nn.Module, adapter_dir: Path) -> None:
    """Every merged projection equals ``W + (alpha / r) * B @ A`` (computed in fp64); everything else is the base's."""
    merged = load_file(str(merged_dir / "model.safetensors"))
    lora = load_file(str(adapter_dir / "adapter_model.safetensors"))
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    scaling = cfg["lora_alpha"] / cfg["r"]
    n_merged = 0
    for name, module in base.named_modules():
        if isinstance(module, NF4Linear):
            w = module.dequantize(torch.float64)
        elif isinstance(module, torch.nn.Linear):
            w = module.weight.detach().double()
        else:
            continue
        key = f"base_model.model.{name}.lora_A.weight"
        if key in lora:
            a, b = lora[key].double(), lora[key.replace("lora_A", "lora_B")].double()
            w = w + scaling * (b @ a)
            n_merged += 1
        assert_close(merged[f"{name}.weight"], w, dtype=torch.float32, msg=f"merged {name}.weight")
    assert n_merged == 14, f"expected 14 LoRA layers in the adapter, merged {n_merged}"
    for key in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.1.input_layernorm.weight"):
        assert torch.equal(merged[key], base.get_parameter(key).detach()), f"{key} changed in the merge"


@pytest.mark.parametrize("onto_original", [False, True])
def test_merge_equals_base_plus_adapter(
    ckpts: dict[str, Path], qlora_adapter: Path, tmp_path: Path, onto_original: bool
) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    args = ["merge", "--model", str(ckpts["plain"]), "--adapter", str(qlora_adapter), "--out", str(out)]
    assert main(args + (["--onto-original"] if onto_original else [])) == 0
    assert (out / "tokenizer.json").is_file(), "tokenizer files were not copied"
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    # The base the adapter merges onto: dequant(NF4) by default (what it was trained against), else the originals.
    _check_merged(out, load_causal_lm(ckpts["plain"], quantize=not onto_original), qlora_adapter)
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    plain = AutoModelForCausalLM.from_pretrained(str(ckpts["plain"])).eval()
    with torch.no_grad():
        a, c = merged(_ids(4)).logits, plain(_ids(4)).logits
    assert torch.isfinite(a).all() and (a - c).abs().max() > 1e-3, "transformers' merged model ignores the adapter"


def test_finetune_and_merge_on_a_prequantized_checkpoint(ckpts: dict[str, Path], tmp_path: Path) -> None:
    nf4 = tmp_path / "nf4"
    assert main(["quantize", "--model", str(ckpts["plain"]), "--out", str(nf4), "--compute-dtype", "float32"]) == 0
    adapter = tmp_path / "adapter"
    args = finetune_args(nf4, write_qa(tmp_path), adapter, "--method", "lora", "--lr", "2e-2", "--max-steps", "4")
    assert main(args) == 0
    assert json.loads((adapter / "metrics.json").read_text())["method"] == "qlora"
    merged_dir = tmp_path / "merged"
    assert main(["merge", "--model", str(nf4), "--adapter", str(adapter), "--out", str(merged_dir)]) == 0
    _check_merged(merged_dir, load_causal_lm(nf4), adapter)
    args = ["merge", "--model", str(nf4), "--adapter", str(adapter), "--out", str(tmp_path / "m2"), "--onto-original"]
    assert main(args) == 2, "--onto-original must be refused when the base holds only 4-bit weights"


def test_streaming_never_holds_two_dense_linear_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gc
    import weakref

    from transformers import LlamaConfig, LlamaForCausalLM

    from fastpeft import loading

    # Shapes no other test uses, so live tensors of these shapes can only come from this load.
    config = LlamaConfig(vocab_size=300, hidden_size=96, intermediate_size=224, num_hidden_layers=3,
                         num_attention_heads=3, num_key_value_heads=1)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(str(tmp_path / "m"))
    shapes = {(96, 96), (32, 96), (224, 96), (96, 224)}
    earlier: list[weakref.ref] = []
    seen: list[int] = []
    real = loading.quantize_nf4

    def counting(w: torch.Tensor, **kw: object) -> object:
        # Every weight quantized before this one must be gone (reference counting frees it at once).
        seen.append(sum(r() is not None for r in earlier))
        earlier.append(weakref.ref(w))
        if len(earlier) == 11:
            # Half way, also scan the heap: no dense linear weight other than this one may exist at all.
            live = [t for t in gc.get_objects() if isinstance(t, torch.Tensor) and not t.is_meta
                    and t.is_floating_point() and tuple(t.shape) in shapes]  # fmt: skip
            assert len(live) == 1, f"{len(live)} dense linear weights alive half way through streaming"
        return real(w, **kw)

    monkeypatch.setattr(loading, "quantize_nf4", counting)
    model = load_causal_lm(tmp_path / "m", quantize=True)
    assert len(seen) == 3 * 7, f"expected 21 quantized weights, quantize_nf4 ran {len(seen)} times"
    assert max(seen) == 0, f"earlier dense weights still alive at each quantization: {seen}"
    assert len(_nf4_layers(model)) == 21
