"""``fastpeft`` command line: ``finetune``, ``quantize``, ``merge`` and ``bench``.

``fastpeft finetune`` with no arguments trains LoRA on a small seeded Llama over a built-in corpus (a
demo that needs no download); ``--model DIR --data FILE.jsonl`` fine-tunes a local transformers
checkpoint. ``fastpeft quantize`` writes an NF4 checkpoint transformers + bitsandbytes load as 4-bit;
``fastpeft merge`` folds a LoRA adapter into its base and writes a plain 16-bit checkpoint.
``fastpeft bench`` runs the benchmark suite (``benchmarks/``, installed as ``fastpeft.benchmarks``).
``fastpeft memory`` estimates a training step's peak GPU memory by category, without a GPU
(``fastpeft.app.memory``); ``finetune`` prints that estimate first on a GPU and refuses a run that would not fit.

``--model`` takes a transformers checkpoint directory or a GGUF file (with the ``gguf`` extra).

``torchrun --nproc-per-node N -m fastpeft finetune ... --distributed ddp|fsdp`` trains on N GPUs (or N
CPU processes); ``--batch-size`` is then per process, rank 0 alone prints and writes
(``fastpeft.app.distributed``).

Bad input (missing or incomplete model directory, malformed data, unknown method or module, ...) ends
with one line on stderr and exit status 2, as does a failed write (read-only or full disk); output
directories are only created or replaced once all the work succeeded. A loss, gradient or update that
stops being finite ends training with one line naming the step and the likely cause, exit status 3; the
last good checkpoint stays. Ctrl-C (SIGINT) or SIGTERM during training writes a checkpoint at the end of the
step in progress and exits with 128 + the signal's number; ``--resume`` continues from it. Before training (imports,
model loading) or in ``quantize`` / ``merge`` they stop the command at once, with one line and the same status.

``--out`` is refused before any work when it is, contains or lies inside a path the command reads, when it is
empty, the current directory, one of its parents or a filesystem root, and while another run holds it (``--out R is
in use by pid N``); inputs that are FIFOs or devices are refused. A run killed while ``quantize`` or ``merge``
replaced ``--out`` leaves temporaries the next run removes (and an ``--out`` it took away, put back).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported by the commands, not by the module: a signal in its import is handled
    import torch

    from fastpeft.app.outputs import OutLock

__all__ = ["main"]

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")  # fmt: skip
_DTYPES = ("bfloat16", "float16", "float32")
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
    from fastpeft.app.memory_cli import add_arguments as add_memory_arguments
    from fastpeft.app.memory_cli import add_saver_arguments

    p = argparse.ArgumentParser(prog="fastpeft", description="Parameter-efficient fine-tuning on fused Triton kernels.")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("finetune", help="fine-tune a causal LM with LoRA, QLoRA, adapters, prefix or prompt tuning")
    f.add_argument("--model", help=f"{_MODEL_HELP} (default: a small built-in Llama, written beside the adapter)")
    f.add_argument("--data", help='JSONL file, {"text": ...}, {"prompt": ..., "completion": ...} or {"messages": '
                   '[{"role": ..., "content": ...}, ...]} (chat template; loss on assistant turns) per line; or a '
                   "datasets save_to_disk directory (its train split) or Parquet file(s) with those columns "
                   "(default: a built-in corpus of short sentences)")  # fmt: skip
    f.add_argument("--method", help="lora, qlora, dora, qdora (DoRA on an NF4 base), adapter, prefix or prompt "
                   "(default: qlora on a GPU, lora on CPU)")  # fmt: skip
    f.add_argument("--r", type=int, default=8, help="LoRA rank")
    f.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scaling = alpha / r)")
    f.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout")
    f.add_argument("--target-modules", default="all-linear", help='comma-separated module names, or "all-linear"')
    f.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate, warmup then cosine to 10%% (default: 1e-2 for the built-in demo, "
        "2e-4 for lora/qlora/dora/qdora/adapter, 1e-2 for prefix/prompt)",
    )
    f.add_argument("--warmup-steps", type=int, default=None, help="default: min(10, steps / 10)")
    f.add_argument("--batch-size", type=int, default=4, help="examples per micro-batch")
    f.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    f.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: from --epochs)")
    f.add_argument("--epochs", type=float, default=1.0,
                   help="passes over the data (default: 1.0; the built-in demo runs 60 steps)")  # fmt: skip
    f.add_argument("--seq-len", type=int, default=512, help="examples are truncated to this many tokens")
    f.add_argument("--seed", type=int, default=0, help="adapter initialization, data order, dropout")
    f.add_argument("--packing", choices=("auto", "on", "off"), default="auto",
                   help="pack examples into rows of --seq-len, none attending to another (auto: where the model "
                   "packs exactly, in one process)")  # fmt: skip
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
    _add_eval_arguments(f)

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
    m.add_argument("--dtype", default=None, choices=sorted(_DTYPES),
                   help="output dtype (default: the model's own; bfloat16 for a block-quantized GGUF file)")
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


def _add_eval_arguments(f: argparse.ArgumentParser) -> None:
    """``finetune``'s evaluation, config-file and curve flags (fastpeft.app.evaluate, run_config, curves)."""
    f.add_argument("--eval-data", metavar="FILE",
                   help="held-out data, in --data's format, evaluated during training (default: none)")
    f.add_argument("--eval-split", type=float, metavar="FRACTION",
                   help="hold out this fraction of the training examples (seeded by --seed) as the eval set "
                   "(default: none)")
    f.add_argument("--eval-steps", type=int, metavar="N",
                   help="evaluate every N steps, and always at the end (default: at the end only)")
    f.add_argument("--save-best", action="store_true",
                   help="OUT holds the adapter of the step with the lowest eval loss; the last step's goes to OUT/last")
    f.add_argument("--config", metavar="FILE",
                   help="a YAML, TOML or JSON file of flag: value (flags on the command line win); every run writes "
                   "OUT/run_config.yaml, which repeats it (default: none)")
    f.add_argument("--report-to", choices=("none", "tensorboard"), default="none",
                   help="tensorboard: write loss and learning-rate events into OUT/tensorboard")  # fmt: skip


def _fresh_out(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ValueError(f"--out {out} is not empty (pass --overwrite to replace it)")


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(name, torch.float32)


@contextlib.contextmanager
def _holding(out: Path, overwrite: bool) -> Iterator[OutLock]:
    """``out`` (replaced as a whole) held by this command until it ends, through ``.NAME.lock`` beside it: taken
    now when the folder above exists (else by ``_write_beside``), what killed runs left there cleaned (a lost
    ``out`` put back), a fine-tuning run writing into ``out`` or a non-empty ``out`` without ``overwrite`` refused.
    """
    from fastpeft.app.outputs import LOCK_FILE, OutLock, beside_lock, clean_beside, holder, in_use

    lock = OutLock(beside_lock(out), f"--out {out}")
    try:
        pid = holder(out / LOCK_FILE)
        if pid is not None:
            raise in_use(f"--out {out}", pid)
        if out.parent.is_dir():
            lock.take()
            clean_beside(out)
        _fresh_out(out, overwrite)
        yield lock
    finally:
        lock.release()


def _write_beside(out: Path, lock: OutLock, overwrite: bool, write: Callable[[Path], None]) -> None:
    """``write`` the new ``out`` into a temporary directory beside it, then rename that into place."""
    from fastpeft.app.outputs import clean_beside, publish, temp_beside

    out.parent.mkdir(parents=True, exist_ok=True)
    if not lock.held:  # the folder did not exist at the checks: another run may have written `out` since
        lock.take()
        clean_beside(out)
        _fresh_out(out, overwrite)
    tmp = temp_beside(out)
    try:
        write(tmp)
        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _copy_tokenizer(src: Path, dst: Path) -> None:
    from fastpeft import loading

    if loading.is_gguf(src):  # the tokenizer a GGUF file embeds, as transformers' files
        loading.load_tokenizer(src).save_pretrained(str(dst))
        return
    for name in _TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def _device(name: str | None) -> torch.device:
    from fastpeft.app.train import resolve_device

    return resolve_device(name)


def cmd_finetune(args: argparse.Namespace) -> int:
    from fastpeft.app.run_dir import check_paths
    from fastpeft.app.train import TrainConfig, finetune

    check_paths(args.out, args.model, args.data, args.eval_data)  # before the memory estimate reads the model

    cfg = TrainConfig(
        out=args.out, model=args.model, data=args.data, method=args.method, r=args.r, alpha=args.alpha,
        dropout=args.dropout, target_modules=args.target_modules, lr=args.lr, batch_size=args.batch_size,
        grad_accum=args.grad_accum, max_steps=args.max_steps, epochs=args.epochs, seq_len=args.seq_len,
        seed=args.seed, gradient_checkpointing=args.gradient_checkpointing, resume=args.resume,
        overwrite=args.overwrite, num_virtual_tokens=args.num_virtual_tokens, bottleneck_size=args.bottleneck_size,
        warmup_steps=args.warmup_steps, save_steps=args.save_steps, device=args.device,
        progress=not args.no_progress, offload_activations=args.offload_activations,
        quantize_lm_head=args.quantize_lm_head, chunked_loss=not args.no_chunked_loss, distributed=args.distributed,
        packing=args.packing, sequence_chunk=args.sequence_chunk,
        eval_data=args.eval_data, eval_split=args.eval_split, eval_steps=args.eval_steps, save_best=args.save_best,
        report_to=args.report_to,
    )  # fmt: skip
    from fastpeft.app.distributed import launched
    from fastpeft.app.memory_cli import finetune_estimate

    main_rank = os.environ.get("RANK", "0") == "0"
    if launched() and args.distributed == "fsdp":
        # the memory model is of one process holding the whole model; FSDP2 divides what it shards
        estimate = "memory estimate: none under --distributed fsdp (the model covers one unsharded process)"
    else:
        estimate = finetune_estimate(cfg, args.memory_budget)  # refuses (ValueError) a run that would not fit
    if estimate and main_rank:
        print(estimate, flush=True)
    m = finetune(cfg, flags={"memory_budget": args.memory_budget})
    if not main_rank:
        return 0
    trainable, total = m["trainable_params"], m["total_params"]
    print(
        f"fastpeft finetune: {m['method']} on {m['device']}, {m['steps']} steps\n"
        f"  trainable params  {trainable:,d} of {total:,d} ({100 * trainable / max(total, 1):.3f}%)\n"
        f"  loss              {m['first_loss']:.4f} -> {m['final_loss']:.4f}\n"
        f"  peak memory       {m['peak_memory_bytes'] / 2**20:,.1f} MiB ({m['peak_memory_kind']})\n"
        f"  throughput        {m['tokens_per_second']:,.0f} tokens/s\n"
        f"  tokens            {m['tokens']:,d} real, {m['padded_tokens']:,d} padding "
        f"({100 * m['padding_fraction']:.1f}%, {'packed' if m['packed'] else 'padded batches'})\n"
        f"  written to        {Path(args.out).resolve()}"
    )
    if m["eval_loss"] is not None:
        print(f"  eval loss         {m['eval_loss']:.4f} over {m['eval_examples']:,d} examples "
              f"(lowest {m['best_eval_loss']:.4f} at step {m['best_step']})")  # fmt: skip
    if args.save_best and m["best_step"] is not None:
        print(f"  adapter           step {m['adapter_step']} (lowest eval loss); step {m['steps']}'s in "
              f"{(Path(args.out) / 'last').resolve()}")  # fmt: skip
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from fastpeft import loading
    from fastpeft.app.outputs import check_out_path, check_regular

    check_regular("--model", args.model, directory_files=True)
    out = check_out_path(args.out, [("--model", args.model)])
    skip = tuple(s.strip() for s in args.skip.split(",") if s.strip())
    with _holding(out, args.overwrite) as lock:
        model = loading.load_causal_lm(args.model, quantize=True, device=_device(args.device), skip=skip)

        def write(tmp: Path) -> None:
            loading.save_quantized(model, tmp, compute_dtype=_torch_dtype(args.compute_dtype), skip=skip)
            _copy_tokenizer(Path(args.model), tmp)

        _write_beside(out, lock, args.overwrite, write)
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
    from fastpeft.app.outputs import check_out_path, check_regular

    check_regular("--model", args.model, directory_files=True)
    check_regular("--adapter", args.adapter, directory_files=True)
    out = check_out_path(args.out, [("--model", args.model), ("--adapter", args.adapter)])
    with _holding(out, args.overwrite) as lock:
        onto = _merge(args, out, lock)
    print(f"fastpeft merge: adapter merged onto the {onto}, written to {out.resolve()}")
    return 0


def _merge(args: argparse.Namespace, out: Path, lock: OutLock) -> str:
    """Merge ``--adapter`` into ``--model`` and write the result to ``out``; returns which weights it went onto."""
    import torch

    from fastpeft import loading
    from fastpeft.gguf_file import read_gguf_info
    from fastpeft.peft import PeftModel

    adapter = Path(args.adapter)
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
        trained_on_nf4 = trained_on_nf4 or _json_object(train_cfg).get("method") in ("qlora", "qdora")
    if args.onto_original and prequantized:
        raise ValueError(f"--onto-original: {args.model} holds only the 4-bit weights, not the originals")
    quantize = trained_on_nf4 and not args.onto_original
    if args.dtype is not None:
        dtype = _torch_dtype(args.dtype)
    elif loading.is_gguf(args.model):  # a GGUF file's own storage type (bf16 for a block-quantized one)
        dtype = _torch_dtype(read_gguf_info(args.model).weight_dtype)
    else:
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = _torch_dtype(dtype) if isinstance(dtype, str) else dtype
    model = loading.load_causal_lm(args.model, quantize=quantize, device="cpu", dtype=dtype)
    # The adapter merges onto exactly the weights it was trained against: dequant(W) for QLoRA / QDoRA.
    loading.dequantize_model(model, dtype)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    if hasattr(merged.config, "quantization_config"):
        del merged.config.quantization_config

    def write(tmp: Path) -> None:
        merged.to(dtype).save_pretrained(str(tmp))
        _copy_tokenizer(Path(args.model), tmp)

    _write_beside(out, lock, args.overwrite, write)
    onto = "dequant(NF4) weights" if quantize else "original weights"
    return f"{onto}, in {str(dtype).removeprefix('torch.')}"


def cmd_bench(args: argparse.Namespace) -> int:
    from fastpeft.benchmarks.cli import run

    return run(args)


def cmd_memory(args: argparse.Namespace) -> int:
    from fastpeft.app.memory_cli import run

    return run(args)


_COMMANDS = ("finetune", "quantize", "merge", "bench", "memory")


class _Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM outside training: raised where the command is, so it unwinds (temporaries, locks)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _signals_unwind() -> Iterator[list[int]]:
    """While the command runs, SIGINT and SIGTERM raise ``_Stopped`` and are recorded in the list yielded (a library
    that turns the exception into an error of its own, in an import, is seen through); training installs its own
    handlers over these. A signal its starter set to be ignored or handled otherwise is left as it is."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    ours = [s for s, default in defaults.items() if signal.getsignal(s) is default]
    # An exception raised inside a finalizer (``__del__``, run by the garbage collector anywhere) is printed and
    # dropped by Python: a signal landing there is delivered again a moment later, from SIGALRM, where it can unwind.
    retry = signal.SIGALRM if signal.getsignal(signal.SIGALRM) is signal.SIG_DFL else None

    def handler(signum: int, frame: Any) -> None:
        if signum != retry:
            received.append(signum)
        if not received:
            return
        if retry is not None and _in_finalizer(frame):
            signal.setitimer(signal.ITIMER_REAL, 0.005)
            return
        raise _Stopped(received[0])

    for s in [*ours, *([retry] if retry is not None and ours else [])]:
        signal.signal(s, handler)
    try:
        yield received
    finally:
        if retry is not None and ours:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(retry, signal.SIG_DFL)
        for s in ours:
            signal.signal(s, defaults[s])


def _in_finalizer(frame: Any) -> bool:
    """Whether ``frame`` runs inside a ``__del__``, where a raised exception would be swallowed."""
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _stopped(command: str, e: BaseException, received: list[int]) -> int:
    """The one line and the exit status (128 + N) of a command a signal stopped."""
    prog = f"fastpeft {command}" if command else "fastpeft"
    run_control = sys.modules.get("fastpeft.app.run_control")  # not imported here: a second signal could land in it
    if run_control is not None and isinstance(e, run_control.TrainingInterrupted):
        print(
            f"{prog}: stopped by {signal.Signals(e.signum).name} after step {e.step}; "
            f"checkpoint in {e.checkpoint} (add --resume to continue)",
            file=sys.stderr,
        )
        return 128 + e.signum
    signum = received[0] if received else signal.SIGINT
    print(f"{prog}: stopped by {signal.Signals(signum).name}", file=sys.stderr)
    return 128 + signum


def _failed(command: str, e: BaseException) -> int:
    """The one line and the exit status of a command that failed on bad input or diverged; anything else raises."""
    run_control = sys.modules.get("fastpeft.app.run_control")
    if isinstance(e, (ValueError, OSError, ImportError)):  # OSError: missing files, a read-only or full disk, ...
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"fastpeft {command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if run_control is not None and isinstance(e, run_control.TrainingDiverged):
        print(f"fastpeft {command}: error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    raise e


class _SourceFormatter(logging.Formatter):
    """One line per record, under the name of the package that logged it: ``fastpeft: ...`` for fastpeft's own
    notices, ``bitsandbytes: ...`` or ``transformers: ...`` for a library's, so nobody reads theirs as ours."""

    def format(self, record: logging.LogRecord) -> str:
        source = record.name.split(".", 1)[0] if record.name != "root" else "warning"
        return f"{source}: {record.getMessage()}"


def _run(args: argparse.Namespace) -> int:
    handler = logging.StreamHandler()
    handler.setFormatter(_SourceFormatter())
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the run
        for name in ("fastpeft.app.train", "fastpeft.app.distributed"):
            logging.getLogger(name).setLevel(logging.INFO)  # the run-length estimate, method notices
    commands = {"finetune": cmd_finetune, "quantize": cmd_quantize, "merge": cmd_merge, "bench": cmd_bench,
                "memory": cmd_memory}  # fmt: skip
    return commands[args.command](args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fastpeft`` command line; returns the exit status (0 ok, 2 bad input or a failed write,
    3 training diverged, 128 + N stopped by signal N, from the start-up on)."""
    given = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in given if a in _COMMANDS), "")
    with _signals_unwind() as received:
        try:
            from fastpeft.app.run_config import parse_args

            args = parse_args(_parser(), given)  # the parser imports the commands' modules; finetune reads --config
            command = args.command
            return _run(args)
        except (KeyboardInterrupt, Exception) as e:
            if received or isinstance(e, KeyboardInterrupt):
                return _stopped(command, e, received)
            return _failed(command, e)


if __name__ == "__main__":
    sys.exit(main())
