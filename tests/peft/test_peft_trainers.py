"""transformers.Trainer and TRL's trainers train fastpeft models as they train HF PEFT ones: adapter-only
checkpoints (tied and NF4 models included), exact resume, save_model directories HF PEFT loads, TRL's SFT and
DPO with a model handed over wrapped or a fastpeft config as ``peft_config``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from fastpeft import LoraConfig, PeftModel, PrefixTuningConfig, get_peft_model, quantize_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))
from tinymodels import write_checkpoint  # noqa: E402

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def tied_base(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("base") / "tied", tie=True)


def _base(directory: Path, qlora: bool = False) -> torch.nn.Module:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    return quantize_model(model) if qlora else model


def _rows(n: int = 16, t: int = 10) -> list[dict]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(4, 200, (n, t), generator=g)
    return [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids]


def _args(out: Path, steps: int = 4, **kw):
    return transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=4, max_steps=steps, learning_rate=1e-2, use_cpu=True,
        report_to=[], save_strategy="steps", save_steps=2, logging_steps=1, disable_tqdm=True, seed=3, **kw,
    )  # fmt: skip


def _adapter(pm: PeftModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in pm.state_dict().items() if "lora_" in k}


@pytest.mark.parametrize("qlora", [False, True], ids=["lora", "qlora"])
def test_trainer_checkpoints_hold_the_adapter_only_and_load_back(tmp_path, tied_base, qlora):
    pm = get_peft_model(_base(tied_base, qlora), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    assert isinstance(pm, peft.PeftModel) and isinstance(pm, PeftModel)
    trainer = transformers.Trainer(model=pm, args=_args(tmp_path / "run"), train_dataset=_rows())
    trainer.train()
    for step in (2, 4):
        files = set(os.listdir(tmp_path / "run" / f"checkpoint-{step}"))
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files, files
        assert not {f for f in files if f.startswith("model") and f.endswith(".safetensors")}, files
    size = (tmp_path / "run" / "checkpoint-4" / "adapter_model.safetensors").stat().st_size
    assert size < 64 * 1024, size  # the adapter, not the base
    ids = torch.randint(4, 200, (2, 9), generator=torch.Generator().manual_seed(1))
    pm.eval()
    with torch.no_grad():
        want = pm(input_ids=ids).logits
        ckpt = str(tmp_path / "run" / "checkpoint-4")
        again = PeftModel.from_pretrained(_base(tied_base, qlora), ckpt).eval()
        assert torch.equal(again(input_ids=ids).logits, want)
        if not qlora:
            theirs = peft.PeftModel.from_pretrained(_base(tied_base), ckpt).eval()
            torch.testing.assert_close(theirs(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_trainer_resume_from_checkpoint_continues_exactly(tmp_path, tied_base):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    torch.manual_seed(0)
    whole = get_peft_model(_base(tied_base), config)
    transformers.Trainer(model=whole, args=_args(tmp_path / "a"), train_dataset=_rows()).train()
    torch.manual_seed(1)  # another start: only the checkpoint may carry the state over
    resumed = get_peft_model(_base(tied_base), config)
    trainer = transformers.Trainer(model=resumed, args=_args(tmp_path / "b"), train_dataset=_rows())
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    want, got = _adapter(whole), _adapter(resumed)
    assert want.keys() == got.keys() and want
    worst = max((want[k] - got[k]).abs().max().item() for k in want)
    assert worst == 0.0, f"resumed adapter differs from the uninterrupted run by {worst:.3g}"


def test_trainer_save_model_writes_an_adapter_directory_hf_peft_loads(tmp_path, tied_base):
    pm = get_peft_model(_base(tied_base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    trainer = transformers.Trainer(model=pm, args=_args(tmp_path / "run", steps=2), train_dataset=_rows())
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    loaded = peft.PeftModel.from_pretrained(_base(tied_base), str(tmp_path / "final"))
    ours = {k.replace(".default", ""): v for k, v in _adapter(pm).items()}
    theirs = {k.replace(".default", ""): v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k].to(ours[k].dtype)) for k in ours)


def test_trainer_trains_and_checkpoints_a_prefix_tuning_model(tmp_path, tied_base):
    pm = get_peft_model(_base(tied_base), PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    start = {k: v.detach().clone() for k, v in pm.named_parameters() if v.requires_grad}
    transformers.Trainer(model=pm, args=_args(tmp_path / "run"), train_dataset=_rows()).train()
    assert any(not torch.equal(start[k], v) for k, v in pm.named_parameters() if k in start)
    files = set(os.listdir(tmp_path / "run" / "checkpoint-4"))
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files, files


# -- TRL -------------------------------------------------------------------------------------------


def _tokenizer():
    from fastpeft.app.data import byte_tokenizer

    tok = byte_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    return tok


def _sft_args(out: Path, **kw):
    trl = pytest.importorskip("trl")
    return trl.SFTConfig(
        output_dir=str(out), per_device_train_batch_size=2, max_steps=3, learning_rate=1e-2, use_cpu=True,
        report_to=[], save_strategy="steps", save_steps=2, logging_steps=1, disable_tqdm=True, max_length=32, **kw,
    )  # fmt: skip


def _texts(n: int = 12):
    datasets = pytest.importorskip("datasets")
    return datasets.Dataset.from_list([{"text": "hello world " * (i % 4 + 1)} for i in range(n)])


@pytest.mark.parametrize("qlora", [False, True], ids=["lora", "qlora"])
def test_trl_sft_trainer_trains_a_wrapped_model_with_packing(tmp_path, tied_base, qlora):
    trl = pytest.importorskip("trl")
    pm = get_peft_model(_base(tied_base, qlora), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    start = _adapter(pm)
    trainer = trl.SFTTrainer(model=pm, args=_sft_args(tmp_path / "run", packing=True), train_dataset=_texts(),
                             processing_class=_tokenizer())  # fmt: skip
    trainer.train()
    assert any(not torch.equal(start[k], v) for k, v in _adapter(pm).items())
    trainer.save_model(str(tmp_path / "final"))
    assert "model.safetensors" not in os.listdir(tmp_path / "final")
    if not qlora:
        loaded = peft.PeftModel.from_pretrained(_base(tied_base), str(tmp_path / "final"))
        assert loaded.active_adapter == "default"


def test_trl_sft_trainer_trains_chat_messages(tmp_path, tied_base):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    rows = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}]}
            for i in range(8)]  # fmt: skip
    pm = get_peft_model(_base(tied_base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    start = _adapter(pm)
    trl.SFTTrainer(model=pm, args=_sft_args(tmp_path / "run"), train_dataset=datasets.Dataset.from_list(rows),
                   processing_class=_tokenizer()).train()  # fmt: skip
    assert any(not torch.equal(start[k], v) for k, v in _adapter(pm).items())


def test_sft_trainer_takes_a_fastpeft_config_as_peft_config(tmp_path, tied_base):
    trl = pytest.importorskip("trl")
    from fastpeft.peft.trainers import SFTTrainer

    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
    with pytest.raises(TypeError, match="peft_config"):  # TRL's own class wants an HF PEFT config
        trl.SFTTrainer(model=_base(tied_base), args=_sft_args(tmp_path / "x"), train_dataset=_texts(),
                       processing_class=_tokenizer(), peft_config=config)  # fmt: skip
    trainer = SFTTrainer(model=_base(tied_base), args=_sft_args(tmp_path / "run"), train_dataset=_texts(),
                         processing_class=_tokenizer(), peft_config=config)  # fmt: skip
    assert isinstance(trainer.model, PeftModel) and isinstance(trainer, trl.SFTTrainer)
    trainer.train()
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "run" / "checkpoint-2"))


def _preferences(n: int = 8):
    datasets = pytest.importorskip("datasets")
    return datasets.Dataset.from_list(
        [{"prompt": f"Q{i}:", "chosen": " yes" * (i % 3 + 1), "rejected": " no"} for i in range(n)]
    )


def _dpo_args(out: Path):
    trl = pytest.importorskip("trl")
    return trl.DPOConfig(
        output_dir=str(out), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-2, use_cpu=True,
        report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True,
    )  # fmt: skip


def test_trl_dpo_reference_is_never_a_copy_of_the_model(tmp_path, tied_base):
    trl = pytest.importorskip("trl")
    from fastpeft.peft.trainers import DPOTrainer

    # handed over wrapped: TRL freezes a copy of the adapter as the reference, as it does for HF PEFT
    pm = get_peft_model(_base(tied_base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    trainer = trl.DPOTrainer(model=pm, args=_dpo_args(tmp_path / "a"), train_dataset=_preferences(),
                             processing_class=_tokenizer())  # fmt: skip
    assert trainer.ref_model is None and "ref" in pm.peft_config
    ref = {k: v.detach().clone() for k, v in pm.state_dict().items() if ".ref." in k}
    start = {k: v.detach().clone() for k, v in pm.state_dict().items() if ".default." in k and "lora_" in k}
    trainer.train()
    assert all(torch.equal(v, pm.state_dict()[k]) for k, v in ref.items())
    assert any(not torch.equal(v, pm.state_dict()[k]) for k, v in start.items())
    # with a fastpeft config: the adapter-disabled model is the reference, as with HF PEFT's peft_config=
    config = LoraConfig(r=4, target_modules=TARGETS)
    trainer = DPOTrainer(model=_base(tied_base), args=_dpo_args(tmp_path / "b"), train_dataset=_preferences(),
                         processing_class=_tokenizer(), peft_config=config)  # fmt: skip
    assert trainer.ref_model is None and list(trainer.model.peft_config) == ["default"]
    trainer.train()


def test_peft_model_members_fastpeft_does_not_have_raise_by_name(tied_base):
    pm = get_peft_model(_base(tied_base), LoraConfig(r=4, target_modules=TARGETS))
    assert pm.has_active_enabled_adapter and pm.peft_config["default"].r == 4
    with pm.disable_adapter():
        assert not pm.has_active_enabled_adapter
    with pytest.raises(NotImplementedError, match="get_layer_status"):
        pm.get_layer_status()
