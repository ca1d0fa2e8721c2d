"""``fastpeft.app.distributed`` without launching anything: joining (or not) a run, refusals, the NF4 memory
FSDP2 leaves replicated, and the README's multi-GPU commands."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import cases
import pytest
import torch

from fastpeft.app import distributed

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def torchrun_env(monkeypatch: pytest.MonkeyPatch):
    """torchrun's variables for rank 1 of 2 (nothing is initialized: every case here refuses first)."""
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)


def test_a_single_process_trains_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.launched()
    assert distributed.setup(None, None) is None
    assert distributed.setup("fsdp", "cpu") is None  # noted, nothing to distribute


def test_bad_strategy_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="--distributed must be one of ddp, fsdp, got 'zero3'"):
        distributed.setup("zero3", None)


def test_a_gpu_index_under_torchrun_is_refused(torchrun_env: None) -> None:
    with pytest.raises(ValueError, match=r"--device cuda:1: under torchrun each rank takes cuda:<LOCAL_RANK>"):
        distributed.setup("ddp", "cuda:1")


def test_a_malformed_torchrun_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an integer"):
        distributed.launched()


def test_nf4_replicated_bytes_are_the_quantized_layers_buffers() -> None:
    from fastpeft.nn import NF4Linear

    qlora, lora = cases.peft_model("qlora"), cases.peft_model("lora")
    layers = [m for m in qlora.modules() if isinstance(m, NF4Linear)]
    assert len(layers) == 14, "2 layers x 7 projections are NF4 (the head is kept dense)"
    packed = sum(m.packed.numel() for m in layers)
    weights = sum(m.in_features * m.out_features for m in layers)
    assert packed == weights // 2
    got = distributed.nf4_replicated_bytes(qlora)
    # the packed codes (0.5 byte a weight) plus absmax, code maps and the nested statistics
    assert packed < got < packed * 1.2 + 16 * 4 * len(layers) + 256 * 4 * len(layers), got
    assert distributed.nf4_replicated_bytes(lora) == 0


def test_rows_split_the_global_batch_and_a_rank_without_rows_weighs_nothing() -> None:
    batch = cases.batch()
    seen = []
    for rank in range(3):  # 4 rows over 3 ranks: 1, 1, 2
        run = distributed.DistributedRun(rank, 3, rank, torch.device("cpu"), "ddp")
        rows, real = run._rows(batch)
        assert real
        seen.append(rows["input_ids"])
    assert torch.equal(torch.cat(seen), batch["input_ids"])
    tiny = {k: v[:1] for k, v in batch.items()}
    rows, real = distributed.DistributedRun(0, 2, 0, torch.device("cpu"), "ddp")._rows(tiny)  # rank 1 has it
    assert not real and rows["input_ids"].shape[0] == 1 and bool((rows["labels"] != -100).any())


def test_readme_multi_gpu_commands_parse() -> None:
    from fastpeft.app.cli import _parser

    text = (ROOT / "README.md").read_text()
    lines = re.findall(r"^torchrun .*$", text, re.M)
    assert len(lines) >= 2, "the README shows the torchrun command"
    strategies = set()
    for line in lines:
        words = shlex.split(line.split("#")[0])
        assert "--nproc-per-node" in words and "fastpeft" in words, line
        args = _parser().parse_args(words[words.index("fastpeft") + 1 :])
        strategies.add(args.distributed)
    assert strategies >= {"ddp", "fsdp"}, strategies
