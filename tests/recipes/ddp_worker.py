"""A few NEO steps on a tiny Llama, run either under ``torchrun`` (DDP over gloo, per-device batch 2) or in one
process with gradient accumulation 2 (same global batch). Saves losses, LoRA parameters and the dataset rows each
process read to ``OUT/rank<r>.pt``. Used by test_ddp.py.

    torchrun --standalone --nproc-per-node 2 tests/recipes/ddp_worker.py OUT
    python tests/recipes/ddp_worker.py OUT --single
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

STEPS = 3


class RecordingDataset(torch.utils.data.Dataset):
    """Forwards to a PackedDataset and records every item index it serves."""

    def __init__(self, dataset):
        self.dataset, self.indices = dataset, []

    def __len__(self):
        return len(self.dataset)

    def set_epoch(self, epoch):
        self.dataset.set_epoch(epoch)

    def __getitem__(self, i):
        return self.__getitems__([i])[0]

    def __getitems__(self, indices):
        self.indices.append(list(indices))
        return self.dataset.__getitems__(indices)


def run(out: Path, single: bool) -> None:
    from tellneo.data import PackedCollator, PackedDataset
    from tellneo.recipes.common import LoraSettings, attach_lora
    from tellneo.recipes.neo import KDSettings, NeoTrainer, build_student
    from tellneo.recipes.training import TrainSettings
    from tests.recipes.helpers import learnable_store, tiny_teacher

    torch.set_num_threads(1)
    teacher = tiny_teacher()
    torch.manual_seed(1)
    student = attach_lora(build_student(teacher, "every_other"), LoraSettings(r=4, alpha=8, dropout=0.0))
    data = RecordingDataset(PackedDataset(learnable_store(n=96), 64, seed=0))
    settings = TrainSettings(batch_size=2, grad_accum=2 if single else 1, max_steps=STEPS, learning_rate=1e-2,
                             lr_scheduler="constant", warmup_ratio=0.0, save_steps=1000)
    args = settings.training_arguments(out / "ckpt", disable_tqdm=True, save_strategy="no")
    trainer = NeoTrainer(model=student, args=args, train_dataset=data, data_collator=PackedCollator(),
                         teacher=teacher, kd=KDSettings(alpha=0.5))
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    torch.save({
        "world_size": trainer.accelerator.num_processes,
        "losses": [(r["step"], r["loss"], r["ce"], r["kd"]) for r in trainer.state.log_history if "loss" in r],
        "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad},
        "indices": data.indices,
    }, out / f"rank{rank}.pt")


if __name__ == "__main__":
    target = Path(sys.argv[1])
    target.mkdir(parents=True, exist_ok=True)
    run(target, "--single" in sys.argv)
