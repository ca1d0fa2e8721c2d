"""GPU memory of a fine-tuning step, estimated without a GPU: ``fastpeft memory``.

``estimate(config, MemoryOptions(...))`` builds the model on fake tensors (no weights, no GPU; see
``fastpeft.app.memory_trace``) exactly as ``fastpeft finetune`` sets it up — NF4 base for QLoRA, the PEFT
injection, float32 adapters, the savers of ``fastpeft.app.savers`` — and runs one steady-state training step
(forward, backward, gradient clipping, AdamW step, with the optimizer state already created) under
PyTorch's ``MemTracker``. The peak comes back by category: NF4 base, dense layers, adapters, gradients,
optimizer state, activations, temporaries, the dequantize-once scratch and DoRA's cached base row norms.

DoRA / QDoRA (``use_dora``) are traced through their real layers: the magnitude vectors ``m [out]`` are
adapters (float32, with gradients and AdamW state), and each layer's ``‖W_n‖²`` (float32 ``[out]``, made
once and kept between steps) is made before the trace and held through it (``dora_norms``). What the
forward saves for the backward (``f ⊙ lora_linear(x)``: the op's output, ``f``, the detached norm) and the
norm's rank-sized temporaries are traced like any other op.

The scratch is the one allocation the trace cannot see: the fused QLoRA kernels dequantize a weight
into one module-level 16-bit buffer shared by every layer (inside the kernel launch). It is counted
analytically as the largest NF4 layer's 16-bit weight, once, never once per layer.

``estimate_peer`` traces the same step for transformers + HF peft (+ bitsandbytes 4-bit for QLoRA and QDoRA,
whose ops have fake implementations; DoRA as peft's ``LoraConfig(use_dora=True)``, see ``_peer_dora_4bit``), set
up as peft documents QLoRA: ``prepare_model_for_kbit_training`` (which casts every non-quantized weight to
float32) and LoRA on all linear layers, with the same checkpointing, batch and sequence. ``longest_sequence``
finds the longest sequence whose estimate fits a memory size (the peak is linear in the sequence length: secant
steps, then bisection).

These are estimates: allocator fragmentation, the CUDA context, cuBLAS workspaces and what a kernel
allocates inside itself are not in them.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastpeft.app import memory_trace as mt
from fastpeft.app.savers import causal_lm_loss, enable_checkpointing, lm_head_skip
from fastpeft.app.seq_chunks import enable_sequence_chunks
from fastpeft.ops.linear_cross_entropy import trace_repeated_chunks_once

__all__ = [
    "CATEGORIES",
    "SHAPES",
    "MemoryEstimate",
    "MemoryOptions",
    "estimate",
    "estimate_peer",
    "format_bytes",
    "format_report",
    "longest_sequence",
    "max_seq_len",
    "model_config",
    "parse_size",
]

GiB = 1 << 30
METHODS = ("lora", "qlora", "dora", "qdora", "adapter")
NF4_METHODS = ("qlora", "qdora")  # on an NF4 base
DORA_METHODS = ("dora", "qdora")  # LoRA with DoRA's magnitude vectors (use_dora=True)
PEER = "transformers + peft + bitsandbytes"
PEER_METHODS = ("lora", "qlora", "dora", "qdora")

# Category -> label, in the order the table prints them.
CATEGORIES = {
    "nf4_base": "NF4 base",
    "dense_layers": "dense layers (embeddings, head, norms)",
    "adapters": "adapters (trainable)",
    "gradients": "gradients",
    "optimizer_state": "optimizer state (AdamW)",
    "activations": "activations",
    "temporaries": "temporaries (backward)",
    "dequant_scratch": "dequantize scratch (1 layer, 16-bit)",
    "dora_norms": "DoRA base row norms ‖W‖² (float32)",
}

_LLAMA = dict(model_type="llama", hidden_act="silu", rms_norm_eps=1e-5, rope_theta=500000.0)
# Public architecture sizes (each model's config.json); no weights are involved.
SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(_LLAMA, vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "llama3-70b": dict(_LLAMA, vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False),
    "llama3.2-1b": dict(_LLAMA, vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "llama3.2-3b": dict(_LLAMA, vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                        num_attention_heads=24, num_key_value_heads=8, tie_word_embeddings=True),
    "mistral-7b": dict(model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
    "smollm2-135m": dict(_LLAMA, vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
}  # fmt: skip
# Their context lengths (max_position_embeddings in the same files): the longest --seq-len each takes.
_CONTEXT = {"llama3-8b": 8192, "llama3-70b": 8192, "llama3.2-1b": 131072, "llama3.2-3b": 131072, "mistral-7b": 32768,
            "qwen2.5-7b": 131072, "smollm2-135m": 8192}  # fmt: skip
for _name, _positions in _CONTEXT.items():
    SHAPES[_name]["max_position_embeddings"] = _positions


@dataclass
class MemoryOptions:
    """One training step to estimate; the fields mirror ``fastpeft finetune``'s flags.

    ``checkpointing`` None means the finetune default: on for QLoRA / QDoRA on a GPU. ``device`` is what the
    estimate stands for: ``"cuda"`` (bf16 weights under bf16 autocast, fused AdamW, the NF4 scratch) or
    ``"cpu"`` (float32, as ``finetune`` runs there). ``beyond_max_positions`` lets ``seq_len`` pass the model's
    ``max_position_embeddings``. ``sequence_chunk`` > 0: the decoder layers' MLP and RMSNorms run over
    slices of that many tokens (``fastpeft.app.seq_chunks``).
    """

    method: str = "qlora"
    r: int = 16
    target_modules: str = "all-linear"
    seq_len: int = 2048
    batch_size: int = 1
    checkpointing: bool | None = None
    offload_activations: bool = False
    chunked_loss: bool = True
    quantize_lm_head: bool = False
    bottleneck_size: int = 16
    device: str = "cuda"
    beyond_max_positions: bool = False
    sequence_chunk: int = 0

    def resolved_checkpointing(self) -> bool:
        if self.checkpointing is None:
            return self.offload_activations or (self.method in NF4_METHODS and self.device == "cuda")
        return self.checkpointing


@dataclass
class MemoryEstimate:
    """The peak of one traced step: ``peak_bytes`` = the sum of ``categories`` (bytes, keys of ``CATEGORIES``)."""

    who: str
    peak_bytes: int
    categories: dict[str, int]
    host_bytes: int = 0
    notes: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- inputs ---------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """``"24GiB"``, ``"80GB"``, ``"24G"`` (binary), ``"512MiB"``, ``"1.5TiB"`` or plain bytes -> bytes."""
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)([KMGT]?)(I?B?)", text.strip().upper().replace(" ", ""))
    if m is None or (m.group(3) == "IB" and not m.group(2)):
        raise ValueError(f"unreadable size {text!r} (examples: 24GiB, 80GB, 512MiB)")
    number, prefix, unit = m.groups()
    base = 1000 if unit == "B" and prefix else 1024  # "80GB" is decimal; "80GiB" and "80G" are binary
    return int(float(number) * base ** " KMGT".index(prefix or " "))


def format_bytes(n: int) -> str:
    return f"{n / GiB:,.2f} GiB" if n >= GiB // 4 else f"{n / 2**20:,.1f} MiB"


def model_config(shape_or_path: str) -> Any:
    """A transformers config: a named shape (``SHAPES``), a model directory, a ``config.json`` or a GGUF file."""
    from fastpeft.loading import is_gguf, load_config, require_transformers

    transformers = require_transformers()
    if shape_or_path in SHAPES:
        kwargs = dict(SHAPES[shape_or_path])
        return transformers.AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    path = Path(shape_or_path)
    if path.is_file() and is_gguf(path):
        config = load_config(path)  # what finetune takes as --model takes here too
    elif path.is_file():
        if path.name != "config.json":
            raise ValueError(f"{path}: expected a config.json, a model directory or a GGUF file")
        config = load_config(path.parent)
    elif path.is_dir():
        config = load_config(path)
    else:
        raise ValueError(f"{shape_or_path!r} is neither a known shape ({', '.join(SHAPES)}) nor a config path")
    if hasattr(config, "quantization_config"):  # a 4-bit checkpoint: the architecture is what counts
        config = type(config).from_dict({k: v for k, v in config.to_dict().items() if k != "quantization_config"})
    return config


def _check(opts: MemoryOptions) -> None:
    if opts.method not in METHODS:
        raise ValueError(f"the memory model covers {', '.join(METHODS)}, not {opts.method!r}")
    for name in ("r", "seq_len", "batch_size", "bottleneck_size"):
        if getattr(opts, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(opts, name)}")
    if opts.device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {opts.device!r}")
    if opts.quantize_lm_head and opts.method not in NF4_METHODS:
        raise ValueError("--quantize-lm-head applies to qlora and qdora only")
    if opts.offload_activations and opts.checkpointing is False:
        raise ValueError("--offload-activations offloads what checkpointing keeps: it needs checkpointing on")
    if opts.sequence_chunk < 0:
        raise ValueError(f"--sequence-chunk must be at least 1 token (0: off), got {opts.sequence_chunk}")


# The most bytes one traced step may address (the sizes are int64 in torch; no GPU comes near).
_MAX_STEP_BYTES = 1 << 62


def max_seq_len(config: Any, opts: MemoryOptions) -> int:
    """The longest ``seq_len`` the model takes: its ``max_position_embeddings`` (unless
    ``opts.beyond_max_positions``), and in any case what keeps one step's tensors addressable."""
    widest = max(_int(config, "hidden_size"), _int(config, "intermediate_size"), _int(config, "vocab_size"), 1)
    addressable = max(1, _MAX_STEP_BYTES // (8 * widest * opts.batch_size))
    limit = _int(config, "max_position_embeddings")
    return addressable if opts.beyond_max_positions or not limit else min(limit, addressable)


def _int(config: Any, name: str) -> int:
    value = getattr(config, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _check_sizes(config: Any, opts: MemoryOptions) -> None:
    """The model's size fields, and a batch it can take: refused here in one line, where a huge ``seq_len`` or
    ``batch_size`` overflowed torch's size arithmetic (2**63) and a config of 100,000 layers traced for hours."""
    from fastpeft.config_fields import check_config_fields

    check_config_fields(getattr(config, "_name_or_path", None) or "the model config", config.to_dict())
    limit = _int(config, "max_position_embeddings")
    if limit and opts.seq_len > limit and not opts.beyond_max_positions:
        raise ValueError(
            f"--seq-len {opts.seq_len:,d} is longer than the model's max_position_embeddings {limit:,d} "
            "(pass --beyond-max-positions to estimate it anyway)"
        )
    if opts.seq_len > max_seq_len(config, replace(opts, beyond_max_positions=True)):
        raise ValueError(
            f"--batch-size {opts.batch_size:,d} x --seq-len {opts.seq_len:,d} tokens: one step's tensors would "
            "pass 2**62 bytes, beyond what torch can address (and any GPU holds)"
        )


def _meta_model(config: Any, dtype: torch.dtype) -> nn.Module:
    from fastpeft.loading import require_transformers

    transformers = require_transformers()
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=mt.register_causal_sdpa())
    model.to(dtype)
    model.config.use_cache = False
    return model


def _peft_config(opts: MemoryOptions) -> Any:
    from fastpeft.peft import AdapterConfig, LoraConfig

    if opts.method == "adapter":
        return AdapterConfig(bottleneck_size=opts.bottleneck_size, task_type="CAUSAL_LM")
    targets: Any = opts.target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return LoraConfig(r=opts.r, lora_alpha=2 * opts.r, target_modules=targets, task_type="CAUSAL_LM",
                      use_dora=opts.method in DORA_METHODS)  # fmt: skip


def _batch(opts: MemoryOptions) -> dict[str, torch.Tensor]:
    ids = torch.zeros((opts.batch_size, opts.seq_len), dtype=torch.long)
    # No attention mask: an unpadded batch, for which transformers builds no [seq, seq] mask either.
    return {"input_ids": ids, "labels": ids}


# -- the traced step ------------------------------------------------------------------------------


def _trace(model: nn.Module, opts: MemoryOptions, loss_fn: Any, external: list[torch.Tensor]) -> dict[str, int]:
    """One steady-state step of ``model`` under the tracker (inside ``fake_mode()``); the peak by category."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=opts.device == "cuda")
    for p in params:  # AdamW creates its state on the first step: a steady-state step already has it
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    batch = _batch(opts)
    tracker = mt.StepTracker()
    tracker.track_external(model, opt, *external)
    model.train()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=opts.device == "cuda")
    with tracker:
        with autocast:
            loss = loss_fn(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return tracker.peak()


def dora_norms(model: nn.Module) -> list[torch.Tensor]:
    """The cached ``‖W_n‖²`` (float32 ``[out]``) of every DoRA layer of ``model``, computed now if missing.

    A DoRA layer keeps its base's row norms between steps (``fastpeft.nn.lora_dora.dora_weight_sq_cached``):
    a steady-state step finds them made, so they are made before the trace and tracked as held memory (call
    after ``fakeify``, whose new tensors void the caches the injection made)."""
    from fastpeft.nn.lora_dora import dora_weight_sq_cached

    layers = [m for m in model.modules() if any(getattr(m, "use_dora", {}).values())]
    return [dora_weight_sq_cached(m) for m in layers]


def _categories(peak: dict[str, int], nf4: int, adapters: int, scratch: int, norms: int = 0) -> dict[str, int]:
    static = peak.get("Parameter", 0) + peak.get("Buffer", 0) + peak.get("Other", 0)
    return {
        "nf4_base": nf4,
        "dense_layers": static - nf4 - adapters - norms,
        "adapters": adapters,
        "gradients": peak.get("Gradient", 0),
        "optimizer_state": peak.get("Optstate", 0),
        "activations": peak.get("Activation", 0),
        "temporaries": peak.get("Temp", 0),
        "dequant_scratch": scratch,
        "dora_norms": norms,
    }


def estimate(config: Any, opts: MemoryOptions) -> MemoryEstimate:
    """fastpeft's peak for one training step of ``config`` (a transformers config) with ``opts`` (see module doc).

    Raises:
        ValueError: an unsupported method or option combination, or an architecture transformers cannot build.
    """
    from fastpeft.nn import NF4Linear
    from fastpeft.peft import get_peft_model

    _check(opts)
    _check_sizes(config, opts)
    if opts.quantize_lm_head and getattr(config, "tie_word_embeddings", False):
        raise ValueError("--quantize-lm-head: the head is tied to the input embedding: quantizing it saves nothing")
    dtype = torch.bfloat16 if opts.device == "cuda" else torch.float32
    base = _meta_model(config, dtype)
    notes = []
    if opts.method in NF4_METHODS:
        shared = torch.empty(256, device="meta") if opts.device == "cpu" else None  # see meta_nf4_linear
        make = functools.partial(mt.meta_nf4_linear, nested_quant_map=shared)
        mt.swap_linears(base, make, lm_head_skip(opts.quantize_lm_head))
    offload = mt.FakeHostOffload() if opts.offload_activations else None
    if opts.resolved_checkpointing():
        enable_checkpointing(base, offload=offload is not None, offload_hooks=offload)
    if opts.sequence_chunk:
        enable_sequence_chunks(base, opts.sequence_chunk)
    with torch.random.fork_rng(devices=[]):
        model = get_peft_model(base, _peft_config(opts))
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()  # as finetune: float32 adapters for AdamW
    nf4_layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    head = model.get_base_model().get_output_embeddings()
    scratch = 0
    if opts.device == "cuda":
        # The head's NF4 GEMM is replaced by the chunked loss's slice dequantization (traced) when chunked.
        gemm = [m for m in nf4_layers if not (m is head and opts.chunked_loss)]
        scratch = mt.largest_weight_bytes((m.out_features, m.in_features) for m in gemm)
        if scratch:
            notes.append("dequantize scratch: analytic, the largest NF4 layer's 16-bit weight, shared by all layers")

    def loss_fn(m: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return causal_lm_loss(m, batch) if opts.chunked_loss else m(**batch).loss

    with mt.fake_mode(), trace_repeated_chunks_once():  # the loss's cost independent of the number of tokens
        mt.fakeify(model)
        nf4 = mt.nbytes(b for m in nf4_layers for b in m.buffers())
        adapters = mt.nbytes(p for p in model.parameters() if p.requires_grad)
        norms = dora_norms(model)
        peak = _trace(model, opts, loss_fn, norms)
    cats = _categories(peak, nf4, adapters, scratch, mt.nbytes(norms))
    if offload is not None:
        notes.append(f"offloaded to host memory: {format_bytes(offload.host_peak)} of checkpointed layer inputs")
    return MemoryEstimate("fastpeft", sum(cats.values()), cats, offload.host_peak if offload else 0, notes,
                          asdict(replace(opts, checkpointing=opts.resolved_checkpointing())))  # fmt: skip


def estimate_peer(config: Any, opts: MemoryOptions) -> MemoryEstimate:
    """The same step for transformers + HF peft, with bitsandbytes 4-bit for QLoRA (see module doc).

    Only the method, rank, targets, batch, sequence and checkpointing are taken from ``opts``: the
    other savers are fastpeft's. Its dense weights are float32 for QLoRA (peft's
    ``prepare_model_for_kbit_training``) and 16-bit for LoRA.

    Raises:
        ImportError: peft (or bitsandbytes for QLoRA) is not installed.
        ValueError: a method the peer comparison does not cover.
    """
    import peft

    _check(opts)
    _check_sizes(config, opts)
    if opts.method not in PEER_METHODS:
        raise ValueError(f"the peer comparison covers {', '.join(PEER_METHODS)}, not {opts.method!r}")
    dtype = torch.bfloat16 if opts.device == "cuda" else torch.float32
    model = _meta_model(config, dtype)
    ckpt = opts.resolved_checkpointing()
    notes = []
    if opts.method in NF4_METHODS:
        import bitsandbytes as bnb

        def linear4bit(linear: nn.Linear) -> nn.Module:
            return bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                     compute_dtype=dtype, quant_type="nf4", device="meta")  # fmt: skip

        mt.swap_linears(model, linear4bit, ("lm_head",))
        model.is_loaded_in_4bit = True  # what a bitsandbytes 4-bit load sets, and what peft checks
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=ckpt)
        notes.append("peer: prepare_model_for_kbit_training casts the non-quantized weights to float32")
    elif ckpt:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    targets: Any = opts.target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    config_ = peft.LoraConfig(r=opts.r, lora_alpha=2 * opts.r, target_modules=targets, task_type="CAUSAL_LM",
                              use_dora=opts.method in DORA_METHODS)  # fmt: skip
    dora_4bit = _peer_dora_4bit if opts.method == "qdora" else contextlib.nullcontext
    with torch.random.fork_rng(devices=[]), dora_4bit():
        model = peft.get_peft_model(model, config_)
    with mt.fake_mode(), dora_4bit():
        mt.fakeify(model)
        quantized = mt.fake_bnb_linears(model, dtype) if opts.method in NF4_METHODS else []
        nf4 = mt.nbytes(quantized)
        adapters = mt.nbytes(p for p in model.parameters() if p.requires_grad)
        extra = [t for t in quantized if not isinstance(t, nn.Parameter)]  # the QuantState tensors
        peak = _trace(model, opts, lambda m, batch: m(**batch).loss, extra)
    cats = _categories(peak, nf4, adapters, 0)
    if opts.method in NF4_METHODS:
        notes.append("peer: bitsandbytes' forward dequantizes inside its GEMM op, unseen (up to one 16-bit layer)")
    peer_opts = {"method": opts.method, "r": opts.r, "seq_len": opts.seq_len, "batch_size": opts.batch_size,
                 "checkpointing": ckpt, "device": opts.device}  # fmt: skip
    return MemoryEstimate(PEER if opts.method in NF4_METHODS else "transformers + peft", sum(cats.values()), cats, 0,
                          notes, peer_opts)  # fmt: skip


@contextlib.contextmanager
def _peer_dora_4bit() -> Iterator[None]:
    """peft's DoRA on bitsandbytes 4-bit layers as set up here (meta, then fake tensors).

    peft dequantizes the base in DoRA's init and in every forward (``dequantize_module_weight``: bitsandbytes'
    ``dequantize_4bit`` for a ``Params4bit``, a full 16-bit ``[out, in]``). Here the init, on the meta device,
    gets an empty meta tensor of that shape and compute dtype (and skips peft's deep copy of the layer, which
    a meta ``Params4bit`` refuses), so the magnitude has peft's shape and dtype; the traced forward calls
    ``dequantize_4bit`` itself on the layer's fake ``QuantState``, as peft would on a real ``Params4bit``."""
    from unittest import mock

    import bitsandbytes as bnb
    from peft.tuners.lora import dora

    def dequantized(module: nn.Module) -> torch.Tensor:
        state = getattr(module.weight, "quant_state", None)
        if state is None:  # the init, on meta
            dtype = getattr(module, "compute_dtype", None) or torch.float32
            return torch.empty(module.out_features, module.in_features, dtype=dtype, device="meta")
        return bnb.functional.dequantize_4bit(module.weight.data, state)

    with (
        mock.patch.object(dora, "deepcopy", lambda m: m),
        mock.patch.object(dora, "dequantize_module_weight", dequantized),
    ):
        yield


def longest_sequence(config: Any, opts: MemoryOptions, budget: int, step: int = 256, tries: int = 8) -> int:
    """The longest sequence (a multiple of ``step``, halved down to 8 while not even ``step`` fits) whose
    estimated peak is at most ``budget`` bytes; 0 if none; ``max_seq_len`` when all of that fits.

    The peak grows linearly with the sequence (SDPA attention, chunked loss): secant steps from two
    estimates, each checked by a new estimate, then bisection between the best fit and the first miss.
    """
    points: dict[int, int] = {}
    cap = max_seq_len(config, opts)

    def peak(seq: int) -> int:
        if seq not in points:
            points[seq] = estimate(config, replace(opts, seq_len=seq)).peak_bytes
        return points[seq]

    while step > 8 and step > cap:
        step //= 2
    while step > 8 and peak(step) > budget:  # a small model or budget: a finer grid
        step //= 2
    if step > cap:
        return cap if peak(cap) <= budget else 0
    if peak(cap) <= budget:  # the whole context fits (a huge budget must not guess a billion tokens)
        return cap
    lo, hi = 0, cap  # lo fits (0: nothing known), hi does not
    for seq in (step, min(8 * step, cap // step * step)):
        if peak(seq) <= budget:
            lo = max(lo, seq)
        else:
            hi = min(hi, seq)
    for _ in range(tries):
        if hi - lo <= step:
            break
        fits = sorted(points)
        s0, s1 = fits[-2], fits[-1]
        slope = (points[s1] - points[s0]) / (s1 - s0)
        if slope <= 0:
            break
        guess = int(s1 + (budget - points[s1]) / slope) // step * step
        guess = min(max(guess, lo + step), hi - step)
        if not lo < guess < hi:
            guess = (lo + hi) // 2 // step * step
        guess = max(guess, step)
        if peak(guess) <= budget:
            lo = max(lo, guess)
        else:
            hi = min(hi, guess)
    while hi - lo > step and len(points) < tries + 8:
        mid = (lo + hi) // 2 // step * step
        if peak(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def format_report(
    name: str, ours: MemoryEstimate, peer: MemoryEstimate | None = None, fit: tuple[int, int] | None = None
) -> str:
    """The per-category table (``peer`` beside ``ours``), the ratio, the notes and the estimate label."""
    o = ours.options
    savers = [s for s, on in (("chunked loss", o["chunked_loss"]), ("checkpointing", o["checkpointing"]),
                               ("activation offload", o["offload_activations"]),
                               (f"sequence chunks of {o['sequence_chunk']:,d} tokens", o["sequence_chunk"]),
                               ("NF4 head", o["quantize_lm_head"])) if on]  # fmt: skip
    rank = f" r={o['r']} {o['target_modules']}" if o["method"] != "adapter" else ""
    lines = [
        f"fastpeft memory: {name}, {o['method']}{rank}, batch {o['batch_size']} x {o['seq_len']} tokens, "
        f"{'bf16 on a GPU' if o['device'] == 'cuda' else 'float32 on the CPU'}",
        f"savers: {', '.join(savers) or 'none'}",
        "",
    ]
    width = max(len(label) for label in CATEGORIES.values())
    head = f"{'':{width}}  {'fastpeft':>12}"
    if peer is not None:
        head += f"  {peer.who:>{max(12, len(peer.who))}}"
    lines.append(head)
    pw = max(12, len(peer.who)) if peer is not None else 0
    for key, label in CATEGORIES.items():
        if key == "dora_norms" and o["method"] not in DORA_METHODS:
            continue
        row = f"{label:{width}}  {format_bytes(ours.categories[key]):>12}"
        if peer is not None:
            row += f"  {format_bytes(peer.categories[key]):>{pw}}"
        lines.append(row)
    row = f"{'peak':{width}}  {format_bytes(ours.peak_bytes):>12}"
    if peer is not None:
        row += f"  {format_bytes(peer.peak_bytes):>{pw}}"
    lines.append(row)
    if peer is not None:
        lines.append(f"fastpeft / peer: {ours.peak_bytes / peer.peak_bytes:.2f}x")
    if fit is not None:
        budget, seq = fit
        lines.append(f"longest sequence that fits {format_bytes(budget)}: {seq:,d} tokens (batch {o['batch_size']})")
    lines += [f"note: {n}" for n in ours.notes + (peer.notes if peer is not None else [])]
    lines.append(
        "Estimates: one training step traced on fake tensors under torch's MemTracker (no GPU); allocator "
        "overhead, the CUDA context and workspaces come on top."
    )
    return "\n".join(lines)
