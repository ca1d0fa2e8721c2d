"""Runs that must never hang or print a traceback before training begins (issues 25 and 26): real ``fastpeft``
processes without peers, and signalled during their start-up."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cliprocs import QUICK, finish, one_error_line, start
from tinymodels import finetune_args, write_checkpoint, write_qa


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("startup")
    return {"model": write_checkpoint(root / "model", seed=3), "data": write_qa(root)}


def _proc(pid: int, name: str) -> str:
    try:
        return Path(f"/proc/{pid}/{name}").read_text()
    except OSError:
        return ""


def _has_open(pid: int, path: Path) -> bool:
    try:
        return any(os.readlink(fd) == str(path) for fd in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False


def _signal_when(proc: subprocess.Popen, sig: int, ready: Callable[[], bool], out: Path) -> None:
    """Send ``sig`` once ``ready()`` (checked every few milliseconds), or once the run has created ``out``."""
    deadline = time.monotonic() + 60
    while not ready() and proc.poll() is None and not out.exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(sig)


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs /proc to see what the process does")
def test_issue26_item11_signals_during_start_up_exit_with_one_line(tiny: dict[str, Path], tmp_path: Path) -> None:
    big = tmp_path / "big.jsonl"
    big.write_text('{"text": "a b c d"}\n' * 500_000)  # seconds of reading and tokenizing: start-up, no training
    runs = []
    for sig, phase in [(s, p) for p in ("imports", "reading") for s in (signal.SIGINT, signal.SIGTERM)]:
        out = tmp_path / f"{phase}-{sig.name}"
        proc = start(*finetune_args(tiny["model"], big if phase == "reading" else tiny["data"], out, *QUICK))
        runs.append((proc, sig, out, phase))
    for proc, sig, out, phase in runs:
        if phase == "imports":  # torch's library being mapped: the command's imports are under way
            _signal_when(proc, sig, lambda pid=proc.pid: "libtorch" in _proc(pid, "maps"), out)
        else:  # the data file open (for about 2 s): after the imports, before the model is loaded
            _signal_when(proc, sig, lambda pid=proc.pid: _has_open(pid, big), out)
    for proc, sig, out, _ in runs:
        rc, err = finish(proc, timeout=60)
        one_error_line(rc, err, 128 + sig, f"fastpeft finetune: stopped by {sig.name}")
        assert not out.exists(), f"{out}: the signal came after start-up, the test proves nothing"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.jsonl"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_issue25_item5_finetune_without_peers_times_out_naming_the_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastpeft.app import distributed

    base = {"WORLD_SIZE": "2", "FASTPEFT_JOIN_TIMEOUT": "2"}
    cases = [
        ({"RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}, "RANK=0"),  # hosts, no peer
        ({"RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}, "RANK=1"),  # no host
        ({"RANK": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}, "RANK must be in"),
        ({}, "needs MASTER_ADDR"),  # WORLD_SIZE alone, no torchrun
    ]
    t0 = time.monotonic()
    procs = []
    for i, (env, _) in enumerate(cases):
        argv = ("finetune", "--out", str(tmp_path / f"run{i}"), "--max-steps", "2", "--no-progress")
        procs.append(start(*argv, env={**base, **env}, cwd=tmp_path))
    for proc, (_, text) in zip(procs, cases, strict=True):
        rc, err = finish(proc, timeout=60)
        one_error_line(rc, err, 2, "WORLD_SIZE=2", text)
    assert time.monotonic() - t0 < 45, "the refusals took too long"
    assert not any(tmp_path.iterdir()), "nothing is written by a run that never started"
    monkeypatch.delenv("FASTPEFT_JOIN_TIMEOUT", raising=False)
    assert distributed.join_timeout() == distributed.JOIN_TIMEOUT <= 60, "the default wait must be bounded"
