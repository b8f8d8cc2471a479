"""General data: the synthetic generator (checkable, seeded, disjoint from the task formats) and the named pools
with seeded random draws in tellneo.recipes.records.general_records."""

from __future__ import annotations

import calendar
import json
import re
from pathlib import Path

import pytest

from tellneo.data.chat import DataFileError
from tellneo.data.general import GENERAL_SOURCES, named_general_pool
from tellneo.data.synthetic_general import KINDS, SYNTHETIC_POOL_SIZE, synthetic_pairs
from tellneo.recipes.common import RecipeError
from tellneo.recipes.records import general_records


@pytest.fixture(scope="module")
def pool() -> list[dict[str, str]]:
    return synthetic_pairs(SYNTHETIC_POOL_SIZE)


def test_synthetic_pool_is_large_varied_and_seeded(pool):
    assert len({p["prompt"] for p in pool}) == SYNTHETIC_POOL_SIZE >= 40_000
    counts = {k: sum(p["source"] == f"synthetic:{k}" for p in pool) for k in KINDS}
    assert min(counts.values()) >= 1000, counts  # every kind is well represented
    assert synthetic_pairs(300) == pool[:300]  # a prefix, deterministic
    assert synthetic_pairs(300, seed=1) != pool[:300]
    assert all(set(p) == {"prompt", "response", "source"} and len(p["response"].split()) >= 3 for p in pool)
    with pytest.raises(ValueError, match="n must be >= 0"):
        synthetic_pairs(-1)


_MONTH_RE = "|".join(calendar.month_name[1:])


def test_synthetic_pairs_never_look_like_a_task(pool):
    iso = re.compile(r"\d{4}-\d{2}-\d{2}")
    spoken = re.compile(rf"\b(?:{_MONTH_RE}) \d{{1,2}}(?:st|nd|rd|th)?, \d{{4}}|\d{{1,2}} (?:{_MONTH_RE}) \d{{4}}")
    for p in pool:
        text = p["prompt"] + "\n" + p["response"]
        assert not iso.search(text) and not spoken.search(text), p  # no date to rewrite
        assert "{" not in text and "}" not in text and "json" not in text.lower(), p  # no JSON
        assert not p["prompt"].startswith(("Date:", "Note:")), p


def _of(pool, kind):
    return [p for p in pool if p["source"] == f"synthetic:{kind}"]


def test_synthetic_answers_are_right(pool):
    for p in _of(pool, "addition") + _of(pool, "multiplication") + _of(pool, "subtraction"):
        a, op, b, c = re.search(r"(\d+) ([-+x]) (\d+) = (\d+)", p["response"]).groups()
        assert {"+": int(a) + int(b), "-": int(a) - int(b), "x": int(a) * int(b)}[op] == int(c), p
        assert re.findall(r"\d+", p["prompt"]) in ([a, b], [b, a]), p
    for p in _of(pool, "sort_words"):
        words = p["prompt"].split(": ", 1)[1].rstrip(".").split(", ")
        got = p["response"].split(": ", 1)[1].rstrip(".").split(", ")
        assert got == sorted(words, reverse="reverse" in p["prompt"]), p
    for p in _of(pool, "letters"):
        letter, word = re.search(r"letter '(\w)' appear in the word '(\w+)'", p["prompt"]).groups()
        k = word.count(letter)
        said = {"once": 1, "twice": 2}.get(m[1], None) if (m := re.search(r"appears (once|twice)", p["response"])) \
            else int(m[1]) if (m := re.search(r"appears (\d+) times", p["response"])) else 0
        assert said == k and ("does not appear" in p["response"]) == (k == 0), p
    leap = [p for p in _of(pool, "calendar") if "leap year?" in p["prompt"]]
    assert len(leap) > 100
    for p in leap:
        year = int(re.search(r"\d{4}", p["prompt"])[0])
        assert p["response"].startswith("Yes" if calendar.isleap(year) else "No"), p
    for p in _of(pool, "calendar"):
        if (m := re.fullmatch(r"What day of the week is (\d+) days (after|before) a (\w+)\?", p["prompt"])):
            day = list(calendar.day_name).index(m[3]) + (int(m[1]) if m[2] == "after" else -int(m[1]))
            assert p["response"].endswith(f"is a {calendar.day_name[day % 7]}."), p
    for p in _of(pool, "reverse_list"):
        words = p["prompt"].split(": ", 1)[1].rstrip(".").split(", ")
        assert p["response"].split(": ", 1)[1].rstrip(".").split(", ") == words[::-1]


# --- named pools and draws -----------------------------------------------------------------------------------

def test_named_pools():
    docs, _ = general_records(None)
    assert general_records("python-docs")[0] == docs and len(docs) > 1000
    assert all(not r["source"].startswith("synthetic:") for r in docs)
    synth, desc = general_records("synthetic")
    assert len(synth) == SYNTHETIC_POOL_SIZE and "synthetic pairs" in desc and "fingerprint" in desc
    mixed, desc = general_records(Path("mixed"))  # what the CLI's type=Path hands over
    assert len(mixed) == len(docs) + len(synth) and "mixed" in desc
    head = [r["source"].startswith("synthetic:") for r in mixed[:2000]]
    assert 0 < sum(head) < len(head)  # interleaved: both sources from the start
    assert sorted(map(json.dumps, mixed)) == sorted(map(json.dumps, docs + synth))
    records, _ = named_general_pool("synthetic")
    records[0]["prompt"] = "changed"  # a caller's edit does not leak into the cached pool
    assert named_general_pool("synthetic")[0][0]["prompt"] != "changed"
    assert GENERAL_SOURCES == ("python-docs", "synthetic", "mixed")


@pytest.mark.parametrize("name", ["python-docs", "synthetic"])
def test_seeded_draws_are_random_nested_and_deterministic(name):
    whole, _ = general_records(name)
    first_k, _ = general_records(name, 200)
    assert first_k == whole[:200]  # seed=None: the earlier first-K behaviour
    drawn, desc = general_records(name, 200, seed=3)
    assert drawn != first_k and len({json.dumps(r) for r in drawn}) == 200 and "seed 3" in desc
    positions = sorted(whole.index(r) for r in drawn)
    assert positions[-1] > len(whole) // 2  # from the whole pool, not a head of it
    assert general_records(name, 200, seed=3)[0] == drawn
    assert general_records(name, 500, seed=3)[0][:200] == drawn  # nested
    assert general_records(name, 200, seed=4)[0] != drawn
    everything, _ = general_records(name, None, seed=3)
    assert everything[:200] == drawn and len(everything) == len(whole)


def test_files_and_errors(tmp_path, monkeypatch):
    data = tmp_path / "g.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(30)))
    recs, desc = general_records(data, 10, seed=0)
    assert len(recs) == 10 and {r["prompt"] for r in recs} <= {f"q{i}" for i in range(30)} and str(data) in desc
    assert general_records(str(data), 5)[0] == [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(5)]
    with pytest.raises(DataFileError, match=r"synthtic: no such file or directory, and not a named general "
                                            r"source \(one of python-docs, synthetic, mixed\)"):
        general_records("synthtic")
    with pytest.raises(DataFileError, match="missing.jsonl: no such file"):
        general_records(tmp_path / "missing.jsonl")
    with pytest.raises(RecipeError, match="max-samples must be positive, got 0"):
        general_records("synthetic", 0)
    monkeypatch.chdir(tmp_path)
    Path("mixed").write_text(data.read_text())
    with pytest.raises(RecipeError, match="'mixed' is both a named source and a file"):
        general_records("mixed")
    assert len(general_records(tmp_path / "mixed")[0]) == 30  # a path with a directory is the file
