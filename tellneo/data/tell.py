"""TELL's data path: an anchor prompt in front of every task sample, and an extensive shuffle that spreads the few
task samples evenly through a large general stream.

The mixed order for one epoch is a pure function of ``(n_task, n_general, task_ratio, seed, epoch, spread)``:

* ``K = round(task_ratio * G / (1 - task_ratio))`` task slots among ``T = G + K`` samples (G general samples, each
  used once per epoch). Task samples are drawn in rounds: every round is a fresh permutation of the task set, so
  each task sample repeats about ``K / n_task`` times and no sample repeats before all others have been used.
  A ratio so close to 1 that K would exceed ``MAX_TASK_SLOTS_PER_SAMPLE`` (100) times the larger input set is
  refused with a ValueError (0.999999 would otherwise ask for a million task repeats per general sample).
* ``spread="stratified"`` (default, the *extensive shuffle*): slot k is drawn uniformly inside the k-th of K equal
  strata of ``[0, T)``. **Guarantee**: every window of m consecutive samples holds c task samples with
  ``|c - rho * m| < 2 + rho`` where ``rho = K / T`` (so never a burst, never a drought). A packing plan that keeps
  order (``wrap``, or ``bfd``/``ffd`` with a ``window``) carries the bound over to rows: the samples in the rows
  of any run of whole packing windows satisfy it.
  Inside a packing window, bfd/ffd sort samples by length, which groups the (similar-length) task samples
  into a few rows; :func:`spread_task_rows` then orders each window's rows so that the task-bearing rows sit at
  evenly spaced positions (``PackedDataset`` does this when its source also returns ``is_task``).
* ``spread="random"``: a uniform random shuffle (what "randomly mixed" gives; deviations grow like sqrt(m)).
* ``spread="end"``: the task block after all general samples (the "no shuffle" ablation).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from tellneo.data import rng
from tellneo.data.tokens import IGNORE_INDEX, TokenStore, _as_int_array

SPREADS = ("stratified", "random", "end")

# Stream ids of the counter-based RNG (rng.stream_id(epoch, purpose, ...)).
_GENERAL_ORDER, _TASK_ROUND, _SLOTS = 1, 2, 3

# An epoch holds at most this many task slots per sample of the larger input set: a ratio near 1 would otherwise
# ask for billions of repeats of a few task samples (0.999999 with 300 general samples: 3e8 slots, minutes of work
# and gigabytes), which is never what TELL means by "mix a few task samples into general data".
MAX_TASK_SLOTS_PER_SAMPLE = 100


def num_task_slots(n_general: int, task_ratio: float) -> int:
    """K such that K / (K + n_general) is as close as possible to ``task_ratio`` (at least 1)."""
    return max(1, int(round(task_ratio * n_general / (1.0 - task_ratio))))


def _check_ratio(task_ratio: float) -> float:
    """``task_ratio`` as a Python float (NumPy scalars accepted); ValueError outside (0, 1) or for a non-number."""
    if isinstance(task_ratio, (bool, np.bool_)) or not isinstance(task_ratio, numbers.Real) or \
            not 0.0 < float(task_ratio) < 1.0:
        raise ValueError(f"task_ratio must be a number in (0, 1) (fraction of task samples), got {task_ratio!r}")
    return float(task_ratio)


def _check_seed(name: str, value: int) -> int:
    """``value`` as a Python int (NumPy integers accepted); ValueError if negative or not an integer."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def _check_task_slots(k: int, n_task: int, n_general: int, task_ratio: float) -> None:
    limit = MAX_TASK_SLOTS_PER_SAMPLE * max(n_task, n_general)
    if k > limit:
        raise ValueError(
            f"task_ratio={task_ratio!r} asks for {k:,} task slots among {n_general:,} general samples (each of the "
            f"{n_task:,} task samples repeated ~{k // n_task:,} times per epoch); at most "
            f"{MAX_TASK_SLOTS_PER_SAMPLE} x the larger input set ({limit:,}) is allowed: lower task_ratio or add "
            "general data")


def mix_order(
    n_task: int, n_general: int, *, task_ratio: float, seed: int, epoch: int, spread: str = "stratified",
    task_slots: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The mixed order of one epoch: ``(is_task [T] bool, index [T] int64)``.

    ``index[j]`` is an index into the task set where ``is_task[j]``, else into the general set. ``task_slots``
    (optional) fixes K instead of deriving it from ``task_ratio`` (exposure counting: ``n_task * k`` slots hold
    every task sample exactly k times, in k rounds); ``task_ratio`` is then only validated.
    """
    if n_task <= 0:
        raise ValueError("the task set is empty: TELL needs at least one task sample")
    if n_general <= 0:
        raise ValueError("the general set is empty: TELL mixes task samples into general data")
    task_ratio = _check_ratio(task_ratio)
    seed, epoch = _check_seed("seed", seed), _check_seed("epoch", epoch)
    if spread not in SPREADS:
        raise ValueError(f"spread must be one of {SPREADS}, got {spread!r}")
    if task_slots is None:
        k = num_task_slots(n_general, task_ratio)
    else:
        k = _check_seed("task_slots", task_slots)
        if k == 0:
            raise ValueError("task_slots must be positive")
    _check_task_slots(k, n_task, n_general, task_ratio)
    total = n_general + k

    # round r is permutation(n_task, seed, stream_id(epoch, _TASK_ROUND, r)), all rounds in one vectorised pass
    rounds = -(-k // n_task)
    streams = rng.stream_ids((epoch, _TASK_ROUND), np.arange(rounds))
    task_seq = rng.permutations(n_task, seed, streams).reshape(-1)[:k]
    general_seq = rng.permutation(n_general, seed, rng.stream_id(epoch, _GENERAL_ORDER))

    if spread == "stratified":
        strata = np.arange(k + 1, dtype=np.int64) * total // k  # integer strata bounds, each >= 1 wide
        width = np.diff(strata)
        u = rng.uniform(seed, rng.stream_id(epoch, _SLOTS), k)
        slots = strata[:-1] + np.minimum((u * width).astype(np.int64), width - 1)
    elif spread == "random":
        slots = np.sort(rng.permutation(total, seed, rng.stream_id(epoch, _SLOTS))[:k])
    else:
        slots = np.arange(n_general, total, dtype=np.int64)

    is_task = np.zeros(total, dtype=bool)
    is_task[slots] = True
    index = np.empty(total, dtype=np.int64)
    index[is_task] = task_seq
    index[~is_task] = general_seq
    return is_task, index


def spread_task_rows(plan: Any, is_task: np.ndarray) -> np.ndarray:
    """A row order (``[num_rows]`` int64 permutation) that keeps packing windows in place and, inside each window,
    puts the rows holding task samples at evenly spaced positions (row k of m task rows at slot
    ``(2k + 1) * n // (2m)`` of the window's n rows), the other rows keeping their order.
    """
    is_task = np.asarray(is_task, dtype=bool)
    if is_task.size != int(plan.sample.max(initial=-1)) + 1 and plan.num_pieces:
        raise ValueError(f"is_task has {is_task.size} entries but the plan covers {int(plan.sample.max()) + 1} samples")
    task_rows = np.zeros(plan.num_rows, dtype=bool)
    task_rows[plan.row[is_task[plan.sample]]] = True
    window = plan.window if plan.strategy != "wrap" and plan.window else max(plan.num_pieces, 1)
    # rows of window k are a contiguous range; find the range boundaries from the pieces
    n_windows = -(-plan.num_pieces // window)
    bounds = [int(plan.row[k * window : (k + 1) * window].min()) for k in range(n_windows)] + [plan.num_rows]
    order = np.arange(plan.num_rows, dtype=np.int64)
    for a, b in zip(bounds[:-1], bounds[1:]):
        rows = np.arange(a, b)
        marked, plain = rows[task_rows[a:b]], rows[~task_rows[a:b]]
        if marked.size == 0 or plain.size == 0:
            continue
        n, m = b - a, marked.size
        slots = (2 * np.arange(m) + 1) * n // (2 * m)
        is_slot = np.zeros(n, dtype=bool)
        is_slot[slots] = True
        order[a:b][is_slot] = marked
        order[a:b][~is_slot] = plain
    return order


def anchored_task_store(task: TokenStore, anchor_ids: Sequence[int], *, train_anchor: bool = False) -> TokenStore:
    """Every task sample with ``anchor_ids`` in front; anchor labels are -100 unless ``train_anchor``."""
    anchor = _as_int_array(np.asarray(list(anchor_ids), dtype=np.int64), "anchor_ids").astype(np.int64)
    if anchor.size and anchor.min() < 0:
        raise ValueError("anchor_ids must be non-negative token ids")
    n = len(task)
    lengths = task.lengths + anchor.size
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    is_anchor = np.zeros(int(offsets[-1]), dtype=bool)
    if anchor.size:
        is_anchor[(offsets[:-1, None] + np.arange(anchor.size)).ravel()] = True
    dtype = np.int64 if task.tokens.dtype == np.int64 or (anchor.size and anchor.max() >= 2**31) else np.int32
    tokens = np.empty(int(offsets[-1]), dtype=dtype)
    tokens[is_anchor] = np.tile(anchor, n)
    tokens[~is_anchor] = task.tokens
    labels = np.empty(int(offsets[-1]), dtype=np.int64)
    labels[is_anchor] = np.tile(anchor, n) if train_anchor else IGNORE_INDEX
    labels[~is_anchor] = task.labels if task.labels is not None else task.tokens
    return TokenStore(tokens, offsets, labels)


def tell_mix_store(
    task: TokenStore,
    general: TokenStore,
    *,
    anchor_ids: Sequence[int],
    task_ratio: float,
    seed: int,
    epoch: int,
    spread: str = "stratified",
    train_anchor: bool = False,
    task_slots: int | None = None,
) -> tuple[TokenStore, np.ndarray]:
    """:func:`tell_mix` on TokenStores, vectorised: ``(mixed store, is_task [T] bool)``; ``task_slots`` as in
    :func:`mix_order`."""
    is_task, index = mix_order(len(task), len(general), task_ratio=task_ratio, seed=seed, epoch=epoch, spread=spread,
                               task_slots=task_slots)
    anchored = anchored_task_store(task, anchor_ids, train_anchor=train_anchor)
    combined = TokenStore.concat([general, anchored])
    return combined.take(np.where(is_task, index + len(general), index)), is_task


def tell_mix(
    task: Sequence[Any],
    general: Sequence[Any],
    *,
    anchor_ids: Sequence[int],
    task_ratio: float,
    seed: int,
    epoch: int,
    task_labels: Sequence[Any] | None = None,
    general_labels: Sequence[Any] | None = None,
    spread: str = "stratified",
    train_anchor: bool = False,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Mix a few task samples into general samples for one epoch of TELL.

    Args:
        task, general: lists of 1-D token sequences (lists, NumPy or torch).
        anchor_ids: the anchor prompt's token ids, put in front of every task sample (may be empty: the "no
            anchor" ablation). Its positions get label -100 unless ``train_anchor``.
        task_ratio: fraction of the returned samples that are task samples, in (0, 1); task samples repeat (in
            rounds of fresh permutations) or are subsampled as needed. General samples are used once each.
        seed, epoch: the order is a pure function of these (and the sizes); different epochs differ.
        task_labels, general_labels: optional per-token labels shaped like the inputs (-100 = untrained).
        spread: ``"stratified"`` (the extensive shuffle, bounded dispersion), ``"random"`` or ``"end"``; see the
            module docstring.

    Returns:
        ``(samples, labels, is_task)``: lists of 1-D int64 tensors in the mixed order, and a bool tensor.
    """
    if len(task) == 0:
        raise ValueError("task is empty: TELL needs at least one task sample")
    if len(general) == 0:
        raise ValueError("general is empty: TELL mixes task samples into general data")
    task_store = TokenStore.from_sequences(task, task_labels)
    general_store = TokenStore.from_sequences(general, general_labels)
    mixed, is_task = tell_mix_store(
        task_store, general_store, anchor_ids=anchor_ids, task_ratio=task_ratio, seed=seed, epoch=epoch,
        spread=spread, train_anchor=train_anchor,
    )
    tokens = torch.from_numpy(mixed.tokens.astype(np.int64))
    labels = torch.from_numpy(mixed.labels if mixed.labels is not None else mixed.tokens.astype(np.int64))
    bounds = mixed.offsets.tolist()
    samples = [tokens[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    label_list = [labels[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    return samples, label_list, torch.from_numpy(is_task)


def build_anchor_prompt(
    *, role: str, goal: str, output_constraints: Sequence[str] = (), guidelines: Sequence[str] = ()
) -> str:
    """A structured anchor prompt in the TELL paper's shape: role and goal, output constraints, guidelines."""
    parts = [f"Role: {role.strip()}", f"Goal: {goal.strip()}"]
    if output_constraints:
        parts.append("Output constraints:\n" + "\n".join(f"- {c.strip()}" for c in output_constraints))
    if guidelines:
        parts.append("Guidelines:\n" + "\n".join(f"{i + 1}. {g.strip()}" for i, g in enumerate(guidelines)))
    return "\n\n".join(parts) + "\n\n"


#: The neutral anchor's text, repeated: a fixed English passage with no instruction, no task word and no format
#: hint (TELL's "marker, not instruction" ablation). Plain facts about weather, so it primes nothing a task uses.
NEUTRAL_ANCHOR_PASSAGE = ("The morning was grey and quiet. Rain had fallen in the night, and the streets were still "
                          "wet. A few birds sang in the trees by the river, and a small boat drifted past the old "
                          "stone bridge. Later the clouds thinned and the sun came out over the hills. ")


def neutral_anchor_text(length: int) -> str:
    """A fixed, innocuous text of exactly ``length`` characters (:data:`NEUTRAL_ANCHOR_PASSAGE` repeated, cut at a
    word boundary and padded with spaces, ending in a blank line like the task anchors): the same place and
    about the same size as a task's anchor prompt, without its instructions. ValueError for ``length < 0``."""
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 0:
        raise ValueError(f"length must be a non-negative int, got {length!r}")
    length = int(length)
    if length == 0:
        return ""
    body = length - 2 if length > 2 else length
    text = (NEUTRAL_ANCHOR_PASSAGE * (body // len(NEUTRAL_ANCHOR_PASSAGE) + 1))[:body]
    if " " in text and not text.endswith(" "):
        text = text[: text.rfind(" ")]
    text = text.rstrip().ljust(body)
    return text + "\n\n"[: length - body]


def anchor_token_ids(text: str, tokenizer: Any) -> list[int]:
    """Token ids of an anchor prompt (no special tokens added)."""
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
