"""One rank of the 2-process CPU (gloo) run the tests in this folder launch once with ``torchrun``.

``python -m torch.distributed.run --nproc-per-node 2 worker.py OUT`` runs every job below on every rank,
in one process group, and writes what the tests compare into ``OUT`` (safetensors and JSON, rank 0):

- ``engines``: LoRA and QLoRA tiny Llamas under DDP and FSDP2 (``fastpeft.app.distributed``), two AdamW steps
  on the global batch ``cases.batch()`` split over the ranks: the first step's gradients, the losses, the
  adapter after the steps (gathered), and the adapter FSDP2's rank 0 saved with ``save_pretrained``.
- ``finetune``: ``fastpeft finetune`` (``fastpeft.app.cli.main``) with ``--distributed ddp`` (LoRA) and
  ``--distributed fsdp`` (QLoRA), the latter then resumed for one more step.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cases  # noqa: E402  (the set-up this folder shares with the single-process side)


def engines(out: Path, rank: int, world: int) -> None:
    from safetensors.torch import save_file

    from fastpeft.app.distributed import DistributedRun
    from fastpeft.app.savers import causal_lm_loss

    for strategy in ("ddp", "fsdp"):
        for kind in cases.KINDS:
            model = cases.peft_model(kind)
            run = DistributedRun(rank, world, rank, torch.device("cpu"), strategy)
            run.wrap(model, causal_lm_loss)
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=cases.LR)
            losses, grads = [], {}
            for step in range(cases.STEPS):
                loss, _ = run.accumulate([cases.batch()], params)
                losses.append(loss.item())
                if step == 0:
                    # gathered on every rank (a collective), written by rank 0
                    grads = {n: cases.full(p.grad) for n, p in model.named_parameters() if p.requires_grad}
                opt.step()
                opt.zero_grad(set_to_none=True)
            with run.full_parameters(model):
                weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
                if rank == 0:
                    model.save_pretrained(str(out / f"adapter_{strategy}_{kind}"))
            if rank == 0:
                tag = f"{strategy}_{kind}"
                save_file({k: v.contiguous() for k, v in grads.items()}, str(out / f"grads_{tag}.safetensors"))
                save_file({k: v.contiguous() for k, v in weights.items()}, str(out / f"weights_{tag}.safetensors"))
                (out / f"losses_{tag}.json").write_text(json.dumps(losses))
            dist.barrier()


def finetune(out: Path) -> None:
    from fastpeft.app.cli import main

    for name, extra in cases.FINETUNE_RUNS:
        status = main(cases.finetune_args(out / name, batch_size=cases.BATCH_ROWS // 2) + [*extra])
        if status != 0:
            raise SystemExit(f"fastpeft finetune {name} exited with {status}")


def run_all(out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # fastpeft.app.distributed.setup joins it (and leaves it open)
    rank, world = dist.get_rank(), dist.get_world_size()
    engines(out, rank, world)
    finetune(out)
    if rank == 0:
        (out / "done").write_text("ok\n")
    dist.barrier()  # no rank closes its connections while another still sends
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    run_all(Path(sys.argv[1]))
