"""Programmatically generated low-resource tasks with checkable answers (for TELL demos and experiments).

A task generates prompt/response pairs from a seed; train and test splits use different RNG streams and the test
split never contains a prompt of the train split. ``score`` is exact match after whitespace normalisation.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")
_DAYS_IN_MONTH = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _ordinal(d: int) -> str:
    suffix = "th" if 10 <= d % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(d % 10, "th")
    return f"{d}{suffix}"


def _date_pair(rng: random.Random) -> dict[str, str]:
    year = rng.randint(1900, 2099)
    month = rng.randint(1, 12)
    day = rng.randint(1, _DAYS_IN_MONTH[month - 1] if month != 2 or year % 4 == 0 else 28)
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
    """A generated task: ``pairs(n, seed, split)`` and ``score(prediction, reference)``."""

    name: str
    description: str
    anchor_prompt: str
    make_pair: Callable[[random.Random], dict[str, str]]

    def pairs(self, n: int, *, seed: int = 0, split: str = "train") -> list[dict[str, str]]:
        """``n`` distinct pairs of ``split`` ("train" or "test"); test prompts never occur in train for that seed."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        excluded: set[str] = set()
        if split == "test":
            excluded = {p["prompt"] for p in self._draw(self._train_pool_size(n), seed, 0, set())}
        return self._draw(n, seed, 1 if split == "test" else 0, excluded)

    @staticmethod
    def _train_pool_size(n: int) -> int:
        # Test prompts are checked against a large train pool so that any train budget up to 4096 is disjoint.
        return max(4096, n)

    def _draw(self, n: int, seed: int, stream: int, excluded: set[str]) -> list[dict[str, str]]:
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
        return " ".join(prediction.split()) == " ".join(reference.split())


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

TASKS: dict[str, Task] = {DATE_ISO.name: DATE_ISO}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {sorted(TASKS)}")
    return TASKS[name]
