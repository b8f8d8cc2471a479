"""`tellneo mix` and `tellneo info`: outputs, resume, and one clear message per bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tellneo.cli import main


@pytest.fixture(scope="module")
def small_general(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "general.jsonl"
    rows = [{"prompt": f"Say the number {i} in words.", "response": f"The number is {i}. " * (1 + i % 7)}
            for i in range(300)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_mix_writes_shards_stats_and_plot_and_resumes(tmp_path, small_general, capsys):
    out = tmp_path / "mix"
    args = ["mix", "--general", str(small_general), "--task-samples", "8", "--seq-len", "256",
            "--task-ratio", "0.1", "--rows-per-shard", "16", "--output-dir", str(out)]
    assert main(args) == 0
    stats = json.loads((out / "stats.json").read_text())
    (epoch,) = stats["epochs"]
    assert epoch["task_samples"] == round(0.1 * 300 / 0.9) and 0.8 < epoch["fill_rate"] <= 1
    shards = sorted((out / "epoch-000").glob("shard-*.npz"))
    assert len(shards) == epoch["shards_written"] == -(-epoch["rows"] // 16)
    rows = sum(np.load(s)["input_ids"].shape[0] for s in shards)
    assert rows == epoch["rows"] and (out / "dispersion.png").stat().st_size > 1000
    before = shards[0].stat().st_mtime_ns
    assert main(args) == 0  # same config: resumes, reuses the shards
    assert shards[0].stat().st_mtime_ns == before
    assert json.loads((out / "stats.json").read_text())["epochs"][0]["shards_reused"] == len(shards)
    assert main([*args[:-2], "--output-dir", str(out), "--seq-len", "128"]) == 2
    assert "holds a different run" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": \n', "bad.jsonl:2: not valid JSON"),
        ('{"prompt": "a"}\n', "bad.jsonl:1: 'prompt' and 'response' must both be strings"),
        ('["a"]\n', "bad.jsonl:1: expected a JSON object"),
        ("\n\n", "bad.jsonl: the file holds no records"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', "bad.jsonl:1: the conversation has no assistant"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, small_general, capsys, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    assert main(["mix", "--general", str(small_general), "--task", str(bad), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_other_bad_inputs(tmp_path, small_general, capsys):
    assert main(["mix", "--general", str(tmp_path / "missing.jsonl"), "--output-dir", str(tmp_path / "o")]) == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err
    assert main(["mix", "--task-ratio", "1.5", "--output-dir", str(tmp_path / "o")]) == 2
    assert "--task-ratio must be in (0, 1)" in capsys.readouterr().err
    assert main(["mix", "--general", str(small_general), "--model", str(tmp_path / "nope.gguf"),
                 "--output-dir", str(tmp_path / "o2")]) == 2
    assert "nope.gguf does not exist" in capsys.readouterr().err
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    import os

    if os.geteuid() != 0:  # root ignores permissions
        assert main(["mix", "--general", str(small_general), "--output-dir", str(locked / "x")]) == 2
        assert "cannot create output directory" in capsys.readouterr().err


def test_info_cli(capsys):
    assert main(["info"]) == 0
    assert "backends:" in capsys.readouterr().out
    assert main(["info", "--json"]) == 0
    assert "backends" in json.loads(capsys.readouterr().out)


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["mix", "--help"])
    text = capsys.readouterr().out
    for flag in ("--general", "--task", "--task-ratio", "--seq-len", "--strategy", "--window", "--output-dir"):
        assert flag in text
    assert "(default: 0.05)" in " ".join(text.split())
