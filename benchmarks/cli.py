"""``fastpeft bench`` / ``python -m benchmarks``: is it faster, and by how much (against the alternatives, in one run).

Examples::

    fastpeft bench --budget 480 --out benchmarks/results/h100-2026-01-01   # the GPU window plan
    fastpeft bench --quick --out runs/bench                                # CPU: < 2 min, labelled
    fastpeft bench --ops qlora_linear --shapes 4096,4096 llama3-70b --m 1,16 --mode fwd
"""

from __future__ import annotations

import argparse
import datetime
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from .spec import M_VALUES, MODES, OPS, parse_ints, parse_shapes

__all__ = ["add_arguments", "main", "run"]

CPU_QUICK_BUDGET_S = 80.0
"""Measuring seconds of a CPU ``--quick`` run (the gate, estimates and outputs come on top: < 2 min)."""


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The suite's options (shared by ``fastpeft bench`` and ``python -m benchmarks``); each help states its default."""
    p.add_argument("--ops", default=", ".join(OPS), help="comma-separated subset of the ops")
    p.add_argument("--shapes", nargs="+", default="llama3-8b", help="llama3-8b, llama3-70b or N,K, several allowed")
    p.add_argument("--m", default=",".join(map(str, M_VALUES)), help="comma-separated token counts M")
    p.add_argument("--mode", default=",".join(MODES), help="fwd, fwd+bwd or both, comma-separated")
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16", help="activation dtype")
    p.add_argument("--providers", help="comma-separated subset of fastpeft, dense-bf16, reference, compiled, peft, "
                   "bnb (default: all; a provider's name selects its variants, fastpeft-nolora ...)")  # fmt: skip
    p.add_argument("--quick", action="store_true",
                   help="GPU: the DESIGN.md goal cases and one case per provider; CPU: small shapes in under 2 minutes "
                   f"(a {CPU_QUICK_BUDGET_S:.0f} s measuring budget unless --budget)")  # fmt: skip
    p.add_argument("--budget", type=float, help="seconds for the run: cases by value until the next would not fit "
                   f"(default: no limit on a GPU, {CPU_QUICK_BUDGET_S:.0f} s on the CPU)")  # fmt: skip
    p.add_argument("--out", type=Path, help="results folder (default: runs/bench/<gpu>-<date>)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="where to measure; cpu runs the CPU variant even where a GPU exists")  # fmt: skip
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--finetune-layers", type=int, default=4, help="Llama-3-8B blocks in the end-to-end step (of 32)")
    p.add_argument("--gate-json", type=Path, help="compile-gate records to read, from python -m "
                   "fastpeft.kernels._gate --json FILE (default: build them, cached)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"


def _spec(args: argparse.Namespace):
    import torch

    from .spec import Spec

    ops = tuple(o for o in args.ops.replace(" ", "").split(",") if o)
    unknown = sorted(set(ops) - set(OPS))
    if unknown or not ops:
        raise ValueError(f"--ops: unknown {unknown or 'empty'}; choose from {', '.join(OPS)}")
    modes = tuple(m for m in args.mode.replace(" ", "").split(",") if m)
    if not modes or set(modes) - set(MODES):
        raise ValueError(f"--mode: expected fwd, fwd+bwd or both, got {args.mode!r}")
    if args.budget is not None and args.budget <= 0:
        raise ValueError("--budget must be positive")
    providers = tuple(p for p in (args.providers or "").replace(" ", "").split(",") if p) or None
    shapes = [args.shapes] if isinstance(args.shapes, str) else args.shapes  # the default is one string
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible")
    return Spec(
        ops=ops, shapes=tuple(parse_shapes(shapes)), ms=parse_ints(args.m, "--m"), modes=modes,
        dtype=getattr(torch, args.dtype), device=device, quick=args.quick or device == "cpu",
        rank=args.rank, finetune_layers=args.finetune_layers, providers=providers,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Run the suite for parsed ``args``; prints the goal table and where the results are."""
    import warnings

    from . import report, suite

    # dynamo's notice about the reference's cached codebook helper, once per compiled case: noise here
    warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
    spec = _spec(args)
    budget = args.budget
    if budget is None and not spec.is_gpu:
        budget = CPU_QUICK_BUDGET_S
    date = datetime.date.today().isoformat()
    if args.out is None:
        import torch

        name = torch.cuda.get_device_name() if spec.is_gpu else "cpu"
        args.out = Path("runs") / "bench" / f"{_slug(name)}-{date}"
    if not spec.is_gpu:
        print("fastpeft bench: no GPU: small CPU cases (no speed claim) and GPU estimates from the cost model",
              file=sys.stderr)  # fmt: skip

    def log(line: str) -> None:
        print(f"fastpeft bench: {line}", file=sys.stderr)

    result = suite.run(spec, args.out, budget, args.gate_json, progress=not args.no_progress, log=log)
    print("\n".join(report._goal_table(result.goals)))
    skipped = result.manifest["plan"]["skipped"]
    measured, seconds = result.manifest["plan"]["measured"], result.manifest["elapsed_s"]
    print(f"\n{measured} cases measured, {len(skipped)} skipped ({seconds:.0f} s); "
          f"results in {args.out}/ (summary.md, results.csv, plots)")  # fmt: skip
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = add_arguments(argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0]))
    args = p.parse_args(argv)
    try:
        return run(args)
    except ValueError as e:
        print(f"fastpeft bench: error: {e}", file=sys.stderr)
        return 2
