"""Run outputs shared by the recipes: loss-curve PNG, summary table, atomic model saves."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tellneo.io import atomic_write_bytes, atomic_write_text

__all__ = ["fmt", "markdown_table", "plot_loss_curve", "save_pretrained_atomic", "write_summary"]


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


def plot_loss_curve(records: Sequence[dict[str, Any]], path: str | os.PathLike[str], *, title: str,
                    keys: Sequence[str] = ("loss", "ce", "kd")) -> Path | None:
    """Training curves of ``keys`` against the optimizer step from metrics.jsonl records (PNG, written atomically).
    Returns None when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {k: [(r["step"], r[k]) for r in records if k in r and isinstance(r[k], (int, float))] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, points in series.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=key)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per trained token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(Path(path), buf.getvalue())


def write_summary(out_dir: str | os.PathLike[str], summary: dict[str, Any], table: str) -> None:
    """``summary.json`` (everything) and ``summary.md`` (the table), both atomic."""
    out = Path(out_dir)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str))
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
