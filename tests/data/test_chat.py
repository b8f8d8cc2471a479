"""Instruction records and chat-template tokenization: bad records give DataFileError naming the record."""

from __future__ import annotations

import pytest

from tellneo.data.chat import DataFileError, read_jsonl, read_text, tokenize_records
from tests.recipes.helpers import smollm2_tokenizer  # noqa: F401 (fixture)


def test_assistant_first_conversation_is_refused_with_file_and_line(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text('{"prompt": "q", "response": "a"}\n\n'
                    '{"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "yo"}, '
                    '{"role": "assistant", "content": "ok"}]}\n')
    with pytest.raises(DataFileError, match=r"chat.jsonl:3: messages\[0\] is an assistant turn"):
        read_jsonl(path)


def test_system_then_assistant_still_tokenizes(smollm2_tokenizer):
    store = tokenize_records([{"messages": [{"role": "system", "content": "Be brief."},
                                            {"role": "assistant", "content": "Hello there."}]}], smollm2_tokenizer)
    assert len(store) == 1 and (store.labels != -100).sum() > 0


@pytest.mark.parametrize("record", [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "Hello there."}]},
    {"text": "Plain text has no user turn."},
])
def test_a_prompt_prefix_without_a_user_turn_is_refused_not_dropped(smollm2_tokenizer, record):
    # the TELL anchor rides on prompt_prefix: a record it cannot attach to must not train silently without it
    good = {"prompt": "What is it?", "response": "A test."}
    anchored = tokenize_records([good], smollm2_tokenizer, prompt_prefix="ANCHOR. ")
    assert anchored.tokens.size > tokenize_records([good], smollm2_tokenizer).tokens.size
    with pytest.raises(DataFileError, match=r"^--task t.jsonl: record 1 .*prompt_prefix .* has none"):
        tokenize_records([good, record], smollm2_tokenizer, prompt_prefix="ANCHOR. ", source="--task t.jsonl")
    assert len(tokenize_records([record], smollm2_tokenizer)) == 1


@pytest.mark.parametrize("reply", ["\n\nanswer", "  answer", "\t\nx"])
def test_reply_with_leading_whitespace_names_record_and_fix(smollm2_tokenizer, reply):
    records = [{"prompt": "fine", "response": "ok"}, {"prompt": "What is it?", "response": reply}]
    with pytest.raises(DataFileError, match=r"^--task t.jsonl: record 1 \('What is it\?'\): the prompt's tokens are "
                                            r"not a prefix .* the reply starts with whitespace"):
        tokenize_records(records, smollm2_tokenizer, source="--task t.jsonl")
    assert len(tokenize_records(records[:1], smollm2_tokenizer)) == 1


def test_a_chat_template_that_raises_becomes_a_data_error(smollm2_tokenizer):
    class Strict:
        eos_token = smollm2_tokenizer.eos_token

        def apply_chat_template(self, messages, **kwargs):
            import jinja2

            raise jinja2.exceptions.TemplateError("Conversation roles must alternate user/assistant")

    with pytest.raises(DataFileError, match=r"record 0 \('q'\): the tokenizer's chat template rejects this "
                                            "conversation \\(TemplateError: Conversation roles must alternate"):
        tokenize_records([{"prompt": "q", "response": "a"}], Strict())


def test_read_text_names_the_flag(tmp_path):
    good = tmp_path / "a.txt"
    good.write_text("Role: translator\n", encoding="utf-8")
    assert read_text(good, "--anchor-file") == "Role: translator\n"
    bad = tmp_path / "b.txt"
    bad.write_bytes(b"ok \xe9t\xe9")
    with pytest.raises(DataFileError, match=r"--anchor-file .*b.txt: not UTF-8 text \(byte 0xe9 at offset 3\)"):
        read_text(bad, "--anchor-file")
    with pytest.raises(DataFileError, match="--anchor-file .*missing.txt: no such file"):
        read_text(tmp_path / "missing.txt", "--anchor-file")
    with pytest.raises(DataFileError, match="no such file"):
        read_text(tmp_path, "--anchor-file")
