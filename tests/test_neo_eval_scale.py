"""The NEO benchmark's tuned scale, the unchanged configs of the recorded scales, and the training-phase
peak column."""

from __future__ import annotations

from benchmarks.methods import neo, runner
from benchmarks.methods.common import SCALES
from tellneo.io import config_hash

# config hashes of (lora-ce, neo) at seed 0 as recorded before the eval fields existed (computed from the previous
# commit's benchmarks/methods/neo.py): a change here would orphan every recorded run directory
RECORDED = {"cpu": ["2cfa683bbf74338e", "8ace545d177703b3"], "cpu-long": ["84aa2f113f4e133b", "c1bb43e7083bb17a"],
            "gpu": ["24c25ea7f8aab7e2", "7e1dab88767e8cce"]}


def test_recorded_scales_keep_their_config_hashes():
    for name, hashes in RECORDED.items():
        configs = [c for *_, c in neo.arm_configs(SCALES[name], [0, 1])]
        assert [config_hash(c) for c in configs[:2]] == hashes
        assert all("eval_seed" not in c and "validation_samples" not in c for c in configs)


def test_tuned_scale_shares_one_held_out_and_validation_draw(tmp_path):
    scale = SCALES["cpu-tuned"]
    configs = neo.sweep_configs(scale, 0) + neo.followup_configs(scale, [0, 1, 2], {a: 1e-3 for a in neo.MAIN_ARMS})
    assert {(c["eval_seed"], c["eval_samples"], c["validation_samples"]) for *_, c in configs} == {(1234, 128, 64)}
    assert len({c["train"]["seed"] for *_, c in configs}) == 3
    cfg = runner.distill_config(configs[0][2], tmp_path)
    assert (cfg.eval_seed, cfg.eval_samples, cfg.validation_samples) == (1234, 128, 64)
    assert cfg.manifest()["eval_seed"] == 1234


def _record(train_peak):
    metrics = {"ce": 3.0, "kl": 2.0, "top1_agreement": 0.4, "teacher_ce": 1.5, "tokens": 100}
    summary = {"before": metrics, "after": metrics, "steps": 20, "global_batch_rows": 4, "seq_len": 256,
               "student": {"num_layers": 15}, "trainable_parameters": 10, "total_parameters": 100,
               "eval_tokens": 100, "train_s_per_step": 2.0, "machine_at_start": {"load_avg_1min": 1.0},
               "machine_at_end": {"device": "cpu", "torch_threads": 2, "peak_rss_mb": 900.0}}
    if train_peak is not None:
        summary.update(train_peak_mb=train_peak, train_peak_method="rss_vmhwm", validation={**metrics, "ce": 2.5})
    return {"config": {"mode": "lora", "alpha": 0.5, "lora_r": 16, "train": {"learning_rate": 1e-3}},
            "config_hash": "h", "data_hash": "d", "commit": "c", "wall_s": 1.0, "summary": summary}


def test_table_shows_the_training_phase_peak_and_na_for_older_rows():
    scale = SCALES["cpu"]
    rows = [neo.row("neo", s, _record(peak), scale) for s, peak in enumerate((100.0, 300.0))]
    assert rows[0]["train_peak_mb"] == 100.0 and rows[0]["val_ce_after"] == 2.5
    rows.append(neo.row("lora-ce", 0, _record(None), scale))
    assert rows[-1]["train_peak_mb"] == "" and rows[-1]["val_ce_after"] == ""
    text = neo.table(rows)
    assert "training-phase peak MB" in text
    assert "| 200 (100–300) | 2.00 (2.00–2.00) |" in text and "| 900 | n/a | 2.00 |" in text
