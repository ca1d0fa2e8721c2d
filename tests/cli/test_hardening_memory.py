"""``fastpeft memory`` on huge inputs (issue 26 item 2): every command answers or refuses in one line within
seconds, and the loss's traced cost no longer grows with the number of tokens while its peak stays exact."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from tinymodels import write_checkpoint

from fastpeft.app import memory as M
from fastpeft.app.cli import main

transformers = pytest.importorskip("transformers")
TIMEOUT = 120  # each command answers in seconds; before, they ran for hours


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("mem") / "model")  # max_position_embeddings 256


def _memory(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fastpeft.app.cli", "memory", "--no-peer", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)


@pytest.mark.parametrize(
    ("case", "config", "opts"),
    [("dense head, 7 chunks", dict(vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=2),
      dict(seq_len=16777 * 6 + 123)),
     ("NF4 head in slices, 5 chunks", dict(vocab_size=128000, hidden_size=1024, intermediate_size=2048,
                                           num_hidden_layers=1), dict(seq_len=2100, quantize_lm_head=True))],
)  # fmt: skip
def test_issue26_item2_loss_traced_once_per_kind_of_chunk_is_exact(monkeypatch, case, config, opts) -> None:
    config = transformers.LlamaConfig(**config, num_attention_heads=8, num_key_value_heads=2,
                                      max_position_embeddings=1 << 20)  # fmt: skip
    opts = M.MemoryOptions(device="cuda", checkpointing=True, **opts)
    elided = M.estimate(config, opts)
    monkeypatch.setattr(M, "trace_repeated_chunks_once", contextlib.nullcontext)  # every chunk traced
    assert M.estimate(config, opts).categories == elided.categories, case


def test_issue26_item2_a_billion_tokens_answers(model: Path) -> None:
    done = _memory("--config", str(model), "--seq-len", str(10**9), "--beyond-max-positions", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["fastpeft"]["options"]["seq_len"] == 10**9
    done = _memory("--config", str(model), "--seq-len", "64", "--batch-size", str(10**9), "--json")
    assert done.returncode == 0, done.stderr
    done = _memory("--config", str(model), "--seq-len", "64", "--fit", "1000TiB", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["fit"]["seq_len"] == 256  # the model's max_position_embeddings


@pytest.mark.parametrize(
    ("args", "message"),
    [(("--seq-len", str(10**9)), "longer than the model's max_position_embeddings 256"),
     (("--seq-len", str(2**63), "--beyond-max-positions"), "would pass 2**62 bytes"),
     (("--seq-len", "64", "--batch-size", str(2**63)), "would pass 2**62 bytes")],
)  # fmt: skip
def test_issue26_item2_sizes_past_the_bounds_are_one_line(model: Path, capsys, args, message) -> None:
    assert main(["memory", "--config", str(model), "--no-peer", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_issue26_item2_a_hundred_thousand_layers_is_refused_at_once(model: Path, tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.mkdir()
    config = json.loads((model / "config.json").read_text())
    (big / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 100000}))
    done = _memory("--config", str(big), "--seq-len", "64")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "num_hidden_layers=100,000 is more layers than fastpeft builds" in done.stderr
