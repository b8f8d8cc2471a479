"""One experiment arm in a child process: ``python -m benchmarks.methods.runner <recipe> <config.json> <run_dir>``.

The child runs the recipe, adds what the tables need that the recipe summary does not hold (git commit, a hash
of the exact training and test data, the config hash) and writes ``arm.json`` atomically into the run
directory. The parent (:func:`run_arm`) reuses an ``arm.json`` whose config hash matches, so a sweep resumes.

A TELL arm also checkpoints every :data:`TELL_SAVE_STEPS` optimizer steps whatever its config's ``save_steps``
(the recorded configs say 10,000, i.e. never, and changing them would change every config hash): a run cut off
mid-way (a stopped session, a killed process) resumes from its last checkpoint instead of from step 0. Resuming
reproduces the uninterrupted run (tests/cli/test_tell_cli.py); the record says which checkpoint it resumed from.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from tellneo.bench import git_commit
from tellneo.io import atomic_write_text, config_hash

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ("neo", "tell")
TELL_SAVE_STEPS = 10  # ~2-3 min of a 1-thread SmolLM2 run; a checkpoint (adapter + Adam state) is ~60 MB


def _records_hash(*record_lists: list[dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for records in record_lists:
        h.update(json.dumps(records, sort_keys=True).encode())
    return h.hexdigest()[:16]


def distill_config(config: dict[str, Any], run_dir: Path) -> Any:
    """The DistillConfig of a NEO arm's flat settings (:func:`benchmarks.methods.neo.arm_configs`)."""
    from tellneo.recipes.distill import DistillConfig
    from tellneo.recipes.lora import LoraSettings
    from tellneo.recipes.settings import KDSettings
    from tellneo.recipes.training import TrainSettings

    fields = dict(config)
    train = TrainSettings(**fields.pop("train"))
    lora = LoraSettings(r=fields.pop("lora_r"), alpha=fields.pop("lora_alpha"), dropout=fields.pop("lora_dropout"),
                        variant=fields.pop("lora_variant", "lora"))
    kd = KDSettings(alpha=fields.pop("alpha"), temperature=fields.pop("temperature"),
                    divergence=fields.pop("divergence"))
    return DistillConfig(**fields, lora=lora, kd=kd, train=train, output_dir=str(run_dir))


def tell_config(config: dict[str, Any], run_dir: Path) -> Any:
    """The TellConfig of a TELL arm's flat settings (:func:`benchmarks.methods.tell.arm_config`)."""
    from tellneo.recipes.lora import LoraSettings
    from tellneo.recipes.tell import TellConfig
    from tellneo.recipes.training import TrainSettings

    fields = dict(config)
    train = TrainSettings(**fields.pop("train"))
    lora = LoraSettings(r=fields.pop("lora_r"), alpha=fields.pop("lora_alpha"), dropout=fields.pop("lora_dropout"))
    if "exposures" not in fields:  # an arm of the compute-matched experiment: the recipe's former defaults
        fields.update(exposures=None, general=fields.get("general"), task_ratio=fields.get("task_ratio", 0.5))
    if isinstance(fields.get("exposures"), list):
        fields["exposures"] = tuple(fields["exposures"])
    return TellConfig(**fields, lora=lora, train=train, output_dir=str(run_dir))


def _neo(config: dict[str, Any], run_dir: Path) -> tuple[dict[str, Any], str, dict[str, Any]]:
    from tellneo.recipes.distill import run_distill, split_distill_records
    from tellneo.recipes.records import general_records

    cfg = distill_config(config, run_dir)
    records, _ = general_records(cfg.data, cfg.max_samples)
    seed = cfg.train.seed if cfg.eval_seed is None else cfg.eval_seed
    train, held_out, validation = split_distill_records(records, cfg.eval_samples, cfg.validation_samples, seed)
    lists = (train, held_out, validation) if validation else (train, held_out)  # no validation: the former hash
    return run_distill(cfg, resume=True, progress=False), _records_hash(*lists), {}


def _tell_start(run_dir: Path) -> tuple[dict[str, bool], dict[str, Any]]:
    """How a TELL arm starts in ``run_dir``: ``run_tell`` keyword arguments and the record's ``attempt``.

    A checkpoint: continue from it. None (a new run, or one cut off before its first checkpoint, possibly by an
    older runner whose manifest named another ``save_steps``): start over; nothing is lost.
    """
    from tellneo.recipes.run_dir import CHECKPOINTS, last_checkpoint

    checkpoint = last_checkpoint(run_dir / CHECKPOINTS)
    start = {"resume": True} if checkpoint is not None else {"overwrite": True}
    return start, {"save_steps": TELL_SAVE_STEPS, "resumed_from": checkpoint.name if checkpoint else None}


def _tell(config: dict[str, Any], run_dir: Path) -> tuple[dict[str, Any], str, dict[str, Any]]:
    from tellneo.recipes.records import general_records
    from tellneo.recipes.tell import dev_pairs, run_tell, task_data

    base = tell_config(config, run_dir)
    cfg = replace(base, train=replace(base.train, save_steps=TELL_SAVE_STEPS))
    start, attempt = _tell_start(run_dir)
    train, test, _, _, _ = task_data(cfg)
    if cfg.exposures is None:  # the former mix: its first G general records (the recorded hashes)
        general = general_records(cfg.general, cfg.general_samples)[0] if cfg.method == "tell" else []
        return run_tell(cfg, **start, progress=False), _records_hash(train, test, general), attempt
    # the counted mix draws from the whole pool: its description (with the pool's fingerprint) names it
    general = [{"source": general_records(cfg.general)[1]}] if cfg.method == "tell" else []
    dev = dev_pairs(cfg) if cfg.selecting else []
    summary = run_tell(cfg, **start, progress=False, before_cache=run_dir.parent / "_before_cache")
    return summary, _records_hash(train, test, dev, general), attempt


def child_main(argv: list[str]) -> int:
    recipe, config_path, run_dir = argv
    config = json.loads(Path(config_path).read_text())
    run_dir_path = Path(run_dir)
    t0 = time.perf_counter()
    commit = git_commit(ROOT)  # the code the run starts with (edits during a long run must not relabel it)
    summary, data_hash, attempt = (_neo if recipe == "neo" else _tell)(config, run_dir_path)
    summary.pop("table", None)
    # wall_s: this process only (a resumed run's earlier attempts are not in it; attempt says where it resumed)
    record = {"recipe": recipe, "config": config, "config_hash": config_hash(config), "data_hash": data_hash,
              "commit": commit, "wall_s": round(time.perf_counter() - t0, 1), "summary": summary}
    if attempt:
        record["attempt"] = attempt
    atomic_write_text(run_dir_path / "arm.json", json.dumps(record, indent=2, default=str))
    return 0


def _finished(path: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    if path.is_file():
        record = json.loads(path.read_text())
        if record.get("config_hash") == config_hash(config):
            return record
    return None


def run_arm(recipe: str, config: dict[str, Any], run_dir: Path, *, log: Path | None = None,
            threads: int | None = None, keep: Path | None = None) -> dict[str, Any]:
    """Run one arm in a child process (or reuse its finished ``arm.json``); returns the arm record.

    ``keep``: a second home for the record (a JSON file; the driver puts it beside the committed CSVs), checked
    first and written after the run, so a sweep resumes on a fresh checkout without the ignored run directories.
    Raises RuntimeError naming the log file when the child fails.
    """
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    done = run_dir / "arm.json"
    record = _finished(keep, config) if keep else None
    if record is not None:
        return record
    record = _finished(done, config) or _run_child(recipe, config, run_dir, log=log, threads=threads)
    if keep:
        atomic_write_text(keep, json.dumps(record, indent=2))
    return record


def _run_child(recipe: str, config: dict[str, Any], run_dir: Path, *, log: Path | None, threads: int | None
               ) -> dict[str, Any]:
    """Run one arm in ``python -m benchmarks.methods.runner``; returns the ``arm.json`` it wrote."""
    done = run_dir / "arm.json"
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file = run_dir / "arm_config.json"
    atomic_write_text(config_file, json.dumps(config, indent=2))
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    log = log or run_dir / "arm.log"
    with open(log, "ab") as f:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.methods.runner", recipe, str(config_file),
                               str(run_dir)], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not done.is_file():
        raise RuntimeError(f"arm {run_dir.name} failed (exit {proc.returncode}); see {log}")
    return json.loads(done.read_text())

if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
