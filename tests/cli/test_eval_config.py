"""``fastpeft finetune`` evaluation (--eval-data / --eval-split / --eval-steps / --save-best), config files
(--config, OUT/run_config.yaml) and curves (loss.png, --report-to tensorboard), end to end on the CPU."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import assert_close
from safetensors.torch import load_file
from tinymodels import finetune_args, write_checkpoint, write_jsonl, write_qa

from fastpeft.app import data as fdata
from fastpeft.app import evaluate, packing, train
from fastpeft.app.cli import _parser, main
from fastpeft.app.run_config import NOT_RECORDED, RUN_CONFIG

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
# A learning rate high enough that the eval loss turns up before the end: the best step is not the last.
BEST_RUN = ("--lr", "0.05", "--warmup-steps", "0", "--max-steps", "6", "--batch-size", "4", "--eval-split", "0.25",
            "--eval-steps", "1", "--save-best", "--save-steps", "2", "--dropout", "0.1", "--seed", "2")  # fmt: skip


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _same_tensors(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evalcfg")
    return {"model": write_checkpoint(root / "model", seed=1), "data": write_qa(root), "root": root}


@pytest.fixture(scope="module")
def best_run(tiny: dict[str, Path]) -> Path:
    """One run with an eval split evaluated every step, --save-best, dropout, TensorBoard where installed."""
    out = tiny["root"] / "best"
    extra = ("--report-to", "tensorboard") if HAS_TENSORBOARD else ()
    assert main(finetune_args(tiny["model"], tiny["data"], out, *BEST_RUN, *extra)) == 0
    return out


def _eval_examples(tiny: dict[str, Path], seed: int = 2) -> list[fdata.Example]:
    examples = fdata.encode_records(fdata.read_jsonl(tiny["data"]), fdata.byte_tokenizer(), 512)
    return evaluate.held_out(examples, None, 0.25, seed, None, 512)[1]


def _loss_by_hand(tiny: dict[str, Path], adapter: Path, examples: list[fdata.Example]) -> float:
    """The mean next-token loss over every label token, one example at a time (no padding, no packing)."""
    from fastpeft.loading import load_causal_lm
    from fastpeft.peft import PeftModel

    model = PeftModel.from_pretrained(load_causal_lm(tiny["model"]), str(adapter)).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            ids, labels = torch.tensor([ex.input_ids]), torch.tensor([ex.labels])
            logits = model(input_ids=ids, use_cache=False).logits.double()
            target = labels[0, 1:]
            lp = torch.log_softmax(logits[0, :-1], dim=-1)
            keep = target != fdata.IGNORE_INDEX
            total += float(-lp[keep].gather(1, target[keep, None]).sum())
            count += int(keep.sum())
    return total / count


def test_eval_loss_is_the_token_mean_over_the_eval_set(tiny: dict[str, Path], best_run: Path) -> None:
    m = _metrics(best_run)
    hist = m["eval_history"]
    assert [r["step"] for r in hist] == list(range(1, 7)), hist
    assert m["eval_loss"] == hist[-1]["eval_loss"] and m["eval_examples"] == 3, m
    examples = _eval_examples(tiny)
    # OUT holds the best step's adapter, OUT/last the last step's: each gives its step's eval loss by hand.
    for adapter, expected in ((best_run, m["best_eval_loss"]), (best_run / "last", m["eval_loss"])):
        got = _loss_by_hand(tiny, adapter, examples)
        assert_close(torch.tensor(expected), torch.tensor(got), msg=f"eval loss of {adapter} by hand")


def test_packed_and_padded_eval_give_the_same_loss(tiny: dict[str, Path], best_run: Path) -> None:
    from fastpeft.loading import load_causal_lm
    from fastpeft.peft import PeftModel

    model = PeftModel.from_pretrained(load_causal_lm(tiny["model"]), str(best_run))
    model.config.use_cache = False
    examples = fdata.encode_records(fdata.read_jsonl(tiny["data"]), fdata.byte_tokenizer(), 64)
    padded = fdata.Batches(examples, 3, 0, 0)
    packed = evaluate.eval_batches(packing.PackedBatches(examples[:1], 3, 0, 0, 64), examples)
    assert isinstance(packed, packing.PackedBatches) and packed.batches_per_epoch < padded.batches_per_epoch
    cpu = torch.device("cpu")
    model.train()
    losses = [evaluate.eval_loss(model, b, cpu, chunked) for b in (padded, packed) for chunked in (True, False)]
    assert model.training, "evaluation must give the model back in train mode"
    for got in losses[1:]:
        assert_close(torch.tensor(got), torch.tensor(losses[0]), msg=f"eval losses {losses}")


def test_save_best_keeps_the_best_steps_adapter(best_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = _metrics(best_run)
    losses = [r["eval_loss"] for r in m["eval_history"]]
    best = min(range(len(losses)), key=losses.__getitem__) + 1
    assert m["best_step"] == best == m["adapter_step"] and m["best_eval_loss"] == losses[best - 1]
    assert best != m["steps"], f"the eval loss never went up ({losses}): the test would prove nothing"
    ckpt = best_run / "checkpoint"
    last_file = best_run / "last" / "adapter_model.safetensors"
    assert not _same_tensors(best_run / "adapter_model.safetensors", last_file), "OUT and OUT/last hold one adapter"
    # OUT/last is the final step's adapter; OUT the one kept at the best step (written into the checkpoint then).
    final = load_file(str(ckpt / "adapter_state.safetensors"))
    last = load_file(str(last_file))
    kept = load_file(str(ckpt / "best_adapter.safetensors"))
    out = load_file(str(best_run / "adapter_model.safetensors"))
    for name, t in final.items():
        key = name.replace(".default.weight", ".weight")  # the adapter file leaves out the adapter's name
        assert key in last, f"{key} not in the saved adapter ({sorted(last)[:3]} ...)"
        assert torch.equal(last[key], t) and torch.equal(out[key], kept[name]), name
    assert (best_run / "last" / "adapter_config.json").is_file()


def test_resume_keeps_the_eval_history_and_the_best(tiny: dict[str, Path], best_run: Path) -> None:
    class Crash(Exception):
        pass

    def crash_at_5(step: int, loss: float) -> None:
        if step == 5:
            raise Crash

    part = tiny["root"] / "part"
    cfg = train.TrainConfig(out=str(part), model=str(tiny["model"]), data=str(tiny["data"]), lr=0.05, warmup_steps=0,
                            max_steps=6, batch_size=4, eval_split=0.25, eval_steps=1, save_best=True, save_steps=2,
                            dropout=0.1, seed=2, progress=False)  # fmt: skip
    with pytest.raises(Crash):
        train.finetune(cfg, callback=crash_at_5)
    state = json.loads((part / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 4 and [r["step"] for r in state["evals"]] == [1, 2, 3, 4], state["evals"]
    assert main(finetune_args(tiny["model"], tiny["data"], part, *BEST_RUN, "--resume")) == 0
    full, got = _metrics(best_run), _metrics(part)
    assert got["eval_history"] == full["eval_history"], (got["eval_history"], full["eval_history"])
    assert got["best_step"] == full["best_step"] and got["losses"] == full["losses"]
    for name in ("adapter_model.safetensors", "last/adapter_model.safetensors"):
        assert _same_tensors(part / name, best_run / name), f"{name} differs after --resume"


def test_eval_split_is_disjoint_and_deterministic() -> None:
    examples = [fdata.Example((1, i, i + 1), (1, i, i + 1)) for i in range(3, 40)]
    train_a, eval_a = evaluate.held_out(examples, None, 0.2, 7, None, 8)
    train_b, eval_b = evaluate.held_out(examples, None, 0.2, 7, None, 8)
    _, eval_c = evaluate.held_out(examples, None, 0.2, 8, None, 8)
    assert (train_a, eval_a) == (train_b, eval_b), "the same seed must give the same split"
    assert eval_c != eval_a, "another seed should draw another split"
    assert len(eval_a) == round(0.2 * len(examples)) and not set(train_a) & set(eval_a)
    assert sorted(train_a + eval_a, key=examples.index) == examples
    assert train_a == [ex for ex in examples if ex in train_a], "the training part keeps the data's order"
    for fraction in (0.01, 0.99):
        with pytest.raises(ValueError, match="both need at least one"):
            evaluate.held_out(examples, None, fraction, 0, None, 8)


@pytest.mark.parametrize(
    ("extra", "message"),
    [(("--eval-split", "1.5"), "--eval-split must be a fraction between 0 and 1"),
     (("--eval-split", "0"), "--eval-split must be a fraction between 0 and 1"),
     (("--eval-split", "0.2", "--eval-data", "DATA"), "--eval-data and --eval-split both given"),
     (("--save-best",), "--save-best needs an eval set"),
     (("--eval-steps", "2"), "--eval-steps needs an eval set"),
     (("--eval-split", "0.2", "--eval-steps", "0"), "--eval-steps must be at least 1")],
)  # fmt: skip
def test_eval_flags_are_checked_before_any_work(tiny, tmp_path, capsys, extra, message) -> None:
    out = tmp_path / "out"
    extra = tuple(str(tiny["data"]) if a == "DATA" else a for a in extra)
    assert main(finetune_args(tiny["model"], tiny["data"], out, *extra)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_eval_data_file_and_tensorboard_missing(tiny, tmp_path, capsys, monkeypatch) -> None:
    evalfile = write_jsonl(tmp_path / "eval.jsonl", [{"text": "say owl: owl owl."}, {"text": "say elk: elk elk."}])
    out = tmp_path / "out"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    argv = finetune_args(tiny["model"], tiny["data"], out, "--eval-data", str(evalfile), "--max-steps", "2")
    assert main([*argv, "--report-to", "tensorboard"]) == 2
    err = capsys.readouterr().err
    assert "needs the tensorboard package (pip install tensorboard)" in err and not out.exists(), err
    monkeypatch.undo()
    assert main([*argv, "--out", str(tmp_path / "inside")]) == 0  # the eval file next to the data is fine
    m = _metrics(tmp_path / "inside")
    assert m["eval_examples"] == 2 and [r["step"] for r in m["eval_history"]] == [2], m["eval_history"]
    assert "eval loss" in capsys.readouterr().out
    assert main(finetune_args(tiny["model"], tiny["data"], evalfile.parent, "--eval-data", str(evalfile))) == 2
    assert "contains the --eval-data input" in capsys.readouterr().err


def test_config_file_flags_apply_and_the_command_line_wins(tiny, tmp_path, capsys) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text(f'model = "{tiny["model"]}"\ndata = "{tiny["data"]}"\nmax-steps = 3\nlr = 0.02\nseed = 4\n'
                    'target_modules = ["q_proj", "v_proj"]\nno-progress = true\neval_split = 0.25\n')  # fmt: skip
    out = tmp_path / "out"
    assert main(["finetune", "--config", str(toml), "--out", str(out), "--max-steps", "2"]) == 0
    m = _metrics(out)
    assert m["steps"] == 2 and m["eval_examples"] == 3, m  # --max-steps on the command line wins over the file
    import yaml

    written = yaml.safe_load((out / RUN_CONFIG).read_text())
    assert (written["max_steps"], written["lr"], written["seed"]) == (2, 0.02, 4), written
    assert written["target_modules"] == "q_proj,v_proj" and written["eval_split"] == 0.25
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"], cfg["target_modules"]

    bad = tmp_path / "bad.yaml"
    for text, message in (("lr: 0.1\nlearning_rate: 0.1\n", "unknown key 'learning_rate'"),
                          ("r: eight\n", "r: invalid int value 'eight'"),
                          ("packing: sometimes\n", "'sometimes' is not one of auto, on, off"),
                          ("save-best: 1\n", "save-best must be true or false"),
                          ("- lr\n", "expected a mapping")):  # fmt: skip
        bad.write_text(text)
        assert main(["finetune", "--config", str(bad), "--out", str(tmp_path / "never")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(bad) in err and message in err, (text, err)
    assert not (tmp_path / "never").exists()


def test_run_config_repeats_the_run(tiny: dict[str, Path], best_run: Path, tmp_path: Path) -> None:
    import yaml

    written = yaml.safe_load((best_run / RUN_CONFIG).read_text())
    sub = _parser()._subparsers._group_actions[0].choices["finetune"]
    dests = {a.dest for a in sub._actions if a.option_strings and a.dest != "help"} - set(NOT_RECORDED)
    assert set(written) == dests, f"run_config.yaml lacks {dests - set(written)}, has extra {set(written) - dests}"
    assert (written["method"], written["device"], written["lr"]) == ("lora", "cpu", 0.05), written
    assert written["model"] == str(tiny["model"].resolve()) and written["save_best"] is True
    again = tmp_path / "again"
    assert main(["finetune", "--config", str(best_run / RUN_CONFIG), "--out", str(again)]) == 0
    a, b = _metrics(best_run), _metrics(again)
    assert a["losses"] == b["losses"] and a["eval_history"] == b["eval_history"], "the repeated run differs"
    assert _same_tensors(best_run / "adapter_model.safetensors", again / "adapter_model.safetensors")


def test_loss_png_is_written(best_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    png = (best_run / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    from fastpeft.app import curves

    monkeypatch.setitem(__import__("sys").modules, "matplotlib.figure", None)  # as if matplotlib were missing
    assert curves.plot_losses(tmp_path / "x.png", [1.0, 0.5], []) is False and not (tmp_path / "x.png").exists()


def test_tensorboard_events_hold_the_losses(best_run: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(best_run / "tensorboard"))
    events.Reload()
    m = _metrics(best_run)
    train_loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    eval_loss = [(e.step, e.value) for e in events.Scalars("eval/loss")]
    assert [s for s, _ in train_loss] == list(range(1, m["steps"] + 1))
    assert_close(torch.tensor([v for _, v in train_loss]), torch.tensor(m["losses"]), msg="train/loss events")
    assert_close(torch.tensor([v for _, v in eval_loss]), torch.tensor([r["eval_loss"] for r in m["eval_history"]]),
                 msg="eval/loss events")  # fmt: skip
    assert len(events.Scalars("train/lr")) == m["steps"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_eval_loss_under_torchrun_is_the_global_mean(tiny: dict[str, Path], tmp_path: Path, strategy: str) -> None:
    import os
    import subprocess
    import sys

    common = ("--max-steps", "4", "--eval-split", "0.25", "--eval-steps", "1", "--save-best", "--lr", "0.05",
              "--warmup-steps", "0")  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(finetune_args(tiny["model"], tiny["data"], one, *common, "--batch-size", "4", "--packing", "off")) == 0
    argv = finetune_args(tiny["model"], tiny["data"], two, *common, "--batch-size", "2", "--distributed", strategy)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "fastpeft", *argv], env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = _metrics(one), _metrics(two)
    assert [r["step"] for r in b["eval_history"]] == [1, 2, 3, 4] and b["best_step"] == a["best_step"]
    got, want = ([r["eval_loss"] for r in m["eval_history"]] for m in (b, a))
    assert_close(torch.tensor(got), torch.tensor(want), msg=f"{strategy} eval losses vs one process")
    x, y = load_file(str(one / "adapter_model.safetensors")), load_file(str(two / "adapter_model.safetensors"))
    # Adam divides by the gradients' magnitude: a rounding-level gradient difference may move an element by a
    # small fraction of a step (lr); a wrong adapter would differ by whole steps.
    worst = max(float((y[k] - x[k]).abs().max()) for k in x)
    assert x.keys() == y.keys() and worst <= 1e-2 * 0.05, f"{strategy}: best adapters differ by up to {worst:.2e}"


def test_yaml_values_go_through_the_flags_types(tmp_path: Path) -> None:
    from fastpeft.app.run_config import config_defaults

    sub = _parser()._subparsers._group_actions[0].choices["finetune"]
    path = tmp_path / "run.yml"
    # PyYAML reads 1e-4 (no dot) as a string: the flag's own type makes it a float
    path.write_text("lr: 1e-4\ngrad-accum: 2\ngradient_checkpointing: false\ntarget_modules: [q_proj, v_proj]\n"
                    "eval_steps: null\nmethod: lora\n")  # fmt: skip
    got = config_defaults(path, sub)
    assert got == {"lr": 1e-4, "grad_accum": 2, "gradient_checkpointing": False, "target_modules": "q_proj,v_proj",
                   "eval_steps": None, "method": "lora"}, got  # fmt: skip
    refusals = (("r: null\n", "r cannot be null"), ("grad_accum: 2\ngrad-accum: 3\n", "given twice"),
                ("config: other.yaml\n", "cannot name another"), ("r: 2.5\n", "invalid int value 2.5"))  # fmt: skip
    for text, message in refusals:
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            config_defaults(path, sub)


def test_overwrite_removes_the_optional_outputs(tmp_path: Path) -> None:
    from fastpeft.app.run_dir import OPTIONAL_OUTPUTS, prepare_out

    out = tmp_path / "out"
    for name in OPTIONAL_OUTPUTS:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        if "." in name:
            (out / name).write_text("old")
        else:
            (out / name).mkdir()
            (out / name / "f").write_text("old")
    prepare_out(out, resume=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [], "a previous run's results stayed beside the new ones"


def test_a_checkpoints_eval_history_is_checked(best_run: Path, tmp_path: Path) -> None:
    import shutil

    from fastpeft.app.checkpoint import load_checkpoint

    ckpt = tmp_path / "checkpoint"
    shutil.copytree(best_run / "checkpoint", ckpt)
    path = ckpt / "trainer_state.json"
    state = json.loads(path.read_text())
    assert load_checkpoint(ckpt).best is not None
    for evals in ([{"step": 9, "eval_loss": 1.0}], [{"step": 2, "eval_loss": 1.0}, {"step": 1, "eval_loss": 1.0}],
                  [{"step": 1, "eval_loss": "nan"}], "none"):  # fmt: skip
        path.write_text(json.dumps({**state, "evals": evals}))
        with pytest.raises(ValueError, match=f"{path}: 'evals' must"):
            load_checkpoint(ckpt)
