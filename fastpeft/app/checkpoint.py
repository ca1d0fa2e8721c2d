"""Training checkpoints of ``fastpeft finetune``: written atomically, read back only after every field checks out.

A checkpoint directory holds the trainable tensors, the optimizer's tensors and the RNG states as
safetensors files, and ``trainer_state.json``: the step, the data position, the losses so far, the
optimizer's scalars and parameter groups, the scheduler's state, the run's config and the eval history (with
``--save-best``, ``best_adapter.safetensors``: the adapter at the best eval step). ``save_checkpoint``
writes it into a temporary directory beside the target and renames it into place (the old one is
removed last). ``load_checkpoint`` checks every field (type, range, consistency: one loss per step,
the scheduler at the same step) and ``Checkpoint.restore`` checks every tensor against the run it is
restored into (names, shapes, RNG state sizes) before changing anything; every error names the file
and the key. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastpeft.files import fsync_files, remove_path, share_permissions

__all__ = ["BEST_FILE", "CHECKPOINT_FILES", "Checkpoint", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_FILES = ("adapter_state.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer_state.json")
_STATE = CHECKPOINT_FILES[3]
BEST_FILE = "best_adapter.safetensors"  # --save-best: the adapter at the best eval step (fastpeft.app.evaluate)


def save_checkpoint(
    directory: Path,
    named: list[tuple[str, nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    device: torch.device,
    best: dict[str, torch.Tensor] | None = None,
    **trainer_state: Any,
) -> None:
    """Write a complete checkpoint next to ``directory`` and rename it into place (the old one goes last).

    ``best`` (``--save-best``): the adapter's tensors at the best eval step, written as ``best_adapter.safetensors``.

    Raises:
        OSError: a file cannot be written (read-only or full disk, ...); ``directory`` is left as it was.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint-tmp-", dir=directory.parent))
    try:
        opt = optimizer.state_dict()
        tensors, scalars = {}, {}
        for idx, st in opt["state"].items():
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"{idx}.{k}"] = v.detach().to("cpu").contiguous()
                else:
                    scalars[f"{idx}.{k}"] = v
        rng = {"cpu": torch.get_rng_state()}
        if device.type == "cuda":
            rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        files = [{n: p.detach().to("cpu").contiguous() for n, p in named}, tensors, rng]
        for name, content in zip(CHECKPOINT_FILES[:3], files, strict=True):
            try:
                save_file(content, str(tmp / name))
            except SafetensorError as e:  # how safetensors reports a failed write (a full disk, ...)
                raise OSError(f"{directory / name}: cannot write the checkpoint ({e})") from None
        if best is not None:
            try:
                save_file(best, str(tmp / BEST_FILE))
            except SafetensorError as e:
                raise OSError(f"{directory / BEST_FILE}: cannot write the checkpoint ({e})") from None
        meta = dict(
            trainer_state,
            param_names=[n for n, _ in named],
            optimizer_param_groups=opt["param_groups"],
            optimizer_scalars=scalars,
            scheduler=scheduler.state_dict(),
        )
        (tmp / _STATE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        fsync_files(tmp)
        share_permissions(tmp)
        old = directory.parent / f".checkpoint-old-{os.getpid()}"
        if os.path.lexists(directory):  # a symbolic link (even a dangling one) is replaced, never written through
            os.replace(directory, old)
        os.replace(tmp, directory)
        remove_path(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class Checkpoint:
    """A checkpoint read back by ``load_checkpoint`` (all tensors on the CPU; ``meta`` checked)."""

    directory: Path
    meta: dict[str, Any]
    params: dict[str, torch.Tensor]
    optimizer_tensors: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]
    best: dict[str, torch.Tensor] | None = None

    def restore(
        self,
        named: list[tuple[str, nn.Parameter]],
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        device: torch.device,
    ) -> None:
        """Load the trainable tensors, optimizer, scheduler and RNG states into a freshly set-up run.

        Everything is checked first, so on ``ValueError`` (naming the file and key) nothing has changed.
        """
        self._check_against(named, optimizer, device)
        state: dict[int, dict[str, Any]] = {}
        for key, t in self.optimizer_tensors.items():
            idx, _, k = key.partition(".")
            state.setdefault(int(idx), {})[k] = t
        for key, v in self.meta["optimizer_scalars"].items():
            idx, _, k = key.partition(".")
            state.setdefault(int(idx), {})[k] = v
        try:
            optimizer.load_state_dict({"state": state, "param_groups": self.meta["optimizer_param_groups"]})
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise ValueError(f"{self.directory / _STATE}: optimizer_param_groups do not fit this run ({e})") from None
        scheduler.load_state_dict(self.meta["scheduler"])
        with torch.no_grad():
            for n, p in named:
                p.copy_(self.params[n])
        torch.set_rng_state(self.rng["cpu"])
        if device.type == "cuda":
            torch.cuda.set_rng_state_all(
                [self.rng[f"cuda.{i}"] for i in range(torch.cuda.device_count()) if f"cuda.{i}" in self.rng]
            )

    def _check_against(
        self, named: list[tuple[str, nn.Parameter]], optimizer: torch.optim.Optimizer, device: torch.device
    ) -> None:
        from fastpeft.loading import _names

        names = [n for n, _ in named]
        if names != self.meta["param_names"] or set(names) != set(self.params):
            diff = set(names) ^ set(self.params)
            raise ValueError(
                f"{self.directory}: the checkpoint's trainable tensors differ from this run's: "
                f"{_names(diff) if diff else 'order'}"
            )
        where = self.directory / CHECKPOINT_FILES[0]
        for n, p in named:
            t = self.params[n]
            if t.shape != p.shape or not t.is_floating_point():
                raise ValueError(f"{where}: {n} is {t.dtype} {tuple(t.shape)}, expected a float {tuple(p.shape)}")
        # Optimizer tensors: per-parameter state (AdamW's moments: the parameter's shape) or a scalar (step).
        where = self.directory / CHECKPOINT_FILES[1]
        shapes = [p.shape for _, p in named]
        for key, t in self.optimizer_tensors.items():
            idx = _param_index(key, len(shapes))
            if idx is None:
                raise ValueError(f"{where}: key {key!r} is not '<parameter index>.<name>' for {len(shapes)} parameters")
            if t.shape != shapes[idx] and t.numel() != 1:
                raise ValueError(f"{where}: {key} has shape {tuple(t.shape)}, parameter {idx} is {tuple(shapes[idx])}")
        for key, v in self.meta["optimizer_scalars"].items():
            if _param_index(key, len(shapes)) is None or not _is_number(v):
                raise ValueError(f"{self.directory / _STATE}: optimizer_scalars[{key!r}] = {v!r} is not valid")
        groups = self.meta["optimizer_param_groups"]
        if len(groups) != len(optimizer.param_groups) or any(
            not isinstance(g, dict) or g.get("params") != list(range(len(shapes))) for g in groups
        ):
            raise ValueError(f"{self.directory / _STATE}: optimizer_param_groups do not describe this run's parameters")
        base_lrs = self.meta["scheduler"].get("base_lrs")
        if not isinstance(base_lrs, list) or len(base_lrs) != len(groups) or not all(map(_is_number, base_lrs)):
            raise ValueError(f"{self.directory / _STATE}: scheduler base_lrs {base_lrs!r} do not fit this run")
        # RNG states: torch checks only the size of the CPU one, and only as a RuntimeError.
        where = self.directory / CHECKPOINT_FILES[2]
        wanted = {"cpu": torch.get_rng_state()}
        if device.type == "cuda":
            wanted.update(
                {f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all()) if f"cuda.{i}" in self.rng}
            )
        for key, ref in wanted.items():
            t = self.rng.get(key)
            if t is None or t.dtype != torch.uint8 or t.shape != ref.shape:
                got = "missing" if t is None else f"{t.dtype} {tuple(t.shape)}"
                raise ValueError(f"{where}: RNG state {key!r} is {got}, expected uint8 {tuple(ref.shape)}")


def _param_index(key: str, n_params: int) -> int | None:
    idx, dot, name = key.partition(".")
    if not dot or not name or not idx.isdigit() or int(idx) >= n_params:
        return None
    return int(idx)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_meta(path: Path, meta: Any) -> None:
    """Types, ranges and consistency of ``trainer_state.json`` (``ValueError`` naming the key)."""
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    kinds = {
        "config": (dict, "an object"),
        "param_names": (list, "a list"),
        "optimizer_param_groups": (list, "a list"),
        "optimizer_scalars": (dict, "an object"),
        "scheduler": (dict, "an object"),
        "losses": (list, "a list"),
    }
    for key, (kind, what) in kinds.items():
        if not isinstance(meta.get(key), kind):
            got = "missing" if key not in meta else repr(meta[key])[:40]
            raise ValueError(f"{path}: {key!r} must be {what}, got {got}")
    for key in ("step", "epoch", "index", "tokens"):
        if not _is_count(meta.get(key)):
            raise ValueError(f"{path}: {key!r} must be a non-negative int, got {meta.get(key, 'nothing')!r}")
    if not _is_number(meta.get("seconds")) or meta["seconds"] < 0:
        raise ValueError(f"{path}: 'seconds' must be a non-negative number, got {meta.get('seconds', 'nothing')!r}")
    if not all(isinstance(n, str) for n in meta["param_names"]):
        raise ValueError(f"{path}: 'param_names' must be a list of str")
    losses, step = meta["losses"], meta["step"]
    if len(losses) != step or not all(_is_number(x) for x in losses):
        raise ValueError(f"{path}: 'losses' must hold one finite number per step ({step}), got {len(losses)} values")
    _check_evals(path, meta.get("evals", []), step)
    last_epoch = meta["scheduler"].get("last_epoch")
    if last_epoch != step:
        raise ValueError(f"{path}: the scheduler is at step {last_epoch!r}, the checkpoint at step {step}")


def _check_evals(path: Path, evals: Any, step: int) -> None:
    """``evals`` (the eval history, ``fastpeft.app.evaluate``): ``{step, eval_loss}`` records at rising steps."""
    if not isinstance(evals, list):
        raise ValueError(f"{path}: 'evals' must be a list, got {repr(evals)[:40]}")
    last = 0
    for r in evals:
        ok = isinstance(r, dict) and set(r) == {"step", "eval_loss"} and _is_count(r["step"])
        if not ok or not last < r["step"] <= step or not _is_number(r["eval_loss"]):
            raise ValueError(f"{path}: 'evals' must hold {{step, eval_loss}} records at rising steps up to {step}, "
                             f"got {repr(r)[:60]}")  # fmt: skip
        last = r["step"]


def load_checkpoint(directory: Path) -> Checkpoint:
    """Read ``directory`` as written by ``save_checkpoint`` (safetensors and JSON only) and check its fields.

    Raises:
        FileNotFoundError: a checkpoint file is missing.
        ValueError: a file is unreadable or a field is missing, mistyped or inconsistent (named with the file).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    for name in CHECKPOINT_FILES:
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory}: incomplete checkpoint, {name} is missing")
    path = directory / _STATE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, OSError) as e:
        raise ValueError(f"{path}: unreadable checkpoint state ({type(e).__name__}: {e})") from None
    _check_meta(path, meta)
    tensors = []
    for name in CHECKPOINT_FILES[:3]:
        try:
            tensors.append(load_file(str(directory / name)))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{directory / name}: unreadable checkpoint file ({e})") from None
    best = None
    if (directory / BEST_FILE).is_file():
        try:
            best = load_file(str(directory / BEST_FILE))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{directory / BEST_FILE}: unreadable checkpoint file ({e})") from None
    return Checkpoint(directory, meta, *tensors, best=best)
