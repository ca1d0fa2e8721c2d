"""The fine-tuning loop behind ``fastpeft finetune``: model and data set-up, training, checkpoints, results.

``finetune(TrainConfig(...))`` loads (or, with no ``model``, builds a small seeded Llama) a causal LM,
streams it to NF4 for QLoRA (``fastpeft.loading``), injects the adapter with the PEFT API, trains the
adapter with AdamW (state for trainable parameters only) under a warmup + cosine schedule, and writes
into ``out``: the adapter directory (HF PEFT's files), ``metrics.json`` and ``train_config.json``.

Every input is validated before ``out`` is touched. Checkpoints (``out/checkpoint/``: the trainable
tensors, optimizer and RNG states as safetensors, step / data position / losses / scheduler as JSON)
are written into a temporary directory and renamed into place; ``resume=True`` continues from one and
reproduces the uninterrupted run's losses exactly. SIGINT (Ctrl-C) or SIGTERM during training ends the
step in progress, writes a checkpoint of it and raises ``TrainingInterrupted``; a second SIGINT stops at
once. A loss or gradient that stops being finite is caught before the update (the step's one host sync
comes first), an update that makes the weights non-finite before any checkpoint: ``TrainingDiverged``
names the step and the likely cause, and the last good checkpoint stays. Checkpoints are read back by
``fastpeft.app.checkpoint``, which checks every field first. Nothing is ever unpickled.

Started by ``torchrun --nproc-per-node N`` (``distributed``: ``ddp`` or ``fsdp``), every process trains its
share of each global batch (``batch_size`` examples per rank) through ``fastpeft.app.distributed``; rank 0
alone writes, and the results equal a single process trained with ``batch_size x N`` examples a batch.

With an eval set (``--eval-data`` / ``--eval-split``, ``fastpeft.app.evaluate``) the eval loss is taken every
``eval_steps`` and at the end, and ``save_best`` leaves the best step's adapter in ``out`` (the last step's in
``out/last``). ``out`` also gets ``run_config.yaml`` (the resolved flags, ``fastpeft.app.run_config``) and
``loss.png`` / TensorBoard events (``fastpeft.app.curves``).

After the first steps one log line (logger ``fastpeft.app.train``, level INFO) estimates the run's length.
The embedded demo writes its base model into ``out/base_model`` (it is tiny) and records that path as
the adapter's ``base_model_name_or_path``, so ``fastpeft merge`` and HF PEFT can load the result.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import resource
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastpeft import loading
from fastpeft.app import curves, distributed, evaluate, packing
from fastpeft.app import data as fdata
from fastpeft.app.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fastpeft.app.evaluate import EvalHistory
from fastpeft.app.outputs import LOCK_FILE, OutLock
from fastpeft.app.run_config import RUN_CONFIG, flags_of, write_run_config
from fastpeft.app.run_control import (
    NonFinite,
    TrainingDiverged,
    TrainingInterrupted,
    all_finite,
    diverged,
    log_estimate,
    stop_requests,
    threads_for_a_busy_cpu,
)
from fastpeft.app.run_dir import (
    BASE_MODEL_DIR,
    check_out,
    check_paths,
    check_writable,
    hold_out,
    prepare_out,
    write_results,
)
from fastpeft.app.savers import causal_lm_loss, enable_checkpointing, lm_head_skip
from fastpeft.app.seq_chunks import enable_sequence_chunks
from fastpeft.app.train_config import (
    LORA_METHODS,
    METHODS,
    NF4_METHODS,
    RESUME_FIELDS,
    TrainConfig,
    build_embedded_model,
    check_numbers,
    default_lr,
    embedded_config,
    peft_config,
    resolve_device,
    resolve_method,
    resolve_savers,
)

__all__ = [
    "METHODS",
    "Checkpoint",
    "TrainConfig",
    "TrainingDiverged",
    "TrainingInterrupted",
    "build_embedded_model",
    "default_lr",
    "embedded_config",
    "finetune",
    "load_checkpoint",
    "resolve_device",
    "resolve_method",
    "resolve_savers",
    "save_checkpoint",
]

log = logging.getLogger(__name__)

def _memory_now(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _memory_peak(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_peak_rss"


def _schedule(total: int, warmup: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine down to 10% of the peak

    return factor


def _setup(cfg: TrainConfig, device: torch.device, method: str) -> tuple[Any, Any, fdata.Batches, list]:
    """Tokenizer, data, PEFT model and the held-out eval examples, validating every input (nothing is written yet)."""
    from fastpeft.peft import get_peft_model, quantize_model

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if cfg.model is not None:
        loading.check_causal_lm(cfg.model)  # a missing / unsupported model fails before the tokenizer is read
        tokenizer = loading.load_tokenizer(cfg.model)
    else:
        tokenizer = fdata.byte_tokenizer()
    records = fdata.read_records(cfg.data) if cfg.data is not None else [{"text": t} for t in fdata.TINY_CORPUS]
    examples = fdata.encode_records(records, tokenizer, cfg.seq_len)
    # --eval-data / --eval-split: the held-out examples (fastpeft.app.evaluate), never trained on
    examples, held_out = evaluate.held_out(examples, cfg.eval_data, cfg.eval_split, cfg.seed, tokenizer, cfg.seq_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    if cfg.model is not None:
        quantize, skip = method in NF4_METHODS, lm_head_skip(cfg.quantize_lm_head)
        base = loading.load_causal_lm(cfg.model, quantize=quantize, device=device, dtype=dtype, skip=skip)
    else:
        base = build_embedded_model(cfg.seed, device, dtype, len(tokenizer))
        base.config._name_or_path = str((Path(cfg.out) / BASE_MODEL_DIR).resolve())  # written with the results
        if method in NF4_METHODS:
            quantize_model(base, skip=lm_head_skip(cfg.quantize_lm_head))
    vocab = base.get_input_embeddings().num_embeddings
    top = max(max(ex.input_ids) for ex in [*examples, *held_out])
    if top >= vocab:
        raise ValueError(f"the tokenizer produces id {top} but the model's vocabulary has {vocab} entries")
    if cfg.quantize_lm_head and type(base.get_output_embeddings()).__name__ != "NF4Linear":
        raise ValueError("--quantize-lm-head: the head is tied to the input embedding: quantizing it saves nothing")
    if cfg.gradient_checkpointing:
        enable_checkpointing(base, offload=cfg.offload_activations)
    if cfg.sequence_chunk:
        enable_sequence_chunks(base, cfg.sequence_chunk)
    base.config.use_cache = False
    if method in LORA_METHODS and cfg.target_modules != "all-linear":
        _check_targets(base, cfg.target_modules)
    torch.manual_seed(cfg.seed)  # the adapter's initialization
    model = get_peft_model(base, peft_config(cfg, method))
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()  # AdamW on bf16 parameters loses small updates: keep the adapter fp32
    return tokenizer, model, _batches(cfg, model, examples, pad_id, vocab), held_out


def _batches(cfg: TrainConfig, model: Any, examples: list, pad_id: int, vocab: int) -> Any:
    """Packed rows (``fastpeft.app.packing``) where ``--packing`` asks for them and the model packs exactly (``auto``:
    a single process whose model passes ``packing_is_exact``), else right-padded batches."""
    if cfg.packing not in ("auto", "on", "off"):
        raise ValueError(f"--packing must be auto, on or off, got {cfg.packing!r}")
    pack = cfg.packing == "on" or (cfg.packing == "auto" and cfg.distributed is None and not distributed.launched())
    if pack and not packing.packing_is_exact(model, vocab):
        if cfg.packing == "on":
            raise ValueError("--packing on: this model attends across packed examples (prompt / prefix tuning, or "
                             "an attention that ignores position_ids): use --packing off")  # fmt: skip
        pack = False
    if pack:
        return packing.PackedBatches(examples, cfg.batch_size, pad_id, cfg.seed, cfg.seq_len)
    return fdata.Batches(examples, cfg.batch_size, pad_id, cfg.seed)


# -- results ------------------------------------------------------------------------------------------


def _check_targets(model: nn.Module, targets: str) -> None:
    """Every name in ``--target-modules`` must name some module (PEFT only insists that one of them does)."""
    names = [n for n, _ in model.named_modules()]
    leaf = sorted(
        {
            n.rpartition(".")[2]
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear) or "Linear" in type(m).__name__
        }
    )
    for t in (t.strip() for t in targets.split(",") if t.strip()):
        if not any(n == t or n.endswith(f".{t}") for n in names):
            raise ValueError(f"--target-modules: {t!r} matches no module of the model (its linear layers: {leaf})")


def _finite(run: distributed.DistributedRun | None, params: list[nn.Parameter]) -> bool:
    return all_finite(params) if run is None else run.all_finite(params)


def _save(run: distributed.DistributedRun | None, directory: Path, named: list, optimizer: Any, scheduler: Any,
          device: torch.device, state: dict[str, Any]) -> None:  # fmt: skip
    if run is None:
        save_checkpoint(directory, named, optimizer, scheduler, device, **state)
    else:
        run.save_checkpoint(directory, named, optimizer, scheduler, **state)


def _extras(tmp: Path, model: Any, history: EvalHistory, losses: list[float], flags: dict[str, Any]) -> list[str]:
    """The results beside the adapter: ``run_config.yaml``, ``loss.png`` and, with ``--save-best``, ``last/`` (the
    last step's adapter, saved before the best step's tensors are loaded into ``model`` for the main files)."""
    names = []
    if history.keep_best and history.best is not None:
        model.save_pretrained(tmp / "last")
        names.append("last")
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in history.best:
                    p.copy_(history.best[n].to(device=p.device, dtype=p.dtype))
    write_run_config(tmp / RUN_CONFIG, flags)
    names.append(RUN_CONFIG)
    if curves.plot_losses(tmp / "loss.png", losses, history.records):
        names.append("loss.png")
    return names


def _model_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def _accumulate(
    model: Any, micro: list, params: list[nn.Parameter], device: torch.device, chunked_loss: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of the micro-batches (token-weighted), then clipping; ``(loss, grad norm)``."""
    counts = [int((b["labels"][:, 1:] != fdata.IGNORE_INDEX).sum()) for _, _, b in micro]
    n_total = sum(counts)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    loss_sum = torch.zeros((), device=device)
    for (_, _, batch), n in zip(micro, counts, strict=True):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast:
            # the chunked loss never materializes the float32 [tokens, vocab] logits (fastpeft.app.savers)
            loss = causal_lm_loss(model, batch) if chunked_loss else model(**batch).loss
        # Token-weighted mean over the accumulated micro-batches (not a mean of means).
        (loss * (n / n_total)).backward()
        loss_sum += loss.detach().float() * (n / n_total)
    return loss_sum, torch.nn.utils.clip_grad_norm_(params, 1.0)


def _train_step(
    model: Any,
    stream: Iterator,
    grad_accum: int,
    params: list[nn.Parameter],
    optimizer: Any,
    device: torch.device,
    chunked_loss: bool = True,
    run: distributed.DistributedRun | None = None,
) -> tuple[float, int, int, int]:
    """One optimizer step over ``grad_accum`` micro-batches; returns (loss, epoch, next index, real tokens, padding).

    With ``run`` the micro-batches are global batches, each rank training on its rows (``run.accumulate``).
    """
    micro = [next(stream) for _ in range(grad_accum)]
    epoch, index = micro[-1][0], micro[-1][1] + 1
    tokens = sum(packing.real_tokens(b) for _, _, b in micro)  # counted on the host copies
    slots = sum(b["input_ids"].numel() for _, _, b in micro)
    if run is not None:
        loss_sum, grad_norm = run.accumulate([b for _, _, b in micro], params)
    else:
        loss_sum, grad_norm = _accumulate(model, micro, params, device, chunked_loss)
    # The step's one host sync, before the update: a non-finite loss or gradient never reaches the weights.
    loss, norm = torch.stack((loss_sum, grad_norm.float().to(device))).tolist()
    for what, value in (("the loss", loss), ("the gradient norm", norm)):
        if not math.isfinite(value):
            optimizer.zero_grad(set_to_none=True)
            raise NonFinite(what, str(value))
    try:
        optimizer.step()
    except RuntimeError as e:  # a step size beyond float32 (an enormous learning rate)
        if "overflow" not in str(e):
            raise
        raise NonFinite("the update", "too large for float32") from None
    optimizer.zero_grad(set_to_none=True)
    return loss, epoch, index, tokens, slots - tokens


def finetune(
    cfg: TrainConfig, callback: Callable[[int, float], None] | None = None, flags: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Fine-tune as ``cfg`` says and write the results into ``cfg.out`` (see module doc).

    Args:
        cfg: the run's settings.
        callback: called after every optimizer step with ``(step, loss)`` (1-based step).
        flags: settings only the command line reads (``memory_budget``), recorded in ``run_config.yaml`` with the
            resolved ``cfg`` (``fastpeft.app.run_config``).

    Returns:
        the metrics written to ``metrics.json``: ``first_loss``, ``final_loss``, ``losses`` (one per
        step), ``trainable_params``, ``total_params``, ``peak_memory_bytes``, ``tokens_per_second``,
        ``steps``, ...

    Raises:
        ValueError / FileNotFoundError: bad input, reported before ``cfg.out`` is touched; ``cfg.out`` is
            refused when it is, contains or lies inside ``model`` or ``data``, and while another run holds it.
        TrainingDiverged: the loss, the gradients or the updated weights stopped being finite; nothing
            of that step is written (the last good checkpoint stays).
        TrainingInterrupted: SIGINT / SIGTERM, after a checkpoint of the last step.
        OSError: writing into ``cfg.out`` failed (a full disk, ...).
    """
    out = check_paths(cfg.out, cfg.model, cfg.data, cfg.eval_data)
    # One run at a time in `out`: held from the checks until this returns (the kernel drops it if we die).
    lock = OutLock(out / LOCK_FILE, f"--out {cfg.out}")
    try:
        return _finetune(cfg, callback, out, lock, flags or {})
    finally:
        lock.release()


def _finetune(
    cfg: TrainConfig, callback: Callable[[int, float], None] | None, out: Path, lock: OutLock, flags: dict[str, Any]
) -> dict[str, Any]:
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    run = distributed.setup(cfg.distributed, cfg.device)
    world = run.world_size if run is not None else 1
    device = run.device if run is not None else resolve_device(cfg.device)
    method = resolve_method(cfg, device)
    cfg = resolve_savers(cfg, method, device)
    for name in ("r", "batch_size", "grad_accum", "seq_len", "num_virtual_tokens", "bottleneck_size", "save_steps"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ValueError(f"--max-steps must be at least 1, got {cfg.max_steps}")
    if cfg.lr is None:
        cfg = replace(cfg, lr=default_lr(method, cfg.model is None))
    check_numbers(cfg)
    evaluate.check_eval_flags(cfg.eval_data, cfg.eval_split, cfg.eval_steps, cfg.save_best)
    curves.check_report_to(cfg.report_to)  # the tensorboard package, before anything is loaded
    check_writable(out)
    if run is not None:
        run.on_main(lambda: hold_out(out, lock, f"--out {cfg.out}"), str(out))
    else:
        hold_out(out, lock, f"--out {cfg.out}")
    check_out(out, cfg.resume, cfg.overwrite)
    state = load_checkpoint(out / "checkpoint") if cfg.resume else None
    cfg_dict = {k: v for k, v in asdict(cfg).items() if k not in ("out", "resume", "overwrite", "progress")}
    cfg_dict["method"] = method
    cfg_dict["world_size"] = world
    if state is not None:
        for name in RESUME_FIELDS:
            if state.meta["config"].get(name) != cfg_dict.get(name):
                raise ValueError(
                    f"--resume: the checkpoint was written with {name}={state.meta['config'].get(name)!r}, "
                    f"this run has {name}={cfg_dict.get(name)!r}"
                )
        if state.meta["config"].get("world_size", 1) != world:  # the data stream counts global batches
            raise ValueError(
                f"--resume: the checkpoint was written by {state.meta['config'].get('world_size', 1)} process(es), "
                f"this run has {world}"
            )

    # Every rank draws the same global batches (batch_size rows per rank) and trains on its own rows.
    tokenizer, model, batches, held_out = _setup(replace(cfg, batch_size=cfg.batch_size * world), device, method)
    eval_set = evaluate.eval_batches(batches, held_out) if held_out else None  # batched (packed) as training is
    # Micro-batches stream across epoch boundaries, so an epoch count converts to steps as a whole.
    by_epochs = math.ceil(cfg.epochs * batches.batches_per_epoch / cfg.grad_accum)
    default_steps = 60 if cfg.model is None and cfg.data is None else by_epochs
    total = cfg.max_steps or default_steps
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(10, total // 10)
    history = EvalHistory(cfg.eval_steps if eval_set is not None else None, total, keep_best=cfg.save_best)
    if state is not None:
        m = state.meta
        if m["step"] > total:
            raise ValueError(f"--resume: the checkpoint is at step {m['step']}, past this run's {total} steps")
        if m["index"] > batches.batches_per_epoch:
            raise ValueError(
                f"--resume: the checkpoint's data position (batch {m['index']} of epoch {m['epoch']}) is past the "
                f"{batches.batches_per_epoch} batches an epoch of this data"
            )

    if run is not None:  # FSDP2 replaces the parameters by shards: collect them after this
        run.wrap(model, causal_lm_loss if cfg.chunked_loss else _model_loss)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(total, warmup))

    # -- prepare out (inputs are valid from here on, on every rank) --
    if run is not None:
        run.on_main(lambda: prepare_out(out, cfg.resume, cfg.overwrite, lock), str(out))
    else:
        prepare_out(out, cfg.resume, cfg.overwrite, lock)
    step, epoch, index, losses, tokens, seconds, padded = 0, 0, 0, [], 0, 0.0, 0
    if state is not None:
        if run is not None:
            run.restore(state, named, optimizer, scheduler)
        else:
            state.restore(named, optimizer, scheduler, device)
        m = state.meta
        step, epoch, index = m["step"], m["epoch"], m["index"]
        losses, tokens, seconds, padded = list(m["losses"]), m["tokens"], m["seconds"], m.get("padded", 0)
        history.restore(m.get("evals", []), state.best, str(state.directory), named)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stream = batches.iterate(epoch, index)
    quiet = not cfg.progress or (run is not None and not run.is_main)
    bar = tqdm(total=total, initial=step, desc=f"finetune {method}", disable=quiet, dynamic_ncols=True)
    marks, estimated = [time.perf_counter()], False  # this run's start and step ends, checkpoints included
    model.train()
    # Log lines (the estimate, a signal's notice) go above the progress bar, not through it.
    redirect = logging_redirect_tqdm() if cfg.progress else contextlib.nullcontext()
    last_saved = step if state is not None else None
    events = curves.tensorboard(out, cfg.report_to == "tensorboard" and (run is None or run.is_main), step)
    with stop_requests() as stop, redirect, threads_for_a_busy_cpu(device), events as board:
        while step < total:
            t0 = time.perf_counter()
            try:
                step_loss, epoch, index, n_tokens, n_padded = _train_step(
                    model, stream, cfg.grad_accum, params, optimizer, device, cfg.chunked_loss, run
                )
            except NonFinite as e:
                bar.close()
                raise diverged(cfg.lr, step + 1, e.what, e.value, last_saved, out) from None
            lr_now = optimizer.param_groups[0]["lr"]
            scheduler.step()
            tokens += n_tokens
            padded += n_padded
            seconds += time.perf_counter() - t0
            step += 1
            losses.append(step_loss)
            if eval_set is not None and history.due(step):  # the eval loss, every --eval-steps and at the end
                value = evaluate.eval_loss(model, eval_set, device, cfg.chunked_loss, run)
                if not math.isfinite(value):
                    bar.close()
                    raise diverged(cfg.lr, step, "the eval loss", str(value), last_saved, out)
                history.add(step, value, named)
            if board is not None:
                board.step(step, step_loss, lr_now)
                if history.records and history.records[-1]["step"] == step:
                    board.eval(step, history.last_loss)
            bar.update(1)
            shown = {} if history.last_loss is None else {"eval": f"{history.last_loss:.4f}"}
            bar.set_postfix(
                loss=f"{step_loss:.4f}",
                **shown,
                tok_s=f"{tokens / max(seconds, 1e-9):.0f}",
                mem=f"{_memory_now(device) / 2**20:.0f}MiB",
            )
            state_now = dict(config=cfg_dict, step=step, epoch=epoch, index=index, losses=losses, tokens=tokens,
                             seconds=seconds, padded=padded, evals=history.records, best=history.best)  # fmt: skip
            saved = step % cfg.save_steps == 0 or step == total
            if saved:
                if not _finite(run, params):  # a checkpoint never holds weights an update made non-finite
                    bar.close()
                    raise diverged(cfg.lr, step, "the updated adapter weights", "non-finite", last_saved, out)
                _save(run, out / "checkpoint", named, optimizer, scheduler, device, state_now)
                last_saved = step
                if board is not None:
                    board.flush()
            if callback is not None:
                callback(step, step_loss)
            # every rank stops at the same step, whichever received the signal
            stopping = bool(stop) if run is None else run.any(bool(stop))
            if stopping and step < total:  # a signal arrived: the step is done, keep it and stop
                bar.close()
                if not saved:
                    if not _finite(run, params):
                        raise diverged(cfg.lr, step, "the updated adapter weights", "non-finite", last_saved, out)
                    _save(run, out / "checkpoint", named, optimizer, scheduler, device, state_now)
                raise TrainingInterrupted(stop[0] if stop else signal.SIGTERM, step, out / "checkpoint")
            marks.append(time.perf_counter())
            estimated = estimated or log_estimate(marks, total - step, total)
    bar.close()

    trainable, total_params = model.get_nb_trainable_parameters()
    peak, peak_kind = _memory_peak(device)
    metrics = {
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "losses": losses,
        "steps": step,
        "trainable_params": trainable,
        "total_params": total_params,
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "tokens": tokens,
        "padded_tokens": padded,
        "padding_fraction": padded / (tokens + padded) if tokens + padded else 0.0,
        "packed": isinstance(batches, packing.PackedBatches),
        "train_seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
        "method": method,
        "device": str(device),
        "world_size": world,
        "global_batch": cfg.batch_size * world * cfg.grad_accum,  # examples per optimizer step
        "distributed": run.strategy if run is not None else None,
        **history.metrics(),  # eval_loss, eval_history, best_step, best_eval_loss (None without an eval set)
        "eval_examples": len(held_out),
        # the step whose adapter is in `out`: the best eval step with --save-best (the last one then in out/last)
        "adapter_step": history.best_record["step"] if cfg.save_best and history.best is not None else step,
    }
    recorded = {**asdict(cfg), "method": method, "device": str(device) if run is None else cfg.device,
                "distributed": run.strategy if run is not None else cfg.distributed}  # fmt: skip
    run_flags = flags_of(recorded, flags)

    def write() -> None:
        base = None
        if cfg.model is None:  # the embedded base, rebuilt from its seed (dense, on the CPU) to go beside the adapter
            emb = model.get_input_embeddings()
            base = build_embedded_model(cfg.seed, torch.device("cpu"), emb.weight.dtype, emb.num_embeddings)
        write_results(out, model, metrics, cfg_dict, base,
                      extras=lambda tmp: _extras(tmp, model, history, losses, run_flags))  # fmt: skip

    if run is None:
        write()
    else:
        with run.full_parameters(model):  # FSDP2: the adapter's shards gathered on every rank
            run.on_main(write, str(out))
        run.close()
    return metrics
