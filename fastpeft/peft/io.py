"""Adapter directories on disk: atomic writes, safetensors-only reads, errors that name files and keys.

A directory holds ``adapter_config.json`` (sorted keys, 2-space indent, ``peft_type`` included) and
``adapter_model.safetensors`` (metadata ``{"format": "pt"}``), HF PEFT's layout.

Atomicity: both files are first written complete (and fsynced) into a fresh temporary directory
beside the target, then moved in with ``os.replace``: the weights first, then the config. A crash
before the moves leaves the old adapter untouched (plus a ``.tmp-*`` directory); nothing ever
reads a partially written file. The weights' metadata carries the config they were saved with
(``fastpeft.adapter_config``, beside HF PEFT's ``format``; HF PEFT ignores it), so the one torn state
left, a crash between the two moves, is reported on read: a warning names each setting that differs
from the config beside the weights (bookkeeping such as paths and ``inference_mode`` aside, which users
edit by hand), and the file's values are used.
Only safetensors is read; pickle files are never opened.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from fastpeft.files import fsync_files, share_permissions

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "check_output_dir",
    "check_state_dict",
    "check_tensor_values",
    "read_adapter_dir",
    "write_adapter_dir",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
SAVED_CONFIG_KEY = "fastpeft.adapter_config"
_BOOKKEEPING = frozenset(
    {"base_model_name_or_path", "revision", "inference_mode", "tokenizer_name_or_path", "tokenizer_kwargs",
     "auto_mapping", "peft_version", "task_type"}
)  # fmt: skip


def write_adapter_dir(directory: str | os.PathLike, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Write ``config`` and ``tensors`` as an adapter directory, atomically per file (see module doc).

    Raises:
        ValueError: ``directory`` exists and is not a directory.
        OSError: a file cannot be written (the directory keeps its previous adapter); the message names
            the directory.
    """
    directory = Path(directory)
    check_output_dir(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory))
    except FileExistsError:  # a file in the way of a parent directory
        raise ValueError(f"{directory}: a path component is a file, not a directory") from None
    except OSError as e:  # read-only, no permission, no space: OSError(errno, ...) keeps the subclass
        raise OSError(e.errno, f"{directory}: cannot write the adapter there ({e.strerror or e})") from None
    try:
        # safetensors refuses shared or non-contiguous storage: give it compact CPU copies.
        plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        metadata = {"format": "pt", SAVED_CONFIG_KEY: json.dumps(config, sort_keys=True)}
        try:
            save_file(plain, str(tmp / WEIGHTS_NAME), metadata=metadata)
        except SafetensorError as e:  # how safetensors reports a failed write (a full disk, ...)
            raise OSError(f"{directory / WEIGHTS_NAME}: cannot write the adapter ({e})") from None
        (tmp / CONFIG_NAME).write_text(text, encoding="utf-8")
        fsync_files(tmp)
        share_permissions(tmp)  # safetensors creates its file owner-only
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            os.replace(tmp / name, directory / name)  # replaces a symbolic link there, never writes through it
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_output_dir(directory: str | os.PathLike, inside: str | os.PathLike | None = None) -> None:
    """Refuse an adapter output directory that cannot be written as one.

    Args:
        directory: where the adapter's files go.
        inside: the directory the caller was given, when ``directory`` is a folder fastpeft chose inside it
            (``<save_directory>/<adapter name>``): such a folder must not be a symbolic link, since writing
            through it would put files outside the directory the caller named.

    Raises:
        ValueError: ``directory`` exists and is not a directory, or (``inside``) it is a symbolic link.
    """
    directory = Path(directory)
    if inside is not None and directory.is_symlink():
        raise ValueError(
            f"{directory} is a symbolic link inside {inside}; fastpeft does not write through links in an "
            "output directory (remove the link or save elsewhere)"
        )
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory}: exists and is not a directory")


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
    except RecursionError:
        raise ValueError(f"{cfg_path}: JSON nested too deeply to read") from None
    if not isinstance(config, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object, got {type(config).__name__}")
    try:
        with safe_open(str(w_path), framework="pt") as f:
            saved = (f.metadata() or {}).get(SAVED_CONFIG_KEY)
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{w_path}: unreadable safetensors file (truncated or corrupt?): {e}") from None
    if saved is not None:
        _warn_if_config_differs(w_path, config, saved)
    return config, tensors


def _warn_if_config_differs(w_path: Path, config: dict[str, Any], saved_text: str) -> None:
    try:
        saved = json.loads(saved_text)
    except (json.JSONDecodeError, RecursionError):
        return  # not ours to judge: metadata written by another tool
    if not isinstance(saved, dict):
        return
    keys = sorted((set(saved) | set(config)) - _BOOKKEEPING)
    diffs = [f"{k} (saved {saved.get(k)!r}, now {config.get(k)!r})" for k in keys if saved.get(k) != config.get(k)]
    if diffs:
        warnings.warn(
            f"{w_path} was saved with a different {CONFIG_NAME}: {', '.join(diffs)}; using {CONFIG_NAME} as it is "
            "(an interrupted save, files copied from two adapters, or an edit)",
            stacklevel=3,
        )


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


# The dtypes adapter weights are stored in; integer, bool, complex and float8 tensors are not adapter weights, and
# casting them into one (int8 codes as values, the real part of a complex) would be silent nonsense.
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor_values(
    source: str | os.PathLike,
    loaded: dict[str, torch.Tensor],
    targets: dict[str, torch.Tensor],
    compute_dtype: torch.dtype | None = None,
    allow_non_finite: bool = False,
) -> None:
    """Refuse, by key, file tensors that would load as nonsense into ``targets`` (key -> the model's tensor).

    A floating target takes float16, bfloat16, float32 or float64 only; another target its own dtype. Unless
    ``allow_non_finite``, a floating tensor must hold no NaN or ±inf, and no value beyond the range of the target's
    dtype or of ``compute_dtype`` (what the model computes in: 1e38 is a finite float32 that float16 logits turn
    into inf).

    Raises:
        ValueError: naming ``source``, the key, and the dtype or the values.
    """
    for key in sorted(set(loaded) & set(targets)):
        t, target = loaded[key], targets[key]
        if target.is_floating_point() and t.dtype not in _FLOAT_DTYPES:
            raise ValueError(
                f"{source}: {key} is {str(t.dtype).removeprefix('torch.')}; adapter weights must be float16, "
                "bfloat16, float32 or float64 (the file is not an adapter of this kind, or corrupt)"
            )
        if not target.is_floating_point():
            if t.dtype != target.dtype:
                raise ValueError(f"{source}: {key} is {t.dtype}, the model holds {target.dtype} there")
            continue
        if allow_non_finite or t.numel() == 0:
            continue
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise ValueError(
                f"{source}: {key} holds {bad} non-finite value(s) (NaN or inf) of {t.numel()}; pass "
                "allow_non_finite=True to load it anyway"
            )
        narrowest = min({target.dtype, compute_dtype or target.dtype}, key=lambda d: torch.finfo(d).max)
        limit = torch.finfo(narrowest).max
        peak = float(t.abs().max())
        if peak > limit:
            raise ValueError(
                f"{source}: {key} holds values up to {peak:.3g}, beyond {str(narrowest).removeprefix('torch.')}'s "
                f"range ({limit:.3g}) that the model computes in: they would turn into inf; pass "
                "allow_non_finite=True to load it anyway"
            )
