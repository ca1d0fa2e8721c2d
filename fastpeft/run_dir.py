"""The output directory of ``fastpeft finetune``: checked before any work, cleaned of what a killed run left,
and filled atomically at the end (every result written into a temporary directory, then renamed into place).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from fastpeft import data as fdata
from fastpeft.files import fsync_files, share_permissions

__all__ = ["BASE_MODEL_DIR", "OUTPUT_FILES", "check_out", "check_writable", "prepare_out", "write_results"]

OUTPUT_FILES = ("adapter_config.json", "adapter_model.safetensors", "metrics.json", "train_config.json")
BASE_MODEL_DIR = "base_model"  # the embedded demo's base model, written beside its adapter


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
    elif out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {out} is not empty (pass --resume to continue or --overwrite to replace)")


def check_writable(out: Path) -> None:
    """``--out`` (or the nearest folder above it that exists) must be writable: fail before the work."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {existing} is not writable")


def prepare_out(out: Path, resume: bool, overwrite: bool) -> None:
    """Create ``out``; remove what a killed run left, and with ``overwrite`` the previous results."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob(".checkpoint-tmp-*"), *out.glob(".checkpoint-old-*"), *out.glob(".final-tmp-*")]:
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed run; never read
    if overwrite and not resume:
        for name in OUTPUT_FILES:
            (out / name).unlink(missing_ok=True)
        for name in ("checkpoint", BASE_MODEL_DIR):
            shutil.rmtree(out / name, ignore_errors=True)


def write_results(
    out: Path, model: Any, metrics: dict[str, Any], cfg_dict: dict[str, Any], base: nn.Module | None = None
) -> None:
    """Adapter files, metrics, config (and ``base``, the embedded base model, with its tokenizer) into a
    temporary directory, then each renamed into ``out``."""
    from safetensors import SafetensorError

    tmp = Path(tempfile.mkdtemp(prefix=".final-tmp-", dir=out))
    try:
        model.save_pretrained(tmp)
        for name, obj in (("metrics.json", metrics), ("train_config.json", cfg_dict)):
            (tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if base is not None:
            base.save_pretrained(str(tmp / BASE_MODEL_DIR))
            fdata.byte_tokenizer().save_pretrained(str(tmp / BASE_MODEL_DIR))
        fsync_files(tmp)
        share_permissions(tmp)
        if base is not None:
            shutil.rmtree(out / BASE_MODEL_DIR, ignore_errors=True)
            os.replace(tmp / BASE_MODEL_DIR, out / BASE_MODEL_DIR)
        for name in OUTPUT_FILES:
            os.replace(tmp / name, out / name)
    except SafetensorError as e:  # how safetensors reports a failed write (a full disk, ...)
        raise OSError(f"{out}: cannot write the results ({e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
