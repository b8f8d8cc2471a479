"""NEO experiment: a half-depth SmolLM2-135M-Instruct student (every other layer) trained four ways on the same
general data and token budget, plus NEO's sensitivity to LoRA rank and KD weight.

Arms (LLM-NEO, arXiv 2411.06839): ``lora-ce`` (plain LoRA SFT), ``neo`` (LoRA + CE + KD), ``full-kd`` (all
student weights, CE + KD), ``full-ce`` (all weights, CE only). The claim tested: NEO beats plain LoRA SFT and
approaches full-parameter KD at a fraction of its memory.
"""

from __future__ import annotations

import statistics
from concurrent.futures import ThreadPoolExecutor, as_completed
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.methods import neo_tuned
from benchmarks.methods.common import Scale, machine_columns, run_dir_for

LORA_LR = 1e-3  # the distill recipe's default for LoRA on CPU-sized runs
FULL_LR = 1e-4  # all weights move: ten times lower, the usual full fine-tuning choice
# every arm pins its schedule (the values the arms have always run with) instead of leaving it to the recipe
PINNED_TRAIN = {"epochs": 1.0, "lr_scheduler": "cosine", "warmup_ratio": 0.1}


MAIN_ARMS = neo_tuned.MAIN_ARMS
_ARM_SETTINGS = {"lora-ce": ("lora", 0.0), "neo": ("lora", 0.5), "full-kd": ("full", 0.5), "full-ce": ("full", 0.0)}


def _arm_config(scale: Scale, seed: int, *, mode: str, alpha: float, lr: float, rank: int = 16,
                variant: str = "lora") -> dict[str, Any]:
    """One run's flat settings (``mode``, ``alpha`` = KD weight, ``lora_r`` / ``lora_alpha`` / ``lora_dropout``,
    ``divergence``, ``temperature``, the data fields and ``train``; the runner turns them into a DistillConfig).
    Fields a scale does not use stay out, so the configs (and run-directory hashes) of recorded scales hold."""
    from tellneo.recipes.training import TrainSettings

    train = TrainSettings(batch_size=scale.batch_size, max_steps=scale.neo_steps, learning_rate=lr, seed=seed,
                          bf16=scale.bf16, save_steps=10_000, **PINNED_TRAIN)
    fields = {"mode": mode, "alpha": alpha, "lora_r": rank, "lora_alpha": 2.0 * rank, "lora_dropout": 0.05,
              "divergence": "forward_kl", "temperature": 1.0, "seq_len": scale.seq_len,
              "max_samples": scale.neo_max_samples, "eval_samples": scale.neo_eval_samples, "layers": "every_other",
              "train": asdict(train)}
    if scale.neo_eval_seed is not None:
        fields.update(eval_seed=scale.neo_eval_seed, validation_samples=scale.neo_validation_samples)
    if variant != "lora":
        fields["lora_variant"] = variant
    return fields


def _main_arm_config(scale: Scale, arm: str, seed: int, lr: float) -> dict[str, Any]:
    mode, alpha = _ARM_SETTINGS[arm]
    return _arm_config(scale, seed, mode=mode, alpha=alpha, lr=lr)


def arm_configs(scale: Scale, seeds: Sequence[int]) -> list[tuple[str, int, dict[str, Any]]]:
    """``(arm, seed, arm settings)`` for every run of a scale without a learning-rate grid: the four arms
    (lora-ce and neo at every seed, the full-parameter arms at the first seed, each at its fixed rate) and the
    sensitivity runs (rank 8/64, KD weight 0.9, first seed). Tuned scales: :func:`sweep_configs`."""
    if scale.neo_lora_lrs:
        raise ValueError(f"scale {scale.name!r} tunes the learning rate: use sweep_configs / followup_configs")
    first = seeds[0]
    runs = [(arm, seed, _main_arm_config(scale, arm, seed, LORA_LR))
            for seed in seeds for arm in ("lora-ce", "neo")]
    runs += [(arm, first, _main_arm_config(scale, arm, first, FULL_LR)) for arm in ("full-kd", "full-ce")]
    runs.append(("neo-r8", first, _arm_config(scale, first, mode="lora", alpha=0.5, rank=8, lr=LORA_LR)))
    runs.append(("neo-r64", first, _arm_config(scale, first, mode="lora", alpha=0.5, rank=64, lr=LORA_LR)))
    runs.append(("neo-a0.9", first, _arm_config(scale, first, mode="lora", alpha=0.9, lr=LORA_LR)))
    return runs


def learning_rates(scale: Scale, arm: str) -> tuple[float, ...]:
    """The grid a main arm is tuned over: the LoRA grid for ``lora-ce`` / ``neo``, the full grid otherwise."""
    return scale.neo_lora_lrs if _ARM_SETTINGS[arm][0] == "lora" else scale.neo_full_lrs


def sweep_configs(scale: Scale, seed: int) -> list[tuple[str, int, dict[str, Any]]]:
    """Phase 1 of a tuned scale: every main arm at every rate of its grid, at ``seed``."""
    return [(arm, seed, _main_arm_config(scale, arm, seed, lr)) for arm in MAIN_ARMS for lr in learning_rates(scale, arm)]


def followup_configs(scale: Scale, seeds: Sequence[int], best_lr: dict[str, float]
                     ) -> list[tuple[str, int, dict[str, Any]]]:
    """Phase 2 of a tuned scale: the main arms at ``seeds[1:]`` at their chosen rate (seeds[0] ran in the sweep),
    then NEO's sensitivity rows at seeds[0] and NEO's rate: ``neo-<variant>``, ``neo-r<rank>``, ``neo-a<weight>``."""
    runs = [(arm, seed, _main_arm_config(scale, arm, seed, best_lr[arm]))
            for seed in seeds[1:] for arm in MAIN_ARMS if arm in best_lr]
    if "neo" in best_lr:
        first, lr = seeds[0], best_lr["neo"]
        runs += [(f"neo-{v}", first, _arm_config(scale, first, mode="lora", alpha=0.5, lr=lr, variant=v))
                 for v in scale.neo_variants]
        runs += [(f"neo-r{r}", first, _arm_config(scale, first, mode="lora", alpha=0.5, lr=lr, rank=r))
                 for r in scale.neo_ranks]
        runs += [(f"neo-a{a}", first, _arm_config(scale, first, mode="lora", alpha=a, lr=lr))
                 for a in scale.neo_kd_weights]
    return runs


def arm_names(scale: Scale, seeds: Sequence[int]) -> list[str]:
    """Every arm name a scale runs (for ``--arms``)."""
    if not scale.neo_lora_lrs:
        return list(dict.fromkeys(arm for arm, _, _ in arm_configs(scale, seeds)))
    return [*MAIN_ARMS, *(f"neo-{v}" for v in scale.neo_variants), *(f"neo-r{r}" for r in scale.neo_ranks),
            *(f"neo-a{a}" for a in scale.neo_kd_weights)]


def choose_learning_rates(sweep_rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Each arm's rate with the lowest validation CE after training (never the held-out set's)."""
    best: dict[str, tuple[float, float]] = {}
    for r in sweep_rows:
        val = float(r["val_ce_after"])
        if r["arm"] not in best or val < best[r["arm"]][0]:
            best[r["arm"]] = (val, float(r["learning_rate"]))
    return {arm: lr for arm, (_, lr) in best.items()}


def row(arm: str, seed: int, record: dict[str, Any], scale: Scale) -> dict[str, Any]:
    s, cfg = record["summary"], record["config"]
    before, after = s["before"], s["after"]
    out = {
        "experiment": "neo", "arm": arm, "seed": seed, "scale": scale.name, "mode": cfg["mode"],
        "kd_weight": cfg["alpha"], "lora_r": cfg["lora_r"] if cfg["mode"] == "lora" else "",
        "learning_rate": cfg["train"]["learning_rate"], "steps": s["steps"],
        "tokens_per_step": s["global_batch_rows"] * s["seq_len"], "student_layers": s["student"]["num_layers"],
        "trainable_params": s["trainable_parameters"], "total_params": s["total_parameters"],
        "ce_before": round(before["ce"], 4), "ce_after": round(after["ce"], 4),
        "kl_before": round(before["kl"], 4), "kl_after": round(after["kl"], 4),
        "top1_before": round(before["top1_agreement"], 4), "top1_after": round(after["top1_agreement"], 4),
        "teacher_ce": round(before["teacher_ce"], 4), "eval_tokens": s["eval_tokens"],
        "s_per_step": round(s["train_s_per_step"], 3) if s.get("train_s_per_step") else "",
        # training loop only, above the memory in use when it began (tellneo.memory); "" in runs before it existed
        "train_peak_mb": s["train_peak_mb"] if s.get("train_peak_mb") is not None else "",
        "train_peak_method": s.get("train_peak_method") or "",
        "val_ce_after": round(s["validation"]["ce"], 4) if s.get("validation") else "",
        **machine_columns(record),
    }
    if scale.neo_lora_lrs:  # tuned scales only: the recorded scales' CSV columns stay as they were
        out["lora_variant"] = cfg.get("lora_variant", "lora") if cfg["mode"] == "lora" else ""
        out["tuned_lr"] = ""  # filled in by run() once the sweep has chosen
    return out


def run(scale: Scale, seeds: Sequence[int], root: Path, run_arm: Callable[..., dict[str, Any]],
        progress: Callable[[str], None], arms: Sequence[str] | None = None, *, jobs: int = 1,
        save: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    """Run the scale's arms (``jobs`` at a time, each in its own process) and return one row per run; ``save``
    gets the rows so far after every finished run (a long sweep leaves its results behind when interrupted).
    A tuned scale runs :func:`sweep_configs`, chooses each arm's rate on validation CE
    (:func:`choose_learning_rates`), then :func:`followup_configs`; its rows say ``tuned_lr`` (True for the
    chosen rate's runs)."""
    rows: list[dict[str, Any]] = []

    def run_all(runs: list[tuple[str, int, dict[str, Any]]], tuned: bool | None = None) -> list[dict[str, Any]]:
        runs = [r for r in runs if not arms or r[0] in arms]

        def one(item: tuple[str, int, dict[str, Any]]) -> dict[str, Any]:
            arm, seed, config = item
            lr = config["train"]["learning_rate"]
            progress(f"neo {arm} seed {seed} lr {lr:g}: started")
            record = run_arm("neo", config, run_dir_for("neo", f"{arm}-s{seed}", config, root))  # scale in hash
            progress(f"neo {arm} seed {seed} lr {lr:g}: done in {record['wall_s']:.0f} s")
            out = row(arm, seed, record, scale)
            if tuned is not None:  # known before the save: follow-up runs are at the chosen rate by construction
                out["tuned_lr"] = tuned
            return out

        done: list[dict[str, Any]] = []
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:  # threads only wait on child processes
            for fut in as_completed([pool.submit(one, item) for item in runs]):
                done.append(fut.result())
                if save:
                    save(rows + done)
        order = {(arm, seed, c["train"]["learning_rate"]): i for i, (arm, seed, c) in enumerate(runs)}
        return sorted(done, key=lambda r: order[(r["arm"], r["seed"], r["learning_rate"])])

    if not scale.neo_lora_lrs:
        return run_all(arm_configs(scale, seeds))
    rows += run_all(sweep_configs(scale, seeds[0]))
    best = choose_learning_rates(rows)
    progress("chosen on validation CE: " + ", ".join(f"{arm} {lr:g}" for arm, lr in best.items()))
    for r in rows:
        r["tuned_lr"] = r["learning_rate"] == best[r["arm"]]
    rows += run_all(followup_configs(scale, seeds, best), tuned=True)
    if save:
        save(rows)
    return rows


def _mean(rows: list[dict[str, Any]], key: str) -> tuple[float, float, float]:
    values = [float(r[key]) for r in rows]
    return statistics.fmean(values), min(values), max(values)


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per arm (mean over seeds, with min–max when there are several; unless the scale fixes
    the eval seed, each seed holds out its own evaluation records, so "before" is a mean too). The
    training-phase peak is "n/a" for rows recorded before it was measured. Tuned scales:
    :func:`benchmarks.methods.neo_tuned.table`."""
    if neo_tuned.is_tuned(rows):
        return neo_tuned.table(rows)
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    head = ["arm", "seeds", "trainable params", "held-out CE (before → after)", "KL to teacher (before → after)",
            "top-1 agreement (before → after)", "process peak RSS MB (teacher + student)",
            "training-phase peak MB", "s/step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in arms:
        group = [r for r in rows if r["arm"] == arm]

        def cell(key: str, digits: int = 3) -> str:
            mean, lo, hi = _mean(group, key)
            spread = f" ({lo:.{digits}f}–{hi:.{digits}f})" if len(group) > 1 else ""
            return f"{mean:.{digits}f}{spread}"

        lines.append("| " + " | ".join([
            arm, str(len(group)), f"{int(group[0]['trainable_params']):,}",
            f"{_mean(group, 'ce_before')[0]:.3f} → {cell('ce_after')}",
            f"{_mean(group, 'kl_before')[0]:.3f} → {cell('kl_after')}",
            f"{_mean(group, 'top1_before')[0]:.3f} → {cell('top1_after')}",
            cell("peak_rss_mb", 0),
            cell("train_peak_mb", 0) if all(r.get("train_peak_mb") not in (None, "") for r in group) else "n/a",
            cell("s_per_step", 2)]) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    if neo_tuned.is_tuned(rows):
        return neo_tuned.plot(rows, path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tellneo.io import atomic_save_figure

    arms = list(dict.fromkeys(r["arm"] for r in rows))
    panels = [("kl_after", "KL(teacher ‖ student), held out ↓"), ("top1_after", "top-1 agreement with teacher ↑"),
              ("ce_after", "held-out CE (nats/token) ↓"), ("peak_rss_mb", "process peak RSS (MB) ↓")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2))
    colors = {"lora-ce": "tab:gray", "neo": "tab:blue", "full-kd": "tab:green", "full-ce": "tab:olive"}
    for ax, (key, title) in zip(axes, panels):
        for i, arm in enumerate(arms):
            group = [r for r in rows if r["arm"] == arm]
            mean, lo, hi = _mean(group, key)
            ax.bar(i, mean, color=colors.get(arm, "tab:cyan"), yerr=[[mean - lo], [hi - mean]] if len(group) > 1
                   else None, capsize=4)
            ax.scatter([i] * len(group), [float(r[key]) for r in group], color="black", s=10, zorder=3)
        if key in ("kl_after", "top1_after", "ce_after"):
            before = float(rows[0][key.replace("after", "before")])
            ax.axhline(before, color="red", linestyle="--", linewidth=1, label="student before training")
            ax.legend(fontsize=8)
        ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right")
        ax.set_title(title, fontsize=10)
    r0 = rows[0]
    fig.suptitle(f"NEO on SmolLM2-135M-Instruct → {r0['student_layers']}-layer student; {r0['steps']} steps × "
                 f"{r0['tokens_per_step']} tokens; {r0['device']}", fontsize=10)
    fig.tight_layout()
    atomic_save_figure(fig, path)
