"""``tellneo tell``: TELL fine-tuning on a low-resource task, reporting held-out task accuracy before and after."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tellneo.commands._config import add_config_flag, lora_flags
from tellneo.commands._train_flags import (
    add_lora_flags,
    add_output_flags,
    add_train_flags,
    lora_changes,
    print_result,
    run_command,
    save_options,
    train_settings,
)
from tellneo.data.tasks import TASK_NAMES
from tellneo.recipes.lora import LoraSettings
from tellneo.recipes.settings import MODES, TELL_METHODS, TELL_SPREADS, TELL_TRAIN_DEFAULTS


def add_parser(sub: argparse._SubParsersAction) -> None:
    from tellneo.commands._common import HelpFormatter

    p = sub.add_parser(
        "tell",
        help="TELL: learn a task from few samples (anchor prompt + shuffle into general data); accuracy before/after",
        description="Token-Efficient Leverage Learning. The task samples get an anchor prompt in front and are "
                    "spread evenly through a stream of general instruction data (TELL's extensive shuffle), packed "
                    "in that order and trained with LoRA (or all weights) and tellneo's fused CE loss. Exact-match "
                    "accuracy of greedy answers on a held-out test split is measured before and after. With no "
                    "arguments: the embedded SmolLM2-135M-Instruct, the generated date_iso task (English dates -> "
                    "YYYY-MM-DD; 32 training samples, 40 held-out test prompts) and 48 general pairs from Python's "
                    "documentation, one epoch at a 1:1 task ratio (a demo sized for a few minutes on 2 CPU cores; "
                    "TELL proper uses far more general data: give --exposures k and --general-per-task r, and each "
                    "task sample is shown k times among N*k*r general samples drawn at random from the pool). "
                    "--method sft trains on the task samples alone (the baseline); --no-anchor and --spread "
                    "end/random are TELL's ablations.",
        formatter_class=HelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", type=Path, help="GGUF file or HF model directory (default: the embedded "
                                               "SmolLM2-135M-Instruct)")
    g.add_argument("--mode", default="lora", choices=MODES, help="LoRA adapters or full fine-tuning")
    add_lora_flags(g, defaults=LoraSettings())

    g = p.add_argument_group("task")
    g.add_argument("--task", default="date_iso", metavar="{" + ",".join(TASK_NAMES) + "}",
                   help="generated task (used without --task-file): date_iso (English date -> ISO 8601, the smoke "
                        "test) or json_record (invoice note with distractors -> JSON object); an unknown name is "
                        "refused by the recipe, listing the tasks")
    g.add_argument("--task-file", type=Path, help="task pairs (prompt/response records; jsonl, parquet, "
                                                   "arrow or a datasets directory) instead of a generated task")
    g.add_argument("--test-file", type=Path, help="held-out test pairs, same formats (default: the last "
                                                   "--test-samples records of --task-file)")
    g.add_argument("--task-samples", type=int, default=32, help="N: task samples used for training")
    g.add_argument("--test-samples", type=int, default=40, help="held-out test prompts scored before and after")
    anchor = g.add_mutually_exclusive_group()
    anchor.add_argument("--anchor", help="anchor prompt text (default: the generated task's anchor prompt)")
    anchor.add_argument("--anchor-file", type=Path, help="read the anchor prompt from this file")
    anchor.add_argument("--no-anchor", action="store_true", help="no anchor prompt (ablation)")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help="greedy tokens generated per test prompt (default: the task's own: date_iso 16, "
                        "json_record 64; 16 for --task-file)")
    g.add_argument("--eval-batch-size", type=int, default=20, help="test prompts generated together")

    g = p.add_argument_group("mixing")
    g.add_argument("--method", default="tell", choices=TELL_METHODS,
                   help="tell: task samples mixed into general data; sft: task samples alone (baseline; no anchor "
                        "unless --anchor/--anchor-file is given)")
    g.add_argument("--general", type=Path, help="general instruction data: a name (python-docs, synthetic, mixed) or "
                                                "a jsonl, parquet, arrow or datasets save_to_disk path (default: "
                                                "python-docs, pairs from Python's documentation)")
    g.add_argument("--general-samples", type=int, default=48, help="general records used (0 = all)")
    g.add_argument("--task-ratio", type=float, default=0.5, help="fraction of the mixed samples that are task "
                                                                  "samples (they repeat as needed); the other "
                                                                  "spelling of --general-per-task r: 1/(1+r)")
    g.add_argument("--exposures", type=int, default=None,
                   help="k: times each task sample is shown in the epoch of the mix; the mix then holds exactly "
                        "N*k task samples and N*k*r general samples drawn at random (seeded by --seed) from the "
                        "whole --general pool, --general-samples unused (default: unset, the ratio mix above, "
                        "where the first --general-samples records cap the task samples shown)")
    g.add_argument("--general-per-task", type=float, default=None,
                   help="r: general samples per task occurrence (default: from --task-ratio, 1 at 0.5; the "
                        "paper's general >> task wants r >= 4); refused if it disagrees with a --task-ratio given")
    g.add_argument("--general-reuse", action=argparse.BooleanOptionalAction, default=True,
                   help="with --exposures, when the pool has fewer than N*k*r samples that fit --seq-len: reuse "
                        "them (one log line; counted as general_reused in summary.json), or with "
                        "--no-general-reuse refuse the run")
    g.add_argument("--spread", default="stratified", choices=TELL_SPREADS,
                   help="placement of task samples: stratified = TELL's extensive shuffle; end = task block last "
                        "(no-shuffle ablation); random = plain random mix")
    g.add_argument("--seq-len", type=int, default=512, help="tokens per packed row")
    g.add_argument("--window", type=int, default=64, help="samples packed together while keeping the mixed order "
                                                          "(0 = one global packing)")

    add_train_flags(p, max_steps=-1, defaults=TELL_TRAIN_DEFAULTS)
    add_output_flags(p, "outputs/tell")
    add_config_flag(p, "tell", _manifest_flags)
    p.set_defaults(run=run)


def _manifest_flags(config: dict) -> dict:
    """Manifest entries whose flag differs in name or meaning (see :mod:`tellneo.commands._config`): the ``lora``
    block (or the former flat ``fused_lora``), ``use_anchor``."""
    flags = {**lora_flags(config), "no_anchor": config.pop("use_anchor", None) is False}
    if "fused_lora" in config:  # manifests written before the settings were composed
        flags["no_fused_lora"] = not config.pop("fused_lora")
    if "general_samples" in config:
        flags["general_samples"] = config.pop("general_samples") or 0
    return flags


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`tellneo.recipes.tell.TellConfig` of parsed ``tellneo tell`` flags (flags left unset: the
    recipe's settings). RecipeError for a bad value; DataFileError for an unreadable --anchor-file."""
    from tellneo.data.chat import read_text
    from tellneo.recipes.errors import RecipeError
    from tellneo.recipes.tell import TellConfig

    anchor = args.anchor
    if args.anchor_file is not None:
        anchor = read_text(args.anchor_file, "--anchor-file")
    use_anchor = False if args.no_anchor else (True if anchor is not None else None)
    try:
        lora = LoraSettings().replace(**lora_changes(args))
    except ValueError as exc:
        raise RecipeError(str(exc)) from None
    return TellConfig(
        model=str(args.model) if args.model else None, task=args.task,
        task_file=str(args.task_file) if args.task_file else None,
        test_file=str(args.test_file) if args.test_file else None, task_samples=args.task_samples,
        test_samples=args.test_samples, method=args.method, use_anchor=use_anchor, anchor=anchor,
        spread=args.spread, task_ratio=args.task_ratio, exposures=args.exposures,
        general_per_task=args.general_per_task, general_reuse=args.general_reuse, general=str(args.general) if args.general else None,
        general_samples=args.general_samples or None, seq_len=args.seq_len, window=args.window,
        mode=args.mode, lora=lora, max_new_tokens=args.max_new_tokens, eval_batch_size=args.eval_batch_size,
        **save_options(args), output_dir=str(args.output_dir), train=train_settings(args),
    )


def run(args: argparse.Namespace) -> int:
    from tellneo.recipes.tell import run_tell

    summary = run_command(args, config_from_args, run_tell)
    e, t = summary["exposure"], summary["timings"]
    print_result(summary, args.output_dir, [
        f"arm: {summary['arm']}; {summary['steps']} steps of {summary['global_batch_rows']} x "
        f"{summary['seq_len']} tokens; task samples seen {e['task_samples']} ({e['task_tokens']:,} task tokens, "
        f"{e['task_trained_tokens']:,} trained) of {e['all_tokens']:,} tokens; general samples seen "
        f"{summary['general_samples_shown']} ({summary['general_unique']} distinct, {summary['general_reused']} "
        "reused)",
        f"time: {t['total_s']:.0f} s in all (training {t['train_s']:.0f} s, accuracy "
        f"{t['eval_before_s'] + t['eval_after_s']:.0f} s)"])
    return 0
