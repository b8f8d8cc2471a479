"""NEO's tuned protocol (issue 15): the sweep chooses each arm's rate on validation CE (never held-out CE), the
seeds and sensitivity rows run at the chosen rate, variant rows reach PEFT, and the report's intervals are the
paired per-seed ones. The runs are faked: these tests check the protocol, not the training."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from benchmarks.methods import neo, neo_tuned, runner
from benchmarks.methods.common import SCALES, write_csv
from benchmarks.methods.stats import mean_ci

SCALE = SCALES["cpu-tuned"]
BEST = {"lora-ce": 3e-3, "neo": 1e-3, "full-kd": 3e-4, "full-ce": 1e-4}


def _fake_run_arm(calls: list):
    """A run_arm whose validation CE is lowest at BEST[arm] and whose held-out CE is lowest elsewhere (so choosing
    on held-out CE would pick a different rate), with seed-dependent offsets."""

    def run_arm(recipe: str, config: dict, run_dir: Path) -> dict:
        calls.append((run_dir.name, config))
        lr, seed = config["train"]["learning_rate"], config["train"]["seed"]
        arm = run_dir.name.rsplit("-s", 1)[0]
        base = arm if arm in BEST else "neo"
        val = 5.0 + abs(math.log10(lr / BEST[base])) + 0.01 * seed
        held_out = 6.0 - abs(math.log10(lr / BEST[base])) + 0.1 * seed + (0.5 if config["mode"] == "full" else 0.0)
        after = {"ce": held_out, "kl": 2.0 + seed, "top1_agreement": 0.3, "teacher_ce": 3.0}
        before = {"ce": 13.0, "kl": 10.0, "top1_agreement": 0.01, "teacher_ce": 3.0}
        summary = {"before": before, "after": after, "validation": {"ce": val}, "steps": 100,
                   "global_batch_rows": 4, "seq_len": 256, "student": {"num_layers": 15},
                   "trainable_parameters": 10 if config["mode"] == "lora" else 100, "total_parameters": 100,
                   "eval_tokens": 1000, "train_s_per_step": 2.0 + seed, "train_peak_mb": 100.0 + seed,
                   "train_peak_method": "rss_vmhwm", "machine_at_start": {}, "machine_at_end": {}}
        return {"config": config, "summary": summary, "commit": "c", "config_hash": "h", "data_hash": "d",
                "wall_s": 1.0}

    return run_arm


@pytest.fixture(scope="module")
def tuned_rows():
    calls: list = []
    saved: list = []
    rows = neo.run(SCALE, [0, 1, 2], Path("/nonexistent"), _fake_run_arm(calls), lambda _: None, jobs=2,
                   save=lambda r: saved.append(len(r)))
    return rows, calls, saved


def test_the_sweep_chooses_on_validation_ce_and_the_seeds_run_at_the_choice(tuned_rows):
    rows, calls, saved = tuned_rows
    sweep = [r for r in rows if r["seed"] == 0 and r["arm"] in neo.MAIN_ARMS]
    assert len(sweep) == 14  # LoRA arms x 3 rates + full arms x 4 rates
    assert neo.choose_learning_rates(sweep) == BEST
    for arm, lr in BEST.items():
        chosen = neo_tuned.main_rows(rows, arm)
        assert [r["seed"] for r in chosen] == [0, 1, 2]
        assert {r["learning_rate"] for r in chosen} == {lr}
    unchosen = [r for r in sweep if r["learning_rate"] != BEST[r["arm"]]]
    assert unchosen and not any(r["tuned_lr"] for r in unchosen)
    assert len(rows) == len(calls) == 26 and saved[-1] == 26 and saved == sorted(saved)


def test_sensitivity_rows_run_at_neos_rate_and_the_variant_reaches_peft(tuned_rows, tmp_path):
    rows, calls, _ = tuned_rows
    by_arm = {r["arm"]: r for r in rows if r["arm"] not in neo.MAIN_ARMS}
    assert sorted(by_arm) == ["neo-dora", "neo-pissa", "neo-r64", "neo-rslora"]
    assert {r["learning_rate"] for r in by_arm.values()} == {BEST["neo"]}
    assert by_arm["neo-r64"]["lora_r"] == 64 and by_arm["neo-dora"]["lora_variant"] == "dora"
    config = next(c for name, c in calls if name.startswith("neo-pissa"))
    cfg = runner.distill_config(config, tmp_path)
    assert cfg.lora.variant == "pissa" and cfg.kd.alpha == 0.5
    plain = next(c for name, c in calls if name.startswith("neo-s1"))
    assert "lora_variant" not in plain and runner.distill_config(plain, tmp_path).lora.variant == "lora"
    assert neo.arm_names(SCALE, [0, 1, 2]) == [*neo.MAIN_ARMS, "neo-rslora", "neo-dora", "neo-pissa", "neo-r64"]


def test_untuned_scales_refuse_the_tuned_path_and_keep_their_arms():
    with pytest.raises(ValueError, match="tunes the learning rate"):
        neo.arm_configs(SCALE, [0])
    assert "neo-a0.9" in neo.arm_names(SCALES["cpu"], [0, 1, 2])
    gpu = SCALES["gpu-tuned"]
    assert (gpu.neo_steps, gpu.batch_size * gpu.seq_len) == (1000, 8192)
    assert neo.arm_names(gpu, [0, 1, 2])[-3:] == ["neo-r64", "neo-r128", "neo-a0.9"]


def test_the_report_gives_paired_t_intervals_and_reads_back_from_csv(tuned_rows, tmp_path):
    rows, _, _ = tuned_rows
    diff = neo_tuned.paired_difference(rows, "neo", "lora-ce", "ce_after")
    per_seed = [float(b["ce_after"]) - float(a["ce_after"])
                for b, a in zip(neo_tuned.main_rows(rows, "neo"), neo_tuned.main_rows(rows, "lora-ce"))]
    assert diff.n == 3 and diff.estimate == pytest.approx(mean_ci(per_seed).estimate)
    path = tmp_path / "neo.csv"
    write_csv(path, rows)
    with path.open() as f:
        back = list(csv.DictReader(f))
    text = neo.table(back)
    assert text == neo.table(rows)
    assert "| neo | 0.001 | 3 | 10 |" in text and "neo − lora-ce | 3 |" in text
    assert "| full-kd | 0.0003 | 0.000 | 6.500 | ✓ |" not in text  # validation CE at the chosen rate is 5.0
    assert "| full-kd | 0.0003 | 5.000 | 6.500 | ✓ |" in text
    neo.plot(back, tmp_path / "neo.png")
    assert (tmp_path / "neo.png").stat().st_size > 10_000


def test_a_kept_record_resumes_a_sweep_without_its_run_directory(tmp_path):
    from tellneo.io import config_hash

    config = neo.sweep_configs(SCALE, 0)[0][2]
    keep = tmp_path / "records" / "lora-ce-s0.json"
    keep.parent.mkdir()
    keep.write_text(json.dumps({"config_hash": config_hash(config), "summary": {"kept": True}}))
    assert runner.run_arm("neo", config, tmp_path / "absent", keep=keep)["summary"] == {"kept": True}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    keep.write_text(json.dumps({"config_hash": "stale"}))
    (run_dir / "arm.json").write_text(json.dumps({"config_hash": config_hash(config), "summary": {"ran": 1}}))
    assert runner.run_arm("neo", config, run_dir, keep=keep)["summary"] == {"ran": 1}
    assert json.loads(keep.read_text())["summary"] == {"ran": 1}  # the run directory's record is kept too


def test_every_saved_follow_up_row_is_marked_at_the_chosen_rate():
    snapshots: list = []
    neo.run(SCALE, [0, 1], Path("/nonexistent"), _fake_run_arm([]), lambda _: None,
            save=lambda r: snapshots.append([dict(x) for x in r]))
    followups = [r for snap in snapshots for r in snap if r["seed"] == 1]
    assert followups and all(r["tuned_lr"] is True for r in followups)
