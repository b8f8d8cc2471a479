"""The TELL paper protocol driver (issue 14): its plan, configs, statistics, table and plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.methods import runner, tell_paper
from benchmarks.methods.tell_paper import SCALES, Arm, analysis, config, plan

CPU = SCALES["cpu"]


def test_plan_covers_every_arm_seed_and_budget_once():
    runs = plan(CPU)
    labels = [a.label for a in runs]
    assert len(labels) == len(set(labels))
    for seed in CPU.seeds:
        for n in CPU.budgets:
            for arm in tell_paper.MAIN_ARMS:
                assert sum(a.arm == arm and a.budget == n and a.seed == seed and a.task == CPU.task and
                           (a.ratio in (None, CPU.general_per_task)) for a in runs) == 1
        for r in CPU.ratio_grid:
            assert [a.budget for a in runs if a.seed == seed and a.ratio == r and a.arm == "tell"] == \
                list(CPU.ratio_budgets)
        for n in CPU.smoke_budgets:
            assert {a.arm for a in runs if a.task == CPU.smoke_task and a.budget == n and a.seed == seed} == \
                set(tell_paper.MAIN_ARMS)
    assert {a.arm for a in plan(CPU, ["sft", "tell-r16"])} == {"sft", "tell"}
    assert {a.ratio for a in plan(CPU, ["tell-r16"])} == {16.0}
    gpu = SCALES["gpu"]  # the protocol: N up to 1024, 5 seeds, 1,000 test prompts
    assert max(gpu.budgets) == 1024 and len(gpu.seeds) == 5 and gpu.test_samples == 1000


def test_configs_are_the_recipe_arms_and_the_splits_are_shared_and_nested(tmp_path):
    from tellneo.recipes.tell import dev_pairs, task_data

    seen = {}
    for a in [Arm("sft", "json_record", 4, 1), Arm("sft-anchor", "json_record", 4, 1),
              Arm("tell", "json_record", 4, 1, 4.0), Arm("tell", "json_record", 8, 1, 4.0),
              Arm("tell-neutral-anchor", "json_record", 4, 1, 4.0), Arm("tell-end", "json_record", 4, 1, 4.0),
              Arm("tell-no-anchor", "json_record", 4, 1, 4.0), Arm("tell", "json_record", 4, 1, 16.0)]:
        cfg = runner.tell_config(json.loads(json.dumps(config(a, CPU))), tmp_path / a.label)
        cfg.resolve()
        train, test, _, _, _ = task_data(cfg)
        seen[a.label] = (train, test)
        sft = a.arm.startswith("sft")
        assert (cfg.method == "sft") == sft and cfg.selecting == sft
        assert cfg.anchored == (a.arm not in ("sft", "tell-no-anchor"))
        assert cfg.neutral_anchor == (a.arm == "tell-neutral-anchor") and cfg.general == "mixed"
        assert cfg.train.lr_scheduler == "constant" and cfg.train.learning_rate == CPU.learning_rate
        if not sft:
            assert cfg.passes() == CPU.exposures and cfg.general_per_task_occurrence() == a.ratio
        if sft:
            dev = dev_pairs(cfg)
            assert len(dev) == CPU.dev_samples and not {p["prompt"] for p in dev} & {p["prompt"] for p in test}
            assert not {p["prompt"] for p in dev} & {p["prompt"] for p in train}
    tests = {json.dumps(t) for _, t in seen.values()}
    assert len(tests) == 1 and len(next(iter(seen.values()))[1]) == CPU.test_samples  # one test set per seed
    four, eight = seen["json_record-tell-r4-n4-s1"][0], seen["json_record-tell-r4-n8-s1"][0]
    assert eight[:4] == four and seen["json_record-sft-n4-s1"][0] == four  # nested, shared by the arms


def fake_rows(seeds=(0, 1, 2), prompts=200, gain=0.1):
    rng = np.random.default_rng(0)
    rows = []
    for seed in seeds:
        for n in CPU.budgets:
            for arm in tell_paper.MAIN_ARMS:
                p = 0.15 * np.log2(n) + (gain if arm == "tell" else 0.0)
                outcomes = (rng.random(prompts) < min(p, 1.0)).astype(int)
                rows.append({"task": "json_record", "arm": arm, "task_samples": str(n), "seed": str(seed),
                             "scale": "cpu", "general_per_task": "4.0" if arm == "tell" else "",
                             "exposures": "8", "test_prompts": str(prompts), "tokens_per_step": "1024",
                             "device": "test", "accuracy_after": str(outcomes.mean()), "accuracy_before": "0.0",
                             "per_prompt_after": "".join(map(str, outcomes))})
    return rows


def test_analysis_reads_paired_differences_and_the_fold_from_per_prompt_outcomes():
    res = analysis(fake_rows(), n_boot=400)["json_record"]
    cells = {(c["N"], c["arm"]): c for c in res["cells"]}
    assert cells[4, "sft"]["seeds"] == 3 and 0 < cells[4, "sft"]["se_prompts"] < 0.05
    diffs = [d for d in res["diffs"] if d["baseline"] == "sft"]
    assert len(diffs) == len(CPU.budgets)
    assert np.mean([d["diff"].estimate for d in diffs]) == pytest.approx(0.1, abs=0.03)
    folds = [f for f in res["folds"] if f["baseline"] == "sft" and f["N"] == 8]
    # +0.1 accuracy on a curve of 0.15 per doubling: SFT needs 2**(0.1/0.15) = 1.6x the samples
    assert folds and folds[0]["fold"].estimate.value == pytest.approx(2 ** (0.1 / 0.15), rel=0.35)
    assert {d["seeds"] for d in res["diffs"]} == {3}
    # a sweep part-way: seed 2 has SFT everywhere but TELL only at N=4, seed 1 lacks SFT at N=32
    partial = [r for r in fake_rows() if not (r["seed"] == "2" and r["arm"] == "tell" and r["task_samples"] != "4")
               and not (r["seed"] == "1" and r["arm"] == "sft" and r["task_samples"] == "32")]
    part = analysis(partial, n_boot=100)["json_record"]
    by = {(d["N"], d["baseline"]): d["seeds"] for d in part["diffs"]}
    assert by[4, "sft"] == 3 and by[8, "sft"] == 2 and by[32, "sft"] == 1 and by[32, "sft-anchor"] == 2
    folds = {(f["N"], f["baseline"]): f for f in part["folds"] if f["baseline"] == "sft"}
    assert folds[4, "sft"]["seeds"] == 3 and folds[4, "sft"]["curve_N"] == [4, 8, 16]  # 32 lacks seed 1
    assert folds[8, "sft"]["seeds"] == 2 and folds[8, "sft"]["curve_N"] == [4, 8, 16]


def test_table_and_plot(tmp_path: Path):
    rows = fake_rows()
    text = tell_paper.table(rows)
    assert "| N |" in text and "vs sft-anchor" in text and "x-fold" in text
    tell_paper.plot(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_estimate_counts_the_real_token_lengths():
    est = tell_paper.estimate(CPU, tokens_per_s=100.0, eval_prompts_per_s=1.0, arms=["tell"])
    assert est["runs"] == len(plan(CPU, ["tell"])) and est["train_tokens"] > 0 and est["hours"] > 0
    plain, anchored = est["task_tokens_per_sample"]["json_record"]
    assert anchored > plain + 150  # the json_record anchor is ~1,000 characters
    assert "runs" in tell_paper.describe_estimate(est)


def test_rows_are_rebuilt_from_kept_records_in_plan_order(tmp_path):
    from tellneo.io import config_hash

    arms = [Arm("tell", "json_record", 8, 0, 4.0), Arm("sft-anchor", "json_record", 4, 0),
            Arm("tell-neutral-anchor", "json_record", 8, 0, 4.0), Arm("tell", "json_record", 8, 0, 16.0),
            Arm("tell-end", "json_record", 8, 0, 4.0), Arm("tell-no-anchor", "json_record", 8, 0, 4.0)]
    summary = {"after": {"accuracy": 0.5, "correct": 1, "n": 2, "per_prompt": [1, 0]}, "before": {"accuracy": 0.0},
               "exposures": 8, "steps": 3, "global_batch_rows": 2, "seq_len": 512, "anchor_chars": 10,
               "task_samples_shown": 8, "general_samples_shown": 0, "general_reused": 0, "task_tokens_seen": 9,
               "general_tokens_seen": 0}
    for a in arms:
        cfg = config(a, CPU)
        assert tell_paper.arm_of(json.loads(json.dumps(cfg))) == a
        record = {"config": cfg, "config_hash": config_hash(cfg), "summary": summary, "commit": "c", "data_hash": "d",
                  "wall_s": 1.0}
        (tmp_path / f"{a.label}.json").write_text(json.dumps(record))
    stale = dict(config(arms[0], CPU), test_samples=7)  # a config the scale no longer makes: left out
    (tmp_path / "stale.json").write_text(json.dumps({"config": stale, "config_hash": config_hash(stale),
                                                     "summary": summary}))
    rows = tell_paper.rows_from_records(CPU, tmp_path)
    order = [a.label for a in plan(CPU)]
    got = [Arm(r["arm"], r["task"], int(r["task_samples"]), int(r["seed"]),
               float(r["general_per_task"]) if r["general_per_task"] != "" else None).label for r in rows]
    assert sorted(got) == sorted(a.label for a in arms) and got == sorted(got, key=order.index)


def test_a_tell_arm_checkpoints_and_resumes_from_its_last_usable_checkpoint(tmp_path, monkeypatch):
    """The runner overrides save_steps (not part of the config hash) and resumes only from a usable checkpoint;
    the recipe's resume itself is tested end to end in tests/cli/test_tell_cli.py."""
    import tellneo.recipes.tell as tell_recipe
    from tellneo.io import config_hash

    calls = []
    monkeypatch.setattr(tell_recipe, "run_tell", lambda cfg, **kw: calls.append((cfg, kw)) or {"after": {}})
    config = json.loads(json.dumps(tell_paper.config(Arm("tell", "json_record", 4, 0, 4.0), CPU)))
    assert runner.tell_config(config, tmp_path).train.save_steps != runner.TELL_SAVE_STEPS
    config_file = tmp_path / "arm_config.json"
    config_file.write_text(json.dumps(config))
    run_dir = tmp_path / "arm"
    (run_dir / "checkpoints" / "checkpoint-20").mkdir(parents=True)  # no trainer_state.json: cut off mid-save

    def record() -> dict:
        assert runner.child_main(["tell", str(config_file), str(run_dir)]) == 0
        return json.loads((run_dir / "arm.json").read_text())

    first = record()
    cfg, kw = calls[-1]
    assert cfg.train.save_steps == runner.TELL_SAVE_STEPS and kw.get("overwrite") and not kw.get("resume")
    assert first["attempt"] == {"save_steps": runner.TELL_SAVE_STEPS, "resumed_from": None}
    assert first["config_hash"] == config_hash(config)

    (run_dir / "checkpoints" / "checkpoint-10").mkdir()
    (run_dir / "checkpoints" / "checkpoint-10" / "trainer_state.json").write_text("{}")
    second = record()
    assert calls[-1][1].get("resume") and not calls[-1][1].get("overwrite")
    assert second["attempt"]["resumed_from"] == "checkpoint-10" and second["config_hash"] == first["config_hash"]
