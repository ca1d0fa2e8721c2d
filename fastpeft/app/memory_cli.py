"""``fastpeft memory``: the per-category peak of one training step, estimated on fake tensors (no GPU).

Also the saver flags ``fastpeft finetune`` shares (``add_saver_arguments``) and the estimate ``finetune``
prints before it starts (``run_estimate``), which refuses a run whose estimate exceeds the free memory.
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from fastpeft.app import memory

# The slice --sequence-chunk suggests: its MLP intermediates (6 x 4,096 x 14,336 x 2 bytes, 0.66 GiB at
# Llama-3-8B's width) are small beside a long context's [tokens, hidden] tensors.
DEFAULT_SEQUENCE_CHUNK = 4096
__all__ = ["add_arguments", "add_saver_arguments", "finetune_estimate", "fitting_options", "run", "saver_options"]


def add_saver_arguments(p: argparse.ArgumentParser, checkpointing: bool = True) -> None:
    """The memory savers, as both ``finetune`` and ``memory`` take them."""
    if checkpointing:
        p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                       help="recompute activations in the backward (default: on for qlora on a GPU)")  # fmt: skip
    p.add_argument("--offload-activations", action="store_true",
                   help="keep what checkpointing saves in host memory (GPU; turns checkpointing on)")  # fmt: skip
    p.add_argument("--quantize-lm-head", action="store_true",
                   help="qlora: quantize the output head to NF4 too (less memory, a quality trade)")  # fmt: skip
    p.add_argument("--no-chunked-loss", action="store_true",
                   help="compute the loss from full float32 logits instead of in chunks")  # fmt: skip
    p.add_argument("--sequence-chunk", type=int, default=0, metavar="TOKENS",
                   help="run each decoder layer's MLP and RMSNorms over slices of TOKENS tokens, "
                   "recomputing one slice at a time in the backward "
                   f"(long contexts; e.g. {DEFAULT_SEQUENCE_CHUNK}; 0: off)")  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``memory`` subcommand's arguments."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--shape", choices=sorted(memory.SHAPES), help="a named model shape")
    src.add_argument("--config", help="a model directory or its config.json")
    p.add_argument("--method", default="qlora", choices=memory.METHODS, help="the fine-tuning method")
    p.add_argument("--r", type=int, default=16, help="LoRA rank")
    p.add_argument("--target-modules", default="all-linear", help='comma-separated module names, or "all-linear"')
    p.add_argument("--bottleneck-size", type=int, default=16, help="bottleneck adapter width")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (at most the model's "
                   "max_position_embeddings)")  # fmt: skip
    p.add_argument("--beyond-max-positions", action="store_true",
                   help="estimate (or --fit) sequences longer than the model's max_position_embeddings")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=1, help="sequences per micro-batch")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="what the estimate is for: a GPU run (bf16) or a CPU run (float32)")  # fmt: skip
    add_saver_arguments(p)
    p.add_argument("--fit", metavar="SIZE", help="also find the longest sequence that fits SIZE (e.g. 24GiB, 80GB)")
    p.add_argument(
        "--no-peer",
        action="store_true",
        help="skip the transformers + peft (+ bitsandbytes) estimate (lora, qlora, dora, qdora)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")


def saver_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``MemoryOptions`` fields the saver flags set."""
    return dict(
        checkpointing=getattr(args, "gradient_checkpointing", None),
        offload_activations=args.offload_activations,
        quantize_lm_head=args.quantize_lm_head,
        chunked_loss=not args.no_chunked_loss,
        sequence_chunk=args.sequence_chunk,
    )


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """transformers / peft / torch deprecation chatter from the traced set-up is not the user's business."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def run(args: argparse.Namespace) -> int:
    """``fastpeft memory``: print the table (or JSON); 0 on success."""
    name = args.shape or args.config
    config = memory.model_config(name)
    opts = memory.MemoryOptions(
        method=args.method, r=args.r, target_modules=args.target_modules, seq_len=args.seq_len,
        batch_size=args.batch_size, bottleneck_size=args.bottleneck_size, device=args.device,
        beyond_max_positions=args.beyond_max_positions, **saver_options(args),
    )  # fmt: skip
    budget = memory.parse_size(args.fit) if args.fit else None
    with quiet_libraries():
        ours = memory.estimate(config, opts)
        peer = None
        peer_error = None
        if not args.no_peer and opts.method in memory.PEER_METHODS:
            try:
                peer = memory.estimate_peer(config, opts)
            except ImportError as e:  # peft / bitsandbytes missing: the table goes without the peer
                peer_error = f"peer not estimated: {e}"
        fit = (budget, memory.longest_sequence(config, opts, budget)) if budget is not None else None
    if peer_error:
        ours.notes.append(peer_error)
    if args.json:
        out = {
            "model": name,
            "fastpeft": ours.to_dict(),
            "peer": peer.to_dict() if peer is not None else None,
            "ratio": ours.peak_bytes / peer.peak_bytes if peer is not None else None,
            "fit": {"budget_bytes": fit[0], "seq_len": fit[1]} if fit else None,
            "label": "estimate: one training step traced on fake tensors under torch's MemTracker, not measured",
        }
        print(json.dumps(out, indent=2, sort_keys=True))
    else:
        print(memory.format_report(name, ours, peer, fit))
    return 0


def fitting_options(config: Any, opts: memory.MemoryOptions, budget: int) -> list[str]:
    """The saver flags, added cheapest first, under which the estimate fits ``budget`` bytes; when none
    do, the longest ``--seq-len`` that fits with all of them (empty if not even that)."""
    tries: list[tuple[str, memory.MemoryOptions]] = []
    cur = opts
    if not cur.chunked_loss:
        cur = replace(cur, chunked_loss=True)
        tries.append(("drop --no-chunked-loss", cur))
    if not cur.resolved_checkpointing():
        cur = replace(cur, checkpointing=True)
        tries.append(("--gradient-checkpointing", cur))
    if cur.device == "cuda" and not cur.offload_activations:
        cur = replace(cur, offload_activations=True, checkpointing=True)
        tries.append(("--offload-activations", cur))
    if not cur.sequence_chunk and cur.seq_len > DEFAULT_SEQUENCE_CHUNK:
        cur = replace(cur, sequence_chunk=DEFAULT_SEQUENCE_CHUNK)
        tries.append((f"--sequence-chunk {DEFAULT_SEQUENCE_CHUNK}", cur))
    if cur.method == "qlora" and not cur.quantize_lm_head and not getattr(config, "tie_word_embeddings", False):
        cur = replace(cur, quantize_lm_head=True)
        tries.append(("--quantize-lm-head", cur))
    steps: list[str] = []
    with quiet_libraries():
        for flag, o in tries:
            steps.append(flag)
            if memory.estimate(config, o).peak_bytes <= budget:
                return [" ".join(steps)]
        seq = memory.longest_sequence(config, cur, budget)
    return [" ".join([*steps, f"--seq-len {seq}"])] if seq else []


def finetune_estimate(cfg: Any, budget_text: str | None) -> str | None:
    """The estimate ``fastpeft finetune`` prints before it starts, or None when it makes none (the CPU
    without ``--memory-budget``).

    The budget is ``budget_text`` when given, else the GPU's free memory. The estimate is for the run's
    longest micro-batch (``batch_size x seq_len`` tokens, padding included).

    Raises:
        ValueError: the estimate exceeds the budget; the message names the flags that would make it fit.
    """
    import torch

    from fastpeft.app import data, train

    device = train.resolve_device(cfg.device)
    if device.type != "cuda" and budget_text is None:
        return None
    budget = memory.parse_size(budget_text) if budget_text is not None else torch.cuda.mem_get_info(device)[0]
    method = train.resolve_method(cfg, device)
    cfg = train.resolve_savers(cfg, method, device)
    if method not in memory.METHODS:
        return f"memory estimate: none for {method} (the memory model covers {', '.join(memory.METHODS)})"
    if cfg.model is None:
        config = train.embedded_config(len(data.byte_tokenizer()))
    else:
        config = memory.model_config(cfg.model)  # a checkpoint directory or a GGUF file
    opts = memory.MemoryOptions(
        method=method, r=cfg.r, target_modules=cfg.target_modules, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
        checkpointing=cfg.gradient_checkpointing, offload_activations=cfg.offload_activations,
        chunked_loss=cfg.chunked_loss, quantize_lm_head=cfg.quantize_lm_head, bottleneck_size=cfg.bottleneck_size,
        device=device.type, beyond_max_positions=True,  # finetune's --seq-len is its own business
        sequence_chunk=cfg.sequence_chunk,
    )  # fmt: skip
    with quiet_libraries():
        est = memory.estimate(config, opts)
    limit = memory.format_bytes(budget)
    what = f"the budget of {limit}" if budget_text is not None else f"the {limit} free on {device}"
    parts = ", ".join(
        f"{label.split(' (')[0]} {memory.format_bytes(est.categories[key])}"
        for key, label in memory.CATEGORIES.items()
        if est.categories[key]
    )
    peak = memory.format_bytes(est.peak_bytes)
    line = f"memory estimate: peak {peak} within {what} ({parts})"
    if est.peak_bytes > budget:
        fixes = fitting_options(config, opts, budget)
        hint = f"it would fit with: {fixes[0]}" if fixes else "no saver flag or sequence length makes it fit"
        raise ValueError(
            f"the estimated peak memory {peak} exceeds {what}; {hint} "
            "(estimates from fastpeft memory; --memory-budget overrides the limit)"
        )
    return line
