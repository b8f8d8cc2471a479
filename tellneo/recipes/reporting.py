"""Run outputs shared by the recipes: loss-curve PNG, summary table, atomic model saves."""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tellneo.io import atomic_save_figure, atomic_write_text, to_json

__all__ = ["StageBar", "fmt", "loss_figure", "machine_state", "markdown_table", "plot_loss_curve",
           "process_peak", "save_pretrained_atomic", "train_memory_fields", "write_summary"]


class StageBar:
    """A progress bar over the named setup stages of a run: ``bar("loading teacher")`` starts the next stage."""

    def __init__(self, stages: int, title: str, enabled: bool = True) -> None:
        from tqdm.auto import tqdm

        self.title = title
        self.bar = tqdm(total=stages, desc=title, unit="stage", disable=not enabled)
        self.started = False

    def __call__(self, stage: str) -> None:
        if self.started:
            self.bar.update(1)
        self.started = True
        self.bar.set_description(f"{self.title}: {stage}")

    def __enter__(self) -> "StageBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.started and exc[0] is None:
            self.bar.update(1)
            self.bar.set_description(f"{self.title}: done")
        self.bar.close()


def machine_state() -> dict[str, Any]:
    """CPU threads torch uses, how busy the CPUs are with other work now (``busy_cores``, sampled over 0.2 s; None
    off Linux) and the 1-minute load average (what else runs on the machine matters for times), and the process's
    peak memory so far (resident set; allocated CUDA memory on a GPU)."""
    import torch

    from tellneo._cpu import busy_cores

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    state = {"torch_threads": torch.get_num_threads(), "cpu_cores": os.cpu_count(), "busy_cores": busy_cores(0.2),
             "load_avg_1min": round(load, 2),
             "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    try:
        import resource

        state["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB
    except (ImportError, OSError):
        pass
    if torch.cuda.is_available():
        state["peak_cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return state


def train_memory_fields(result: Any) -> dict[str, Any]:
    """Summary fields of the training phase's memory (a :class:`tellneo.memory.PhaseMemory`, or None when no
    training ran): ``train_peak_mb`` (MiB above ``train_baseline_mb``, the memory in use when training began),
    ``train_peak_method`` (where the number comes from, see :mod:`tellneo.memory`), ``train_peak_reserved_mb``
    (CUDA allocator reserve growth; None on CPU) and ``train_baseline_mb``."""
    if result is None:
        return {"train_peak_mb": None, "train_peak_method": None, "train_peak_reserved_mb": None,
                "train_baseline_mb": None}
    d = result.to_dict()
    return {"train_peak_mb": d["peak_mb"], "train_peak_method": d["method"],
            "train_peak_reserved_mb": d["peak_reserved_mb"], "train_baseline_mb": d["baseline_mb"]}


def process_peak(machine: dict[str, Any], result: Any = None, cuda_peak_before_mb: float | None = None
                 ) -> dict[str, Any]:
    """``machine`` (a :func:`machine_state`) with its whole-process peaks made whole again after a
    :class:`tellneo.memory.TrainingMemory` phase: on Linux the CPU meter resets ``VmHWM``, which also resets
    ``ru_maxrss``, and the CUDA meter resets ``max_memory_allocated``, so a reading taken afterwards covers only the
    time since the phase began. ``peak_rss_mb`` becomes the max of that reading and the meter's
    ``process_peak_before_mb`` (CPU meter); ``peak_cuda_allocated_mb`` the max with the CUDA meter's
    ``process_peak_before_mb`` (or ``cuda_peak_before_mb`` when given). A new dict."""
    out = dict(machine)
    before = getattr(result, "process_peak_before_mb", None)
    if str(getattr(result, "method", "")).startswith("cuda"):
        before, cuda_peak_before_mb = None, before if cuda_peak_before_mb is None else cuda_peak_before_mb
    if before is not None and out.get("peak_rss_mb") is not None:
        out["peak_rss_mb"] = round(max(out["peak_rss_mb"], before), 1)
    if cuda_peak_before_mb is not None and out.get("peak_cuda_allocated_mb") is not None:
        out["peak_cuda_allocated_mb"] = round(max(out["peak_cuda_allocated_mb"], cuda_peak_before_mb), 1)
    return out


def fmt(value: Any, digits: int = 4) -> str:
    """A table cell: floats with ``digits`` significant decimals, NaN as '-'."""
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in header]] + [[fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def loss_figure(records: Sequence[dict[str, Any]], *, title: str, keys: Sequence[str] = ("loss", "ce", "kd"),
                held_out: Mapping[str, Sequence[tuple[int, float]]] | None = None) -> Any:
    """The matplotlib figure of :func:`plot_loss_curve` (None when there is nothing to plot): training curves of
    ``keys`` against the optimizer step, held-out points as markers — the ``eval_loss`` records of metrics.jsonl
    and ``held_out`` (``{label: [(step, value), ...]}``, e.g. the held-out CE before and after training) — and
    whole-number step ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    series = {k: [(r["step"], r[k]) for r in records if k in r and isinstance(r[k], (int, float))] for k in keys}
    series = {k: v for k, v in series.items() if v}
    points = {"held-out loss": [(r["step"], r["eval_loss"]) for r in records
                                if isinstance(r.get("eval_loss"), (int, float))]}
    points.update(held_out or {})
    points = {k: [(step, y) for step, y in xy if math.isfinite(y)] for k, xy in points.items()}
    points = {k: xy for k, xy in points.items() if xy}
    if not series and not points:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, xy in series.items():
        xs, ys = zip(*xy)
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=key)
    for marker, (key, xy) in zip("Xsd^v*", points.items()):
        xs, ys = zip(*xy)
        ax.scatter(xs, ys, marker=marker, s=40, zorder=3, label=key)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per trained token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_loss_curve(records: Sequence[dict[str, Any]], path: str | os.PathLike[str], *, title: str,
                    keys: Sequence[str] = ("loss", "ce", "kd"),
                    held_out: Mapping[str, Sequence[tuple[int, float]]] | None = None) -> Path | None:
    """Training curves of ``keys`` against the optimizer step from metrics.jsonl records, with held-out points
    (see :func:`loss_figure`), as a PNG written atomically. Returns None when there is nothing to plot."""
    fig = loss_figure(records, title=title, keys=keys, held_out=held_out)
    return None if fig is None else atomic_save_figure(fig, path)


def write_summary(out_dir: str | os.PathLike[str], summary: dict[str, Any], table: str) -> None:
    """``summary.json`` (everything; non-finite numbers as null) and ``summary.md`` (the table), both atomic."""
    out = Path(out_dir)
    atomic_write_text(out / "summary.json", to_json(summary, indent=2))  # NaN (e.g. no teacher) -> null
    atomic_write_text(out / "summary.md", table + "\n")


def save_pretrained_atomic(model: Any, path: str | os.PathLike[str], tokenizer: Any = None) -> Path:
    """``model.save_pretrained`` (and the tokenizer's) into a staging directory renamed to ``path``; an existing
    ``path`` is replaced only after the new one is complete."""
    final = Path(path)
    staging = final.with_name(f".staging-{final.name}")
    old = final.with_name(f".old-{final.name}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)
    return final
