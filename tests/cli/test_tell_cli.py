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
    assert s["arm"] == "tell, spread=stratified, anchor, k=8, r=4" and s["steps"] == 3 and s["anchor_chars"] > 100
    assert s["before"]["n"] == s["after"]["n"] == 4 and 0 <= s["after"]["accuracy"] <= 1
    e = s["exposure"]
    assert 0 < e["task_trained_tokens"] < e["task_tokens"] < e["all_tokens"]
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(x)] == [1, 2, 3]
    assert (out / "loss_curve.png").is_file() and (out / "adapter" / "adapter_config.json").is_file()


def test_sft_baseline_and_ablation_arms(tmp_path, tiny_model_dir, general_jsonl):
    assert main(tell_args(tiny_model_dir, general_jsonl, tmp_path / "sft", "--method", "sft")) == 0
    s = json.loads((tmp_path / "sft" / "summary.json").read_text())
    assert s["arm"] == "sft, no anchor, k=8" and s["anchor_chars"] == 0 and s["general"] is None
    assert s["exposure"]["task_tokens"] == s["exposure"]["all_tokens"]  # the task alone

    assert main(tell_args(tiny_model_dir, general_jsonl, tmp_path / "end", "--spread", "end", "--no-anchor")) == 0
    s = json.loads((tmp_path / "end" / "summary.json").read_text())
    assert s["arm"] == "tell, spread=end, no anchor, k=8, r=4"
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
                 "--resume", "--exposures", "--general-per-task", "--general-reuse", "--no-general-reuse",
                 "--with-anchor", "--neutral-anchor", "--dev-samples"):
        assert flag in text
    assert "(default: stratified)" in text and "(default: date_iso)" in text


def test_exposures_show_n_times_k_task_samples(tmp_path, tiny_model_dir, general_jsonl, capsys):
    out = tmp_path / "k"
    assert main(tell_args(tiny_model_dir, general_jsonl, out, "--max-steps", "-1", "--exposures", "2",
                          "--general-per-task", "4", "--task-ratio", "0.2")) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["task_samples_planned"] == 16 and s["general_per_task"] == 4.0 and s["exposures"] == 2
    assert s["task_samples_shown"] == s["exposure"]["task_samples"]
    assert s["task_samples_shown"] == 16  # N*k: the whole epoch of the mix was read
    assert s["general_unique"] + s["general_reused"] == 64 and s["general_samples_shown"] <= 64
    assert s["task_tokens_seen"] + s["general_tokens_seen"] == s["exposure"]["all_tokens"]
    assert "general samples seen" in capsys.readouterr().out
    assert main(tell_args(tiny_model_dir, general_jsonl, tmp_path / "no", "--exposures", "50",
                          "--general-per-task", "4", "--no-general-reuse")) == 2
    err = capsys.readouterr().err
    assert "--general-reuse" in err and "1,600" in err
    assert main(tell_args(tiny_model_dir, general_jsonl, tmp_path / "bad", "--general-per-task", "3")) == 2
    assert "disagree" in capsys.readouterr().err


def test_exposure_flags_round_trip_through_a_manifest(tmp_path):
    from tellneo.cli import build_parser
    from tellneo.commands.tell import config_from_args
    from tellneo.recipes.tell import TellConfig

    cfg = TellConfig(exposures=3, general_per_task=4.0, general_reuse=False, task_ratio=0.2)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"config": cfg.manifest()}))
    parser, argv = build_parser(), ["tell", "--config", str(path)]
    first = parser.parse_args(argv)
    args = first.reparse_with_config(parser, argv, first)  # what main() does with --config
    again = config_from_args(args)
    assert (again.exposures, again.general_per_task, again.general_reuse) == (3, 4.0, False)
    assert again.manifest() == cfg.manifest()
    plain = config_from_args(build_parser().parse_args(["tell"]))
    assert (plain.exposures, plain.general_per_task, plain.general_reuse, plain.general) == (8, None, True, "mixed")
    former = config_from_args(build_parser().parse_args(["tell", "--exposures", "0"]))
    assert former.exposures is None and former.manifest() == TellConfig(exposures=None).manifest()


def test_sft_picks_its_pass_count_on_dev_and_tests_the_chosen_checkpoint(tmp_path, tiny_model_dir, general_jsonl):
    out = tmp_path / "sft"
    assert main(tell_args(tiny_model_dir, general_jsonl, out, "--method", "sft", "--with-anchor", "--max-steps",
                          "-1", "--exposures", "1", "3", "--dev-samples", "4", "--lr-scheduler", "constant")) == 0
    s = json.loads((out / "summary.json").read_text())
    sel = s["selection"]
    assert s["arm"] == "sft, anchor, k=1/3 (dev)" and s["anchor_chars"] > 100 and s["dev_pairs"] == 4
    assert set(sel["scores"]) == {"1", "3"} and sel["chosen"] in (1, 3)
    assert all(v["n"] == 4 for v in sel["scores"].values())
    assert s["exposures"] == sel["chosen"] and s["selected_step"] == sel["checkpoints"][str(sel["chosen"])]
    assert s["task_samples_planned"] == 8 * sel["chosen"] <= s["task_samples_shown"]
    assert s["steps"] == sel["checkpoints"]["3"]  # the run trained all 3 passes
    assert json.loads((out / "dev_selection.json").read_text())["chosen"] == sel["chosen"]
    assert (out / "dev_best.pt").is_file()


def test_neutral_anchor_arm_and_contradictory_anchor_flags(tmp_path, tiny_model_dir, general_jsonl, capsys):
    from tellneo.data.tasks import DATE_ISO

    out = tmp_path / "neutral"
    assert main(tell_args(tiny_model_dir, general_jsonl, out, "--neutral-anchor", "--exposures", "1")) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["neutral_anchor"] is True and s["anchor_chars"] == len(DATE_ISO.anchor_prompt)
    assert s["arm"] == "tell, spread=stratified, neutral anchor, k=1, r=4"
    assert main(tell_args(tiny_model_dir, general_jsonl, tmp_path / "x", "--no-anchor", "--with-anchor")) == 2
    assert "contradict" in capsys.readouterr().err
    assert main(tell_args(tiny_model_dir, general_jsonl, tmp_path / "x", "--exposures", "2", "4")) == 2
    assert "--method sft" in capsys.readouterr().err


def test_interrupted_sft_with_dev_selection_resumes_to_the_uninterrupted_run(tmp_path, tiny_model_dir,
                                                                              general_jsonl, monkeypatch, capsys):
    """A run cut off between two dev checkpoints resumes from its last saved step: the same dev scores, the same
    chosen pass count and the same adapter as a run that was never interrupted (the sweep relies on this)."""
    import os
    import signal

    import torch
    from safetensors.torch import load_file

    import tellneo.recipes.training as tu

    args = ("--method", "sft", "--with-anchor", "--max-steps", "-1", "--exposures", "1", "2", "3",
            "--dev-samples", "4", "--lr-scheduler", "constant", "--save-steps", "2", "--lora-dropout", "0.1")
    straight = tmp_path / "straight"
    assert main(tell_args(tiny_model_dir, general_jsonl, straight, *args)) == 0
    ref = json.loads((straight / "summary.json").read_text())
    steps = ref["steps"]
    assert steps >= 4  # 8 samples x 3 passes at batch 2: checkpoints at 2, 4, ... and dev scores at pass ends

    stop_at = steps - 1

    class InterruptLate(tu.MetricsJsonlCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == stop_at:
                os.kill(os.getpid(), signal.SIGINT)

    out = tmp_path / "cut"
    with monkeypatch.context() as m:
        m.setattr(tu, "MetricsJsonlCallback", InterruptLate)
        assert main(tell_args(tiny_model_dir, general_jsonl, out, *args)) == 130
    assert "interrupted" in capsys.readouterr().err and not (out / "adapter").exists()
    assert (out / "dev_selection.json").is_file()  # some passes were scored before the cut
    assert main(tell_args(tiny_model_dir, general_jsonl, out, *args, "--resume")) == 0
    got = json.loads((out / "summary.json").read_text())
    assert got["steps"] == steps and got["selection"] == ref["selection"]
    assert got["after"]["correct"] == ref["after"]["correct"]
    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(out / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_fresh_start_does_not_inherit_dev_scores_of_the_run_it_replaces(tmp_path, tiny_model_dir, general_jsonl):
    """--overwrite (and --resume without a checkpoint) start over: the old run's dev scores and best weights go
    with its other outputs, so the new run scores every pass itself."""
    args = ("--method", "sft", "--max-steps", "-1", "--exposures", "1", "2", "--dev-samples", "4",
            "--lr-scheduler", "constant", "--save-steps", "1000")
    out = tmp_path / "sft"
    assert main(tell_args(tiny_model_dir, general_jsonl, out, *args)) == 0
    scores = json.loads((out / "dev_selection.json").read_text())["scores"]
    fake = {k: dict(v, accuracy=2.0) for k, v in scores.items()}  # impossible accuracies: must not survive
    (out / "dev_selection.json").write_text(json.dumps({"scores": fake}))
    assert main(tell_args(tiny_model_dir, general_jsonl, out, *args, "--lr", "3e-3", "--overwrite")) == 0
    fresh = json.loads((out / "dev_selection.json").read_text())["scores"]
    assert set(fresh) == set(scores) and all(v["accuracy"] <= 1.0 for v in fresh.values())
