"""`tellneo tell`: TELL and SFT-baseline runs on a tiny model directory, their outputs, and bad inputs."""

from __future__ import annotations

import json

import pytest

from tellneo.cli import main
from tests.recipes.helpers import general_jsonl, one_thread, tiny_model_dir  # noqa: F401 (fixtures)


def tell_args(tiny_model_dir, general_jsonl, out, *extra):
    return ["tell", "--model", str(tiny_model_dir), "--general", str(general_jsonl), "--task-samples", "8",
            "--test-samples", "4", "--seq-len", "256", "--max-steps", "3", "--max-new-tokens", "4",
            "--general-samples", "80", "--task-ratio", "0.2",
            "--output-dir", str(out), "--quiet", *extra]


def test_tell_run_reports_accuracy_and_exposure(tmp_path, tiny_model_dir, general_jsonl, capsys):
    out = tmp_path / "tell"
    assert main(tell_args(tiny_model_dir, general_jsonl, out)) == 0
    printed = capsys.readouterr().out
    assert "exact-match accuracy" in printed and "task samples seen" in printed
    s = json.loads((out / "summary.json").read_text())
    assert s["arm"] == "tell, spread=stratified, anchor" and s["steps"] == 3 and s["anchor_chars"] > 100
    assert s["before"]["n"] == s["after"]["n"] == 4 and 0 <= s["after"]["accuracy"] <= 1
    e = s["exposure"]
    assert 0 < e["task_trained_tokens"] < e["task_tokens"] < e["all_tokens"]
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(x)] == [1, 2, 3]
    assert (out / "loss_curve.png").is_file() and (out / "adapter" / "adapter_config.json").is_file()


def test_sft_baseline_and_ablation_arms(tmp_path, tiny_model_dir, general_jsonl):
    assert main(tell_args(tiny_model_dir, general_jsonl, tmp_path / "sft", "--method", "sft")) == 0
    s = json.loads((tmp_path / "sft" / "summary.json").read_text())
    assert s["arm"] == "sft, no anchor" and s["anchor_chars"] == 0 and s["general"] is None
    assert s["exposure"]["task_tokens"] == s["exposure"]["all_tokens"]  # the task alone

    assert main(tell_args(tiny_model_dir, general_jsonl, tmp_path / "end", "--spread", "end", "--no-anchor")) == 0
    s = json.loads((tmp_path / "end" / "summary.json").read_text())
    assert s["arm"] == "tell, spread=end, no anchor"
    assert s["exposure"]["task_samples"] == 0  # 3 steps read general rows only: the task block comes last


def test_tell_bad_inputs(tmp_path, tiny_model_dir, general_jsonl, capsys):
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(12)))
    args = tell_args(tiny_model_dir, general_jsonl, tmp_path / "o", "--task-file", str(task))
    assert main(args) == 2
    assert "needs an anchor prompt for a task file" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "response": "a"}\n{"oops": 1}\n')
    assert main(tell_args(tiny_model_dir, general_jsonl, tmp_path / "o", "--task-file", str(bad), "--no-anchor")) == 2
    assert "bad.jsonl:2: a record needs 'prompt'+'response'" in capsys.readouterr().err
    assert main(tell_args(tiny_model_dir, general_jsonl, tmp_path / "o", "--task", "nope")) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main(tell_args(tiny_model_dir, general_jsonl, tmp_path / "o", "--task-ratio", "1")) == 2
    assert "task-ratio must be in (0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing was written for a run that never started


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["tell", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--model", "--task", "--task-file", "--test-file", "--task-samples", "--anchor", "--no-anchor",
                 "--method", "--general", "--task-ratio", "--spread", "--seq-len", "--max-steps", "--output-dir",
                 "--resume"):
        assert flag in text
    assert "(default: stratified)" in text and "(default: date_iso)" in text
