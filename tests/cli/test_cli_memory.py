"""``fastpeft memory`` (table and JSON) and ``finetune``'s estimate: printed first, and a run whose estimate
exceeds the memory it may use refused before anything is loaded or written (a fake budget on the CPU)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from tinymodels import write_checkpoint, write_qa

from fastpeft.app.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_mem")
    return {"model": write_checkpoint(root / "model", seed=2), "data": write_qa(root)}


def test_memory_json_has_every_category_and_the_peer(tiny: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("bitsandbytes")
    rc = main(["memory", "--config", str(tiny["model"]), "--seq-len", "64", "--json", "--fit", "64MiB"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    ours, peer = out["fastpeft"], out["peer"]
    assert set(ours["categories"]) == {"nf4_base", "dense_layers", "adapters", "gradients", "optimizer_state",
                                       "activations", "temporaries", "dequant_scratch", "dora_norms"}  # fmt: skip
    assert ours["peak_bytes"] == sum(ours["categories"].values()) > 0
    assert ours["options"]["checkpointing"] is True  # the QLoRA-on-a-GPU default
    assert peer["who"] == "transformers + peft + bitsandbytes"
    assert out["ratio"] == pytest.approx(ours["peak_bytes"] / peer["peak_bytes"])
    assert out["fit"]["seq_len"] > 64 and out["fit"]["budget_bytes"] == 64 << 20
    assert "estimate" in out["label"]


def test_memory_table(tiny: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    rc = main(["memory", "--config", str(tiny["model"] / "config.json"), "--method", "lora", "--seq-len", "32",
               "--no-peer", "--no-chunked-loss", "--device", "cpu"])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "lora r=16 all-linear, batch 1 x 32 tokens, float32 on the CPU" in out
    assert "savers: none" in out
    for label in ("NF4 base", "adapters (trainable)", "optimizer state", "activations", "peak"):
        assert re.search(rf"^{re.escape(label)}.*\d", out, re.M), label
    assert "Estimates:" in out


def test_finetune_refuses_early_with_the_flags_that_fit(
    tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    args = ["finetune", "--model", str(tiny["model"]), "--data", str(tiny["data"]), "--out", str(out), "--method",
            "lora", "--seq-len", "128", "--batch-size", "4", "--no-progress", "--max-steps", "1"]  # fmt: skip
    # a budget between what the step needs with checkpointing and without (estimates: ~3.4 and ~5.5 MiB)
    rc = main([*args, "--memory-budget", "4MiB"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "error: the estimated peak memory" in err and "exceeds the budget of 4.0 MiB" in err
    assert "it would fit with: --gradient-checkpointing (" in err
    assert not out.exists()  # refused before anything was written
    rc = main([*args, "--memory-budget", "2.5MiB"])  # checkpointing alone is not enough: a shorter sequence
    err = capsys.readouterr().err
    assert rc == 2
    fit = re.search(r"it would fit with: --gradient-checkpointing --seq-len (\d+)", err)
    assert fit and 64 <= int(fit.group(1)) < 128, err
    assert not out.exists()
    rc = main([*args, "--memory-budget", "1GiB"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert re.search(r"^memory estimate: peak [\d.]+ MiB within the budget of 1.00 GiB", printed, re.M)
    assert (out / "adapter_model.safetensors").is_file()


def test_memory_dora_table_has_the_norm_cache_and_the_peer(
    tiny: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    pytest.importorskip("peft")
    rc = main(["memory", "--config", str(tiny["model"]), "--method", "dora", "--seq-len", "32"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "dora r=16 all-linear, batch 1 x 32 tokens" in out
    assert re.search(r"^DoRA base row norms .*\d", out, re.M)
    assert re.search(r"^fastpeft / peer: [\d.]+x$", out, re.M)  # peft's use_dora=True beside it
    rc = main(["memory", "--config", str(tiny["model"]), "--method", "lora", "--seq-len", "32", "--no-peer"])
    assert rc == 0
    assert "DoRA" not in capsys.readouterr().out  # the row is DoRA's only


def test_finetune_prints_the_qdora_estimate(
    tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    rc = main(["finetune", "--model", str(tiny["model"]), "--data", str(tiny["data"]), "--out", str(out), "--method",
               "qdora", "--seq-len", "32", "--no-progress", "--max-steps", "1", "--memory-budget", "1GiB"])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    line = re.search(r"^memory estimate: peak [\d.]+ MiB within the budget of 1.00 GiB \((.*)\)$", printed, re.M)
    assert line and "NF4 base" in line.group(1) and "DoRA base row norms" in line.group(1), printed
    assert "none for" not in printed
