"""What both experiments share: scales, the CSV writer, run-directory naming, machine description."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tellneo.io import atomic_write_csv, config_hash

RESULTS = Path(__file__).resolve().parents[1] / "results" / "methods"


@dataclass(frozen=True)
class Scale:
    """How big the runs are. ``cpu`` fits both experiments in about an hour and a half on 2 CPU cores;
    ``cpu-long`` is NEO at 5x the steps (run it with ``--arms`` for the main arms: ~8 minutes an arm on 2 cores);
    ``gpu`` is for a lent GPU (longer sequences, more steps, bf16). ``cpu-tuned`` / ``gpu-tuned`` are NEO's tuned
    protocol (issue 15: a learning-rate sweep per arm chosen on a validation split, seeds at the chosen rate, one
    fixed held-out set; :func:`benchmarks.methods.neo.run`). ``tell_steps`` is the SFT arms' step count:
    keep it close to the steps of one epoch of the TELL mix (the CSV records every arm's steps) so that the arms
    get the same compute."""

    name: str
    seq_len: int
    batch_size: int
    neo_steps: int
    tell_steps: int
    tell_budgets: tuple[int, ...]
    tell_general_samples: int
    bf16: bool
    # NEO's evaluation split; at these defaults the arm configs (and their hashes) are the ones recorded before
    # the fields existed. neo_eval_seed set: the same held-out and validation records for every seed and arm
    neo_eval_seed: int | None = None
    neo_eval_samples: int = 24
    neo_validation_samples: int = 0
    # NEO's tuned protocol (issue 15), on when neo_lora_lrs is set: every main arm at seeds[0] over its grid, the
    # learning rate with the lowest validation CE per arm, then seeds[1:] at it, and the sensitivity rows (LoRA
    # variants, ranks, KD weights) as NEO at its chosen rate, seeds[0]
    neo_lora_lrs: tuple[float, ...] = ()
    neo_full_lrs: tuple[float, ...] = ()
    neo_variants: tuple[str, ...] = ()
    neo_ranks: tuple[int, ...] = ()  # besides the main arms' rank 16
    neo_kd_weights: tuple[float, ...] = ()  # besides the main arms' 0.5
    neo_max_samples: int | None = 1200  # general records drawn (held-out + validation + train); None = all


SCALES = {
    "cpu": Scale("cpu", seq_len=256, batch_size=4, neo_steps=20, tell_steps=25, tell_budgets=(8, 32, 128),
                 tell_general_samples=104, bf16=False),
    "cpu-long": Scale("cpu-long", seq_len=256, batch_size=4, neo_steps=100, tell_steps=25, tell_budgets=(8, 32, 128),
                      tell_general_samples=104, bf16=False),
    # the tuned protocol on 2 CPU cores: 26 runs of 100 steps x 1024 tokens (15-25 minutes each at 1 thread, two side
    # by side); the grids reach one rate above the best of the first sweep, where every arm chose its top rate
    "cpu-tuned": Scale("cpu-tuned", seq_len=256, batch_size=4, neo_steps=100, tell_steps=25,
                       tell_budgets=(8, 32, 128), tell_general_samples=104, bf16=False, neo_eval_seed=1234,
                       neo_eval_samples=128, neo_validation_samples=64, neo_lora_lrs=(1e-3, 3e-3, 1e-2),
                       neo_full_lrs=(1e-4, 3e-4, 1e-3, 3e-3), neo_variants=("rslora", "dora", "pissa"), neo_ranks=(64,)),
    # the same protocol for a lent GPU (defined, not yet run): 1,000 steps x 8k tokens, 3 seeds, ranks 16/64/128,
    # KD weights 0.5/0.9
    "gpu-tuned": Scale("gpu-tuned", seq_len=1024, batch_size=8, neo_steps=1000, tell_steps=200,
                       tell_budgets=(16, 64, 256, 1024), tell_general_samples=2400, bf16=True, neo_eval_seed=1234,
                       neo_eval_samples=512, neo_validation_samples=256, neo_lora_lrs=(3e-4, 1e-3, 3e-3, 1e-2),
                       neo_full_lrs=(3e-5, 1e-4, 3e-4, 1e-3), neo_variants=("rslora", "dora", "pissa"),
                       neo_ranks=(64, 128), neo_kd_weights=(0.9,), neo_max_samples=None),
    "gpu": Scale("gpu", seq_len=1024, batch_size=8, neo_steps=400, tell_steps=200, tell_budgets=(16, 64, 256, 1024),
                 tell_general_samples=2400, bf16=True),
}


def results_name(experiment: str, scale: Scale) -> str:
    """File stem of an experiment's results: ``neo`` at the default scale, ``neo_<scale>`` otherwise."""
    return experiment if scale.name == "cpu" else f"{experiment}_{scale.name}"


def device_name() -> str:
    import torch

    from tellneo.bench import device_name as bench_device_name

    return bench_device_name("cuda" if torch.cuda.is_available() else "cpu")


def run_dir_for(experiment: str, arm: str, config: dict[str, Any], root: Path) -> Path:
    """``<root>/<experiment>/<arm>-<config hash>``: a changed config is a new directory, never a clash."""
    return root / experiment / f"{arm}-{config_hash(config)[:8]}"


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    atomic_write_csv(path, rows)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def machine_columns(record: dict[str, Any]) -> dict[str, Any]:
    s = record["summary"]
    start, end = s.get("machine_at_start", {}), s.get("machine_at_end", {})
    return {"device": device_name(),
            "threads": end.get("torch_threads"), "load_avg_start": start.get("load_avg_1min"),
            "load_avg_end": end.get("load_avg_1min"), "peak_rss_mb": end.get("peak_rss_mb"),
            "peak_cuda_mb": end.get("peak_cuda_allocated_mb"), "commit": record["commit"],
            "config_hash": record["config_hash"], "data_hash": record["data_hash"], "wall_s": record["wall_s"]}
