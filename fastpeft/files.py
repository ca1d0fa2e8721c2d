"""Helpers for writing result files safely: the process umask, shared permissions, fsync, removal that never
follows a symbolic link."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = ["current_umask", "fsync_files", "remove_path", "share_permissions"]


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


def remove_path(path: Path) -> None:
    """Remove ``path``: a symbolic link itself (never what it points to), a file, or a directory tree; nothing if
    it does not exist. (``shutil.rmtree`` refuses a link, and with ``ignore_errors`` leaves it silently in place.)"""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)
