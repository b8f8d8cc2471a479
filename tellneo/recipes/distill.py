"""The NEO distillation run behind ``tellneo distill``: load the teacher, build (or load) the student, tokenize and
pack general instruction data, evaluate, train with :class:`tellneo.recipes.neo.KDTrainer`, evaluate again and
write the run directory (the skeleton: :mod:`tellneo.recipes.run`; the directory: :mod:`tellneo.recipes.run_dir`).

``run_distill(DistillConfig(...))`` is the Python entry point; ``tellneo distill`` builds its config from the flags
(:func:`tellneo.commands.distill.config_from_args`), and a preset means the same from both. The arms of the NEO
experiments are configurations of it: ``mode="lora", kd=KDSettings(alpha=0)`` (plain LoRA SFT), ``mode="lora"``
(NEO), ``mode="full"`` (full-parameter KD) and ``mode="full", kd=KDSettings(alpha=0)`` (full-parameter CE).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tellneo.data.planning import MAX_SEQ_LEN
from tellneo.io import file_sha256
from tellneo.recipes.config import accepts_flat_names
from tellneo.recipes.errors import RecipeError
from tellneo.recipes.lora import LoraSettings, attach_lora
from tellneo.recipes.model_parts import float_copy
from tellneo.recipes.neo import build_student, check_compatible, parse_layers
from tellneo.recipes.outputs import (
    OUTPUT_OPTIONS,
    STUDENT_BASE,
    check_gguf_export,
    check_output_options,
    point_adapter_at,
)
from tellneo.recipes.run import RecipeRun, TrainedRun, run_recipe
from tellneo.recipes.settings import MODES, KDSettings, NeoPreset
from tellneo.recipes.settings import PRESETS as PRESET_SETTINGS
from tellneo.recipes.training import TrainSettings

logger = logging.getLogger("tellneo")

__all__ = ["MODES", "PRESETS", "DistillConfig", "get_preset", "load_distilled_student", "run_distill"]

PRESETS = tuple(PRESET_SETTINGS)  # the preset names (the settings: tellneo.recipes.neo.PRESETS)
MIN_EVAL_KEPT = 0.5  # refuse a held-out set that loses more than half its records to --seq-len


def _from_flat_names(flat: dict[str, Any], kwargs: dict[str, Any]) -> None:
    """The keywords of the former flat config (``lora_r=8, alpha=0.9, ...``) as ``lora`` / ``kd`` settings
    resolved against the preset, the way the former config resolved them."""
    preset = get_preset(kwargs.get("preset", "default"))
    lora_names = {"lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "fused_lora": "patch"}
    lora = {lora_names[k]: v for k, v in flat.items() if k in lora_names}
    kd = {k: v for k, v in flat.items() if k not in lora_names}
    try:
        if lora:
            if kwargs.get("lora") is not None:
                raise TypeError("DistillConfig: give lora= or the former lora_r/lora_alpha/lora_dropout/fused_lora")
            kwargs["lora"] = preset.lora_with(**lora)
        if kd:
            if kwargs.get("kd") is not None:
                raise TypeError("DistillConfig: give kd= or the former alpha/temperature/divergence/beta")
            kwargs["kd"] = preset.kd.replace(**kd)
    except ValueError as exc:
        raise RecipeError(str(exc)) from None


@accepts_flat_names(("lora_r", "lora_alpha", "lora_dropout", "fused_lora", "alpha", "temperature", "divergence",
                     "beta"), _from_flat_names)
@dataclass
class DistillConfig:
    """Everything a distillation run depends on (also its manifest: a different config is a different run).

    ``preset`` (:data:`tellneo.recipes.neo.PRESETS`) decides every setting left unset: ``lora`` / ``kd`` given as
    ``None`` are the preset's, and so are the ``None`` fields of ``train`` (learning rate, schedule, warm-up,
    epochs; :meth:`resolve`). ``preset="default"`` is LoRA rank 16, alpha 32, dropout 0.05, KD weight 0.5, forward
    KL, T = 1, lr 1e-3 (a short CPU run); ``preset="neo"`` is :data:`tellneo.recipes.neo.NEO_PRESET` (rank 64,
    alpha 128, dropout 0, lr 2e-4, cosine, 10% warm-up). To change one field of a preset's settings, pass e.g.
    ``lora=NEO_PRESET.lora_with(r=8)``. ``tellneo distill --preset P`` builds the same settings
    (:func:`tellneo.commands.distill.config_from_args`). The former flat keywords (``lora_r``, ``alpha``, ...) are
    still accepted, with a DeprecationWarning.
    """

    teacher: str | None = None  # GGUF file or HF directory; None = the embedded SmolLM2-135M-Instruct
    student: str | None = None  # an existing student (same tokenizer); None = build_student(teacher, layers)
    layers: str = "every_other"
    data: str | None = None  # general data jsonl; None = pairs from Python's documentation
    max_samples: int | None = 1200
    eval_samples: int = 24
    # None = the training seed (the held-out set changes with train.seed); an int fixes the held-out (and
    # validation) records across training seeds and arms
    eval_seed: int | None = None
    validation_samples: int = 0  # > 0: that many more records, disjoint from held-out and train (same eval seed)
    seq_len: int = 512
    mode: str = "lora"  # one of MODES
    preset: str = "default"
    lora: LoraSettings | None = None  # None = the preset's (mode "lora" only)
    kd: KDSettings | None = None  # None = the preset's
    offline_topk: int = 0  # > 0: precompute the teacher's top-k once and train without the teacher
    eval_batch_size: int = 4
    save_merged: bool = False  # also OUTPUT/merged: the adapter merged in (lora mode)
    merged_dtype: str = "fp32"  # dtype of merged/ and model.gguf: fp32, bf16 or fp16
    save_gguf: bool = False  # also OUTPUT/model.gguf (tellneo.export.export_gguf)
    output_dir: str = "outputs/distill"
    train: TrainSettings = field(default_factory=lambda: TrainSettings(max_steps=24))  # None fields: the preset's

    def resolve(self) -> tuple[LoraSettings, KDSettings, TrainSettings]:
        """``(lora, kd, train)`` with everything left unset taken from the preset; RecipeError for a bad config."""
        preset = get_preset(self.preset)
        if self.mode not in MODES:
            raise RecipeError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        lora = self.lora if self.lora is not None else preset.lora
        kd = self.kd if self.kd is not None else preset.kd
        train = self.train.resolve(preset.train_defaults())
        if not 16 <= self.seq_len <= MAX_SEQ_LEN:
            raise RecipeError(f"seq-len must be in [16, {MAX_SEQ_LEN}], got {self.seq_len}")
        if self.eval_samples <= 0:
            raise RecipeError(f"eval-samples must be positive, got {self.eval_samples}")
        if self.validation_samples < 0:
            raise RecipeError(f"validation-samples must be >= 0, got {self.validation_samples}")
        if self.eval_seed is not None and not (isinstance(self.eval_seed, int) and self.eval_seed >= 0):
            raise RecipeError(f"eval-seed must be a non-negative integer or None, got {self.eval_seed!r}")
        if self.offline_topk < 0:
            raise RecipeError(f"offline-topk must be >= 0, got {self.offline_topk}")
        check_output_options(self.merged_dtype)
        return lora, kd, train

    def resolved(self) -> tuple[LoraSettings, KDSettings]:
        """``(lora, kd)`` of :meth:`resolve`."""
        lora, kd, _ = self.resolve()
        return lora, kd

    def manifest(self) -> dict[str, Any]:
        """The run's identity: every setting resolved (so ``preset="neo"`` from Python and ``--preset neo`` from
        the CLI are one run), without where and what to save."""
        lora, kd, train = self.resolve()
        d = asdict(self)
        for name in ("output_dir", *OUTPUT_OPTIONS):  # where and what to save does not change the run
            d.pop(name)
        for name, default in NEW_FIELD_DEFAULTS.items():  # at their defaults: the identity runs had before them
            if d[name] == default:
                d.pop(name)
        d["lora"] = lora.to_dict() if self.mode == "lora" else None
        d["kd"] = asdict(kd)
        d["train"] = train.to_dict()
        d["data_sha256"] = file_sha256(self.data)  # the file's contents: --resume refuses changed data
        return d


# fields added after runs were recorded: left out of the manifest at these values (the split they give is the
# one of runs made before the fields existed), so those runs keep their config hash and can be resumed
NEW_FIELD_DEFAULTS: dict[str, Any] = {"eval_seed": None, "validation_samples": 0}


def split_distill_records(records: Sequence[dict[str, Any]], eval_samples: int, validation_samples: int,
                          seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """``(train, held_out, validation)`` from one seeded permutation of ``records``: its first ``eval_samples``
    positions are the held-out set, the next ``validation_samples`` the validation set, the rest (in their
    original order) the training set. The three are disjoint; the held-out set does not depend on
    ``validation_samples``, and with ``validation_samples=0`` the result is
    :func:`tellneo.recipes.records.split_records` ``(records, eval_samples, seed)`` plus an empty list."""
    from tellneo.recipes.records import split_records

    if validation_samples < 0:
        raise RecipeError(f"validation-samples must be >= 0, got {validation_samples}")
    train, held_out = split_records(records, eval_samples + validation_samples, seed)
    if not validation_samples:
        return train, held_out, []
    order = np.random.default_rng(seed).permutation(len(records))
    held = set(order[:eval_samples].tolist())
    validation_idx = set(order[eval_samples:eval_samples + validation_samples].tolist())
    return (train, [r for i, r in enumerate(records) if i in held],
            [r for i, r in enumerate(records) if i in validation_idx])


def get_preset(name: str) -> NeoPreset:
    """The preset called ``name`` (:data:`tellneo.recipes.neo.PRESETS`); RecipeError naming the choices."""
    if name not in PRESET_SETTINGS:
        raise RecipeError(f"preset must be one of {', '.join(PRESETS)}, got {name!r}")
    return PRESET_SETTINGS[name]


def _load_student(cfg: DistillConfig, teacher: Any, tokenizer: Any) -> tuple[Any, dict[str, Any]]:
    from tellneo.models import load_causal_lm

    if cfg.student is None:
        layers, keep = parse_layers(cfg.layers)
        try:
            student = build_student(teacher, layers, keep=keep)
        except (ValueError, TypeError) as exc:
            raise RecipeError(f"cannot build a student from the teacher: {exc}") from None
        info = {"source": "layer-dropped teacher", "layers": list(student.config.tellneo_teacher_layers)}
    else:
        student, student_tokenizer = load_causal_lm(cfg.student)
        check_compatible(teacher, student, tokenizer, student_tokenizer)
        if getattr(student, "is_quantized", False):
            student = float_copy(student)
        info = {"source": str(cfg.student), "layers": None}
    check_compatible(teacher, student)
    info["num_layers"] = int(student.config.num_hidden_layers)
    return student, info


def check_kept(train_in: int, train_kept: int, eval_in: int, eval_kept: int, seq_len: int) -> dict[str, int]:
    """Records longer than ``seq_len`` are dropped (see :func:`tellneo.recipes.records.tokenize`): log how many,
    refuse a held-out set that keeps fewer than :data:`MIN_EVAL_KEPT` of its records (its metrics would describe
    another set than asked for), and return ``{"train": dropped, "eval": dropped}`` for the summary."""
    dropped = {"train": train_in - train_kept, "eval": eval_in - eval_kept}
    if eval_kept < MIN_EVAL_KEPT * eval_in:
        raise RecipeError(f"only {eval_kept} of {eval_in} held-out records fit in --seq-len {seq_len} tokens (the "
                          f"others are longer and would be dropped); raise --seq-len or use shorter data")
    if dropped["train"] or dropped["eval"]:
        logger.warning(f"dropped {dropped['train']} of {train_in} training and {dropped['eval']} of {eval_in} "
                       f"held-out records longer than --seq-len {seq_len} tokens")
    return dropped


def _save_student_base(cfg: DistillConfig, student: Any, tokenizer: Any, out: Path, *, is_main: bool) -> str:
    """Save the student the adapter is trained on as a plain HF directory (``OUTPUT/student_base``) and make it
    the adapter's ``base_model_name_or_path``, so that the adapter loads onto the right layers without the teacher
    (a student given as an HF directory is named as it is). Returns the absolute path."""
    from tellneo.recipes.reporting import save_pretrained_atomic

    if cfg.student is not None and Path(cfg.student).is_dir():
        return point_adapter_at(student, cfg.student)
    base = out / STUDENT_BASE
    if is_main:
        save_pretrained_atomic(student, base, tokenizer)
    return point_adapter_at(student, base)


def _epochs_needed(train: TrainSettings, rows: int, global_batch: int) -> int:
    steps_per_epoch = max(1, rows // global_batch)
    if train.max_steps > 0:
        return math.ceil(train.max_steps / steps_per_epoch)
    return math.ceil(train.epochs)


def run_distill(cfg: DistillConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
                report_to: str | list[str] = "none") -> dict[str, Any]:
    """Run NEO distillation as configured; returns the summary (also written to ``summary.json``).

    ``report_to``: Trainer logging integrations besides ``metrics.jsonl`` (``"tensorboard"``, ``"wandb"``, ... or
    ``"none"``; see :func:`tellneo.recipes.training.check_report_to`); not part of the run's manifest.

    Raises RecipeError (bad configuration or data), DataFileError (bad jsonl), ModelNotFoundError (missing or
    unreadable model), FileExistsError / PermissionError (output directory), KeyboardInterrupt after a Ctrl-C
    (a checkpoint of the last finished step is saved: rerun with ``resume=True``).
    """
    return run_recipe(_DistillRun(cfg), resume=resume, overwrite=overwrite, progress=progress, report_to=report_to)


class _DistillRun(RecipeRun):
    """The NEO recipe's parts of :func:`tellneo.recipes.run.run_recipe`."""

    stages = 5

    def __init__(self, cfg: DistillConfig) -> None:
        self.cfg = cfg
        self.lora, self.kd, self.train = cfg.resolve()
        self.manifest = cfg.manifest()
        self.mode, self.output_dir = cfg.mode, Path(cfg.output_dir)

    def check_models(self) -> None:
        from tellneo.models import check_model_path

        check_model_path(self.cfg.teacher, "teacher path")
        check_model_path(self.cfg.student, "student path")

    def prepare(self, stage: Any, timings: dict[str, float]) -> Any:
        from tellneo.data import PackedDataset
        from tellneo.models import load_causal_lm
        from tellneo.recipes.records import general_records, tokenize

        cfg, train = self.cfg, self.train
        stage("reading data")
        records, self.source = general_records(cfg.data, cfg.max_samples)  # bad data fails before the slow loading
        eval_seed = train.seed if cfg.eval_seed is None else cfg.eval_seed
        train_records, eval_records, validation_records = split_distill_records(
            records, cfg.eval_samples, cfg.validation_samples, eval_seed)

        t0 = time.perf_counter()
        stage("loading the teacher")
        self.teacher, self.tokenizer = load_causal_lm(cfg.teacher)
        stage("building the student" if cfg.student is None else "loading the student")
        self.model, self.student_info = _load_student(cfg, self.teacher, self.tokenizer)
        if cfg.save_gguf:
            check_gguf_export(self.model, self.tokenizer)
        timings["load_models_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        stage(f"tokenizing {len(records)} records")
        self.vocab = vocab = int(self.model.get_output_embeddings().weight.shape[0])
        if cfg.offline_topk > vocab:  # checked before the run directory is touched
            raise RecipeError(f"offline-topk {cfg.offline_topk} is more than the vocabulary ({vocab} ids)")
        tok = self.tokenizer
        self.train_store = tokenize(train_records, tok, what="training", vocab_size=vocab, max_tokens=cfg.seq_len)
        self.eval_store = tokenize(eval_records, tok, what="held-out", vocab_size=vocab, max_tokens=cfg.seq_len)
        self.validation_store = tokenize(validation_records, tok, what="validation", vocab_size=vocab,
                                         max_tokens=cfg.seq_len) if validation_records else None
        self.dropped = check_kept(len(train_records), len(self.train_store), len(eval_records),
                                  len(self.eval_store), cfg.seq_len)
        stage("packing")
        pad_id = tok.pad_token_id or 0
        self.train_ds = PackedDataset(self.train_store, cfg.seq_len, seed=train.seed, shuffle=True, pad_id=pad_id)
        self.eval_ds = PackedDataset(self.eval_store, cfg.seq_len, shuffle=False, pad_id=pad_id)
        self.validation_ds = None if self.validation_store is None else \
            PackedDataset(self.validation_store, cfg.seq_len, shuffle=False, pad_id=pad_id)
        timings["data_s"] = time.perf_counter() - t0
        return self.train_ds

    def after_open(self, timings: dict[str, float]) -> None:
        from tellneo.data import PackedCollator
        from tellneo.recipes.offline import TopkCollator, TopkDataset, precompute_teacher_topk

        cfg, state, out = self.cfg, self.state, self.out
        self.dataset, self.collator, self.eval_extra = self.train_ds, PackedCollator("rows"), None
        self.teacher_cache: dict[int, torch.Tensor] = {}
        self.validation_extra, self.validation = None, None
        if not (cfg.offline_topk > 0 and self.kd.alpha > 0):
            return
        t0 = time.perf_counter()
        epochs = list(range(_epochs_needed(self.train, len(self.train_ds), self.global_batch)))
        with state.main_process_first():
            if state.is_main_process:
                precompute_teacher_topk(self.teacher, self.train_ds, out / "teacher_topk" / "train",
                                        k=cfg.offline_topk, temperature=self.kd.temperature, epochs=epochs,
                                        vocab_size=self.vocab, progress=self.progress)
                precompute_teacher_topk(self.teacher, self.eval_ds, out / "teacher_topk" / "eval",
                                        k=cfg.offline_topk, temperature=self.kd.temperature,
                                        vocab_size=self.vocab, progress=self.progress)
                if self.validation_ds is not None:
                    precompute_teacher_topk(self.teacher, self.validation_ds, out / "teacher_topk" / "validation",
                                            k=cfg.offline_topk, temperature=self.kd.temperature,
                                            vocab_size=self.vocab, progress=self.progress)
        self.dataset = TopkDataset(self.train_ds, out / "teacher_topk" / "train")
        self.eval_extra = TopkDataset(self.eval_ds, out / "teacher_topk" / "eval").topk
        if self.validation_ds is not None:
            self.validation_extra = TopkDataset(self.validation_ds, out / "teacher_topk" / "validation").topk
        self.collator = TopkCollator()
        self.teacher = None
        timings["teacher_topk_s"] = time.perf_counter() - t0

    def evaluate(self, model: Any, label: str) -> dict[str, Any]:
        """Held-out metrics; after training (``label="after"``) also the validation set's, into
        ``self.validation`` (evaluated once: it is for choosing settings such as the learning rate)."""
        if label == "after" and self.validation_ds is not None:
            self.validation = self._metrics(model, self.validation_ds, self.validation_extra, {}, "validation")
        return self._metrics(model, self.eval_ds, self.eval_extra, self.teacher_cache, label)

    def _metrics(self, model: Any, dataset: Any, extra: Any, cache: dict[int, torch.Tensor],
                 label: str) -> dict[str, Any]:
        from tqdm.auto import tqdm

        from tellneo.recipes.evaluate import distill_metrics, eval_batches

        n_batches = math.ceil(len(dataset) / self.cfg.eval_batch_size)
        with tqdm(total=n_batches, desc=f"evaluating ({label})", unit="batch", disable=not self.progress) as bar:
            return distill_metrics(model, eval_batches(dataset, self.cfg.eval_batch_size, extra=extra),
                                   teacher=self.teacher, teacher_cache=cache,
                                   temperature=self.kd.temperature, progress=bar)

    def trainable_model(self) -> Any:
        if self.mode == "lora":
            self.student_info["base"] = _save_student_base(self.cfg, self.model, self.tokenizer, self.out,
                                                           is_main=self.state.is_main_process)
            return attach_lora(self.model, self.lora)
        return self.model.requires_grad_(True)

    def trainer_inputs(self) -> tuple[Any, Any]:
        return self.dataset, self.collator

    def plot(self, metrics: list[dict[str, Any]], before: dict[str, Any] | None = None,
             after: dict[str, Any] | None = None, final_step: int = 0) -> None:
        from tellneo.recipes.reporting import plot_loss_curve

        title = (f"tellneo distill: {self.mode} student ({self.student_info['num_layers']} layers), "
                 f"KD weight {self.kd.alpha}")
        held_out = None if before is None or after is None else {
            "held-out ce": [(0, before["ce"]), (final_step, after["ce"])],
            "held-out kl": [(0, before["kl"]), (final_step, after["kl"])]}
        plot_loss_curve(metrics, self.out / "loss_curve.png", title=title, held_out=held_out)

    def save(self, model: Any, timings: dict[str, float]) -> dict[str, str]:
        from tellneo.recipes.outputs import save_model_outputs

        cfg = self.cfg
        t0 = time.perf_counter()
        written = save_model_outputs(model, self.out, self.tokenizer, mode=cfg.mode, save_merged=cfg.save_merged,
                                     merged_dtype=cfg.merged_dtype, save_gguf=cfg.save_gguf,
                                     model_source=cfg.teacher)
        if self.student_info.get("base") == str((self.out / STUDENT_BASE).resolve()):
            written[STUDENT_BASE] = self.student_info["base"]
        timings["save_s"] = time.perf_counter() - t0
        return written

    def summary(self, run: TrainedRun) -> tuple[dict[str, Any], str]:
        from tellneo.recipes.reporting import markdown_table

        cfg, before, after, online = self.cfg, run.before, run.after, self.teacher is not None
        summary = {
            "recipe": "neo", "mode": cfg.mode, "teacher": cfg.teacher or "embedded SmolLM2-135M-Instruct",
            "student": self.student_info, "data": self.source, "train_records": len(self.train_store),
            "eval_records": len(self.eval_store), "records_dropped_overlong": self.dropped,
            "train_rows_per_epoch": len(self.train_ds), "eval_tokens": before["tokens"],
            "steps": run.trainer.state.global_step, "global_batch_rows": run.global_batch, "seq_len": cfg.seq_len,
            "trained_tokens_per_epoch": int((self.train_store.labels != -100).sum()),
            "lora": self.lora.to_dict() if cfg.mode == "lora" else None, "kd": asdict(self.kd),
            "learning_rate": self.train.learning_rate, "trainable_parameters": run.trainable,
            "total_parameters": run.total, "before": before, "after": after,
            "eval_seed": self.train.seed if cfg.eval_seed is None else cfg.eval_seed,
            "validation_records": 0 if self.validation_store is None else len(self.validation_store),
            "validation": self.validation,  # after training; None without --validation-samples
        }
        table = markdown_table(
            ["held-out metric", "student before", "student after", "teacher"],
            [["cross-entropy (nats/token)", before["ce"], after["ce"], before["teacher_ce"]],
             ["perplexity", before["ppl"], after["ppl"], math.exp(before["teacher_ce"])
              if not math.isnan(before["teacher_ce"]) else float("nan")],
             ["KL(teacher || student)", before["kl"], after["kl"], 0.0 if online else float("nan")],
             ["top-1 agreement with teacher", before["top1_agreement"], after["top1_agreement"],
              1.0 if online else float("nan")]],
        )
        return summary, table


def load_distilled_student(run_dir: str | Path) -> Any:
    """Rebuild the trained student of a ``tellneo distill`` run: the full model (``mode="full"``), or the student
    base (``student_base/``; in runs older than it, rebuilt from the teacher and the recorded layers, or loaded
    from ``student``) with the saved LoRA adapter. Returns the model in eval mode."""
    import json

    from tellneo.models import load_causal_lm

    run = Path(run_dir)
    config = json.loads((run / "manifest.json").read_text(encoding="utf-8"))["config"]
    if config["mode"] == "full":
        model, _ = load_causal_lm(run / "model")
        return model.eval()
    from peft import PeftModel

    if (run / STUDENT_BASE).is_dir():  # runs since the student base is saved beside the adapter
        base, _ = load_causal_lm(run / STUDENT_BASE)
        return PeftModel.from_pretrained(base, run / "adapter").eval()
    teacher, _ = load_causal_lm(config["teacher"])
    if config["student"] is None:
        layers, keep = parse_layers(config["layers"])
        base = build_student(teacher, layers, keep=keep)
    else:
        base, _ = load_causal_lm(config["student"])
    return PeftModel.from_pretrained(base, run / "adapter").eval()
