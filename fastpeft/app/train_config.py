"""What ``fastpeft finetune`` is asked to do: ``TrainConfig`` (one field per flag), its checks, and what the
run resolves from it before anything is loaded (device, method, savers, learning rate, the PEFT config), with
the embedded demo's base model.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from fastpeft import loading

__all__ = [
    "METHODS",
    "TrainConfig",
    "build_embedded_model",
    "check_numbers",
    "default_lr",
    "embedded_config",
    "peft_config",
    "resolve_device",
    "resolve_method",
    "resolve_savers",
]

log = logging.getLogger("fastpeft.app.train")  # the run's notices, under the logger the command line shows

METHODS = ("lora", "qlora", "dora", "qdora", "adapter", "prefix", "prompt")
LORA_METHODS = ("lora", "qlora", "dora", "qdora")  # LoraConfig; dora / qdora with use_dora=True
NF4_METHODS = ("qlora", "qdora")  # on an NF4-quantized base
# Fields a resumed run must share with the checkpoint (the others, e.g. max_steps, may change).
RESUME_FIELDS = (
    "packing",
    "model",
    "data",
    "method",
    "r",
    "alpha",
    "dropout",
    "target_modules",
    "lr",
    "batch_size",
    "grad_accum",
    "seq_len",
    "seed",
    "num_virtual_tokens",
    "bottleneck_size",
    "warmup_steps",
    "eval_data",  # the eval history continues only on the same eval set
    "eval_split",  # the split decides the training examples
)


@dataclass
class TrainConfig:
    """Everything ``finetune`` needs; the CLI flags map one to one (``--grad-accum`` -> ``grad_accum``).

    ``model`` / ``data`` None use the embedded tiny Llama / the built-in corpus. ``method`` None picks
    ``qlora`` on a GPU and ``lora`` on the CPU; ``max_steps`` None trains ``epochs`` epochs (the
    embedded demo defaults to 60 steps). ``lr`` None takes ``default_lr``. ``distributed`` (``ddp`` or
    ``fsdp``) applies under ``torchrun`` with several processes, where ``ddp`` is the default;
    ``batch_size`` is then per process.
    """

    out: str = "fastpeft-out"
    model: str | None = None
    data: str | None = None
    method: str | None = None
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str = "all-linear"
    lr: float | None = None
    batch_size: int = 4
    grad_accum: int = 1
    max_steps: int | None = None
    epochs: float = 1.0
    seq_len: int = 512
    seed: int = 0
    gradient_checkpointing: bool | None = None
    resume: bool = False
    overwrite: bool = False
    num_virtual_tokens: int = 8
    bottleneck_size: int = 16
    warmup_steps: int | None = None
    save_steps: int = 50
    device: str | None = None
    progress: bool = True
    offload_activations: bool = False
    quantize_lm_head: bool = False
    chunked_loss: bool = True
    sequence_chunk: int = 0  # tokens per slice of the MLP / RMSNorms (fastpeft.app.seq_chunks); 0: off
    distributed: str | None = None
    packing: str = "auto"
    # evaluation (fastpeft.app.evaluate) and curves (fastpeft.app.curves)
    eval_data: str | None = None
    eval_split: float | None = None
    eval_steps: int | None = None
    save_best: bool = False
    report_to: str = "none"


def default_lr(method: str, embedded: bool) -> float:
    """The peak learning rate when none is given: 1e-2 for the embedded demo (a tiny random base),
    else 2e-4 for LoRA / QLoRA / DoRA / QDoRA / adapters and 1e-2 for prefix and prompt tuning (their usual ranges)."""
    if embedded:
        return 1e-2
    return 1e-2 if method in ("prefix", "prompt") else 2e-4


def resolve_device(device: str | None) -> torch.device:
    """``device`` as given, else the GPU when there is one, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a torch device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is available")
    return dev


def resolve_method(cfg: TrainConfig, device: torch.device) -> str:
    """``cfg.method``, else qlora on a GPU and lora on the CPU; LoRA (DoRA) on an NF4 checkpoint is QLoRA (QDoRA)."""
    method = cfg.method or ("qlora" if device.type == "cuda" else "lora")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
    if method in ("lora", "dora") and cfg.model is not None and loading.is_prequantized(loading.load_config(cfg.model)):
        log.info("%s holds NF4 weights: --method %s on it is q%s", cfg.model, method, method)
        method = "q" + method
    return method


def resolve_savers(cfg: TrainConfig, method: str, device: torch.device) -> TrainConfig:
    """``cfg`` with checkpointing decided (default: on for QLoRA on a GPU, and whenever activations are
    offloaded); the saver flags checked against the method and the device."""
    if cfg.quantize_lm_head and method not in NF4_METHODS:
        raise ValueError("--quantize-lm-head applies to qlora and qdora only")
    if cfg.offload_activations:
        if device.type != "cuda":
            raise ValueError("--offload-activations moves activations off a GPU; on the CPU they are in host memory")
        if cfg.gradient_checkpointing is False:
            raise ValueError("--offload-activations offloads what checkpointing keeps: it needs checkpointing on")
    if cfg.sequence_chunk < 0:
        raise ValueError(f"--sequence-chunk must be at least 1 token (0: off), got {cfg.sequence_chunk}")
    checkpointing = cfg.gradient_checkpointing
    if checkpointing is None:
        checkpointing = cfg.offload_activations or (method in NF4_METHODS and device.type == "cuda")
    return replace(cfg, gradient_checkpointing=checkpointing)


def embedded_config(vocab_size: int) -> Any:
    """The demo base model's transformers config (see ``build_embedded_model``)."""
    transformers = loading.require_transformers()
    return transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        initializer_range=0.2,
    )


def build_embedded_model(seed: int, device: torch.device, dtype: torch.dtype, vocab_size: int) -> nn.Module:
    """A small Llama (2 layers, width 64) with seeded random weights: the demo's base model."""
    transformers = loading.require_transformers()
    config = embedded_config(vocab_size)
    # initializer_range 0.2 (not 0.02): with width 64 a 0.02 LM head caps the logits near +-1.3, so no
    # adapter could lower the loss much below log(vocab); at 0.2 the base behaves like a trained model's scale.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config)
    return model.to(device=device, dtype=dtype).eval()


def peft_config(cfg: TrainConfig, method: str) -> Any:
    from fastpeft.peft import AdapterConfig, LoraConfig, PrefixTuningConfig, PromptTuningConfig

    if method in LORA_METHODS:
        targets: str | list[str] = cfg.target_modules
        if targets != "all-linear":
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        kw = {"lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "use_dora": method in ("dora", "qdora")}
        return LoraConfig(r=cfg.r, target_modules=targets, task_type="CAUSAL_LM", **kw)
    if method == "adapter":
        return AdapterConfig(bottleneck_size=cfg.bottleneck_size, task_type="CAUSAL_LM")
    if method == "prefix":
        return PrefixTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, task_type="CAUSAL_LM")
    return PromptTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, task_type="CAUSAL_LM")


def check_numbers(cfg: TrainConfig) -> None:
    """Flags a float or a big int could break: named, before anything is loaded."""
    for flag, value in (("--lr", cfg.lr), ("--epochs", cfg.epochs)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag} must be a positive finite number, got {value}")
    if not math.isfinite(cfg.alpha):
        raise ValueError(f"--alpha must be a finite number, got {cfg.alpha}")
    if not 0 <= cfg.dropout < 1:
        raise ValueError(f"--dropout must be in [0, 1), got {cfg.dropout}")
    if not 0 <= cfg.seed < 2**63:
        raise ValueError(f"--seed must be in [0, 2**63), got {cfg.seed}")
    if cfg.warmup_steps is not None and cfg.warmup_steps < 0:
        raise ValueError(f"--warmup-steps must be at least 0, got {cfg.warmup_steps}")
