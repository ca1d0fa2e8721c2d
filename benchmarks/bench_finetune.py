"""End-to-end QLoRA training step: fastpeft against transformers + PEFT + bitsandbytes.

Op ``finetune_step``. Goal (DESIGN.md): on a Llama-3-8B-shaped model at seq 2048, >= 2.5x the tokens/s of
transformers + PEFT + bitsandbytes at <= 0.3x its peak memory. Both sides run the same recipe: NF4 base
with double quantization, LoRA r=16 (alpha 32) on every linear layer but the LM head, bf16 autocast,
gradient checkpointing (non-reentrant), AdamW on the fp32 adapter. The ``bnb`` side uses PEFT's own
``prepare_model_for_kbit_training`` (its documented QLoRA recipe).

The model is written locally with random weights, ``Spec.finetune_layers`` of Llama-3-8B's 32 blocks (the
full vocabulary and widths, so every layer's shape is the real one); each provider runs in its own
subprocess (``--worker``) so that its peak memory (``torch.cuda.max_memory_allocated``, loading
included) is its own. Step time: median and p20 / p80 of the timed steps after the warm-up. FLOPs
counted: ``4·P·T`` for the frozen base (forward, recomputed forward, input gradients) plus
``4·L·T²·H`` for attention, with ``P`` the base's linear parameters and ``T`` the tokens of a step.

Without a GPU the same steps run on a tiny Llama (``TINY_LLAMA``) in float32 on the CPU, in this process:
the rows show that each provider trains, not how fast, and carry no peak memory.

**The CPU recipe** (``--cpu-recipe MODEL``, a checkpoint directory or GGUF file, e.g. SmolLM2-135M) times
the CPU path of LoRA training against transformers + HF PEFT (provider ``peft``) on one recipe: r=8,
alpha=16, all-linear, float32, AdamW lr 2e-4, batch 2, seq 64, warmup + cosine, clip 1.0, seed 0, the same
token batches. Both load the base through ``fastpeft.loading`` (same weights, same transformers model
class); each run is a subprocess of its own, pairs run interleaved (order alternating). Reported: tokens/s
of each run (timed steps after the first two) and per CPU second (process time: what a busy machine
disturbs least, with ``--threads 1`` no spin-waiting either), the median fastpeft / peft ratios over the
pairs, peak RSS, and the largest difference between the two loss curves::

    python -m benchmarks.bench_finetune --cpu-recipe path/to/SmolLM2-135M-Instruct.Q4_1.gguf --pairs 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .core import Case, Peaks
from .spec import Spec

__all__ = ["LLAMA3_8B", "OPS", "PROVIDERS", "TINY_LLAMA", "cases", "components", "write_random_llama"]

OPS = ("finetune_step",)
PROVIDERS = ("fastpeft", "bnb")
_FAMILY = {"fastpeft": "transformers", "bnb": "bitsandbytes+peft+transformers"}
LLAMA3_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
    rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
    bos_token_id=128000, eos_token_id=128001,
)  # fmt: skip
TINY_LLAMA = dict(LLAMA3_8B, vocab_size=1024, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2)  # fmt: skip
_WORKER_TIMEOUT_S = 900


def write_random_llama(directory: Path, layers: int, config: dict | None = None, device: str = "cpu") -> Path:
    """A Llama checkpoint (``config``, default Llama-3-8B's) with ``layers`` blocks of random weights, one
    shard per block; an existing one with the same config is reused."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config = dict(config or LLAMA3_8B, num_hidden_layers=layers)
    if (directory / "model.safetensors.index.json").is_file():
        old = json.loads((directory / "config.json").read_text())
        if all(old.get(k) == v for k, v in config.items()):
            return directory
    directory.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(dtype="bfloat16", **config)
    cfg.save_pretrained(str(directory))
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=device) * 0.02).to(torch.bfloat16).cpu()

    weight_map: dict[str, str] = {}

    def shard(name: str, tensors: dict[str, torch.Tensor]) -> None:
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))

    shard("embed.safetensors", {"model.embed_tokens.weight": rand(v, h)})
    for layer in range(layers):
        p = f"model.layers.{layer}"
        shard(f"layer-{layer:03d}.safetensors", {
            f"{p}.self_attn.q_proj.weight": rand(h, h), f"{p}.self_attn.k_proj.weight": rand(kv, h),
            f"{p}.self_attn.v_proj.weight": rand(kv, h), f"{p}.self_attn.o_proj.weight": rand(h, h),
            f"{p}.mlp.gate_proj.weight": rand(i, h), f"{p}.mlp.up_proj.weight": rand(i, h),
            f"{p}.mlp.down_proj.weight": rand(h, i),
            f"{p}.input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            f"{p}.post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        })  # fmt: skip
    shard("head.safetensors", {"model.norm.weight": torch.ones(h, dtype=torch.bfloat16), "lm_head.weight": rand(v, h)})
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return directory


def _build(provider: str, model_dir: Path, r: int, device: str) -> torch.nn.Module:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if provider == "fastpeft":
        from fastpeft.loading import load_causal_lm
        from fastpeft.peft import LoraConfig, get_peft_model

        base = load_causal_lm(model_dir, quantize=True, device=device, dtype=dtype)
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
        model = get_peft_model(
            base, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", task_type="CAUSAL_LM")
        )
    elif provider == "bnb":
        import peft
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)  # fmt: skip
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), quantization_config=q, dtype=dtype,
                                                    device_map={"": 0 if device == "cuda" else "cpu"})  # fmt: skip
        base = peft.prepare_model_for_kbit_training(
            base, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", task_type="CAUSAL_LM")
        model = peft.get_peft_model(base, cfg)
    else:
        raise ValueError(f"finetune_step: unknown provider {provider!r}")
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.config.use_cache = False
    return model.train()


def run_provider(
    provider: str, model_dir: Path, seq_len: int, batch: int, r: int, warmup: int, steps: int, device: str
) -> dict:
    """Load, then time ``steps`` training steps; returns step times (ms) and the peak memory."""
    gpu = device == "cuda"
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    model = _build(provider, model_dir, r, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=gpu)
    g = torch.Generator(device=device).manual_seed(0)
    vocab = model.get_input_embeddings().num_embeddings
    times = []
    for i in range(warmup + steps):
        ids = torch.randint(0, vocab, (batch, seq_len), device=device, generator=g)
        if gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=gpu):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if gpu:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated() if gpu else None
    return {"times_ms": times, "peak_mem_bytes": peak, "loss": float(loss.detach())}


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def _config(spec: Spec) -> dict:
    return LLAMA3_8B if spec.is_gpu else TINY_LLAMA


def _flops(config: dict, layers: int, tokens: int, seq: int, batch: int) -> float:
    h, i = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    linear_params = layers * (2 * h * h + 2 * kv * h + 3 * h * i)  # the quantized projections
    return 4.0 * linear_params * tokens + 4.0 * layers * batch * seq**2 * h


def _worker(case: Case, spec: Spec, model_dir: Path, warmup: int, steps: int) -> dict:
    """One provider's steps in a subprocess of its own (its own peak memory, loading included)."""
    import importlib.util

    package = "fastpeft.benchmarks" if importlib.util.find_spec("fastpeft.benchmarks") else __package__
    cmd = [sys.executable, "-m", f"{package}.bench_finetune", "--worker", case.provider, "--model-dir",
           str(model_dir), "--seq-len", str(spec.finetune_seq), "--r", str(spec.rank), "--warmup", str(warmup),
           "--steps", str(steps), "--device", spec.device]  # fmt: skip
    env = dict(os.environ)
    if package != "fastpeft.benchmarks":  # a checkout's benchmarks/, importable from its parent
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    # run outside the checkout: its kernels/ folder would shadow the PyPI package bitsandbytes probes for
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir(),
                          timeout=case.timeout_s or _WORKER_TIMEOUT_S)  # fmt: skip
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"worker exited {proc.returncode}: {tail[:300]}")
    return json.loads(line[len("RESULT ") :])


def _measure(case: Case, peaks: Peaks, spec: Spec) -> dict[str, object]:
    from .core import LABEL_CPU, LABEL_MEASURED

    gpu = spec.is_gpu
    model_dir = Path(tempfile.gettempdir()) / f"fastpeft-bench-llama-{'8b' if gpu else 'tiny'}"
    write_random_llama(model_dir, spec.finetune_layers, _config(spec), device="cuda" if gpu else "cpu")
    if gpu:
        warmup, steps = 3, 10
        res = _worker(case, spec, model_dir, warmup, steps)
    else:  # in this process: the CPU rows only show that each provider trains
        warmup, steps = 1, 2
        res = run_provider(case.provider, model_dir, spec.finetune_seq, 1, spec.rank, warmup, steps, "cpu")
        res["peak_mem_bytes"] = ""
    p50 = _quantile(res["times_ms"], 0.5)
    tflops = case.flops / (p50 * 1e-3) / 1e12
    return {
        "op": case.op, "provider": case.provider, "mode": case.mode, "shape": case.shape, "M": case.m,
        "dtype": case.dtype, "p50_ms": p50, "p20_ms": _quantile(res["times_ms"], 0.2),
        "p80_ms": _quantile(res["times_ms"], 0.8), "tflops": tflops, "gbps": "", "frac_of_peak": tflops / peaks.tflops,
        "peak_mem_bytes": res["peak_mem_bytes"], "label": LABEL_MEASURED if gpu else LABEL_CPU,
        "note": f"{steps} steps after {warmup} warm-up, loss {res['loss']:.3f}",
    }  # fmt: skip


def components(case: Case, spec: Spec) -> None:
    """No cost model for a whole training step."""
    return None


def cases(spec: Spec) -> list[Case]:
    if "finetune_step" not in spec.ops:
        return []
    config, layers, seq = _config(spec), spec.finetune_layers, spec.finetune_seq
    name = "llama3-8b" if spec.is_gpu else "tiny-llama"
    shape = f"{name} L{layers} r{spec.rank} all-linear seq{seq}"
    out = []
    for provider in PROVIDERS:
        if not spec.wants(provider):
            continue
        dtype = "nf4+bf16" if spec.is_gpu else "nf4+fp32"
        case = Case("finetune_step", provider, "fwd+bwd+adamw", shape, seq, dtype, _flops(config, layers, seq, seq, 1),
                    0.0, family=_FAMILY[provider])  # fmt: skip
        case.measure_fn = lambda case, peaks: _measure(case, peaks, spec)
        case.cost_s, case.warm_key, case.warm_cost_s = (
            (45.0, "finetune:model", 30.0) if spec.is_gpu else (8.0, "finetune:model", 5.0)
        )
        out.append(case)
    return out


RECIPE_PROVIDERS = ("fastpeft", "peft")


def run_recipe(provider: str, model: str, steps: int = 12, batch: int = 2, seq: int = 64, threads: int = 0) -> dict:
    """The CPU recipe (module doc) for one provider; returns step times (s), losses and peak RSS (bytes)."""
    import resource

    from fastpeft.loading import load_causal_lm

    if threads:
        torch.set_num_threads(threads)
    base = load_causal_lm(model, dtype=torch.float32)
    base.config.use_cache = False
    torch.manual_seed(0)  # the adapter's initialization: both libraries draw A the same way
    if provider == "fastpeft":
        from fastpeft.peft import LoraConfig, get_peft_model

        model_ = get_peft_model(
            base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
        )
    elif provider == "peft":
        import peft

        cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
        model_ = peft.get_peft_model(base, cfg)
    else:
        raise ValueError(f"cpu recipe: unknown provider {provider!r} (choose from {RECIPE_PROVIDERS})")
    model_.train()
    params = [p for p in model_.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: (i + 1) / warm if i < warm else 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, steps - warm)))
    )
    vocab = base.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (steps, batch, seq), generator=torch.Generator().manual_seed(0))
    times, cpu, losses = [], [], []
    for i in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = model_(input_ids=ids[i], labels=ids[i]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"times_s": times, "cpu_s": cpu, "losses": losses, "peak_rss_bytes": rss, "threads": torch.get_num_threads()}


def _recipe_worker(provider: str, model: str, steps: int, threads: int) -> dict:
    import importlib.util

    package = "fastpeft.benchmarks" if importlib.util.find_spec("fastpeft.benchmarks") else __package__
    cmd = [sys.executable, "-m", f"{package}.bench_finetune", "--recipe-worker", provider, "--cpu-recipe",
           str(Path(model).resolve()), "--steps", str(steps), "--threads", str(threads)]  # fmt: skip
    env = dict(os.environ)
    if package != "fastpeft.benchmarks":
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir(),
                          timeout=_WORKER_TIMEOUT_S * 4)  # fmt: skip
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{provider} worker exited {proc.returncode}: {tail[:300]}")
    return json.loads(line[len("RESULT ") :])


def compare_cpu(model: str, pairs: int, steps: int = 12, threads: int = 0, timed_from: int = 2) -> dict:
    """Interleaved pairs of the CPU recipe; prints each run and returns the summary."""
    runs: dict[str, list[dict]] = {p: [] for p in RECIPE_PROVIDERS}
    ratios, cpu_ratios = [], []
    for i in range(pairs):
        order = RECIPE_PROVIDERS if i % 2 == 0 else RECIPE_PROVIDERS[::-1]
        tok_s, tok_cpu_s = {}, {}
        for provider in order:
            res = _recipe_worker(provider, model, steps, threads)
            timed, cpu = res["times_s"][timed_from:], res["cpu_s"][timed_from:]
            tok_s[provider] = 2 * 64 * len(timed) / sum(timed)
            # tokens per CPU-second: what a busy machine disturbs least (one thread: no spin-waiting either)
            tok_cpu_s[provider] = 2 * 64 * len(cpu) / sum(cpu)
            res["tokens_per_s"] = tok_s[provider]
            runs[provider].append(res)
            print(f"pair {i + 1} {provider:9s} {tok_s[provider]:8.1f} tokens/s ({tok_cpu_s[provider]:.1f} per CPU "
                  f"second)  median step {_quantile(timed, 0.5):.3f} s  peak RSS "
                  f"{res['peak_rss_bytes'] / 2**20:.0f} MiB  threads {res['threads']}", flush=True)  # fmt: skip
        ratios.append(tok_s["fastpeft"] / tok_s["peft"])
        cpu_ratios.append(tok_cpu_s["fastpeft"] / tok_cpu_s["peft"])
    curve = max(abs(a - b) for a, b in zip(runs["fastpeft"][0]["losses"], runs["peft"][0]["losses"], strict=True))
    rss = _quantile([r["peak_rss_bytes"] for r in runs["fastpeft"]], 0.5) / _quantile(
        [r["peak_rss_bytes"] for r in runs["peft"]], 0.5
    )
    summary = {"ratio_median": _quantile(ratios, 0.5), "ratios": ratios, "cpu_ratio_median": _quantile(cpu_ratios, 0.5),
               "cpu_ratios": cpu_ratios, "peak_rss_ratio": rss, "loss_max_diff": curve}  # fmt: skip
    print(f"fastpeft / peft tokens/s: median {summary['ratio_median']:.3f} over {pairs} pairs "
          f"({', '.join(f'{r:.3f}' for r in ratios)}); per CPU second: median {summary['cpu_ratio_median']:.3f} "
          f"({', '.join(f'{r:.3f}' for r in cpu_ratios)}); peak RSS ratio {rss:.2f}; loss curves differ by at most "
          f"{curve:.1e}")  # fmt: skip
    return summary


def main(argv: list[str] | None = None) -> int:
    """The worker: one provider's training steps, the result as one JSON line on stdout; or the CPU recipe."""
    if argv is None:
        argv = sys.argv[1:]
    if "--cpu-recipe" in argv:
        p = argparse.ArgumentParser(description="the CPU LoRA recipe: fastpeft against transformers + HF PEFT")
        p.add_argument("--cpu-recipe", required=True, metavar="MODEL", help="checkpoint directory or GGUF file")
        p.add_argument("--pairs", type=int, default=3, help="interleaved fastpeft / peft pairs")
        p.add_argument("--steps", type=int, default=12, help="training steps a run (the first two untimed)")
        p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
        p.add_argument("--recipe-worker", choices=RECIPE_PROVIDERS, help=argparse.SUPPRESS)
        args = p.parse_args(argv)
        if args.recipe_worker:
            res = run_recipe(args.recipe_worker, args.cpu_recipe, args.steps, threads=args.threads)
            print("RESULT " + json.dumps(res))
        else:
            compare_cpu(args.cpu_recipe, args.pairs, args.steps, args.threads)
        return 0
    p = argparse.ArgumentParser(description="one provider's timed QLoRA training steps (a fastpeft bench worker)")
    p.add_argument("--worker", choices=PROVIDERS, required=True)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = p.parse_args(argv)
    res = run_provider(args.worker, args.model_dir, args.seq_len, args.batch_size, args.r, args.warmup, args.steps,
                       args.device)  # fmt: skip
    print("RESULT " + json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
