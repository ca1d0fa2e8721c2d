"""``transformers.Trainer`` fine-tuning a fastpeft LoRA model: ``trainer_job.py OUT BATCH_SIZE``.

Run by one process, or by ``accelerate launch --multi_gpu --num_processes 2`` (DDP; on a machine without
GPUs accelerate starts the processes with torchrun and they join a gloo group). Rank 0 writes
``OUT/adapter`` (``save_pretrained``) and ``OUT/losses.json`` (the logged loss of every step).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cases  # noqa: E402

ROWS, LENGTH, STEPS = 8, 10, 2


class Rows(torch.utils.data.Dataset):
    """Unpadded rows of one length: every rank's mean loss covers as many tokens as the others'."""

    def __init__(self) -> None:
        self.ids = torch.randint(3, cases.VOCAB, (ROWS, LENGTH), generator=torch.Generator().manual_seed(7))

    def __len__(self) -> int:
        return ROWS

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(out: Path, batch_size: int) -> None:
    from transformers import Trainer, TrainingArguments

    model = cases.peft_model("lora")
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=batch_size, max_steps=STEPS, learning_rate=cases.LR,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(), seed=0,
        dataloader_num_workers=0,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=Rows())
    trainer.train()
    if trainer.is_world_process_zero():
        model.save_pretrained(str(out / "adapter"))
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        (out / "losses.json").write_text(json.dumps(losses))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
