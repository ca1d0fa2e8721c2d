"""Data files with text no tokenizer can take (issue 26 item 9): one line naming the file and the line."""

from __future__ import annotations

from pathlib import Path

import pytest
from tinymodels import finetune_args, write_checkpoint

from fastpeft.app.cli import main
from fastpeft.app.data import read_jsonl


def test_issue26_item9_lone_surrogate_names_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "fine"}\n{"prompt": "ok", "completion": "bad \\ud800 here"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"data\.jsonl:2: field 'completion' holds a lone surrogate U\+D800"):
        read_jsonl(data)
    ckpt = write_checkpoint(tmp_path / "ckpt")
    capsys.readouterr()  # transformers' progress bar while writing the checkpoint
    assert main(finetune_args(ckpt, data, tmp_path / "out", "--max-steps", "1")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{data}:2:" in err and "surrogate" in err, err
    paired = tmp_path / "paired.jsonl"
    paired.write_text('{"text": "a pair \\ud83d\\ude00 is one character"}\n', encoding="utf-8")
    assert read_jsonl(paired) == [{"text": "a pair \U0001f600 is one character"}]
