"""`tellneo distill`: outputs, resume, Ctrl-C, and one clear message (exit 2, nothing destroyed) per bad input.

Runs on a tiny random teacher directory; the embedded SmolLM2 run is in test_distill_cli_smollm2 (slow)."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from tellneo.cli import main
from tests.recipes.helpers import general_jsonl, one_thread, tiny_model_dir  # noqa: F401 (fixtures)


def distill_args(tiny_model_dir, general_jsonl, out, *extra):
    return ["distill", "--teacher", str(tiny_model_dir), "--data", str(general_jsonl), "--max-samples", "60",
            "--eval-samples", "8", "--seq-len", "128", "--max-steps", "4", "--save-steps", "2", "--lr", "1e-2",
            "--output-dir", str(out), "--quiet", *extra]


def test_distill_writes_its_outputs_and_refuses_to_clobber(tmp_path, tiny_model_dir, general_jsonl, capsys):
    out = tmp_path / "run"
    assert main(distill_args(tiny_model_dir, general_jsonl, out)) == 0
    printed = capsys.readouterr().out
    assert "student before" in printed and "top-1 agreement with teacher" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["student"]["layers"] == [0, 2]
    assert summary["before"]["tokens"] == summary["after"]["tokens"] > 0
    assert summary["after"]["ce"] < summary["before"]["ce"]  # 4 steps at lr 1e-2 on a random tiny model
    # training-phase memory (CPU here): growth over the RSS at entry, from the kernel's reset high-water mark
    assert summary["train_peak_method"] in ("rss_vmhwm", "rss_vmhwm_unreset", "rss_sampled")
    assert summary["train_peak_mb"] > 0 and summary["train_baseline_mb"] > 0
    assert summary["train_peak_reserved_mb"] is None
    assert summary["machine_at_end"]["peak_rss_mb"] >= summary["train_baseline_mb"]  # the whole process's peak
    assert f"training-phase peak: {summary['train_peak_mb']:.1f} MB ({summary['train_peak_method']})" in printed
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and all("ce" in r and "kd" in r for r in train)
    assert (out / "loss_curve.png").stat().st_size > 2000
    assert "| cross-entropy" in (out / "summary.md").read_text()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert not [p for p in out.rglob(".staging-*")]

    stamp = (out / "summary.json").stat().st_mtime_ns
    assert main(distill_args(tiny_model_dir, general_jsonl, out)) == 2
    err = capsys.readouterr().err
    assert "already holds checkpoints up to checkpoint-4" in err and "--resume" in err and "Traceback" not in err
    assert main(distill_args(tiny_model_dir, general_jsonl, out, "--alpha", "0.9")) == 2
    assert "holds a different run" in capsys.readouterr().err
    assert (out / "summary.json").stat().st_mtime_ns == stamp  # nothing touched
    assert main(distill_args(tiny_model_dir, general_jsonl, out, "--resume")) == 0  # finished: re-evaluates only
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["steps"] == 4
    assert resumed["train_peak_mb"] is None and resumed["train_peak_method"] is None  # no training ran
    assert "training-phase peak" not in capsys.readouterr().out


def test_ctrl_c_leaves_a_checkpoint_and_resume_reproduces_the_run(tmp_path, tiny_model_dir, general_jsonl,
                                                                   monkeypatch, capsys):
    import tellneo.recipes.training as tu

    straight = tmp_path / "straight"
    assert main(distill_args(tiny_model_dir, general_jsonl, straight, "--lora-dropout", "0.1")) == 0

    class InterruptAtStep2(tu.MetricsJsonlCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 2:
                os.kill(os.getpid(), signal.SIGINT)

    out = tmp_path / "interrupted"
    with monkeypatch.context() as m:
        m.setattr(tu, "MetricsJsonlCallback", InterruptAtStep2)
        assert main(distill_args(tiny_model_dir, general_jsonl, out, "--lora-dropout", "0.1")) == 130
    assert "interrupted" in capsys.readouterr().err
    assert (out / "checkpoints" / "checkpoint-3").is_dir() and not (out / "adapter").exists()
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert (out / "loss_curve.png").is_file()

    assert main(distill_args(tiny_model_dir, general_jsonl, out, "--lora-dropout", "0.1", "--resume")) == 0
    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(out / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [r for x in (out / "metrics.jsonl").read_text().splitlines() if "loss" in (r := json.loads(x))]
    ref = [r for x in (straight / "metrics.jsonl").read_text().splitlines() if "loss" in (r := json.loads(x))]
    assert [(r["step"], r["loss"]) for r in steps] == [(r["step"], r["loss"]) for r in ref]


def test_eval_seed_and_validation_set(tmp_path, tiny_model_dir, general_jsonl):
    out = tmp_path / "val"
    assert main(distill_args(tiny_model_dir, general_jsonl, out, "--eval-seed", "5", "--validation-samples", "6",
                             "--max-steps", "2")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_seed"] == 5 and summary["eval_records"] == 8 and summary["validation_records"] == 6
    assert summary["train_records"] == 60 - 8 - 6
    v, a = summary["validation"], summary["after"]
    assert v.keys() == a.keys() and v["tokens"] > 0 and v["tokens"] != a["tokens"]
    assert v["kl"] >= 0 and v["top1_agreement"] > 0  # online teacher: every metric is defined
    assert json.loads((out / "manifest.json").read_text())["config"]["validation_samples"] == 6


def test_offline_topk_mode(tmp_path, tiny_model_dir, general_jsonl, capsys):
    out = tmp_path / "offline"
    assert main(distill_args(tiny_model_dir, general_jsonl, out, "--offline-topk", "16",
                             "--validation-samples", "6")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and "teacher_topk_s" in summary["timings"]
    # the validation set's teacher top-k is precomputed too: its KL is the top-k bucket KL, finite
    assert summary["validation_records"] == 6 and summary["validation"]["tokens"] > 0
    assert summary["validation"]["kl"] >= 0 and list((out / "teacher_topk" / "validation").glob("*/shard-*.npz"))
    assert list((out / "teacher_topk" / "train").glob("epoch-000/shard-*.npz"))
    assert 0.0 <= summary["after"]["top1_agreement"] <= 1.0


def _bad(capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err, err
    # one error line, the last one (progress bars of model loading may precede it), no traceback
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err and sum("error" in line for line in lines) == 1 and "error: " in lines[-1]
    return err


def test_bad_inputs_give_one_clear_message(tmp_path, tiny_model_dir, general_jsonl, capsys):
    out = tmp_path / "o"
    base = distill_args(tiny_model_dir, general_jsonl, out)
    teacher_at = base.index("--teacher") + 1
    data_at = base.index("--data") + 1

    missing = list(base)
    missing[teacher_at] = str(tmp_path / "nope")
    _bad(capsys, missing, "nope does not exist")

    corrupt = tmp_path / "broken.gguf"
    corrupt.write_bytes(b"GGUF\x00garbage" * 10)
    args = list(base)
    args[teacher_at] = str(corrupt)
    _bad(capsys, args, "cannot load a causal LM from")

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": \n')
    args = list(base)
    args[data_at] = str(bad)
    _bad(capsys, args, "bad.jsonl:2: not valid JSON")

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    args[data_at] = str(empty)
    _bad(capsys, args, "empty.jsonl: the file holds no records")

    _bad(capsys, base[:-3] + ["--seq-len", "16", "--output-dir", str(tmp_path / "o2"), "--quiet"],
         "every training sample is longer than 16 tokens")
    _bad(capsys, base + ["--alpha", "1.5"], "alpha must be in [0, 1]")
    _bad(capsys, base + ["--eval-samples", "500"], "cannot hold out 500 of 60 records")

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    _bad(capsys, base[:-3] + ["--output-dir", str(blocker / "run"), "--quiet"], "cannot create output directory")
    assert blocker.read_text() == "x"


def test_tokenizer_mismatch_is_refused(tmp_path, tiny_model_dir, general_jsonl, capsys):
    from transformers import AutoTokenizer

    from tests.recipes.helpers import save_tiny_model_dir

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_tokens(["<tellneo-extra>"])
    student = save_tiny_model_dir(tmp_path / "student", tokenizer, num_hidden_layers=2)
    _bad(capsys, distill_args(tiny_model_dir, general_jsonl, tmp_path / "o", "--student", str(student)),
         "teacher's output head has 49152 rows but the student's has 49153")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    vocab = tokenizer.get_vocab()
    swapped = {vocab["hello"]: "hello", vocab["world"]: "world"}
    assert len(swapped) == 2
    os_student = save_tiny_model_dir(tmp_path / "student2", tokenizer, num_hidden_layers=2)
    tok_json = json.loads((os_student / "tokenizer.json").read_text())
    model_vocab = tok_json["model"]["vocab"]
    model_vocab["hello"], model_vocab["world"] = model_vocab["world"], model_vocab["hello"]
    (os_student / "tokenizer.json").write_text(json.dumps(tok_json))
    _bad(capsys, distill_args(tiny_model_dir, general_jsonl, tmp_path / "o3", "--student", str(os_student)),
         "teacher and student tokenizers differ")


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--teacher", "--student", "--layers", "--mode", "--preset", "--lora-r", "--alpha", "--temperature",
                 "--divergence", "--offline-topk", "--data", "--seq-len", "--max-steps", "--batch-size",
                 "--grad-accum", "--learning-rate", "--bf16", "--gradient-checkpointing", "--output-dir", "--resume",
                 "--overwrite", "--seed", "--eval-seed", "--validation-samples"):
        assert flag in text
    assert "(default: every_other)" in text and "(default: 24)" in text and "(default: outputs/distill)" in text


def test_threads_flag():
    from tellneo.cli import UserError
    from tellneo.commands._train_flags import apply_threads

    previous = torch.get_num_threads()
    try:
        assert apply_threads(3) == 3 and torch.get_num_threads() == 3
        torch.set_num_threads(previous)
        auto = apply_threads(0)
        assert 1 <= auto <= previous and torch.get_num_threads() == auto
        with pytest.raises(UserError):
            apply_threads(-1)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("variant, switch", [("dora", ("use_dora", True)), ("pissa", ("init_lora_weights", "pissa")),
                                             ("rslora", ("use_rslora", True))])
def test_each_lora_variant_trains_end_to_end(tmp_path, tiny_model_dir, general_jsonl, variant, switch):
    out = tmp_path / variant
    assert main(distill_args(tiny_model_dir, general_jsonl, out, "--lora-variant", variant, "--max-steps", "2",
                             "--eval-seed", "3", "--validation-samples", "4")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and not any(math.isnan(v) for v in summary["after"].values())
    adapter = json.loads(next(out.rglob("adapter_config.json")).read_text())
    assert adapter[switch[0]] == switch[1]
    assert json.loads((out / "manifest.json").read_text())["config"]["lora"]["variant"] == variant
