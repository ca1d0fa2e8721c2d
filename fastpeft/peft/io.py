"""Adapter directories on disk: atomic writes, safetensors-only reads, errors that name files and keys.

A directory holds ``adapter_config.json`` (sorted keys, 2-space indent, ``peft_type`` included) and
``adapter_model.safetensors`` (metadata ``{"format": "pt"}``), HF PEFT's layout.

Atomicity: both files are first written complete (and fsynced) into a fresh temporary directory
beside the target, then moved in with ``os.replace``: the weights first, then the config. A crash
before the moves leaves the old adapter untouched (plus a ``.tmp-*`` directory); nothing ever
reads a partially written file. Only safetensors is read; pickle files are never opened.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "check_state_dict", "read_adapter_dir", "write_adapter_dir"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def write_adapter_dir(directory: str | os.PathLike, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Write ``config`` and ``tensors`` as an adapter directory, atomically per file (see module doc)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory))
    try:
        # safetensors refuses shared or non-contiguous storage: give it compact CPU copies.
        plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        save_file(plain, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        with open(tmp / CONFIG_NAME, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        mask = os.umask(0)
        os.umask(mask)
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            # safetensors creates its file owner-only; give both files the modes a plain open() would.
            os.chmod(tmp / name, 0o666 & ~mask)
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            os.replace(tmp / name, directory / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_adapter_dir(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read ``(config dict, tensors)`` from an adapter directory.

    Raises:
        FileNotFoundError: the directory or one of its two files is missing (only a pickle
            ``adapter_model.bin`` present says so: it is never loaded).
        ValueError: the JSON or the safetensors file is unreadable (truncated, corrupt).
    """
    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: no adapter config there")
    if not w_path.is_file():
        hint = (
            " (adapter_model.bin exists, but pickle files are never loaded)"
            if (directory / "adapter_model.bin").exists()
            else ""
        )
        raise FileNotFoundError(f"{w_path}: no adapter weights there{hint}")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object, got {type(config).__name__}")
    try:
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{w_path}: unreadable safetensors file (truncated or corrupt?): {e}") from None
    return config, tensors


def check_state_dict(
    source: str | os.PathLike, loaded: dict[str, torch.Tensor], expected: dict[str, torch.Size]
) -> None:
    """Raise ``ValueError`` naming ``source`` and the keys when ``loaded`` does not fit ``expected``.

    Args:
        source: the file the tensors came from (for the message).
        loaded: key -> tensor as read.
        expected: key -> the shape the model needs.
    """
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    mismatched = [
        f"{k}: file {tuple(loaded[k].shape)} vs model {tuple(expected[k])}"
        for k in sorted(set(expected) & set(loaded))
        if tuple(loaded[k].shape) != tuple(expected[k])
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys {_sample(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_sample(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches {_sample(mismatched)}")
        raise ValueError(f"{source} does not match the model: " + "; ".join(parts))


def _sample(keys: list[str], n: int = 8) -> str:
    more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
    return f"{keys[:n]}{more}"
