"""NeoTrainer.compute_loss with an FSDP2-sharded student AND teacher (``fully_shard`` per decoder layer and at the
root), 2 CPU processes over gloo, against unsharded copies of the same models. Each rank trains on its own rows;
FSDP2 averages the gradients over ranks, so the reference is the mean of the ranks' unsharded gradients. Writes
``OUT/rank<r>.pt`` with the largest relative differences. Used by test_fsdp.py.

    torchrun --standalone --nproc-per-node 2 tests/recipes/fsdp_worker.py OUT
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _shard(model: torch.nn.Module, mesh) -> torch.nn.Module:
    """Each decoder layer, an untied lm_head (so its weight is a resharded DTensor when the loss reads it) and the
    root."""
    from torch.distributed.fsdp import fully_shard

    from tellneo.recipes.common import decoder_of

    for layer in decoder_of(model).layers:
        fully_shard(layer, mesh=mesh)
    if not model.config.tie_word_embeddings:
        fully_shard(model.get_output_embeddings(), mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _cases():
    from tellneo.recipes.neo import build_student
    from tests.recipes.families import tiny_family_model
    from tests.recipes.helpers import tiny_teacher

    teacher = tiny_teacher()
    torch.manual_seed(1)
    yield "llama", build_student(teacher, "every_other"), teacher
    # different families, each with its own final-logit transform (soft-capped student, scaled teacher)
    yield "gemma2<-granite", tiny_family_model("gemma2", seed=1), tiny_family_model("granite", seed=2)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def run(out: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from tellneo.data import PackedCollator, PackedDataset
    from tellneo.recipes.neo import KDSettings, NeoTrainer
    from tellneo.recipes.training import TrainSettings
    from tests.recipes.helpers import learnable_store

    torch.set_num_threads(1)
    args = TrainSettings(max_steps=1).training_arguments(out / "ckpt", disable_tqdm=True, save_strategy="no")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2
    mesh = init_device_mesh("cpu", (world,))
    rows = PackedDataset(learnable_store(n=48), 32, seed=0)
    batch = PackedCollator()(rows.__getitems__([2 * rank, 2 * rank + 1]))  # each rank its own rows
    kd = KDSettings(alpha=0.6)
    report = {"world_size": world, "cases": {}}
    import tellneo.recipes.head as head_module

    gathered = []  # the head weights the loss read, as what they were before gathering
    full = head_module._full
    head_module._full = lambda t: (gathered.append(type(t).__name__), full(t))[1]
    for name, student, teacher in _cases():
        student.train()
        ref_student, ref_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
        ref = NeoTrainer(model=ref_student, args=args, train_dataset=None, data_collator=PackedCollator(),
                         teacher=ref_teacher, kd=kd)
        ref_loss = ref.compute_loss(ref_student, dict(batch))
        ref_loss.backward()
        ref_loss = ref_loss.detach()
        ref_grads = {}
        for n, p in ref_student.named_parameters():
            g = p.grad.clone()
            dist.all_reduce(g)
            ref_grads[n] = g / world

        sharded_student, sharded_teacher = _shard(student, mesh), _shard(teacher, mesh)
        assert all(isinstance(p, DTensor) for p in sharded_teacher.parameters())
        trainer = NeoTrainer(model=sharded_student, args=args, train_dataset=None, data_collator=PackedCollator(),
                             teacher=sharded_teacher, kd=kd)
        gathered.clear()
        loss = trainer.compute_loss(sharded_student, dict(batch))
        loss.backward()
        loss = loss.detach()
        grad_err = {}
        for n, p in sharded_student.named_parameters():
            assert isinstance(p, DTensor) and isinstance(p.grad, DTensor), n
            grad_err[n] = _rel(p.grad.full_tensor(), ref_grads[n])
        report["cases"][name] = {"loss": float(loss), "ref_loss": float(ref_loss),
                                 "loss_err": abs(float(loss) - float(ref_loss)) / abs(float(ref_loss)),
                                 "grad_err": grad_err, "head_weights": list(gathered),
                                 "grad_norm": min(float(g.norm()) for g in ref_grads.values())}
    torch.save(report, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    target = Path(sys.argv[1])
    target.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run(target)
