"""What adapter_config.json records: the modules "all-linear" resolved to, and a base model path that resolves from
any directory (HF PEFT's AutoPeftModel reads it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import build

from fastpeft import LoraConfig, get_peft_model

ROOT = Path(__file__).resolve().parents[2]


def test_all_linear_is_written_as_the_module_names_it_resolved_to(tmp_path):
    pm = get_peft_model(build("llama"), LoraConfig(r=2, target_modules="all-linear"))
    pm.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    want = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert sorted(written) == want, written
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(build("llama"), str(tmp_path))
    assert sorted(theirs.peft_config["default"].target_modules) == want


def test_base_model_path_given_relative_resolves_from_another_directory(tmp_path):
    pytest.importorskip("peft")
    sys.path.insert(0, str(ROOT / "tests" / "cli"))
    from tinymodels import write_checkpoint

    from fastpeft.loading import load_causal_lm

    write_checkpoint(tmp_path / "base")
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        model = load_causal_lm("base")  # as a user types it, relative to where they stand
    finally:
        os.chdir(here)
    config = LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
    get_peft_model(model, config).save_pretrained(tmp_path / "adapter")
    recorded = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(recorded).is_absolute() and Path(recorded) == (tmp_path / "base").resolve()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = "import sys, peft; m = peft.AutoPeftModelForCausalLM.from_pretrained(sys.argv[1]); print(type(m).__name__)"
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "adapter")], cwd=elsewhere, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-1500:]
