"""``tellneo tell``: TELL fine-tuning on a low-resource task, reporting held-out task accuracy before and after."""

from __future__ import annotations

import argparse
from pathlib import Path

from tellneo.commands._config import add_config_flag
from tellneo.commands._train_flags import (
    add_run_dir_flags,
    add_save_flags,
    add_train_flags,
    apply_threads,
    recipe_errors,
    save_options,
    train_settings,
)


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
                    "TELL proper uses far more general data: raise --general-samples and lower --task-ratio). "
                    "--method sft trains on the task samples alone (the baseline); --no-anchor and --spread "
                    "end/random are TELL's ablations.",
        formatter_class=HelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", type=Path, help="GGUF file or HF model directory (default: the embedded "
                                               "SmolLM2-135M-Instruct)")
    g.add_argument("--mode", default="lora", choices=["lora", "full"], help="LoRA adapters or full fine-tuning")
    g.add_argument("--lora-r", type=int, default=16, help="LoRA rank")
    g.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA alpha")
    g.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout")
    g.add_argument("--no-fused-lora", action="store_true", help="run PEFT's own LoRA forward instead of tellneo's")

    g = p.add_argument_group("task")
    g.add_argument("--task", default="date_iso", help="generated task (used without --task-file)")
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
    g.add_argument("--max-new-tokens", type=int, default=16, help="greedy tokens generated per test prompt")
    g.add_argument("--eval-batch-size", type=int, default=20, help="test prompts generated together")

    g = p.add_argument_group("mixing")
    g.add_argument("--method", default="tell", choices=["tell", "sft"],
                   help="tell: task samples mixed into general data; sft: task samples alone (baseline; no anchor "
                        "unless --anchor/--anchor-file is given)")
    g.add_argument("--general", type=Path, help="general instruction data: jsonl, parquet, arrow or a datasets "
                                                "save_to_disk directory (default: pairs from Python's documentation)")
    g.add_argument("--general-samples", type=int, default=48, help="general records used (0 = all)")
    g.add_argument("--task-ratio", type=float, default=0.5, help="fraction of the mixed samples that are task "
                                                                  "samples (they repeat as needed)")
    g.add_argument("--spread", default="stratified", choices=["stratified", "random", "end"],
                   help="placement of task samples: stratified = TELL's extensive shuffle; end = task block last "
                        "(no-shuffle ablation); random = plain random mix")
    g.add_argument("--seq-len", type=int, default=512, help="tokens per packed row")
    g.add_argument("--window", type=int, default=64, help="samples packed together while keeping the mixed order "
                                                          "(0 = one global packing)")

    add_train_flags(p, learning_rate=1e-3, max_steps=-1, lr_help="peak learning rate")
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", type=Path, default=Path("outputs/tell"), help="run directory")
    add_run_dir_flags(g)
    add_save_flags(g)
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_flag(p, "tell", _manifest_flags)
    p.set_defaults(run=run)


def _manifest_flags(config: dict) -> dict:
    """Manifest entries whose flag differs in name or meaning (see :mod:`tellneo.commands._config`)."""
    flags = {"no_fused_lora": not config.pop("fused_lora", True), "no_anchor": config.pop("use_anchor", None) is False}
    if "general_samples" in config:
        flags["general_samples"] = config.pop("general_samples") or 0
    return flags


def run(args: argparse.Namespace) -> int:
    from tellneo.data.chat import read_text
    from tellneo.recipes.tell import TellConfig, run_tell

    anchor = args.anchor
    if args.anchor_file is not None:
        anchor = read_text(args.anchor_file, "--anchor-file")
    use_anchor = False if args.no_anchor else (True if anchor is not None else None)
    with recipe_errors():
        cfg = TellConfig(
            model=str(args.model) if args.model else None, task=args.task,
            task_file=str(args.task_file) if args.task_file else None,
            test_file=str(args.test_file) if args.test_file else None, task_samples=args.task_samples,
            test_samples=args.test_samples, method=args.method, use_anchor=use_anchor, anchor=anchor,
            spread=args.spread, task_ratio=args.task_ratio, general=str(args.general) if args.general else None,
            general_samples=args.general_samples or None, seq_len=args.seq_len, window=args.window,
            mode=args.mode, lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
            fused_lora=not args.no_fused_lora, max_new_tokens=args.max_new_tokens,
            eval_batch_size=args.eval_batch_size, **save_options(args), output_dir=str(args.output_dir),
            train=train_settings(args),
        )
        apply_threads(args.threads)
        summary = run_tell(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet,
                              report_to=args.report_to)
    if not summary["main_process"]:
        return 0
    print()
    print(summary["table"])
    e, t = summary["exposure"], summary["timings"]
    print(f"\narm: {summary['arm']}; {summary['steps']} steps of {summary['global_batch_rows']} x "
          f"{summary['seq_len']} tokens; task samples seen {e['task_samples']} ({e['task_tokens']:,} task tokens, "
          f"{e['task_trained_tokens']:,} trained) of {e['all_tokens']:,} tokens")
    print(f"time: {t['total_s']:.0f} s in all (training {t['train_s']:.0f} s, accuracy "
          f"{t['eval_before_s'] + t['eval_after_s']:.0f} s)")
    m0, m1 = summary["machine_at_start"], summary["machine_at_end"]
    print(f"machine: {m0['torch_threads']} torch thread(s) on {m0['cpu_cores']} cores ({m0['busy_cores']} busy "
          f"with other work at the start), load average "
          f"{m0['load_avg_1min']} at the start and {m1['load_avg_1min']} at the end")
    print(f"wrote {args.output_dir}/summary.md, summary.json, metrics.jsonl, loss_curve.png, "
          + ", ".join(f"{Path(p).name}{'' if p.endswith('.gguf') else '/'}" for p in summary["outputs"].values()))
    return 0
