"""Packed rows give every token the loss and the adapter the gradients of the unpacked (padded) batches."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch

from fastpeft import LoraConfig, get_peft_model
from fastpeft.app.data import IGNORE_INDEX, Batches, Example
from fastpeft.app.packing import PackedBatches, pack, packing_is_exact, real_tokens

sys.path.insert(0, str(Path(__file__).resolve().parent / "peft"))
from tiny_models import VOCAB, build  # noqa: E402


def _examples(lengths, prompt: int = 2, seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        labels = [IGNORE_INDEX] * min(prompt, n - 1) + ids[min(prompt, n - 1) :]
        out.append(Example(tuple(ids), tuple(labels)))
    return out


def test_pack_fills_rows_best_fit_and_keeps_every_example_once():
    ex = _examples([9, 3, 5, 2, 7, 4, 1 + 1, 10])
    rows = pack(ex, 10)
    assert sorted(i for r in rows for i in r) == list(range(len(ex)))
    assert all(sum(len(ex[i].input_ids) for i in r) <= 10 for r in rows)
    assert len(rows) == 5  # 42 tokens: ceil(42 / 10) rows
    with pytest.raises(ValueError, match="more than seq_len"):
        pack(ex, 9)


def test_packed_batch_layout_positions_restart_and_first_tokens_carry_no_label():
    ex = _examples([4, 3])
    batch = PackedBatches(ex, 1, 0, 0, 10).collate([[0, 1]])
    assert "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2]]  # as wide as its longest row
    assert batch["labels"][0, 0] == IGNORE_INDEX and batch["labels"][0, 4] == IGNORE_INDEX
    assert real_tokens(batch) == 7


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_packed_loss_and_adapter_gradients_equal_the_padded_run(arch):
    lengths = [11, 3, 7, 5, 9, 2, 12]  # one example fills a row alone
    ex = _examples(lengths, seed=1)
    seq_len = 12

    def grads(batch):
        torch.manual_seed(0)
        pm = get_peft_model(build(arch), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        assert packing_is_exact(pm, VOCAB)
        loss = pm(**batch, use_cache=False).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}

    padded = Batches(ex, len(ex), 0, 0).collate(ex)
    packed_batches = PackedBatches(ex, 8, 0, 0, seq_len)
    packed = packed_batches.collate(packed_batches.rows)
    assert packed["input_ids"].shape[0] < len(ex)  # fewer rows than examples
    assert real_tokens(packed) == real_tokens(padded) == sum(lengths)
    loss_a, grads_a = grads(padded)
    loss_b, grads_b = grads(packed)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packing_is_refused_where_the_model_would_attend_across_examples():
    class Ignores(torch.nn.Module):  # a model that drops position_ids: packed tokens would see each other
        def __init__(self):
            super().__init__()
            self.inner = build("llama")

        def forward(self, input_ids, labels=None, position_ids=None, **kwargs):
            return self.inner(input_ids=input_ids, labels=labels, use_cache=False)

    assert not packing_is_exact(Ignores(), VOCAB)
    assert packing_is_exact(build("llama"), VOCAB)


def test_epoch_order_is_reproducible_and_resumes_mid_epoch():
    ex = _examples([3, 4, 5, 6, 7, 2, 8, 3, 4], seed=2)
    a = PackedBatches(ex, 2, 0, 5, 10)
    first = [b["input_ids"].tolist() for _, _, b in itertools.islice(a.iterate(), 6)]
    again = [b["input_ids"].tolist() for _, _, b in itertools.islice(PackedBatches(ex, 2, 0, 5, 10).iterate(), 6)]
    assert first == again and a.batches_per_epoch >= 2
    resumed = [b["input_ids"].tolist() for _, _, b in itertools.islice(PackedBatches(ex, 2, 0, 5, 10).iterate(0, 1), 5)]
    assert resumed == first[1:]


def test_chunked_loss_reads_the_packed_positions():
    from fastpeft.app.savers import causal_lm_loss

    ex = _examples([6, 4, 9, 3], seed=3)
    torch.manual_seed(0)
    model = build("llama")
    padded = Batches(ex, len(ex), 0, 0).collate(ex)
    packed_batches = PackedBatches(ex, 4, 0, 0, 12)
    packed = packed_batches.collate(packed_batches.rows)
    with torch.no_grad():
        want = model(**padded).loss
        torch.testing.assert_close(causal_lm_loss(model, packed), want, rtol=1e-5, atol=1e-6)


def test_finetune_packs_by_default_reports_padding_and_resumes_exactly(tmp_path):
    import json

    from fastpeft.app import train
    from fastpeft.app.cli import main

    args = ["finetune", "--seq-len", "64", "--batch-size", "2", "--no-progress", "--save-steps", "2"]
    args += ["--max-steps", "4"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert whole["packed"] and whole["tokens"] > 0 and 0 <= whole["padding_fraction"] < 1
    assert whole["padded_tokens"] == round(whole["padding_fraction"] * (whole["tokens"] + whole["padded_tokens"]))

    class Crash(Exception):
        pass

    def crash_at_3(step: int, loss: float) -> None:
        if step == 3:
            raise Crash

    cfg = train.TrainConfig(out=str(tmp_path / "cut"), seq_len=64, batch_size=2, save_steps=2, max_steps=4,
                            progress=False)  # fmt: skip
    with pytest.raises(Crash):
        train.finetune(cfg, callback=crash_at_3)
    assert main([*args, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    cut = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert cut["losses"] == whole["losses"] and cut["tokens"] == whole["tokens"]
    off = tmp_path / "off"
    assert main([*args, "--out", str(off), "--packing", "off"]) == 0
    assert not json.loads((off / "metrics.json").read_text())["packed"]
