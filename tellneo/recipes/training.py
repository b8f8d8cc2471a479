"""Training with ``transformers.Trainer`` in both recipes: :class:`TrainSettings` (the flags, mapped onto
``TrainingArguments``) and what the recipes add to the Trainer: atomic checkpoints, data in the dataset's own
order, a stop at the first non-finite step, a Ctrl-C that stops at a step boundary with a checkpoint, and
``metrics.jsonl`` logging; :func:`run_training` runs it. The run directory around it: :mod:`tellneo.recipes.run_dir`.

* :class:`RecipeTrainerMixin` — put before ``Trainer`` in the bases. Checkpoints are written into a hidden staging
  directory and renamed into place (a crash never leaves a half-written ``checkpoint-N``); the training sampler
  is sequential, because :class:`tellneo.data.PackedDataset` already fixes the order per ``(seed, epoch)`` (a TELL
  mix must not be reshuffled; under DDP accelerate gives rank r the r-th block of each global batch). Training
  stops with :class:`NonFiniteError` at the first optimizer step whose loss or gradient norm is NaN/Inf, before
  that step's update is applied, so the checkpoints on disk are the last good ones and ``--resume`` continues.
* :class:`InterruptCallback` — the first SIGINT finishes the running optimizer step, saves a checkpoint and
  stops training (agreed across ranks); a second SIGINT raises ``KeyboardInterrupt`` at once.
* :class:`MetricsJsonlCallback` — every log line (training and evaluation) appended to ``metrics.jsonl``; lines
  past the resumed step are dropped when a run resumes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from tellneo.io import atomic_write_text, to_json
from tellneo.recipes.errors import RecipeError
from tellneo.recipes.run_dir import (  # noqa: F401 (their former home)
    CHECKPOINT_PREFIX,
    CHECKPOINTS,
    METRICS,
    RUN_OUTPUTS,
    TOPK,
    check_run_dir,
    clean_staging,
    last_checkpoint,
    open_run_dir,
)
from tellneo.recipes.settings import LR_SCHEDULERS, PRESET_FIELDS, TRAIN_DEFAULTS  # noqa: F401 (re-exported)

logger = logging.getLogger("tellneo")

__all__ = [
    "InterruptCallback",
    "LR_SCHEDULERS",
    "MetricsJsonlCallback",
    "NonFiniteError",
    "PRESET_FIELDS",
    "RecipeTrainerMixin",
    "TRAIN_DEFAULTS",
    "TrainSettings",
    "check_report_to",
    "read_metrics",
    "run_training",
    "seconds_per_step",
    "warmup_steps",
]

MAX_THREADS_PER_CORE = 4


@dataclass
class TrainSettings:
    """The usual training flags, mapped onto ``transformers.TrainingArguments`` by :meth:`training_arguments`.

    ``batch_size`` is per device (rows of ``seq_len`` tokens); the global batch is
    ``batch_size * grad_accum * world_size``. ``max_steps > 0`` overrides ``epochs``. ``warmup_ratio`` is a
    fraction of the total optimizer steps, turned into whole steps by
    :func:`warmup_steps` (rounded down, always leaving a step at the peak learning
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


WARMUP_RATIO_ATTR = "tellneo_warmup_ratio"  # set on TrainingArguments by TrainSettings.training_arguments


def warmup_steps(ratio: float, total_steps: int) -> int:
    """Integer warm-up steps for a warm-up ``ratio`` of ``total_steps``: ``floor(ratio * total_steps)``, at most
    ``total_steps - 1``, so that at least one optimizer step runs at the peak learning rate (4 steps at ratio 0.1:
    no warm-up; 24 steps: 2)."""
    return max(0, min(int(ratio * total_steps), total_steps - 1))


def _warm_from_step_one(scheduler: Any, warmup: int) -> None:
    """Shift a ``LambdaLR`` warm-up by one step: step k (1-based) of a ``warmup``-step linear warm-up runs at
    ``k / warmup`` of the peak instead of ``(k - 1) / warmup``, so the first step is never a step at lr 0 and the
    peak is reached at step ``warmup``; the schedule after the warm-up is unchanged."""
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if warmup <= 0 or not lambdas:
        return
    scheduler.lr_lambdas = [lambda step, f=f: f(step + 1) if step < warmup else f(step) for f in lambdas]
    for group, base, f in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * f(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]

# transformers >= 5 computes the gradient norm in Trainer._get_grad_norm (before the optimizer step): the loss and
# the norm are checked there, once per optimizer step. Older versions only let us check the loss per micro-batch.
_GRAD_NORM_HOOK = hasattr(Trainer, "_get_grad_norm")


class NonFiniteError(RecipeError):
    """The loss or gradient norm of an optimizer step is NaN/Inf; training stopped before applying that step."""


class RecipeTrainerMixin:
    """Mixin for ``transformers.Trainer`` subclasses: atomic checkpoints, a sequential training sampler, and a stop
    at the first non-finite loss or gradient norm.

    The non-finite check costs one host read of a device scalar per optimizer step, right after the gradient
    norm (which the Trainer computes anyway for clipping and logging) and before the optimizer step; the Trainer's
    default ``logging_nan_inf_filter`` already reads every micro-batch's loss on the host. Under DDP the verdict is
    agreed across ranks (one tiny all-reduce). Before each checkpoint the trainable weights are checked too (one
    pass over them per save), so a checkpoint on disk never holds NaN/Inf weights.
    """

    _step_loss: torch.Tensor | None = None

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        """With a warm-up ratio from :class:`TrainSettings`: integer warm-up steps
        (:func:`warmup_steps`) and a warm-up whose first step already has lr > 0. Otherwise the Trainer's own."""
        ratio = getattr(self.args, WARMUP_RATIO_ATTR, None)
        if ratio is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)  # type: ignore[misc]
        self.args.warmup_steps = warmup_steps(ratio, num_training_steps)
        scheduler = super().create_scheduler(num_training_steps, optimizer)  # type: ignore[misc]
        _warm_from_step_one(scheduler, self.args.warmup_steps)
        return scheduler

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return torch.utils.data.SequentialSampler(dataset)

    # -- non-finite guard ----------------------------------------------------------------------------------------
    def training_step(self, model: torch.nn.Module, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]
        step_loss = loss.detach().float().sum()
        self._step_loss = step_loss if self._step_loss is None else self._step_loss + step_loss  # NaN/Inf stick
        if not _GRAD_NORM_HOOK:
            self._check_finite(None)
        return loss

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> Any:
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)  # type: ignore[misc]
        self._check_finite(grad_norm)
        return grad_norm

    def _check_finite(self, grad_norm: Any) -> None:
        loss, self._step_loss = self._step_loss, None
        if loss is None:
            return
        values = [loss] if grad_norm is None else [loss, torch.as_tensor(grad_norm, device=loss.device).float()]
        bad = not bool(torch.isfinite(torch.stack(values)).all())
        if not _any_rank(bad):
            return
        loss_value = loss.item()
        what = f"loss {loss_value}" if not math.isfinite(loss_value) else \
            f"gradient norm {float(grad_norm)} (loss {loss_value:.6g})"
        self._raise_non_finite(f"non-finite {what} at step {self.state.global_step + 1}; training stopped before "
                               "applying that step")

    def _raise_non_finite(self, message: str) -> None:
        latest = last_checkpoint(self.args.output_dir)
        where = f"the last good checkpoint is {latest}" if latest is not None else "no checkpoint was saved before it"
        raise NonFiniteError(f"{message}, and {where}: check the data, the models' weights and the learning rate, "
                             "then rerun (--resume continues from that checkpoint)")

    def _check_weights_finite(self, model: torch.nn.Module) -> None:
        bad = [name for name, p in model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]
        if _any_rank(bool(bad)):
            self._raise_non_finite(f"the update of step {self.state.global_step} made {len(bad)} trainable "
                                   f"weight tensor(s) non-finite (first: {bad[0] if bad else 'on another rank'}); "
                                   "that checkpoint was not saved")

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        self._check_weights_finite(model)
        run_dir = Path(self._get_output_dir(trial=trial))
        name = f"{CHECKPOINT_PREFIX}-{self.state.global_step}"
        staging_root = run_dir / f".staging-{name}"
        if self.args.should_save and staging_root.exists():
            shutil.rmtree(staging_root)
        self.accelerator.wait_for_everyone()
        # Trainer._save_checkpoint writes into self._get_output_dir(trial)/checkpoint-N: point it at the staging root.
        self._get_output_dir = lambda trial=None: str(staging_root)  # type: ignore[method-assign]
        try:
            super()._save_checkpoint(model, trial)  # type: ignore[misc]
        finally:
            del self._get_output_dir
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = run_dir / name
            trash = run_dir / f".old-{name}"
            if final.exists():  # the same step saved again (e.g. an interrupt right after a scheduled save)
                os.replace(final, trash)
            os.replace(staging_root / name, final)
            shutil.rmtree(staging_root, ignore_errors=True)
            shutil.rmtree(trash, ignore_errors=True)
            from transformers.trainer_utils import rotate_checkpoints

            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit)
        self.accelerator.wait_for_everyone()


def _any_rank(flag: bool) -> bool:
    if torch.distributed.is_available() and torch.distributed.is_initialized() and \
            torch.distributed.get_world_size() > 1:
        t = torch.tensor([int(flag)], dtype=torch.int64)
        if torch.distributed.get_backend() == "nccl":
            t = t.cuda()
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())
    return flag


class InterruptCallback(TrainerCallback):
    """Turns Ctrl-C into "save a checkpoint at the end of this optimizer step and stop".

    ``interrupted`` tells the caller afterwards. Only installed from the main thread (signal handlers cannot be
    set elsewhere); the previous handler is restored when training ends.
    """

    def __init__(self) -> None:
        self.requested = False
        self.interrupted = False
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to abort at once)")

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.requested = self.interrupted = False
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if _any_rank(self.requested):
            self.interrupted = True
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


class MetricsJsonlCallback(TrainerCallback):
    """Appends ``{"step", "epoch", **logs}`` per log event to ``path`` (main process only).

    When training starts at global step s > 0 (a resumed run), lines with ``step > s`` are dropped first (they
    belong to the part of the interrupted run that is about to be redone); the rewrite is atomic.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= state.global_step]
        atomic_write_text(self.path, "".join(to_json(r) + "\n" for r in kept))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        record.update({k: (float(v) if isinstance(v, (int, float)) else v) for k, v in logs.items()})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (to_json(record) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, line)  # one write of the whole line: concurrent readers see whole lines
        finally:
            os.close(fd)


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (empty list if the file does not exist).

    A torn last line (a write cut short by a full disk or a kill) is dropped with a warning, and the next resume
    rewrites the file without it; an unreadable line before the last raises ValueError naming file and line.
    Non-finite values were written as ``null``.
    """
    p = Path(path)
    if not p.exists():
        return []
    text = p.read_text(encoding="utf-8", errors="replace")
    lines = [(i, line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    records = []
    for n, (i, line) in enumerate(lines):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            if n == len(lines) - 1:
                logger.warning(f"{p}:{i}: dropping a torn last line ({exc})")
                break
            from tellneo.recipes.errors import RecipeError

            raise RecipeError(f"{p}:{i}: not a metrics record ({exc}); repair or delete the line") from None
        records.append(record)
    return records


def seconds_per_step(seconds: float, global_step: int, resumed_from: Path | None) -> float | None:
    """Wall seconds per optimizer step trained in this session (a resumed run started at ``checkpoint-N``)."""
    start = int(Path(resumed_from).name.rsplit("-", 1)[1]) if resumed_from is not None else 0
    steps = global_step - start
    return round(seconds / steps, 3) if steps > 0 else None


TRAIN_MEMORY_ATTR = "tellneo_train_memory"  # set on the trainer by run_training: a tellneo.memory.PhaseMemory


def _memory_meter(trainer: Any) -> Any:
    """A :class:`tellneo.memory.TrainingMemory` for the device the trainer trains on (CUDA: the caching
    allocator's peak; any other device: the process RSS)."""
    from tellneo.memory import TrainingMemory

    device = getattr(trainer.args, "device", None)
    return TrainingMemory(device=device if getattr(device, "type", None) == "cuda" else "cpu")


def run_training(trainer: Any, resume_from: Path | None) -> tuple[Any, bool]:
    """``trainer.train(resume_from_checkpoint=...)`` with the interrupt protocol of
    :class:`InterruptCallback`; returns ``(train output or None, interrupted)``.

    The training loop runs inside a :class:`tellneo.memory.TrainingMemory`; its
    :class:`~tellneo.memory.PhaseMemory` is set as ``trainer.tellneo_train_memory`` (:data:`TRAIN_MEMORY_ATTR`;
    None when no training ran, e.g. resuming a finished run); it also holds the whole-process peak the meter's
    reset hides (``process_peak_before_mb``).

    A non-finite loss or gradient norm raises :class:`NonFiniteError` (a
    RecipeError: one line from the CLI) naming the step and the last good checkpoint."""
    setattr(trainer, TRAIN_MEMORY_ATTR, None)
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
    meter = _memory_meter(trainer)
    try:
        with meter:
            output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
        setattr(trainer, TRAIN_MEMORY_ATTR, meter.result)
    finally:  # an error inside the loop skips on_train_end: restore the SIGINT handler anyway (idempotent)
        callback.on_train_end(trainer.args, trainer.state, trainer.control)
    return output, callback.interrupted
