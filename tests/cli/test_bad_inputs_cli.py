"""Hostile inputs through the installed ``tellneo`` console script, each in its own process: exit status 2, one
``error:`` line on stderr that names the argument or file, and no traceback (issue 18)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.recipes.helpers import general_jsonl, tiny_model_dir  # noqa: F401 (fixtures)


def tellneo_command() -> list[str]:
    """The console script beside this interpreter (what a user runs), else ``python -m tellneo.cli``."""
    script = Path(sys.executable).parent / "tellneo"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "tellneo.cli"]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([*tellneo_command(), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, command: str, *fragments: str) -> str:
    """Exit 2, no traceback, exactly one ``error:`` line and it is the last one (progress bars may precede it)."""
    err = proc.stderr
    assert proc.returncode == 2, (proc.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and lines[-1] == errors[0], lines[-5:]
    assert errors[0].startswith(f"tellneo {command}: error: "), errors[0]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def truncated_gguf(tmp_path: Path, size: int) -> Path:
    from tellneo.models import smollm2_gguf

    with smollm2_gguf().open("rb") as f:
        head = f.read(size)
    path = tmp_path / f"cut-{size}.gguf"
    path.write_bytes(head)
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("case", ["assistant_first", "leading_newlines", "anchor_not_utf8"])
def test_mix_bad_task_data_and_anchor(tmp_path, tiny_model_dir, general_jsonl, case):
    mix = ["mix", "--model", str(tiny_model_dir), "--general", str(general_jsonl), "--output-dir", "out"]
    if case == "assistant_first":
        write_jsonl(tmp_path / "task.jsonl", [{"prompt": "q", "response": "a"}, {"messages": [
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "ok"}]}])
        proc = run_cli(*mix, "--task", "task.jsonl", "--anchor", "Answer briefly. ", cwd=tmp_path)
        assert_one_line_error(proc, "mix", "task.jsonl:2: messages[0] is an assistant turn")
    elif case == "leading_newlines":
        write_jsonl(tmp_path / "task.jsonl", [{"prompt": "q", "response": "a"}, {"prompt": "Name it.",
                                                                                "response": "\n\nanswer"}])
        proc = run_cli(*mix, "--task", "task.jsonl", "--anchor", "Answer briefly. ", cwd=tmp_path)
        assert_one_line_error(proc, "mix", "--task task.jsonl: record 1 ('Name it.')",
                              r"the reply starts with whitespace ('\n\n')")
    else:
        (tmp_path / "anchor.txt").write_bytes(b"Role: translator\n\xff\xfe\n")
        proc = run_cli(*mix, "--anchor-file", "anchor.txt", cwd=tmp_path)
        assert_one_line_error(proc, "mix", "--anchor-file anchor.txt: not UTF-8 text (byte 0xff at offset 17)")


def test_tell_anchor_file_not_utf8(tmp_path):
    (tmp_path / "anchor.txt").write_bytes(b"\xc3(")
    proc = run_cli("tell", "--anchor-file", "anchor.txt", "--output-dir", "out", cwd=tmp_path)
    assert_one_line_error(proc, "tell", "--anchor-file anchor.txt: not UTF-8 text (byte 0xc3 at offset 0)")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("overlong, message", [
    ("truncate", "every general sample is longer than --seq-len 8 (the shortest has"),
    ("error", "general sample 0 has"),
])
def test_mix_every_general_sample_longer_than_seq_len(tmp_path, tiny_model_dir, general_jsonl, overlong, message):
    proc = run_cli("mix", "--model", str(tiny_model_dir), "--general", str(general_jsonl), "--seq-len", "8",
                   "--overlong", overlong, "--output-dir", "out", cwd=tmp_path)
    line = assert_one_line_error(proc, "mix", message, "--seq-len")
    assert "--overlong" in line


@pytest.mark.parametrize("flag, size", [("--teacher", 1024), ("--student", 1 << 20)])
def test_distill_truncated_gguf(tmp_path, tiny_model_dir, general_jsonl, flag, size):
    cut = truncated_gguf(tmp_path, size)
    models = ["--teacher", str(cut)] if flag == "--teacher" else ["--teacher", str(tiny_model_dir), "--student",
                                                                   str(cut)]
    proc = run_cli("distill", *models, "--data", str(general_jsonl), "--output-dir", "out", "--quiet", cwd=tmp_path)
    assert_one_line_error(proc, "distill", f"cannot load a causal LM from {cut}",
                          f"a GGUF file of {size:,} bytes: truncated or corrupt?")


def test_distill_with_a_nan_teacher_weight_stops_at_step_1(tmp_path, tiny_model_dir, general_jsonl):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():  # layer 1 is not in the built student (every other layer: 0, 2), only the teacher is bad
        teacher.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    teacher.save_pretrained(tmp_path / "nan-teacher")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "nan-teacher")
    proc = run_cli("distill", "--teacher", "nan-teacher", "--data", str(general_jsonl), "--max-samples", "40",
                   "--eval-samples", "4", "--seq-len", "128", "--max-steps", "3", "--output-dir", "out", "--quiet",
                   cwd=tmp_path)
    assert_one_line_error(proc, "distill", "non-finite loss nan at step 1; training stopped before applying that "
                                           "step, and no checkpoint was saved before it")
    assert not (tmp_path / "out" / "adapter").exists() and not (tmp_path / "out" / "summary.json").exists()
