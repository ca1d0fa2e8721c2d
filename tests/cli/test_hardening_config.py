"""A ``config.json`` with a mistyped size field (issue 26 item 5): every command that reads a config ends with one
line naming the file and the field, exit status 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tinymodels import finetune_args, write_checkpoint, write_qa

from fastpeft.app.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cfg")
    adapter = root / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    return {"ckpt": write_checkpoint(root / "ckpt"), "data": write_qa(root), "adapter": adapter}


@pytest.mark.parametrize(
    ("edit", "message"),
    [({"hidden_size": "big"}, "hidden_size must be a positive int, got 'big'"),
     ({"num_attention_heads": 6, "head_dim": None}, "hidden_size 64 is not a multiple of num_attention_heads 6"),
     ({"num_attention_heads": 6}, "The hidden size (64) is not a multiple of the number of attention heads (6)"),
     ({"num_key_value_heads": 3}, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
     ({"hidden_size": -64}, "hidden_size must be a positive int, got -64"),
     ({"hidden_size": 0}, "hidden_size must be a positive int, got 0"),
     ({"vocab_size": 2.5}, "vocab_size must be a positive int, got 2.5")],
)  # fmt: skip
@pytest.mark.parametrize("command", ["finetune", "quantize", "merge", "memory"])
def test_issue26_item5_mistyped_config_field_is_one_line(tiny, tmp_path, capsys, command, edit, message):
    model = tmp_path / "model"
    shutil.copytree(tiny["ckpt"], model)
    path = model / "config.json"
    config = {**json.loads(path.read_text()), **edit}
    path.write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    out = tmp_path / "out"
    argv = {
        "finetune": finetune_args(model, tiny["data"], out, "--max-steps", "1"),
        "quantize": ["quantize", "--model", str(model), "--out", str(out)],
        "merge": ["merge", "--model", str(model), "--adapter", str(tiny["adapter"]), "--out", str(out)],
        "memory": ["memory", "--config", str(model), "--seq-len", "64", "--no-peer"],
    }[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}: {message}" in err, err
    assert not out.exists()
