"""Reading instruction data (jsonl) and tokenizing it with the tokenizer's chat template.

Accepted records (one JSON object per line):

* ``{"prompt": "...", "response": "..."}`` — one user turn and one assistant turn;
* ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`` — a conversation;
* ``{"text": "..."}`` — plain text, every token trained.

Only assistant tokens are trained by default (labels -100 elsewhere); the prompt part comes from rendering the
conversation up to each assistant turn with ``add_generation_prompt=True``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tellneo.data.tokens import IGNORE_INDEX, TokenStore


class DataFileError(ValueError):
    """A data file is missing, unreadable, empty, or has an invalid line (the message names file and line)."""


def _validate_record(rec: Any, where: str) -> dict[str, Any]:
    if not isinstance(rec, dict):
        raise DataFileError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataFileError(f"{where}: 'messages' must be a non-empty list")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in (
                "system", "user", "assistant"):
                raise DataFileError(f"{where}: messages[{j}] needs a role (system/user/assistant) and a string content")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataFileError(f"{where}: the conversation has no assistant turn to train on")
        if msgs[0]["role"] == "assistant":
            raise DataFileError(f"{where}: messages[0] is an assistant turn; a conversation must open with a "
                                "system or user turn (the first reply needs a prompt to answer)")
        return rec
    if "prompt" in rec or "response" in rec:
        if not isinstance(rec.get("prompt"), str) or not isinstance(rec.get("response"), str):
            raise DataFileError(f"{where}: 'prompt' and 'response' must both be strings")
        return rec
    if "text" in rec:
        if not isinstance(rec["text"], str) or not rec["text"]:
            raise DataFileError(f"{where}: 'text' must be a non-empty string")
        return rec
    raise DataFileError(f"{where}: a record needs 'prompt'+'response', 'messages' or 'text'; got keys {sorted(rec)}")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All records of a jsonl file, validated; errors name the file and the 1-based line number."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"{path}: no such file")
    records = []
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataFileError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                records.append(_validate_record(rec, f"{path}:{lineno}"))
    except UnicodeDecodeError as exc:
        raise DataFileError(f"{path}: not UTF-8 text ({exc})") from None
    if not records:
        raise DataFileError(f"{path}: the file holds no records")
    return records


def read_text(path: str | Path, what: str) -> str:
    """The UTF-8 text of a user-given file (e.g. ``--anchor-file``); DataFileError naming ``what`` and the path when
    it is missing, a directory, unreadable or not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"{what} {path}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataFileError(f"{what} {path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                            f"{exc.start})") from None
    except OSError as exc:
        raise DataFileError(f"{what} {path}: cannot read it ({exc.strerror or exc})") from None


def _describe(rec: dict[str, Any]) -> str:
    """A short quote of a record for error messages (records lose their file line once split or shuffled)."""
    if "text" in rec:
        text = rec["text"]
    elif "messages" in rec:
        text = next((m["content"] for m in rec["messages"] if m["role"] == "user"), rec["messages"][0]["content"])
    else:
        text = rec["prompt"]
    return repr(text[:40] + ("..." if len(text) > 40 else ""))


def to_messages(rec: dict[str, Any], system: str | None = None) -> list[dict[str, str]]:
    if "messages" in rec:
        msgs = list(rec["messages"])
    else:
        msgs = [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["response"]}]
    if system is not None and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system}, *msgs]
    return msgs


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja2's TemplateError (a template's raise_exception) or transformers' ValueError
        if not isinstance(exc, (ValueError, TypeError, KeyError, IndexError)) and \
                type(exc).__module__.split(".")[0] != "jinja2":
            raise
        raise DataFileError(f"{where}: the tokenizer's chat template rejects this conversation "
                            f"({type(exc).__name__}: {exc})") from None


def tokenize_records(
    records: Sequence[dict[str, Any]],
    tokenizer: Any,
    *,
    system: str | None = None,
    prompt_prefix: str = "",
    train_prompt: bool = False,
    vocab_size: int | None = None,
    source: str = "",
) -> TokenStore:
    """Tokenize records into a :class:`TokenStore` whose labels train assistant tokens only.

    ``prompt_prefix`` is put in front of the first user message (how the TELL recipe attaches an anchor prompt
    in text form; a record without a user message, or a ``text`` record, is refused rather than silently left
    without it); ``system`` adds a system message where there is none. ``train_prompt=True`` trains every
    token. ``source`` (e.g. ``"--task data.jsonl"``) starts every error message. Raises :class:`DataFileError`
    (a ValueError) when the chat template rejects a conversation or is not prefix-stable for a record (the
    prompt's tokens must be a prefix of the conversation's tokens; a response that starts with whitespace the
    tokenizer merges into the prompt's last token breaks this).
    """
    lead = f"{source}: " if source else ""
    if len(records) == 0:
        raise DataFileError("no records to tokenize")
    texts: list[str] = []
    spans: list[list[tuple[int, int, str]]] = []  # per assistant turn: (prompt text index, full text index, reply)
    plain: list[bool] = []
    for i, rec in enumerate(records):
        _validate_record(rec, f"{lead}record {i}")
        if prompt_prefix and ("text" in rec or not any(m["role"] == "user" for m in to_messages(rec))):
            raise DataFileError(f"{lead}record {i} ({_describe(rec)}): prompt_prefix (e.g. an anchor prompt) goes in "
                                "front of the first user message and this record has none; give it a user turn or "
                                "tokenize it without prompt_prefix")
        if "text" in rec:
            texts.append(rec["text"] + (tokenizer.eos_token or ""))
            spans.append([])
            plain.append(True)
            continue
        msgs = to_messages(rec, system)
        if prompt_prefix:
            first_user = next(j for j, m in enumerate(msgs) if m["role"] == "user")
            msgs[first_user] = {**msgs[first_user], "content": prompt_prefix + msgs[first_user]["content"]}
        turns = []
        where = f"{lead}record {i} ({_describe(rec)})"
        for j, m in enumerate(msgs):
            if m["role"] == "assistant":
                texts.append(_render(tokenizer, msgs[:j], True, where))
                texts.append(_render(tokenizer, msgs[: j + 1], False, where))
                turns.append((len(texts) - 2, len(texts) - 1, m["content"]))
        spans.append(turns)
        plain.append(False)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]

    samples, labels = [], []
    t = 0
    for i, (turns, is_plain) in enumerate(zip(spans, plain)):
        if is_plain:
            full = np.asarray(ids[t], dtype=np.int64)
            t += 1
            samples.append(full)
            labels.append(full.copy())
            continue
        full = np.asarray(ids[turns[-1][1]], dtype=np.int64)
        label = full.copy() if train_prompt else np.full(full.size, IGNORE_INDEX, dtype=np.int64)
        for prefix_at, full_at, reply in turns:
            prefix, upto = ids[prefix_at], ids[full_at]
            if list(full[: len(upto)]) != list(upto) or upto[: len(prefix)] != prefix:
                hint = (f"the reply starts with whitespace ({reply[:len(reply) - len(reply.lstrip())]!r}) that the "
                        "tokenizer merges into the prompt's last token: strip it" if reply[:1].isspace() else
                        "pass train_prompt=True or use 'text' records")
                raise DataFileError(
                    f"{lead}record {i} ({_describe(records[i])}): the prompt's tokens are not a prefix of the "
                    f"conversation's tokens, so prompt and response tokens cannot be told apart; {hint}"
                )
            label[len(prefix) : len(upto)] = full[len(prefix) : len(upto)]
        t += 2 * len(turns)
        samples.append(full)
        labels.append(label)
    return TokenStore.from_sequences(samples, labels, vocab_size=vocab_size)


def write_jsonl(records: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write records atomically (a temporary file renamed into place)."""
    from tellneo.io import atomic_write_text

    path = Path(path)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path
