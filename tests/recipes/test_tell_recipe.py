"""TELL recipe pieces: the trainer reads the mixed rows in order, exposure counts, greedy exact-match accuracy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tellneo.data import PackedCollator, TokenStore
from tellneo.recipes.evaluate import render_prompt, task_accuracy
from tellneo.recipes.neo import KDSettings, NeoTrainer
from tellneo.recipes.tell import TellConfig, build_tell_dataset, task_exposure
from tellneo.recipes.training import TrainSettings
from tests.recipes.helpers import one_thread, smollm2_tokenizer, tiny_teacher  # noqa: F401 (fixtures)


def stores(n_task=6, n_general=60, seed=0):
    rng = np.random.default_rng(seed)
    task = [np.full(int(k), 7) for k in rng.integers(5, 12, size=n_task)]
    general = [rng.integers(20, 250, size=int(k)) for k in rng.integers(10, 60, size=n_general)]
    tl = [np.where(np.arange(s.size) < 2, -100, s) for s in task]
    gl = [np.where(np.arange(s.size) < 4, -100, s) for s in general]
    return TokenStore.from_sequences(task, tl), TokenStore.from_sequences(general, gl)


def test_trainer_reads_the_tell_mix_in_order_and_exposure_counts(tmp_path):
    task, general = stores()
    cfg = TellConfig(seq_len=64, task_ratio=0.2, window=16, exposures=None, train=TrainSettings(batch_size=2, grad_accum=1,
                                                                                 max_steps=5, seed=3))
    ds = build_tell_dataset(task, general, cfg, pad_id=0)
    assert ds.is_task is not None and ds.is_task.sum() == round(0.2 * 60 / 0.8)
    trainer = NeoTrainer(model=tiny_teacher(), args=cfg.train.training_arguments(tmp_path), train_dataset=ds,
                         data_collator=PackedCollator(), teacher=None, kd=KDSettings(alpha=0.0))
    loader = trainer.get_train_dataloader()
    seen = torch.cat([b["input_ids"] for b in loader])
    expected = ds.batch(list(range(len(ds) // 2 * 2)))["input_ids"]
    assert torch.equal(seen, expected)  # sequential: exactly the dataset's (mixed) order

    # exposure of 5 steps of 2 rows == brute force over those rows (task samples are the runs of token 7)
    ex = task_exposure(ds, steps=5, global_batch=2)
    rows = ds.batch(list(range(10)))
    task_tok = rows["input_ids"] == 7
    assert ex["task_tokens"] == int(task_tok.sum())
    assert ex["task_samples"] == int((task_tok & (rows["position_ids"] == 0)).sum())
    assert ex["task_trained_tokens"] == int((task_tok & (rows["labels"] != -100)).sum())
    assert ex["all_tokens"] == int(ds.plan.row_lengths()[ds.row_order[:10]].sum())
    # more steps than an epoch holds: the count continues into epoch 1
    per_epoch = ds.steps_per_epoch(2)
    assert task_exposure(ds, per_epoch + 1, 2)["task_samples"] > task_exposure(ds, per_epoch, 2)["task_samples"]


@pytest.mark.parametrize("spread", ["stratified", "end"])
def test_spread_end_puts_every_task_row_last(spread):
    task, general = stores(n_general=120)
    cfg = TellConfig(seq_len=64, task_ratio=0.2, window=16, spread=spread, exposures=None)
    ds = build_tell_dataset(task, general, cfg, pad_id=0)
    rows = ds.batch(list(range(len(ds))))["input_ids"]
    has_task = (rows == 7).any(1).numpy()
    positions = np.flatnonzero(has_task)
    if spread == "end":
        assert positions.min() >= len(ds) - len(positions) - 2  # one block at the end
    else:
        assert positions.min() < len(ds) // 4 and positions.max() > 3 * len(ds) // 4


def test_sft_dataset_is_the_task_alone():
    task, _ = stores()
    ds = build_tell_dataset(task, None, TellConfig(seq_len=64, method="sft", exposures=None), pad_id=0)
    assert ds.is_task is None and len(ds.store) == len(task) and ds.repeats == 1


def test_sft_on_a_few_samples_repeats_them_to_fill_one_global_batch():
    task, _ = stores(n_task=3)  # 3 short samples: one row of 64 tokens
    one = build_tell_dataset(task, None, TellConfig(seq_len=64, method="sft", exposures=None), pad_id=0)
    assert len(one) == 1
    ds = build_tell_dataset(task, None, TellConfig(seq_len=64, method="sft", exposures=None), pad_id=0, min_rows=4)
    assert len(ds) >= 4 and ds.steps_per_epoch(4) == 1 and len(ds.store) == 3 * ds.repeats
    assert ds.repeats == min(k for k in range(1, 20) if len(build_tell_dataset(
        TokenStore.concat([task] * k), None, TellConfig(seq_len=64, method="sft", exposures=None), pad_id=0)) >= 4)  # the smallest k
    rows = ds.batch(list(range(len(ds))))["input_ids"]
    assert int((rows == 7).sum()) == ds.repeats * int(task.offsets[-1])  # every copy whole, nothing else


class ScriptedLM(torch.nn.Module):
    """generate() appends fixed answers: the tokens of answers[i] for prompt i of the batch. It has no forward, so
    task_accuracy runs it with share_prefix=False (the shared-prefix path: tests/recipes/test_task_accuracy_prefix.py)."""

    def __init__(self, tokenizer, answers):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.answers, self.calls = tokenizer, list(answers), []

    def generate(self, input_ids, attention_mask, **kw):
        self.calls.append((input_ids, attention_mask, kw))
        out = []
        for row in input_ids:
            ids = self.tokenizer(self.answers.pop(0), add_special_tokens=False)["input_ids"]
            ids = ids + [self.tokenizer.eos_token_id]
            out.append(torch.cat([row, torch.tensor(ids)]))
        width = max(len(o) for o in out)
        return torch.stack([torch.nn.functional.pad(o, (0, width - len(o)), value=self.tokenizer.pad_token_id)
                            for o in out])


def test_task_accuracy_scores_greedy_answers(smollm2_tokenizer):
    from tellneo.data.tasks import DATE_ISO

    tok = smollm2_tokenizer
    pairs = [{"prompt": "Date: May 1, 2001", "response": "2001-05-01"},
             {"prompt": "Date: 2 June 1999", "response": "1999-06-02"},
             {"prompt": "Date: the 3rd of July 1950", "response": "1950-07-03"}]
    model = ScriptedLM(tok, ["2001-05-01", " 1999-06-02 ", "1950-07-04"])
    side = tok.padding_side
    res = task_accuracy(model, tok, pairs, score=DATE_ISO.score, prompt_prefix="ANCHOR\n", batch_size=2,
                        share_prefix=False)
    assert (res["correct"], res["n"]) == (2, 3) and res["accuracy"] == pytest.approx(2 / 3)
    assert [e["correct"] for e in res["examples"]] == [True, True, False] and res["per_prompt"] == [1, 1, 0]
    assert tok.padding_side == side  # restored
    input_ids, mask, kw = model.calls[0]
    assert kw["do_sample"] is False and mask[:, 0].tolist() in ([0, 1], [1, 0], [1, 1])  # left padding
    text = tok.decode(input_ids[0][mask[0].bool()])
    assert text == render_prompt(tok, pairs[0]["prompt"], prompt_prefix="ANCHOR\n")
    assert "ANCHOR\nDate: May 1, 2001" in text and text.endswith("<|im_start|>assistant\n")


def test_task_accuracy_averages_the_task_metrics_over_every_answer(smollm2_tokenizer):
    """json_record reports JSON validity and per-field rates beside exact match, averaged over all answers (not
    only the kept examples), across batches."""
    from tellneo.data.tasks import JSON_RECORD

    tok = smollm2_tokenizer
    pairs = JSON_RECORD.pairs(3, seed=0, split="test")
    ref = [json.loads(p["response"]) for p in pairs]
    wrong_amount = dict(ref[1], amount=ref[1]["amount"] + 1)
    answers = [json.dumps(ref[0]), json.dumps(wrong_amount), "JSON: not an object"]
    model = ScriptedLM(tok, answers)
    res = task_accuracy(model, tok, pairs, score=JSON_RECORD.score, batch_size=2, keep_examples=1,
                        max_new_tokens=JSON_RECORD.max_new_tokens, metrics=JSON_RECORD.metrics, share_prefix=False)
    assert (res["correct"], res["n"]) == (1, 3) and len(res["examples"]) == 1
    assert res["per_prompt"] == [1, 0, 0] and res["valid_per_prompt"] == [1, 1, 0]
    m = res["metrics"]
    assert m["valid"] == pytest.approx(2 / 3) and m["exact"] == pytest.approx(1 / 3)
    assert m["field_amount"] == pytest.approx(1 / 3) and m["field_name"] == pytest.approx(2 / 3)
    assert "metrics" not in task_accuracy(ScriptedLM(tok, answers), tok, pairs, score=JSON_RECORD.score,
                                          share_prefix=False)
