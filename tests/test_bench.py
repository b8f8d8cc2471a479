"""The benchmark harness measures what it says: peak memory of the call itself, median time, clear failures."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest

from tellneo.bench import Job, Row, add_ratios, measure


def test_cpu_peak_memory_sees_the_call_even_after_input_churn():
    m = measure(Job("tests.bench_jobs:allocate", {"mb": 64, "churn_mb": 128}), "cpu", warmup=1, repeat=2)
    assert 60 <= m.peak_mb <= 80, m.peak_mb
    assert m.time_ms > 0 and m.extra == {"mb": 64}


def test_dead_child_is_reported():
    with pytest.raises(RuntimeError, match="died with exit code 3"):
        measure(Job("tests.bench_jobs:crash"), "cpu", warmup=1, repeat=1)


def test_ratios_against_baseline():
    rows = [Row("s", "c", "a", "cpu", "fp32", "x", 10.0, 100.0), Row("s", "c", "b", "cpu", "fp32", "x", 5.0, 25.0)]
    recs = {r["impl"]: r for r in add_ratios(rows, "a")}
    assert recs["b"]["ratio_time"] == 0.5 and recs["b"]["ratio_mem"] == 0.25 and recs["a"]["ratio_time"] == 1.0
    only_b = add_ratios(rows[1:], "a")[0]
    assert only_b["ratio_time"] == "nan" and not math.isnan(float(only_b["time_ms"]))


# -- the harness is the public face the checkout's suites use (decision in tellneo/bench.py's docstring) --------

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _names_imported_from_the_harness() -> dict[str, set[str]]:
    used: dict[str, set[str]] = {}
    for path in sorted(BENCHMARKS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "tellneo.bench":
                used.setdefault(str(path.relative_to(BENCHMARKS)), set()).update(a.name for a in node.names)
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "bench" \
                    and node.attr.startswith("_"):
                used.setdefault(str(path.relative_to(BENCHMARKS)), set()).add(node.attr)
    return used


def test_suites_use_only_public_documented_harness_names():
    import tellneo.bench as harness

    used = _names_imported_from_the_harness()
    assert used, "no suite imports tellneo.bench: the scan is broken"
    for where, names in used.items():
        assert not {n for n in names if n.startswith("_")}, f"benchmarks/{where} imports private {names}"
        assert names <= set(harness.__all__), f"benchmarks/{where}: {names - set(harness.__all__)} not in __all__"
    for name in harness.__all__:
        obj = getattr(harness, name)
        assert name == "COLUMNS" or (obj.__doc__ or "").strip(), f"tellneo.bench.{name} has no docstring"


def test_suites_write_into_their_checkout_from_any_directory(tmp_path, monkeypatch):
    import benchmarks
    from benchmarks import bench_mixer

    assert benchmarks.RESULTS == BENCHMARKS / "results"
    elsewhere, results = tmp_path / "elsewhere", tmp_path / "results"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr(benchmarks, "RESULTS", results)  # the checkout's results, redirected for the test
    row = Row("mixer_plan", "c", "trl_bfd", "cpu", "int64", "x", 1.0, 2.0)
    monkeypatch.setattr(bench_mixer, "SUITES", {"plan": (lambda quick: [row], "trl_bfd", "cpu")})
    assert bench_mixer.main(["--suite", "plan"]) == 0
    assert (results / "mixer_plan.csv").is_file() and (results / "mixer_plan.png").is_file()
    assert not (elsewhere / "benchmarks").exists()


def test_bench_command_without_a_checkout_says_it_needs_one(tmp_path, monkeypatch, capsys):
    from tellneo.cli import main
    from tellneo.commands import bench

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, "__file__", str(tmp_path / "site-packages" / "tellneo" / "commands" / "bench.py"))
    assert bench._checkout_root(tmp_path) is None
    assert main(["bench", "--list"]) == 2
    assert "needs a source checkout" in capsys.readouterr().err


@pytest.mark.parametrize("suite", ["bench_fused_linear_kd", "bench_lora_linear", "bench_lora_step"])
def test_suites_refuse_cuda_without_a_gpu_in_one_line(suite, monkeypatch, capsys):
    import importlib

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        importlib.import_module(f"benchmarks.{suite}").main(["--device", "cuda"])
    assert exc.value.code == 2 and "--device cuda: no CUDA device is visible" in capsys.readouterr().err


def test_time_call_times_the_call_in_milliseconds():
    import time

    from tellneo.bench import time_call

    calls = []
    ms = time_call(lambda: (calls.append(1), time.sleep(0.03)), "cpu")
    assert calls == [1] and 25 <= ms < 3000, ms
