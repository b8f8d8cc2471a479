"""Multi-process NEO: 2 CPU processes (torchrun, gloo DDP) give the losses and parameters of one process with the
same global batch, and the ranks read disjoint rows that together are the single process's rows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def _run(args: list[str], tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@pytest.mark.slow
def test_two_process_ddp_equals_one_process(tmp_path):
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKER),
          str(tmp_path / "ddp")], tmp_path)
    _run([sys.executable, str(WORKER), str(tmp_path / "single"), "--single"], tmp_path)
    r0, r1 = (torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in (0, 1))
    single = torch.load(tmp_path / "single" / "rank0.pt")
    assert r0["world_size"] == r1["world_size"] == 2 and single["world_size"] == 1

    # data: per step, rank 0 and rank 1 read disjoint rows that together are the single process's global batch
    # (loaders may fetch one batch ahead: only the first 3 steps were trained)
    assert len(r0["indices"]) >= 3 and len(r1["indices"]) >= 3 and len(single["indices"]) >= 6
    for step in range(3):
        a, b = set(r0["indices"][step]), set(r1["indices"][step])
        assert not a & b
        assert a | b == set(single["indices"][2 * step]) | set(single["indices"][2 * step + 1])

    # the same losses (logged as the global-batch mean) and the same parameters after 3 optimizer steps
    for (s0, l0, ce0, kd0), (s1, l1, _, _), (s, l, ce, kd) in zip(r0["losses"], r1["losses"], single["losses"]):
        assert s0 == s1 == s and l0 == pytest.approx(l, rel=1e-5) and l1 == pytest.approx(l, rel=1e-5)
        assert ce0 == pytest.approx(ce, rel=1e-4) and kd0 == pytest.approx(kd, rel=1e-4)
    assert len(single["losses"]) == 3
    assert r0["params"].keys() == single["params"].keys()
    for name, value in single["params"].items():
        torch.testing.assert_close(r0["params"][name], value, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(r1["params"][name], value, rtol=1e-5, atol=1e-6, msg=name)
