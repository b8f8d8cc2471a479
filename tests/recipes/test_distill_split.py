"""Distill's held-out / validation / train split: a fixed eval seed across training seeds, disjoint sets, and the
default (eval_seed None, no validation) exactly today's split."""

from __future__ import annotations

import pytest

from tellneo.recipes import distill
from tellneo.recipes.distill import DistillConfig, split_distill_records
from tellneo.recipes.errors import RecipeError
from tellneo.recipes.records import split_records
from tellneo.recipes.training import TrainSettings

RECORDS = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(50)]


def _ids(records):
    return [r["prompt"] for r in records]


def test_default_split_is_split_records_as_before():
    for seed in (0, 1, 17):
        train, held_out = split_records(RECORDS, 8, seed)
        assert split_distill_records(RECORDS, 8, 0, seed) == (train, held_out, [])


def test_validation_is_disjoint_and_does_not_move_the_held_out_set():
    train, held_out, validation = split_distill_records(RECORDS, 8, 6, seed=1234)
    assert (len(train), len(held_out), len(validation)) == (36, 8, 6)
    a, b, c = set(_ids(train)), set(_ids(held_out)), set(_ids(validation))
    assert not (a & b) and not (a & c) and not (b & c) and a | b | c == set(_ids(RECORDS))
    assert held_out == split_records(RECORDS, 8, 1234)[1]  # the same held-out records with or without validation
    assert _ids(train) == sorted(_ids(train), key=lambda p: int(p[1:]))  # original order kept
    with pytest.raises(RecipeError, match="cannot hold out 50 of 50"):
        split_distill_records(RECORDS, 25, 25, seed=0)
    with pytest.raises(RecipeError, match="validation-samples must be >= 0"):
        split_distill_records(RECORDS, 8, -1, seed=0)


class _Stop(Exception):
    pass


def _split_seed(monkeypatch, general_path, **cfg_kwargs):
    """The seed and record set the distill run splits with (stopped right after the split: no model loaded)."""
    seen = {}

    def spy(records, eval_samples, validation_samples, seed):
        seen["split"] = split_distill_records(records, eval_samples, validation_samples, seed)
        seen["seed"] = seed
        raise _Stop

    monkeypatch.setattr(distill, "split_distill_records", spy)
    run = distill._DistillRun(DistillConfig(data=str(general_path), max_samples=None, eval_samples=8, **cfg_kwargs))
    with pytest.raises(_Stop):
        run.prepare(lambda stage: None, {})
    return seen


def test_eval_seed_fixes_the_held_out_records_across_training_seeds(monkeypatch, tmp_path):
    import json

    path = tmp_path / "g.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    runs = [_split_seed(monkeypatch, path, eval_seed=1234, validation_samples=4, train=TrainSettings(seed=s))
            for s in (0, 1)]
    assert runs[0]["seed"] == runs[1]["seed"] == 1234
    assert runs[0]["split"] == runs[1]["split"]
    default = [_split_seed(monkeypatch, path, train=TrainSettings(seed=s))["seed"] for s in (0, 1)]
    assert default == [0, 1]  # eval_seed None: the training seed, as before


def test_manifest_keeps_its_identity_at_the_defaults_and_checks_the_new_fields():
    assert "eval_seed" not in DistillConfig().manifest() and "validation_samples" not in DistillConfig().manifest()
    m = DistillConfig(eval_seed=7, validation_samples=4).manifest()
    assert m["eval_seed"] == 7 and m["validation_samples"] == 4
    with pytest.raises(RecipeError, match="validation-samples must be >= 0"):
        DistillConfig(validation_samples=-1).resolve()
    with pytest.raises(RecipeError, match="eval-seed must be"):
        DistillConfig(eval_seed=-3).resolve()
