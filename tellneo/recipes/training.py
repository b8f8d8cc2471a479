"""Training-loop settings and the run-directory protocol shared by ``tellneo distill`` and ``tellneo tell``.

A run directory holds ``manifest.json`` (the config; a different config is refused), ``checkpoints/checkpoint-N``
(atomic), ``metrics.jsonl``, the loss-curve PNG, ``summary.json`` / ``summary.md`` and the trained adapter or
model. :func:`open_run_dir` refuses to start over a run that already trained unless asked to resume or overwrite,
so nothing written earlier is lost by accident.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from tellneo.io import lock_run_dir, prepare_run_dir, remove_outputs
from tellneo.recipes.errors import RecipeError
from tellneo.recipes.outputs import GGUF_NAME, STUDENT_BASE
from tellneo.recipes.settings import LR_SCHEDULERS, PRESET_FIELDS, TRAIN_DEFAULTS
from tellneo.recipes.trainer_utils import WARMUP_RATIO_ATTR, clean_staging, last_checkpoint

logger = logging.getLogger("tellneo")

__all__ = ["LR_SCHEDULERS", "PRESET_FIELDS", "TRAIN_DEFAULTS", "TrainSettings", "check_run_dir", "check_report_to", "open_run_dir", "run_training", "seconds_per_step"]

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
TOPK = "teacher_topk"
# Everything a run writes into its directory besides the manifest: cleared before a fresh start writes its
# manifest, so an interrupted --overwrite never leaves the new manifest beside the old run's results.
_SAVED_DIRS = ("adapter", "model", "merged", STUDENT_BASE)
RUN_OUTPUTS = (CHECKPOINTS, METRICS, TOPK, "summary.json", "summary.md", "loss_curve.png", GGUF_NAME, *_SAVED_DIRS,
               *(f".staging-{d}" for d in _SAVED_DIRS), *(f".old-{d}" for d in _SAVED_DIRS))
MAX_THREADS_PER_CORE = 4


@dataclass
class TrainSettings:
    """The usual training flags, mapped onto ``transformers.TrainingArguments`` by :meth:`training_arguments`.

    ``batch_size`` is per device (rows of ``seq_len`` tokens); the global batch is
    ``batch_size * grad_accum * world_size``. ``max_steps > 0`` overrides ``epochs``. ``warmup_ratio`` is a
    fraction of the total optimizer steps, turned into whole steps by
    :func:`tellneo.recipes.trainer_utils.warmup_steps` (rounded down, always leaving a step at the peak learning
    rate) with a linear warm-up whose first step already has lr > 0.

    ``None`` in ``epochs``, ``learning_rate``, ``lr_scheduler`` or ``warmup_ratio`` (:data:`PRESET_FIELDS`) means
    "the recipe decides": ``run_distill`` fills them from its preset, ``run_tell`` from its defaults
    (:meth:`resolve`); used on its own, :meth:`training_arguments` fills them from :data:`TRAIN_DEFAULTS`.
    """

    batch_size: int = 2
    grad_accum: int = 1
    max_steps: int = -1
    epochs: float | None = None
    learning_rate: float | None = None
    lr_scheduler: str | None = None
    warmup_ratio: float | None = None
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    bf16: bool = False
    gradient_checkpointing: bool = False
    logging_steps: int = 1
    save_steps: int = 25
    save_total_limit: int = 2

    def __post_init__(self) -> None:
        if self.lr_scheduler is not None and self.lr_scheduler not in LR_SCHEDULERS:
            raise RecipeError(f"lr-scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {self.lr_scheduler!r}")
        for name in ("batch_size", "grad_accum", "logging_steps", "save_steps"):
            if getattr(self, name) <= 0:
                raise RecipeError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise RecipeError(f"max-steps must be positive (or -1 for --epochs), got {self.max_steps}")
        if self.max_steps < 0 and self.epochs is not None and not self.epochs > 0:
            raise RecipeError(f"epochs must be > 0, got {self.epochs}")
        if self.max_steps < 0 and self.epochs is not None and not math.isfinite(self.epochs):
            raise RecipeError(f"epochs must be finite, got {self.epochs}")
        if self.learning_rate is not None and not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise RecipeError(f"learning-rate must be a finite number > 0, got {self.learning_rate}")
        if self.warmup_ratio is not None and not 0.0 <= self.warmup_ratio < 1.0:
            raise RecipeError(f"warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise RecipeError(f"weight-decay must be a finite number >= 0, got {self.weight_decay}")
        if not (self.max_grad_norm >= 0 and math.isfinite(self.max_grad_norm)):
            raise RecipeError(f"max-grad-norm must be a finite number >= 0 (0: no clipping), got {self.max_grad_norm}")
        if self.save_total_limit < 1:
            raise RecipeError(f"save-total-limit must be at least 1 (the newest checkpoint is always kept), got "
                              f"{self.save_total_limit}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def resolve(self, defaults: Mapping[str, Any]) -> TrainSettings:
        """A copy with the ``None`` fields of :data:`PRESET_FIELDS` taken from ``defaults`` (a preset's values)."""
        missing = [name for name in PRESET_FIELDS if name not in defaults]
        if missing:
            raise ValueError(f"defaults lack {', '.join(missing)}")
        return dataclasses.replace(self, **{name: defaults[name] for name in PRESET_FIELDS
                                            if getattr(self, name) is None})

    def training_arguments(self, output_dir: str | Path, *, report_to: str | list[str] = "none",
                           **overrides: Any) -> Any:
        """``TrainingArguments`` for these settings (``None`` fields from :data:`TRAIN_DEFAULTS`); ``report_to`` as
        :func:`check_report_to` accepts it (logs go to the Trainer's integrations, e.g. TensorBoard event files
        under ``output_dir/runs``)."""
        from transformers import TrainingArguments

        if any(getattr(self, name) is None for name in PRESET_FIELDS):
            return self.resolve(TRAIN_DEFAULTS).training_arguments(output_dir, report_to=report_to, **overrides)
        kwargs: dict[str, Any] = dict(
            output_dir=str(output_dir),
            per_device_train_batch_size=self.batch_size,
            gradient_accumulation_steps=self.grad_accum,
            max_steps=self.max_steps,
            num_train_epochs=self.epochs,
            learning_rate=self.learning_rate,
            lr_scheduler_type=self.lr_scheduler,
            warmup_steps=0,  # integer steps from warmup_ratio once the total is known (RecipeTrainerMixin)
            weight_decay=self.weight_decay,
            max_grad_norm=self.max_grad_norm,
            seed=self.seed,
            data_seed=self.seed,
            bf16=self.bf16,
            logging_steps=self.logging_steps,
            logging_first_step=True,
            save_strategy="steps",
            save_steps=self.save_steps,
            save_total_limit=self.save_total_limit,
            report_to=check_report_to(report_to),
            remove_unused_columns=False,
            dataloader_drop_last=True,
            use_cpu=not torch.cuda.is_available(),
        )
        # transformers >= 5.x renamed gradient_checkpointing to activation_checkpointing (the old name warns)
        names = {f.name for f in dataclasses.fields(TrainingArguments)}
        prefix = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
        kwargs[prefix] = self.gradient_checkpointing
        kwargs[f"{prefix}_kwargs"] = {"use_reentrant": False} if self.gradient_checkpointing else None
        kwargs.update(overrides)
        args = TrainingArguments(**kwargs)
        if "warmup_steps" not in overrides:
            setattr(args, WARMUP_RATIO_ATTR, self.warmup_ratio)
        return args


def check_report_to(report_to: str | list[str]) -> list[str]:
    """The Trainer logging integrations named by ``report_to`` (``"none"``, one name, a comma-separated list or
    a list: ``tensorboard``, ``wandb``, ``mlflow``, ...), each checked to exist and be installed; RecipeError
    otherwise. Returns the list (empty for ``"none"``)."""
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    names = [n.strip() for n in (report_to.split(",") if isinstance(report_to, str) else report_to) if n.strip()]
    if names in ([], ["none"]):
        return []
    if names == ["all"]:
        return get_available_reporting_integrations()
    unknown = [n for n in names if n not in INTEGRATION_TO_CALLBACK]
    if unknown:
        raise RecipeError(f"report-to: unknown integration(s) {unknown}; choose from none, all, "
                          f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))}")
    missing = [n for n in names if n not in get_available_reporting_integrations()]
    if missing:
        raise RecipeError(f"report-to: {', '.join(missing)} is not installed (pip install {' '.join(missing)}; "
                          "for TensorBoard: pip install 'tellneo[tensorboard]')")
    return names


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


def seconds_per_step(seconds: float, global_step: int, resumed_from: Path | None) -> float | None:
    """Wall seconds per optimizer step trained in this session (a resumed run started at ``checkpoint-N``)."""
    start = int(Path(resumed_from).name.rsplit("-", 1)[1]) if resumed_from is not None else 0
    steps = global_step - start
    return round(seconds / steps, 3) if steps > 0 else None


def run_training(trainer: Any, resume_from: Path | None) -> tuple[Any, bool]:
    """``trainer.train(resume_from_checkpoint=...)`` with the interrupt protocol of
    :class:`tellneo.recipes.trainer_utils.InterruptCallback`; returns ``(train output or None, interrupted)``.

    A non-finite loss or gradient norm raises :class:`tellneo.recipes.trainer_utils.NonFiniteError` (a
    RecipeError: one line from the CLI) naming the step and the last good checkpoint."""
    from tellneo.recipes.trainer_utils import InterruptCallback

    if resume_from is not None and trainer.args.max_steps > 0:
        from transformers import TrainerState

        state = TrainerState.load_from_json(str(Path(resume_from) / "trainer_state.json"))
        if state.global_step >= trainer.args.max_steps:
            # A finished run: the Trainer would train one step past max_steps; load the final weights instead.
            trainer._load_from_checkpoint(str(resume_from))
            trainer.state = state
            return None, False
    callback = next((c for c in trainer.callback_handler.callbacks if isinstance(c, InterruptCallback)), None)
    if callback is None:
        callback = InterruptCallback()
        trainer.add_callback(callback)
    try:
        output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
    finally:  # an error inside the loop skips on_train_end: restore the SIGINT handler anyway (idempotent)
        callback.on_train_end(trainer.args, trainer.state, trainer.control)
    return output, callback.interrupted
