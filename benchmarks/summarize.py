"""Render every CSV under benchmarks/results/ (and results/gpu/<device>/) into benchmarks/results/README.md.

    python -m benchmarks.summarize [--gpu CAMPAIGN_OUT]

``--gpu DIR`` first imports a GPU campaign's output folder (``python -m benchmarks.gpu --out DIR``): its CSVs,
status files and test summary are copied to ``benchmarks/results/gpu/<device>/`` (the device named in the
CSVs), missing PNGs are drawn from the CSVs, and the issue's targets (KD vs Liger, LoRA vs PEFT / base linear)
are checked from the measured rows. The tables are generated from the CSVs, never typed by hand, so the numbers
in the docs are the measured ones.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import shutil
import sys
from pathlib import Path

from benchmarks import RESULTS
from tellneo.io import atomic_write_text

SHOWN = ["case", "impl", "time_ms", "peak_mb", "ratio_time", "ratio_mem"]


def table(path: Path) -> str:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return f"*{path.name}: empty*\n"
    extra = [c for c in rows[0] if c not in SHOWN and c not in (
        "suite", "device", "dtype", "shape", "baseline_impl", "commit", "date")]
    cols = SHOWN + extra
    r0 = rows[0]
    head = (f"**{r0['suite']}** — device: {r0['device']}; dtype: {r0['dtype']}; ratios vs `{r0['baseline_impl']}`; "
            f"commit {r0['commit']}, {r0['date']} ([csv]({path.relative_to(RESULTS)}), "
            f"[png]({path.with_suffix('.png').relative_to(RESULTS)}))\n\n")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return head + "\n".join(lines) + "\n"


CAMPAIGN_FILES = ("campaign.json", "campaign.csv", "env.json", "gpu_tests.csv")
# (suite, impl, against, column, bound, label): the GPU targets, checked per case where both rows exist
TARGETS = [
    ("fused_linear_kd", "tellneo-triton", "liger", "time_ms", 0.6, "KD time <= 0.6x Liger"),
    ("fused_linear_kd", "tellneo-triton", "liger+compile", "time_ms", 0.6, "KD time <= 0.6x Liger compiled"),
    ("fused_linear_kd", "tellneo-triton", "liger", "peak_mb", 0.3, "KD peak memory <= 0.3x Liger"),
    ("fused_linear_kd", "tellneo-triton", "liger+compile", "peak_mb", 0.3, "KD peak memory <= 0.3x Liger compiled"),
    ("lora_linear", "tellneo", "peft", "time_ms", 1 / 1.4, "LoRA >= 1.4x faster than PEFT eager"),
]


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def device_slug(name: str) -> str:
    """``NVIDIA H200`` -> ``nvidia-h200`` (the folder name under results/gpu/)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown-device"


def _num(x: str | None) -> float:
    try:
        return float(x) if x not in (None, "") else math.nan
    except ValueError:
        return math.nan


def target_lines(dest: Path) -> list[str]:
    """One table row per target and case: measured ratio, bound, met or not (only cases with both rows)."""
    rows = {p.stem: _read(p) for p in dest.glob("*.csv")}
    out = []
    for suite, impl, against, col, bound, label in TARGETS:
        by = {(r["case"], r["impl"]): r for r in rows.get(suite, [])}
        for case in dict.fromkeys(r["case"] for r in rows.get(suite, [])):
            a, b = _num(by.get((case, impl), {}).get(col)), _num(by.get((case, against), {}).get(col))
            if math.isfinite(a) and math.isfinite(b) and b > 0:
                out.append(f"| {label} | {case} | {a / b:.3f} | {bound:.3f} | {'yes' if a / b <= bound else 'NO'} |")
    lora = rows.get("lora_linear", [])
    by = {(r["case"], r["impl"]): r for r in lora}
    for case in dict.fromkeys(r["case"] for r in lora):
        t = _num(by.get((case, "tellneo"), {}).get("time_ms"))
        base = _num(by.get((case.replace("p0.1", "p0.0"), "base-linear"), {}).get("time_ms"))
        if math.isfinite(t) and math.isfinite(base) and base > 0:
            out.append(f"| LoRA <= 1.1x frozen base linear | {case} | {t / base:.3f} | 1.100 | "
                       f"{'yes' if t / base <= 1.1 else 'NO'} |")
        if "p0.1" in case:
            t0 = _num(by.get((case.replace("p0.1", "p0.0"), "tellneo"), {}).get("time_ms"))
            if math.isfinite(t) and math.isfinite(t0) and t0 > 0:
                out.append(f"| LoRA p=0.1 within 5% of p=0 | {case} | {t / t0:.3f} | 1.050 | "
                           f"{'yes' if t / t0 <= 1.05 else 'NO'} |")
    return out


def import_gpu_campaign(src: Path) -> Path:
    """Copy a campaign's --out folder into results/gpu/<device>/, draw missing PNGs, write TARGETS.md."""
    from tellneo.bench import plot_ratios
    from tellneo.io import atomic_write_text

    csvs = sorted(p for p in src.glob("*.csv") if p.name not in CAMPAIGN_FILES)
    devices = {r["device"] for p in csvs for r in _read(p) if r.get("device")}
    if not csvs or len(devices) != 1:
        raise SystemExit(f"summarize: --gpu {src}: expected the benchmark CSVs of one device, found {len(csvs)} "
                         f"CSV(s) for devices {sorted(devices)}")
    dest = RESULTS / "gpu" / device_slug(devices.pop())
    dest.mkdir(parents=True, exist_ok=True)
    for p in [*csvs, *(src / f for f in CAMPAIGN_FILES if (src / f).exists())]:
        shutil.copyfile(p, dest / p.name)
        png = p.with_suffix(".png")
        if p in csvs and png.exists():
            shutil.copyfile(png, dest / png.name)
        elif p in csvs:
            records = _read(p)
            plot_ratios(records, dest / png.name, f"{records[0]['suite']} (GPU campaign)")
    lines = target_lines(dest)
    atomic_write_text(dest / "TARGETS.md", "# Targets of the GPU campaign (issue 16), from the CSVs here\n\n"
                      "| target | case | measured ratio | bound | met |\n|---|---|---|---|---|\n"
                      + ("\n".join(lines) if lines else "| (no case has both rows) | | | | |") + "\n")
    print(f"imported {len(csvs)} CSV(s) from {src} into {dest}")
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", type=Path, default=None, metavar="CAMPAIGN_OUT",
                        help="import a GPU campaign's --out folder into benchmarks/results/gpu/<device>/ first")
    args = parser.parse_args(argv)
    if args.gpu is not None:
        if not args.gpu.is_dir():
            parser.error(f"--gpu: {args.gpu} is not a folder (give the campaign's --out folder)")
        import_gpu_campaign(args.gpu)
    parts = ["# Benchmark results\n", "Generated by `python -m benchmarks.summarize` from the CSV files in this "
             "directory. Each CSV row is one (case, implementation) measured in the same run as its baseline; "
             "`time_ms` is a median, `peak_mb` the peak memory of the call (CUDA allocator peak, or growth of the "
             "process's peak RSS on CPU). CPU timings come from a shared 2-core machine and are for regressions, "
             "not for GPU claims.\n"]
    for sub, title in ((RESULTS, "## CPU"), (RESULTS / "gpu", "## GPU")):
        # GPU campaigns: one folder per device (results/gpu/<device>/); their status files are not tables
        csvs = sorted(p for p in sub.glob("*.csv" if sub == RESULTS else "**/*.csv") if p.name not in CAMPAIGN_FILES)
        parts.append(title + "\n")
        parts += [table(p) for p in csvs] if csvs else ["No results committed yet.\n"]
        if sub != RESULTS:
            parts += [f"Targets: [{p.relative_to(RESULTS)}]({p.relative_to(RESULTS)})\n"
                      for p in sorted(sub.glob("*/TARGETS.md"))]
    atomic_write_text(RESULTS / "README.md", "\n".join(parts))
    print(f"wrote {RESULTS / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
