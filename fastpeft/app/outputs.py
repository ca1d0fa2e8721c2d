"""Where ``fastpeft finetune``, ``quantize`` and ``merge`` write, and who holds it.

- ``check_out_path``: ``--out`` is refused before any work when it is empty, the current directory or one of
  its parents, a filesystem root, or when it is, contains or lies inside a path the command reads (an
  ``--overwrite`` would delete the input; ``--out X/sub`` would mix the result into it).
- ``check_regular``: every file a command reads is a regular file; a FIFO with no writer would block the run
  forever, a device never ends.
- ``OutLock``: a lock file naming its holder's pid, held with ``flock`` so the kernel releases it when the
  process dies however it dies: a stale file is taken over, a live holder refused by pid (on a filesystem
  without ``flock``, the pid in the file alone decides). ``holder`` tells who holds one without taking it.
- ``temp_beside``, ``clean_beside``, ``publish``: quantize and merge build their checkpoint in a temporary
  directory beside ``--out`` and rename it into place (the previous result goes to ``.NAME.old-PID`` and is
  removed last). What a killed run left beside ``--out`` is removed by the next run, and an ``--out`` that a
  kill between the two renames took away is put back from its ``.old``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

from fastpeft.files import remove_path, share_permissions

__all__ = [
    "LOCK_FILE",
    "OutLock",
    "beside_lock",
    "check_out_path",
    "check_regular",
    "clean_beside",
    "holder",
    "in_use",
    "publish",
    "temp_beside",
]

log = logging.getLogger("fastpeft.app.train")

LOCK_FILE = ".fastpeft-lock"  # inside the directory fastpeft finetune writes into
_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket"}  # fmt: skip
# The files a model or adapter directory is read through (configs, weights, tokenizers, chat templates).
_READ_SUFFIXES = (".json", ".safetensors", ".gguf", ".model", ".txt", ".jinja")


def _resolved(flag: str, value: str) -> Path:
    try:
        return Path(value).resolve()
    except (RuntimeError, OSError) as e:  # a symbolic link loop
        raise ValueError(f"{flag} {value}: cannot resolve the path ({e})") from None


def check_out_path(out: str, inputs: Iterable[tuple[str, str | None]]) -> Path:
    """``--out`` as a path, once it is known not to be a place no command may write into.

    Args:
        out: the ``--out`` argument as given.
        inputs: ``(flag, path)`` of everything the command reads (None: not given).

    Raises:
        ValueError: ``out`` is empty, the current directory or one of its parents, a filesystem root, or is,
            contains or lies inside one of ``inputs``; the message names both arguments.
    """
    if not out:
        raise ValueError("--out is empty: name the output directory")
    where = _resolved("--out", out)
    cwd = Path.cwd().resolve()
    if where == where.parent:
        raise ValueError(f"--out {out} is a filesystem root: name a directory of its own")
    if where == cwd or where in cwd.parents:
        which = "the current directory" if where == cwd else "a parent of the current directory"
        raise ValueError(f"--out {out} is {which}: name a directory of its own")
    if Path(out).name == "..":
        raise ValueError(f"--out {out} ends in '..': name the directory itself")
    for flag, value in inputs:
        if value is None:
            continue
        src = _resolved(flag, value)
        if where == src:
            relation = "is"
        elif src.is_relative_to(where):
            relation = "contains"
        elif where.is_relative_to(src):
            relation = "lies inside"
        else:
            continue
        raise ValueError(f"--out {out} {relation} the {flag} input {value}: write the output somewhere else")
    return Path(out)


def check_regular(flag: str, value: str | None, directory_files: bool = False) -> None:
    """``value`` (and, with ``directory_files``, the configs, weights and tokenizer files of a directory) must be
    regular files; a path that does not exist is left to the reader to name.

    Raises:
        ValueError: a FIFO, a device or a socket, named with ``flag``.
    """
    if value is None:
        return
    path = Path(value)
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if stat.S_ISDIR(mode):
        if not directory_files:
            return
        with contextlib.suppress(OSError):
            for entry in sorted(path.iterdir()):
                if entry.suffix not in _READ_SUFFIXES:
                    continue
                with contextlib.suppress(OSError):
                    kind = stat.S_IFMT(entry.stat().st_mode)
                    if kind in _KINDS:
                        raise ValueError(f"{flag} {value}: {entry.name} is {_KINDS[kind]}, not a regular file")
        return
    if not stat.S_ISREG(mode):
        raise ValueError(f"{flag} {value} is {_KINDS.get(stat.S_IFMT(mode), 'not a file')}, not a regular file")


# -- the lock --------------------------------------------------------------------------------------------


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def holder(path: Path) -> int | None:
    """The pid holding the lock file ``path`` (0 when the holder has not written its pid yet), or None when no
    live process holds it. Nothing is created."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(path) or 0
        except OSError:  # a filesystem without flock (some network or FUSE mounts): the pid in the file decides
            pid = _read_pid(path)
            return pid if pid is not None and pid != os.getpid() and _alive(pid) else None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def in_use(what: str, pid: int) -> ValueError:
    """The refusal of an output another process holds (``pid`` 0: not known yet)."""
    return ValueError(f"{what} is in use by {f'pid {pid}' if pid else 'another process'}")


def beside_lock(out: Path) -> Path:
    """The lock file of an ``out`` that is replaced as a whole (quantize, merge): beside it, ``.NAME.lock``."""
    return out.parent / f".{out.name}.lock"


class OutLock:
    """The lock file ``path`` that keeps two runs off one output (``what`` names it in the refusal).

    ``take`` creates the file (or takes over a stale one), locks it and writes this process's pid; ``release``
    removes it. The kernel drops the lock of a process that dies, so a file left by a killed run never blocks.
    """

    def __init__(self, path: Path, what: str) -> None:
        self.path, self.what = path, what
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def take(self) -> None:
        """Hold the lock (nothing if already held).

        Raises:
            ValueError: another live process holds it (``"--out R is in use by pid N"``).
            OSError: the lock file cannot be created (a read-only directory, ...).
        """
        if self._fd is not None:
            return
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as e:
                if not self.path.is_symlink():
                    raise OSError(f"{self.what}: cannot create the lock file {self.path} ({e.strerror})") from None
                self.path.unlink()  # never written through: the link is replaced by the lock file
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise in_use(self.what, _read_pid(self.path) or 0) from None
            except OSError:  # a filesystem without flock: the pid in the file decides, a dead one is taken over
                pid = _read_pid(self.path)
                if pid is not None and pid != os.getpid() and _alive(pid):
                    os.close(fd)
                    raise in_use(self.what, pid) from None
            # The holder may have released (removed) the file between our open and our flock: hold the one there.
            try:
                here = os.stat(self.path, follow_symlinks=False)
                same = (here.st_dev, here.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self._fd = fd
                return
            os.close(fd)
        raise OSError(f"{self.what}: the lock file {self.path} keeps being replaced")

    def release(self) -> None:
        """Remove the lock file and drop the lock (nothing if not held)."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None


# -- quantize / merge: a checkpoint renamed into place -------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _stale(rest: str) -> bool:
    """Whether the temporary whose name ends in ``rest`` (``PID-...`` or ``PID``) belongs to no live process."""
    pid = rest.split("-", 1)[0]
    return not pid.isdigit() or int(pid) == os.getpid() or not _alive(int(pid))


def temp_beside(out: Path) -> Path:
    """A new, empty temporary directory beside ``out`` named after it and this process (``.NAME.tmp-PID-...``)."""
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))


def clean_beside(out: Path) -> None:
    """Remove the ``.NAME.tmp-*`` and ``.NAME.old-*`` that dead runs left beside ``out``; when ``out`` itself is
    missing (a kill between the two renames of ``publish``), the newest ``.old`` becomes ``out`` again.

    Call it holding ``out``'s lock: no live run is writing there then."""
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return
    olds, tmps = [], []
    for entry in entries:
        for marker, found in ((".old-", olds), (".tmp-", tmps)):
            prefix = f".{out.name}{marker}"
            if entry.name.startswith(prefix) and _stale(entry.name[len(prefix) :]):
                found.append(entry)
    if olds and not os.path.lexists(out):
        newest = max(olds, key=lambda p: p.lstat().st_mtime_ns)
        os.replace(newest, out)
        olds.remove(newest)
        log.warning("--out %s was missing (a run was killed while replacing it): the previous one is back", out)
    for entry in [*olds, *tmps]:
        remove_path(entry)


def publish(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` directory to ``out``, replacing it (a symbolic link is replaced, never followed):
    the previous ``out`` becomes ``.NAME.old-PID`` and is removed last."""
    share_permissions(tmp)
    old = None
    if os.path.lexists(out):
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        remove_path(old)
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        remove_path(old)
