"""The ``json_record`` task: a short invoice note with distractors -> one JSON object with fixed keys.

Modelled on the TELL paper's Halu-CoT-JSON task (structured JSON output scored for validity and content). A
note of one to four short sentences names a customer, an invoice date, a total and a payment status, and always
carries distractors: a reference/order number (the first number in a note is never the total), a second date
that is not the invoice date (order, delivery, due or reminder date; it comes first in about half of the
notes), and often a fee, deposit or item count, or a second person (the clerk). The answer
is ``{"name": str, "date": "YYYY-MM-DD", "amount": number, "status": "paid" | "pending" | "refunded"}``.

Scoring (:func:`record_metrics`), decided here and tested:

* **valid** — the answer, stripped of surrounding whitespace and of at most one Markdown code fence around the
  whole answer (```` ```json ... ``` ```` or ```` ``` ... ``` ````, a harmless wrapper every JSON consumer
  strips), parses with :func:`json.loads` as a JSON *object*. Anything else is invalid: text before or after
  the object, a top-level array or string, duplicate keys, ``NaN``/``Infinity``.
* **exact** — valid, exactly the four keys (an extra or missing key is not exact; key order is free), and every
  field equal to the reference.
* **field_<key>** — valid and that key's value equal to the reference (extra keys do not matter here).

Field equality: ``name`` is a string equal after whitespace normalisation (case matters); ``date`` the exact
ISO string; ``amount`` a JSON number (not a string, not a boolean) equal as a number, so ``12.50``, ``12.5`` and
``12.500`` agree and ``300`` equals ``300.0``; ``status`` the exact lower-case enum string.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import random
import re
from typing import Any

from tellneo.data.calendar_text import MONTHS, ordinal

KEYS = ("name", "date", "amount", "status")
STATUSES = ("paid", "pending", "refunded")

_FIRST = ("Anna", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kira", "Liam",
          "Maya", "Nikolai", "Olga", "Pedro", "Quinn", "Rosa", "Samir", "Tessa", "Umar", "Vera", "Wes", "Yara",
          "Zoe", "Arjun", "Bianca", "Chen", "Dara", "Emil", "Fatima", "Goran", "Hana", "Ivo", "Jade", "Kofi")
_LAST = ("Abbott", "Bauer", "Castillo", "Dube", "Eriksen", "Fontaine", "Garcia", "Holm", "Ibsen", "Jovanovic",
         "Kowalski", "Lindqvist", "Moreau", "Nakamura", "Okafor", "Petrov", "Quist", "Rossi", "Sato", "Tanaka",
         "Ullman", "Varga", "Weber", "Xu", "Young", "Zeller", "Alvarez", "Brennan", "Costa", "Dlamini")
_COMPANY_SUFFIX = ("& Sons", "Ltd", "GmbH", "Trading", "Bakery", "Studio", "Logistics", "Garden Supply",
                   "Print Shop", "Consulting")
_REF = ("Order #{n}", "Invoice INV-{n}", "Ref. {n}", "PO {n}", "Ticket {n}", "Job no. {n}")

_STATUS_SENTENCES = {
    "paid": ("It has been paid in full.", "Payment was received by card.", "The customer settled it by bank "
             "transfer.", "Status: paid.", "Marked as paid."),
    "pending": ("It is still unpaid.", "Payment is pending.", "We are still awaiting payment.", "Not paid yet.",
                "A {fee} deposit was paid; the rest is still outstanding."),
    "refunded": ("The full amount was refunded.", "It was paid and later refunded.", "The money was returned "
                 "to the customer.", "Status: refunded.", "Refund issued after a complaint."),
}
# the distractor date as (clause, sentence, sentence opener), and whether it lies after the invoice date
_OTHER_DATES = (("due on {d}", "It is due on {d}.", "Due on {d}", True),
                ("delivered on {d}", "It was delivered on {d}.", "Delivered on {d}", True),
                ("ordered on {d}", "It was ordered on {d}.", "Ordered on {d}", False),
                ("reminder sent {d}", "A reminder went out on {d}.", "Reminder sent {d}", True),
                ("quoted on {d}", "The quote was sent on {d}.", "Quoted on {d}", False))


def spoken_date(d: dt.date, rng: random.Random) -> str:
    """One of several English spellings of ``d`` (ISO itself included, so the rewrite is sometimes a copy)."""
    name = MONTHS[d.month - 1]
    short = f"{name[:3]}." if len(name) > 4 else name
    return rng.choice((f"{name} {d.day}, {d.year}", f"{d.day} {name} {d.year}", f"{name} {ordinal(d.day)}, "
                       f"{d.year}", f"the {ordinal(d.day)} of {name} {d.year}", f"{short} {d.day}, {d.year}",
                       d.isoformat()))


def _money(cents: int, rng: random.Random) -> str:
    dollars, c = divmod(cents, 100)
    if c == 0 and rng.random() < 0.5:
        return rng.choice((f"${dollars:,}", f"{dollars} dollars"))
    return rng.choice((f"${dollars:,}.{c:02d}", f"{dollars}.{c:02d} USD", f"USD {dollars:,}.{c:02d}",
                       f"${dollars}.{c:02d}"))


def _amount_value(cents: int) -> int | float:
    return cents // 100 if cents % 100 == 0 else round(cents / 100, 2)


def _customer(rng: random.Random) -> str:
    if rng.random() < 0.6:
        return f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
    return f"{rng.choice(_LAST)} {rng.choice(_COMPANY_SUFFIX)}"


_NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")


def json_record_pair(rng: random.Random) -> dict[str, str]:
    """One ``{"prompt": "Note: ...", "response": <canonical JSON>}`` pair drawn from ``rng``; the first number
    in the note is never the total (a note where a date's day or a reference happens to equal it is redrawn)."""
    while True:
        pair, amount = _note_and_record(rng)
        if float(_NUMBER.search(pair["prompt"])[0].replace(",", "")) != amount:
            return pair


def _note_and_record(rng: random.Random) -> tuple[dict[str, str], float]:
    name = _customer(rng)
    issued = dt.date(2015, 1, 1) + dt.timedelta(days=rng.randrange(11 * 365))
    clause, sentence, lead, later = rng.choice(_OTHER_DATES)
    other = issued + dt.timedelta(days=rng.randint(3, 60) * (1 if later else -1))
    cents = rng.choice((rng.randint(5, 400) * 100, rng.randint(500, 499_999)))
    fee_cents = min(rng.randint(1, 40) * 100 + rng.choice((0, 50, 95, 99)), max(cents // 5, 100))  # < the total
    status = rng.choice(STATUSES)
    ref = rng.choice(_REF).format(n=rng.randint(100, 99_999))
    amount, fee, items = _money(cents, rng), _money(fee_cents, rng), rng.randint(2, 12)
    date, other_date = spoken_date(issued, rng), spoken_date(other, rng)
    status_sentence = rng.choice(_STATUS_SENTENCES[status]).format(fee=fee)
    fee_part = rng.choice((f"including {fee} shipping", f"after a {fee} discount", f"{items} items"))
    clerk = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
    clause, sentence, lead = (x.format(d=other_date) for x in (clause, sentence, lead))
    template = rng.randrange(6)
    if template == 0:
        note = f"{ref} for {name}: {fee_part}, total {amount}, invoiced {date}, {clause}. {status_sentence}"
    elif template == 1:
        note = f"{lead}, {ref} was billed to {name} on {date} for {amount} ({fee_part}). {status_sentence}"
    elif template == 2:
        note = f"{ref}: {name} received an invoice dated {date} over {amount}. {status_sentence} {sentence}"
    elif template == 3:
        note = f"{ref}, entered by {clerk}. Customer {name}, {fee_part}, amount {amount}, issued {date}. " \
               f"{status_sentence}"
        note = f"{lead}. {note}"
    elif template == 4:
        note = f"{status_sentence} {ref} ({fee_part}) for {name} totals {amount}; the invoice date is {date}. " \
               f"{sentence}"
    else:
        note = f"{lead}, {clerk} wrote up {ref}: {name}, {amount}, invoice issued {date}. {status_sentence}"
    record = {"name": name, "date": issued.isoformat(), "amount": _amount_value(cents), "status": status}
    return {"prompt": f"Note: {note}", "response": json.dumps(record)}, record["amount"]


_FENCE = re.compile(r"```(?:json)?[ \t]*\n?(.*?)\n?[ \t]*```", re.DOTALL | re.IGNORECASE)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate key")
    return dict(pairs)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_record(text: str) -> dict[str, Any] | None:
    """The JSON object in ``text`` (after stripping whitespace and one surrounding code fence), else ``None``.

    >>> parse_record('```json\\n{"a": 1}\\n```'), parse_record('{"a": 1} done'), parse_record('[1]')
    ({'a': 1}, None, None)
    """
    s = text.strip()
    if (m := _FENCE.fullmatch(s)) is not None:
        s = m.group(1).strip()
    try:
        obj = json.loads(s, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except ValueError:  # json.JSONDecodeError is a ValueError, and so are the hooks' refusals
        return None
    return obj if isinstance(obj, dict) else None


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _field_equal(key: str, got: Any, want: Any) -> bool:
    if key == "amount":
        return _is_number(got) and float(got) == float(want)
    if key == "name":
        return isinstance(got, str) and " ".join(got.split()) == " ".join(want.split())
    return isinstance(got, str) and got == want


def record_metrics(prediction: str, reference: str) -> dict[str, float]:
    """``{"valid", "exact", "field_name", "field_date", "field_amount", "field_status"}``, each 0.0 or 1.0
    (rules in the module docstring). ``reference`` must itself be a valid record."""
    want = parse_record(reference)
    if want is None or set(want) != set(KEYS):
        raise ValueError(f"the reference is not a {KEYS} JSON record: {reference!r}")
    got = parse_record(prediction)
    fields = {f"field_{k}": float(got is not None and k in got and _field_equal(k, got[k], want[k])) for k in KEYS}
    exact = got is not None and set(got) == set(KEYS) and all(fields.values())
    return {"valid": float(got is not None), "exact": float(exact), **fields}


def record_exact(prediction: str, reference: str) -> bool:
    """Exact match of a predicted record (see :func:`record_metrics`)."""
    return record_metrics(prediction, reference)["exact"] == 1.0


ANCHOR_PROMPT = (
    "Role: You are a careful bookkeeping assistant that turns short invoice notes into structured records.\n"
    "Goal: Read the note given after 'Note:' and write the invoice it describes as one JSON object.\n\n"
    "Output constraints:\n"
    "- Answer with a single JSON object and nothing else: no code fence, no explanation.\n"
    '- Use exactly these keys, in this order: "name", "date", "amount", "status".\n'
    '- "name": the customer\'s name, as written in the note.\n'
    '- "date": the date the invoice was issued, as YYYY-MM-DD.\n'
    '- "amount": the invoice total in dollars, as a JSON number (no currency sign, no thousands separator).\n'
    '- "status": one of "paid", "pending", "refunded".\n\n'
    "Guidelines:\n"
    "1. Notes mention other numbers (order or reference numbers, item counts, fees, deposits, discounts) and "
    "other dates (order, delivery, due or reminder dates): ignore them.\n"
    "2. The clerk who wrote the note is not the customer.\n"
    "3. An invoice that is only partly paid, for example by a deposit, is \"pending\".\n"
    "4. An invoice that was paid and then refunded is \"refunded\".\n\n"
)
