"""``fastpeft finetune --sequence-chunk`` (fastpeft.app.seq_chunks) on a tiny model on the CPU, with the other
savers the CPU takes on (checkpointing, chunked loss, NF4 head): the same losses and adapter as without it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_close
from safetensors.torch import load_file
from tinymodels import finetune_args, write_checkpoint, write_qa

from fastpeft.app import seq_chunks
from fastpeft.app.cli import main

pytest.importorskip("transformers")


def test_finetune_with_sequence_chunks_trains_as_without(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, data = write_checkpoint(tmp_path / "model", seed=3), write_qa(tmp_path)
    chunked_calls = []

    def counted(fn, module, chunk, x):  # noqa: ANN001, ANN202
        chunked_calls.append(x.shape[1] > chunk)
        return seq_chunks.SequenceChunks.apply(fn, chunk, x, *[p for p in module.parameters() if p.requires_grad])

    runs = {}
    for name, extra in (("plain", ()), ("chunked", ("--sequence-chunk", "3"))):
        if extra:
            monkeypatch.setattr(seq_chunks, "chunked_call", counted)
        out = tmp_path / name
        args = finetune_args(model, data, out, "--method", "qlora", "--quantize-lm-head", "--gradient-checkpointing",
                             "--max-steps", "3", "--batch-size", "2", "--device", "cpu", *extra)  # fmt: skip
        assert main(args) == 0
        runs[name] = out
    assert chunked_calls and all(chunked_calls)  # the run went through the chunks, with more than one each
    losses = [json.loads((runs[n] / "metrics.json").read_text())["losses"] for n in ("plain", "chunked")]
    assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), msg="losses")
    assert json.loads((runs["chunked"] / "train_config.json").read_text())["sequence_chunk"] == 3
    ref, got = (load_file(runs[n] / "adapter_model.safetensors") for n in ("plain", "chunked"))
    assert ref.keys() == got.keys()
    for key in ref:
        assert_close(got[key], ref[key], msg=key)
