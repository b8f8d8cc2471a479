"""Training flags shared by ``tellneo distill`` and ``tellneo tell``, and the mapping of recipe errors to the
CLI's one-line user errors."""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any


def add_train_flags(p: argparse.ArgumentParser, *, max_steps: int, batch_size: int = 2, save_steps: int = 25,
                    defaults: Mapping[str, Any] | None = None) -> None:
    """The training flags. ``--epochs``, ``--learning-rate``, ``--lr-scheduler`` and ``--warmup-ratio`` default
    to None, "the recipe decides" (:data:`tellneo.recipes.settings.PRESET_FIELDS`): ``defaults`` (the recipe's
    values) are only shown in the help; without them the help says "from --preset"."""
    from tellneo.recipes.settings import LR_SCHEDULERS

    def default(name: str, fmt: str = "{}") -> str:
        return f"default: {fmt.format(defaults[name])}" if defaults is not None else "default: from --preset"

    g = p.add_argument_group("training")
    g.add_argument("--max-steps", type=int, default=max_steps,
                   help="optimizer steps to train (-1: train --epochs epochs instead)")
    g.add_argument("--epochs", type=float, help=f"epochs over the training data when --max-steps is -1 "
                                                f"({default('epochs')})")
    g.add_argument("--batch-size", type=int, default=batch_size, help="packed rows per device per micro-batch")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches accumulated per optimizer step")
    g.add_argument("--learning-rate", "--lr", type=float, help=f"peak learning rate ({default('learning_rate')})")
    g.add_argument("--lr-scheduler", choices=LR_SCHEDULERS,
                   help=f"learning-rate schedule ({default('lr_scheduler')})")
    g.add_argument("--warmup-ratio", type=float,
                   help=f"fraction of the steps spent warming up ({default('warmup_ratio')})")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (0: no clipping)")
    g.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and held-out split")
    g.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision (autocast)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward")
    g.add_argument("--logging-steps", type=int, default=1, help="log (and write metrics.jsonl) every N steps")
    g.add_argument("--report-to", default="none",
                   help="also send the training logs to these Trainer integrations: none, tensorboard (event files "
                        "under OUTPUT_DIR/checkpoints/runs; pip install 'tellneo[tensorboard]'), wandb, mlflow, ... "
                        "(comma-separated; all = every installed one)")
    g.add_argument("--save-steps", type=int, default=save_steps, help="save a checkpoint every N steps")
    g.add_argument("--save-total-limit", type=int, default=2, help="checkpoints kept, at least 1 (the newest always)")
    g.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads; 0 = auto: the cores that are idle right now (CPU time of other "
                        "processes sampled from /proc/stat over 0.25 s; waiting OpenMP threads slow every op down "
                        "on busy cores), recorded in summary.json; give N for runs that must be "
                        "bitwise-reproducible across machine loads (at most 4 per CPU core)")


def add_lora_flags(g: argparse._ArgumentGroup, *, defaults: Any = None, alpha_note: str = "") -> None:
    """``--lora-r``, ``--lora-alpha``, ``--lora-dropout``, ``--lora-variant``, ``--no-fused-lora``, all defaulting
    to None = the recipe's settings (``defaults``, a LoraSettings shown in the help; None: "from --preset")."""
    from tellneo.recipes.lora import LORA_VARIANTS

    def default(name: str) -> str:
        return f"default: {getattr(defaults, name)}" if defaults is not None else "default: from --preset"

    g.add_argument("--lora-r", type=int, help=f"LoRA rank ({default('r')})")
    g.add_argument("--lora-alpha", type=float, help=f"LoRA alpha ({default('alpha')}{alpha_note})")
    g.add_argument("--lora-dropout", type=float, help=f"LoRA dropout ({default('dropout')})")
    g.add_argument("--lora-variant", choices=LORA_VARIANTS,
                   help="lora: plain LoRA, scaling alpha/r (the default); rslora: rank-stabilised LoRA, scaling "
                        "alpha/sqrt(r); dora: weight-decomposed LoRA (a learned magnitude per output feature; runs "
                        "PEFT's own forward, named in the patch report); pissa: A and B initialised from the "
                        "principal singular vectors of each weight, the base keeping the residual (PEFT's "
                        "init_lora_weights='pissa')")
    g.add_argument("--no-fused-lora", action="store_true",
                   help="run PEFT's own LoRA forward instead of tellneo's fused lora_linear")


def lora_changes(args: argparse.Namespace) -> dict[str, Any]:
    """The LoraSettings fields the flags of :func:`add_lora_flags` set (None: left to the recipe)."""
    return dict(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, variant=args.lora_variant,
                patch=False if args.no_fused_lora else None)


def add_output_flags(p: argparse.ArgumentParser, default_dir: str) -> None:
    """The "output" group: ``--output-dir``, the run-directory and save flags, ``--quiet``."""
    from pathlib import Path

    g = p.add_argument_group("output")
    g.add_argument("--output-dir", type=Path, default=Path(default_dir), help="run directory")
    add_run_dir_flags(g)
    add_save_flags(g)
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def run_command(args: argparse.Namespace, build: Any, run: Any) -> dict[str, Any]:
    """Build a recipe config from the flags (``build(args)``), set the thread count and ``run`` it with the
    run-control flags; a RecipeError becomes the CLI's one-line UserError. Returns the summary."""
    with recipe_errors():
        cfg = build(args)
        apply_threads(args.threads)
        return run(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet,
                   report_to=args.report_to)


def add_run_dir_flags(g: argparse._ArgumentGroup) -> None:
    """``--resume`` and ``--overwrite``, the two ways to reuse a run directory (:mod:`tellneo.recipes.run_dir`)."""
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --output-dir from its last readable checkpoint (refused, naming the "
                        "change, when the configuration or a data file's contents changed)")
    g.add_argument("--overwrite", action="store_true",
                   help="discard a previous run in --output-dir: its outputs are deleted before anything new is "
                        "written (a run directory is locked while a run uses it)")


def add_save_flags(g: argparse._ArgumentGroup) -> None:
    """``--save-merged``, ``--merged-dtype``, ``--save-gguf`` (see :mod:`tellneo.recipes.outputs`)."""
    from tellneo._names import MERGED_DTYPE_NAMES  # the CLI's flags must not import torch

    g.add_argument("--save-merged", action="store_true",
                   help="also save OUTPUT_DIR/merged: the model with the LoRA adapter merged in, a plain HF "
                        "directory (lora mode; --mode full saves the whole model anyway)")
    g.add_argument("--merged-dtype", default="fp32", choices=MERGED_DTYPE_NAMES,
                   help="dtype of the merged model and of the GGUF file")
    g.add_argument("--save-gguf", action="store_true",
                   help="also save OUTPUT_DIR/model.gguf: the merged (or fully trained) model with its tokenizer "
                        "as one GGUF file for llama.cpp-based tools (Llama-architecture models; "
                        "fp32/bf16/fp16 as --merged-dtype)")


def save_options(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields of :func:`add_save_flags`."""
    return dict(save_merged=args.save_merged, merged_dtype=args.merged_dtype, save_gguf=args.save_gguf)


def train_settings(args: argparse.Namespace, **overrides: Any) -> Any:
    """The TrainSettings of the flags of :func:`add_train_flags` (None fields: the recipe's)."""
    from tellneo.recipes.training import TrainSettings

    values = dict(
        batch_size=args.batch_size, grad_accum=args.grad_accum, max_steps=args.max_steps, epochs=args.epochs,
        learning_rate=args.learning_rate, lr_scheduler=args.lr_scheduler, warmup_ratio=args.warmup_ratio,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, seed=args.seed, bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing, logging_steps=args.logging_steps,
        save_steps=args.save_steps, save_total_limit=args.save_total_limit,
    )
    values.update(overrides)
    return TrainSettings(**values)


def print_result(summary: dict[str, Any], output_dir: Any, lines: list[str]) -> None:
    """Print a finished run (main process only): the summary table, the recipe's own ``lines``, the machine's
    load and what was written into ``output_dir``."""
    from pathlib import Path

    if not summary["main_process"]:
        return
    print()
    print(summary["table"])
    print()
    for line in lines:
        print(line)
    if summary.get("train_peak_mb") is not None:
        print(f"training-phase peak: {summary['train_peak_mb']:.1f} MB ({summary['train_peak_method']}) above "
              f"{summary['train_baseline_mb']:.1f} MB in use when training began")
    m0, m1 = summary["machine_at_start"], summary["machine_at_end"]
    print(f"machine: {m0['torch_threads']} torch thread(s) on {m0['cpu_cores']} cores ({m0['busy_cores']} busy "
          f"with other work at the start), load average "
          f"{m0['load_avg_1min']} at the start and {m1['load_avg_1min']} at the end")
    print(f"wrote {output_dir}/summary.md, summary.json, metrics.jsonl, loss_curve.png, "
          + ", ".join(f"{Path(p).name}{'' if p.endswith('.gguf') else '/'}" for p in summary["outputs"].values()))


def apply_threads(requested: int) -> int:
    """Set torch's CPU thread count (``requested`` > 0, or auto for 0: :func:`tellneo._cpu.auto_threads`) and
    return it."""
    import logging

    import torch

    from tellneo._cpu import allowed_cores, auto_threads
    from tellneo.recipes.training import MAX_THREADS_PER_CORE

    cores = len(allowed_cores())
    if not 0 <= requested <= MAX_THREADS_PER_CORE * cores:
        from tellneo.commands._common import UserError

        raise UserError(f"--threads must be in [0, {MAX_THREADS_PER_CORE * cores}] ({MAX_THREADS_PER_CORE} per CPU "
                        f"core, {cores} cores here), got {requested}")
    if requested == 0:
        requested, busy = auto_threads(torch.get_num_threads())
        logging.getLogger("tellneo").debug(f"--threads 0: {requested} thread(s); other work keeps {busy} cores busy")
    torch.set_num_threads(requested)
    return requested


@contextmanager
def recipe_errors() -> Iterator[None]:
    """Re-raise a recipe's configuration/data errors as the CLI's UserError (one line, exit status 2)."""
    from tellneo.commands._common import UserError
    from tellneo.recipes.errors import RecipeError

    # transformers/peft deprecation chatter about their own internals is not actionable for a CLI user
    warnings.filterwarnings("ignore", message=".*deprecated and will be removed in v6.*", category=FutureWarning)
    # peft looks for a config.json beside a GGUF-loaded base model to check the vocabulary; there is none
    warnings.filterwarnings("ignore", message="Could not find a config file in .*", category=UserWarning)
    try:
        yield
    except RecipeError as exc:
        raise UserError(str(exc)) from None
