"""TELL exposure counting (issue 14 §1): N*k task samples shown, general samples drawn at random and reused
(counted) or refused when the pool is too small, today's default mix and manifest unchanged."""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import pytest
import torch

from tellneo.data import TokenStore
from tellneo.recipes.errors import RecipeError
from tellneo.recipes.records import general_records
from tellneo.recipes.tell import TellConfig, build_tell_dataset, draw_general, task_exposure
from tellneo.recipes.training import TrainSettings
from tests.recipes.helpers import smollm2_tokenizer  # noqa: F401 (fixture)
from tests.recipes.test_tell_recipe import stores


@pytest.mark.parametrize("n, k, r", [(6, 1, 1.0), (6, 3, 4.0), (4, 5, 2.5), (10, 2, 1.0)])
def test_mix_holds_n_times_k_task_samples_each_k_times(n, k, r):
    task, general_pool = stores(n_task=n, n_general=400)
    cfg = TellConfig(seq_len=64, window=16, exposures=k, general_per_task=r, train=TrainSettings(seed=2))
    need = cfg.general_needed(n)
    assert need == round(n * k * r)
    general, counts = draw_general(general_pool, need)
    assert counts == {"general_unique": need, "general_reused": 0}
    ds = build_tell_dataset(task, general, cfg, pad_id=0)
    assert int(ds.is_task.sum()) == n * k and len(ds.is_task) == n * k + need
    # every task sample exactly k times: the task tokens of each sample appear k times in the mixed store
    task_lengths = np.sort(ds.store.lengths[ds.is_task])
    assert np.array_equal(task_lengths, np.sort(np.repeat(task.lengths, k)))
    # the whole epoch read (one global batch of every row): N*k task samples and every general sample shown
    ex = task_exposure(ds, steps=1, global_batch=len(ds))
    assert ex["task_samples"] == n * k and ex["general_samples"] == need
    assert ex["task_tokens"] + ex["general_tokens"] == ex["all_tokens"]


def test_exposure_is_not_capped_by_the_general_pool():
    """The former mix caps task slots at ~G*ratio/(1-ratio); with k the task count no longer depends on G."""
    task, general_pool = stores(n_task=8, n_general=16)
    capped = build_tell_dataset(task, general_pool, TellConfig(seq_len=64, window=16, exposures=None, task_ratio=0.5),
                                pad_id=0)
    assert int(capped.is_task.sum()) == 16  # 1:1 with 16 general samples: 2 per task sample
    cfg = TellConfig(seq_len=64, window=16, exposures=10, general_per_task=1.0)
    general, counts = draw_general(general_pool, cfg.general_needed(8))
    ds = build_tell_dataset(task, general, cfg, pad_id=0)
    assert int(ds.is_task.sum()) == 80 and counts == {"general_unique": 16, "general_reused": 64}


def test_small_pool_is_reused_in_order_with_one_log_line(caplog):
    _, pool = stores(n_general=5)
    with caplog.at_level(logging.WARNING, logger="tellneo"):
        out, counts = draw_general(pool, 12)
    assert len(caplog.records) == 1 and "too small" in caplog.records[0].getMessage()
    assert counts == {"general_unique": 5, "general_reused": 7}
    assert np.array_equal(out.lengths, pool.lengths[np.arange(12) % 5])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tellneo"):
        same, counts = draw_general(pool, 5)
    assert not caplog.records and counts["general_reused"] == 0 and len(same) == 5


def test_small_pool_is_refused_without_reuse_naming_the_flags():
    _, pool = stores(n_general=5)
    with pytest.raises(RecipeError, match="--general-reuse") as err:
        draw_general(pool, 12, reuse=False)
    assert "--exposures" in str(err.value) and "--general-per-task" in str(err.value) and "12" in str(err.value)


def test_seeded_general_draw_is_not_the_first_k():
    first, _ = general_records(None, 40)
    drawn, what = general_records(None, None, seed=3)
    assert [r for r in drawn[:40]] != first and "seed 3" in what
    assert drawn[:40] == general_records(None, None, seed=3)[0][:40]  # the same seed draws the same
    assert drawn[:40] != general_records(None, None, seed=4)[0][:40]


def test_ratio_spellings_and_bad_values():
    assert TellConfig(general_per_task=4.0).effective_task_ratio() == pytest.approx(0.2)
    assert TellConfig(task_ratio=0.2, general_per_task=4.0).resolve()  # consistent: accepted
    with pytest.raises(RecipeError, match="disagree"):
        TellConfig(task_ratio=0.25, general_per_task=4.0).resolve()
    assert TellConfig(task_ratio=0.2).general_per_task_occurrence() == pytest.approx(4.0)
    assert TellConfig().general_per_task_occurrence() == 4.0 and TellConfig().passes() == 8  # the paper's shape
    for bad, says in ((dict(exposures=0), "positive integer"), (dict(exposures=-2), "positive integer"),
                      (dict(exposures=True), "positive integer"), (dict(general_per_task=0.0), "positive number"),
                      (dict(general_per_task=-1.0), "positive number"), (dict(exposures=(4, 8)), "--method sft"),
                      (dict(method="sft", exposures=(4, 4)), "repeated"), (dict(method="sft", exposures=()),
                                                                           "positive integer"),
                      (dict(exposures=2, train=TrainSettings(epochs=3.0)), "leave --epochs at 1"),
                      (dict(neutral_anchor=True, use_anchor=False), "needs an anchored arm")):
        with pytest.raises(RecipeError, match=says):
            TellConfig(**bad).resolve()
    assert TellConfig(method="sft", exposures=3).resolve()  # SFT: 3 passes


def test_former_mix_and_manifest_unchanged():
    """exposures=None (the compute-matched arms already recorded) keeps its mix and its manifest (and hash)."""
    task, general = stores()
    cfg = TellConfig(seq_len=64, window=16, exposures=None, task_ratio=0.5, general=None, train=TrainSettings(seed=3))
    ds = build_tell_dataset(task, general, cfg, pad_id=0)
    from tellneo.data import tell_mix_store

    ref, is_task = tell_mix_store(task, general, anchor_ids=[], task_ratio=0.5, seed=3, epoch=0)
    ds.set_epoch(0)
    assert np.array_equal(ds.is_task, is_task) and np.array_equal(ds.store.tokens, ref.tokens)
    from tellneo.data.tell import mix_order

    a, b = mix_order(6, 60, task_ratio=0.5, seed=3, epoch=0)  # the order recorded before exposure counting
    assert hashlib.sha256(a.tobytes() + b.tobytes()).hexdigest()[:16] == "ce4872e7ad9da194"
    m = cfg.manifest()
    assert not {"exposures", "general_per_task", "general_reuse", "dev_samples", "neutral_anchor"} & set(m)
    assert m["task_ratio"] == 0.5 and m["general"] is None
    counted = TellConfig(exposures=2).manifest()
    assert counted["exposures"] == 2 and counted["general_reuse"] is True


def test_counted_general_reads_the_seeded_pool_past_overlong_records(smollm2_tokenizer):  # noqa: F811
    """The recipe's general draw: records tokenized in order until N*k*r fit seq_len; overlong ones are skipped
    (and counted as dropped), a pool that runs out is reused."""
    from tellneo.recipes.tell import _TellRun

    records = [{"prompt": f"q{i}", "response": ("long " * 200) if i % 3 == 0 else f"short answer {i}"}
               for i in range(90)]  # 30 overlong, 60 short
    run = _TellRun(TellConfig(seq_len=64, exposures=1, general_per_task=5.0))
    run.tokenizer = smollm2_tokenizer
    vocab = len(smollm2_tokenizer)
    store, dropped = run._counted_general(records, 40, vocab)
    assert len(store) == 40 and run.general_counts == {"general_unique": 40, "general_reused": 0}
    assert int(store.lengths.max()) <= 64 and dropped == 22  # one chunk of 64 records: 42 short ones, 40 kept
    store, dropped = run._counted_general(records, 100, vocab)
    assert len(store) == 100 and dropped == 30 and run.general_counts == {"general_unique": 60, "general_reused": 40}
    run.cfg.general_reuse = False
    with pytest.raises(RecipeError, match="60 usable samples"):
        run._counted_general(records, 100, vocab)


def test_no_task_sample_is_dropped_with_a_partial_last_batch():
    """The trainer drops a partial last global batch: with exposures the epoch is filled up to whole batches
    with filler rows (no labels), so every one of the N*k task samples is read."""
    task, pool = stores(n_task=6, n_general=400)
    cfg = TellConfig(seq_len=64, window=16, exposures=2, general_per_task=4.0)
    general, _ = draw_general(pool, cfg.general_needed(6))
    plain = build_tell_dataset(task, general, cfg, pad_id=0)
    assert len(plain) == plain.num_rows and task_exposure(plain, 1, len(plain))["task_samples"] == 12
    batch = plain.num_rows // 2 + 1  # a global batch that leaves a partial last one of num_rows - batch rows
    ds = build_tell_dataset(task, general, cfg, pad_id=0, min_rows=batch)
    assert ds.num_rows == plain.num_rows and len(ds) == 2 * batch and ds.steps_per_epoch(batch) == 2
    assert task_exposure(ds, ds.steps_per_epoch(batch), batch)["task_samples"] == 12  # none dropped
    rows = ds.batch(list(range(len(ds))))
    assert bool((rows["labels"][ds.num_rows:] == -100).all())  # filler rows train nothing
    assert torch.equal(rows["input_ids"][: ds.num_rows], plain.batch(list(range(plain.num_rows)))["input_ids"])
