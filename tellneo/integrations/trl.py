"""TRL's distillation trainers with tellneo's fused loss: the ``[tokens, vocab]`` logits of neither the student
nor the teacher are built.

* :class:`FusedGKDTrainer` — TRL's ``GKDTrainer`` (on-policy generalised knowledge distillation, Agarwal et al.)
  whose ``compute_loss`` takes both models' final hidden states and calls :func:`tellneo.ops.fused_linear_kd`
  with ``divergence="jsd"`` and the trainer's ``beta`` (TRL's convention: ``beta = 0`` forward KL, ``beta = 1``
  reverse KL), KD only (``alpha = 1``), on the tokens whose shifted label is not ``-100``, normalised like the
  stock loss (by ``num_items_in_batch`` when the Trainer passes it, else by this batch's token count). As in the
  stock trainer, ``temperature`` is the sampling temperature of on-policy generation and does not enter the loss.
  Everything else (on-policy sampling with probability ``lmbda``, ``seq_kd``, the collator, PEFT, logging) is
  GKDTrainer's own.

Use it exactly like ``GKDTrainer`` (same arguments, plus ``fused_backend`` for the op's backend)::

    from trl.experimental.gkd import GKDConfig
    from tellneo.integrations.trl import FusedGKDTrainer
    trainer = FusedGKDTrainer(model=student, teacher_model=teacher, args=GKDConfig(...), train_dataset=ds,
                              processing_class=tokenizer)

* :class:`FusedDistillationTrainer` — TRL's ``DistillationTrainer`` (when the installed TRL has it) whose
  per-batch loss is tellneo's fused op instead of TRL's own chunked divergence (which also never builds full
  logits): the same generalised JSD with the trainer's ``beta`` and ``temperature`` over the completion tokens
  (times ``tool_mask`` in multi-turn runs), normalised the same way. Text models only: a batch carrying image
  fields is refused. The ``entropy`` metric is not computed by the fused loss and is logged as ``nan``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tellneo.recipes.model_parts import hidden_state_no_grad, last_hidden_state
from tellneo.recipes.head import fused_head_loss, read_head

try:  # TRL >= 0.2x moved GKD to trl.experimental
    from trl.experimental.gkd import GKDTrainer
except ImportError:  # pragma: no cover - older TRL
    from trl import GKDTrainer

try:
    from trl import DistillationTrainer
except ImportError:  # pragma: no cover - TRL without it
    DistillationTrainer = None

__all__ = ["FusedDistillationTrainer", "FusedGKDTrainer", "gkd_fused_loss"]


def gkd_fused_loss(student: nn.Module, teacher: nn.Module, inputs: dict[str, Any], *, beta: float,
                   num_items_in_batch: Any = None, backend: str = "auto") -> torch.Tensor:
    """GKD's generalised JSD between ``teacher`` and ``student`` on ``inputs`` (``input_ids``, ``attention_mask``,
    ``labels`` ``[B, T]``, labels unshifted, -100 = not trained), from hidden states with the fused op.

    Position ``t`` predicts token ``t + 1``; the per-token divergence (summed over the vocabulary) is summed over
    the trained tokens and divided by ``num_items_in_batch`` (or by their count when it is None). Returns a
    float32 scalar with gradients for the student only.
    """
    model_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask") if inputs.get(k) is not None}
    student_hidden = last_hidden_state(student, model_inputs)[:, :-1]
    teacher_hidden = hidden_state_no_grad(teacher, model_inputs)[:, :-1]
    labels = inputs["labels"][:, 1:].to(student_hidden.device)
    valid = labels != -100
    return fused_head_loss(
        student_hidden[valid], labels[valid], read_head(student), teacher_hidden[valid], read_head(teacher),
        num_items_in_batch=num_items_in_batch, alpha=1.0, divergence="jsd", beta=beta, backend=backend,
    )


class FusedGKDTrainer(GKDTrainer):
    """``GKDTrainer`` whose loss is :func:`gkd_fused_loss` (tellneo's fused lm_head + JSD): same value and
    gradients as the stock loss, without the two ``[B, T, V]`` logits tensors and their softmax copies.

    Extra keyword argument: ``fused_backend`` (``"auto"``, ``"torch"``, ``"triton"``) for
    :func:`tellneo.ops.fused_linear_kd`.
    """

    def __init__(self, *args: Any, fused_backend: str = "auto", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fused_backend = fused_backend

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        self.teacher_model.eval()
        loss = gkd_fused_loss(model, self.teacher_model, inputs, beta=self.beta,
                              num_items_in_batch=num_items_in_batch, backend=self.fused_backend)
        if return_outputs:  # evaluation asked for logits (compute_metrics): one extra forward, as SFTTrainer does
            with torch.no_grad():
                outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            return loss, outputs
        return loss


_IMAGE_FIELDS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                 "token_type_ids", "mm_token_type_ids", "image_position_ids")

if DistillationTrainer is not None:

    class FusedDistillationTrainer(DistillationTrainer):
        """``trl.DistillationTrainer`` whose loss is :func:`tellneo.ops.fused_linear_kd` (``divergence="jsd"``,
        the trainer's ``beta`` and ``temperature``, KD only). Extra keyword argument: ``fused_backend``."""

        def __init__(self, *args: Any, fused_backend: str = "auto", **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.fused_backend = fused_backend

        def _compute_loss(self, unwrapped_student: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            present = [k for k in _IMAGE_FIELDS if k in inputs]
            if present:
                raise ValueError(f"FusedDistillationTrainer handles text models only; this batch carries {present} "
                                 "(use trl.DistillationTrainer for vision-language models)")
            input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
            attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
            loss_mask = inputs["completion_mask"]
            if "tool_mask" in inputs:
                loss_mask = loss_mask * inputs["tool_mask"]
            keep = inputs["completion_ids"].size(1)
            # TRL's own hidden-state helper and wrapper routing, so DDP / FSDP see both forwards as in the stock loss
            student_hidden = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, keep)
            self.teacher_model.eval()
            unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
            with torch.no_grad():
                teacher_hidden = self._forward_redirection(
                    self.teacher_model, unwrapped_teacher, self._get_last_hidden_state, unwrapped_teacher,
                    input_ids, attention_mask, keep)
            valid = (loss_mask != 0).to(student_hidden.device)
            out = fused_head_loss(
                student_hidden[valid], None, read_head(unwrapped_student), teacher_hidden[valid].to(
                    student_hidden.device), read_head(unwrapped_teacher), num_items_in_batch=num_items_in_batch,
                alpha=1.0, divergence="jsd", beta=self.beta, temperature=self.temperature,
                backend=self.fused_backend, return_parts=True,
            )
            nan = torch.full((), float("nan"), device=out.loss.device)  # entropy: not computed by the fused op
            return out.loss, nan, out.num_tokens
