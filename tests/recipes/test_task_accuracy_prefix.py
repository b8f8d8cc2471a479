"""task_accuracy's shared-prefix path (the system turn and anchor run through the model once, their KV cache
reused by every batch) gives the same inputs and the same greedy answers as plain left-padded prompts."""

from __future__ import annotations

import pytest
import torch

from tellneo.recipes.evaluate import _common_prefix_length, _PromptEncoder, render_prompt, task_accuracy
from tests.conftest import tiny_llama_config
from tests.recipes.helpers import one_thread, smollm2_tokenizer  # noqa: F401 (fixtures)

ANCHOR = "Role: a careful assistant.\nGoal: answer with the record only, as one JSON object, nothing else.\n"
PAIRS = [{"prompt": p, "response": "x"} for p in (
    "Note: invoice 17 from Ada, paid", "Note: inv", "Note: invoice 2 from Bob Lovelace-Byron, unpaid, due soon",
    "Note: invoiced", "Note: a", "Note: invoice 9 from Cy, paid in full on the first of May")]


def test_common_prefix_length_leaves_every_row_a_token_to_feed():
    assert _common_prefix_length([[1, 2, 3], [1, 2, 4]]) == 2
    assert _common_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # identical rows keep their last token
    assert _common_prefix_length([[1, 2], [1, 2, 3, 4]]) == 1
    assert _common_prefix_length([[5, 2], [1, 2]]) == 0
    assert _common_prefix_length([[7, 8, 9]]) == 2


@pytest.mark.parametrize("share", [True, False])
def test_batches_hold_exactly_each_prompt_tokenized_whole(smollm2_tokenizer, share):
    """The shared prefix is cut on token ids, so a prompt whose text continues a word of the prefix
    ("inv" / "invoice" / "invoiced") is still the tokens of the whole prompt, and padding sits only where the
    mask is 0 (after the prefix when sharing, at the left otherwise)."""
    tok = smollm2_tokenizer
    model = torch.nn.Linear(1, 1)  # no forward needed: min_shared above any prefix keeps the cache off
    texts = [render_prompt(tok, p["prompt"], prompt_prefix=ANCHOR) for p in PAIRS]
    enc = _PromptEncoder(model, tok, texts, share_prefix=share, min_shared=10_000)
    assert enc.shared == 0 and enc.cache is None
    whole = tok(texts, add_special_tokens=False)["input_ids"]
    batch = enc.batch(1, 5)
    for row, mask, want in zip(batch["input_ids"], batch["attention_mask"], whole[1:5]):
        assert row[mask.bool()].tolist() == want
        assert mask.tolist() == sorted(mask.tolist())  # left padding only


def _tiny_lm(tok):
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok))).eval()


def test_shared_prefix_inputs_are_the_prompts_with_padding_after_the_prefix(smollm2_tokenizer, one_thread):
    tok = smollm2_tokenizer
    texts = [render_prompt(tok, p["prompt"], prompt_prefix=ANCHOR) for p in PAIRS]
    enc = _PromptEncoder(_tiny_lm(tok), tok, texts, share_prefix=True)
    whole = tok(texts, add_special_tokens=False)["input_ids"]
    prefix_tokens = len(tok(render_prompt(tok, "Note: ", prompt_prefix=ANCHOR), add_special_tokens=False)["input_ids"])
    assert 16 <= enc.shared <= prefix_tokens and enc.cache is not None
    batch = enc.batch(0, len(texts))
    assert batch[enc.cache_argument].get_seq_length() == enc.shared
    assert enc.cache.get_seq_length() == enc.shared  # the kept prefix cache is a copy's source, never grown
    for row, mask, want in zip(batch["input_ids"], batch["attention_mask"], whole):
        assert row[mask.bool()].tolist() == want
        assert mask[: enc.shared].all()


@pytest.mark.parametrize("batch_size", [1, 4, 6])
def test_greedy_answers_equal_the_plain_path(smollm2_tokenizer, one_thread, batch_size):
    """Same answers (token for token, decoded) with and without sharing, over batches of unequal prompt lengths
    (4 does not divide the 6 prompts: the last batch is smaller), and the per-prompt outcomes agree."""
    tok = smollm2_tokenizer
    model = _tiny_lm(tok)
    runs = {share: task_accuracy(model, tok, PAIRS, score=lambda a, b: len(a) % 2 == 0, prompt_prefix=ANCHOR,
                                 batch_size=batch_size, max_new_tokens=8, keep_examples=len(PAIRS),
                                 share_prefix=share)
            for share in (False, True)}
    plain, shared = ([e["prediction"] for e in runs[s]["examples"]] for s in (False, True))
    assert len(plain) == len(PAIRS) and any(plain)  # the random model does answer something
    assert shared == plain
    assert runs[True]["per_prompt"] == runs[False]["per_prompt"]
    assert model.training is False


def test_one_prompt_or_no_shared_prefix_falls_back_to_plain_batches(smollm2_tokenizer, one_thread):
    tok = smollm2_tokenizer
    model = _tiny_lm(tok)
    enc = _PromptEncoder(model, tok, ["a b c", "z y x"], share_prefix=True)
    assert enc.shared == 0 and enc.cache is None and enc.cache_argument not in enc.batch(0, 2)
    one = task_accuracy(model, tok, PAIRS[:1], score=lambda a, b: True, prompt_prefix=ANCHOR, max_new_tokens=4)
    assert one["n"] == 1 and one["per_prompt"] == [1]


def test_a_model_returning_tuples_gets_plain_batches(smollm2_tokenizer, one_thread):
    tok = smollm2_tokenizer
    lm = _tiny_lm(tok)

    class TupleLM(torch.nn.Module):  # forward returns a tuple, as return_dict=False models do
        def __init__(self) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, **kwargs):
            return self.lm(**kwargs).to_tuple()

    model = TupleLM()
    texts = [render_prompt(tok, p["prompt"], prompt_prefix=ANCHOR) for p in PAIRS]
    enc = _PromptEncoder(model, tok, texts, share_prefix=True)
    assert enc.shared == 0 and enc.cache is None
    whole = tok(texts, add_special_tokens=False)["input_ids"]
    batch = enc.batch(0, len(texts))
    assert [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"])] == whole
