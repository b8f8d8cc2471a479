"""Warm-up in whole steps: the first optimizer step never runs at lr 0, and at least one step runs at the peak."""

from __future__ import annotations

import math

import pytest
from transformers import TrainerCallback

from tellneo.recipes.trainer_utils import warmup_steps
from tests.recipes.helpers import one_thread  # noqa: F401 (fixture)
from tests.recipes.test_neo_trainer import make_trainer


def test_warmup_steps_are_whole_and_leave_a_peak_step():
    assert warmup_steps(0.1, 4) == 0 and warmup_steps(0.1, 24) == 2 and warmup_steps(0.0, 100) == 0
    assert warmup_steps(0.5, 1) == 0 and warmup_steps(0.99, 3) == 2 and warmup_steps(0.5, 0) == 0


class LearningRates(TrainerCallback):
    """The learning rate each optimizer step runs at (read before the step)."""

    def __init__(self):
        self.lrs = []

    def on_step_begin(self, args, state, control, optimizer=None, **kw):
        self.lrs.append(optimizer.param_groups[0]["lr"])


@pytest.mark.parametrize("scheduler, ratio, steps", [("cosine", 0.5, 4), ("linear", 0.1, 4),
                                                     ("constant_with_warmup", 0.6, 5)])
def test_first_step_has_a_learning_rate(tmp_path, scheduler, ratio, steps):
    peak = 1e-2
    seen = LearningRates()
    trainer = make_trainer(tmp_path, lr_scheduler=scheduler, warmup_ratio=ratio, max_steps=steps, learning_rate=peak,
                           callbacks=[seen])
    trainer.train()
    warm = warmup_steps(ratio, steps)
    assert trainer.args.warmup_steps == warm and len(seen.lrs) == steps
    assert seen.lrs[0] > 0 and max(seen.lrs) == pytest.approx(peak)
    # linear warm-up reaching the peak at step `warm`, then the schedule as transformers defines it
    for k in range(1, warm + 1):
        assert seen.lrs[k - 1] == pytest.approx(peak * k / warm)
    after = [peak * {"cosine": 0.5 * (1 + math.cos(math.pi * (s - warm) / (steps - warm))),
                     "linear": (steps - s) / (steps - warm), "constant_with_warmup": 1.0}[scheduler]
             for s in range(warm, steps)]
    assert seen.lrs[warm:] == pytest.approx(after)
