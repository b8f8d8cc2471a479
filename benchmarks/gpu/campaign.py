"""The GPU campaign: one command that reports the machine, installs the carried peers, builds the CUDA
extension, runs the GPU tests and then the benchmarks in priority order, within a time budget.

    python -m benchmarks.gpu --out DIR [--budget-s 420] [--dry-run] [--only STAGE ...] [--plan]

Every stage writes its files into ``--out`` as soon as it finishes (benchmark CSVs after every measured cell),
and ``campaign.json`` / ``campaign.csv`` record each stage's and cell's status (ok / partial / skipped with the
reason / failed with the traceback), its up-front estimate and its elapsed time. A cell whose estimate does not
fit in what is left of the budget is skipped and says so; one that runs over is stopped at the budget. So a
campaign cut short still leaves everything it measured. ``--dry-run`` runs the same code on the CPU at test
size (Triton interpreted, torch.compile disabled, CUDA-only cells skipped with the reason); CI runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

STAGES = ["env", "peers", "build", "tests", "kd", "ce", "lora", "mixer", "neo"]
SETUP_ESTIMATE_S = {"env": 5.0, "peers": 15.0, "build": 90.0, "tests": 90.0}
DRY_SETUP_ESTIMATE_S = {"env": 5.0, "peers": 10.0, "build": 5.0, "tests": 40.0}
RESERVE_S = 5.0  # kept back at the end of the budget for writing the status files
STATUS_JSON, STATUS_CSV = "campaign.json", "campaign.csv"


class BudgetExceeded(BaseException):
    """Raised inside a running cell when the budget is spent (BaseException: builders' handlers let it pass)."""


class Terminated(BaseException):
    """SIGTERM (e.g. the outer `timeout`): stop now, after writing the status files."""


class Budget:
    def __init__(self, total_s: float) -> None:
        self.total_s = total_s
        self.t0 = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.total_s - RESERVE_S - self.elapsed()

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Raise :class:`BudgetExceeded` in the body when the budget runs out (SIGALRM; main thread only)."""
        left = self.left()
        if left <= 0:
            raise BudgetExceeded(f"budget of {self.total_s:.0f} s spent")

        def on_alarm(signum: int, frame: Any) -> None:
            raise BudgetExceeded(f"stopped at the budget of {self.total_s:.0f} s")

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, left)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Status:
    """campaign.json + campaign.csv, rewritten atomically after every change."""

    def __init__(self, out: Path, budget: Budget, dry_run: bool) -> None:
        self.out = out
        self.budget = budget
        self.data: dict[str, Any] = {"dry_run": dry_run, "budget_s": budget.total_s, "started": _now(),
                                     "finished": None, "device": None, "stages": []}

    def stage(self, name: str, title: str, estimate_s: float, cells: list[dict[str, Any]] | None = None
              ) -> dict[str, Any]:
        st = {"name": name, "title": title, "status": "pending", "reason": "", "estimate_s": round(estimate_s, 1),
              "elapsed_s": None, "outputs": [], "cells": cells or [], "traceback": None}
        self.data["stages"].append(st)
        return st

    def write(self) -> None:
        from tellneo.io import atomic_write_csv, atomic_write_text

        self.data["elapsed_s"] = round(self.budget.elapsed(), 1)
        atomic_write_text(self.out / STATUS_JSON, json.dumps(self.data, indent=1) + "\n")
        rows = []
        for st in self.data["stages"]:
            rows.append({"stage": st["name"], "case": "", "impl": "", "status": st["status"], "reason": st["reason"],
                         "estimate_s": st["estimate_s"], "elapsed_s": st["elapsed_s"]})
            rows += [{"stage": st["name"], **{k: c.get(k) for k in ("case", "impl", "status", "reason", "estimate_s",
                                                                      "elapsed_s")}} for c in st["cells"]]
        atomic_write_csv(self.out / STATUS_CSV, rows)


# ----------------------------------------------------------------------------------------------- stage bodies
def _run_setup_stage(name: str, args: argparse.Namespace, budget: Budget, status: Status, st: dict[str, Any]
                     ) -> tuple[str, str]:
    from benchmarks.gpu import system

    if name == "env":
        env = system.environment()
        status.data["device"] = env["device"]
        status.data["env"] = env
        from tellneo.io import atomic_write_text

        atomic_write_text(args.out / "env.json", json.dumps(env, indent=1) + "\n")
        st["outputs"].append("env.json")
        for key in ("device", "nvidia_smi", "python", "torch", "torch_cuda", "triton", "transformers", "peft",
                    "liger-kernel", "cut-cross-entropy", "nvcc", "commit"):
            print(f"  {key:<18} {env.get(key)}", flush=True)
        return "ok", f"{env['device']}; torch {env['torch']} (CUDA {env['torch_cuda']}), triton {env['triton']}"
    if name == "peers":
        return system.install_peers(args.wheels, dry_run=args.dry_run, timeout_s=budget.left())
    if name == "build":
        env = status.data.get("env") or {}
        return system.build_extension(dry_run=args.dry_run, cuda=bool(env.get("cuda_available")),
                                      timeout_s=budget.left(), capability=env.get("capability"))
    if name == "tests":
        result = system.run_gpu_tests(args.out, timeout_s=budget.left())
        st["outputs"] += [p for p in ("gpu_tests.xml", "gpu_tests.csv") if (args.out / p).exists()]
        return result
    raise ValueError(name)


def _skip_reason(cell: Any, cuda: bool, budget: Budget) -> str | None:
    import importlib.util

    if cell.needs_cuda and not cuda:
        return "needs a CUDA device (none visible; dry run)"
    if cell.needs_module and importlib.util.find_spec(cell.needs_module) is None:
        return f"peer {cell.needs_module} is not installed (carry wheels/gpu: scripts/fetch-gpu-wheels.sh)"
    if cell.estimate_s > budget.left():
        return f"estimated {cell.estimate_s:.0f} s, only {max(0.0, budget.left()):.0f} s left in the budget"
    return None


def _write_results(stage: Any, rows: list[Any], out: Path, *, plot: bool) -> list[str]:
    from tellneo.bench import add_ratios, plot_ratios, write_csv

    if not rows:
        return []
    records = add_ratios(rows, stage.baseline)
    path = write_csv(records, out / stage.csv_name)
    written = [path.name]
    if plot:
        try:
            written.append(plot_ratios(records, path.with_suffix(".png"), stage.title).name)
        except ImportError as exc:  # matplotlib is not on every GPU image; `summarize --gpu` plots later
            print(f"  (no PNG: {exc})", flush=True)
    return written


def _run_bench_stage(stage: Any, budget: Budget, status: Status, st: dict[str, Any], out: Path) -> tuple[str, str]:
    import torch

    from tellneo.bench import Row, device_name, measure

    cuda = torch.cuda.is_available()
    dev_name = device_name(stage.device)
    rows: list[Row] = []
    for cell, rec in zip(stage.cells, st["cells"]):
        reason = _skip_reason(cell, cuda, budget)
        if reason:
            rec.update(status="skipped", reason=reason)
            print(f"  {cell.case:<24} {cell.impl:<22} skipped: {reason}", flush=True)
            status.write()
            continue
        rec["status"] = "running"
        status.write()
        t0 = time.monotonic()
        try:
            with budget.guard():
                m = measure(cell.job, stage.device, warmup=cell.warmup, repeat=cell.repeat, isolate=False)
        except BudgetExceeded as exc:
            rec.update(status="skipped", reason=f"{exc} after {time.monotonic() - t0:.0f} s "
                                                f"(estimate {cell.estimate_s:.0f} s)")
        except Exception as exc:  # one failed cell must not lose the others: record it and go on
            oom = "out of memory" in str(exc).lower()
            rec.update(status="skipped" if oom else "failed",
                       reason="out of memory" if oom else f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                       traceback=None if oom else traceback.format_exc())
        else:
            rows.append(Row(stage.suite, cell.case, cell.impl, dev_name, cell.dtype, cell.shape, m.time_ms,
                            m.peak_mb, dict(m.extra, **cell.extra)))
            rec["status"] = "ok"
            st["outputs"] = _write_results(stage, rows, out, plot=False)
        finally:
            if cuda:
                torch.cuda.empty_cache()
        rec["elapsed_s"] = round(time.monotonic() - t0, 1)
        shown = f"{m.time_ms:10.2f} ms  peak {m.peak_mb:9.1f} MB" if rec["status"] == "ok" else \
            f"{rec['status']}: {rec['reason']}"
        print(f"  {cell.case:<24} {cell.impl:<22} {shown}  ({rec['elapsed_s']} s)", flush=True)
        status.write()
    st["outputs"] = _write_results(stage, rows, out, plot=True)
    states = [c["status"] for c in st["cells"]]
    summary = ", ".join(f"{states.count(s)} {s}" for s in ("ok", "skipped", "failed") if states.count(s))
    if states.count("ok") == len(states):
        return "ok", summary
    if not states.count("ok"):
        reasons = sorted({c["reason"] for c in st["cells"]})
        return ("failed" if "failed" in states else "skipped"), f"{summary}: " + "; ".join(reasons)[:500]
    return "partial", summary


# ----------------------------------------------------------------------------------------------- main
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu",
        description=__doc__.split("\n\n")[0] + " Stages in order: " + ", ".join(STAGES) + ".",
        epilog="Results: copy --out to benchmarks/results/gpu/<device>/ with `python -m benchmarks.summarize "
               "--gpu DIR`. See benchmarks/gpu/README.md.",
    )
    p.add_argument("--out", type=Path, default=None,
                   help="(required unless --plan) folder for the CSVs, gpu_tests.xml/csv, env.json and campaign.json/csv (empty or new)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="wall-clock seconds for the whole campaign (default 420); cells that would not fit are "
                        "skipped and recorded as such")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU rehearsal at test size: Triton interpreted, torch.compile disabled, CUDA-only cells "
                        "and the build skipped with the reason (CI runs this)")
    p.add_argument("--only", nargs="+", choices=STAGES, metavar="STAGE",
                   help=f"run only these stages (of {', '.join(STAGES)}); the others are recorded as skipped")
    p.add_argument("--wheels", type=Path, default=None,
                   help="folder of carried peer wheels (default wheels/gpu of the checkout)")
    p.add_argument("--plan", action="store_true", help="print the stages, cells and time estimates, then exit")
    return p


def _print_plan(stages: list[tuple[str, str, float, Any]], budget_s: float) -> None:
    total = 0.0
    print(f"plan (estimates; budget {budget_s:.0f} s):", flush=True)
    for name, title, est, bench in stages:
        total += est
        print(f"  {name:<6} {est:7.0f} s  cumulative {total:7.0f} s  {title}", flush=True)
        for c in (bench.cells if bench is not None else []):
            print(f"           {c.estimate_s:7.1f} s  {c.case} / {c.impl}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.budget_s <= RESERVE_S:
        parser.error(f"--budget-s must be more than {RESERVE_S:.0f} seconds, got {args.budget_s:g}")
    if args.dry_run:
        # before torch/triton are imported: Triton kernels run on CPU tensors, torch.compile becomes a no-op
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    from benchmarks.gpu import system
    from benchmarks.gpu.plan import bench_stages

    args.wheels = args.wheels or system.DEFAULT_WHEELS
    setup_est = DRY_SETUP_ESTIMATE_S if args.dry_run else SETUP_ESTIMATE_S
    titles = {"env": "device, driver, versions", "peers": "install missing peers and build tools from the wheels",
              "build": "build tellneo._C with CUDA if needed", "tests": "GPU-marked tests (junit + CSV)"}
    benches = {b.name: b for b in bench_stages(args.dry_run)}
    plan = [(n, titles[n], setup_est[n], None) if n in titles else (n, benches[n].title, benches[n].estimate_s,
                                                                      benches[n]) for n in STAGES]
    if args.plan:
        _print_plan(plan, args.budget_s)
        return 0
    if args.out is None:
        parser.error("--out DIR is required (the folder the results and campaign.json go to)")
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA device is visible: the campaign needs a GPU (use --dry-run for the CPU rehearsal)")
    if (args.out / STATUS_JSON).exists():
        parser.error(f"--out {args.out} already holds a campaign ({STATUS_JSON}); give an empty or new folder")
    args.out.mkdir(parents=True, exist_ok=True)

    budget = Budget(args.budget_s)
    status = Status(args.out, budget, args.dry_run)
    status.data["only"] = args.only
    records = {}
    for name, title, est, bench in plan:
        cells = [{"case": c.case, "impl": c.impl, "status": "pending", "reason": "", "estimate_s": c.estimate_s,
                  "elapsed_s": None} for c in bench.cells] if bench is not None else None
        records[name] = status.stage(name, title, est, cells)
    status.write()
    _print_plan(plan, args.budget_s)

    def on_term(signum: int, frame: Any) -> None:
        raise Terminated(f"terminated by signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    for name, title, est, bench in plan:
        st = records[name]
        print(f"\n== {name}: {title} (estimate {est:.0f} s, {max(0.0, budget.left()):.0f} s left) ==", flush=True)
        if args.only and name not in args.only:
            st.update(status="skipped", reason="not selected (--only)")
            for c in st["cells"]:
                c.update(status="skipped", reason="not selected (--only)")
            status.write()
            continue
        st["status"] = "running"
        status.write()
        t0 = time.monotonic()
        body: Callable[[], tuple[str, str]] = (
            (lambda: _run_bench_stage(bench, budget, status, st, args.out)) if bench is not None
            else (lambda: _run_setup_stage(name, args, budget, status, st)))
        try:
            if bench is None:
                with budget.guard():
                    st["status"], st["reason"] = body()
            else:
                st["status"], st["reason"] = body()
        except (BudgetExceeded, Terminated) as exc:
            st.update(status="skipped", reason=str(exc))
            for c in st["cells"]:
                if c["status"] in ("pending", "running"):
                    c.update(status="skipped", reason=str(exc))
            if isinstance(exc, Terminated):
                st["elapsed_s"] = round(time.monotonic() - t0, 1)
                status.write()
                print(f"  {exc}; status written to {args.out / STATUS_JSON}", flush=True)
                return 1
        except Exception as exc:  # a failed stage must not lose the others: record it and go on
            st.update(status="failed", reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                      traceback=traceback.format_exc())
        st["elapsed_s"] = round(time.monotonic() - t0, 1)
        print(f"  -> {st['status']}: {st['reason']} ({st['elapsed_s']} s)", flush=True)
        status.write()
    status.data["finished"] = _now()
    status.write()
    print(f"\ncampaign done in {budget.elapsed():.0f} s; status in {args.out / STATUS_JSON}", flush=True)
    for st in status.data["stages"]:
        print(f"  {st['name']:<6} {st['status']:<8} {st['reason'][:150]}", flush=True)
    return 0


# ----------------------------------------------------------------------------------------------- checking
def check_outputs(out: Path, *, dry_run: bool = True) -> list[str]:
    """Problems with a finished campaign's outputs (empty list = fine): every stage present and finished, each
    skip carrying a reason, no stage or cell failed, the CSVs with the DESIGN.md columns and one finite row per
    measured cell; for a dry run, every selected (``--only``) benchmark stage measured at least one cell."""
    import csv

    from tellneo.bench import COLUMNS

    problems: list[str] = []
    try:
        data = json.loads((out / STATUS_JSON).read_text())
    except (OSError, ValueError) as exc:
        return [f"{STATUS_JSON}: cannot read it: {exc}"]
    if not data.get("finished"):
        problems.append("campaign did not finish (no 'finished' time)")
    if bool(data.get("dry_run")) != dry_run:
        problems.append(f"dry_run is {data.get('dry_run')}, expected {dry_run}")
    stages = {st["name"]: st for st in data.get("stages", [])}
    for name in STAGES:
        st = stages.get(name)
        if st is None:
            problems.append(f"stage {name}: missing")
            continue
        if st["status"] not in ("ok", "partial", "skipped"):
            tb = (st.get("traceback") or "").strip().splitlines()[-1:]
            problems.append(f"stage {name}: {st['status']}: {st['reason']} {' '.join(tb)}".strip())
        if st["status"] in ("partial", "skipped") and not st["reason"]:
            problems.append(f"stage {name}: {st['status']} without a reason")
        for c in st["cells"]:
            where = f"stage {name} cell {c['case']} / {c['impl']}"
            if c["status"] not in ("ok", "skipped"):
                problems.append(f"{where}: {c['status']}: {c['reason']}")
            elif c["status"] == "skipped" and not c["reason"]:
                problems.append(f"{where}: skipped without a reason")
        ok_cells = [c for c in st["cells"] if c["status"] == "ok"]
        selected = not data.get("only") or name in data["only"]
        if dry_run and selected and st["cells"] and not ok_cells:
            problems.append(f"stage {name}: the dry run measured none of its cells")
        for fname in st["outputs"]:
            if not (out / fname).exists():
                problems.append(f"stage {name}: output {fname} is missing")
        csvs = [f for f in st["outputs"] if f.endswith(".csv")]
        if st["cells"] and ok_cells:
            if len(csvs) != 1 or not (out / csvs[0]).exists():
                problems.append(f"stage {name}: expected one CSV output, got {csvs}")
                continue
            with (out / csvs[0]).open(newline="") as f:
                reader = csv.DictReader(f)
                header, rows = reader.fieldnames or [], list(reader)
            lacking = [c for c in COLUMNS if c not in header]
            if lacking:
                problems.append(f"{csvs[0]}: lacks the DESIGN.md columns {lacking}")
            measured = {(c["case"], c["impl"]) for c in ok_cells}
            if {(r.get("case"), r.get("impl")) for r in rows} != measured or len(rows) != len(measured):
                problems.append(f"{csvs[0]}: rows do not match the measured cells {sorted(measured)}")
            for r in rows:
                try:
                    t = float(r.get("time_ms", "nan"))
                except ValueError:
                    t = math.nan
                if not (math.isfinite(t) and t > 0):
                    problems.append(f"{csvs[0]}: {r.get('case')} / {r.get('impl')}: time_ms {r.get('time_ms')!r}")
    return problems


def check_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu.check",
                                description="Check a campaign's --out folder (exit 1 and list the problems).")
    p.add_argument("out", type=Path, help="the campaign's --out folder")
    p.add_argument("--gpu-run", action="store_true", help="a real GPU run (default: expect a dry run)")
    args = p.parse_args(argv)
    problems = check_outputs(args.out, dry_run=not args.gpu_run)
    for line in problems:
        print(f"campaign check: {line}", file=sys.stderr)
    if not problems:
        print(f"campaign check: {args.out} ok")
    return 1 if problems else 0
