"""TELL experiment: test accuracy of a low-resource task against the task tokens given, for SFT and TELL.

Task: ``date_iso`` (rewrite an English date as YYYY-MM-DD; generated, so the answers are checkable and the
held-out test prompts are disjoint from every training budget). General stream: instruction pairs built from
Python's own documentation (PSF license). Model: the embedded SmolLM2-135M-Instruct with LoRA.

Arms, at each task budget N (TELL, arXiv 2404.00914):

* ``sft`` — the N task samples alone, no anchor, shuffled every epoch, for ``scale.tell_steps`` steps;
* ``tell`` — anchor prompt + the N samples spread evenly (stratified shuffle) through the general stream at a
  fixed sample ratio, one epoch of the mix (about the same number of steps as ``sft``);
* ``tell-no-anchor`` — the same mix without the anchor prompt;
* ``tell-no-shuffle`` — anchor, but the task block after the general stream (``spread="end"``).

The claim tested: TELL reaches SFT's accuracy with about 10x fewer task tokens and beats SFT at equal task tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.methods.common import Scale, machine_columns, run_dir_for

LR = 1e-3
# every arm pins its schedule (the values the arms have always run with) instead of leaving it to the recipe
PINNED_TRAIN = {"lr_scheduler": "cosine", "warmup_ratio": 0.1}
TASK_RATIO = 0.5  # fraction of the mixed samples that are task samples
ARMS = ("sft", "tell", "tell-no-anchor", "tell-no-shuffle")


def arm_config(arm: str, budget: int, scale: Scale, seed: int) -> dict[str, Any]:
    from tellneo.recipes.training import TrainSettings

    if arm == "sft":
        train = TrainSettings(batch_size=scale.batch_size, max_steps=scale.tell_steps, epochs=1.0, learning_rate=LR,
                              seed=seed, bf16=scale.bf16, save_steps=10_000, **PINNED_TRAIN)
    else:  # one epoch of the mix, so that the 'end' arm reaches its task block
        train = TrainSettings(batch_size=scale.batch_size, max_steps=-1, epochs=1.0, learning_rate=LR, seed=seed,
                              bf16=scale.bf16, save_steps=10_000, **PINNED_TRAIN)
    return {"task": "date_iso", "task_samples": budget, "test_samples": 60, "method": "sft" if arm == "sft"
            else "tell", "use_anchor": arm in ("tell", "tell-no-shuffle"), "spread": "end" if arm ==
            "tell-no-shuffle" else "stratified", "task_ratio": TASK_RATIO,
            "general_samples": scale.tell_general_samples, "seq_len": scale.seq_len, "window": 64, "mode": "lora",
            "lora_r": 16, "lora_alpha": 32.0, "lora_dropout": 0.05, "max_new_tokens": 12, "eval_batch_size": 20,
            "train": asdict(train)}


def row(arm: str, budget: int, record: dict[str, Any], scale: Scale) -> dict[str, Any]:
    s = record["summary"]
    exposure = s["exposure"]
    return {
        "experiment": "tell", "arm": arm, "task_samples": budget, "seed": record["config"]["train"]["seed"],
        "scale": scale.name, "anchor_chars": s["anchor_chars"], "steps": s["steps"],
        "tokens_per_step": s["global_batch_rows"] * s["seq_len"],
        "task_samples_seen": exposure["task_samples"], "task_tokens_seen": exposure["task_tokens"],
        "task_trained_tokens_seen": exposure["task_trained_tokens"], "all_tokens_seen": exposure["all_tokens"],
        "accuracy_before": s["before"]["accuracy"], "accuracy_after": s["after"]["accuracy"],
        "correct_after": s["after"]["correct"], "test_prompts": s["after"]["n"],
        "first_loss": round(s["first_loss"], 4) if s.get("first_loss") is not None else "",
        "last_loss": round(s["last_loss"], 4) if s.get("last_loss") is not None else "",
        "s_per_step": round(s["train_s_per_step"], 3) if s.get("train_s_per_step") else "",
        **machine_columns(record),
    }


def run(scale: Scale, seeds: Sequence[int], root: Path, run_arm: Callable[..., dict[str, Any]],
        progress: Callable[[str], None], arms: Sequence[str] | None = None) -> list[dict[str, Any]]:
    rows = []
    seed = seeds[0]
    for budget in scale.tell_budgets:
        for arm in ARMS:
            if arms and arm not in arms:
                continue
            progress(f"tell {arm} N={budget}")
            config = arm_config(arm, budget, scale, seed)
            record = run_arm("tell", config, run_dir_for("tell", f"{arm}-n{budget}-s{seed}", config, root))
            rows.append(row(arm, budget, record, scale))
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    budgets = sorted({int(r["task_samples"]) for r in rows})
    head = ["task samples N"] + [f"{arm}: accuracy (trained task tokens seen)" for arm in ARMS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in budgets:
        cells = [str(n)]
        for arm in ARMS:
            match = [r for r in rows if int(r["task_samples"]) == n and r["arm"] == arm]
            cells.append(f"{float(match[0]['accuracy_after']):.3f} ({int(match[0]['task_trained_tokens_seen']):,})"
                         if match else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tellneo.io import atomic_save_figure

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"sft": ("tab:gray", "o"), "tell": ("tab:blue", "s"), "tell-no-anchor": ("tab:orange", "^"),
              "tell-no-shuffle": ("tab:green", "v")}
    for ax, (xkey, xlabel) in zip(axes, (("task_samples", "task samples N (unique)"),
                                          ("task_trained_tokens_seen",
                                           "trained task tokens seen (answers, with repeats)"))):
        for arm in ARMS:
            group = sorted((r for r in rows if r["arm"] == arm), key=lambda r: float(r[xkey]))
            if not group:
                continue
            color, marker = styles[arm]
            xs, ys = [float(r[xkey]) for r in group], [float(r["accuracy_after"]) for r in group]
            if xkey == "task_samples":
                ax.plot(xs, ys, marker=marker, color=color, label=arm)
            else:  # the compute is fixed, so these cluster per arm: label each point with its N
                ax.scatter(xs, ys, marker=marker, color=color, label=arm)
                for r, x, y in zip(group, xs, ys):
                    ax.annotate(f"N={int(r['task_samples'])}", (x, y), textcoords="offset points",
                                xytext=(5, -3), fontsize=7, color=color)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out exact-match accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    before = {r["arm"]: float(r["accuracy_before"]) for r in rows}
    axes[0].axhline(before.get("tell", 0.0), color="red", linestyle="--", linewidth=1,
                    label="base model, with anchor")
    axes[0].axhline(before.get("sft", 0.0), color="black", linestyle=":", linewidth=1,
                    label="base model, no anchor")
    axes[0].legend(fontsize=8)
    r0 = rows[0]
    fig.suptitle(f"TELL vs SFT on date_iso, SmolLM2-135M-Instruct + LoRA r16; {r0['tokens_per_step']} tokens/step; "
                 f"{r0['device']}", fontsize=10)
    fig.tight_layout()
    atomic_save_figure(fig, path)
