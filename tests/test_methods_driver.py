"""The method-experiment driver (benchmarks/methods): fair arms, resumable runs, tables and plots that show the
numbers they are given. The runs themselves are the recipes, tested in tests/recipes."""

from __future__ import annotations

import json
import subprocess

import pytest

from benchmarks.methods import neo, runner, tell
from benchmarks.methods.common import SCALES, read_csv, run_dir_for, write_csv
from tellneo.io import config_hash

CPU = SCALES["cpu"]


def test_neo_arms_share_the_token_budget_and_differ_only_where_they_should():
    runs = neo.arm_configs(CPU, [0, 1, 2])
    names = [(arm, seed) for arm, seed, _ in runs]
    assert [n for n in names if n[0] in ("lora-ce", "neo")] == [(a, s) for s in (0, 1, 2) for a in ("lora-ce", "neo")]
    assert {"full-kd", "full-ce", "neo-r8", "neo-r64", "neo-a0.9"} <= {a for a, _ in names}
    budget = {(c["seq_len"], c["max_samples"], c["eval_samples"], c["layers"], c["train"]["max_steps"],
               c["train"]["batch_size"]) for _, _, c in runs}
    assert len(budget) == 1, budget
    by = {(a, s): c for a, s, c in runs}
    assert by["lora-ce", 0]["alpha"] == 0.0 and by["neo", 0]["alpha"] > 0 and by["full-ce", 0]["alpha"] == 0.0
    assert by["full-kd", 0]["mode"] == "full" and by["neo", 0]["mode"] == "lora"
    assert by["neo-r64", 0]["lora_r"] == 64 and by["neo-r64", 0]["lora_alpha"] == 128
    assert len({config_hash(c) for _, _, c in runs}) == len(runs)  # distinct run directories


def test_tell_arms_share_one_held_out_test_set_disjoint_from_training():
    from tellneo.recipes.tell import TellConfig, _task_data
    from tellneo.recipes.training import TrainSettings

    tests, trains = set(), {}
    for budget in CPU.tell_budgets:
        for arm in tell.ARMS:
            c = tell.arm_config(arm, budget, CPU, seed=0)
            cfg = TellConfig(**{**c, "train": TrainSettings(**c["train"])})
            train, test, anchor, _, _ = _task_data(cfg)
            tests.add(json.dumps(test, sort_keys=True))
            trains[arm, budget] = {p["prompt"] for p in train}
            assert not trains[arm, budget] & {p["prompt"] for p in test}
            assert cfg.anchored == (arm in ("tell", "tell-no-shuffle")) and len(train) == budget
            assert (cfg.method == "sft") == (arm == "sft") and (cfg.spread == "end") == (arm == "tell-no-shuffle")
    assert len(tests) == 1  # every arm and budget is scored on the same prompts
    assert trains["sft", 8] == trains["tell", 8]  # the arms of one budget train on the same task samples
    assert trains["tell", 8] < trains["tell", 32]


def test_run_arm_reuses_a_finished_arm_and_reports_a_failed_one(tmp_path, monkeypatch):
    config = {"a": 1}
    run_dir = run_dir_for("neo", "x", config, tmp_path)
    run_dir.mkdir(parents=True)
    record = {"config_hash": config_hash(config), "summary": {"ok": True}}
    (run_dir / "arm.json").write_text(json.dumps(record))

    def no_child(*args, **kwargs):
        raise AssertionError("a finished arm must not be rerun")

    monkeypatch.setattr(subprocess, "run", no_child)
    assert runner.run_arm("neo", config, run_dir) == record

    class Failed:
        returncode = 1

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Failed())
    other = {"a": 2}
    with pytest.raises(RuntimeError, match=r"failed \(exit 1\); see .*arm\.log"):
        runner.run_arm("neo", other, run_dir_for("neo", "x", other, tmp_path))
    with pytest.raises(ValueError, match="recipe must be one of"):
        runner.run_arm("sft", config, run_dir)


def _neo_record(kl_after: float, top1_after: float, rss: float) -> dict:
    metrics = {"ce": 3.0, "kl": 2.0, "top1_agreement": 0.4, "teacher_ce": 1.5, "tokens": 100}
    return {"config": {"mode": "lora", "alpha": 0.5, "lora_r": 16, "train": {"learning_rate": 1e-3}},
            "config_hash": "h", "data_hash": "d", "commit": "c", "wall_s": 1.0,
            "summary": {"before": metrics, "after": {**metrics, "kl": kl_after, "top1_agreement": top1_after},
                        "steps": 20, "global_batch_rows": 4, "seq_len": 256, "student": {"num_layers": 15},
                        "trainable_parameters": 10, "total_parameters": 100, "eval_tokens": 100,
                        "train_s_per_step": 2.0, "machine_at_start": {"load_avg_1min": 1.0},
                        "machine_at_end": {"device": "cpu", "torch_threads": 2, "peak_rss_mb": rss}}}


def test_neo_table_and_plot_show_the_seed_mean_and_range(tmp_path):
    rows = [neo.row("neo", s, _neo_record(kl, 0.5, 1000.0), CPU) for s, kl in enumerate((1.0, 1.2, 1.4))]
    rows.append(neo.row("lora-ce", 0, _neo_record(1.9, 0.41, 900.0), CPU))
    write_csv(tmp_path / "neo.csv", rows)
    back = read_csv(tmp_path / "neo.csv")
    assert [r["arm"] for r in back] == ["neo"] * 3 + ["lora-ce"] and back[0]["data_hash"] == "d"
    text = neo.table(back)
    assert "| neo | 3 |" in text and "2.000 → 1.200 (1.000–1.400)" in text and "2.000 → 1.900 |" in text
    neo.plot(back, tmp_path / "neo.png")
    assert (tmp_path / "neo.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_command_skips_slow_suites_unless_named(tmp_path):
    from pathlib import Path

    from tellneo.commands.bench import available_suites, default_suites

    root = Path(__file__).resolve().parents[1]
    assert "methods" in available_suites(root) and "methods" not in default_suites(root)
    assert "mixer" in default_suites(root)


def test_tell_table_and_plot_put_each_arm_at_its_budget(tmp_path):
    rows = []
    for n, arm, acc, seen in ((8, "sft", 0.7, 4800), (8, "tell", 0.75, 684), (32, "sft", 0.9, 4800)):
        rows.append({"arm": arm, "task_samples": n, "accuracy_before": 0.0 if arm == "sft" else 0.1,
                     "accuracy_after": acc, "task_trained_tokens_seen": seen, "tokens_per_step": 1024,
                     "device": "cpu"})
    text = tell.table(rows)
    assert "| 8 | 0.700 (4,800) | 0.750 (684) | - | - |" in text and "| 32 | 0.900 (4,800) | - | - | - |" in text
    tell.plot(rows, tmp_path / "tell.png")
    assert (tmp_path / "tell.png").read_bytes()[:4] == b"\x89PNG"
