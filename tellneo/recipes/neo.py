"""LLM-NEO: distil a teacher into a smaller student that trains LoRA adapters only, with the fused KD loss.

* :func:`build_student` — a layer-dropped copy of a Llama- or GPT-2-family teacher (same tokenizer, embeddings,
  norms and ``lm_head`` copied), and :func:`select_layers` for the layer choice.
* :func:`check_compatible` — teacher and student must share token ids (a teacher vocab *padded* beyond the
  student's is fine); raises :class:`VocabMismatchError` otherwise.
* :class:`KDSettings` and :data:`PRESETS` (:data:`DEFAULT_PRESET`, :data:`NEO_PRESET`) — loss options, and the named
  distillation configurations (the NEO authors' among them).
* :class:`KDTrainer` (alias ``NeoTrainer``) — a ``transformers.Trainer`` whose loss is
  ``(1 - alpha) CE(student, labels) + alpha KD(teacher || student)`` from hidden states via
  :func:`tellneo.ops.fused_linear_kd` (neither model's ``[tokens, vocab]`` logits are built).

Bringing an existing smaller student instead of a layer-dropped copy (e.g. Llama-3.2-1B for a Llama-3.1-8B
teacher): load it as usual and pass it to :func:`check_compatible` and :class:`KDTrainer`. The hidden sizes may
differ (each model is projected by its own ``lm_head``). The token ids must mean the same thing in both models:
the student's vocabulary must be a prefix of the teacher's. A teacher whose embedding table is *larger* than the
student's (vocabularies padded to a multiple of 64/128, or a few extra special tokens at the end) is handled by
dropping the teacher rows ``>= V_student`` and renormalising the teacher over the shared ids (see
:func:`tellneo.ops.fused_linear_kd`); any other difference (another tokenizer, a smaller teacher table) is refused.

Multi-process: :class:`KDTrainer` runs unchanged under ``torchrun`` / ``accelerate launch`` (DDP): the student is
wrapped by the Trainer, each rank holds its own frozen teacher, the loss is normalised by the token count of the
global batch (``num_items_in_batch`` gathered across ranks), so N ranks give the gradients of one process with the
same global batch. For models that do not fit one device, use FSDP2: the student through the Trainer's ``fsdp`` /
``fsdp_config={"version": 2, ...}`` arguments (or ``accelerate launch --use_fsdp --fsdp_version 2``), the teacher
sharded yourself with ``fully_shard`` (each decoder layer, then the root) before it is passed in. Both are called
through their root modules, so FSDP's hooks gather their parameters (tests/recipes/test_fsdp.py: 2 gloo
processes, both sharded, give the unsharded loss and FSDP's mean of the unsharded gradients). Or precompute the
teacher's top-k log-probabilities once with :func:`tellneo.recipes.offline.precompute_teacher_topk` and train
without it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer

from tellneo.recipes.errors import RecipeError
from tellneo.recipes.model_parts import hidden_state_no_grad, last_hidden_state, output_head
from tellneo.recipes.settings import DEFAULT_PRESET, NEO_PRESET, PRESETS, KDSettings, NeoPreset
from tellneo.recipes.head import OutputHead, fused_head_loss, head_transform, read_head
from tellneo.recipes.training import RecipeTrainerMixin

logger = logging.getLogger("tellneo")

__all__ = [
    "DEFAULT_PRESET",
    "KDSettings",
    "KDTrainer",
    "NEO_PRESET",
    "NeoPreset",
    "NeoTrainer",
    "PRESETS",
    "VocabMismatchError",
    "build_student",
    "check_compatible",
    "parse_layers",
    "select_layers",
]

TOPK_IDS, TOPK_LOGPROBS = "teacher_topk_ids", "teacher_topk_logprobs"


# ------------------------------------------------------------------------------------------- student construction
LayerSpec = str | float | Sequence[int]


def select_layers(num_layers: int, layers: LayerSpec = "every_other", *, keep: int | None = None) -> list[int]:
    """Indices of the teacher's decoder layers the student keeps (sorted, distinct).

    ``layers``:
      * ``"every_other"`` — layers 0, 2, 4, ... (half the depth, rounded up);
      * ``"first_n"`` — the first ``keep`` layers (default: half, rounded up);
      * a float ratio in (0, 1] — ``round(ratio * num_layers)`` layers evenly spaced from the first to the last;
      * a sequence of ints — exactly those layers.
    """
    if num_layers <= 0:
        raise ValueError(f"the teacher has no decoder layers (num_layers={num_layers})")
    if isinstance(layers, str):
        if layers == "every_other":
            chosen = list(range(0, num_layers, 2))
        elif layers == "first_n":
            n = keep if keep is not None else -(-num_layers // 2)
            if not 1 <= n <= num_layers:
                raise ValueError(f"first_n: keep must be in [1, {num_layers}], got {n}")
            chosen = list(range(n))
        else:
            raise ValueError(f"layers must be 'every_other', 'first_n', a ratio or a list of indices, got {layers!r}")
    elif isinstance(layers, float):
        if not 0.0 < layers <= 1.0:
            raise ValueError(f"a layer ratio must be in (0, 1], got {layers}")
        n = max(1, round(layers * num_layers))
        chosen = sorted({round(i * (num_layers - 1) / max(n - 1, 1)) for i in range(n)}) if n > 1 else [0]
    else:
        chosen = [int(i) for i in layers]
        if not chosen:
            raise ValueError("the list of layers to keep is empty")
        bad = [i for i in chosen if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"layer indices {bad} are out of range [0, {num_layers})")
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"layer indices must be distinct, got {chosen}")
        chosen = sorted(chosen)
    return chosen


def parse_layers(text: str) -> tuple[LayerSpec, int | None]:
    """Parse a command-line layer spec: ``every_other``, ``first_n`` / ``first_n:K``, a ratio (``0.5``) or a
    comma-separated list (``0,2,4``). Returns ``(layers, keep)`` for :func:`select_layers`."""
    text = text.strip()
    if text in ("every_other", "first_n"):
        return text, None
    if text.startswith("first_n:"):
        return "first_n", int(text.split(":", 1)[1])
    if "," in text or text.isdigit():
        return [int(t) for t in text.split(",") if t.strip()], None
    return float(text), None


# where decoder layers live: ``.model.layers`` (Llama, Qwen, Mistral, Gemma, Phi, OLMo, ...) or ``.transformer.h``
# (GPT-2, GPT-J, GPT-Neo, Falcon, Bloom, ...); the body is the model's ``base_model_prefix`` attribute
LAYER_LISTS = ("layers", "h")


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(state-dict key prefix of the layers, e.g. "model.layers.", the layer list)``."""
    prefix = getattr(model, "base_model_prefix", "model")
    body = getattr(model, prefix, None)
    for name in LAYER_LISTS:
        layers = getattr(body, name, None)
        if isinstance(layers, nn.ModuleList):
            return f"{prefix}.{name}.", layers
    raise TypeError(f"{type(model).__name__} has no decoder layer list build_student knows: supported layouts are "
                    f".{prefix}.layers (Llama family) and .{prefix}.h (GPT-2 family)")


def build_student(
    teacher: nn.Module, layers: LayerSpec = "every_other", *, keep: int | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """A smaller student: the teacher's class and weights with only the decoder layers :func:`select_layers`
    picks (``.model.layers`` of the Llama family or ``.transformer.h`` of the GPT-2 family; renumbered 0..n-1, so
    ``layer_idx`` of the attention caches is right), and the embeddings, final norm and ``lm_head`` copied (a tied
    head stays tied). The student is a new model in ``dtype`` (default: the teacher's) with
    ``config.num_hidden_layers`` set and ``config.tellneo_teacher_layers`` recording the kept indices; the
    teacher is not modified. GGUF quantization metadata is not carried over (the copy is trainable).

    Use the teacher's tokenizer with it. Raises TypeError, naming the supported layouts, for a model with
    neither layer list.
    """
    prefix, teacher_layers = _decoder_layers(teacher)
    kept = select_layers(len(teacher_layers), layers, keep=keep)
    config = copy.deepcopy(teacher.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.num_hidden_layers = len(kept)
    if isinstance(getattr(config, "layer_types", None), list) and len(config.layer_types) == len(teacher_layers):
        config.layer_types = [config.layer_types[i] for i in kept]
    config.tellneo_teacher_layers = kept
    dtype = dtype or next(teacher.parameters()).dtype
    student = type(teacher)(config).to(dtype)

    new_index = {old: new for new, old in enumerate(kept)}
    state: dict[str, torch.Tensor] = {}
    for key, value in teacher.state_dict().items():
        if key.startswith(prefix):
            old, rest = key[len(prefix):].split(".", 1)
            if int(old) not in new_index:
                continue
            key = f"{prefix}{new_index[int(old)]}.{rest}"
        state[key] = value.detach().to(dtype).clone()
    missing, unexpected = student.load_state_dict(state, strict=False)
    if unexpected or missing:
        raise RuntimeError(f"build_student: weights do not map (missing {missing}, unexpected {unexpected})")
    if getattr(config, "tie_word_embeddings", False):
        student.tie_weights()
    _, student_layers = _decoder_layers(student)
    for i, layer in enumerate(student_layers):  # fresh modules already carry i; make it explicit for custom classes
        for module in layer.modules():  # the attention's layer_idx indexes the KV cache
            if hasattr(module, "layer_idx"):
                module.layer_idx = i
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student.train(teacher.training)


class VocabMismatchError(RecipeError):
    """Teacher and student cannot be distilled: their token ids do not mean the same thing."""


def check_compatible(teacher: nn.Module, student: nn.Module, teacher_tokenizer: Any = None,
                     student_tokenizer: Any = None) -> None:
    """Raise :class:`VocabMismatchError` unless the student's token ids are a prefix of the teacher's.

    Checks the output heads (``V_teacher >= V_student``; extra teacher rows are padding the fused loss drops) and,
    when both tokenizers are given, that every student token has the same id in the teacher's tokenizer and that
    the special tokens agree.
    """
    tw, _ = output_head(teacher)
    sw, _ = output_head(student)
    if tw.shape[0] < sw.shape[0]:
        raise VocabMismatchError(
            f"the teacher's output head has {tw.shape[0]} rows but the student's has {sw.shape[0]}: the teacher "
            "must cover every student token id (a larger, padded teacher table is fine)")
    if teacher_tokenizer is None or student_tokenizer is None or teacher_tokenizer is student_tokenizer:
        return
    tv, sv = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    differ = [tok for tok, i in sv.items() if tv.get(tok) != i]
    if differ:
        raise VocabMismatchError(
            f"teacher and student tokenizers differ: {len(differ)} student tokens have another id (or none) in "
            f"the teacher's tokenizer, e.g. {differ[:3]}; NEO needs one shared tokenizer")
    if len(student_tokenizer) > sw.shape[0]:
        raise VocabMismatchError(f"the student tokenizer has {len(student_tokenizer)} tokens but its output head "
                                 f"only {sw.shape[0]} rows")
    for attr in ("eos_token_id", "bos_token_id", "pad_token_id"):
        a, b = getattr(teacher_tokenizer, attr, None), getattr(student_tokenizer, attr, None)
        if a is not None and b is not None and a != b:
            raise VocabMismatchError(f"teacher and student tokenizers disagree on {attr} ({a} vs {b})")


# ------------------------------------------------------------------------------------------------- trainer
class KDTrainer(RecipeTrainerMixin, Trainer):
    """``transformers.Trainer`` with the loss ``(1 - alpha) CE + alpha KD`` from hidden states: NEO distillation,
    and with ``kd.alpha == 0`` (no teacher) the fused-CE trainer of the CE-only arms and of TELL.

    Args (besides the Trainer's):
        teacher: the frozen teacher (put in eval mode, ``requires_grad`` off, moved to ``args.device`` unless it
            was dispatched with a ``device_map``), or None
            for CE only (``kd.alpha == 0``) or offline KD from batches carrying ``teacher_topk_ids`` /
            ``teacher_topk_logprobs`` ``[B, T, k]`` (see :mod:`tellneo.recipes.offline`).
        kd: :class:`KDSettings`.

    Batches: ``input_ids`` / ``labels`` ``[B, T]`` in the unshifted HF convention (-100 = not trained), optional
    ``position_ids`` (packed rows: samples are isolated when there is no ``attention_mask``) and
    ``attention_mask``. ``compute_loss`` takes the student's final hidden states (the model is called through its
    wrappers with ``logits_to_keep`` empty, so no logits) and the teacher's (the same way, under ``no_grad``),
    shifts the labels left by one (position t predicts token t+1; CE and KD share that one mask), keeps the rows
    of trained positions only and calls :func:`tellneo.ops.fused_linear_kd` with both ``lm_head`` weights and
    each model's own final-logit transform (:func:`tellneo.recipes.head.head_transform`: Gemma-2/3 softcap,
    Granite / Cohere logit scales), so CE and KD are those of ``model(...).logits``; a model whose head is not a
    plain Linear with a known transform is refused at construction (``UnsupportedHeadError``). Teacher and
    student may be FSDP2-sharded (``fully_shard``): both are called through their root modules and a sharded head
    weight is gathered for the loss.

    Normalisation: the Trainer counts the trained tokens of the whole accumulated (and, under DDP, gathered)
    batch into ``num_items_in_batch``; the loss is divided by it, so gradient accumulation and DDP give the
    gradients of one big batch. CE and KD (unweighted, per token) are logged as ``ce`` and ``kd`` beside ``loss``.
    Under ``torch.autocast`` (``bf16=True``) the head matmuls run in the autocast dtype like a plain ``lm_head``
    would; the loss itself is accumulated in fp32.
    """

    def __init__(self, *args: Any, teacher: nn.Module | None = None, kd: KDSettings = KDSettings(),
                 **kwargs: Any) -> None:
        training_args = kwargs.get("args") if "args" in kwargs else (args[1] if len(args) > 1 else None)
        if training_args is not None and training_args.remove_unused_columns:
            # The Trainer would drop the top-k columns (they are not arguments of model.forward).
            training_args.remove_unused_columns = False
        super().__init__(*args, **kwargs)
        self.kd = kd
        self.teacher = teacher
        # Each model's own final-logit transform (Gemma-2 softcap, Granite / Cohere scales); refuses unknown heads.
        self._student_transform = head_transform(self.model)
        self._teacher_transform = head_transform(teacher) if teacher is not None else None
        if teacher is not None:
            teacher.eval().requires_grad_(False)
            if getattr(teacher, "hf_device_map", None) is None:  # a teacher dispatched with device_map stays put
                teacher.to(self.args.device)
            check_compatible(teacher, self.model)
        # Our loss consumes num_items_in_batch, so let the Trainer count it (over labels[..., 1:]).
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self._part_sums: torch.Tensor | None = None
        self._parts_since_step = 0

    # -- loss ---------------------------------------------------------------------------------------------------
    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        labels = inputs["labels"]
        model_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
        student_hidden = last_hidden_state(model, model_inputs)
        shifted = F.pad(labels[:, 1:], (0, 1), value=-100)

        teacher_hidden = teacher_head = topk = None
        if self.kd.alpha > 0:
            if TOPK_IDS in inputs:
                topk = (inputs[TOPK_IDS], inputs[TOPK_LOGPROBS])
            elif self.teacher is not None:
                teacher_hidden = hidden_state_no_grad(self.teacher, model_inputs)
                teacher_head = read_head(self.teacher, self._teacher_transform)
            else:
                raise ValueError("KDTrainer: kd.alpha > 0 needs a teacher model or batches with teacher top-k "
                                 f"({TOPK_IDS}, {TOPK_LOGPROBS}); use alpha=0 for CE only")
        # Only trained positions reach the output heads: prompt, padding and sample-boundary rows (label -100)
        # would contribute neither CE nor KD but cost two [rows, vocab] projections each.
        valid = shifted != -100
        student_hidden, shifted = student_hidden[valid], shifted[valid]
        if teacher_hidden is not None:
            teacher_hidden = teacher_hidden[valid]
        if topk is not None:
            topk = (topk[0][valid], topk[1][valid])
        out = self._fused_loss(model, student_hidden, shifted, teacher_hidden, teacher_head, topk, num_items_in_batch)
        loss = out.loss
        scale = 1.0
        if num_items_in_batch is not None and self.args.average_tokens_across_devices and \
                self.accelerator.num_processes > 1:
            # num_items_in_batch counts every rank's tokens and DDP averages gradients over ranks
            scale = float(self.accelerator.num_processes)
            loss = loss * scale
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        if model.training:
            self._track_parts(out.ce, out.kd, scale, num_items_in_batch is None)
        if return_outputs:
            return loss, {"ce": out.ce, "kd": out.kd}
        return loss

    def _fused_loss(self, model: nn.Module, student_hidden: torch.Tensor, labels: torch.Tensor,
                    teacher_hidden: torch.Tensor | None, teacher_head: OutputHead | None,
                    topk: tuple[torch.Tensor, torch.Tensor] | None, num_items_in_batch: Any) -> Any:
        return fused_head_loss(
            student_hidden, labels, read_head(model, self._student_transform), teacher_hidden, teacher_head,
            teacher_topk=topk, divergence=self.kd.divergence, beta=self.kd.beta, temperature=self.kd.temperature,
            t2_scale=self.kd.t2_scale, alpha=self.kd.alpha, num_items_in_batch=num_items_in_batch,
            return_parts=True, backend=self.kd.backend,
        )

    # -- logging of the parts -------------------------------------------------------------------------------------
    def _track_parts(self, ce: torch.Tensor, kd: torch.Tensor, scale: float, per_micro_batch_mean: bool) -> None:
        parts = torch.stack([ce.detach().float(), kd.detach().float()]) * scale
        if per_micro_batch_mean:
            parts = parts / self.args.gradient_accumulation_steps
        if self._part_sums is None:
            self._part_sums = torch.zeros(2, device=parts.device)
            self._parts_since_step = self.state.global_step
        self._part_sums += parts

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._part_sums is not None:
            steps = max(1, self.state.global_step - self._parts_since_step)
            sums = self.accelerator.gather(self._part_sums[None]).mean(0) if self.accelerator.num_processes > 1 \
                else self._part_sums
            ce, kd = (sums / steps).tolist()
            logs = {**logs, "ce": round(ce, 6), "kd": round(kd, 6)}
            self._part_sums.zero_()
            self._parts_since_step = self.state.global_step
        super().log(logs, *args, **kwargs)


#: The former name of :class:`KDTrainer`.
NeoTrainer = KDTrainer
