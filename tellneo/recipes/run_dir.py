"""The run-directory protocol shared by ``tellneo distill`` and ``tellneo tell``.

A run directory holds ``manifest.json`` (the config; a different config is refused), ``checkpoints/checkpoint-N``
(atomic), ``metrics.jsonl``, the loss-curve PNG, ``summary.json`` / ``summary.md`` and the trained adapter or
model. :func:`open_run_dir` refuses to start over a run that already trained unless asked to resume or overwrite,
so nothing written earlier is lost by accident.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from tellneo.io import lock_run_dir, prepare_run_dir, remove_outputs
from tellneo.recipes.errors import RecipeError
from tellneo.recipes.outputs import GGUF_NAME, STUDENT_BASE

logger = logging.getLogger("tellneo")

__all__ = ["CHECKPOINTS", "DEV_BEST", "DEV_SCORES", "METRICS", "RUN_OUTPUTS", "TOPK", "check_run_dir",
           "clean_staging", "last_checkpoint", "open_run_dir"]

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
TOPK = "teacher_topk"
# best-of-k on dev (tellneo.recipes.dev_selection): the scores so far and the best weights
DEV_SCORES = "dev_selection.json"
DEV_BEST = "dev_best.pt"
# Everything a run writes into its directory besides the manifest: cleared before a fresh start writes its
# manifest, so an interrupted --overwrite never leaves the new manifest beside the old run's results.
_SAVED_DIRS = ("adapter", "model", "merged", STUDENT_BASE)
RUN_OUTPUTS = (CHECKPOINTS, METRICS, TOPK, DEV_SCORES, DEV_BEST, "summary.json", "summary.md", "loss_curve.png",
               GGUF_NAME, *_SAVED_DIRS,
               *(f".staging-{d}" for d in _SAVED_DIRS), *(f".old-{d}" for d in _SAVED_DIRS))
CHECKPOINT_PREFIX = "checkpoint"


def check_run_dir(path: str | Path, config: dict[str, Any], *, resume: bool, overwrite: bool) -> None:
    """Everything :func:`open_run_dir` would refuse, checked without writing anything (call it before the slow
    loading so that a bad ``--output-dir`` fails at once, and a failed start leaves no manifest behind)."""
    from tellneo.io import config_hash, different_run_message, read_manifest

    if resume and overwrite:
        raise RecipeError("--resume and --overwrite contradict each other (continue the run, or discard it): pass one")
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise PermissionError(f"cannot create output directory {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"output directory {existing} is not writable")
    old = read_manifest(path)
    latest = last_checkpoint(path / CHECKPOINTS)
    if old is not None:
        if old.get("config_hash") != config_hash(config):
            if not overwrite:
                message = different_run_message(path, old, config)
                raise FileExistsError(f"--resume: {message}" if resume else message)
            return
        if not resume and not overwrite and (latest is not None or (path / "summary.json").exists()):
            what = f"checkpoints up to {latest.name}" if latest is not None else "a finished run"
            raise RecipeError(f"{path} already holds {what} of this configuration; pass --resume to continue it, "
                              "--overwrite to start over, or choose another --output-dir")
    elif not overwrite:
        found = [name for name in RUN_OUTPUTS if (path / name).exists()]
        if found:
            raise RecipeError(f"{path} holds {', '.join(found)} without a manifest of their run; pass --overwrite "
                              "to replace them or choose another --output-dir")


def open_run_dir(path: str | Path, config: dict[str, Any], *, resume: bool, overwrite: bool,
                 is_main: bool = True) -> tuple[Path, Path | None]:
    """Create or reopen a run directory; returns ``(path, checkpoint to resume from or None)``.

    * a different run in ``path``: FileExistsError naming what changed unless ``overwrite``;
    * the same run with checkpoints or a summary: resumed with ``resume``, else RecipeError (nothing is touched);
    * ``resume`` without a checkpoint: a fresh start (precomputed teacher top-k of the same config are kept).

    A fresh start deletes the old run's outputs (:data:`RUN_OUTPUTS`) *before* it writes its manifest. The
    directory stays locked for this process (:func:`tellneo.io.lock_run_dir`): a concurrent run refuses.
    """
    from tellneo.io import config_hash, read_manifest

    path = Path(path)
    if not is_main:
        return path, last_checkpoint(path / CHECKPOINTS) if resume else None
    check_run_dir(path, config, resume=resume, overwrite=overwrite)
    lock_run_dir(path)
    check_run_dir(path, config, resume=resume, overwrite=overwrite)  # again, now that no other run can change it
    old = read_manifest(path)
    same = old is not None and old.get("config_hash") == config_hash(config)
    ckpt_dir = path / CHECKPOINTS
    clean_staging(ckpt_dir)
    latest = last_checkpoint(ckpt_dir)
    if resume and same and latest is not None:
        prepare_run_dir(path, config)
        return path, latest
    if resume and same:
        logger.info(f"--resume: no checkpoint in {ckpt_dir}, starting from scratch")
    # a fresh start (new directory, --overwrite, or --resume without a checkpoint): the old run's files go first
    remove_outputs(path, [name for name in RUN_OUTPUTS if not (same and not overwrite and name == TOPK)])
    out, _ = prepare_run_dir(path, config, overwrite=True)
    return out, None


def last_checkpoint(checkpoint_dir: str | os.PathLike[str]) -> Path | None:
    """The newest usable ``checkpoint-N`` in ``checkpoint_dir`` (None if there is none): one whose
    ``trainer_state.json`` parses. A newer checkpoint with a missing or truncated state (a disk that filled up, a
    file damaged later) is skipped with a warning, so a resume falls back to the previous checkpoint."""
    d = Path(checkpoint_dir)
    if not d.is_dir():
        return None
    found = []
    for p in d.iterdir():
        step = p.name[len(CHECKPOINT_PREFIX) + 1:]
        if p.is_dir() and p.name.startswith(f"{CHECKPOINT_PREFIX}-") and step.isdigit():
            found.append((int(step), p))
    for _, p in sorted(found, reverse=True):
        try:
            json.loads((p / "trainer_state.json").read_text(encoding="utf-8"))
            return p
        except (OSError, ValueError) as exc:
            logger.warning(f"skipping {p}: its trainer_state.json is unreadable ({exc}); using an older checkpoint")
    return None


def clean_staging(checkpoint_dir: str | os.PathLike[str]) -> None:
    """Remove staging directories a killed run left behind (they never hold a complete checkpoint)."""
    d = Path(checkpoint_dir)
    if d.is_dir():
        for p in d.glob(".staging-*"):
            shutil.rmtree(p, ignore_errors=True)
