"""Ctrl-C and SIGTERM during ``fastpeft finetune``: a checkpoint at the next step boundary, then ``--resume``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tinymodels import finetune_args, write_checkpoint, write_qa

from fastpeft.app import train
from fastpeft.app.cli import main

_RECIPE = ("--method", "lora", "--batch-size", "4", "--lr", "1e-2", "--dropout", "0.1", "--seed", "4")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_signals")
    return {"model": write_checkpoint(root / "model", seed=6), "data": write_qa(root)}


def _state(out: Path) -> dict:
    return json.loads((out / "checkpoint" / "trainer_state.json").read_text())


def _cfg(tiny: dict[str, Path], out: Path, **kw: object) -> train.TrainConfig:
    base = dict(out=str(out), model=str(tiny["model"]), data=str(tiny["data"]), method="lora", batch_size=4,
                lr=1e-2, max_steps=8, save_steps=50, dropout=0.1, seed=4, progress=False)  # fmt: skip
    return train.TrainConfig(**{**base, **kw})


def test_ctrl_c_in_a_real_run_checkpoints_and_resume_continues(tiny: dict[str, Path], tmp_path: Path) -> None:
    # A real process and a real SIGINT, sent while it trains; no checkpoint is due before step 1000.
    out = tmp_path / "run"
    common = finetune_args(tiny["model"], tiny["data"], out, *_RECIPE)
    argv = [*common, "--max-steps", "1000", "--save-steps", "1000"]
    proc = subprocess.Popen([sys.executable, "-m", "fastpeft.app.cli", *argv], stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:  # the run-length estimate is logged after step 3: training is under way
            lines.append(line)
            if "steps take about" in line:
                break
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=60)
    finally:
        proc.kill()
    stderr = "".join(lines) + proc.stderr.read()
    assert rc == 128 + signal.SIGINT, f"exit status {rc}\n{stderr}"
    state = _state(out)
    step = state["step"]
    assert 3 <= step < 1000 and len(state["losses"]) == step, f"checkpoint at step {step}\n{stderr}"
    assert f"after step {step}" in stderr and "--resume" in stderr, stderr
    assert not (out / "metrics.json").exists(), "an interrupted run must not look finished"

    assert main([*common, "--max-steps", str(step + 2), "--resume"]) == 0  # --max-steps may change on resume
    losses = json.loads((out / "metrics.json").read_text())["losses"]
    assert len(losses) == step + 2 and losses[:step] == state["losses"], "the resumed run did not continue"


def test_sigterm_checkpoints_the_step_in_progress_and_resume_is_exact(tiny: dict[str, Path], tmp_path: Path) -> None:
    expected = train.finetune(_cfg(tiny, tmp_path / "full"))["losses"]
    out = tmp_path / "term"

    def term_at_3(step: int, loss: float) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(train.TrainingInterrupted) as info:
        train.finetune(_cfg(tiny, out), callback=term_at_3)
    assert (info.value.signum, info.value.step) == (signal.SIGTERM, 3), str(info.value)
    assert _state(out)["step"] == 3, "the checkpoint must hold the last finished step, though --save-steps is 50"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "the run must restore the previous handlers"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    got = train.finetune(_cfg(tiny, out, resume=True))["losses"]
    assert got == expected, f"stopped at step 3 and resumed: {got} != uninterrupted {expected}"


def test_a_second_ctrl_c_stops_at_once(tiny: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "twice"

    def int_twice_at_2(step: int, loss: float) -> None:
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt) as info:
        train.finetune(_cfg(tiny, out), callback=int_twice_at_2)
    assert not isinstance(info.value, train.TrainingInterrupted), "the second Ctrl-C must not wait for a checkpoint"
    assert not (out / "checkpoint").exists(), "no checkpoint was due before step 50"
