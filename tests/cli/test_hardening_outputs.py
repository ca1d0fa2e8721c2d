"""Outputs that must never destroy inputs or each other (issues 25 and 26): real ``fastpeft`` processes on tiny
local models, real files, FIFOs, symbolic links and lock files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cliprocs import QUICK, dead_pid, finish, one_error_line, run_all, start
from tinymodels import finetune_args, listing, write_checkpoint, write_qa

from fastpeft.app.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny model, its data, and an adapter trained on it (a finetune --out: adapter, checkpoint/)."""
    root = tmp_path_factory.mktemp("hardening")
    model, data = write_checkpoint(root / "model", seed=3), write_qa(root)
    adapter = root / "adapter"
    assert main(finetune_args(model, data, adapter, *QUICK, "--max-steps", "2")) == 0
    return {"model": model, "data": data, "adapter": adapter}


# -- issue 25 ---------------------------------------------------------------------------------------------------


# The refusals below are of commands that, unrefused, delete or change their inputs: every one works on copies.


def test_issue25_item1_quantize_refuses_out_inside_model(tiny: dict[str, Path], tmp_path: Path) -> None:
    model = shutil.copytree(tiny["model"], tmp_path / "model")
    before = listing(tmp_path)
    runs = [
        ("quantize", "--model", str(model), "--out", str(model), "--overwrite"),  # is
        ("quantize", "--model", str(model), "--out", str(model / "nf4"), "--overwrite"),  # lies inside
        ("quantize", "--model", str(model), "--out", str(tmp_path), "--overwrite"),  # contains
        ("quantize", "--model", str(model / "." / ".." / "model"), "--out", str(model), "--overwrite"),  # spelled apart
    ]
    relations = ["is the --model input", "lies inside the --model input", "contains the --model input", "is the"]
    for (rc, err), relation in zip(run_all(*runs), relations, strict=True):
        one_error_line(rc, err, 2, relation)
    assert listing(tmp_path) == before, "the input model was changed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "files were left beside the model"


def test_issue25_item1_merge_refuses_out_that_is_the_adapter(tiny: dict[str, Path], tmp_path: Path) -> None:
    adapter = shutil.copytree(tiny["adapter"], tmp_path / "adapter")
    model = shutil.copytree(tiny["model"], tmp_path / "model")
    assert (adapter / "checkpoint" / "trainer_state.json").is_file()
    before = listing(tmp_path)
    m, a = str(model), str(adapter)
    runs = [
        ("merge", "--model", m, "--adapter", a, "--out", a, "--overwrite"),
        ("merge", "--model", m, "--adapter", a, "--out", str(adapter / "merged"), "--overwrite"),
        ("merge", "--model", m, "--adapter", a, "--out", m, "--overwrite"),
    ]
    expect = ["is the --adapter input", "lies inside the --adapter input", "is the --model input"]
    for (rc, err), text in zip(run_all(*runs), expect, strict=True):
        one_error_line(rc, err, 2, text)
    assert listing(tmp_path) == before, "the adapter, its checkpoint or the model was changed"


def test_issue25_item1_finetune_refuses_out_holding_its_inputs(tiny: dict[str, Path], tmp_path: Path) -> None:
    model = shutil.copytree(tiny["model"], tmp_path / "model")
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    data = runs_dir / "qa.jsonl"
    data.write_bytes(tiny["data"].read_bytes())
    before = listing(tmp_path)
    runs = [
        finetune_args(model, data, model, "--overwrite"),
        finetune_args(model, data, runs_dir, "--overwrite"),
        finetune_args(model, data, data, "--overwrite"),
        finetune_args(model, data, model / "sub", "--resume"),
    ]
    expect = ["is the --model input", "contains the --data input", "is the --data input", "lies inside the --model"]
    for (rc, err), text in zip(run_all(*runs), expect, strict=True):
        one_error_line(rc, err, 2, text)
    assert listing(tmp_path) == before, "the model or the data was changed"
    assert sorted(p.name for p in runs_dir.iterdir()) == ["qa.jsonl"]


def test_issue25_item6_fifo_inputs_are_refused(tiny: dict[str, Path], tmp_path: Path) -> None:
    fifo_data = tmp_path / "data.jsonl"
    os.mkfifo(fifo_data)
    fifo_gguf = tmp_path / "model.gguf"
    os.mkfifo(fifo_gguf)
    model = tmp_path / "model"
    model.mkdir()
    for f in tiny["model"].iterdir():
        if f.name != "model.safetensors":
            (model / f.name).write_bytes(f.read_bytes())
    os.mkfifo(model / "model.safetensors")
    out = str(tmp_path / "out")
    runs = [
        finetune_args(tiny["model"], fifo_data, Path(out)),
        ("quantize", "--model", str(fifo_gguf), "--out", out),
        ("merge", "--model", str(model), "--adapter", str(tiny["adapter"]), "--out", out),
        ("finetune", "--data", "/dev/zero", "--out", out, "--no-progress"),
    ]
    expect = [
        f"--data {fifo_data} is a FIFO, not a regular file",
        f"--model {fifo_gguf} is a FIFO, not a regular file",
        f"--model {model}: model.safetensors is a FIFO, not a regular file",
        "--data /dev/zero is a character device, not a regular file",
    ]
    for (rc, err), text in zip(run_all(*runs, timeout=60), expect, strict=True):
        one_error_line(rc, err, 2, text)
    assert not (tmp_path / "out").exists()


# -- issue 26 ---------------------------------------------------------------------------------------------------


def _wait_for(ready: Callable[[], bool], proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the first run ended (status {proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} within {timeout} s")
        time.sleep(0.05)


def _newer(path: Path, than: float) -> bool:
    try:
        return path.stat().st_mtime > than
    except OSError:
        return False


def test_issue26_item1_two_finetune_runs_on_one_out_are_kept_apart(tiny: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "R"
    # Two fresh runs started together (R does not exist yet): one trains, the other is refused by the winner's pid
    # (or, should the winner be done before the other gets to R, as a non-empty --out: never both written into R).
    argv = [finetune_args(tiny["model"], tiny["data"], out, *QUICK, "--max-steps", "150", "--seed", s) for s in "12"]
    procs = [start(*a) for a in argv]
    results = [finish(p) for p in procs]
    ok = [i for i, (rc, _) in enumerate(results) if rc == 0]
    assert len(ok) == 1, f"exactly one run may write into R: {[rc for rc, _ in results]}\n{results}"
    winner, loser = procs[ok[0]], procs[1 - ok[0]]
    line = one_error_line(*results[1 - ok[0]], 2, f"--out {out} is ")
    assert f"in use by pid {winner.pid}" in line or "is not empty" in line, line
    assert json.loads((out / "train_config.json").read_text())["seed"] == int("12"[ok[0]]), "R mixes the two runs"
    assert loser.pid != winner.pid and not (out / ".fastpeft-lock").exists(), "the lock outlived its run"

    # A later run with --overwrite while the first still trains (and writes checkpoints) is refused at once.
    started = time.time()
    first = start(*finetune_args(tiny["model"], tiny["data"], out, *QUICK, "--overwrite", "--max-steps", "100000",
                                  "--save-steps", "1"))  # fmt: skip
    try:  # R holds the earlier run's checkpoint: wait for one the first run wrote
        _wait_for(lambda: _newer(out / "checkpoint" / "trainer_state.json", started), first, "checkpoint of its own")
        rc, err = finish(start(*finetune_args(tiny["model"], tiny["data"], out, *QUICK, "--overwrite")))
        one_error_line(rc, err, 2, f"--out {out} is in use by pid {first.pid}")
        assert first.poll() is None, "the first run died"
        first.send_signal(signal.SIGTERM)
        rc, err = finish(first)
    finally:
        first.kill()
    assert rc == 128 + signal.SIGTERM, err[-2000:]
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] >= 1 and not list(out.glob(".checkpoint-*")), sorted(p.name for p in out.iterdir())


_HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, f"{os.getpid()}\\n".encode())
print("held", flush=True)
time.sleep(120)
"""  # another run holding an output: its lock file, locked, naming its pid


def test_issue26_item1_quantize_and_merge_refuse_an_out_in_use(tiny: dict[str, Path], tmp_path: Path) -> None:
    q, m = tmp_path / "q", tmp_path / "m"
    holders = [
        subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path / f".{name}.lock")], stdout=subprocess.PIPE,
                         text=True)
        for name in ("q", "m")
    ]  # fmt: skip
    try:
        for h in holders:
            assert h.stdout.readline().strip() == "held"
        runs = [
            ("quantize", "--model", str(tiny["model"]), "--out", str(q)),
            ("merge", "--model", str(tiny["model"]), "--adapter", str(tiny["adapter"]), "--out", str(m)),
        ]
        for (rc, err), h, out in zip(run_all(*runs), holders, (q, m), strict=True):
            one_error_line(rc, err, 2, f"--out {out} is in use by pid {h.pid}")
    finally:
        for h in holders:
            h.kill()
            h.wait()
    assert not q.exists() and not m.exists()
    # The holders are dead now: their lock files are stale and taken over (a stale finetune lock inside m too).
    m.mkdir()
    (m / ".fastpeft-lock").write_text(f"{dead_pid()}\n")
    results = run_all(*runs[:1], (*runs[1], "--overwrite"))
    assert [rc for rc, _ in results] == [0, 0], results
    assert (q / "model.safetensors").is_file() and (m / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "q"], "lock files or temporaries were left"


def test_issue26_item3_killed_quantize_leftovers_are_cleaned_and_a_lost_out_restored(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "q"
    dead = dead_pid()
    # A run killed between the two renames of its publish step: --out gone, the previous result as .q.old-PID,
    # its finished-or-not new checkpoint as .q.tmp-PID-*; and an older killed run's half-written temporary.
    old = tmp_path / f".q.old-{dead}"
    old.mkdir()
    (old / "config.json").write_text('{"previous": true}\n')
    for name in (f".q.tmp-{dead}-abc123", ".q.tmp-x1y2z3"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"half")
    live = tmp_path / f".q.tmp-{os.getpid()}-live"  # a live process's: not ours to remove
    live.mkdir()
    (tmp_path / ".other.tmp-1-x").mkdir()  # another output's
    argv = ("quantize", "--model", str(tiny["model"]), "--out", str(out))
    (rc, err), = run_all(argv)  # fmt: skip
    one_error_line(rc, err, 2, "is not empty")  # the restored previous result is not replaced without --overwrite
    assert (out / "config.json").read_text() == '{"previous": true}\n', "the previous result was not put back"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-1-x", live.name, "q"]
    (rc, err), = run_all((*argv, "--overwrite"))  # fmt: skip
    assert rc == 0, err[-2000:]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["load_in_4bit"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-1-x", live.name, "q"]


def test_issue26_item4_symlinked_checkpoint_in_out_is_replaced_not_followed(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "ckpt").mkdir(parents=True)
    (elsewhere / "ckpt" / "keep.txt").write_text("not the run's\n")
    (elsewhere / "metrics.json").write_text("{}\n")
    (elsewhere / "lock").write_text("a file the lock must not truncate\n")
    before = listing(elsewhere)
    out = tmp_path / "R"
    out.mkdir()
    (out / "checkpoint").symlink_to(elsewhere / "ckpt")
    (out / "metrics.json").symlink_to(elsewhere / "metrics.json")
    (out / "base_model").symlink_to(elsewhere)
    (out / ".fastpeft-lock").symlink_to(elsewhere / "lock")
    common = ("--max-steps", "2", "--save-steps", "1", "--overwrite")
    assert main(finetune_args(tiny["model"], tiny["data"], out, *QUICK, *common)) == 0
    assert listing(elsewhere) == before, "a symbolic link inside --out was written through"
    assert not (out / "checkpoint").is_symlink() and not (out / "metrics.json").is_symlink()
    assert not os.path.lexists(out / "base_model") and not os.path.lexists(out / ".fastpeft-lock")
    # --resume from a checkpoint reached through a link: read through it, then replaced by the run's own.
    ckpt = elsewhere / "run_ckpt"
    os.replace(out / "checkpoint", ckpt)
    (out / "checkpoint").symlink_to(ckpt)
    kept = listing(ckpt)
    argv = finetune_args(tiny["model"], tiny["data"], out, *QUICK, "--max-steps", "4", "--save-steps", "1")
    assert main([*argv, "--resume"]) == 0
    assert listing(ckpt) == kept and not (out / "checkpoint").is_symlink()
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 4
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_issue26_item4_quantize_out_symlink_is_replaced_never_followed(tiny: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    (target / "mine.txt").write_text("kept\n")
    victim = tmp_path / "victim.txt"
    victim.write_text("kept too\n")
    out = tmp_path / "link"
    out.symlink_to(target)
    (tmp_path / ".link.lock").symlink_to(victim)
    assert main(["quantize", "--model", str(tiny["model"]), "--out", str(out), "--overwrite"]) == 0
    assert not out.is_symlink() and (out / "model.safetensors").is_file()
    assert listing(target) == {"mine.txt": b"kept\n"} and victim.read_text() == "kept too\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "target", "victim.txt"], "leftovers beside --out"


def test_issue26_item6_special_out_is_refused_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cwd = tmp_path / "a" / "b"
    cwd.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.json"):
        (cwd / name).write_text("{}\n")
    monkeypatch.chdir(cwd)
    before = listing(tmp_path)
    nowhere = str(tmp_path / "no-such-model")  # the --out refusal comes first, before the model is even looked at
    cases = [
        (["finetune", "--out", "", "--overwrite", "--max-steps", "1"], "--out is empty"),
        (["finetune", "--out", ".", "--overwrite", "--model", nowhere], "--out . is the current directory"),
        (["finetune", "--out", str(tmp_path), "--overwrite", "--model", nowhere], "a parent of the current"),
        (["quantize", "--model", nowhere, "--out", "", "--overwrite"], "--out is empty"),
        (["quantize", "--model", nowhere, "--out", ".", "--overwrite"], "--out . is the current directory"),
        (["quantize", "--model", nowhere, "--out", "..", "--overwrite"], "--out .. is a parent of the current"),
        (["quantize", "--model", nowhere, "--out", "/"], "--out / is a filesystem root"),
        (["quantize", "--model", nowhere, "--out", str(tmp_path / "y" / "x" / ".."), "--overwrite"], "ends in '..'"),
        (["merge", "--model", nowhere, "--adapter", nowhere, "--out", "../.."], "a parent of the current"),
    ]
    for argv, text in cases:
        assert main(argv) == 2, argv
        one_error_line(2, capsys.readouterr().err, 2, f"fastpeft {argv[0]}: error: ", text)
    assert listing(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_issue26_item1_stale_locks_are_taken_over_even_without_flock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import fcntl

    from fastpeft.app.outputs import OutLock, holder

    path = tmp_path / ".R.lock"
    path.write_text(f"{dead_pid()}\n")  # left by a killed run
    lock = OutLock(path, "--out R")
    assert holder(path) is None
    lock.take()
    assert path.read_text() == f"{os.getpid()}\n" and holder(path) == os.getpid()
    lock.release()
    assert not path.exists()

    def no_flock(fd: int, op: int) -> None:  # a network or FUSE filesystem without flock
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path.write_text(f"{live.pid}\n")
        assert holder(path) == live.pid
        with pytest.raises(ValueError, match=f"--out R is in use by pid {live.pid}"):
            OutLock(path, "--out R").take()
    finally:
        live.kill()
        live.wait()
    path.write_text(f"{dead_pid()}\n")
    assert holder(path) is None
    lock.take()
    assert path.read_text() == f"{os.getpid()}\n"
    lock.release()
    assert not path.exists()


def test_issue26_item1_an_out_another_run_filled_during_start_up_is_not_overwritten(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fastpeft import loading
    from fastpeft.app import train

    out = tmp_path / "new" / "R"  # neither R nor its folder exists at the checks: no lock can be held before loading

    def another_run_finishes(real):  # noqa: ANN001, ANN202 - wraps a loader
        def load(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.json").write_text('{"theirs": true}\n')
            return real(*args, **kwargs)

        return load

    monkeypatch.setattr(train, "_setup", another_run_finishes(train._setup))
    assert main(finetune_args(tiny["model"], tiny["data"], out, *QUICK, "--max-steps", "1")) == 2
    assert "is not empty" in capsys.readouterr().err
    assert listing(out) == {"metrics.json": b'{"theirs": true}\n'}
    shutil.rmtree(tmp_path / "new")
    monkeypatch.setattr(loading, "load_causal_lm", another_run_finishes(loading.load_causal_lm))
    assert main(["quantize", "--model", str(tiny["model"]), "--out", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert listing(out) == {"metrics.json": b'{"theirs": true}\n'}
    assert sorted(p.name for p in out.parent.iterdir()) == ["R"], "lock files or temporaries were left"
