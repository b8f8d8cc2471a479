"""Evaluation helpers for the recipes.

* :func:`distill_metrics` — on held-out packed rows: the student's cross-entropy, the KL from the teacher
  (``KL(p_teacher || q_student)`` per trained token) and top-1 agreement with the teacher, plus the teacher's own
  CE for reference. Nothing of size ``[tokens, vocab]`` is kept: CE, KL and teacher CE are
  :func:`tellneo.ops.fused_linear_kd` with ``reduction="sum"`` (the same math as the training loss), the
  arg-maxes come from token chunks.
* :func:`task_accuracy` — greedy generation on prompt/response pairs and exact-match scoring (TELL).
* :func:`eval_batches` — held-out rows of a :class:`tellneo.data.PackedDataset` as model inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tellneo.ops import fused_linear_kd
from tellneo.recipes.model_parts import hidden_state_no_grad
from tellneo.recipes.head import OutputHead, head_logits, kd_transform_kwargs, read_head

__all__ = ["distill_metrics", "eval_batches", "render_prompt", "task_accuracy"]

_TOPK_IDS, _TOPK_LOGPROBS = "teacher_topk_ids", "teacher_topk_logprobs"


def eval_batches(dataset: Any, batch_size: int, *, extra: Callable[[Sequence[int]], dict[str, Any]] | None = None
                 ) -> Iterator[dict[str, torch.Tensor]]:
    """All rows of ``dataset`` (a PackedDataset's current epoch, in order) as ``{"input_ids", "labels",
    "position_ids"}`` batches of ``[<=batch_size, seq_len]``; ``extra(indices)`` may add columns (e.g. top-k)."""
    for first in range(0, len(dataset), batch_size):
        idx = list(range(first, min(len(dataset), first + batch_size)))
        out = dataset.batch(idx)
        batch = {k: out[k] for k in ("input_ids", "labels", "position_ids")}
        if extra is not None:
            batch.update(extra(idx))
        yield batch


def _dense_sums(sh: torch.Tensor, student: OutputHead, th: torch.Tensor, teacher: OutputHead, labels: torch.Tensor,
                temperature: float, chunk: int) -> dict[str, float]:
    """Sums over rows of CE, KL(teacher || student) and teacher CE (from :func:`tellneo.ops.fused_linear_kd`, each
    model's own final-logit transform included; a padded teacher head is compared on the shared ids, as in
    training) and top-1 agreement (arg-maxes of ``[chunk, V]`` logits)."""
    vocab = student.weight.shape[0]
    out = fused_linear_kd(sh, student.weight, th, teacher.weight, labels, student_bias=student.bias,
                          teacher_bias=teacher.bias, divergence="forward_kl", temperature=temperature, alpha=0.5,
                          reduction="sum", return_parts=True,
                          **kd_transform_kwargs(student.transform, teacher.transform))
    teacher_ce = fused_linear_kd(th, teacher.weight, None, None, labels, student_bias=teacher.bias, alpha=0.0,
                                 reduction="sum", **kd_transform_kwargs(teacher.transform))
    agree = 0.0
    for a in range(0, sh.shape[0], chunk):
        z = head_logits(student, sh[a : a + chunk])
        u = head_logits(teacher, th[a : a + chunk])[:, :vocab]
        agree += float((z.argmax(-1) == u.argmax(-1)).sum())
    return {"ce": float(out.ce), "kl": float(out.kd), "agree": agree, "teacher_ce": float(teacher_ce)}


@torch.no_grad()
def distill_metrics(
    student: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    teacher: nn.Module | None = None,
    teacher_cache: dict[int, torch.Tensor] | None = None,
    temperature: float = 1.0,
    chunk: int = 512,
    progress: Any = None,
) -> dict[str, float]:
    """Held-out metrics of ``student`` against ``teacher`` over the trained tokens of ``batches``.

    Batches: ``input_ids`` / ``labels`` (unshifted, -100 = not evaluated) ``[B, T]`` and optional
    ``position_ids``. Without a teacher they may carry offline ``teacher_topk_ids`` / ``_logprobs``: ``kl`` is
    then the top-k bucket KL of :func:`tellneo.ops.fused_linear_kd` (a lower bound of the full KL) and agreement
    uses the teacher's top-1 id.

    ``teacher_cache``: a dict kept between calls (e.g. before and after training) that stores the teacher's
    hidden states of the trained positions per batch index, so the teacher's decoder runs only once.

    Returns ``{"ce", "ppl", "kl", "top1_agreement", "teacher_ce", "tokens"}``: per-token means (``kl`` at
    ``temperature``) of each model's own logits (final-logit softcap / scale included, see
    :mod:`tellneo.recipes.head`), entries that need a teacher are NaN without one. Logits exist only in ``[chunk, V]``
    pieces. The student is put in eval mode and restored afterwards.
    """
    was_training = student.training
    student.eval()
    if teacher is not None:
        teacher.eval()
    s_head = read_head(student)
    sw, sb = s_head.weight, s_head.bias
    student_transform = kd_transform_kwargs(s_head.transform)
    t_head = read_head(teacher) if teacher is not None else None
    sums = dict.fromkeys(("ce", "kl", "agree", "teacher_ce"), 0.0)
    tokens = 0
    mode = "none"
    device = sw.device
    try:
        for index, batch in enumerate(batches):
            inputs = {k: batch[k].to(device) for k in ("input_ids", "position_ids", "attention_mask") if k in batch}
            labels = F.pad(batch["labels"][:, 1:], (0, 1), value=-100).to(device)
            valid = labels != -100
            n = int(valid.sum())
            if n == 0:
                continue
            sh = hidden_state_no_grad(student, inputs)[valid].to(sw.dtype)
            lab = labels[valid]
            if teacher is not None:
                th = teacher_cache.get(index) if teacher_cache is not None else None
                if th is None:
                    th = hidden_state_no_grad(teacher, inputs)[valid].to(t_head.weight.dtype)
                    if teacher_cache is not None:
                        teacher_cache[index] = th
                part = _dense_sums(sh, s_head, th, t_head, lab, temperature, chunk)
                mode = "dense"
            elif _TOPK_IDS in batch:
                ids, lps = batch[_TOPK_IDS].to(device)[valid], batch[_TOPK_LOGPROBS].to(device)[valid]
                out = fused_linear_kd(sh, sw, None, None, lab, student_bias=sb, teacher_topk=(ids, lps),
                                      temperature=temperature, alpha=0.5, reduction="sum", return_parts=True,
                                      **student_transform)
                top1 = torch.cat([head_logits(s_head, sh[a : a + chunk]).argmax(-1) for a in range(0, n, chunk)])
                part = {"ce": float(out.ce), "kl": float(out.kd), "agree": float((top1 == ids[:, 0]).sum()),
                        "teacher_ce": 0.0}
                mode = "topk"
            else:
                part = {"ce": float(fused_linear_kd(sh, sw, None, None, lab, student_bias=sb, alpha=0.0,
                                                    reduction="sum", **student_transform))}
            for key, value in part.items():
                sums[key] += value
            tokens += n
            if progress is not None:
                progress.update(1)
    finally:
        student.train(was_training)
    if tokens == 0:
        raise ValueError("the evaluation data holds no trained tokens (every label is -100)")
    nan = float("nan")
    ce = sums["ce"] / tokens
    return {
        "ce": ce,
        "ppl": math.exp(min(ce, 50.0)),
        "kl": sums["kl"] / tokens if mode != "none" else nan,
        "top1_agreement": sums["agree"] / tokens if mode != "none" else nan,
        "teacher_ce": sums["teacher_ce"] / tokens if mode == "dense" else nan,
        "tokens": float(tokens),
    }


def render_prompt(tokenizer: Any, prompt: str, *, prompt_prefix: str = "", system: str | None = None) -> str:
    """The chat-template text a model sees before answering ``prompt`` (as :func:`tellneo.data.chat.
    tokenize_records` renders training prompts: ``prompt_prefix`` in front of the user message)."""
    from tellneo.data.chat import to_messages

    messages = to_messages({"prompt": prompt_prefix + prompt, "response": ""}, system)[:-1]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix every row shares, at most ``min(len) - 1`` (each row keeps a token to feed)."""
    limit = min(len(r) for r in rows) - 1
    first = rows[0]
    n = 0
    while n < limit and all(r[n] == first[n] for r in rows):
        n += 1
    return n


def _cache_argument(model: nn.Module) -> str:
    """The keyword ``model``'s forward takes a KV cache by: ``cache`` (transformers >= 5.25), else the older
    ``past_key_values`` (a PEFT wrapper is looked through to the model it wraps)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


class _PromptEncoder:
    """Token ids of rendered prompts as generation inputs, the prefix every prompt shares run through the model
    once.

    Prompts of one evaluation share the chat template's system turn and the anchor prompt (~300 of ~370 tokens for
    ``json_record`` with its anchor), and prefill is most of the cost of greedy answers on a CPU. The shared prefix
    is found on token ids (each prompt tokenized whole, exactly as without sharing, so no BPE merge is split), its
    KV cache computed once, and each batch gets a copy repeated to its size; the rest of every prompt is
    left-padded *after* the prefix (masked pads between prefix and suffix, positions from the attention mask as
    usual). Without a shared prefix of ``min_shared`` tokens, or with a model whose cache cannot be repeated, batches
    are plain left-padded prompts.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, texts: Sequence[str], *, share_prefix: bool,
                 min_shared: int = 16) -> None:
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.rows = [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
        self.shared = _common_prefix_length(self.rows) if share_prefix else 0
        self.cache = None
        self.cache_argument = _cache_argument(model)
        if self.shared >= min_shared:
            prefix = torch.tensor([self.rows[0][: self.shared]], device=self.device)
            with torch.no_grad():
                out = model(input_ids=prefix, use_cache=True)
            # transformers >= 5.25 names it "cache"; a model returning a plain tuple (return_dict=False) has no
            # cache we can find by name: fall back to plain batches
            cache = out.get("cache", out.get("past_key_values")) if hasattr(out, "get") else None
            if hasattr(cache, "batch_repeat_interleave"):
                self.cache = cache
        if self.cache is None:
            self.shared = 0

    def batch(self, first: int, last: int) -> dict[str, Any]:
        """``generate`` inputs of prompts ``[first, last)``: ``input_ids`` / ``attention_mask`` ``[B, T]`` (int64;
        the shared prefix, then left-padded suffixes) and, when sharing, the prefix's KV cache."""
        import copy

        rows = self.rows[first:last]
        width = max(len(r) for r in rows) - self.shared
        ids = torch.full((len(rows), self.shared + width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        ids[:, : self.shared] = torch.tensor(rows[0][: self.shared])
        mask[:, : self.shared] = 1
        for i, row in enumerate(rows):
            rest = row[self.shared :]
            ids[i, ids.shape[1] - len(rest) :] = torch.tensor(rest)
            mask[i, ids.shape[1] - len(rest) :] = 1
        out: dict[str, Any] = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        if self.cache is not None:
            cache = copy.deepcopy(self.cache)  # generate appends to the cache it is given
            cache.batch_repeat_interleave(len(rows))
            out[self.cache_argument] = cache
        return out


@torch.no_grad()
def task_accuracy(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[dict[str, str]],
    *,
    score: Callable[[str, str], bool],
    prompt_prefix: str = "",
    system: str | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 24,
    progress: Any = None,
    keep_examples: int = 5,
    metrics: Callable[[str, str], dict[str, float]] | None = None,
    share_prefix: bool = True,
) -> dict[str, Any]:
    """Exact-match accuracy of greedy answers to ``pairs`` (``{"prompt", "response"}``).

    Prompts are rendered with the chat template (``prompt_prefix``, e.g. the anchor prompt, in front of the user
    message) and left-padded in batches; generation is greedy and stops at the tokenizer's EOS. With
    ``share_prefix`` (default) the token prefix all prompts share (system turn, anchor) is run through the model
    once and its KV cache reused by every batch: the same greedy answers up to floating-point summation order,
    measured on SmolLM2 on one CPU thread 2.0-2.3x faster with the json_record anchor, 1.3-1.5x without
    (answers tested equal to ``share_prefix=False``).

    Returns ``{"accuracy", "correct", "n", "examples": [{prompt, reference, prediction, correct}, ...],
    "per_prompt": [0/1 per pair, in order]}`` (paired statistics need the per-prompt outcomes), and with
    ``metrics`` (a per-answer ``(prediction, reference) -> {name: 0..1}``, e.g. :meth:`tellneo.data.tasks.Task.metrics`)
    also ``"metrics": {name: mean over all pairs}`` (and ``"valid_per_prompt"`` when a metric is ``valid``).
    """
    if not pairs:
        raise ValueError("task_accuracy needs at least one test pair")
    was_training = model.training
    model.eval()
    correct = 0
    per_prompt: list[int] = []
    valid: list[int] = []
    totals: dict[str, float] = {}
    examples: list[dict[str, Any]] = []
    try:
        texts = [render_prompt(tokenizer, p["prompt"], prompt_prefix=prompt_prefix, system=system) for p in pairs]
        encoder = _PromptEncoder(model, tokenizer, texts, share_prefix=share_prefix)
        for first in range(0, len(pairs), batch_size):
            chunk = pairs[first : first + batch_size]
            enc = encoder.batch(first, first + len(chunk))
            out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                 pad_token_id=encoder.pad_id, eos_token_id=tokenizer.eos_token_id,
                                 temperature=None, top_p=None, top_k=None)
            answers = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for pair, answer in zip(chunk, answers):
                ok = bool(score(answer.strip(), pair["response"]))
                correct += ok
                per_prompt.append(int(ok))
                if metrics is not None:
                    for name, value in metrics(answer.strip(), pair["response"]).items():
                        totals[name] = totals.get(name, 0.0) + float(value)
                        if name == "valid":
                            valid.append(int(value))
                if len(examples) < keep_examples:
                    examples.append({"prompt": pair["prompt"], "reference": pair["response"],
                                     "prediction": answer.strip(), "correct": ok})
            if progress is not None:
                progress.update(len(chunk))
    finally:
        model.train(was_training)
    result = {"accuracy": correct / len(pairs), "correct": correct, "n": len(pairs), "examples": examples,
              "per_prompt": per_prompt}
    if metrics is not None:
        result["metrics"] = {name: total / len(pairs) for name, total in totals.items()}
    if valid:
        result["valid_per_prompt"] = valid
    return result
