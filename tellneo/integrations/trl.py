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

TRL's ``DistillationTrainer`` already computes its loss with its own chunked kernel (no full logits), so it has no
tellneo subclass here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tellneo.integrations.transformers import fused_head_loss, read_head
from tellneo.recipes.common import last_hidden_state, teacher_hidden_state

try:  # TRL >= 0.2x moved GKD to trl.experimental
    from trl.experimental.gkd import GKDTrainer
except ImportError:  # pragma: no cover - older TRL
    from trl import GKDTrainer

__all__ = ["FusedGKDTrainer", "gkd_fused_loss"]


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
    teacher_hidden = teacher_hidden_state(teacher, model_inputs)[:, :-1]
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
