"""Helpers for writing result files safely: the process umask, shared permissions, fsync."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["current_umask", "fsync_files", "share_permissions"]


def current_umask() -> int:
    """The process umask, read without changing it (``os.umask()`` would, briefly, for every thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def share_permissions(directory: Path) -> None:
    """Give ``directory`` and its files the umask's usual modes (``mkdtemp`` and safetensors make them private)."""
    mask = current_umask()
    os.chmod(directory, 0o777 & ~mask)
    for f in directory.rglob("*"):
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~mask)


def fsync_files(directory: Path) -> None:
    """Flush every file directly inside ``directory`` to disk."""
    for f in directory.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
