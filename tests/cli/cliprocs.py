"""Real ``fastpeft`` processes for the CLI tests: started with default signal handling and without torchrun's
variables, finished with a timeout that fails the test (a hang), and their one-line errors checked."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

__all__ = ["QUICK", "dead_pid", "finish", "one_error_line", "run_all", "start"]

QUICK = ("--method", "lora", "--batch-size", "4", "--lr", "1e-2")  # a LoRA recipe the tiny models learn under


def default_signals() -> None:
    """In the child before exec: SIGINT and SIGTERM as a shell would leave them (pytest under nohup ignores SIGINT,
    and Python keeps an ignored SIGINT ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


TORCHRUN = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "FASTPEFT_JOIN_TIMEOUT")


def start(*argv: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """``fastpeft *argv`` as a process: this environment without torchrun's variables, plus ``env``."""
    base = {k: v for k, v in os.environ.items() if k not in TORCHRUN}
    return subprocess.Popen(
        [sys.executable, "-m", "fastpeft.app.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**base, **(env or {})},
        cwd=cwd,
        preexec_fn=default_signals,
    )


def finish(proc: subprocess.Popen, timeout: float = 90) -> tuple[int, str]:
    """Exit status and stderr; a process still running after ``timeout`` is killed and fails the test."""
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"{proc.args[3:]} still running after {timeout} s (a hang)\n{err[-2000:]}")
    return proc.returncode, err


def run_all(*runs: tuple[str, ...], timeout: float = 90, **kw: object) -> list[tuple[int, str]]:
    """Every ``fastpeft`` argv in ``runs`` as its own process, all at once (the machine has few cores: they share)."""
    procs = [start(*argv, **kw) for argv in runs]
    return [finish(p, timeout) for p in procs]


# the packages whose log records the command line shows under their own name (fastpeft.app.cli._SourceFormatter)
_NOTICE_SOURCES = tuple(f"{name}: " for name in ("fastpeft", "bitsandbytes", "transformers", "torch", "accelerate",
                                                  "peft", "huggingface_hub", "gguf", "warning"))


def one_error_line(rc: int, err: str, status: int, *expect: str) -> str:
    """The exit status is ``status`` and stderr ends in one line saying ``expect``; before it at most log notices
    (``fastpeft: ...``, or a library's warning under its own name while the model loads, ``bitsandbytes: ...``),
    never a traceback."""
    lines = err.strip().splitlines() or [""]
    line = lines[-1]
    assert rc == status, f"exit status {rc}, expected {status}\n{err[-3000:]}"
    assert "Traceback" not in err, f"a traceback:\n{err[-3000:]}"
    notices = [x for x in lines[:-1] if x.startswith(_NOTICE_SOURCES)]
    assert notices == lines[:-1], f"expected one line on stderr, got:\n{err[-3000:]}"
    for text in expect:
        assert text in line, f"{text!r} not in: {line}"
    return line


def dead_pid() -> int:
    """The pid of a process that has exited (for lock files and temporaries a killed run left)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid
