"""``tellneo mix``: TELL-mix task data into general data, pack it, and write training shards.

With no data flags it runs the demo on real text that needs no download: the general stream is built from
Python's own documentation (``tellneo.data.corpora``) and the task is the generated ``date_iso`` task.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np


def add_parser(sub: argparse._SubParsersAction) -> None:
    from tellneo.commands._common import HelpFormatter

    p = sub.add_parser(
        "mix",
        help="mix task samples into general data (TELL), pack into rows, write shards + stats",
        description="Tokenize task and general instruction data with the model's chat template, put the anchor "
                    "prompt in front of every task prompt, spread the task samples through the general stream "
                    "(TELL's extensive shuffle), pack into rows with the C++ mixer and write .npz shards, "
                    "stats.json and dispersion.png. Without --general/--task it runs a demo on Python's own "
                    "documentation and the generated date_iso task.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--general", type=Path, help="general data jsonl (prompt/response, messages or text records); "
                                                "default: pairs built from Python's documentation")
    p.add_argument("--task", type=Path, help="task data jsonl; default: generated task --task-name")
    p.add_argument("--task-name", default="date_iso", help="generated task used when --task is not given")
    p.add_argument("--task-samples", type=int, default=64, help="task samples to generate (without --task)")
    p.add_argument("--model", type=Path, help="GGUF file or HF model directory whose tokenizer to use; default: "
                                              "the embedded SmolLM2-135M-Instruct")
    anchor = p.add_mutually_exclusive_group()
    anchor.add_argument("--anchor", help="anchor prompt text (default: the generated task's anchor prompt)")
    anchor.add_argument("--anchor-file", type=Path, help="read the anchor prompt from this file")
    anchor.add_argument("--no-anchor", action="store_true", help="no anchor prompt (ablation)")
    p.add_argument("--task-ratio", type=float, default=0.05, help="fraction of samples that are task samples")
    p.add_argument("--spread", default="stratified", choices=["stratified", "random", "end"],
                   help="how task samples are placed in the stream (stratified = TELL's extensive shuffle)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per packed row")
    p.add_argument("--strategy", default="bfd", choices=["bfd", "ffd", "wrap"], help="packing strategy")
    p.add_argument("--window", type=int, default=512,
                   help="pack windows of this many samples independently to keep the mixed order (0 = global)")
    p.add_argument("--overlong", default="truncate", choices=["error", "truncate", "split"],
                   help="what to do with samples longer than --seq-len (stats.json counts the "
                                                            "truncated ones and those left without a trained token)")
    p.add_argument("--seed", type=int, default=0, help="seed of the mixing order")
    p.add_argument("--epochs", type=int, default=1, help="epochs to write (each a different order)")
    p.add_argument("--rows-per-shard", type=int, default=1024, help="rows per .npz shard")
    p.add_argument("--output-dir", type=Path, default=Path("outputs/mix"), help="where shards and stats go")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a different run in --output-dir (its shards and stats are deleted first); a rerun "
                        "of the same flags on the same file contents reuses the shards already written")
    p.set_defaults(run=run)


def _check_args(args: argparse.Namespace) -> None:
    from tellneo.commands._common import UserError

    if not 0 < args.task_ratio < 1:
        raise UserError(f"--task-ratio must be in (0, 1), got {args.task_ratio}")
    for flag in ("seq_len", "task_samples", "epochs", "rows_per_shard"):
        if getattr(args, flag) <= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.window < 0:
        raise UserError(f"--window must be >= 0, got {args.window}")
    from tellneo.data.planning import MAX_SEQ_LEN

    if args.seq_len > MAX_SEQ_LEN:
        raise UserError(f"--seq-len must be at most {MAX_SEQ_LEN}, got {args.seq_len}")
    for flag in ("general", "task", "anchor_file"):  # every path before anything is written or loaded
        path = getattr(args, flag)
        if path is not None and not path.is_file():
            raise UserError(f"--{flag.replace('_', '-')} {path}: no such file")
    from tellneo.models import check_model_path

    check_model_path(args.model)


# what a mix run writes besides its manifest: deleted before a new run's manifest is written
OUTPUTS = ("epoch-*", "stats.json", "dispersion.png")


def _config(args: argparse.Namespace) -> dict[str, Any]:
    """The run's identity: every flag, and the contents (sha256) of the input files, so that a changed file is a
    different run rather than a reason to reuse old shards."""
    from tellneo.io import file_sha256

    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
              if k not in ("run", "verbose", "overwrite")}
    config["sha256"] = {flag: file_sha256(getattr(args, flag)) for flag in ("general", "task", "anchor_file")}
    return config


def _trained_per_sample(plan: Any, store: Any) -> np.ndarray:
    """Trained tokens of each sample as written: the labelled tokens its pieces keep (truncation drops the rest),
    less each piece's first token, which the emit never trains (nothing inside the row predicts it)."""
    labelled = (store.labels != -100) if store.labels is not None else np.ones(store.num_tokens, dtype=bool)
    cum = np.concatenate([[0], np.cumsum(labelled)])
    first = store.offsets[plan.sample] + plan.start
    per_piece = cum[first + plan.length] - cum[first] - labelled[first]
    return np.bincount(plan.sample, weights=per_piece, minlength=len(store)).astype(np.int64)


def _check_lengths(store: Any, what: str, args: argparse.Namespace) -> None:
    """One-line errors for samples that cannot be packed into ``--seq-len`` under ``--overlong``."""
    from tellneo.commands._common import UserError

    fits = store.lengths <= args.seq_len
    if args.overlong == "error" and not fits.all():
        i = int(np.argmax(~fits))
        raise UserError(f"{what} sample {i} has {int(store.lengths[i])} tokens, more than --seq-len {args.seq_len} "
                        "(--overlong error): raise --seq-len or pass --overlong truncate or split")
    if args.overlong == "truncate" and not fits.any():
        raise UserError(f"every {what} sample is longer than --seq-len {args.seq_len} (the shortest has "
                        f"{int(store.lengths.min())} tokens), so --overlong truncate would cut all of them: raise "
                        "--seq-len or pass --overlong split")


def _load_data(args: argparse.Namespace, progress: Any) -> tuple[list[dict], list[dict], str, dict[str, str]]:
    from tellneo.data.chat import read_jsonl, read_text
    from tellneo.data.corpora import corpus_fingerprint, python_docs_pairs
    from tellneo.data.tasks import get_task

    if args.general is not None:
        general = read_jsonl(args.general)
        general_src = str(args.general)
    else:
        progress.set_description("building general data from Python's documentation")
        general = python_docs_pairs()
        general_src = f"python-docs (PSF license), fingerprint {corpus_fingerprint(general)}"
    anchor = ""
    if args.task is not None:
        task = read_jsonl(args.task)
        task_src = str(args.task)
    else:
        t = get_task(args.task_name)
        task = t.pairs(args.task_samples, seed=args.seed, split="train")
        task_src = f"generated task {t.name} ({args.task_samples} train samples, seed {args.seed})"
        anchor = t.anchor_prompt
    if args.anchor is not None:
        anchor = args.anchor
    elif args.anchor_file is not None:
        anchor = read_text(args.anchor_file, "--anchor-file")
    if args.no_anchor:
        anchor = ""
    return general, task, anchor, {"general": general_src, "task": task_src}


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from tellneo.data import PackedDataset, tell_mix_store
    from tellneo.data.chat import tokenize_records
    from tellneo.io import atomic_save_npz, atomic_write_text, prepare_run_dir, to_json
    from tellneo.models import load_causal_lm

    _check_args(args)
    out_dir, resumed = prepare_run_dir(args.output_dir, _config(args), overwrite=args.overwrite, outputs=OUTPUTS)
    timings: dict[str, float] = {}
    with tqdm(total=4 + args.epochs, desc="tellneo mix", unit="stage") as progress:
        t0 = time.perf_counter()
        general_recs, task_recs, anchor, sources = _load_data(args, progress)
        progress.update(1)
        progress.set_description("loading tokenizer")
        _, tokenizer = load_causal_lm(args.model, tokenizer_only=True)
        progress.update(1)
        timings["load_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        progress.set_description(f"tokenizing {len(general_recs)} general + {len(task_recs)} task records")
        general = tokenize_records(general_recs, tokenizer, vocab_size=len(tokenizer),
                                   source=f"--general {args.general}" if args.general else "general data")
        task = tokenize_records(task_recs, tokenizer, prompt_prefix=anchor, vocab_size=len(tokenizer),
                                source=f"--task {args.task}" if args.task else "task data")
        _check_lengths(general, "general", args)
        _check_lengths(task, "task (with its anchor prompt)" if anchor else "task", args)
        progress.update(1)
        timings["tokenize_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        progress.set_description("mixing and planning")

        def source(epoch: int):
            return tell_mix_store(task, general, anchor_ids=[], task_ratio=args.task_ratio, seed=args.seed,
                                  epoch=epoch, spread=args.spread)

        dataset = PackedDataset(source, args.seq_len, strategy=args.strategy, overlong=args.overlong,
                                window=args.window or None, shuffle=False, pad_id=tokenizer.pad_token_id or 0)
        progress.update(1)
        timings["plan_s"] = time.perf_counter() - t0

        epochs_stats = []
        t0 = time.perf_counter()
        for epoch in range(args.epochs):
            progress.set_description(f"writing epoch {epoch}")
            dataset.set_epoch(epoch)
            p, is_task = dataset.plan, dataset.is_task
            written = skipped = 0
            for first in range(0, len(dataset), args.rows_per_shard):
                path = out_dir / f"epoch-{epoch:03d}" / f"shard-{first // args.rows_per_shard:05d}.npz"
                if resumed and path.exists():
                    skipped += 1
                    continue
                rows = list(range(first, min(len(dataset), first + args.rows_per_shard)))
                batch = dataset.batch(rows)
                atomic_save_npz(path, input_ids=batch["input_ids"].numpy().astype(np.int32),
                                labels=batch["labels"].numpy().astype(np.int32),
                                position_ids=batch["position_ids"].numpy().astype(np.int32))
                written += 1
            task_per_row = np.bincount(p.row, weights=is_task[p.sample], minlength=p.num_rows)[dataset.row_order]
            store = dataset.store
            written_trained = _trained_per_sample(p, store)
            placed = np.bincount(p.sample, weights=p.length, minlength=len(store)).astype(np.int64)
            epochs_stats.append({
                "epoch": epoch, "rows": p.num_rows, "samples": len(store), "task_samples": int(is_task.sum()),
                "tokens": p.num_tokens, "fill_rate": round(p.fill_rate, 5), "shards_written": written,
                "shards_reused": skipped,
                "trained_tokens": int(written_trained.sum()),  # what the shards hold (labels != -100)
                "truncated_samples": int(np.count_nonzero(placed < store.lengths)),
                "samples_without_trained_tokens": int(np.count_nonzero(written_trained == 0)),
                "task_samples_without_trained_tokens": int(np.count_nonzero((written_trained == 0) & is_task)),
            })
            if epoch == 0:
                _plot_dispersion(task_per_row, out_dir / "dispersion.png", args)
            progress.update(1)
        timings["emit_write_s"] = time.perf_counter() - t0

    stats = {"sources": sources, "anchor_prompt_chars": len(anchor), "seq_len": args.seq_len,
             "task_ratio": args.task_ratio, "spread": args.spread, "strategy": args.strategy,
             "general_records": len(general_recs), "task_records": len(task_recs),
             "general_tokens": general.num_tokens, "task_tokens_per_pass": task.num_tokens,
             "epochs": epochs_stats, "timings": {k: round(v, 3) for k, v in timings.items()}}
    atomic_write_text(out_dir / "stats.json", to_json(stats, indent=2))
    _print_summary(stats, out_dir)
    return 0


def _plot_dispersion(task_per_row: np.ndarray, path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tellneo.io import atomic_save_figure

    cum = np.cumsum(task_per_row)
    rows = np.arange(1, cum.size + 1)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(rows, cum, label=f"task samples so far ({args.spread})")
    ax.plot(rows, rows * cum[-1] / cum.size, "--", label="proportional share", alpha=0.7)
    ax.set_xlabel("packed row")
    ax.set_ylabel("cumulative task samples")
    ax.set_title(f"TELL dispersion: {int(cum[-1])} task samples in {cum.size} rows of {args.seq_len} tokens")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_save_figure(fig, path)


def _print_summary(stats: dict[str, Any], out_dir: Path) -> None:
    print(f"\ngeneral: {stats['sources']['general']}")
    print(f"task:    {stats['sources']['task']} (anchor prompt: {stats['anchor_prompt_chars']} characters)")
    print(f"{'epoch':>5} {'samples':>8} {'task':>6} {'rows':>6} {'tokens':>10} {'fill':>7} {'shards':>7}")
    for e in stats["epochs"]:
        print(f"{e['epoch']:>5} {e['samples']:>8} {e['task_samples']:>6} {e['rows']:>6} {e['tokens']:>10} "
              f"{e['fill_rate']:>7.4f} {e['shards_written'] + e['shards_reused']:>7}")
    for e in stats["epochs"]:
        if e["truncated_samples"] or e["samples_without_trained_tokens"]:
            print(f"warning: epoch {e['epoch']}: {e['truncated_samples']} samples longer than --seq-len "
                  f"{stats['seq_len']} were truncated; {e['samples_without_trained_tokens']} samples "
                  f"({e['task_samples_without_trained_tokens']} task) keep no trained token (use --overlong split "
                  "or raise --seq-len)")
    print("timings: " + ", ".join(f"{k} {v:.2f}" for k, v in stats["timings"].items()))
    print(f"wrote {out_dir}/stats.json, {out_dir}/dispersion.png and the shards under {out_dir}/epoch-*/")
