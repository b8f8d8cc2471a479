"""TELL against the paper's claim (issue 14): with the same unique task samples N, does TELL beat SFT, and how
many times more task samples does SFT need for TELL's accuracy?

Protocol (choices the paper leaves open are ours, written down here):

* Task ``json_record`` (invoice note with distractors -> JSON object; scored as exact match, JSON validity and
  per-field accuracy), ``date_iso`` as the smoke test at a few N. Train/dev/test splits are disjoint by
  construction; the N task samples of a seed are nested (N=8 is a prefix of N=16, ...); the test prompts are
  fixed per seed and shared by every arm and N, so differences are paired by seed and prompt.
* Arms at every N: ``sft`` (task samples alone, no anchor) and ``sft-anchor`` (the anchor in every train and
  test prompt, as in the authors' released data), both with the pass count k chosen on a dev split from
  ``scale.sft_exposures`` (checkpoints of one run at a constant learning rate, best dev exact match); ``tell``
  (anchor, stratified shuffle, each task sample shown ``scale.exposures`` times among ``r`` general samples per
  occurrence drawn at random from the ``mixed`` pool). At ``scale.ratio_budgets``: TELL at every r of
  ``scale.ratio_grid``. At ``scale.ablation_budgets``: TELL without the anchor, with a neutral anchor of the
  same length, with the task block at the end (no shuffle) and with a plain random mix.
* Same LoRA (r 16, alpha 32, dropout 0.05), learning rate, constant schedule and rows per step for every arm;
  TELL is not dev-selected (its k is the recipe's default), which favours SFT if anything.
* Statistics: per-prompt outcomes of every run; paired differences with a two-level bootstrap over seeds and
  prompts (:func:`benchmarks.methods.stats.paired_bootstrap_nested`); the x-fold read
  (:func:`benchmarks.methods.stats.data_efficiency_bootstrap`): SFT's accuracy interpolated against log N, the
  N it would need for each TELL point divided by TELL's N, with its interval.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.methods.common import machine_columns, run_dir_for

EXPERIMENT = "tell-paper"


@dataclass(frozen=True)
class PaperScale:
    """Sizes of the TELL protocol. ``cpu`` is what 2 CPU cores can run in a session (see :func:`estimate`);
    ``gpu`` is the issue's full protocol for a lent GPU (defined, not run without one)."""

    name: str
    budgets: tuple[int, ...]  # N grid of the main task, nested per seed
    seeds: tuple[int, ...]
    test_samples: int
    dev_samples: int
    sft_exposures: tuple[int, ...]  # SFT's pass counts, chosen on dev
    exposures: int  # TELL's k
    general_per_task: float  # TELL's default r
    ratio_grid: tuple[float, ...]
    ratio_budgets: tuple[int, ...]
    ablation_budgets: tuple[int, ...]
    smoke_budgets: tuple[int, ...]  # date_iso
    task: str = "json_record"
    smoke_task: str = "date_iso"
    seq_len: int = 512
    batch_size: int = 2
    learning_rate: float = 1e-3
    bf16: bool = False
    eval_batch_size: int = 25
    ablations: tuple[str, ...] = ("tell-no-anchor", "tell-neutral-anchor", "tell-end", "tell-random")
    notes: str = ""


SCALES = {
    # one session of 2 CPU cores: the main arms at 4 N, r and ablations at one N, date_iso at 3 N
    "cpu": PaperScale("cpu", budgets=(4, 8, 16, 32), seeds=(0, 1, 2), test_samples=200, dev_samples=30,
                      sft_exposures=(2, 4, 8, 16), exposures=8, general_per_task=4.0, ratio_grid=(1.0, 16.0),
                      ratio_budgets=(8,), ablation_budgets=(8,), smoke_budgets=(4, 16, 64)),
    # the issue's protocol for a lent GPU (not run without one)
    "gpu": PaperScale("gpu", budgets=(4, 8, 16, 32, 64, 128, 256, 512, 1024), seeds=(0, 1, 2, 3, 4),
                      test_samples=1000, dev_samples=200, sft_exposures=(4, 8, 16, 32), exposures=8,
                      general_per_task=4.0, ratio_grid=(1.0, 16.0), ratio_budgets=(16, 128),
                      ablation_budgets=(16, 128), smoke_budgets=(8, 32, 128), seq_len=1024, batch_size=8,
                      learning_rate=3e-4, bf16=True, eval_batch_size=100),
}

MAIN_ARMS = ("sft", "sft-anchor", "tell")


@dataclass(frozen=True)
class Arm:
    """One run: arm name, task, N, seed, and the TELL ratio (TELL arms)."""

    arm: str
    task: str
    budget: int
    seed: int
    ratio: float | None = None

    @property
    def label(self) -> str:
        r = "" if self.ratio is None else f"-r{self.ratio:g}"
        return f"{self.task}-{self.arm}{r}-n{self.budget}-s{self.seed}"


def plan(scale: PaperScale, arms: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
         budgets: Sequence[int] | None = None, tasks: Sequence[str] | None = None) -> list[Arm]:
    """Every run of the protocol, in the order an interrupted sweep is most useful: the main arms at each N for
    every seed (smallest N first, so the first finished cells are complete across seeds), then the r rows, the
    ablations and the smoke task. ``arms`` filters by arm name (``tell-r1`` etc. for the r rows); ``seeds``,
    ``budgets`` (N) and ``tasks`` keep only those."""
    if seeds is not None or budgets is not None or tasks is not None:
        return [a for a in plan(scale, arms) if (seeds is None or a.seed in seeds) and
                (budgets is None or a.budget in budgets) and (tasks is None or a.task in tasks)]
    out: list[Arm] = []
    for n in scale.budgets:
        out += [Arm(a, scale.task, n, seed, scale.general_per_task if a == "tell" else None)
                for seed in scale.seeds for a in MAIN_ARMS]
    for n in scale.ratio_budgets:
        out += [Arm("tell", scale.task, n, seed, r) for seed in scale.seeds for r in scale.ratio_grid]
    for n in scale.ablation_budgets:
        out += [Arm(a, scale.task, n, seed, scale.general_per_task) for seed in scale.seeds for a in scale.ablations]
    for n in scale.smoke_budgets:
        out += [Arm(a, scale.smoke_task, n, seed, scale.general_per_task if a == "tell" else None)
                for seed in scale.seeds for a in MAIN_ARMS]
    if arms:
        out = [a for a in out if arm_name(a, scale) in arms]
    return out


def arm_names(scale: PaperScale) -> list[str]:
    """Every arm name :func:`plan` can filter by."""
    return [*MAIN_ARMS, *(f"tell-r{r:g}" for r in scale.ratio_grid), *scale.ablations]


def arm_name(a: Arm, scale: PaperScale) -> str:
    """The arm as ``--arms`` names it: ``tell`` at the default r, ``tell-r16`` at another r."""
    if a.arm == "tell" and a.ratio is not None and a.ratio != scale.general_per_task:
        return f"tell-r{a.ratio:g}"
    return a.arm


def config(a: Arm, scale: PaperScale) -> dict[str, Any]:
    """The flat :class:`tellneo.recipes.tell.TellConfig` settings of one run (the runner builds the config)."""
    from tellneo.recipes.training import TrainSettings

    sft = a.arm.startswith("sft")
    train = TrainSettings(batch_size=scale.batch_size, max_steps=-1, epochs=1.0, learning_rate=scale.learning_rate,
                          lr_scheduler="constant", warmup_ratio=0.0, seed=a.seed, bf16=scale.bf16,
                          save_steps=10_000)
    cfg: dict[str, Any] = {
        "task": a.task, "task_samples": a.budget, "test_samples": scale.test_samples, "method": "sft" if sft
        else "tell", "use_anchor": a.arm not in ("sft", "tell-no-anchor"), "spread": {"tell-end": "end",
                                                                                        "tell-random": "random"}.get(
            a.arm, "stratified"), "general": "mixed", "exposures": list(scale.sft_exposures) if sft else
        scale.exposures, "general_per_task": None if sft else a.ratio, "dev_samples": scale.dev_samples,
        "neutral_anchor": a.arm == "tell-neutral-anchor", "seq_len": scale.seq_len, "window": 64, "mode": "lora",
        "lora_r": 16, "lora_alpha": 32.0, "lora_dropout": 0.05, "eval_batch_size": scale.eval_batch_size,
        "train": asdict(train)}
    if a.task == scale.smoke_task:
        cfg["dev_samples"] = min(scale.dev_samples, 50)
    return cfg


def row(a: Arm, record: dict[str, Any], scale: PaperScale) -> dict[str, Any]:
    s = record["summary"]
    after, before = s["after"], s["before"]
    sel = s.get("selection") or {}
    metrics = after.get("metrics", {})
    return {
        "experiment": EXPERIMENT, "scale": scale.name, "task": a.task, "arm": a.arm,
        "general_per_task": a.ratio if a.ratio is not None else "", "task_samples": a.budget, "seed": a.seed,
        "exposures": s["exposures"], "dev_scores": json.dumps({k: v["accuracy"] for k, v in
                                                               sel.get("scores", {}).items()}) if sel else "",
        "steps": s["steps"], "selected_step": s.get("selected_step", s["steps"]),
        "tokens_per_step": s["global_batch_rows"] * s["seq_len"], "anchor_chars": s["anchor_chars"],
        "task_samples_shown": s["task_samples_shown"], "general_samples_shown": s["general_samples_shown"],
        "general_reused": s["general_reused"], "task_tokens_seen": s["task_tokens_seen"],
        "general_tokens_seen": s["general_tokens_seen"], "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"], "correct_after": after["correct"], "test_prompts": after["n"],
        "valid_after": metrics.get("valid", ""), "per_prompt_after": "".join(map(str, after.get("per_prompt", []))),
        "s_per_step": round(s["train_s_per_step"], 3) if s.get("train_s_per_step") else "",
        **machine_columns(record),
    }


def estimate(scale: PaperScale, tokens_per_s: float, eval_prompts_per_s: float,
             arms: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
             budgets: Sequence[int] | None = None, tasks: Sequence[str] | None = None) -> dict[str, Any]:
    """CPU-time estimate of the protocol from the measured training rate (tokens/s) and generation rate
    (prompts/s, with the anchor): token counts per run from the tasks' real token lengths."""
    from tellneo.data.tasks import get_task
    from tellneo.models import load_causal_lm
    from tellneo.recipes.records import general_records

    tok = load_causal_lm(None, tokenizer_only=True)[1]

    def length(pairs: list[dict], prefix: str = "") -> float:
        texts = [tok.apply_chat_template([{"role": "user", "content": prefix + p["prompt"]},
                                          {"role": "assistant", "content": p["response"]}], tokenize=False)
                 for p in pairs]
        return sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts) / len(texts)

    general = length(general_records("mixed", 400, seed=0)[0])
    per_task = {}
    for name in {scale.task, scale.smoke_task}:
        task = get_task(name)
        pairs = task.pairs(64, seed=0)
        per_task[name] = (length(pairs), length(pairs, task.anchor_prompt))
    runs, total_tokens, total_prompts = [], 0.0, 0
    before_cached: set[tuple] = set()
    for a in plan(scale, arms, seeds, budgets, tasks):
        plain, anchored = per_task[a.task]
        sample = plain if a.arm in ("sft", "tell-no-anchor") else anchored
        prefix = (a.task, a.seed, a.arm in ("sft", "tell-no-anchor"), a.arm == "tell-neutral-anchor")
        prompts = scale.test_samples * (1 if prefix in before_cached else 2)  # the untrained scores are cached
        before_cached.add(prefix)
        if a.arm.startswith("sft"):
            tokens = a.budget * max(scale.sft_exposures) * sample
            prompts += len(scale.sft_exposures) * scale.dev_samples
        else:
            tokens = a.budget * scale.exposures * (sample + a.ratio * general)
        total_tokens += tokens
        total_prompts += prompts
        runs.append((a.label, tokens, prompts))
    seconds = total_tokens / tokens_per_s + total_prompts / eval_prompts_per_s
    return {"runs": len(runs), "train_tokens": int(total_tokens), "eval_prompts": total_prompts,
            "hours": seconds / 3600, "general_tokens_per_sample": general,
            "task_tokens_per_sample": per_task, "per_run": runs}


def run(scale: PaperScale, root: Path, run_arm: Callable[..., dict[str, Any]], progress: Callable[[str], None],
        arms: Sequence[str] | None = None, jobs: int = 1, save: Callable[[list], None] | None = None,
        seeds: Sequence[int] | None = None, budgets: Sequence[int] | None = None,
        tasks: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run (or reuse) every arm of :func:`plan` (filtered as there); rows in plan order. ``jobs`` runs at a time
    (threads that each wait on one child process); ``save(rows)`` after every finished run, so the CSV grows as
    runs finish."""
    from concurrent.futures import ThreadPoolExecutor

    todo = plan(scale, arms, seeds, budgets, tasks)
    done: dict[int, dict[str, Any]] = {}

    def one(i: int) -> None:
        a = todo[i]
        cfg = config(a, scale)
        progress(f"{EXPERIMENT} {a.label}: started")
        record = run_arm("tell", cfg, run_dir_for(EXPERIMENT, a.label, cfg, root))
        done[i] = row(a, record, scale)
        progress(f"{EXPERIMENT} {a.label}: accuracy {done[i]['accuracy_after']:.3f} (k={done[i]['exposures']})")
        if save is not None:
            save([done[j] for j in sorted(done)])

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for f in [pool.submit(one, i) for i in range(len(todo))]:
            f.result()
    return [done[i] for i in sorted(done)]


def arm_of(config: dict[str, Any]) -> Arm:
    """The :class:`Arm` a flat config of :func:`config` was made for (the inverse of :func:`config`)."""
    if config["method"] == "sft":
        name = "sft-anchor" if config["use_anchor"] else "sft"
    elif not config["use_anchor"]:
        name = "tell-no-anchor"
    elif config.get("neutral_anchor"):
        name = "tell-neutral-anchor"
    else:
        name = {"end": "tell-end", "random": "tell-random"}.get(config["spread"], "tell")
    ratio = config.get("general_per_task")
    return Arm(name, config["task"], int(config["task_samples"]), int(config["train"]["seed"]),
               None if ratio is None else float(ratio))


def rows_from_records(scale: PaperScale, records: Path) -> list[dict[str, Any]]:
    """The CSV rows of every kept record under ``records`` (``*.json`` written by the driver) whose config is
    the one :func:`config` makes for its arm at ``scale`` today, in :func:`plan` order: rebuilds the results of
    a sweep that ran in pieces (several invocations, interrupted ones) without rerunning anything."""
    from tellneo.io import config_hash

    order = {a.label: i for i, a in enumerate(plan(scale))}
    found = []
    for path in sorted(records.glob("*.json")):
        record = json.loads(path.read_text())
        a = arm_of(record["config"])
        if a.label in order and record.get("config_hash") == config_hash(config(a, scale)):
            found.append((order[a.label], row(a, record, scale)))
    return [r for _, r in sorted(found, key=lambda x: x[0])]


# ------------------------------------------------------------------------------------------------ analysis


def _ratio(value: Any) -> float | None:
    """A row's ``general_per_task`` as a number (None for the SFT arms' empty cell)."""
    return None if value in ("", None) else float(value)


def _outcomes(rows: list[dict[str, Any]], task: str, arm: str, n: int, ratio: Any = None) -> dict[int, list[int]]:
    """``{seed: per-prompt 0/1 outcomes}`` of one cell (``ratio`` None: any r; rows without an r always match)."""
    out = {}
    for r in rows:
        if r["task"] == task and r["arm"] == arm and int(r["task_samples"]) == n and (
                ratio is None or _ratio(r["general_per_task"]) in (None, float(ratio))):
            out[int(r["seed"])] = [int(c) for c in r["per_prompt_after"]]
    return out


def _default_r(rows: list[dict[str, Any]]) -> float | None:
    scale = SCALES.get(rows[0]["scale"]) if rows else None
    return scale.general_per_task if scale else None


def _matrix(cell: dict[int, list[int]], seeds: list[int]) -> Any:
    import numpy as np

    return np.array([cell[s] for s in seeds], dtype=float)


def analysis(rows: list[dict[str, Any]], *, n_boot: int = 4000) -> dict[str, Any]:
    """Per task: cell means with standard errors, paired TELL − SFT(+anchor) differences, and the x-fold read
    of every TELL point against each SFT curve.

    A sweep fills seeds cell by cell, so each comparison uses the seeds its cells share and says how many
    (``"seeds"``): a difference at N the seeds both TELL and the baseline finished at N; an x-fold the seeds of the
    TELL cell, on the baseline's curve over the N every one of those seeds finished (at least two N).
    """
    from benchmarks.methods import stats

    r_default = _default_r(rows)
    result: dict[str, Any] = {}
    for task in sorted({r["task"] for r in rows}):
        trows = [r for r in rows if r["task"] == task]
        budgets = sorted({int(r["task_samples"]) for r in trows})
        seeds = sorted({int(r["seed"]) for r in trows})
        cells, diffs, folds = [], [], []
        for n in budgets:
            for arm in sorted({r["arm"] for r in trows}):
                for ratio in sorted({r["general_per_task"] for r in trows if r["arm"] == arm}, key=str):
                    cell = _outcomes(trows, task, arm, n, ratio if ratio != "" else None)
                    if not cell:
                        continue
                    m = _matrix(cell, sorted(cell))
                    cells.append({"task": task, "N": n, "arm": arm, "r": ratio, "seeds": len(cell),
                                  "accuracy": float(m.mean()),
                                  "se_prompts": stats.binomial_se(float(m.mean()), m.size)})
        for baseline in ("sft", "sft-anchor"):
            curve = {n: _outcomes(trows, task, baseline, n) for n in budgets}
            for n in budgets:
                tell = _outcomes(trows, task, "tell", n, r_default)
                shared = sorted(set(tell) & set(curve[n]))
                if not shared:
                    continue
                d = stats.paired_bootstrap_nested(_matrix(curve[n], shared), _matrix(tell, shared), n_boot=n_boot)
                diffs.append({"task": task, "N": n, "baseline": baseline, "diff": d, "seeds": len(shared)})
                fold_seeds = sorted(tell)
                on_curve = {k: v for k, v in curve.items() if all(s in v for s in fold_seeds)}
                if len(on_curve) >= 2:
                    f = stats.data_efficiency_bootstrap({k: _matrix(v, fold_seeds) for k, v in on_curve.items()},
                                                        _matrix(tell, fold_seeds), n, n_boot=n_boot)
                    folds.append({"task": task, "N": n, "baseline": baseline, "fold": f, "seeds": len(fold_seeds),
                                  "curve_N": sorted(on_curve)})
        result[task] = {"cells": cells, "diffs": diffs, "folds": folds, "seeds": seeds}
    return result


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: accuracy per task, N and arm (mean over seeds; ± standard error over seeds x prompts), then the
    paired differences and the x-fold read."""
    if not rows:
        return "(no runs)"
    res = analysis(rows)
    r_default = _default_r(rows)
    parts = []
    for task, a in res.items():
        cells = a["cells"]
        arms = []
        for c in cells:
            key = (c["arm"], c["r"])
            if key not in arms:
                arms.append(key)

        def name(arm: str, r: Any) -> str:
            return arm if arm != "tell" or r in ("", None) or float(r) == r_default else f"tell r={float(r):g}"

        lines = [f"**{task}** — exact-match accuracy on {rows[0]['test_prompts']} test prompts per seed, mean over "
                 f"{len(a['seeds'])} seed(s) ± standard error (seeds × prompts); k = SFT's dev-chosen passes",
                 "", "| N | " + " | ".join(name(*k) for k in arms) + " |", "|---|" + "---|" * len(arms)]
        for n in sorted({c["N"] for c in cells}):
            out = [str(n)]
            for arm, r in arms:
                match = [c for c in cells if c["N"] == n and c["arm"] == arm and c["r"] == r]
                if not match:
                    out.append("")
                    continue
                c = match[0]
                ks = sorted({str(x["exposures"]) for x in rows if x["task"] == task and int(x["task_samples"]) == n
                             and x["arm"] == arm and arm.startswith("sft")})
                seeds = "" if c["seeds"] == len(a["seeds"]) else f" ({c['seeds']} seed)"
                out.append(f"{c['accuracy']:.3f} ± {c['se_prompts']:.3f}" + (f" (k {'/'.join(ks)})" if ks else "")
                           + seeds)
            lines.append("| " + " | ".join(out) + " |")
        if a["diffs"]:
            lines += ["", "| N | TELL − baseline (paired, 95% bootstrap over seeds and prompts) | seeds | x-fold: "
                      "SFT's N for TELL's accuracy ÷ TELL's N (seeds; SFT's curve over N) |", "|---|---|---|---|"]
            for d in a["diffs"]:
                fold = [f for f in a["folds"] if f["N"] == d["N"] and f["baseline"] == d["baseline"]]
                read = (f"{fold[0]['fold'].format()} ({fold[0]['seeds']}; "
                        f"{'/'.join(map(str, fold[0]['curve_N']))})" if fold else "–")
                lines.append(f"| {d['N']} | vs {d['baseline']}: {d['diff'].format(3)} | {d['seeds']} | {read} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tellneo.io import atomic_save_figure

    res = analysis(rows, n_boot=200)
    tasks = list(res)
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.2 * len(tasks), 4.4), squeeze=False)
    styles = {"sft": ("tab:gray", "o", "-"), "sft-anchor": ("black", "D", "--"), "tell": ("tab:blue", "s", "-"),
              "tell-no-anchor": ("tab:orange", "^", ""), "tell-neutral-anchor": ("tab:purple", "P", ""),
              "tell-end": ("tab:green", "v", ""), "tell-random": ("tab:red", "x", "")}
    r_default = _default_r(rows)
    for ax, task in zip(axes[0], tasks):
        cells = res[task]["cells"]
        for arm, (color, marker, line) in styles.items():
            group = sorted((c for c in cells if c["arm"] == arm and (arm != "tell" or c["r"] in ("", None) or
                                                                     float(c["r"]) == r_default)),
                           key=lambda c: c["N"])
            if not group:
                continue
            ax.errorbar([c["N"] for c in group], [c["accuracy"] for c in group],
                        yerr=[1.96 * c["se_prompts"] for c in group], color=color, marker=marker,
                        linestyle=line or "none", capsize=3, label=arm)
        for c in cells:  # other ratios: small labelled points
            if c["arm"] == "tell" and c["r"] not in ("", None) and float(c["r"]) != r_default:
                ax.scatter([c["N"]], [c["accuracy"]], color="tab:cyan", marker="*", s=60, zorder=3)
                ax.annotate(f"r={float(c['r']):g}", (c["N"], c["accuracy"]), textcoords="offset points",
                            xytext=(5, 2), fontsize=7)
        ax.set_xscale("log", base=2)
        ns = sorted({c["N"] for c in cells})
        ax.set_xticks(ns, [str(n) for n in ns])
        before = [float(r["accuracy_before"]) for r in rows if r["task"] == task]
        if before:
            ax.axhline(max(before), color="red", linestyle=":", linewidth=1, label="base model (best prefix)")
        ax.set_xlabel("unique task samples N")
        ax.set_ylabel("held-out exact-match accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.set_title(f"{task}: {len(res[task]['seeds'])} seed(s), ±1.96 SE")
        ax.legend(fontsize=7)
    r0 = rows[0]
    fig.suptitle(f"TELL vs SFT at equal unique task samples\nSmolLM2-135M-Instruct + LoRA r16, "
                 f"{r0['tokens_per_step']} tokens/step; {r0['device']}", fontsize=9)
    fig.tight_layout()
    atomic_save_figure(fig, path)


def describe_estimate(est: dict[str, Any]) -> str:
    per = est["task_tokens_per_sample"]
    lines = [f"{est['runs']} runs, {est['train_tokens']:,} training tokens, {est['eval_prompts']:,} prompts "
             f"generated: about {est['hours']:.1f} h", f"general sample: {est['general_tokens_per_sample']:.0f} "
             "tokens"] + [f"{t}: {p:.0f} tokens per sample, {a:.0f} with the anchor" for t, (p, a) in per.items()]
    heavy = sorted(est["per_run"], key=lambda x: -x[1])[:5]
    lines += ["largest runs: " + ", ".join(f"{label} ({tok / 1e3:.0f}k tokens)" for label, tok, _ in heavy)]
    return "\n".join(lines)
