"""tellneo.integrations.trl.FusedGKDTrainer: TRL's GKDTrainer with the fused loss gives the stock trainer's losses
and parameters over a few steps, and needs less peak memory at a vocab-heavy shape."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")

from tellneo.bench import Job, measure_here  # noqa: E402
from tests.integrations.gkd_jobs import collate, make_trainer  # noqa: E402
from tests.recipes.helpers import one_thread  # noqa: E402, F401 (fixture)


@pytest.mark.parametrize("beta", [0.5, 0.0, 1.0])
def test_one_loss_and_its_gradients_equal_the_stock_trainers(tmp_path, beta):
    stock, fused = make_trainer(False, str(tmp_path / "s"), beta=beta), make_trainer(True, str(tmp_path / "f"), beta=beta)
    inputs = collate([stock.train_dataset[i] for i in range(4)])
    results = []
    for trainer in (stock, fused):
        model = trainer.model.train()
        model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(model, dict(inputs), num_items_in_batch=torch.tensor(50))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (ls, gs), (lf, gf) = results
    torch.testing.assert_close(lf, ls, rtol=1e-5, atol=1e-6)
    assert gs.keys() == gf.keys() and len(gs) > 5
    for name in gs:
        torch.testing.assert_close(gf[name], gs[name], rtol=1e-4, atol=1e-6, msg=name)
    assert all(p.grad is None for p in fused.teacher_model.parameters())


def test_a_few_training_steps_match_the_stock_trainer(tmp_path):
    runs = []
    for fused in (False, True):
        trainer = make_trainer(fused, str(tmp_path / str(fused)), steps=3, grad_accum=2)
        trainer.train()
        losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
        runs.append((losses, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}))
    (ls, ps), (lf, pf) = runs
    assert len(ls) == 3 and lf == pytest.approx(ls, rel=1e-4)
    moved = 0
    for name in ps:
        torch.testing.assert_close(pf[name], ps[name], rtol=1e-4, atol=1e-5, msg=name)
    for p0, p1 in zip(make_trainer(False, str(tmp_path / "init")).model.parameters(), ps.values()):
        moved += int(not torch.equal(p0, p1))
    assert moved > 5  # training did change the student


def test_peak_memory_is_lower_at_a_vocab_heavy_shape(tmp_path):
    """Stock GKD holds [B, T, V] logits of both models plus their log-softmaxes and the mixture; the fused loss
    holds O(tokens) statistics and [chunk, V] tiles. Peak RSS growth of one loss + backward, measured in this
    process (the fused run first: memory freed by an earlier run could only hide the stock run's allocations)."""
    shape = dict(vocab=32768, hidden=32, seq=256, batch=2)  # logits: 512 x 32768 x 4 B = 64 MiB per tensor
    fused = measure_here(Job("tests.integrations.gkd_jobs:loss_step", dict(fused=True, output_dir=str(tmp_path / "f"),
                                                                          **shape)), "cpu", 0, 0, timing=False)
    stock = measure_here(Job("tests.integrations.gkd_jobs:loss_step", dict(fused=False, output_dir=str(tmp_path / "s"),
                                                                          **shape)), "cpu", 0, 0, timing=False)
    print(f"peak RSS growth: fused {fused.peak_mb:.0f} MB, stock {stock.peak_mb:.0f} MB")
    assert stock.peak_mb > 3 * 64, stock.peak_mb  # sanity: the stock loss does build several logits-sized tensors
    assert fused.peak_mb < 0.5 * stock.peak_mb, (fused.peak_mb, stock.peak_mb)
