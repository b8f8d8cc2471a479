"""The run skeleton shared by ``run_distill`` and ``run_tell``: check the run directory, prepare (data, models),
open the run directory, evaluate before, train with :class:`tellneo.recipes.neo.KDTrainer`, evaluate after, save,
write the summary; the interrupt and error protocol of :mod:`tellneo.recipes.training` and
:mod:`tellneo.recipes.run_dir`.

A recipe supplies its own parts as a :class:`RecipeRun` subclass; :func:`run_recipe` calls them in this order::

    check_models -> prepare (inside the "preparing" stage bar) -> [run directory opened] -> after_open ->
    evaluate("before") -> trainable_model (after set_seed) -> callbacks -> train -> plot -> after_train ->
    evaluate("after") -> plot -> save -> summary
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tellneo.recipes.errors import RecipeError
from tellneo.recipes.settings import KDSettings
from tellneo.recipes.run_dir import CHECKPOINTS, METRICS, check_run_dir, open_run_dir
from tellneo.recipes.training import TrainSettings, run_training, seconds_per_step

__all__ = ["RecipeRun", "TrainedRun", "run_recipe"]


@dataclass
class TrainedRun:
    """What the skeleton hands to :meth:`RecipeRun.summary`: the evaluations, the trained model, the trainer
    state, the logged metrics (``metrics.jsonl`` rows; main process only) and the counts."""

    before: dict[str, Any]
    after: dict[str, Any]
    model: Any
    trainer: Any
    metrics: list[dict[str, Any]]
    trainable: int
    total: int
    global_batch: int


class RecipeRun(ABC):
    """One recipe's parts of :func:`run_recipe`. The skeleton sets ``out`` (the run directory), ``state``
    (accelerate's ``PartialState``), ``progress`` and ``global_batch`` (rows per optimizer step, all processes)
    before :meth:`prepare`, and ``resume_from`` once the run directory is open.

    Subclasses set :attr:`stages` (stage-bar steps of :meth:`prepare`), :attr:`mode` (``"lora"`` / ``"full"``),
    ``manifest`` and ``train`` (resolved settings) and ``output_dir`` in their ``__init__``; :meth:`prepare` sets
    ``model`` (evaluated before training); ``teacher`` and ``kd`` go to the trainer (default: no teacher, CE only).
    """

    stages: int
    mode: str
    manifest: dict[str, Any]
    train: TrainSettings
    output_dir: Path
    model: Any
    kd: KDSettings = KDSettings(alpha=0.0)
    teacher: Any = None

    out: Path
    state: Any
    progress: bool
    global_batch: int
    resume_from: Path | None

    @abstractmethod
    def check_models(self) -> None:
        """Refuse missing model paths before anything slow runs."""

    @abstractmethod
    def prepare(self, stage: Any, timings: dict[str, float]) -> Any:
        """Read the data, load the models, tokenize and pack; returns the packed training dataset (checked by the
        skeleton to fill one global batch). ``stage(name)`` advances the stage bar."""

    def after_open(self, timings: dict[str, float]) -> None:
        """Work that writes into the opened run directory before training (e.g. precomputed teacher top-k)."""

    @abstractmethod
    def evaluate(self, model: Any, label: str) -> dict[str, Any]:
        """The held-out metrics of ``model`` (``label``: ``"before"`` / ``"after"``)."""

    @abstractmethod
    def trainable_model(self) -> Any:
        """The model to train (LoRA attached, or every weight trainable); called after ``set_seed``."""

    def callbacks(self) -> list[Any]:
        """Extra ``TrainerCallback`` s for the trainer (e.g. a dev-split selection); default none."""
        return []

    def after_train(self, model: Any) -> None:
        """Work on the trained model before it is evaluated and saved (e.g. restoring a selected checkpoint);
        not called when training was interrupted."""

    @abstractmethod
    def trainer_inputs(self) -> tuple[Any, Any]:
        """``(train dataset, data collator)`` for the trainer."""

    @abstractmethod
    def plot(self, metrics: list[dict[str, Any]], before: dict[str, Any] | None = None,
             after: dict[str, Any] | None = None, final_step: int = 0) -> None:
        """Draw ``loss_curve.png`` (main process): after training, and again with the held-out points."""

    @abstractmethod
    def save(self, model: Any, timings: dict[str, float]) -> dict[str, str]:
        """Write the trained adapter/model (main process); returns ``{output: path}``."""

    @abstractmethod
    def summary(self, run: TrainedRun) -> tuple[dict[str, Any], str]:
        """``(the recipe's summary entries, the markdown table)``; the skeleton appends the training entries."""


def run_recipe(recipe: RecipeRun, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
               report_to: str | list[str] = "none") -> dict[str, Any]:
    """Run ``recipe`` through the skeleton; returns the summary (also written to ``summary.json``), with
    ``table`` (markdown) and ``main_process`` (under torchrun only rank 0 reports) added.

    Raises RecipeError (bad configuration or data), FileExistsError / PermissionError (output directory),
    KeyboardInterrupt after a Ctrl-C (a checkpoint of the last finished step is saved: rerun with ``resume=True``),
    and what the recipe's parts raise.
    """
    from tellneo.models import hf_progress_bars

    with hf_progress_bars(progress):  # progress=False also silences transformers' loading/saving bars
        return _run(recipe, resume=resume, overwrite=overwrite, progress=progress, report_to=report_to)


def _run(recipe: RecipeRun, *, resume: bool, overwrite: bool, progress: bool, report_to: str | list[str]
         ) -> dict[str, Any]:
    from accelerate import PartialState
    from transformers import set_seed

    from tellneo.io import lock_run_dir
    from tellneo.recipes.neo import KDTrainer
    from tellneo.recipes.model_parts import count_parameters
    from tellneo.recipes.reporting import StageBar, machine_state, process_peak, train_memory_fields, write_summary
    from tellneo.recipes.training import TRAIN_MEMORY_ATTR, MetricsJsonlCallback, read_metrics

    t_start = time.perf_counter()
    train, manifest, out = recipe.train, recipe.manifest, Path(recipe.output_dir)
    args = train.training_arguments(out / CHECKPOINTS, disable_tqdm=not progress, report_to=report_to)
    state = PartialState()
    if state.is_main_process:
        check_run_dir(out, manifest, resume=resume, overwrite=overwrite)  # fail fast, write nothing yet
        lock_run_dir(out, create=False)  # a run already in that directory: refuse now, not after loading
    recipe.check_models()
    recipe.out, recipe.state, recipe.progress = out, state, progress
    recipe.global_batch = global_batch = train.batch_size * train.grad_accum * state.num_processes
    timings: dict[str, float] = {}

    machine_start = machine_state()
    with StageBar(recipe.stages, "preparing", enabled=progress) as stage:
        dataset = recipe.prepare(stage, timings)
        if dataset.steps_per_epoch(global_batch) == 0:
            raise RecipeError(f"the training data packs into {len(dataset)} rows of {dataset.seq_len} tokens, "
                              f"fewer than one global batch ({global_batch} rows): add data or lower "
                              "--batch-size/--grad-accum")

    # inputs are valid: now the run directory is created (or reopened) and written
    with state.main_process_first():
        out, resume_from = open_run_dir(out, manifest, resume=resume, overwrite=overwrite,
                                        is_main=state.is_main_process)
    recipe.out, recipe.resume_from = out, resume_from
    recipe.after_open(timings)

    t0 = time.perf_counter()
    before = recipe.evaluate(recipe.model, "before")
    timings["eval_before_s"] = time.perf_counter() - t0

    set_seed(train.seed)  # LoRA initialisation: the same run gives the same adapters
    model = recipe.trainable_model()
    trainable, total = count_parameters(model)
    train_dataset, collator = recipe.trainer_inputs()
    trainer = KDTrainer(model=model, args=args, train_dataset=train_dataset, data_collator=collator,
                        teacher=recipe.teacher, kd=recipe.kd,
                        callbacks=[MetricsJsonlCallback(out / METRICS), *recipe.callbacks()])
    t0 = time.perf_counter()
    train_output, interrupted = run_training(trainer, resume_from)
    timings["train_s"] = time.perf_counter() - t0
    metrics = read_metrics(out / METRICS) if state.is_main_process else []
    if state.is_main_process:
        recipe.plot(metrics)
    if interrupted:
        raise KeyboardInterrupt(f"training interrupted at step {trainer.state.global_step}; a checkpoint is in "
                                f"{out / CHECKPOINTS}: rerun with --resume to continue")

    recipe.after_train(model)
    t0 = time.perf_counter()
    after = recipe.evaluate(model, "after")
    timings["eval_after_s"] = time.perf_counter() - t0
    if state.is_main_process:  # again, with the held-out points before (step 0) and after training
        recipe.plot(metrics, before, after, trainer.state.global_step)
        written = recipe.save(model, timings)
    timings["total_s"] = time.perf_counter() - t_start

    summary, table = recipe.summary(TrainedRun(before, after, model, trainer, metrics, trainable, total,
                                               global_batch))
    train_rows = [r for r in metrics if "loss" in r]
    train_memory = getattr(trainer, TRAIN_MEMORY_ATTR, None)
    summary.update({
        "first_loss": train_rows[0]["loss"] if train_rows else None,
        "last_loss": train_rows[-1]["loss"] if train_rows else None,
        "train_runtime_s": getattr(train_output, "metrics", {}).get("train_runtime") if train_output else None,
        "train_s_per_step": seconds_per_step(timings["train_s"], trainer.state.global_step, resume_from)
        if train_output is not None else None,
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "processes": state.num_processes, "machine_at_start": machine_start,
        # the training-phase meter resets the kernel's/allocator's peaks: keep the whole-process peak honest
        "machine_at_end": process_peak(machine_state(), train_memory),
        **train_memory_fields(train_memory),
        "outputs": written if state.is_main_process else {},
    })
    if state.is_main_process:
        write_summary(out, summary, table)
    summary["table"] = table
    summary["main_process"] = state.is_main_process  # under torchrun only rank 0 reports
    return summary
