"""The long-context saver (``fastpeft.app.seq_chunks``): the MLP and RMSNorms run over sequence slices give the
gradients of the plain step, alone and under checkpointing with offload; the backward replays the forward's
dropout; the memory model's trace of it equals the real CPU step."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_close, stable_seed

from fastpeft.app import memory as M
from fastpeft.app import memory_trace as mt
from fastpeft.app.savers import causal_lm_loss, enable_checkpointing
from fastpeft.app.seq_chunks import SequenceChunks, enable_sequence_chunks
from fastpeft.peft import LoraConfig, get_peft_model, quantize_model

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 301, 23


def _config() -> object:
    return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2)  # fmt: skip


def _model(chunk: int = 0, quantize: bool = False, checkpointing: bool = False, offload: bool = False) -> object:
    torch.manual_seed(stable_seed("long-context"))
    base = transformers.LlamaForCausalLM(_config())
    if quantize:
        quantize_model(base, skip=())
    if checkpointing:
        enable_checkpointing(base, offload=offload)
    if chunk:
        assert enable_sequence_chunks(base, chunk) == 2 * 3 + 1  # MLP and 2 norms per layer, the final norm
    torch.manual_seed(stable_seed("long-context-lora"))
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(stable_seed("long-context-batch"))
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    return {"input_ids": ids, "labels": labels}


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("chunk", "quantize", "checkpointing", "offload"),
    [(5, False, False, False), pytest.param(1, False, False, False, marks=pytest.mark.slow), (7, True, False, False),
     (5, False, True, True), (SEQ + 1, False, True, False)],
)  # fmt: skip
def test_sequence_chunks_keep_loss_and_gradients(
    chunk: int, quantize: bool, checkpointing: bool, offload: bool
) -> None:
    plain = _model(quantize=quantize)
    chunked = _model(chunk, quantize=quantize, checkpointing=checkpointing, offload=offload)
    batch = _batch()
    ref = causal_lm_loss(plain, batch)
    ref.backward()
    got = causal_lm_loss(chunked, batch)
    got.backward()
    where = f"chunk={chunk} quantize={quantize} checkpointing={checkpointing} offload={offload}"
    assert_close(got, ref, msg=f"loss {where}")
    ref_grads, grads = _grads(plain), _grads(chunked)
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 7 * 2
    for name, g in grads.items():
        assert g is not None, f"{name}: no gradient ({where})"
        assert_close(g, ref_grads[name], msg=f"{name} {where}")


def _cyclic_garbage(checkpointing: bool) -> list[int]:
    def garbage(chunk: int) -> int:  # objects only the cycle collector frees, after one step
        model, batch = _model(chunk, checkpointing=checkpointing), _batch()
        gc.collect()
        gc.disable()
        try:
            causal_lm_loss(model, batch).backward()
            return gc.collect()
        finally:
            gc.enable()

    garbage(3), garbage(0)  # first calls: one-time set-up (lazy imports, caches) makes garbage of its own
    return [garbage(3), garbage(0)]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_slices_leave_no_cyclic_garbage(checkpointing: bool) -> None:
    # in a fresh interpreter: what earlier tests leave registered (trackers, hooks) makes cycles of its own
    code = f"import test_long_context as t; print(t._cyclic_garbage({checkpointing}))"
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    chunked, plain = json.loads(out.stdout.strip().splitlines()[-1])
    # every slice's graph is freed by reference counting as it ends (checkpointing's own cycles are not the slices')
    assert chunked == plain, (chunked, plain)
    assert checkpointing or plain == 0, plain


def test_backward_replays_the_forward_dropout() -> None:
    torch.manual_seed(stable_seed("long-context-dropout"))
    lin = torch.nn.Linear(12, 9)
    drop = torch.nn.Dropout(0.4)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return drop(torch.tanh(lin(x)))

    x = torch.randn(2, 11, 12, requires_grad=True)
    w = torch.randn(2, 11, 9)
    torch.manual_seed(7)
    ref = torch.cat([fn(x[:, s : s + 4]) for s in range(0, 11, 4)], dim=1)  # the same draws, slice by slice
    (ref * w).sum().backward()
    ref_grads = [t.grad.clone() for t in (x, lin.weight, lin.bias)]
    for t in (x, lin.weight, lin.bias):
        t.grad = None
    torch.manual_seed(7)
    got = SequenceChunks.apply(fn, 4, x, lin.weight, lin.bias)
    (got * w).sum().backward()
    assert_close(got, ref, msg="output")
    for name, t, r in zip(("x", "weight", "bias"), (x, lin.weight, lin.bias), ref_grads, strict=True):
        assert_close(t.grad, r, msg=name)


@pytest.mark.slow
def test_fake_trace_equals_the_real_cpu_step() -> None:
    # Without checkpointing the peak falls between ops (the last chunk's recompute in the backward). Under
    # checkpointing it falls inside a LoRA op, where the real CPU step also holds the reference kernel's float
    # temporaries that the op's fake implementation (like the GPU kernel) does not allocate.
    opts = M.MemoryOptions(method="qlora", r=8, seq_len=96, batch_size=2, device="cpu", checkpointing=False,
                           sequence_chunk=17)  # fmt: skip
    est = M.estimate(_config(), opts)
    with torch.device("cpu"):
        base = transformers.AutoModelForCausalLM.from_config(_config(), attn_implementation=mt.register_causal_sdpa())
    base.config.use_cache = False
    quantize_model(base)
    enable_sequence_chunks(base, 17)
    model = get_peft_model(base, M._peft_config(opts))
    nf4 = mt.nbytes(b for m in model.modules() if type(m).__name__ == "NF4Linear" for b in m.buffers())
    adapters = mt.nbytes(p for p in model.parameters() if p.requires_grad)
    assert est.categories == M._categories(M._trace(model, opts, causal_lm_loss, []), nf4, adapters, 0)
    plain = M.estimate(_config(), dataclasses.replace(opts, sequence_chunk=0))
    assert est.peak_bytes < plain.peak_bytes


def test_sequence_chunks_lower_the_estimate_by_the_mlp_intermediates() -> None:
    config = transformers.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=1024, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    opts = M.MemoryOptions(method="qlora", r=8, seq_len=1024, device="cuda", offload_activations=True)
    plain = M.estimate(config, opts)
    chunked = M.estimate(config, dataclasses.replace(opts, sequence_chunk=64))
    saved = plain.categories["activations"] + plain.categories["temporaries"]
    saved -= chunked.categories["activations"] + chunked.categories["temporaries"]
    # the recompute's gate, up, their product and its gradients: at least 4 x [seq, intermediate] bf16 leave
    assert saved >= 4 * 1024 * 1024 * 2, saved
    assert chunked.options["sequence_chunk"] == 64 and "sequence chunks of 64 tokens" in M.format_report("t", chunked)


def test_tracing_the_repeated_chunks_once_keeps_the_peak(monkeypatch: pytest.MonkeyPatch) -> None:
    opts = M.MemoryOptions(method="qlora", r=8, seq_len=200, device="cuda", offload_activations=True,
                           sequence_chunk=23)  # fmt: skip  # 9 chunks, the last short
    once = M.estimate(_config(), opts)
    monkeypatch.setattr(M, "trace_repeated_chunks_once", contextlib.nullcontext)  # every chunk traced
    full = M.estimate(_config(), opts)
    for key in ("nf4_base", "dense_layers", "adapters", "gradients", "optimizer_state", "dequant_scratch"):
        assert once.categories[key] == full.categories[key], key
    # Under the tracker a finished slice's graph can wait in a reference cycle for Python's cycle collector, whose
    # timing the number of slices changes: the peaks agree to within one slice's MLP intermediates and gradients
    # (6 x chunk x intermediate, 16-bit) and its norms' float32 copies.
    one_slice = 6 * 23 * 96 * 2 + 4 * 23 * 64 * 4
    assert abs(full.peak_bytes - once.peak_bytes) <= one_slice, (full.peak_bytes, once.peak_bytes)
