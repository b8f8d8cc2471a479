"""The GPU campaign (benchmarks/gpu): its CPU dry run leaves complete, checkable outputs, the checker rejects
broken ones, and the budget skips or stops what does not fit."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.gpu import campaign, system
from benchmarks.gpu.plan import bench_stages
from tellneo.bench import COLUMNS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dry_run_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real dry run of the cheap stages (the full dry run is in .ci/run), in a fresh interpreter."""
    out = tmp_path_factory.mktemp("campaign") / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--dry-run", "--out", str(out), "--budget-s",
                           "300", "--only", "env", "build", "lora", "mixer"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_dry_run_outputs_pass_the_check(dry_run_out: Path) -> None:
    assert campaign.check_outputs(dry_run_out, dry_run=True) == []
    data = json.loads((dry_run_out / campaign.STATUS_JSON).read_text())
    stages = {st["name"]: st for st in data["stages"]}
    assert list(stages) == campaign.STAGES
    assert stages["kd"]["status"] == "skipped" and "--only" in stages["kd"]["reason"]
    mixer = {c["impl"]: c for c in stages["mixer"]["cells"]}
    assert mixer["tellneo_cuda"]["status"] == "skipped" and "CUDA" in mixer["tellneo_cuda"]["reason"]
    assert mixer["tellneo_cpp_then_copy"]["status"] == "ok"
    with (dry_run_out / "lora_linear.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(c in rows[0] for c in COLUMNS)
    assert {r["impl"] for r in rows} == {"tellneo", "peft", "peft+compile", "base-linear"}
    assert all(float(r["time_ms"]) > 0 for r in rows)


def _broken_copy(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    path = dst / campaign.STATUS_JSON
    data = json.loads(path.read_text())
    edit(data, dst)
    path.write_text(json.dumps(data))
    return dst


def _stage(data: dict, name: str) -> dict:
    return next(st for st in data["stages"] if st["name"] == name)


@pytest.mark.parametrize("breakage, expected", [
    (lambda d, out: d.update(finished=None), "did not finish"),
    (lambda d, out: _stage(d, "lora")["cells"][0].update(status="failed", reason="RuntimeError: boom"), "boom"),
    (lambda d, out: _stage(d, "mixer")["cells"][0].update(reason=""), "skipped without a reason"),
    (lambda d, out: _stage(d, "build").update(status="failed", reason="CalledProcessError"), "stage build: failed"),
    (lambda d, out: [c.update(status="skipped", reason="x") for c in _stage(d, "lora")["cells"]],
     "measured none"),
    (lambda d, out: (out / "lora_linear.csv").write_text("suite,case\nlora_linear,x\n"), "lacks the DESIGN.md"),
    (lambda d, out: (out / "mixer_cuda_emit.csv").unlink(), "missing"),
])
def test_check_rejects_broken_outputs(dry_run_out: Path, tmp_path: Path, breakage, expected: str) -> None:
    broken = _broken_copy(dry_run_out, tmp_path / "broken", breakage)
    problems = campaign.check_outputs(broken, dry_run=True)
    assert any(expected in p for p in problems), problems
    assert campaign.check_outputs(dry_run_out, dry_run=False)  # a dry run is not a GPU run


def test_cells_that_do_not_fit_the_budget_are_skipped_with_the_reason() -> None:
    cell = next(c for c in bench_stages(dry_run=False)[0].cells if c.impl == "liger+compile")
    assert cell.estimate_s > 30  # a compile is budgeted for
    budget = campaign.Budget(campaign.RESERVE_S + 10)
    reason = campaign._skip_reason(cell, cuda=True, budget=budget)
    assert reason is not None and "only" in reason and "left in the budget" in reason
    cuda_cell = next(c for c in bench_stages(dry_run=True)[3].cells if c.needs_cuda)
    assert "CUDA" in campaign._skip_reason(cuda_cell, cuda=False, budget=campaign.Budget(1000))


def test_budget_guard_stops_a_running_cell() -> None:
    budget = campaign.Budget(campaign.RESERVE_S + 0.3)
    t0 = time.monotonic()
    with pytest.raises(campaign.BudgetExceeded):
        with budget.guard():
            time.sleep(5)
    assert time.monotonic() - t0 < 2


def test_gpu_plan_has_the_issue_shapes() -> None:
    stages = {s.name: s for s in bench_stages(dry_run=False)}
    kd = stages["kd"].cells
    assert {c.job.kwargs["n"] for c in kd} == {1024, 4096, 8192}
    assert {(c.job.kwargs["hs"], c.job.kwargs["ht"], c.job.kwargs["v"], c.dtype) for c in kd} == {
        (2048, 4096, 128256, "bfloat16")}
    assert {c.impl for c in kd} == {"tellneo-triton", "liger", "liger+compile", "torch-full"}
    assert all(c.job.kwargs["grad_error"] for c in kd)
    lora = stages["lora"].cells
    assert {(c.job.kwargs["d_in"], c.job.kwargs["tokens"], c.job.kwargs["p"]) for c in lora} == {
        (d, 4096, p) for d in (4096, 8192) for p in (0.0, 0.1)}
    assert {c.impl for c in stages["ce"].cells} == {"tellneo-triton", "cut-cross-entropy", "torch-full"}
    assert {c.impl for c in stages["mixer"].cells} == {"tellneo_cuda", "tellneo_cpp_then_copy", "index_select"}
    neo = stages["neo"].cells
    assert {c.job.kwargs["model"] for c in neo} == {"llama-1b"} and {c.impl for c in neo} == {
        "plain", "tellneo-kd", "tellneo"}


def test_junit_summary(tmp_path: Path) -> None:
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="t" name="a" time="0.1"/>'
                   '<testcase classname="t" name="b" time="0.2"><failure message="assert 1 == 2">x</failure>'
                   '</testcase><testcase classname="t" name="c" time="0"><skipped message="needs CUDA"/>'
                   '</testcase></testsuite></testsuites>')
    recs = {r["test"]: r for r in system.junit_records(xml)}
    assert [recs[k]["outcome"] for k in ("t::a", "t::b", "t::c")] == ["passed", "failed", "skipped"]
    assert recs["t::b"]["message"] == "assert 1 == 2"


def test_cli_errors_name_the_argument(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        campaign.main(["--budget-s", "300"])
    assert exc.value.code == 2 and "--out" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        campaign.main(["--out", str(tmp_path), "--budget-s", "1"])
    assert exc.value.code == 2 and "--budget-s" in capsys.readouterr().err
    (tmp_path / campaign.STATUS_JSON).write_text("{}")
    if not __import__("torch").cuda.is_available():
        with pytest.raises(SystemExit) as exc:
            campaign.main(["--out", str(tmp_path)])
        assert exc.value.code == 2 and "--dry-run" in capsys.readouterr().err


def test_missing_requirements_respect_minimum_versions() -> None:
    assert system._version_tuple("2.13.0+cpu") == (2, 13, 0)
    assert system.missing([system.Requirement("torch", "1.0", "x")]) == []
    assert system.missing([system.Requirement("torch", "999", "x")])
    assert system.missing([system.Requirement("no-such-dist-tellneo", None, "x")])


def test_summarize_imports_a_campaign_and_checks_targets(dry_run_out: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import summarize

    monkeypatch.setattr(summarize, "RESULTS", tmp_path / "results")
    assert summarize.main(["--gpu", str(dry_run_out)]) == 0
    (dest,) = (tmp_path / "results" / "gpu").iterdir()
    assert (dest / "lora_linear.csv").exists() and (dest / "lora_linear.png").exists()
    assert (dest / "campaign.json").exists()
    targets = (dest / "TARGETS.md").read_text()
    rows = {r["impl"]: float(r["time_ms"]) for r in csv.DictReader((dest / "lora_linear.csv").open())
            if r["case"].endswith("p0.0")}
    assert f"| {rows['tellneo'] / rows['peft']:.3f} |" in targets  # the ratio is computed from the rows
    readme = (tmp_path / "results" / "README.md").read_text()
    assert "## GPU" in readme and "lora_linear" in readme and "TARGETS.md" in readme
    assert "campaign.csv" not in readme.split("## GPU")[1].split("Targets")[0]
