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
        description="Token-Efficient Leverage Learning (arXiv 2404.00914). Each of the N task samples gets an "
                    "anchor prompt in front and is shown k times (--exposures, default 8), spread evenly through a "
                    "much larger stream of general instruction data (TELL's extensive shuffle): r general samples "
                    "per task occurrence (--general-per-task, default 4), drawn at random from the whole --general "
                    "pool (default: mixed, ~53k Python-docs + synthetic pairs). The mix is packed in that order and "
                    "trained with LoRA (or all weights) and tellneo's fused CE loss; greedy answers to held-out test "
                    "prompts are scored before and after (exact match, plus JSON validity and per-field accuracy "
                    "for json_record). --method sft is the baseline: k passes over the task samples alone; "
                    "--exposures 4 8 16 32 with it picks the pass count on the task's dev split. --with-anchor "
                    "gives SFT the anchor; --no-anchor, --neutral-anchor and --spread end/random are TELL's "
                    "ablations. --exposures 0 is the former compute-matched mix (the first --general-samples "
                    "records once each, task slots by --task-ratio). With no arguments: the embedded "
                    "SmolLM2-135M-Instruct on the generated date_iso task (16 samples, each shown 8 times among "
                    "512 general samples: about 60k training tokens; 40 test prompts).",
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
    g.add_argument("--task-samples", type=int, default=16, help="N: task samples used for training")
    g.add_argument("--test-samples", type=int, default=40, help="held-out test prompts scored before and after")
    anchor = g.add_mutually_exclusive_group()
    anchor.add_argument("--anchor", help="anchor prompt text (default: the generated task's anchor prompt)")
    anchor.add_argument("--anchor-file", type=Path, help="read the anchor prompt from this file")
    anchor.add_argument("--no-anchor", action="store_true", help="no anchor prompt (ablation)")
    g.add_argument("--with-anchor", action="store_true",
                   help="--method sft: put the task's anchor prompt in front of every train and test prompt (the "
                        "SFT+anchor baseline; TELL always has it unless --no-anchor)")
    g.add_argument("--neutral-anchor", action="store_true",
                   help="replace the anchor by a fixed neutral text of the same length with no task words or "
                        "instructions (ablation: the anchor as a marker rather than an instruction)")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help="greedy tokens generated per test prompt (default: the task's own: date_iso 16, "
                        "json_record 64; 16 for --task-file)")
    g.add_argument("--eval-batch-size", type=int, default=20, help="test prompts generated together")

    g = p.add_argument_group("mixing")
    g.add_argument("--method", default="tell", choices=TELL_METHODS,
                   help="tell: task samples mixed into general data; sft: task samples alone (baseline; no anchor "
                        "unless --anchor/--anchor-file is given)")
    g.add_argument("--general", default="mixed",
                   help="general instruction data: a name (python-docs: 3,072 pairs from Python's documentation, "
                        "PSF license; synthetic: 50,000 generated instruction/answer pairs; mixed: both) or a jsonl, "
                        "parquet, arrow or datasets save_to_disk path")
    g.add_argument("--exposures", type=int, nargs="+", default=[8], metavar="K",
                   help="k: times each task sample is shown. TELL: the mix holds exactly N*k task samples and "
                        "N*k*r general samples drawn at random (seeded by --seed) from the whole --general pool; "
                        "SFT: k passes over the task samples. Several values (SFT only), e.g. 4 8 16 32: one run "
                        "of the largest, scored on --dev-samples dev prompts after each, the best kept. 0: the "
                        "former mix (the first --general-samples records; SFT: --epochs)")
    g.add_argument("--general-per-task", type=float, default=None,
                   help="r: general samples per task occurrence (default 4 unless --task-ratio is given; the "
                        "paper's general >> task wants r >= 4); refused if it disagrees with --task-ratio")
    g.add_argument("--task-ratio", type=float, default=None,
                   help="the other spelling of r: fraction of the mixed samples that are task samples, 1/(1+r)")
    g.add_argument("--general-samples", type=int, default=48,
                   help="--exposures 0 only: the first G general records used (0 = all)")
    g.add_argument("--dev-samples", type=int, default=50,
                   help="dev prompts (the task's dev split, disjoint from train and test) scored at each pass "
                        "count of several --exposures")
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
    use_anchor = config.pop("use_anchor", None)
    flags = {**lora_flags(config), "no_anchor": use_anchor is False, "with_anchor": use_anchor is True}
    exposures = config.pop("exposures", None)  # absent: a manifest of the former mix
    flags["exposures"] = [0] if exposures is None else exposures if isinstance(exposures, list) else [exposures]
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
    if args.no_anchor and args.with_anchor:
        raise RecipeError("--no-anchor and --with-anchor contradict each other: give one")
    use_anchor = False if args.no_anchor else (True if anchor is not None or args.with_anchor else None)
    exposures: Any = [int(k) for k in args.exposures]
    if 0 in exposures and len(exposures) > 1:
        raise RecipeError(f"--exposures 0 (the former mix) cannot be combined with other values, got {exposures}")
    exposures = None if exposures == [0] else exposures[0] if len(exposures) == 1 else tuple(exposures)
    try:
        lora = LoraSettings().replace(**lora_changes(args))
    except ValueError as exc:
        raise RecipeError(str(exc)) from None
    return TellConfig(
        model=str(args.model) if args.model else None, task=args.task,
        task_file=str(args.task_file) if args.task_file else None,
        test_file=str(args.test_file) if args.test_file else None, task_samples=args.task_samples,
        test_samples=args.test_samples, method=args.method, use_anchor=use_anchor, anchor=anchor,
        spread=args.spread, task_ratio=args.task_ratio, exposures=exposures, general_per_task=args.general_per_task,
        general_reuse=args.general_reuse, general=str(args.general) if args.general else None,
        dev_samples=args.dev_samples, neutral_anchor=args.neutral_anchor,
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
