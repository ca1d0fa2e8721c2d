"""Real tokens per CPU-second of ``fastpeft finetune``, packed against padded batches, on a GGUF model.

    python -m fastpeft.benchmarks.packing_cpu --model SmolLM2-135M-Instruct.Q4_1.gguf --out /tmp/packing

Writes a variable-length prompt/completion set (256 examples, seeded: prompts of 4-40 words, completions of
Pareto-distributed length, 12-300 words), then runs ``fastpeft finetune --method lora`` four times in one torch
thread: packing on and off, 2 and 10 steps each. The training cost is the difference of the 10-step and the
2-step run (user + system CPU time, loading included in both and so cancelled), divided by the difference of
their real (label) tokens: CPU time, unlike wall time, holds on a machine other jobs share.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
from pathlib import Path

_WORDS = ("the river carries glass dust from the two deserts toward the city where towers of copper and salt "
          "stand above canals; children throw stones at dusk while the dune oxen rest and the fog covers the "
          "mountain").split()


def write_data(path: Path, n: int = 256, seed: int = 7) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            prompt_words, words = rng.randint(4, 40), min(int(rng.paretovariate(1.2) * 12), 300)
            prompt = "Q: " + " ".join(rng.choice(_WORDS) for _ in range(prompt_words)) + "?\nA:"
            completion = " " + " ".join(rng.choice(_WORDS) for _ in range(words)) + "."
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")


def run(model: str, data: Path, out: Path, packing: str, steps: int) -> dict:
    """One ``fastpeft finetune`` in a child process; its metrics and the CPU-seconds it used."""
    argv = [sys.executable, "-m", "fastpeft", "finetune", "--model", model, "--data", str(data), "--method", "lora",
            "--lr", "1e-3", "--max-steps", str(steps), "--batch-size", "4", "--seq-len", "512", "--packing", packing,
            "--out", str(out), "--overwrite", "--no-progress"]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(argv, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["cpu_seconds"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return metrics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a GGUF file or checkpoint directory")
    p.add_argument("--out", required=True, help="scratch directory")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "variable.jsonl"
    write_data(data)
    print("| batches | real tokens / CPU-s | CPU-s per step | padding | real tokens per step |")
    print("|---|---|---|---|---|")
    for packing in ("on", "off"):
        short, long = (run(args.model, data, out / f"{packing}-{n}", packing, n) for n in (2, 10))
        tokens, cpu = long["tokens"] - short["tokens"], long["cpu_seconds"] - short["cpu_seconds"]
        steps = long["steps"] - short["steps"]
        print(f"| {'packed' if packing == 'on' else 'padded'} | {tokens / cpu:.1f} | {cpu / steps:.2f} | "
              f"{long['padding_fraction']:.1%} | {tokens / steps:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
