"""Generated tasks: train/dev/test splits disjoint by construction and nested, the json_record generator and
its scorer."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import random
import re

import pytest

from tellneo.data import json_record as jr
from tellneo.data.calendar_text import MONTHS
from tellneo.data.tasks import (DATE_ISO, HELD_OUT_POOL, JSON_RECORD, SPLITS, TASK_NAMES, TASKS, Task,
                                _held_out_pools, get_task)
from tests.recipes.helpers import smollm2_tokenizer  # noqa: F401 (fixture)


def _digest(pairs: list[dict]) -> str:
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:16]


@pytest.mark.parametrize("split,n,seed,digest", [
    ("train", 8, 0, "767542524203e221"), ("train", 128, 0, "bc88ad6972f38cd0"),
    ("train", 4096, 0, "b81466dd55b81a00"), ("test", 60, 0, "5194031ecf40c8c4"),
    ("test", 1000, 3, "8aafe97ea9701ea7"), ("train", 256, 2, "aa3a5a092ae5dcf4"),
])
def test_date_iso_train_and_test_are_those_of_the_two_split_scheme(split, n, seed, digest):
    # digests of the pairs the earlier train/test-only code produced (recorded experiments used them)
    assert _digest(DATE_ISO.pairs(n, seed=seed, split=split)) == digest


def test_registry():
    assert TASK_NAMES == tuple(TASKS) == ("date_iso", "json_record")
    assert get_task("json_record") is JSON_RECORD and get_task("date_iso") is DATE_ISO
    with pytest.raises(ValueError, match="unknown task 'nope'.*json_record"):
        get_task("nope")
    assert DATE_ISO.max_new_tokens == 16 and JSON_RECORD.max_new_tokens == 64


@pytest.mark.parametrize("task", [DATE_ISO, JSON_RECORD], ids=lambda t: t.name)
def test_splits_are_disjoint_beyond_the_held_out_pool(task):
    train = task.pairs(3 * HELD_OUT_POOL, seed=1)  # larger than the pools: the tail must skip them too
    dev = task.pairs(HELD_OUT_POOL, seed=1, split="dev")
    test = task.pairs(HELD_OUT_POOL, seed=1, split="test")
    prompts = [{p["prompt"] for p in s} for s in (train, dev, test)]
    assert [len(p) for p in prompts] == [3 * HELD_OUT_POOL, HELD_OUT_POOL, HELD_OUT_POOL]  # distinct within
    assert not prompts[0] & prompts[1] and not prompts[0] & prompts[2] and not prompts[1] & prompts[2]


@pytest.mark.parametrize("task", [DATE_ISO, JSON_RECORD], ids=lambda t: t.name)
def test_each_split_is_nested_and_held_out_splits_do_not_depend_on_n(task):
    for split in SPLITS:
        big = task.pairs(4096, seed=2, split=split)
        for n in (0, 4, 8, 16, 32, 128, 1000):
            assert task.pairs(n, seed=2, split=split) == big[:n], (split, n)
    assert task.pairs(HELD_OUT_POOL + 10, seed=2)[:5] == task.pairs(5, seed=2)


def test_splits_are_seeded_and_deterministic():
    first = {s: JSON_RECORD.pairs(50, seed=7, split=s) for s in SPLITS}
    _held_out_pools.cache_clear()  # regenerated from scratch, not served from the cache
    assert {s: JSON_RECORD.pairs(50, seed=7, split=s) for s in SPLITS} == first
    assert JSON_RECORD.pairs(50, seed=8) != first["train"]
    assert all(p["source"] == "task:json_record" for p in first["dev"])


def test_pairs_argument_errors():
    with pytest.raises(ValueError, match="split must be one of .*'dev'.*got 'val'"):
        JSON_RECORD.pairs(3, split="val")
    with pytest.raises(ValueError, match="n must be >= 0"):
        JSON_RECORD.pairs(-1)
    with pytest.raises(ValueError, match=f"exceeds the dev pool .*{HELD_OUT_POOL}"):
        JSON_RECORD.pairs(HELD_OUT_POOL + 1, split="dev")


# --- the json_record generator -------------------------------------------------------------------------------

_MONTH = "|".join(MONTHS)
_ABBR = "|".join(m[:3] for m in MONTHS)
_DATES = [  # every spelling the generator uses, parsed independently of it
    (rf"\b({_MONTH}) (\d{{1,2}})(?:st|nd|rd|th)?, (\d{{4}})", lambda m: (m[3], m[1], m[2])),
    (rf"\bthe (\d{{1,2}})(?:st|nd|rd|th) of ({_MONTH}) (\d{{4}})", lambda m: (m[3], m[2], m[1])),
    (rf"(?<!the )\b(\d{{1,2}}) ({_MONTH}) (\d{{4}})", lambda m: (m[3], m[2], m[1])),
    (rf"\b({_ABBR})\. (\d{{1,2}}), (\d{{4}})", lambda m: (m[3], m[1], m[2])),
    (r"\b(\d{4})-(\d{2})-(\d{2})\b", lambda m: (m[1], m[2], m[3])),
]


def _month_number(word: str) -> int:
    return int(word) if word.isdigit() else next(i for i, m in enumerate(MONTHS, 1) if m.startswith(word))


def _dates_in(text: str) -> list[tuple[int, str]]:
    found = []
    for pattern, fields in _DATES:
        for m in re.finditer(pattern, text):
            y, mo, d = fields(m)
            found.append((m.start(), dt.date(int(y), _month_number(mo), int(d)).isoformat()))
    return sorted(found)


_MONEY = re.compile(r"\$[\d,]+(?:\.\d\d)?|USD [\d,]+\.\d\d|\b[\d,]+\.\d\d USD|\b\d+ dollars")


def test_records_follow_the_schema_and_the_notes_carry_distractors():
    pairs = JSON_RECORD.pairs(2000, seed=0, split="test")
    first_date_is_invoice = 0
    for p in pairs:
        rec = json.loads(p["response"])
        assert list(rec) == list(jr.KEYS) and rec["status"] in jr.STATUSES
        assert isinstance(rec["amount"], (int, float)) and rec["amount"] > 0
        assert p["prompt"].startswith("Note: ") and rec["name"] in p["prompt"]
        dates = _dates_in(p["prompt"])
        assert len(dates) == 2 and rec["date"] in {d for _, d in dates}, p["prompt"]
        assert dates[0][1] != dates[1][1], p["prompt"]  # the distractor date is another day
        first_date_is_invoice += dates[0][1] == rec["date"]
        numbers = re.findall(r"\d[\d,]*(?:\.\d+)?", p["prompt"])
        assert float(numbers[0].replace(",", "")) != rec["amount"], p["prompt"]  # copying the first number fails
        assert len(p["prompt"]) < 400  # a short note
        money = [float(re.sub(r"[^\d.]", "", m)) for m in _MONEY.findall(p["prompt"])]
        assert rec["amount"] in money and max(money) == rec["amount"], p["prompt"]  # fees, deposits: smaller
    assert 0.3 < first_date_is_invoice / len(pairs) < 0.7  # "take the first date" is no rule either
    statuses = [json.loads(p["response"])["status"] for p in pairs]
    assert all(0.25 < statuses.count(s) / len(statuses) < 0.42 for s in jr.STATUSES)
    assert any("deposit was paid" in p["prompt"] and json.loads(p["response"])["status"] == "pending"
               for p in pairs)


def test_max_new_tokens_covers_the_longest_answer(smollm2_tokenizer):
    for task in (DATE_ISO, JSON_RECORD):
        longest = max(len(smollm2_tokenizer(p["response"], add_special_tokens=False)["input_ids"])
                      for p in task.pairs(1000, seed=0, split="test"))
        assert longest + 1 <= task.max_new_tokens, (task.name, longest)  # + the end-of-turn token


# --- the scorer ----------------------------------------------------------------------------------------------

REF = '{"name": "Ines Costa", "date": "2016-09-04", "amount": 12.5, "status": "pending"}'
ALL = {"field_name": 1.0, "field_date": 1.0, "field_amount": 1.0, "field_status": 1.0}
NONE = dict.fromkeys(ALL, 0.0)


@pytest.mark.parametrize("prediction", [
    REF,
    '{"status": "pending", "amount": 12.5, "date": "2016-09-04", "name": "Ines Costa"}',  # key order is free
    '{"name": "Ines Costa", "date": "2016-09-04", "amount": 12.50, "status": "pending"}',  # number spelling
    '{"name": "Ines  Costa", "date": "2016-09-04", "amount": 1.25e1, "status": "pending"}',
    '  \n{"name":"Ines Costa","date":"2016-09-04","amount":12.5,"status":"pending"}\n',
    '```json\n' + REF + '\n```', '```\n' + REF + '\n```', '```JSON ' + REF + '```',  # one fence around it all
])
def test_accepted_answers(prediction):
    assert jr.record_metrics(prediction, REF) == {"valid": 1.0, "exact": 1.0, **ALL}
    assert JSON_RECORD.score(prediction, REF) is True


@pytest.mark.parametrize("prediction", [
    "", "Ines Costa, 2016-09-04, 12.5, pending", REF[:-1], REF + " I hope this helps.", "Here it is: " + REF,
    REF + "\n" + REF, "[" + REF + "]", json.dumps(REF), "```json\n" + REF + "\n``` done", "```json\n" + REF,
    '{"name": "Ines Costa", "name": "Ines Costa", "date": "2016-09-04", "amount": 12.5, "status": "pending"}',
    '{"name": "Ines Costa", "date": "2016-09-04", "amount": NaN, "status": "pending"}',
    "{'name': 'Ines Costa', 'date': '2016-09-04', 'amount': 12.5, 'status': 'pending'}",
])
def test_invalid_answers_score_nothing(prediction):
    assert jr.record_metrics(prediction, REF) == {"valid": 0.0, "exact": 0.0, **NONE}
    assert JSON_RECORD.score(prediction, REF) is False


@pytest.mark.parametrize("prediction,wrong", [
    ('{"name": "Ines Costa", "date": "2016-09-04", "amount": 12.5, "status": "pending", "id": 7}', []),  # extra
    ('{"name": "Ines Costa", "date": "2016-09-04", "amount": 12.5}', ["field_status"]),  # missing
    ('{"name": "ines costa", "date": "2016-09-04", "amount": 12.5, "status": "pending"}', ["field_name"]),
    ('{"name": "Ines Costa", "date": "2016-9-4", "amount": 12.5, "status": "pending"}', ["field_date"]),
    ('{"name": "Ines Costa", "date": "September 4, 2016", "amount": 12.5, "status": "pending"}', ["field_date"]),
    ('{"name": "Ines Costa", "date": "2016-09-04", "amount": "12.5", "status": "pending"}', ["field_amount"]),
    ('{"name": "Ines Costa", "date": "2016-09-04", "amount": 12.51, "status": "pending"}', ["field_amount"]),
    ('{"name": "Ines Costa", "date": "2016-09-04", "amount": 12.5, "status": "Pending"}', ["field_status"]),
    ('{"name": "Ines Costa", "date": "2016-09-04", "amount": 12.5, "status": "unpaid"}', ["field_status"]),
    ('{"name": ["Ines Costa"], "date": null, "amount": true, "status": "pending"}',
     ["field_name", "field_date", "field_amount"]),
])
def test_valid_but_not_exact(prediction, wrong):
    m = jr.record_metrics(prediction, REF)
    assert m == {"valid": 1.0, "exact": 0.0, **ALL, **dict.fromkeys(wrong, 0.0)}
    assert JSON_RECORD.score(prediction, REF) is False


def test_whole_dollar_amounts_and_the_reference_check():
    ref = '{"name": "A B", "date": "2020-01-02", "amount": 300, "status": "paid"}'
    assert jr.record_exact('{"name": "A B", "date": "2020-01-02", "amount": 300.0, "status": "paid"}', ref)
    assert JSON_RECORD.metrics(ref, ref)["exact"] == 1.0
    with pytest.raises(ValueError, match="reference is not a"):
        jr.record_metrics(ref, '{"name": "A B"}')


def test_task_score_stays_text_exact_match_and_metrics_per_task():
    assert Task.score(" 2001-05-01\n", "2001-05-01") is True  # the class-level function task files use
    assert DATE_ISO.score("2001-05-01", "2001-05-02") is False
    assert DATE_ISO.metrics("2001-05-01", "2001-05-01") == {"exact": 1.0}
    assert DATE_ISO.metrics("x", "2001-05-01") == {"exact": 0.0}
    assert set(JSON_RECORD.metrics("{}", REF)) == {"valid", "exact", *ALL}


@pytest.mark.parametrize("year,last_day", [(1900, 28), (2000, 29), (2024, 29), (2023, 28)])
def test_date_iso_draws_february_days_from_the_gregorian_calendar(year, last_day):
    from tellneo.data.tasks import _date_pair

    class LastDay(random.Random):  # the year and month asked for, then the largest day the generator allows
        def __init__(self) -> None:
            super().__init__(0)
            self.script = [year, 2]

        def randint(self, a: int, b: int) -> int:
            return self.script.pop(0) if self.script else b

    pair = _date_pair(LastDay())
    assert pair["response"] == f"{year:04d}-02-{last_day:02d}"
    dt.date.fromisoformat(pair["response"])
