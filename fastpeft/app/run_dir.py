"""The output directory of ``fastpeft finetune``: checked before any work, held by one run at a time, cleaned of
what a killed run left, and filled atomically at the end (every result written into a temporary directory, then
renamed into place; a symbolic link inside it is replaced, never written through).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from fastpeft.app import data as fdata
from fastpeft.app.outputs import LOCK_FILE, OutLock, beside_lock, check_out_path, check_regular, holder, in_use
from fastpeft.files import fsync_files, remove_path, share_permissions

__all__ = [
    "BASE_MODEL_DIR",
    "OPTIONAL_OUTPUTS",
    "OUTPUT_FILES",
    "check_out",
    "check_paths",
    "check_writable",
    "hold_out",
    "prepare_out",
    "write_results",
]

OUTPUT_FILES = ("adapter_config.json", "adapter_model.safetensors", "metrics.json", "train_config.json")
BASE_MODEL_DIR = "base_model"  # the embedded demo's base model, written beside its adapter
# Written by some runs only (run_config.yaml, loss.png, --save-best's last/, --report-to's tensorboard/): removed too
# by --overwrite, so nothing of a previous run stays beside the new results.
OPTIONAL_OUTPUTS = ("run_config.yaml", "loss.png", "last", "tensorboard")


def check_paths(out: str, model: str | None, data: str | None, eval_data: str | None = None) -> Path:
    """``--out`` as a path, refused when it is no directory of its own or is, contains or lies inside ``--model``,
    ``--data`` or ``--eval-data``; FIFOs and devices refused as inputs: all before anything is read."""
    check_regular("--model", model, directory_files=True)
    check_regular("--data", data)
    check_regular("--eval-data", eval_data)
    return check_out_path(out, [("--model", model), ("--data", data), ("--eval-data", eval_data)])


def hold_out(out: Path, lock: OutLock, what: str) -> None:
    """Take ``out``'s lock (``out/.fastpeft-lock``) when ``out`` exists; a new ``out`` is held from its creation
    (``prepare_out``). An ``out`` that ``fastpeft quantize`` or ``merge`` is replacing is refused too.

    Raises:
        ValueError: another live process holds ``out`` (``"--out R is in use by pid N"``).
    """
    pid = holder(beside_lock(out))
    if pid is not None:
        raise in_use(what, pid)
    if out.is_dir():
        lock.take()


def check_out(out: Path, resume: bool, overwrite: bool) -> None:
    """``--out`` fits the run: a directory, holding a checkpoint to resume from, or empty unless ``overwrite``;
    a checkpoint a crash left half-renamed is put back first."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if resume:
        olds = sorted(out.glob(".checkpoint-old-*"))
        if not (out / "checkpoint").exists() and olds:
            # A crash between the two renames of save_checkpoint: the previous checkpoint is complete.
            os.replace(olds[-1], out / "checkpoint")
        if not (out / "checkpoint").is_dir():
            raise ValueError(f"--resume: no checkpoint in {out / 'checkpoint'}")
    elif out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()) and not overwrite:
        raise ValueError(f"--out {out} is not empty (pass --resume to continue or --overwrite to replace)")


def check_writable(out: Path) -> None:
    """``--out`` (or the nearest folder above it that exists) must be writable: fail before the work."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {existing} is not writable")


def prepare_out(out: Path, resume: bool, overwrite: bool, lock: OutLock | None = None) -> None:
    """Create ``out`` and hold ``lock`` (if not yet); remove what a killed run left, and with ``overwrite`` the
    previous results (symbolic links among them are removed, never followed)."""
    out.mkdir(parents=True, exist_ok=True)
    if lock is not None and not lock.held:  # `out` did not exist at the checks: another run may have filled it since
        lock.take()
        check_out(out, resume, overwrite)
    for stale in [*out.glob(".checkpoint-tmp-*"), *out.glob(".checkpoint-old-*"), *out.glob(".final-tmp-*")]:
        remove_path(stale)  # left by a killed run; never read
    if overwrite and not resume:
        for name in OUTPUT_FILES:
            (out / name).unlink(missing_ok=True)
        for name in ("checkpoint", BASE_MODEL_DIR, *OPTIONAL_OUTPUTS):
            remove_path(out / name)


def write_results(
    out: Path,
    model: Any,
    metrics: dict[str, Any],
    cfg_dict: dict[str, Any],
    base: nn.Module | None = None,
    extras: Callable[[Path], list[str]] | None = None,
) -> None:
    """Adapter files, metrics, config (and ``base``, the embedded base model, with its tokenizer) into a
    temporary directory, then each renamed into ``out``.

    ``extras(tmp)`` runs first (before the adapter is saved: it may save another adapter, then change the model's
    weights) and returns the names of the further files or directories it wrote into ``tmp``; they are renamed into
    ``out`` too, replacing what is there.
    """
    from safetensors import SafetensorError

    tmp = Path(tempfile.mkdtemp(prefix=".final-tmp-", dir=out))
    try:
        extra_names = extras(tmp) if extras is not None else []
        model.save_pretrained(tmp)
        for name, obj in (("metrics.json", metrics), ("train_config.json", cfg_dict)):
            (tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if base is not None:
            base.save_pretrained(str(tmp / BASE_MODEL_DIR))
            fdata.byte_tokenizer().save_pretrained(str(tmp / BASE_MODEL_DIR))
        fsync_files(tmp)
        share_permissions(tmp)
        if base is not None:
            remove_path(out / BASE_MODEL_DIR)
            os.replace(tmp / BASE_MODEL_DIR, out / BASE_MODEL_DIR)
        for name in extra_names:
            if (tmp / name).is_dir():
                remove_path(out / name)
            os.replace(tmp / name, out / name)
        for name in OUTPUT_FILES:
            os.replace(tmp / name, out / name)
    except SafetensorError as e:  # how safetensors reports a failed write (a full disk, ...)
        raise OSError(f"{out}: cannot write the results ({e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
