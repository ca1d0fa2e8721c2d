"""``fastpeft`` command line: ``finetune``, ``quantize``, ``merge`` and ``bench``.

``fastpeft finetune`` with no arguments trains LoRA on a small seeded Llama over a built-in corpus (a
demo that needs no download); ``--model DIR --data FILE.jsonl`` fine-tunes a local transformers
checkpoint. ``fastpeft quantize`` writes an NF4 checkpoint transformers + bitsandbytes load as 4-bit;
``fastpeft merge`` folds a LoRA adapter into its base and writes a plain 16-bit checkpoint.
``fastpeft bench`` runs the benchmark suite (``benchmarks/``, installed as ``fastpeft.benchmarks``).
``fastpeft memory`` estimates a training step's peak GPU memory by category, without a GPU
(``fastpeft.memory``); ``finetune`` prints that estimate first on a GPU and refuses a run that would not fit.

``--model`` takes a transformers checkpoint directory or a GGUF file (with the ``gguf`` extra).

``torchrun --nproc-per-node N -m fastpeft.cli finetune ... --distributed ddp|fsdp`` trains on N GPUs (or N
CPU processes); ``--batch-size`` is then per process, rank 0 alone prints and writes
(``fastpeft.distributed``).

Bad input (missing or incomplete model directory, malformed data, unknown method or module, ...) ends
with one line on stderr and exit status 2, as does a failed write (read-only or full disk); output
directories are only created or replaced once all the work succeeded. A loss, gradient or update that
stops being finite ends training with one line naming the step and the likely cause, exit status 3; the
last good checkpoint stays. Ctrl-C (SIGINT) or SIGTERM during training writes a checkpoint at the end of the
step in progress and exits with 128 + the signal's number; ``--resume`` continues from it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["main"]

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")  # fmt: skip
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MODEL_HELP = "local transformers checkpoint directory, or a GGUF file (pip install 'fastpeft[gguf]')"


class _DefaultsFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to every option whose help does not already state its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        unset = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if unset or "default" in help_text or not action.option_strings:
            return action.help
        return f"{help_text} (default: %(default)s)".lstrip()


def _parser() -> argparse.ArgumentParser:
    from fastpeft.memory_cli import add_arguments as add_memory_arguments
    from fastpeft.memory_cli import add_saver_arguments

    p = argparse.ArgumentParser(prog="fastpeft", description="Parameter-efficient fine-tuning on fused Triton kernels.")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("finetune", help="fine-tune a causal LM with LoRA, QLoRA, adapters, prefix or prompt tuning")
    f.add_argument("--model", help=f"{_MODEL_HELP} (default: a small built-in Llama, written beside the adapter)")
    f.add_argument("--data", help='JSONL file, {"text": ...} or {"prompt": ..., "completion": ...} per line '
                   "(default: a built-in corpus of short sentences)")  # fmt: skip
    f.add_argument("--method", help="lora, qlora, adapter, prefix or prompt (default: qlora on a GPU, lora on CPU)")
    f.add_argument("--r", type=int, default=8, help="LoRA rank")
    f.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scaling = alpha / r)")
    f.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout")
    f.add_argument("--target-modules", default="all-linear", help='comma-separated module names, or "all-linear"')
    f.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate, warmup then cosine to 10%% (default: 1e-2 for the built-in demo, "
        "2e-4 for lora/qlora/adapter, 1e-2 for prefix/prompt)",
    )
    f.add_argument("--warmup-steps", type=int, default=None, help="default: min(10, steps / 10)")
    f.add_argument("--batch-size", type=int, default=4, help="examples per micro-batch")
    f.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    f.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: from --epochs)")
    f.add_argument("--epochs", type=float, default=1.0,
                   help="passes over the data (default: 1.0; the built-in demo runs 60 steps)")  # fmt: skip
    f.add_argument("--seq-len", type=int, default=512, help="examples are truncated to this many tokens")
    f.add_argument("--seed", type=int, default=0, help="adapter initialization, data order, dropout")
    add_saver_arguments(f)
    f.add_argument("--memory-budget", metavar="SIZE", help="refuse to start when the estimated peak exceeds SIZE "
                   "(e.g. 24GiB; default on a GPU: its free memory; on the CPU: no check)")  # fmt: skip
    f.add_argument("--num-virtual-tokens", type=int, default=8, help="prefix / prompt tuning length")
    f.add_argument("--bottleneck-size", type=int, default=16, help="bottleneck adapter width")
    f.add_argument("--save-steps", type=int, default=50,
                   help="checkpoint every N steps, at the end, and on Ctrl-C / SIGTERM")  # fmt: skip
    f.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    f.add_argument("--distributed", choices=("ddp", "fsdp"), default=None,
                   help="under torchrun with several processes: DistributedDataParallel, or FSDP2 sharding "
                   "(default: ddp when started by torchrun)")  # fmt: skip
    f.add_argument("--out", default="fastpeft-out", help="output directory (adapter, metrics.json, checkpoint/)")
    f.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    f.add_argument("--overwrite", action="store_true", help="replace the results already in OUT")
    f.add_argument("--no-progress", action="store_true", help="no progress bar")

    q = sub.add_parser("quantize", help="write an NF4 (bitsandbytes 4-bit) checkpoint of a model")
    q.add_argument("--model", required=True, help=_MODEL_HELP)
    q.add_argument("--out", required=True, help="new checkpoint directory")
    q.add_argument("--compute-dtype", default="bfloat16", choices=sorted(_DTYPES),
                   help="bnb_4bit_compute_dtype recorded for transformers + bitsandbytes; fastpeft finetune ignores it "
                   "and computes in bfloat16 on a GPU, float32 on the CPU")  # fmt: skip
    q.add_argument("--skip", default="lm_head", help="comma-separated modules kept in 16 bits")
    q.add_argument("--device", default=None, help="where to quantize (default: cuda when available)")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")

    m = sub.add_parser("merge", help="merge a LoRA adapter into its base model and write a 16-bit checkpoint")
    m.add_argument("--model", required=True,
                   help="the base model the adapter was trained on: checkpoint directory or GGUF file")  # fmt: skip
    m.add_argument("--adapter", required=True, help="adapter directory (adapter_config.json + safetensors)")
    m.add_argument("--out", required=True, help="new checkpoint directory")
    m.add_argument("--onto-original", action="store_true",
                   help="merge onto the original 16-bit weights, not dequant(NF4) (QLoRA adapters)")  # fmt: skip
    m.add_argument("--dtype", default=None, choices=sorted(_DTYPES), help="output dtype (default: the model's)")
    m.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")

    from fastpeft.benchmarks.cli import add_arguments as add_bench_arguments

    b = sub.add_parser("bench", help="measure fastpeft's kernels against cuBLAS, eager torch, torch.compile, "
                       "PEFT and bitsandbytes, or estimate them without a GPU")  # fmt: skip
    add_bench_arguments(b)
    mem = sub.add_parser("memory", help="estimate a training step's peak GPU memory by category, without a GPU")
    add_memory_arguments(mem)
    for parser in (p, *sub.choices.values()):
        parser.formatter_class = _DefaultsFormatter
    return p


def _fresh_out(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ValueError(f"--out {out} is not empty (pass --overwrite to replace it)")


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` directory to ``out`` (replacing it): the old one is removed last."""
    from fastpeft.files import share_permissions

    share_permissions(tmp)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


def _copy_tokenizer(src: Path, dst: Path) -> None:
    from fastpeft import loading

    if loading.is_gguf(src):  # the tokenizer a GGUF file embeds, as transformers' files
        loading.load_tokenizer(src).save_pretrained(str(dst))
        return
    for name in _TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def _device(name: str | None) -> torch.device:
    from fastpeft.train import resolve_device

    return resolve_device(name)


def cmd_finetune(args: argparse.Namespace) -> int:
    from fastpeft.train import TrainConfig, finetune

    cfg = TrainConfig(
        out=args.out, model=args.model, data=args.data, method=args.method, r=args.r, alpha=args.alpha,
        dropout=args.dropout, target_modules=args.target_modules, lr=args.lr, batch_size=args.batch_size,
        grad_accum=args.grad_accum, max_steps=args.max_steps, epochs=args.epochs, seq_len=args.seq_len,
        seed=args.seed, gradient_checkpointing=args.gradient_checkpointing, resume=args.resume,
        overwrite=args.overwrite, num_virtual_tokens=args.num_virtual_tokens, bottleneck_size=args.bottleneck_size,
        warmup_steps=args.warmup_steps, save_steps=args.save_steps, device=args.device,
        progress=not args.no_progress, offload_activations=args.offload_activations,
        quantize_lm_head=args.quantize_lm_head, chunked_loss=not args.no_chunked_loss, distributed=args.distributed,
    )  # fmt: skip
    from fastpeft.distributed import launched
    from fastpeft.memory_cli import finetune_estimate

    main_rank = os.environ.get("RANK", "0") == "0"
    if launched() and args.distributed == "fsdp":
        # the memory model is of one process holding the whole model; FSDP2 divides what it shards
        estimate = "memory estimate: none under --distributed fsdp (the model covers one unsharded process)"
    else:
        estimate = finetune_estimate(cfg, args.memory_budget)  # refuses (ValueError) a run that would not fit
    if estimate and main_rank:
        print(estimate, flush=True)
    m = finetune(cfg)
    if not main_rank:
        return 0
    trainable, total = m["trainable_params"], m["total_params"]
    print(
        f"fastpeft finetune: {m['method']} on {m['device']}, {m['steps']} steps\n"
        f"  trainable params  {trainable:,d} of {total:,d} ({100 * trainable / max(total, 1):.3f}%)\n"
        f"  loss              {m['first_loss']:.4f} -> {m['final_loss']:.4f}\n"
        f"  peak memory       {m['peak_memory_bytes'] / 2**20:,.1f} MiB ({m['peak_memory_kind']})\n"
        f"  throughput        {m['tokens_per_second']:,.0f} tokens/s\n"
        f"  written to        {Path(args.out).resolve()}"
    )
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from fastpeft import loading

    out = Path(args.out)
    _fresh_out(out, args.overwrite)
    skip = tuple(s.strip() for s in args.skip.split(",") if s.strip())
    model = loading.load_causal_lm(args.model, quantize=True, device=_device(args.device), skip=skip)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        loading.save_quantized(model, tmp, compute_dtype=_DTYPES[args.compute_dtype], skip=skip)
        _copy_tokenizer(Path(args.model), tmp)
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"fastpeft quantize: NF4 checkpoint written to {out.resolve()}")
    return 0


def _json_object(path: Path) -> dict:
    """``path``'s JSON object, or a ``ValueError`` naming the file."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: not valid JSON ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def cmd_merge(args: argparse.Namespace) -> int:
    from fastpeft import loading
    from fastpeft.peft import PeftModel

    out, adapter = Path(args.out), Path(args.adapter)
    _fresh_out(out, args.overwrite)
    cfg_path = adapter / "adapter_config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{adapter}: no adapter_config.json")
    peft_type = _json_object(cfg_path).get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"{cfg_path}: merging applies to LoRA adapters only, this one is {peft_type!r}")
    config = loading.load_config(args.model)
    prequantized = loading.is_prequantized(config)
    trained_on_nf4 = prequantized
    train_cfg = adapter / "train_config.json"
    if train_cfg.is_file():
        trained_on_nf4 = trained_on_nf4 or _json_object(train_cfg).get("method") == "qlora"
    if args.onto_original and prequantized:
        raise ValueError(f"--onto-original: {args.model} holds only the 4-bit weights, not the originals")
    quantize = trained_on_nf4 and not args.onto_original
    if args.dtype is not None:
        dtype = _DTYPES[args.dtype]
    else:
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = _DTYPES.get(dtype, torch.float32) if isinstance(dtype, str) else dtype
    model = loading.load_causal_lm(args.model, quantize=quantize, device="cpu", dtype=dtype)
    # The adapter merges onto exactly the weights it was trained against: dequant(W) for QLoRA.
    loading.dequantize_model(model, dtype)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    if hasattr(merged.config, "quantization_config"):
        del merged.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        merged.to(dtype).save_pretrained(str(tmp))
        _copy_tokenizer(Path(args.model), tmp)
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    onto = "dequant(NF4) weights" if quantize else "original weights"
    print(f"fastpeft merge: adapter merged onto the {onto}, written to {out.resolve()}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from fastpeft.benchmarks.cli import run

    return run(args)


def cmd_memory(args: argparse.Namespace) -> int:
    from fastpeft.memory_cli import run

    return run(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fastpeft`` command line; returns the exit status (0 ok, 2 bad input or a failed write,
    3 training diverged, 128 + N stopped by signal N)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="fastpeft: %(message)s")
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the run
        for name in ("fastpeft.train", "fastpeft.distributed"):
            logging.getLogger(name).setLevel(logging.INFO)  # the run-length estimate, method notices
    commands = {"finetune": cmd_finetune, "quantize": cmd_quantize, "merge": cmd_merge, "bench": cmd_bench,
                "memory": cmd_memory}  # fmt: skip
    try:
        return commands[args.command](args)
    except (ValueError, OSError, ImportError) as e:  # OSError: missing files, a read-only or full disk, ...
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"fastpeft {args.command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RuntimeError as e:
        from fastpeft.train import TrainingDiverged

        if not isinstance(e, TrainingDiverged):
            raise
        print(f"fastpeft {args.command}: error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except KeyboardInterrupt as e:
        from fastpeft.train import TrainingInterrupted

        if isinstance(e, TrainingInterrupted):
            print(
                f"fastpeft {args.command}: stopped by {signal.Signals(e.signum).name} after step {e.step}; "
                f"checkpoint in {e.checkpoint} (add --resume to continue)",
                file=sys.stderr,
            )
            return 128 + e.signum
        print(f"fastpeft {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
