"""General instruction data generated offline: varied, checkable instruction/answer pairs from a seed.

A second general source beside :mod:`tellneo.data.corpora` (our own code, no licence question, no download).
Kinds: arithmetic word problems (addition, subtraction, multiplication, division, two steps), unit conversion,
sorting words or numbers, counting and reversing lists, letter counting, string edits (backwards, capitals,
first/last letter, word replacement, joining), comparisons (numbers, word length, alphabetical order),
parity, rounding, list sum/minimum/maximum and calendar facts (weekdays, month lengths, leap years, month
order). Every answer is one or two plain English sentences that state the result (and, where short, how it
follows), so the model sees natural text.

None of it overlaps the generated tasks of :mod:`tellneo.data.tasks`: no full dates at all (so no date
rewriting) and no JSON. Records are ``{"prompt", "response", "source": "synthetic:<kind>"}``.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from tellneo.data.calendar_text import DAYS_IN_MONTH, MONTHS, WEEKDAYS, is_leap, ordinal

__all__ = ["KINDS", "SYNTHETIC_POOL_SIZE", "synthetic_pairs"]

#: how many pairs the named general source "synthetic" holds (seed 0); the generator itself can give more
SYNTHETIC_POOL_SIZE = 50_000

_NAMES = ("Amira", "Bruno", "Chloe", "Dev", "Emma", "Felix", "Gita", "Hiro", "Isla", "Jamal", "Kai", "Lena", "Mateo",
          "Nora", "Oscar", "Priya", "Rafael", "Sofia", "Theo", "Uma", "Viktor", "Wen", "Ximena", "Yusuf")
_ITEMS = ("apples", "pencils", "stickers", "marbles", "books", "cookies", "stamps", "shells", "cards", "coins",
          "buttons", "candles", "balloons", "tickets", "plums", "beads", "crayons", "lemons", "bricks", "seeds")
_WORDS = ("apple", "river", "garden", "window", "pencil", "mountain", "cloud", "bridge", "candle", "forest",
          "rabbit", "guitar", "ocean", "lantern", "meadow", "pepper", "island", "castle", "butter", "planet",
          "violin", "harbor", "tomato", "desert", "ladder", "mirror", "orange", "silver", "thunder", "valley",
          "basket", "carpet", "dragon", "engine", "feather", "glacier", "hammer", "jacket", "kitten", "lemon",
          "marble", "needle", "pillow", "quartz", "rocket", "saddle", "ticket", "umbrella", "velvet", "walnut",
          "yogurt", "zebra", "anchor", "blanket", "cactus", "dolphin", "falcon", "giraffe", "honey", "igloo",
          "jungle", "koala", "lizard", "magnet", "noodle", "octopus", "parrot", "quilt", "raisin", "spider",
          "turtle", "unicorn", "volcano", "wizard", "yacht", "acorn", "beetle", "cherry", "daisy", "eagle", "fossil",
          "goblet", "hazel", "ivory", "jigsaw", "kettle", "lily", "mango", "nickel", "onion", "peach", "radish",
          "salmon", "tulip", "walrus", "bamboo", "cobalt", "ember", "flute", "granite", "helmet", "insect",
          "juniper", "kayak", "lobster", "maple", "nutmeg", "oyster", "pebble", "rhubarb", "sparrow", "thistle",
          "canyon", "biscuit", "cinnamon", "harvest", "compass", "saffron", "lagoon", "orchid", "puzzle", "sailor")
# (larger unit, smaller unit, how many smaller units in one larger)
_UNITS = (("kilometre", "metres", 1000), ("metre", "centimetres", 100), ("kilogram", "grams", 1000),
          ("hour", "minutes", 60), ("minute", "seconds", 60), ("litre", "millilitres", 1000),
          ("foot", "inches", 12), ("day", "hours", 24), ("week", "days", 7), ("yard", "feet", 3),
          ("centimetre", "millimetres", 10), ("dozen", "items", 12))
_PLURAL = {"foot": "feet", "dozen": "dozen"}


def _plural(unit: str, x: float) -> str:
    return unit if x == 1 else _PLURAL.get(unit, unit + "s")


def _num(x: float) -> str:
    return f"{x:g}" if x != int(x) else str(int(x))


def _word_list(rng: random.Random, lo: int = 3, hi: int = 7) -> list[str]:
    return rng.sample(_WORDS, rng.randint(lo, hi))


def _add(rng: random.Random) -> tuple[str, str]:
    name, item, a, b = rng.choice(_NAMES), rng.choice(_ITEMS), rng.randint(2, 99), rng.randint(2, 99)
    return (f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
            f"{name} now has {a} + {b} = {a + b} {item}.")


def _subtract(rng: random.Random) -> tuple[str, str]:
    name, item, a = rng.choice(_NAMES), rng.choice(_ITEMS), rng.randint(10, 120)
    b = rng.randint(1, a - 1)
    return (f"{name} had {a} {item} and gave {b} of them away. How many {item} are left?",
            f"{a} - {b} = {a - b}, so {name} has {a - b} {item} left.")


def _multiply(rng: random.Random) -> tuple[str, str]:
    item, a, b = rng.choice(_ITEMS), rng.randint(2, 25), rng.randint(2, 30)
    return (f"One box holds {a} {item}. How many {item} are there in {b} boxes?",
            f"{b} boxes hold {b} x {a} = {a * b} {item}.")


def _divide(rng: random.Random) -> tuple[str, str]:
    item, each, k = rng.choice(_ITEMS), rng.randint(2, 20), rng.randint(2, 12)
    return (f"{each * k} {item} are shared equally among {k} friends. How many {item} does each friend get?",
            f"Each friend gets {each * k} / {k} = {each} {item}.")


def _two_steps(rng: random.Random) -> tuple[str, str]:
    name, item, packs, per = rng.choice(_NAMES), rng.choice(_ITEMS), rng.randint(2, 9), rng.randint(3, 12)
    used = rng.randint(1, packs * per - 1)
    left = packs * per - used
    return (f"{name} buys {packs} packs of {per} {item} and uses {used} of them. How many {item} are left?",
            f"{name} bought {packs} x {per} = {packs * per} {item}; after using {used}, {left} are left.")


def _convert(rng: random.Random) -> tuple[str, str]:
    big, small, f = rng.choice(_UNITS)
    if rng.random() < 0.5:
        x = rng.randint(1, 40) / rng.choice((1, 1, 2))
        y = x * f
        return (f"How many {small} are there in {_num(x)} {_plural(big, x)}?",
                f"{_num(x)} {_plural(big, x)} is {_num(y)} {small}, because one {big} has {f} {small}.")
    x = rng.randint(1, 40)
    return (f"Convert {x * f} {small} to {_plural(big, 2)}.",
            f"{x * f} {small} is {x} {_plural(big, x)}, because one {big} has {f} {small}.")


def _sort_words(rng: random.Random) -> tuple[str, str]:
    words = _word_list(rng)
    if rng.random() < 0.5:
        return (f"Sort these words alphabetically: {', '.join(words)}.",
                f"In alphabetical order: {', '.join(sorted(words))}.")
    return (f"Sort these words in reverse alphabetical order: {', '.join(words)}.",
            f"In reverse alphabetical order: {', '.join(sorted(words, reverse=True))}.")


def _sort_numbers(rng: random.Random) -> tuple[str, str]:
    nums = rng.sample(range(1, 1000), rng.randint(3, 7))
    up = rng.random() < 0.5
    order = "smallest to largest" if up else "largest to smallest"
    return (f"Sort these numbers from {order}: {', '.join(map(str, nums))}.",
            f"From {order}: {', '.join(map(str, sorted(nums, reverse=not up)))}.")


def _count_list(rng: random.Random) -> tuple[str, str]:
    words = _word_list(rng, 2, 12)
    return (f"How many words are in this list: {', '.join(words)}?", f"The list has {len(words)} words.")


def _reverse_list(rng: random.Random) -> tuple[str, str]:
    words = _word_list(rng)
    return (f"Reverse the order of this list: {', '.join(words)}.", f"Reversed, the list is: {', '.join(words[::-1])}.")


def _letters(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(_WORDS)
    letter = rng.choice(word) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    k = word.count(letter)
    times = "once" if k == 1 else "twice" if k == 2 else f"{k} times"
    answer = f"The letter '{letter}' does not appear in '{word}'." if k == 0 else \
        f"The letter '{letter}' appears {times} in '{word}'."
    return f"How many times does the letter '{letter}' appear in the word '{word}'?", answer


def _string_edit(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(_WORDS)
    kind = rng.randrange(5)
    if kind == 0:
        return f"Write the word '{word}' backwards.", f"'{word}' written backwards is '{word[::-1]}'."
    if kind == 1:
        return f"Write '{word}' in capital letters.", f"In capital letters, '{word}' is '{word.upper()}'."
    if kind == 2:
        return (f"What are the first and the last letter of '{word}'?",
                f"'{word}' starts with '{word[0]}' and ends with '{word[-1]}'.")
    if kind == 3:
        words = _word_list(rng, 3, 6)
        return (f"Join these words with hyphens: {' '.join(words)}", f"Joined with hyphens: {'-'.join(words)}")
    a, b, c, new = rng.sample(_WORDS, 4)
    sentence = f"The {a} is next to the {b} and the {c}."
    return (f"Replace the word '{b}' with '{new}' in this sentence: {sentence}",
            f"With the replacement: The {a} is next to the {new} and the {c}.")


def _compare(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.sample(range(1, 10_000), 2)
        big, small = max(a, b), min(a, b)
        word = rng.choice(("larger", "smaller"))
        answer = f"{big} is larger than {small}." if word == "larger" else f"{small} is smaller than {big}."
        return f"Which is {word}, {a} or {b}?", answer
    if kind == 1:
        while True:
            a, b = rng.sample(_WORDS, 2)
            if len(a) != len(b):
                break
        long, short = (a, b) if len(a) > len(b) else (b, a)
        return (f"Which word is longer, '{a}' or '{b}'?",
                f"'{long}' is longer: it has {len(long)} letters and '{short}' has {len(short)}.")
    a, b = rng.sample(_WORDS, 2)
    return (f"Which comes first in alphabetical order, '{a}' or '{b}'?", f"'{min(a, b)}' comes before '{max(a, b)}'.")


def _numbers(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(4)
    if kind == 0:
        n = rng.randint(1, 100_000)
        parity = "even" if n % 2 == 0 else "odd"
        return f"Is {n} even or odd?", f"{n} is {parity}, because its last digit is {n % 10}."
    if kind == 1:
        n, unit = rng.randint(11, 9999), rng.choice((10, 100))
        r = (n + unit // 2) // unit * unit
        return f"Round {n} to the nearest {unit}.", f"{n} rounded to the nearest {unit} is {r}."
    nums = rng.sample(range(1, 100), rng.randint(3, 6))
    if kind == 2:
        return (f"What is the sum of {', '.join(map(str, nums))}?",
                f"{' + '.join(map(str, nums))} = {sum(nums)}.")
    which = rng.choice(("largest", "smallest"))
    pick = max(nums) if which == "largest" else min(nums)
    return f"Which number is the {which} in this list: {', '.join(map(str, nums))}?", f"The {which} is {pick}."


def _calendar(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(4)
    if kind == 0:
        day, k = rng.randrange(7), rng.randint(1, 30)
        after = rng.random() < 0.5
        target = WEEKDAYS[(day + k if after else day - k) % 7]
        where = "after" if after else "before"
        return (f"What day of the week is {k} days {where} a {WEEKDAYS[day]}?",
                f"{k} days {where} a {WEEKDAYS[day]} is a {target}.")
    if kind == 1:
        m = rng.randrange(12)
        if m == 1:
            return ("How many days does February have?",
                    "February has 28 days, and 29 in a leap year.")
        return f"How many days are there in {MONTHS[m]}?", f"{MONTHS[m]} has {DAYS_IN_MONTH[m]} days."
    if kind == 2:
        year = rng.randint(1600, 2400)
        if is_leap(year):
            why = "it is divisible by 400" if year % 400 == 0 else "it is divisible by 4 and not by 100"
            return f"Is {year} a leap year?", f"Yes, {year} is a leap year: {why}."
        why = "it is not divisible by 4" if year % 4 else "it is divisible by 100 but not by 400"
        return f"Is {year} a leap year?", f"No, {year} is not a leap year: {why}."
    m, k = rng.randrange(12), rng.randint(1, 11)
    if rng.random() < 0.5:
        return (f"Which month comes {k} months after {MONTHS[m]}?",
                f"{k} months after {MONTHS[m]} comes {MONTHS[(m + k) % 12]}.")
    return f"Which is the {ordinal(m + 1)} month of the year?", f"The {ordinal(m + 1)} month of the year is {MONTHS[m]}."


#: the kinds of pair, by name (the ``source`` of a record is ``synthetic:<name>``)
KINDS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "addition": _add, "subtraction": _subtract, "multiplication": _multiply, "division": _divide,
    "two_steps": _two_steps, "units": _convert, "sort_words": _sort_words, "sort_numbers": _sort_numbers,
    "count_list": _count_list, "reverse_list": _reverse_list, "letters": _letters, "string_edit": _string_edit,
    "compare": _compare, "numbers": _numbers, "calendar": _calendar,
}


def synthetic_pairs(n: int, *, seed: int = 0) -> list[dict[str, str]]:
    """``n`` pairs with distinct prompts, the kind drawn uniformly at random for each; the same list for the same
    ``(n, seed)``, and ``synthetic_pairs(n)`` is a prefix of ``synthetic_pairs(m)`` for ``n < m``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"synthetic_general:{seed}")
    names = list(KINDS)
    seen: set[str] = set()
    out: list[dict[str, str]] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 20 * n + 1000:
            raise RuntimeError(f"cannot generate {n} distinct synthetic pairs")
        kind = rng.choice(names)
        prompt, response = KINDS[kind](rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append({"prompt": prompt, "response": response, "source": f"synthetic:{kind}"})
    return out
