"""TELL (token-efficient leverage learning): learn a low-resource task from a few samples by putting an anchor
prompt in front of every task sample and spreading the samples through a much larger general stream.

``run_tell(TellConfig(...))`` is the run behind ``tellneo tell``: task pairs (a generated checkable task or a
jsonl) + general instruction data + anchor prompt -> chat-template tokenization with response-only labels ->
:func:`tellneo.data.tell_mix_store` and a :class:`tellneo.data.PackedDataset` with ``shuffle=False`` (the rows
keep the mixed order, read sequentially by the trainer) -> LoRA (default) or full fine-tuning with the fused CE
loss (:class:`tellneo.recipes.neo.KDTrainer` with ``alpha=0``) -> exact-match accuracy of greedy answers on a
held-out test split, before and after.

Arms of the TELL experiments are configurations of it:

* ``method="tell"`` — anchor + extensive shuffle (``spread="stratified"``);
* ``method="sft"`` — SFT on the task samples alone (no general data; no anchor unless ``use_anchor=True``);
* ablations — ``use_anchor=False`` (TELL without the anchor), ``spread="end"`` (task block after the general
  stream, i.e. no shuffle) or ``spread="random"`` (a plain random mix).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tellneo.data.planning import MAX_SEQ_LEN
from tellneo.io import file_sha256
from tellneo.recipes.config import accepts_flat_names
from tellneo.recipes.errors import RecipeError
from tellneo.recipes.lora import LoraSettings, attach_lora
from tellneo.recipes.model_parts import float_copy
from tellneo.recipes.outputs import OUTPUT_OPTIONS, check_gguf_export, check_output_options
from tellneo.recipes.run import RecipeRun, TrainedRun, run_recipe
from tellneo.recipes.settings import MODES, TELL_METHODS, TELL_SPREADS, TELL_TRAIN_DEFAULTS
from tellneo.recipes.training import TrainSettings

logger = logging.getLogger("tellneo")

__all__ = ["METHODS", "SPREADS", "TellConfig", "build_tell_dataset", "draw_general", "run_tell", "task_data",
           "task_exposure"]

FILE_TASK_NEW_TOKENS = 16  # answer budget for --task-file tasks without --max-new-tokens
DEFAULT_EXPOSURES = 8  # k: times each task sample is shown
DEFAULT_GENERAL_PER_TASK = 4.0  # r: general samples per task occurrence (the paper's general >> task)
_SFT_PASS = 31  # rng stream purpose of SFT's per-pass shuffles
METHODS = TELL_METHODS
SPREADS = TELL_SPREADS


def _from_flat_names(flat: dict[str, Any], kwargs: dict[str, Any]) -> None:
    """The keywords of the former flat config (``lora_r=8, fused_lora=False, ...``) as ``lora`` settings."""
    if kwargs.get("lora") is not None:
        raise TypeError("TellConfig: give lora= or the former lora_r/lora_alpha/lora_dropout/fused_lora")
    names = {"lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "fused_lora": "patch"}
    try:
        kwargs["lora"] = LoraSettings().replace(**{names[k]: v for k, v in flat.items()})
    except ValueError as exc:
        raise RecipeError(str(exc)) from None


@accepts_flat_names(("lora_r", "lora_alpha", "lora_dropout", "fused_lora"), _from_flat_names)
@dataclass
class TellConfig:
    """Everything a TELL run depends on (its manifest). See the module docstring for the arms.

    ``lora``: the adapters (mode ``"lora"``); the ``None`` fields of ``train`` (learning rate, schedule, warm-up,
    epochs) are :data:`tellneo.recipes.settings.TELL_TRAIN_DEFAULTS` (:meth:`resolve`). The former flat keywords
    (``lora_r``, ``lora_alpha``, ``lora_dropout``, ``fused_lora``) are still accepted, with a DeprecationWarning.

    The defaults are the paper's method: each of the N task samples is shown ``exposures`` (k, default
    :data:`DEFAULT_EXPOSURES`) times, with ``general_per_task`` (r, default :data:`DEFAULT_GENERAL_PER_TASK`)
    general samples per task occurrence drawn at random (seeded by ``train.seed``) from the whole ``general``
    pool (default ``"mixed"``: Python-docs + synthetic pairs, ~53k). The mix holds exactly ``N * k`` task
    samples and ``round(N * k * r)`` general samples; the run lasts one epoch of it, topped up to whole global
    batches with label-free filler rows, so the trainer's dropped partial batch never hides a task sample. A
    pool too small (after the ``seq_len`` filter) is
    reused, said in one log line and counted as ``general_reused``, or refused with ``general_reuse=False``.
    ``task_ratio`` is the other spelling of r (``task_ratio = 1 / (1 + r)``); both given and inconsistent is
    refused.

    ``method="sft"``: the task samples alone, ``exposures`` passes over them (each pass a fresh seeded shuffle,
    packed pass by pass). ``exposures`` as a tuple (SFT only), e.g. ``(4, 8, 16, 32)``: one run of
    ``max(exposures)`` passes, scored on ``dev_samples`` dev prompts (the task's dev split, disjoint from train
    and test) after each listed pass count; the best dev accuracy's checkpoint is kept and is what the test
    scores and the saved adapter are (pair it with a constant learning rate).

    ``neutral_anchor``: replace the anchor by :func:`tellneo.data.tell.neutral_anchor_text` of the same length
    (a marker without instructions; ablation).

    ``exposures=None`` is the former, compute-matched mix: the first ``general_samples`` records, each shown
    once, and ``round(G * task_ratio / (1 - task_ratio))`` task slots (SFT: ``train.epochs`` / ``max_steps``).
    The benchmarks' recorded arms use it; their manifests and hashes are unchanged because new fields at their
    defaults are left out of a manifest with ``exposures=None``.
    """

    model: str | None = None  # GGUF file or HF directory; None = the embedded SmolLM2-135M-Instruct
    task: str = "date_iso"  # a generated task (tellneo.data.tasks), used when task_file is None
    task_file: str | None = None  # jsonl of task pairs for training
    test_file: str | None = None  # jsonl of held-out pairs (default with task_file: its last test_samples)
    task_samples: int = 16  # N: task samples used for training
    test_samples: int = 40
    method: str = "tell"
    use_anchor: bool | None = None  # default: True for tell, False for sft
    anchor: str | None = None  # anchor text; None = the generated task's anchor prompt
    spread: str = "stratified"
    task_ratio: float | None = None  # fraction of the mixed samples that are task samples: 1 / (1 + r)
    general: str | None = "mixed"  # a named pool (tellneo.data.general) or a data file; None = python-docs
    general_samples: int | None = 48  # exposures=None only: the first G general records
    exposures: int | tuple[int, ...] | None = DEFAULT_EXPOSURES  # k; a tuple: SFT's dev-selected pass counts
    general_per_task: float | None = None  # r (None: from task_ratio, else DEFAULT_GENERAL_PER_TASK)
    general_reuse: bool = True  # reuse general samples when the pool is too small (False: refuse)
    dev_samples: int = 50  # dev prompts scored at each pass count of a tuple exposures
    neutral_anchor: bool = False  # the anchor replaced by neutral text of the same length (ablation)
    seq_len: int = 512
    window: int = 64  # packing window (samples) that keeps the mixed order
    mode: str = "lora"  # one of MODES
    lora: LoraSettings = field(default_factory=LoraSettings)
    max_new_tokens: int | None = None  # None: the generated task's own (Task.max_new_tokens), 16 for task files
    eval_batch_size: int = 20
    save_merged: bool = False  # also OUTPUT/merged: the adapter merged in (lora mode)
    merged_dtype: str = "fp32"  # dtype of merged/ and model.gguf: fp32, bf16 or fp16
    save_gguf: bool = False  # also OUTPUT/model.gguf (tellneo.export.export_gguf)
    output_dir: str = "outputs/tell"
    train: TrainSettings = field(default_factory=TrainSettings)  # None fields: TELL_TRAIN_DEFAULTS

    @property
    def anchored(self) -> bool:
        return self.use_anchor if self.use_anchor is not None else self.method == "tell"

    def resolve(self) -> tuple[LoraSettings, TrainSettings]:
        """``(lora, train)`` with the training settings left unset filled in; RecipeError for a bad config."""
        if self.method not in METHODS:
            raise RecipeError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.mode not in MODES:
            raise RecipeError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.spread not in SPREADS:
            raise RecipeError(f"spread must be one of {', '.join(SPREADS)}, got {self.spread!r}")
        if self.task_ratio is not None and not 0.0 < self.task_ratio < 1.0:
            raise RecipeError(f"task-ratio must be in (0, 1), got {self.task_ratio}")
        self._check_exposures()
        if self.general_per_task is not None:
            if not self.general_per_task > 0 or not math.isfinite(self.general_per_task):
                raise RecipeError(f"general-per-task must be a positive number, got {self.general_per_task!r}")
            implied = 1.0 / (1.0 + self.general_per_task)
            if self.task_ratio is not None and not math.isclose(self.task_ratio, implied, rel_tol=1e-9):
                raise RecipeError(f"task-ratio {self.task_ratio} and general-per-task {self.general_per_task} "
                                  f"disagree (general-per-task r means task-ratio 1/(1+r) = {implied:.6g}); "
                                  "give one of them")
        if self.neutral_anchor and not self.anchored:
            raise RecipeError("neutral-anchor replaces the anchor by neutral text: it needs an anchored arm "
                              "(not --no-anchor; with --method sft give --with-anchor)")
        for name in ("task_samples", "test_samples", "seq_len", "max_new_tokens", "eval_batch_size", "dev_samples"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise RecipeError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.window < 0:
            raise RecipeError(f"window must be >= 0, got {self.window}")
        if self.seq_len > MAX_SEQ_LEN:
            raise RecipeError(f"seq-len must be at most {MAX_SEQ_LEN}, got {self.seq_len}")
        check_output_options(self.merged_dtype)
        train = self.train.resolve(TELL_TRAIN_DEFAULTS)
        if self.exposures is not None and train.max_steps < 0 and train.epochs != 1.0:
            raise RecipeError(f"exposures sets the run's length (k passes over the task samples); epochs "
                              f"{train.epochs} would repeat it: leave --epochs at 1 or give --max-steps")
        return self.lora, train

    def _check_exposures(self) -> None:
        k = self.exposures
        if k is None:
            return
        values = k if isinstance(k, (tuple, list)) else (k,)
        if not values or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0 for v in values):
            raise RecipeError(f"exposures must be a positive integer (or, for --method sft, several), got {k!r}")
        if isinstance(k, (tuple, list)):
            if self.method != "sft":
                raise RecipeError(f"several exposures {list(k)} pick SFT's pass count on dev (--method sft); "
                                  "TELL shows each task sample a fixed k times: give one value")
            if len(set(values)) != len(values):
                raise RecipeError(f"exposures has repeated values: {list(k)}")
            if self.task_file is not None:
                raise RecipeError("several exposures select on the generated task's dev split; a --task-file has "
                                  "none: give one value")

    @property
    def selecting(self) -> bool:
        """Whether the run picks SFT's pass count on dev (``exposures`` holds several values)."""
        return isinstance(self.exposures, (tuple, list))

    def passes(self) -> int | None:
        """Passes over the task samples the run trains: ``max(exposures)`` (one value: itself), None for the
        former mix."""
        if self.exposures is None:
            return None
        return int(max(self.exposures)) if self.selecting else int(self.exposures)

    def anchor_text(self, task_anchor: str) -> str:
        """The text put in front of every task sample: ``task_anchor``, its neutral stand-in, or ``""``."""
        if not self.anchored:
            return ""
        if self.neutral_anchor:
            from tellneo.data.tell import neutral_anchor_text

            return neutral_anchor_text(len(task_anchor))
        return task_anchor

    def effective_task_ratio(self) -> float:
        """The task fraction of the mix: ``1 / (1 + r)`` (see :meth:`general_per_task_occurrence`)."""
        if self.general_per_task is None and self.task_ratio is not None:
            return self.task_ratio
        return 1.0 / (1.0 + self.general_per_task_occurrence())

    def general_per_task_occurrence(self) -> float:
        """r: ``general_per_task``, else ``(1 - task_ratio) / task_ratio``, else
        :data:`DEFAULT_GENERAL_PER_TASK`."""
        if self.general_per_task is not None:
            return float(self.general_per_task)
        if self.task_ratio is not None:
            return (1.0 - self.task_ratio) / self.task_ratio
        return DEFAULT_GENERAL_PER_TASK

    def general_needed(self, n_task: int) -> int:
        """General samples the exposure-counted mix needs for ``n_task`` task samples: ``round(N * k * r)``
        (at least 1); ValueError without ``exposures``."""
        if self.passes() is None:
            raise ValueError("general_needed() is defined with exposures (k) only")
        return max(1, int(round(n_task * self.passes() * self.general_per_task_occurrence())))

    def answer_tokens(self) -> int:
        """Greedy tokens generated per test prompt: ``max_new_tokens``, else the generated task's own budget
        (``json_record`` answers run to ~50 tokens; 16 would cut every one off), else 16 for task files."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        task = generated_task(self)
        return FILE_TASK_NEW_TOKENS if task is None else task.max_new_tokens

    def validate(self) -> LoraSettings:
        """The LoRA settings of :meth:`resolve` (the former name)."""
        return self.resolve()[0]

    def manifest(self) -> dict[str, Any]:
        """The run's identity: every setting resolved, without where and what to save."""
        lora, train = self.resolve()
        d = asdict(self)
        for name in ("output_dir", *OUTPUT_OPTIONS):  # where and what to save does not change the run
            d.pop(name)
        d["lora"] = lora.to_dict() if self.mode == "lora" else None
        d["train"] = train.to_dict()
        d["anchored"] = self.anchored
        d["max_new_tokens"] = self.answer_tokens()
        # the files' contents: --resume refuses changed data
        d["data_sha256"] = {k: file_sha256(getattr(self, k)) for k in ("task_file", "test_file", "general")}
        if self.exposures is None:  # the former mix: fields added since, at their defaults, are left out
            for name, default in (("dev_samples", 50), ("neutral_anchor", False)):
                if d[name] == default:
                    d.pop(name)
            if self.general_per_task is None:
                for name in ("exposures", "general_per_task", "general_reuse"):
                    d.pop(name)
        if isinstance(d.get("exposures"), tuple):
            d["exposures"] = list(d["exposures"])
        return d


#: Table labels of the per-answer task metrics (``Task.metrics``); others print as their names.
METRIC_LABELS = {"valid": "JSON validity (parses as an object)"}


def generated_task(cfg: TellConfig) -> Any:
    """The :class:`tellneo.data.tasks.Task` named by ``cfg.task``, or None when ``cfg.task_file`` is given;
    RecipeError for an unknown name."""
    if cfg.task_file is not None:
        return None
    from tellneo.data.tasks import get_task

    try:
        return get_task(cfg.task)
    except ValueError as exc:
        raise RecipeError(str(exc)) from None


def task_metrics(cfg: TellConfig) -> Any:
    """The generated task's per-answer metrics (:meth:`tellneo.data.tasks.Task.metrics`), None for task files
    (scored by exact match only)."""
    task = generated_task(cfg)
    return None if task is None else task.metrics


def task_data(cfg: TellConfig) -> tuple[list[dict], list[dict], str, Any, str]:
    """``(train pairs, test pairs, anchor text, score function, description)`` of ``cfg``'s task (a generated
    task split by ``cfg.train.seed``, or ``task_file`` / ``test_file``); RecipeError for unusable task data."""
    from tellneo.data.files import read_records
    from tellneo.data.tasks import Task

    task = generated_task(cfg)
    if task is not None:
        try:
            train = task.pairs(cfg.task_samples, seed=cfg.train.seed, split="train")
            test = task.pairs(cfg.test_samples, seed=cfg.train.seed, split="test")
        except ValueError as exc:  # e.g. more test prompts than the fixed held-out pool holds
            raise RecipeError(f"task {task.name}: {exc}") from None
        anchor = cfg.anchor if cfg.anchor is not None else task.anchor_prompt
        return train, test, anchor, task.score, (f"generated task {task.name} ({cfg.task_samples} train / "
                                                 f"{cfg.test_samples} test pairs, seed {cfg.train.seed})")
    records = read_records(cfg.task_file)
    for rec in records:
        if "prompt" not in rec:
            raise RecipeError(f"{cfg.task_file}: task records need 'prompt' and 'response' (exact-match scoring)")
    if cfg.test_file is not None:
        test = read_records(cfg.test_file)[: cfg.test_samples]
        train = records[: cfg.task_samples]
    else:
        if len(records) <= cfg.test_samples:
            raise RecipeError(f"{cfg.task_file} has {len(records)} records; holding out --test-samples "
                              f"{cfg.test_samples} leaves none to train on (give --test-file)")
        test = records[-cfg.test_samples:]
        train = records[: min(cfg.task_samples, len(records) - cfg.test_samples)]
    if cfg.anchored and cfg.anchor is None:
        raise RecipeError("TELL needs an anchor prompt for a task file: give --anchor / --anchor-file (or --no-anchor)")
    return train, test, cfg.anchor or "", Task.score, f"{cfg.task_file} ({len(train)} train / {len(test)} test)"


_task_data = task_data  # the former, private name (benchmarks imported it)


def dev_pairs(cfg: TellConfig) -> list[dict]:
    """``cfg.dev_samples`` pairs of the generated task's dev split (disjoint from its train and test splits);
    RecipeError for a task file (no dev split) or a split too small."""
    task = generated_task(cfg)
    if task is None:
        raise RecipeError("a dev split exists for generated tasks only (--task), not for --task-file")
    try:
        return task.pairs(cfg.dev_samples, seed=cfg.train.seed, split="dev")
    except ValueError as exc:
        raise RecipeError(f"task {task.name}: {exc}") from None


def arm_label(cfg: TellConfig) -> str:
    """A readable name of the arm, e.g. ``"tell, spread=stratified, anchor, k=8, r=4"``."""
    parts = [cfg.method] + ([] if cfg.method == "sft" else [f"spread={cfg.spread}"])
    parts.append(("neutral anchor" if cfg.neutral_anchor else "anchor") if cfg.anchored else "no anchor")
    if cfg.exposures is not None:
        k = "/".join(map(str, cfg.exposures)) + " (dev)" if cfg.selecting else str(cfg.exposures)
        parts.append(f"k={k}")
        if cfg.method == "tell":
            parts.append(f"r={cfg.general_per_task_occurrence():g}")
    return ", ".join(parts)


def build_tell_dataset(task_store: Any, general_store: Any | None, cfg: TellConfig, pad_id: int, *,
                       min_rows: int = 0) -> Any:
    """The training rows (a :class:`tellneo.data.PackedDataset`).

    * TELL (``general_store`` given): the mix packed in order (``shuffle=False``, packing windows of
      ``cfg.window``). With ``cfg.exposures`` its epoch holds exactly ``len(task_store) * k`` task samples (each
      k times) among all of ``general_store`` (give it :func:`draw_general` 's ``cfg.general_needed(N)``
      samples).
    * SFT with ``cfg.exposures``: ``cfg.passes()`` passes over the task samples, each a fresh seeded shuffle,
      packed pass by pass (one packing window per pass) and read in order; ``dataset.pass_size`` is N.
    * SFT with ``exposures=None`` (the former baseline): the task samples shuffled per epoch; a handful that packs
      into fewer rows than one global batch (``min_rows``) is held ``repeats`` times per epoch.

    With exposures, ``min_rows`` (the global batch) fills the epoch up to whole global batches with filler rows
    (no labels; ``PackedDataset(fill_batches=)``) so that no task sample is dropped with a partial last batch.
    ``dataset.repeats`` is the times each task sample appears per epoch."""
    from tellneo.data import PackedDataset, TokenStore, rng, tell_mix_store

    fill = min_rows if cfg.exposures is not None and min_rows > 0 else None
    if general_store is None and cfg.exposures is not None:
        n, k = len(task_store), cfg.passes()
        order = np.concatenate([rng.permutation(n, cfg.train.seed, rng.stream_id(p, _SFT_PASS)) for p in range(k)])
        dataset = PackedDataset(task_store.take(order), cfg.seq_len, window=n, shuffle=False, pad_id=pad_id,
                                overlong="truncate", fill_batches=fill)
        dataset.repeats, dataset.pass_size = k, n
        return dataset

    if general_store is None:
        def sft(store: Any) -> Any:
            return PackedDataset(store, cfg.seq_len, seed=cfg.train.seed, shuffle=True, pad_id=pad_id,
                                 overlong="truncate")

        dataset, repeats = sft(task_store), 1
        if 0 < len(dataset) < min_rows:
            # k copies pack into at most k times the rows of one copy: start at that bound, step up
            repeats = math.ceil(min_rows / len(dataset)) - 1
            while len(dataset) < min_rows:
                repeats += 1
                dataset = sft(TokenStore.concat([task_store] * repeats))
        if repeats > 1:
            logger.info("SFT: %d task samples pack into fewer rows than one global batch (%d): each epoch holds "
                        "them %d times", len(task_store), min_rows, repeats)
        dataset.repeats = repeats
        return dataset

    def source(epoch: int) -> tuple[Any, np.ndarray]:
        return tell_mix_store(task_store, general_store, anchor_ids=[], task_ratio=cfg.effective_task_ratio(),
                              seed=cfg.train.seed, epoch=epoch, spread=cfg.spread, task_slots=task_slots)

    task_slots = None if cfg.exposures is None else len(task_store) * cfg.passes()
    dataset = PackedDataset(source, cfg.seq_len, window=cfg.window or None, shuffle=False, pad_id=pad_id,
                            overlong="truncate", fill_batches=fill)
    dataset.repeats = 1 if task_slots is None else cfg.passes()
    return dataset


def pass_end_steps(dataset: Any, passes: Any, global_batch: int) -> dict[int, int]:
    """``{k: optimizer step after which the first k passes have been shown}`` for an SFT dataset of
    :func:`build_tell_dataset` with exposures (passes packed in order, one window each): the step whose global
    batch holds the last row of pass k (that batch may also start pass k + 1)."""
    p, n = dataset.plan, dataset.pass_size
    rows_through = {int(k): int(p.row[p.sample < int(k) * n].max()) + 1 for k in passes}
    return {k: -(-rows // global_batch) for k, rows in rows_through.items()}


def draw_general(store: Any, need: int, *, reuse: bool = True) -> tuple[Any, dict[str, int]]:
    """``(general store of exactly need samples, counts)`` for the exposure-counted mix.

    ``store`` (a :class:`tellneo.data.TokenStore`) is the general pool already in its seeded random order; the
    first ``need`` samples are kept. A pool of fewer samples is cycled (sample ``i`` of the result is pool sample
    ``i % len(store)``), said in one log line, or refused (RecipeError naming the flags) when ``reuse`` is False.
    ``counts``: ``general_unique`` (distinct pool samples used) and ``general_reused`` (``need - general_unique``).
    """
    if need <= 0:
        raise ValueError(f"need must be positive, got {need}")
    have = len(store)
    if have == 0:
        raise RecipeError("the general data is empty")
    if have < need:
        if not reuse:
            raise RecipeError(f"the general pool has {have:,} usable samples but --exposures x --task-samples x "
                              f"--general-per-task needs {need:,}: give a bigger --general pool, lower --exposures "
                              "or --general-per-task, or allow --general-reuse")
        logger.warning("general pool too small: %d usable samples for the %d the mix needs; each is reused about "
                       "%.1f times (--no-general-reuse refuses instead)", have, need, need / have)
    unique = min(have, need)
    return store.take(np.arange(need, dtype=np.int64) % have), {"general_unique": unique,
                                                                "general_reused": need - unique}


def task_exposure(dataset: Any, steps: int, global_batch: int) -> dict[str, int]:
    """What ``steps`` optimizer steps of ``global_batch`` rows read from ``dataset`` (epochs in order, each
    epoch's rows in the dataset's order, a partial last global batch dropped): task samples, their tokens
    (anchor and prompt included) and their trained (response) tokens, the same totals for all samples, and the
    general samples (``general_samples``, ``general_tokens``: the non-task ones)."""
    totals = dict.fromkeys(("task_samples", "task_tokens", "task_trained_tokens", "all_tokens",
                            "all_trained_tokens", "general_samples", "general_tokens"), 0)
    remaining = steps * global_batch
    epoch = 0
    original = dataset.epoch
    while remaining > 0:
        dataset.set_epoch(epoch)
        usable = dataset.steps_per_epoch(global_batch) * global_batch
        if usable == 0:
            break
        take = min(remaining, usable)
        p, store = dataset.plan, dataset.store
        is_task = dataset.is_task if dataset.is_task is not None else np.ones(len(store), dtype=bool)
        rows = np.zeros(p.num_rows, dtype=bool)
        rows[dataset.row_order[:take]] = True
        used = rows[p.row]
        trained = np.concatenate([[0], np.cumsum(store.labels != -100)]) if store.labels is not None else None
        first = store.offsets[p.sample] + p.start
        piece_trained = trained[first + p.length] - trained[first] if trained is not None else p.length
        task_piece = used & is_task[p.sample]
        totals["task_samples"] += int(np.count_nonzero(task_piece & (p.start == 0)))
        totals["general_samples"] += int(np.count_nonzero(used & ~is_task[p.sample] & (p.start == 0)))
        totals["general_tokens"] += int(p.length[used & ~is_task[p.sample]].sum())
        totals["task_tokens"] += int(p.length[task_piece].sum())
        totals["task_trained_tokens"] += int(piece_trained[task_piece].sum())
        totals["all_tokens"] += int(p.length[used].sum())
        totals["all_trained_tokens"] += int(piece_trained[used].sum())
        remaining -= take
        epoch += 1
    dataset.set_epoch(max(original, 0))
    return totals


def _scoring_code_digest() -> str:
    """A digest of the code that turns a model into test scores (prompt rendering, generation, the generated tasks
    and their scorers): part of the before-score cache key, so an edit to any of it is never answered from a cache
    written by the old code."""
    import hashlib

    from tellneo.data import chat, json_record, tasks
    from tellneo.recipes import evaluate

    digest = hashlib.sha256()
    for module in (chat, evaluate, json_record, tasks):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:16]


def run_tell(cfg: TellConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
             report_to: str | list[str] = "none", before_cache: str | Path | None = None) -> dict[str, Any]:
    """Run the TELL (or SFT-baseline) recipe; returns the summary (also written to ``summary.json``).

    ``before_cache``: a directory where the untrained model's test scores are kept, keyed by everything they
    depend on (model file, test prompts, anchor text, answer budget, batch size, torch version); sweeps whose
    runs share a seed's test split then generate them once. Not part of the run's manifest: a cached score is
    the same computation's result.

    Errors as :func:`tellneo.recipes.distill.run_distill`.
    """
    return run_recipe(_TellRun(cfg, before_cache=before_cache), resume=resume, overwrite=overwrite,
                      progress=progress, report_to=report_to)


class _TellRun(RecipeRun):
    """The TELL recipe's parts of :func:`tellneo.recipes.run.run_recipe` (CE only: no teacher, KD weight 0)."""

    stages = 4

    def __init__(self, cfg: TellConfig, *, before_cache: str | Path | None = None) -> None:
        self.cfg = cfg
        self.before_cache = Path(before_cache) if before_cache is not None else None
        self.lora, self.train = cfg.resolve()
        self.manifest = cfg.manifest()
        self.mode, self.output_dir = cfg.mode, Path(cfg.output_dir)
        self.arm = arm_label(cfg)
        self.selection: Any = None

    def check_models(self) -> None:
        from tellneo.models import check_model_path

        check_model_path(self.cfg.model)

    def prepare(self, stage: Any, timings: dict[str, float]) -> Any:
        from tellneo.models import load_causal_lm
        from tellneo.recipes.records import general_records, tokenize

        cfg = self.cfg
        stage("reading data")
        self.train_pairs, self.test_pairs, anchor, self.score, self.task_source = task_data(cfg)  # before loading
        self.dev_pairs = dev_pairs(cfg) if cfg.selecting else []
        counted = cfg.method == "tell" and cfg.exposures is not None
        if counted:  # the whole pool in a seeded random order; tokenized below as far as the mix needs
            general, self.general_source = general_records(cfg.general, None, seed=cfg.train.seed)
        else:
            general, self.general_source = general_records(cfg.general, cfg.general_samples) \
                if cfg.method == "tell" else (None, None)

        t0 = time.perf_counter()
        stage("loading the model")
        model, self.tokenizer = load_causal_lm(cfg.model)
        if getattr(model, "is_quantized", False):
            model = float_copy(model)
        if cfg.save_gguf:
            check_gguf_export(model, self.tokenizer)
        self.model = model
        timings["load_model_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        stage("tokenizing")
        self.prefix = prefix = cfg.anchor_text(anchor)
        vocab = int(model.get_output_embeddings().weight.shape[0])
        task_store = tokenize(self.train_pairs, self.tokenizer, what="task", vocab_size=vocab, prompt_prefix=prefix)
        general_store, dropped = None, 0
        self.general_counts = {"general_unique": 0, "general_reused": 0}
        if counted:
            general_store, dropped = self._counted_general(general, cfg.general_needed(len(task_store)), vocab)
        elif general is not None:
            general_store = tokenize(general, self.tokenizer, what="general", vocab_size=vocab,
                                     max_tokens=cfg.seq_len)
            dropped = len(general) - len(general_store)
            self.general_counts["general_unique"] = len(general_store)
        self.overlong = {
            "general_records_dropped": dropped,
            "task_samples_truncated": int((task_store.lengths > cfg.seq_len).sum())}
        if any(self.overlong.values()):
            logger.warning(f"--seq-len {cfg.seq_len}: {self.overlong['general_records_dropped']} longer general "
                           f"records dropped, {self.overlong['task_samples_truncated']} longer task samples "
                           "truncated")
        stage("mixing and packing")
        self.dataset = build_tell_dataset(task_store, general_store, cfg, self.tokenizer.pad_token_id or 0,
                                          min_rows=self.global_batch)
        timings["data_s"] = time.perf_counter() - t0
        return self.dataset

    def _counted_general(self, records: list[dict], need: int, vocab: int) -> tuple[Any, int]:
        """``(general store of need samples, records read that did not fit seq_len)``: the seeded pool tokenized
        in chunks until ``need`` samples fit ``seq_len`` (or the pool ends), then :func:`draw_general`."""
        from tellneo.data import TokenStore
        from tellneo.recipes.records import tokenize

        cfg, parts, have, used = self.cfg, [], 0, 0
        while have < need and used < len(records):
            chunk = records[used: used + max(need - have, 64)]
            used += len(chunk)
            try:
                part = tokenize(chunk, self.tokenizer, what="general", vocab_size=vocab, max_tokens=cfg.seq_len)
            except RecipeError:
                if parts or used < len(records):
                    continue  # a chunk of overlong records: read on
                raise
            parts.append(part)
            have += len(part)
        if not parts:
            raise RecipeError(f"no general sample fits --seq-len {cfg.seq_len}")
        pool = TokenStore.concat(parts) if len(parts) > 1 else parts[0]
        if len(pool) > need:
            pool = pool.take(np.arange(need, dtype=np.int64))
        store, self.general_counts = draw_general(pool, need, reuse=cfg.general_reuse)
        return store, used - have

    def evaluate(self, model: Any, label: str, pairs: list[dict] | None = None) -> dict[str, Any]:
        """Greedy answers to the test prompts (``pairs``: others, e.g. the dev split) scored by the task."""
        from tqdm.auto import tqdm

        from tellneo.recipes.evaluate import task_accuracy

        cfg, pairs = self.cfg, self.test_pairs if pairs is None else pairs
        cached = self._before_cache_file(pairs) if label == "before" else None
        if cached is not None and cached.is_file():
            return json.loads(cached.read_text())
        with tqdm(total=len(pairs), desc=f"task accuracy ({label})", unit="prompt",
                  disable=not self.progress) as bar:
            result = task_accuracy(model, self.tokenizer, pairs, score=self.score, prompt_prefix=self.prefix,
                                   batch_size=cfg.eval_batch_size, max_new_tokens=cfg.answer_tokens(),
                                   progress=bar, metrics=task_metrics(cfg))
        if cached is not None and self.state.is_main_process:
            from tellneo.io import atomic_write_text

            atomic_write_text(cached, json.dumps(result))
        return result

    def _before_cache_file(self, pairs: list[dict]) -> Path | None:
        """Where the untrained model's scores of ``pairs`` are cached (None without ``before_cache``)."""
        if self.before_cache is None:
            return None
        import hashlib

        import torch

        from tellneo.models import model_source_id

        key = json.dumps({"model": model_source_id(self.cfg.model), "pairs": pairs, "prefix": self.prefix,
                          "answer_tokens": self.cfg.answer_tokens(), "batch": self.cfg.eval_batch_size,
                          "task": None if self.cfg.task_file else self.cfg.task, "torch": torch.__version__,
                          "code": _scoring_code_digest()}, sort_keys=True)
        return self.before_cache / f"before-{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"

    def callbacks(self) -> list[Any]:
        if not self.cfg.selecting:
            return []
        from tellneo.recipes.dev_selection import DevSelection

        steps = pass_end_steps(self.dataset, self.cfg.exposures, self.global_batch)
        self.selection = DevSelection(steps, lambda model, label: self.evaluate(model, label, self.dev_pairs),
                                      self.out, is_main=self.state.is_main_process)
        return [self.selection]

    def after_train(self, model: Any) -> None:
        if self.selection is not None:
            self.state.wait_for_everyone()  # under torchrun the main process writes the best weights
            chosen = self.selection.restore_best(model)
            logger.info("dev selection: %d passes chosen (dev accuracy %.3f)", chosen,
                        self.selection.scores[chosen]["accuracy"])

    def trainable_model(self) -> Any:
        return attach_lora(self.model, self.lora) if self.mode == "lora" else self.model.requires_grad_(True)

    def trainer_inputs(self) -> tuple[Any, Any]:
        from tellneo.data import PackedCollator

        return self.dataset, PackedCollator("rows")

    def plot(self, metrics: list[dict[str, Any]], before: dict[str, Any] | None = None,
             after: dict[str, Any] | None = None, final_step: int = 0) -> None:
        from tellneo.recipes.reporting import plot_loss_curve

        if before is None:  # the curve of the mixed stream only; accuracy is no point on it
            plot_loss_curve(metrics, self.out / "loss_curve.png",
                            title=f"tellneo tell ({self.arm}): CE on the mixed stream", keys=("loss",))

    def save(self, model: Any, timings: dict[str, float]) -> dict[str, str]:
        from tellneo.recipes.outputs import save_model_outputs

        cfg = self.cfg
        return save_model_outputs(model, self.out, self.tokenizer, mode=cfg.mode, save_merged=cfg.save_merged,
                                  merged_dtype=cfg.merged_dtype, save_gguf=cfg.save_gguf, model_source=cfg.model)

    def exposure_counts(self, exposure: dict[str, int]) -> dict[str, Any]:
        """The summary's exposure counts: task/general samples and tokens shown, distinct and reused general
        samples, and ``task_samples_planned`` (``N * k`` with ``exposures``, else None)."""
        cfg = self.cfg
        k = self.selection.best() if self.selection is not None else cfg.passes()
        planned = len(self.train_pairs) * k if k is not None else None
        if planned is not None and exposure["task_samples"] < planned:
            logger.warning("task samples shown %d < N*k = %d (the run's --max-steps ends before the planned "
                           "exposures)", exposure["task_samples"], planned)
        return {"exposures": k, "general_per_task": cfg.general_per_task_occurrence()
                if cfg.method == "tell" else 0.0, "task_samples_planned": planned,
                "task_samples_shown": exposure["task_samples"], "general_samples_shown": exposure["general_samples"],
                **self.general_counts, "task_tokens_seen": exposure["task_tokens"],
                "general_tokens_seen": exposure["general_tokens"]}

    def summary(self, run: TrainedRun) -> tuple[dict[str, Any], str]:
        from tellneo.recipes.reporting import markdown_table

        cfg, before, after, steps = self.cfg, run.before, run.after, run.trainer.state.global_step
        selection = self.selection.report() if self.selection is not None else None
        shown_steps = self.selection.checkpoints[selection["chosen"]] if selection else steps
        exposure = task_exposure(self.dataset, shown_steps, run.global_batch)  # what the kept weights saw
        summary = {
            "recipe": "tell", "method": cfg.method, "arm": self.arm, "mode": cfg.mode, "task": self.task_source,
            "general": self.general_source, "anchor_chars": len(self.prefix), "task_ratio": cfg.effective_task_ratio() if
            cfg.method == "tell" else 1.0, "spread": cfg.spread if cfg.method == "tell" else None,
            "train_task_pairs": len(self.train_pairs), "task_repeats_per_epoch": self.dataset.repeats,
            "overlong": self.overlong, "test_pairs": len(self.test_pairs), "steps": steps,
            "selection": selection, "selected_step": shown_steps, "dev_pairs": len(self.dev_pairs),
            "neutral_anchor": cfg.neutral_anchor,
            "global_batch_rows": run.global_batch, "seq_len": cfg.seq_len, "rows_per_epoch": self.dataset.num_rows,
            "exposure": exposure, **self.exposure_counts(exposure), "trainable_parameters": run.trainable,
            "total_parameters": run.total, "lora": self.lora.to_dict() if cfg.mode == "lora" else None,
            "learning_rate": self.train.learning_rate,
            "before": {k: before[k] for k in ("accuracy", "correct", "n", "metrics", "per_prompt", "valid_per_prompt")
                       if k in before},
            "after": {k: after[k] for k in ("accuracy", "correct", "n", "metrics", "per_prompt", "valid_per_prompt")
                      if k in after},
            "examples_after": after["examples"],
        }
        table = markdown_table(
            ["held-out task metric", "before", "after"],
            [["exact-match accuracy", before["accuracy"], after["accuracy"]],
             ["correct / test prompts", f"{before['correct']} / {before['n']}",
              f"{after['correct']} / {after['n']}"],
             *[[METRIC_LABELS.get(name, name.replace("_", " ")), before["metrics"][name], value]
               for name, value in after.get("metrics", {}).items() if name != "exact"]],
        )
        return summary, table
