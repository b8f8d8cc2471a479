"""Programmatically generated low-resource tasks with checkable answers (for TELL demos and experiments).

A task generates prompt/response pairs from a seed in three splits, disjoint by construction for that seed:

* ``test`` and ``dev`` are fixed pools of :data:`HELD_OUT_POOL` prompts each (their own RNG streams; the test
  pool excludes the first :data:`HELD_OUT_POOL` train prompts, the dev pool those and the test pool), and
  ``pairs(n, split="test"|"dev")`` is the first ``n`` of its pool, so it never depends on a train size;
* ``train`` is the train RNG stream with every test and dev prompt skipped, so ``pairs(n)`` is a prefix of
  ``pairs(m)`` for ``n < m`` (nested train subsets) and any train size stays disjoint from test and dev.

(Train prompts among the first :data:`HELD_OUT_POOL` and test prompts are those of the earlier two-split
scheme: they are unchanged.) ``score`` is exact match (whitespace-normalised text for ``date_iso``, the
record rules of :mod:`tellneo.data.json_record` for ``json_record``); ``metrics`` adds task-specific rates.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from tellneo.data import json_record
from tellneo.data.calendar_text import DAYS_IN_MONTH as _DAYS_IN_MONTH
from tellneo.data.calendar_text import MONTHS as _MONTHS
from tellneo.data.calendar_text import is_leap as _is_leap
from tellneo.data.calendar_text import ordinal as _ordinal

__all__ = ["Task", "JsonRecordTask", "DATE_ISO", "JSON_RECORD", "TASKS", "TASK_NAMES", "SPLITS", "HELD_OUT_POOL",
           "get_task"]

SPLITS = ("train", "dev", "test")
#: size of the test pool and of the dev pool of every task and seed (the most ``pairs(n, split="test")`` gives)
HELD_OUT_POOL = 4096


def _date_pair(rng: random.Random) -> dict[str, str]:
    year = rng.randint(1900, 2099)
    month = rng.randint(1, 12)
    day = rng.randint(1, _DAYS_IN_MONTH[month - 1] if month != 2 or _is_leap(year) else 28)  # 1900 is not a leap year
    name = _MONTHS[month - 1]
    spoken = rng.choice(
        [
            f"{name} {day}, {year}",
            f"{day} {name} {year}",
            f"{name} {_ordinal(day)}, {year}",
            f"the {_ordinal(day)} of {name} {year}",
            f"{name[:3]}. {day}, {year}",
        ]
    )
    return {"prompt": f"Date: {spoken}", "response": f"{year:04d}-{month:02d}-{day:02d}"}


@dataclass(frozen=True)
class Task:
    """A generated task: ``pairs(n, seed=, split=)``, ``score(prediction, reference)``, ``metrics(...)``.

    ``max_new_tokens`` is the generation budget an evaluation should give the task's answers (the longest
    answer in the tokenizer of the embedded SmolLM2 model, plus a margin for the end-of-turn token).
    """

    name: str
    description: str
    anchor_prompt: str
    make_pair: Callable[[random.Random], dict[str, str]]
    max_new_tokens: int = 16

    splits: ClassVar[tuple[str, ...]] = SPLITS

    def pairs(self, n: int, *, seed: int = 0, split: str = "train") -> list[dict[str, str]]:
        """``n`` distinct ``{"prompt", "response", "source"}`` pairs of ``split`` ("train", "dev" or "test");
        the three splits share no prompt for a given seed, and each is a prefix of the same split at larger
        ``n``. ``dev`` and ``test`` hold at most :data:`HELD_OUT_POOL` pairs."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        held_out = _held_out_pools(self, seed)
        if split == "train":
            return self._draw(n, seed, 0, held_out["test_prompts"] | held_out["dev_prompts"])
        pool = held_out[split]
        if n > len(pool):
            raise ValueError(f"n={n} exceeds the {split} pool of task {self.name!r} ({len(pool)} pairs per seed)")
        return [dict(p) for p in pool[:n]]

    def _draw(self, n: int, seed: int, stream: int, excluded: set[str] | frozenset[str]) -> list[dict[str, str]]:
        rng = random.Random(f"{self.name}:{seed}:{stream}")
        seen, out = set(excluded), []
        attempts = 0
        while len(out) < n:
            attempts += 1
            if attempts > 100 * n + 1000:
                raise RuntimeError(f"task {self.name!r} cannot generate {n} distinct pairs")
            pair = self.make_pair(rng)
            if pair["prompt"] in seen:
                continue
            seen.add(pair["prompt"])
            out.append({**pair, "source": f"task:{self.name}"})
        return out

    @staticmethod
    def score(prediction: str, reference: str) -> bool:
        """Exact match after whitespace normalisation (also what ``Task.score`` means for a task file)."""
        return " ".join(prediction.split()) == " ".join(reference.split())

    def metrics(self, prediction: str, reference: str) -> dict[str, float]:
        """Per-answer rates to average over a test set; ``{"exact": 0.0 | 1.0}`` unless the task defines more."""
        return {"exact": float(self.score(prediction, reference))}


@functools.lru_cache(maxsize=32)
def _held_out_pools(task: Task, seed: int) -> dict:
    first_train = {p["prompt"] for p in task._draw(HELD_OUT_POOL, seed, 0, frozenset())}
    test = task._draw(HELD_OUT_POOL, seed, 1, first_train)
    test_prompts = frozenset(p["prompt"] for p in test)
    dev = task._draw(HELD_OUT_POOL, seed, 2, first_train | test_prompts)
    return {"test": tuple(test), "dev": tuple(dev), "test_prompts": test_prompts,
            "dev_prompts": frozenset(p["prompt"] for p in dev)}


@dataclass(frozen=True)
class JsonRecordTask(Task):
    """A task whose answers are JSON records: exact match and metrics by :mod:`tellneo.data.json_record`."""

    @staticmethod
    def score(prediction: str, reference: str) -> bool:
        """Exact record match: valid JSON object, the same keys, every field equal (key order and number
        spelling free)."""
        return json_record.record_exact(prediction, reference)

    def metrics(self, prediction: str, reference: str) -> dict[str, float]:
        """``valid`` (JSON correctness), ``exact`` and ``field_<key>`` for each key, each 0.0 or 1.0."""
        return json_record.record_metrics(prediction, reference)


DATE_ISO = Task(
    name="date_iso",
    description="Rewrite an English date (several spellings) as ISO 8601 YYYY-MM-DD.",
    anchor_prompt=(
        "Role: You are a precise date normaliser.\n"
        "Goal: Rewrite the date given after 'Date:' in ISO 8601 form.\n\n"
        "Output constraints:\n- Answer with the date only, as YYYY-MM-DD.\n- No words, no punctuation besides the "
        "two hyphens.\n\nGuidelines:\n1. Months are numbered 01 (January) to 12 (December).\n2. Pad the month and "
        "the day to two digits.\n3. Ignore ordinal suffixes (st, nd, rd, th) and abbreviations of month names.\n\n"
    ),
    make_pair=_date_pair,
)

JSON_RECORD = JsonRecordTask(
    name="json_record",
    description="Extract name, ISO date, total and payment status from a short invoice note with distractors, "
                "as one JSON object.",
    anchor_prompt=json_record.ANCHOR_PROMPT,
    make_pair=json_record.json_record_pair,
    max_new_tokens=64,
)

TASKS: dict[str, Task] = {t.name: t for t in (DATE_ISO, JSON_RECORD)}
#: the registered task names, for help texts and choices
TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def get_task(name: str) -> Task:
    """The registered task called ``name``; ValueError naming the available ones otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {sorted(TASKS)}")
    return TASKS[name]
