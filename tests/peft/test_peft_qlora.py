"""QLoRA through the PEFT API: quantize_model, bitsandbytes 4-bit models, training, transformers.Trainer."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from conftest import assert_close
from tiny_models import batch, build, changed_since, max_diff, snapshot, train_steps, twin
from torch import nn

from fastpeft import LoraConfig, PeftModel, get_peft_model, quantize_model
from fastpeft.nn import LoraLinear, NF4Linear


def _dequantized_twin(qmodel: nn.Module) -> nn.Module:
    """The quantized model with every NF4Linear replaced by an nn.Linear holding dequant(W): the oracle."""
    dense = twin(qmodel)
    for name, m in list(dense.named_modules()):
        if isinstance(m, NF4Linear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            lin.weight.data = m.dequantize(torch.float32)
            if m.bias is not None:
                lin.bias.data = m.bias.data.float()
            parent, _, child = name.rpartition(".")
            setattr(dense.get_submodule(parent), child, lin)
    return dense


def test_quantize_model_replaces_and_frees_one_layer_at_a_time():
    model = build("llama")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    refs = {n: weakref.ref(m.weight) for n, m in linears.items() if n != "lm_head"}
    del linears
    out = quantize_model(model, skip=("lm_head",), double_quant=True)
    assert out is model
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, (nn.Linear, NF4Linear))}
    assert kinds.pop("lm_head") == "Linear" and set(kinds.values()) == {"NF4Linear"}, kinds
    gc.collect()
    alive = [n for n, r in refs.items() if r() is not None]
    assert not alive, f"16-bit weights still referenced after quantization: {alive}"
    inputs = batch()
    with torch.no_grad():
        got, want = model(**inputs).logits, _dequantized_twin(model)(**inputs).logits
    assert max_diff(got, want) < 1e-4, f"NF4 model vs dequantized twin: {max_diff(got, want):.3e}"


def test_qlora_trains_only_adapter(tmp_path):
    model = quantize_model(build("qwen2"), double_quant=False)
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    layers = [m for m in pm.modules() if isinstance(m, LoraLinear)]
    assert layers and all(isinstance(m.get_base_layer(), NF4Linear) for m in layers)
    trainable, total = pm.get_nb_trainable_parameters()
    assert 0 < trainable < total
    packed = {n: b.clone() for n, b in pm.named_buffers() if n.endswith(".packed")}
    pm.train()
    inputs = batch(4, 9, seed=4)
    losses = train_steps(pm, inputs, 6, lr=2e-2, optimizer=torch.optim.AdamW)
    assert losses[-1] < losses[0] - 0.05, f"QLoRA loss did not go down: {losses}"
    for n, b in pm.named_buffers():
        if n in packed:
            assert torch.equal(b, packed[n]), f"NF4 codes of {n} changed during training"
    pm.eval()
    with torch.no_grad():
        out = pm(**inputs).logits
    pm.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(quantize_model(build("qwen2"), double_quant=False), tmp_path)
    with torch.no_grad():
        assert max_diff(again(**inputs).logits, out) == 0.0


def _bnb_model():
    bnb = pytest.importorskip("bitsandbytes")
    # Rows of at least one 64-element block: bitsandbytes 0.50's CPU dequantize is wrong for shorter
    # rows (the oracle itself errs there; fastpeft's decode matches the format definition).
    model = build("llama", hidden_size=64)
    dense = twin(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and name != "lm_head":
            l4 = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=m.bias is not None,
                                   compute_dtype=torch.float32, quant_type="nf4")  # fmt: skip
            l4.weight = bnb.nn.Params4bit(m.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                          compress_statistics=True)  # fmt: skip
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, l4.to("cpu"))  # bitsandbytes quantizes on the move
    return model, dense, bnb


def test_bitsandbytes_model_is_reused_byte_for_byte():
    model, _, bnb = _bnb_model()
    inputs = batch()
    with torch.no_grad():
        bnb_out = model(**inputs).logits
    storage = {n: m.weight.data.data_ptr() for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    quantize_model(model)
    for name, ptr in storage.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, NF4Linear), f"{name} is {type(layer).__name__}"
        assert layer.packed.data_ptr() == ptr, f"{name}: the 4-bit bytes were copied or requantized"
    with torch.no_grad():
        ours = model(**inputs).logits
    assert max_diff(ours, bnb_out) < 1e-4, f"NF4Linear model vs bitsandbytes model: {max_diff(ours, bnb_out):.3e}"
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert isinstance(pm.get_base_model().model.layers[0].self_attn.q_proj.base_layer, NF4Linear)


def test_get_peft_model_accepts_linear4bit_directly():
    model, _, _ = _bnb_model()
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    assert isinstance(pm.get_base_model().model.layers[1].self_attn.q_proj.base_layer, NF4Linear)


def test_transformers_trainer_trains_a_peft_model(tmp_path):
    from transformers import Trainer, TrainingArguments

    pm = get_peft_model(build("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    start = snapshot(pm)
    g = torch.Generator().manual_seed(7)
    rows = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
            for ids in torch.randint(3, 96, (16, 10), generator=g)]  # fmt: skip
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4,
                             learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no",
                             logging_steps=1, disable_tqdm=True)  # fmt: skip
    trainer = Trainer(model=pm, args=args, train_dataset=rows)
    result = trainer.train()
    assert result.global_step == 4 and torch.isfinite(torch.tensor(result.training_loss))
    changed = changed_since(pm, start)
    assert changed and all("lora_" in n for n in changed), sorted(changed)[:5]


def test_gpt2_conv1d_layers_are_quantized():
    model = build("gpt2", hidden_size=64)
    quantize_model(model)
    attn = model.transformer.h[0].attn
    assert isinstance(attn.c_attn, NF4Linear) and (attn.c_attn.out_features, attn.c_attn.in_features) == (192, 64)
    inputs = batch()
    with torch.no_grad():
        assert max_diff(model(**inputs).logits, _dequantized_twin(model)(**inputs).logits) < 1e-4
    pm = get_peft_model(model, LoraConfig(r=2, target_modules=["c_attn"]))
    assert isinstance(pm.get_base_model().transformer.h[1].attn.c_attn.base_layer, NF4Linear)


def test_qlora_merge_and_unload_gives_dense_layers():
    model = quantize_model(build("llama"))
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    inputs = batch()
    with torch.no_grad():
        out = pm(**inputs).logits
    merged = pm.merge_and_unload()
    q = merged.model.layers[0].self_attn.q_proj
    assert type(q) is nn.Linear, f"merged NF4 base should be a dense nn.Linear, got {type(q).__name__}"
    assert isinstance(merged.model.layers[0].self_attn.k_proj, NF4Linear)
    with torch.no_grad():
        assert max_diff(merged(**inputs).logits, out) < 1e-4


@pytest.mark.gpu
def test_qlora_trains_on_cuda_in_bf16():
    model = build("llama", hidden_size=64).to("cuda", torch.bfloat16)
    pm = get_peft_model(quantize_model(model), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    pm.train()
    inputs = {k: v.cuda() for k, v in batch(4, 16, seed=2).items()}
    losses = train_steps(pm, inputs, 6, lr=2e-2, optimizer=torch.optim.AdamW)
    assert losses[-1] < losses[0] - 0.05, f"QLoRA on CUDA: loss did not go down: {losses}"


def test_transformers_bitsandbytes_load_is_accepted(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    build("llama", hidden_size=64).save_pretrained(tmp_path)
    bnb_cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32)  # fmt: skip

    def load():
        return AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=bnb_cfg, device_map="cpu").eval()

    inputs = batch()
    fresh = load()
    ptrs = {n: m.weight.data_ptr() for n, m in fresh.named_modules() if type(m).__name__ == "Linear4bit"}
    quantize_model(fresh)
    assert ptrs and all(fresh.get_submodule(n).packed.data_ptr() == p for n, p in ptrs.items()), "bytes not reused"
    used = load()
    with torch.no_grad():
        bnb_out = used(**inputs).logits  # on AVX512-BF16 CPUs this repacks the weights into a CPU layout
    quantize_model(used)
    with torch.no_grad():
        ours_fresh, ours_used = fresh(**inputs).logits, used(**inputs).logits
    # bitsandbytes' repacked CPU path keeps absmax in bf16 and multiplies in bf16: bf16 tolerances.
    assert_close(ours_used, bnb_out, dtype=torch.bfloat16, msg="NF4Linear vs bitsandbytes after its CPU repack")
    assert_close(ours_used, ours_fresh, dtype=torch.bfloat16, msg="repacked vs fresh bitsandbytes layers")
    pm = get_peft_model(used, LoraConfig(r=4, target_modules=["q_proj"]))
    assert pm.get_nb_trainable_parameters()[0] == 2 * 4 * (64 + 64)
