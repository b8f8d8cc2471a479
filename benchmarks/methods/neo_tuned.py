"""The report of NEO's tuned protocol (scales with a learning-rate grid, e.g. ``cpu-tuned``): tables and the figure
from the rows of :func:`benchmarks.methods.neo.run` (typed, or strings read back from the CSV).

Main arms are compared at the rate chosen on the validation split, over seeds, on the fixed held-out set;
intervals are t-intervals over seeds (:func:`benchmarks.methods.stats.mean_ci`), differences are paired by seed
(the same seed gives two arms the same data order).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from benchmarks.methods.stats import Interval, mean_ci

MAIN_ARMS = ("lora-ce", "neo", "full-kd", "full-ce")
#: (b, a): the paired differences b − a the report gives
COMPARISONS = (("neo", "lora-ce"), ("neo", "full-kd"), ("full-kd", "full-ce"), ("neo", "full-ce"))
COLORS = {"lora-ce": "tab:gray", "neo": "tab:blue", "full-kd": "tab:green", "full-ce": "tab:olive"}


def is_tuned(rows: list[dict[str, Any]]) -> bool:
    """Rows of a tuned scale carry ``tuned_lr``."""
    return bool(rows) and "tuned_lr" in rows[0]


def _chosen(r: dict[str, Any]) -> bool:
    return str(r["tuned_lr"]) == "True"


def main_rows(rows: list[dict[str, Any]], arm: str) -> list[dict[str, Any]]:
    """The arm's runs at its chosen rate, ordered by seed."""
    return sorted((r for r in rows if r["arm"] == arm and _chosen(r)), key=lambda r: int(r["seed"]))


def _ci(group: list[dict[str, Any]], key: str) -> Interval:
    return mean_ci([float(r[key]) for r in group])


def _fmt(iv: Interval, digits: int = 3) -> str:
    if math.isnan(iv.low):
        return f"{iv.estimate:.{digits}f}"
    return f"{iv.estimate:.{digits}f} [{iv.low:.{digits}f}, {iv.high:.{digits}f}]"


def paired_difference(rows: list[dict[str, Any]], b: str, a: str, key: str) -> Interval | None:
    """Mean over shared seeds of ``key(b) − key(a)`` with its t-interval; None when no seed is shared."""
    rb = {int(r["seed"]): float(r[key]) for r in main_rows(rows, b)}
    ra = {int(r["seed"]): float(r[key]) for r in main_rows(rows, a)}
    seeds = sorted(set(rb) & set(ra))
    return mean_ci([rb[s] - ra[s] for s in seeds]) if seeds else None


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: main arms (mean [95 % t-interval over seeds]), paired differences, the sweep, the sensitivity
    rows."""
    r0 = rows[0]
    out = [f"Student before training (the same fixed held-out set for every run): CE {float(r0['ce_before']):.3f}, "
           f"KL {float(r0['kl_before']):.3f}, top-1 agreement {float(r0['top1_before']):.3f}; teacher CE "
           f"{float(r0['teacher_ce']):.3f}; {r0['eval_tokens']} held-out tokens.", "",
           "| arm | lr (chosen on validation) | seeds | trainable params | held-out CE ↓ | KL to teacher ↓ | "
           "top-1 agreement ↑ | training-phase peak MB | s/step |", "|" + "---|" * 9]
    for arm in MAIN_ARMS:
        group = main_rows(rows, arm)
        if not group:
            continue
        out.append("| " + " | ".join([
            arm, f"{float(group[0]['learning_rate']):g}", str(len(group)), f"{int(group[0]['trainable_params']):,}",
            _fmt(_ci(group, "ce_after")), _fmt(_ci(group, "kl_after")), _fmt(_ci(group, "top1_after")),
            _fmt(_ci(group, "train_peak_mb"), 0), _fmt(_ci(group, "s_per_step"), 2)]) + " |")
    out += ["", "Paired by seed (b − a; a negative CE difference favours b), mean [95 % t-interval]:", "",
            "| b − a | seeds | held-out CE | top-1 agreement | training-phase peak MB |", "|---|---|---|---|---|"]
    for b, a in COMPARISONS:
        ce = paired_difference(rows, b, a, "ce_after")
        if ce is None:
            continue
        top1 = paired_difference(rows, b, a, "top1_after")
        mem = paired_difference(rows, b, a, "train_peak_mb")
        out.append(f"| {b} − {a} | {ce.n} | {_fmt(ce)} | {_fmt(top1)} | {_fmt(mem, 0)} |")
    out += ["", "Learning-rate sweep (seed of the sweep; chosen = lowest validation CE):", "",
            "| arm | lr | validation CE | held-out CE | chosen |", "|---|---|---|---|---|"]
    seed0 = min(int(r["seed"]) for r in rows)
    for arm in MAIN_ARMS:
        for r in sorted((r for r in rows if r["arm"] == arm and int(r["seed"]) == seed0),
                        key=lambda r: float(r["learning_rate"])):
            out.append(f"| {arm} | {float(r['learning_rate']):g} | {float(r['val_ce_after']):.3f} | "
                       f"{float(r['ce_after']):.3f} | {'✓' if _chosen(r) else ''} |")
    sensitivity = [r for r in rows if r["arm"] not in MAIN_ARMS]
    if sensitivity:
        reference = [r for r in main_rows(rows, "neo") if int(r["seed"]) == seed0]
        out += ["", f"NEO's sensitivity (seed {seed0}, NEO's chosen rate; the first line is NEO itself):", "",
                "| arm | LoRA variant | rank | KD weight | trainable params | held-out CE | KL | top-1 | "
                "training-phase peak MB | s/step |", "|" + "---|" * 10]
        for r in reference + sensitivity:
            out.append(f"| {r['arm']} | {r['lora_variant']} | {r['lora_r']} | {r['kd_weight']} | "
                       f"{int(r['trainable_params']):,} | {float(r['ce_after']):.3f} | {float(r['kl_after']):.3f} | "
                       f"{float(r['top1_after']):.3f} | {float(r['train_peak_mb']):.0f} | "
                       f"{float(r['s_per_step']):.2f} |")
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Four panels: held-out CE and top-1 agreement per arm (chosen rate; bar = mean, whisker = 95 % t-interval,
    dots = seeds; sensitivity rows hatched), validation CE over the sweep, training-phase peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tellneo.io import atomic_save_figure

    arms = [a for a in MAIN_ARMS if main_rows(rows, a)] + \
        list(dict.fromkeys(r["arm"] for r in rows if r["arm"] not in MAIN_ARMS))
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.6))

    def bars(ax: Any, key: str, title: str, digits: int = 3) -> None:
        for i, arm in enumerate(arms):
            group = main_rows(rows, arm) if arm in MAIN_ARMS else [r for r in rows if r["arm"] == arm]
            iv = _ci(group, key)
            err = None if math.isnan(iv.low) else [[iv.estimate - iv.low], [iv.high - iv.estimate]]
            ax.bar(i, iv.estimate, color=COLORS.get(arm, "tab:cyan"), yerr=err, capsize=4,
                   hatch=None if arm in MAIN_ARMS else "//", edgecolor="black", linewidth=0.5)
            ax.scatter([i] * len(group), [float(r[key]) for r in group], color="black", s=10, zorder=3)
            ax.annotate(f"{iv.estimate:.{digits}f}", (i, iv.estimate), ha="center", va="bottom", fontsize=7,
                        xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right")
        ax.set_title(title, fontsize=10)

    bars(axes[0], "ce_after", f"held-out CE ↓ (student before: {float(rows[0]['ce_before']):.2f})")
    lows = [float(r["ce_after"]) for r in rows]
    axes[0].set_ylim(min(lows) - 0.3, max(lows) + 0.3)
    bars(axes[1], "top1_after", f"top-1 agreement with teacher ↑ (before: {float(rows[0]['top1_before']):.3f})")
    seed0 = min(int(r["seed"]) for r in rows)
    ax = axes[2]
    for arm in MAIN_ARMS:
        sweep = sorted((r for r in rows if r["arm"] == arm and int(r["seed"]) == seed0),
                       key=lambda r: float(r["learning_rate"]))
        if not sweep:
            continue
        ax.plot([float(r["learning_rate"]) for r in sweep], [float(r["val_ce_after"]) for r in sweep], "o-",
                color=COLORS[arm], label=arm)
        chosen = [r for r in sweep if _chosen(r)]
        ax.scatter([float(r["learning_rate"]) for r in chosen], [float(r["val_ce_after"]) for r in chosen],
                   marker="*", s=180, color=COLORS[arm], edgecolor="black", zorder=4)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_title(f"validation CE after training, seed {seed0} (★ chosen)", fontsize=10)
    ax.legend(fontsize=8)
    bars(axes[3], "train_peak_mb", "training-phase peak memory (MB above post-load) ↓", digits=0)
    fig.suptitle(f"NEO, tuned: SmolLM2-135M-Instruct teacher → {rows[0]['student_layers']}-layer student; "
                 f"{rows[0]['steps']} steps × {rows[0]['tokens_per_step']} tokens; {rows[0]['device']}", fontsize=10)
    fig.tight_layout()
    atomic_save_figure(fig, path)
