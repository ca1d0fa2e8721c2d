"""The launchers users type, each with 2 CPU processes against one process: ``torchrun ... fastpeft finetune``
and ``accelerate launch`` of a ``transformers.Trainer`` over a fastpeft model. Slow: each starts 2 fresh
Python processes (``test_distributed.py`` covers the same training in the default run, in one launch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cases
import pytest
import torch
from conftest import assert_close
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
ADAM_FRACTION = 1e-2  # see test_distributed.py: AdamW moves near-zero-gradient elements by a fraction of lr

pytestmark = pytest.mark.slow


def _launch(cmd: list[str], cwd: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd[:6])} ... exited with {proc.returncode}:\n{proc.stderr[-6000:]}"


def _adapters_agree(a_dir: Path, b_dir: Path, steps: int, lr: float) -> None:
    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in (a_dir, b_dir))
    assert a.keys() == b.keys() and a
    bound = ADAM_FRACTION * lr * steps
    for key in a:
        diff = (a[key] - b[key]).abs().max().item()
        assert diff <= bound, f"{key}: 2 processes vs one differ by {diff:.2e} (bound {bound:.1e})"


def _torchrun_vs_one(tmp_path: Path, strategy: str, flags: list[str], dtype: torch.dtype) -> None:
    from fastpeft.app.cli import main

    two, one = tmp_path / "two", tmp_path / "one"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    args = [*cases.finetune_args(two, batch_size=2), *flags, "--distributed", strategy]
    _launch([*torchrun, "-m", "fastpeft", *args], tmp_path)
    assert main(cases.finetune_args(one, batch_size=4) + flags) == 0
    m2, m1 = (json.loads((d / "metrics.json").read_text()) for d in (two, one))
    assert (m2["world_size"], m2["global_batch"], m2["distributed"]) == (2, 4, strategy)
    losses = torch.tensor(m2["losses"]), torch.tensor(m1["losses"])
    assert_close(*losses, dtype=dtype, msg=f"{strategy}: losses, 2 ranks vs one")
    _adapters_agree(two, one, steps=len(m1["losses"]), lr=cases.FINETUNE_LR)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_fastpeft_finetune(tmp_path: Path, strategy: str) -> None:
    _torchrun_vs_one(tmp_path, strategy, ["--method", "lora", "--max-steps", "3"], torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_fastpeft_finetune_on_two_gpus(tmp_path: Path, strategy: str) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs (NCCL gives each rank its own)")
    # bf16 autocast on the GPU: the ranks' smaller matmuls round differently from one process's
    flags = ["--method", "qlora", "--max-steps", "3", "--device", "cuda"]
    _torchrun_vs_one(tmp_path, strategy, flags, torch.bfloat16)


def test_accelerate_launch_trainer_ddp(tmp_path: Path) -> None:
    pytest.importorskip("accelerate")
    import trainer_job

    two, one = tmp_path / "two", tmp_path / "one"
    _launch([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
             "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
             str(HERE / "trainer_job.py"), str(two), "2"], tmp_path)  # fmt: skip
    _launch([sys.executable, str(HERE / "trainer_job.py"), str(one), "4"], tmp_path)
    l2, l1 = (json.loads((d / "losses.json").read_text()) for d in (two, one))
    assert len(l2) == len(l1) == trainer_job.STEPS
    assert_close(torch.tensor(l2), torch.tensor(l1), msg="Trainer losses, 2 DDP processes vs one")
    _adapters_agree(two / "adapter", one / "adapter", steps=trainer_job.STEPS, lr=cases.LR)
