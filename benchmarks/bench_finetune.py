"""End-to-end QLoRA training step: fastpeft vs transformers + PEFT + bitsandbytes, on one GPU.

Goal (DESIGN.md): on a Llama-3-8B-shaped model at seq 2048, >= 2x the tokens/s of transformers + PEFT +
bitsandbytes at <= 0.5x its peak memory. Both sides run the same recipe: NF4 base with double
quantization, LoRA r=16 (alpha 32) on every linear layer but the LM head, bf16 autocast, gradient
checkpointing (non-reentrant), AdamW on the fp32 adapter. The transformers side uses PEFT's own
``prepare_model_for_kbit_training`` (its documented QLoRA recipe).

The model is written locally with random weights (``--layers`` of Llama-3-8B's 32 to fit a smaller
budget); each provider runs in its own subprocess so peak memory (``torch.cuda.max_memory_allocated``,
loading included) is its own. Step time: median and p20/p80 of ``--steps`` timed steps after
``--warmup``. FLOPs counted: ``6 * P * T`` minus the frozen base's weight gradients, i.e. ``4 * P * T``
for the base (forward, recomputed forward, input gradients) plus ``4 * L * T^2 * H`` for attention
(forward and backward, causal half), with ``P`` the base's linear parameters and ``T`` tokens a step.

    python benchmarks/bench_finetune.py --layers 8 --out benchmarks/results/finetune.csv
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import matmul_peak, write_rows  # noqa: E402

LLAMA3_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
    rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
    bos_token_id=128000, eos_token_id=128001,
)  # fmt: skip
PROVIDERS = ("fastpeft", "hf_peft_bnb")


def write_random_llama(directory: Path, layers: int, device: str = "cuda") -> Path:
    """A Llama-3-8B-shaped checkpoint with ``layers`` blocks and random bf16 weights, one shard per block."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if (directory / "model.safetensors.index.json").is_file():
        cfg = json.loads((directory / "config.json").read_text())
        if cfg.get("num_hidden_layers") == layers:
            return directory
    directory.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(num_hidden_layers=layers, dtype="bfloat16", **LLAMA3_8B)
    config.save_pretrained(str(directory))
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
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


def _build(provider: str, model_dir: Path, r: int) -> torch.nn.Module:
    if provider == "fastpeft":
        from fastpeft.loading import load_causal_lm
        from fastpeft.peft import LoraConfig, get_peft_model

        base = load_causal_lm(model_dir, quantize=True, device="cuda", dtype=torch.bfloat16)
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
        model = get_peft_model(
            base, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", task_type="CAUSAL_LM")
        )
    else:
        import peft
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), quantization_config=q, dtype=torch.bfloat16,
                                                    device_map={"": 0})  # fmt: skip
        base = peft.prepare_model_for_kbit_training(
            base, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", task_type="CAUSAL_LM")
        model = peft.get_peft_model(base, cfg)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.config.use_cache = False
    return model.train()


def run_provider(provider: str, model_dir: Path, seq_len: int, batch: int, r: int, warmup: int, steps: int) -> dict:
    """Load, then time ``steps`` training steps; returns step times (ms) and the peak memory."""
    torch.cuda.reset_peak_memory_stats()
    model = _build(provider, model_dir, r)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    vocab = model.get_input_embeddings().num_embeddings
    times = []
    for i in range(warmup + steps):
        ids = torch.randint(0, vocab, (batch, seq_len), device="cuda", generator=g)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return {"times_ms": times, "peak_mem_bytes": torch.cuda.max_memory_allocated(), "loss": float(loss)}


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32, help="transformer blocks (Llama-3-8B has 32)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma-separated subset of {PROVIDERS}")
    p.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "fastpeft-bench-llama3-8b")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/finetune.csv"))
    p.add_argument("--worker", choices=PROVIDERS, help=argparse.SUPPRESS)  # one provider, result as JSON on stdout
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_finetune: needs a CUDA GPU", file=sys.stderr)
        return 1
    if args.worker:
        res = run_provider(args.worker, args.model_dir, args.seq_len, args.batch_size, args.r, args.warmup, args.steps)
        print("RESULT " + json.dumps(res))
        return 0

    write_random_llama(args.model_dir, args.layers)
    peak = matmul_peak(torch.bfloat16)
    rows, tok_s = [], {}
    tokens = args.batch_size * args.seq_len
    for provider in args.providers.split(","):
        cmd = [sys.executable, __file__, "--worker", provider, *[a for a in (argv or sys.argv[1:])]]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"{provider}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        res = json.loads(line[len("RESULT ") :])
        p50 = _quantile(res["times_ms"], 0.5)
        h, i = LLAMA3_8B["hidden_size"], LLAMA3_8B["intermediate_size"]
        kv = LLAMA3_8B["num_key_value_heads"] * h // LLAMA3_8B["num_attention_heads"]
        linear_params = args.layers * (2 * h * h + 2 * kv * h + 3 * h * i)  # the quantized projections
        flops = 4 * linear_params * tokens + 4 * args.layers * args.batch_size * args.seq_len**2 * h
        tflops = flops / (p50 * 1e-3) / 1e12
        tok_s[provider] = tokens / (p50 * 1e-3)
        rows.append({
            "op": "qlora_train_step", "provider": provider, "mode": "fwd+bwd+adamw",
            "shape": f"llama3-8b-L{args.layers} r{args.r} all-linear seq{args.seq_len}", "M": tokens,
            "dtype": "nf4+bf16", "p50_ms": f"{p50:.3f}", "p20_ms": f"{_quantile(res['times_ms'], 0.2):.3f}",
            "p80_ms": f"{_quantile(res['times_ms'], 0.8):.3f}", "tflops": f"{tflops:.2f}", "gbps": "",
            "frac_of_peak": f"{tflops / peak:.3f}", "peak_mem_bytes": res["peak_mem_bytes"],
        })  # fmt: skip
        gib = res["peak_mem_bytes"] / 2**30
        print(f"{provider:12s} {p50:9.1f} ms/step {tok_s[provider]:9.0f} tok/s peak {gib:6.2f} GiB")
    if not rows:
        return 1
    write_rows(args.out, rows)
    if len(tok_s) == 2:
        print(f"fastpeft / hf_peft_bnb tokens/s: {tok_s['fastpeft'] / tok_s['hf_peft_bnb']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
