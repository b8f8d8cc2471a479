"""FSDP2: NeoTrainer.compute_loss with the student AND the teacher sharded by ``fully_shard`` (2 CPU processes,
gloo) gives the unsharded loss on every rank and FSDP's mean of the unsharded gradients, for a head in the root's
parameter group and for a head sharded on its own, and for two families with different logit transforms."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests.recipes.test_ddp import _run

WORKER = Path(__file__).with_name("fsdp_worker.py")


@pytest.mark.slow
def test_fsdp2_sharded_student_and_teacher_equal_unsharded(tmp_path):
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKER),
          str(tmp_path / "fsdp")], tmp_path)
    for rank in (0, 1):
        report = torch.load(tmp_path / "fsdp" / f"rank{rank}.pt")
        assert report["world_size"] == 2
        assert set(report["cases"]) == {"llama", "gemma2<-granite"}
        for name, case in report["cases"].items():
            assert case["loss_err"] <= 1e-6, (rank, name, case["loss"], case["ref_loss"])
            assert case["grad_norm"] > 0  # every parameter has a gradient to compare
            worst = max(case["grad_err"].items(), key=lambda kv: kv[1])
            assert worst[1] <= 1e-5, (rank, name, worst)
        # the loss read a sharded (DTensor) head: the teacher's in both cases, the student's untied Llama head too
        assert report["cases"]["llama"]["head_weights"][::2] == ["DTensor", "DTensor"]
        assert report["cases"]["gemma2<-granite"]["head_weights"][::2] == ["DTensor", "Parameter"]
    # the ranks trained on different rows (so the gradient mean is a real test)
    r0, r1 = (torch.load(tmp_path / "fsdp" / f"rank{r}.pt") for r in (0, 1))
    assert r0["cases"]["llama"]["loss"] != r1["cases"]["llama"]["loss"]
