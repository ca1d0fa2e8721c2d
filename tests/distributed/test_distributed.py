"""DDP and FSDP2 over fastpeft models, and ``fastpeft finetune`` under torchrun: 2 CPU processes (gloo).

One ``torchrun --standalone --nproc-per-node 2`` launch of ``worker.py`` per session computes everything
(``launched``); each test compares a part of it with the same work done by one process on the whole
global batch, here.
"""

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
LAUNCH_TIMEOUT_S = 600
ADAM_FRACTION = 1e-2


def _distributed_available() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


pytestmark = pytest.mark.skipif(not _distributed_available(), reason="torch without gloo process groups")


@pytest.fixture(scope="session")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 2-process run's output directory (``worker.py``), computed once."""
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(HERE / "worker.py"), str(out)]  # fmt: skip
    # from the output directory: the repository root holds a `kernels` folder that shadows a PyPI package
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    if proc.returncode != 0 or not (out / "done").is_file():
        pytest.fail(f"torchrun worker.py exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return out


def _single_steps(kind: str) -> tuple[dict[str, torch.Tensor], list[float], torch.nn.Module]:
    """One process, the whole batch: first-step gradients, losses, and the model after ``cases.STEPS`` steps
    (the same clipping and AdamW as the ranks)."""
    from fastpeft.app.savers import causal_lm_loss

    model = cases.peft_model(kind)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cases.LR)
    losses, grads = [], {}
    for step in range(cases.STEPS):
        loss = causal_lm_loss(model, cases.batch())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        losses.append(loss.item())
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        opt.step()
        opt.zero_grad(set_to_none=True)
    return grads, losses, model


@pytest.fixture(scope="module")
def single() -> dict[str, tuple]:
    return {kind: _single_steps(kind) for kind in cases.KINDS}


@pytest.mark.parametrize("strategy", cases.STRATEGIES)
@pytest.mark.parametrize("kind", cases.KINDS)
def test_gradients_and_steps_equal_one_process(launched: Path, single: dict, strategy: str, kind: str) -> None:
    tag = f"{strategy}_{kind}"
    grads, losses, model = single[kind]
    got = load_file(str(launched / f"grads_{tag}.safetensors"))
    assert got.keys() == grads.keys() and len(got) == 28, f"{tag}: gradients of {sorted(got)[:4]}..."
    assert all(bool(g.abs().max() > 0) for g in grads.values()), "a zero gradient would prove nothing"
    for name, want in grads.items():
        assert_close(got[name], want, msg=f"{tag}: gradient of {name}, 2 ranks vs one process")
    got_losses = json.loads((launched / f"losses_{tag}.json").read_text())
    assert_close(torch.tensor(got_losses), torch.tensor(losses), msg=f"{tag}: losses")
    weights = load_file(str(launched / f"weights_{tag}.safetensors"))
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert_close(weights[name], p.detach(), msg=f"{tag}: {name} after {cases.STEPS} AdamW steps")


@pytest.mark.parametrize("kind", cases.KINDS)
def test_fsdp_saved_adapter_loads_in_hf_peft(launched: Path, single: dict, kind: str) -> None:
    import peft

    from fastpeft.loading import dequantize_model
    from fastpeft.peft import quantize_model

    _, _, ours = single[kind]
    base = cases.tiny_llama()
    if kind == "qlora":  # HF PEFT runs the adapter on the weights it was trained against: dequant(NF4)
        quantize_model(base, skip=("lm_head",))
        dequantize_model(base, torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, str(launched / f"adapter_fsdp_{kind}")).eval()
    ids = cases.batch()["input_ids"]
    with torch.no_grad():
        want = ours.eval()(input_ids=ids).logits
        got = theirs(input_ids=ids).logits
        plain = cases.tiny_llama()(input_ids=ids).logits
    assert (want - plain).abs().max() > 1e-3, "the adapter changes nothing: the comparison would prove nothing"
    assert_close(got, want, msg=f"{kind}: HF PEFT on FSDP2's saved adapter vs one process's model")


def _single_finetune(root: Path) -> Path:
    from fastpeft.app.cli import main

    for name, extra in cases.FINETUNE_RUNS:
        flags = [f for f in extra if f not in ("--distributed", "ddp", "fsdp")]
        assert main(cases.finetune_args(root / name, batch_size=cases.BATCH_ROWS) + flags) == 0
    return root


@pytest.fixture(scope="module")
def single_finetune(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _single_finetune(tmp_path_factory.mktemp("single"))


@pytest.mark.parametrize("name", ["ddp_lora", "fsdp_qlora"])
def test_finetune_under_torchrun_equals_one_process(launched: Path, single_finetune: Path, name: str) -> None:
    two, one = launched / name, single_finetune / name
    m2, m1 = (json.loads((d / "metrics.json").read_text()) for d in (two, one))
    assert (m2["world_size"], m2["global_batch"], m2["distributed"]) == (2, 4, name.split("_")[0]), m2
    assert (m1["world_size"], m1["global_batch"], m1["distributed"]) == (1, 4, None), m1
    # fsdp_qlora: 2 steps, then --resume for a third, on both sides
    assert len(m2["losses"]) == len(m1["losses"]) == 3 and m2["steps"] == 3
    assert_close(torch.tensor(m2["losses"]), torch.tensor(m1["losses"]), msg=f"{name}: losses, 2 ranks vs one")
    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in (two, one))
    assert a.keys() == b.keys()
    # AdamW scales each element's update to about lr whatever its gradient's size: where a gradient is near
    # zero, float32 sums in another order (two ranks) move that update by a little, so the weights agree to
    # a small fraction of lr per step rather than to float32 rounding; a wrong gradient is off by ~lr.
    bound = ADAM_FRACTION * cases.FINETUNE_LR * len(m1["losses"])
    for key in a:
        diff = (a[key] - b[key]).abs().max().item()
        assert diff <= bound, f"{name}: {key} of the written adapter differs by {diff:.2e} (bound {bound:.1e})"
    assert json.loads((two / "train_config.json").read_text())["world_size"] == 2
    left = sorted(p.name for p in two.iterdir() if p.name.startswith("."))
    assert not left, f"temporary files left in {two}: {left}"


def test_fsdp_finetune_adapter_loads_in_hf_peft(launched: Path, single_finetune: Path) -> None:
    import peft
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 260, (2, 9), generator=torch.Generator().manual_seed(4))
    logits = []
    for root in (launched, single_finetune):
        model = peft.AutoPeftModelForCausalLM.from_pretrained(str(root / "fsdp_qlora")).eval()
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(str(single_finetune / "fsdp_qlora" / "base_model"))(input_ids=ids)
    effect = (logits[1] - plain.logits).abs().max().item()
    diff = (logits[0] - logits[1]).abs().max().item()
    # the two adapters agree to a small fraction of lr (see above), so their logits agree to a small
    # fraction of what training changed in them
    assert effect > 1e-2, "the adapter changes nothing: the comparison would prove nothing"
    assert diff <= ADAM_FRACTION * effect, f"HF PEFT logits differ by {diff:.2e}; the adapter moves them {effect:.2e}"
