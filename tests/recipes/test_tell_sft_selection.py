"""SFT's exposures (k passes, each a fresh shuffle, packed pass by pass), best-of-k on the dev split
(:mod:`tellneo.recipes.dev_selection`), and the neutral-anchor ablation (issue 14)."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch

from tellneo.data.tasks import TASKS
from tellneo.data.tell import NEUTRAL_ANCHOR_PASSAGE, neutral_anchor_text
from tellneo.recipes.dev_selection import BEST_FILE, SCORES_FILE, DevSelection
from tellneo.recipes.tell import TellConfig, build_tell_dataset, pass_end_steps, task_exposure
from tellneo.recipes.training import TrainSettings
from tests.recipes.test_tell_recipe import stores


@pytest.mark.parametrize("n, k, batch", [(1, 3, 1), (5, 4, 2), (12, 2, 3)])
def test_sft_passes_show_each_sample_k_times_in_fresh_orders(n, k, batch):
    task, _ = stores(n_task=n)
    cfg = TellConfig(method="sft", exposures=k, seq_len=64, train=TrainSettings(seed=4))
    ds = build_tell_dataset(task, None, cfg, pad_id=0, min_rows=batch)
    assert ds.repeats == k and ds.pass_size == n and len(ds) % batch == 0
    store = ds.store
    assert len(store) == n * k
    passes = [store.lengths[i * n:(i + 1) * n] for i in range(k)]
    for p in passes:  # each pass holds every sample once
        assert np.array_equal(np.sort(p), np.sort(task.lengths))
    # rows are read pass by pass: a row never mixes samples of two passes (one packing window per pass)
    pass_of_row = {}
    for sample, row in zip(ds.plan.sample, ds.plan.row):
        pass_of_row.setdefault(int(row), set()).add(int(sample) // n)
    assert all(len(v) == 1 for v in pass_of_row.values())
    assert sorted(min(v) for v in pass_of_row.values()) == [min(v) for v in pass_of_row.values()]
    # the whole epoch shows exactly N*k task samples; pass k ends at the step holding its last row
    steps = pass_end_steps(ds, range(1, k + 1), batch)
    assert task_exposure(ds, ds.steps_per_epoch(batch), batch)["task_samples"] == n * k
    for j, s in steps.items():
        shown = task_exposure(ds, s, batch)["task_samples"]
        assert n * j <= shown < n * j + n * batch  # the step may start pass j + 1, never ends before pass j
        if s > 1:
            assert task_exposure(ds, s - 1, batch)["task_samples"] < n * j


def test_sft_pass_orders_differ_and_follow_the_seed():
    task, _ = stores(n_task=20)
    a = build_tell_dataset(task, None, TellConfig(method="sft", exposures=3, train=TrainSettings(seed=1)), pad_id=0)
    b = build_tell_dataset(task, None, TellConfig(method="sft", exposures=3, train=TrainSettings(seed=1)), pad_id=0)
    c = build_tell_dataset(task, None, TellConfig(method="sft", exposures=3, train=TrainSettings(seed=2)), pad_id=0)
    assert np.array_equal(a.store.lengths, b.store.lengths) and not np.array_equal(a.store.lengths, c.store.lengths)
    first, second = a.store.lengths[:20], a.store.lengths[20:40]
    assert not np.array_equal(first, second)  # a fresh shuffle per pass (20 samples of 7 lengths: not equal)


class TinyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))
        self.frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)


def test_dev_selection_scores_at_the_pass_steps_keeps_the_best_and_restores_it(tmp_path):
    dev_accuracy = {2: 0.5, 4: 0.75, 6: 0.75, 9: 0.25}  # step -> dev accuracy; steps 4 and 6 tie
    calls = []

    def score(model, label):
        calls.append(label)
        step = state.global_step
        return {"accuracy": dev_accuracy[step], "correct": int(dev_accuracy[step] * 4), "n": 4}

    model, state = TinyModel(), types.SimpleNamespace(global_step=0)
    sel = DevSelection({1: 2, 2: 4, 4: 6, 8: 9}, score, tmp_path)
    for step in range(1, 10):
        state.global_step = step
        with torch.no_grad():
            model.w.fill_(float(step))  # the weights of step s are all s
        sel.on_step_end(None, state, None, model=model)
    assert len(calls) == 4 and sel.best() == 2  # 0.75 at passes 2 and 4: the tie goes to fewer passes
    with torch.no_grad():
        model.w.zero_()
    assert sel.restore_best(model) == 2 and torch.equal(model.w, torch.full((3,), 4.0))
    assert torch.equal(model.frozen, torch.ones(2))  # only trainable weights were kept
    saved = json.loads((tmp_path / SCORES_FILE).read_text())
    assert saved["chosen"] == 2 and saved["scores"]["8"]["accuracy"] == 0.25 and saved["checkpoints"]["4"] == 6

    resumed = DevSelection({1: 2, 2: 4, 4: 6, 8: 9}, score, tmp_path)  # a resumed run scores nothing twice
    state.global_step = 4
    resumed.on_step_end(None, state, None, model=model)
    assert len(calls) == 4 and resumed.best() == 2


def test_a_step_that_ends_several_checkpoints_is_scored_once_and_credited_to_the_largest(tmp_path):
    """A tiny task set: one optimizer step can finish passes 2 and 4; the model there has seen 4 passes."""
    calls = []
    sel = DevSelection({2: 1, 4: 1, 8: 3}, lambda m, label: calls.append(label) or {"accuracy": 0.5, "correct": 2,
                                                                                      "n": 4}, tmp_path)
    state = types.SimpleNamespace(global_step=1)
    sel.on_step_end(None, state, None, model=TinyModel())
    assert len(calls) == 1 and set(sel.scores) == {2, 4} and sel.best() == 4


def test_dev_selection_refuses_to_choose_among_unscored_checkpoints(tmp_path):
    sel = DevSelection({1: 2, 2: 4}, lambda m, label: {"accuracy": 1.0, "correct": 1, "n": 1}, tmp_path)
    state = types.SimpleNamespace(global_step=2)
    sel.on_step_end(None, state, None, model=TinyModel())
    with pytest.raises(RuntimeError, match=r"checkpoints \[2\] were not scored"):
        sel.restore_best(TinyModel())
    (tmp_path / BEST_FILE).unlink()
    state.global_step = 4
    sel.on_step_end(None, state, None, model=TinyModel())  # 1.0 again: the tie keeps k=1, nothing saved
    with pytest.raises(RuntimeError, match="missing"):
        sel.restore_best(TinyModel())


@pytest.mark.parametrize("length", [0, 1, 2, 3, 17, 200, 1024, 5000])
def test_neutral_anchor_has_the_length_and_no_instruction(length):
    text = neutral_anchor_text(length)
    assert len(text) == length and text == neutral_anchor_text(length)
    if length > 2:
        assert text.endswith("\n\n") and (NEUTRAL_ANCHOR_PASSAGE * 40).startswith(text.rstrip())


@pytest.mark.parametrize("task", sorted(TASKS))
def test_neutral_anchor_shares_no_task_word(task):
    anchor = TASKS[task].anchor_prompt
    neutral = neutral_anchor_text(len(anchor))
    words = lambda s: {w.strip(".,:;'\"()").lower() for w in s.split()}  # noqa: E731
    content = {w for w in words(anchor) if len(w) > 3}  # "date", "json", "name", "amount", "status", ...
    assert not content & words(neutral), content & words(neutral)
    for marker in ("{", "}", '"', "-", "YYYY", ":"):
        assert marker not in neutral
    cfg = TellConfig(task=task, neutral_anchor=True)
    assert cfg.anchor_text(anchor) == neutral and TellConfig(task=task).anchor_text(anchor) == anchor
    assert TellConfig(task=task, method="sft").anchor_text(anchor) == ""
    assert TellConfig(task=task, method="sft", use_anchor=True, neutral_anchor=True).anchor_text(anchor) == neutral
    with pytest.raises(ValueError):
        neutral_anchor_text(-1)
