"""`--config OUTPUT/manifest.json` repeats a run (same manifest, same metrics), flags override it, a wrong manifest
is refused; `--report-to tensorboard` writes event files; `--data` / `--general` read parquet."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tellneo.cli import main
from tests.cli.test_distill_cli import distill_args
from tests.cli.test_tell_cli import tell_args
from tests.recipes.helpers import general_jsonl, one_thread, tiny_model_dir  # noqa: F401 (fixtures)


@pytest.fixture
def general_parquet(tmp_path, general_jsonl):
    rows = [json.loads(line) for line in general_jsonl.read_text().splitlines()]
    path = tmp_path / "general.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def manifest(out):
    return json.loads((out / "manifest.json").read_text())


def losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_distill_repeats_from_its_manifest(tmp_path, tiny_model_dir, general_parquet, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    args = distill_args(tiny_model_dir, general_parquet, a, "--alpha", "0.3", "--lora-r", "4", "--seed", "3",
                        "--max-steps", "2", "--threads", "1", "--report-to", "tensorboard")
    assert main(args) == 0
    assert str(general_parquet) in manifest(a)["config"]["data"]
    assert list((a / "checkpoints" / "runs").rglob("events.out.tfevents.*"))  # TensorBoard got the logs
    assert "report_to" not in json.dumps(manifest(a))  # where logs go is not part of the run

    assert main(["distill", "--config", str(a / "manifest.json"), "--output-dir", str(b), "--quiet",
                 "--threads", "1"]) == 0
    assert manifest(b) == manifest(a)
    assert losses(b) == losses(a) and len(losses(a)) == 2
    assert json.loads((b / "summary.json").read_text())["after"] == json.loads((a / "summary.json").read_text())["after"]

    capsys.readouterr()
    # a flag given with --config overrides the manifest: a different config, refused over the existing run
    assert main(["distill", "--config", str(a / "manifest.json"), "--output-dir", str(a), "--alpha", "0.9"]) == 2
    assert "holds a different run" in capsys.readouterr().err


def test_wrong_or_broken_manifests_and_report_to_are_refused(tmp_path, tiny_model_dir, general_jsonl, capsys):
    tell_manifest = tmp_path / "tell.json"
    tell_manifest.write_text(json.dumps({"config_hash": "x", "config": {"task": "date_iso", "window": 64}}))
    assert main(["distill", "--config", str(tell_manifest)]) == 2
    err = capsys.readouterr().err
    assert "not a manifest of `tellneo distill` (unknown settings: task, window)" in err and "Traceback" not in err
    (tmp_path / "broken.json").write_text("{nope")
    assert main(["tell", "--config", str(tmp_path / "broken.json")]) == 2
    assert "not a readable JSON manifest" in capsys.readouterr().err
    assert main(distill_args(tiny_model_dir, general_jsonl, tmp_path / "o", "--report-to", "nonsense")) == 2
    assert "report-to: unknown integration(s) ['nonsense']" in capsys.readouterr().err


def test_tell_repeats_from_its_manifest(tmp_path, tiny_model_dir, general_parquet):
    a, b = tmp_path / "a", tmp_path / "b"
    args = tell_args(tiny_model_dir, general_parquet, a, "--no-anchor", "--lora-r", "4", "--max-steps", "2",
                     "--threads", "1", "--no-fused-lora")
    assert main(args) == 0
    assert manifest(a)["config"]["use_anchor"] is False and manifest(a)["config"]["lora"]["patch"] is False
    assert main(["tell", "--config", str(a / "manifest.json"), "--output-dir", str(b), "--quiet",
                 "--threads", "1"]) == 0
    assert manifest(b) == manifest(a)
    assert losses(b) == losses(a) and len(losses(a)) == 2
