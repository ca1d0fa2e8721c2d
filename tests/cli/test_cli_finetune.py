"""``fastpeft finetune`` end to end on the CPU: the embedded demo, every method, HF PEFT interop, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import assert_close
from safetensors.torch import load_file
from tinymodels import finetune_args, write_checkpoint, write_qa

from fastpeft.app import run_control, train
from fastpeft.app.cli import main

METRIC_FIELDS = ("first_loss", "final_loss", "trainable_params", "peak_memory_bytes", "tokens_per_second", "steps")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {"model": write_checkpoint(root / "model", seed=1), "data": write_qa(root)}


def _args(tiny: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return finetune_args(tiny["model"], tiny["data"], out, "--batch-size", "4", "--lr", "1e-2", *extra)


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def test_embedded_default_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run"
    assert main(["finetune", "--out", str(out), "--max-steps", "20", "--no-progress"]) == 0
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.json", "train_config.json"):
        assert (out / name).is_file(), f"{name} missing from {sorted(p.name for p in out.iterdir())}"
    assert (out / "checkpoint" / "trainer_state.json").is_file()
    m = _metrics(out)
    missing = [k for k in METRIC_FIELDS if k not in m]
    assert not missing, f"metrics.json lacks {missing}"
    assert m["steps"] == 20 and len(m["losses"]) == 20
    assert m["method"] == "lora" and m["trainable_params"] > 0 and m["peak_memory_bytes"] > 0
    assert m["tokens_per_second"] > 0
    # The demo's point: the loss clearly falls (log(260) = 5.56 at random).
    first, last = _mean(m["losses"][:3]), _mean(m["losses"][-5:])
    assert last < 0.75 * first, f"loss did not fall enough: first 3 steps {first:.3f}, last 5 {last:.3f}"
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8
    summary = capsys.readouterr().out
    assert "trainable params" in summary and "tokens/s" in summary and "peak memory" in summary, summary
    estimates = [r.getMessage() for r in caplog.records if "steps take about" in r.getMessage()]
    assert len(estimates) == 1 and "remaining 17 of 20 steps" in estimates[0], estimates

    # The built-in base model is written beside the adapter and named by it: merge and HF PEFT both work.
    import peft
    from transformers import AutoModelForCausalLM

    base_dir = out / train.BASE_MODEL_DIR
    assert cfg["base_model_name_or_path"] == str(base_dir.resolve()), cfg["base_model_name_or_path"]
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(base_dir), "--adapter", str(out), "--out", str(merged)]) == 0
    ids = torch.randint(3, 260, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = peft.AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(str(base_dir)).eval()(input_ids=ids).logits
        folded = AutoModelForCausalLM.from_pretrained(str(merged)).eval()(input_ids=ids).logits
    assert (theirs - plain).abs().max() > 1e-3, "the adapter changes nothing: the comparison would prove nothing"
    assert_close(folded, theirs, msg="merged demo model vs HF PEFT's adapter on the written base")


@pytest.mark.parametrize("command", ["finetune", "quantize", "merge"])
def test_help_shows_every_default(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from fastpeft.app.cli import _parser

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    options = [a for a in sub._actions if a.option_strings and not a.required and a.nargs != 0]
    assert options, f"{command} has no optional value to check"
    for action in options:  # flags (nargs 0) are off unless given; required options have nothing to default
        formatter = sub._get_formatter()
        formatter.add_argument(action)
        entry = " ".join(formatter.format_help().split())
        assert entry in text, f"{command} --help lacks {entry!r}"
        said = f"default: {action.default}" if action.default is not None else "default"
        assert said in entry, f"{command} {action.option_strings[-1]} does not say {said!r}: {entry!r}"
    if command == "quantize":
        assert "float32 on the CPU" in text, "--compute-dtype must say what CPU training computes in"


@pytest.mark.parametrize(
    ("method", "peft_type"),
    [("lora", "LORA"), ("qlora", "LORA"), ("adapter", "BOTTLENECK_ADAPTER"), ("prefix", "PREFIX_TUNING"),
     ("prompt", "PROMPT_TUNING")],
)  # fmt: skip
def test_each_method_trains_and_reloads(tiny: dict[str, Path], tmp_path: Path, method: str, peft_type: str) -> None:
    from fastpeft.loading import load_causal_lm
    from fastpeft.nn import NF4Linear
    from fastpeft.peft import PeftModel

    out = tmp_path / method
    assert main(_args(tiny, out, "--method", method, "--max-steps", "12")) == 0
    m = _metrics(out)
    assert m["method"] == method and all(math.isfinite(x) for x in m["losses"]), m["losses"]
    assert _mean(m["losses"][-3:]) < _mean(m["losses"][:3]), f"{method}: loss did not fall: {m['losses']}"
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == peft_type
    # The trained adapter reloads onto a fresh base and reproduces the checkpoint's trained tensors.
    base = load_causal_lm(tiny["model"], quantize=method == "qlora")
    assert any(isinstance(mod, NF4Linear) for mod in base.modules()) == (method == "qlora")
    loaded = PeftModel.from_pretrained(base, str(out))
    saved = load_file(str(out / "checkpoint" / "adapter_state.safetensors"))
    params = dict(loaded.named_parameters())
    for name, t in saved.items():
        assert torch.equal(params[name].detach(), t), f"{method}: {name} differs after reload"


def test_prompt_completion_loss_covers_only_completion(tiny: dict[str, Path]) -> None:
    from fastpeft.app.data import IGNORE_INDEX, byte_tokenizer, encode_records

    tok = byte_tokenizer()
    (ex,) = encode_records([{"prompt": "say cat: ", "completion": "cat."}], tok, 64)
    n_prompt = 1 + len("say cat: ")  # bos + one byte a character
    assert all(lab == IGNORE_INDEX for lab in ex.labels[:n_prompt]), ex.labels
    assert list(ex.labels[n_prompt:]) == list(ex.input_ids[n_prompt:]), ex.labels
    assert ex.input_ids[-1] == tok.eos_token_id


@pytest.mark.parametrize("method", ["lora", "prompt", "prefix"])
def test_hf_peft_loads_the_adapter(tiny: dict[str, Path], tmp_path: Path, method: str) -> None:
    import peft
    from transformers import AutoModelForCausalLM

    from fastpeft.loading import load_causal_lm
    from fastpeft.peft import PeftModel

    out = tmp_path / method
    extra = ("--target-modules", "q_proj,v_proj,down_proj") if method == "lora" else ()
    assert main(_args(tiny, out, "--method", method, "--max-steps", "6", *extra)) == 0
    ids = torch.randint(3, 260, (2, 11), generator=torch.Generator().manual_seed(5))
    ours = PeftModel.from_pretrained(load_causal_lm(tiny["model"]), str(out)).eval()
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny["model"])), str(out)).eval()
    base = AutoModelForCausalLM.from_pretrained(str(tiny["model"])).eval()
    with torch.no_grad():
        a, b, c = ours(input_ids=ids).logits, theirs(input_ids=ids).logits, base(input_ids=ids).logits
    # Prompt tuning's logits include the virtual tokens (as in HF PEFT): compare the real positions.
    assert (a[:, -ids.shape[1] :] - c).abs().max() > 1e-3, "the adapter changes nothing: the test would prove nothing"
    assert a.shape == b.shape, f"{method}: logits of shape {tuple(a.shape)} vs HF PEFT's {tuple(b.shape)}"
    assert_close(a, b, msg=f"{method}: fastpeft vs HF PEFT logits")


def test_resume_continues_with_the_same_losses(tiny: dict[str, Path], tmp_path: Path) -> None:
    common = ("--method", "lora", "--max-steps", "6", "--save-steps", "2", "--dropout", "0.2", "--batch-size", "3",
              "--grad-accum", "2", "--seed", "3")  # fmt: skip
    full = tmp_path / "full"
    assert main(_args(tiny, full, *common)) == 0
    expected = _metrics(full)["losses"]

    class Crash(Exception):
        pass

    def crash_at_5(step: int, loss: float) -> None:
        if step == 5:
            raise Crash

    part = tmp_path / "part"
    cfg = train.TrainConfig(out=str(part), model=str(tiny["model"]), data=str(tiny["data"]), method="lora",
                            max_steps=6, save_steps=2, dropout=0.2, batch_size=3, grad_accum=2, seed=3, lr=1e-2,
                            progress=False)  # fmt: skip
    with pytest.raises(Crash):
        train.finetune(cfg, callback=crash_at_5)
    assert json.loads((part / "checkpoint" / "trainer_state.json").read_text())["step"] == 4
    assert not (part / "metrics.json").exists()
    assert main(_args(tiny, part, *common, "--resume")) == 0
    got = _metrics(part)["losses"]
    assert got == expected, f"resumed losses {got} != uninterrupted {expected}"
    a = load_file(str(full / "adapter_model.safetensors"))
    b = load_file(str(part / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "final adapters differ"


def test_gradient_checkpointing_gives_the_same_training(tiny: dict[str, Path], tmp_path: Path) -> None:
    runs = []
    for flag in ((), ("--gradient-checkpointing",)):
        out = tmp_path / f"gc{len(flag)}"
        assert main(_args(tiny, out, "--method", "qlora", "--max-steps", "4", "--dropout", "0.1", *flag)) == 0
        runs.append(_metrics(out)["losses"])
    assert_close(torch.tensor(runs[1]), torch.tensor(runs[0]), msg="losses with vs without gradient checkpointing")


@pytest.mark.gpu
def test_qlora_on_gpu_is_the_default_and_trains(tiny: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    assert main(_args(tiny, out, "--max-steps", "12", "--gradient-checkpointing")) == 0
    m = _metrics(out)
    assert m["method"] == "qlora" and m["device"].startswith("cuda") and m["peak_memory_kind"] == "cuda_max_allocated"
    assert _mean(m["losses"][-3:]) < _mean(m["losses"][:3]), f"loss did not fall on the GPU: {m['losses']}"


@pytest.mark.slow
def test_qlora_through_the_triton_kernels_matches_the_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On the CPU this runs the Triton kernels in the interpreter (tests/conftest.py sets TRITON_INTERPRET).
    argv = [
        "finetune",
        "--method",
        "qlora",
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--no-progress",
    ]
    losses = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("FASTPEFT_BACKEND", backend)
        out = tmp_path / backend
        assert main([*argv, "--out", str(out)]) == 0
        losses[backend] = _metrics(out)["losses"]
    assert_close(torch.tensor(losses["triton"]), torch.tensor(losses["reference"]), msg="Triton vs reference losses")


def test_epochs_set_the_number_of_steps(tiny: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "epochs"
    # 12 records in batches of 5 -> 3 batches an epoch; 2 micro-batches a step -> ceil(2.5 * 3 / 2) = 4 steps.
    # (Padded batches of examples; packed, an epoch is as many batches as its rows fill.)
    args = _args(tiny, out, "--epochs", "2.5", "--batch-size", "5", "--grad-accum", "2", "--packing", "off")
    assert main(args) == 0
    m = _metrics(out)
    assert m["steps"] == 4, f"expected 4 steps, ran {m['steps']}"
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    # 8 micro-batches: epochs 0 and 1 (3 each) and 2 of epoch 2 -> the stream continues at epoch 2, batch 2.
    assert (state["epoch"], state["index"]) == (2, 2), (state["epoch"], state["index"])


def test_training_on_a_busy_cpu_uses_the_idle_cores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert [run_control.idle_cpu_threads(load, 2) for load in (0.0, 1.0, 2.0, 9.5)] == [2, 2, 1, 1]
    assert run_control.idle_cpu_threads(3.0, 16) == 14
    monkeypatch.setattr(run_control.os, "getloadavg", lambda: (50.0, 50.0, 50.0))  # a very busy machine
    before, seen = torch.get_num_threads(), []
    cfg = train.TrainConfig(out=str(tmp_path / "busy"), max_steps=2, progress=False, device="cpu")
    train.finetune(cfg, callback=lambda step, loss: seen.append(torch.get_num_threads()))
    assert seen == [1, 1], f"threads during training: {seen}"
    assert torch.get_num_threads() == before, "the caller's thread count must come back"
