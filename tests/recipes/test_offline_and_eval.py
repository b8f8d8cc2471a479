"""Offline teacher top-k (exactness at k = V, resume, refusal of foreign data) and the evaluation helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tellneo.data import PackedCollator, PackedDataset
from tellneo.recipes.common import LoraSettings, attach_lora
from tellneo.recipes.evaluate import distill_metrics, eval_batches
from tellneo.recipes.neo import KDSettings, NeoTrainer, build_student
from tellneo.recipes.offline import TopkCollator, TopkDataset, precompute_teacher_topk
from tellneo.recipes.training import TrainSettings
from tests.recipes.helpers import VOCAB, learnable_store, one_thread, tiny_teacher  # noqa: F401 (fixture)


def test_offline_topk_with_full_vocab_equals_online_kd(tmp_path):
    teacher = tiny_teacher()
    ds = PackedDataset(learnable_store(), 64, seed=0)
    precompute_teacher_topk(teacher, ds, tmp_path / "topk", k=VOCAB, rows_per_shard=5, progress=False)
    topk_ds = TopkDataset(ds, tmp_path / "topk")
    items = topk_ds.__getitems__([0, 6])  # two different shards
    offline_batch = TopkCollator()(items)
    assert offline_batch["teacher_topk_ids"].shape == (2, 64, VOCAB)

    torch.manual_seed(0)
    student = attach_lora(build_student(teacher, "every_other"), LoraSettings(r=4, alpha=8, dropout=0.0))
    args = TrainSettings(max_steps=1).training_arguments(tmp_path / "c")
    kd = KDSettings(alpha=0.7)
    online = NeoTrainer(model=student, args=args, train_dataset=ds, data_collator=PackedCollator(), teacher=teacher,
                        kd=kd)
    offline = NeoTrainer(model=student, args=args, train_dataset=topk_ds, data_collator=TopkCollator(), teacher=None,
                         kd=kd)
    plain = {k: offline_batch[k] for k in ("input_ids", "labels", "position_ids")}
    torch.testing.assert_close(offline.compute_loss(student, dict(offline_batch)),
                               online.compute_loss(student, plain), rtol=1e-5, atol=1e-5)


def test_offline_topk_resumes_and_refuses_other_data(tmp_path):
    teacher = tiny_teacher()
    ds = PackedDataset(learnable_store(), 64, seed=0)
    root = precompute_teacher_topk(teacher, ds, tmp_path / "topk", k=8, rows_per_shard=4, epochs=(0, 1),
                                   progress=False)
    shards = sorted(root.glob("epoch-*/shard-*.npz"))
    assert len(shards) == 2 * math.ceil(len(ds) / 4)
    with np.load(shards[0]) as z:
        lps = z["logprobs"]
        assert z["ids"].shape == (4, 64, 8) and np.all(np.diff(lps, axis=-1) <= 0)  # sorted, largest first
        assert np.all(np.exp(lps).sum(-1) <= 1 + 1e-5)
    stamps = {p: p.stat().st_mtime_ns for p in shards}
    shards[1].unlink()
    precompute_teacher_topk(teacher, ds, root, k=8, rows_per_shard=4, epochs=(0, 1), progress=False)
    assert shards[1].exists()
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p != shards[1])
    with pytest.raises(FileExistsError, match="holds a different run"):
        precompute_teacher_topk(teacher, ds, root, k=4, rows_per_shard=4, epochs=(0, 1), progress=False)

    other = PackedDataset(learnable_store(seed=5), 64, seed=0)
    with pytest.raises(ValueError, match="belong to other tokens"):
        TopkDataset(other, root).__getitems__([0])
    topk_ds = TopkDataset(ds, root)
    topk_ds.set_epoch(2)
    with pytest.raises(ValueError, match="no teacher top-k for epoch 2"):
        topk_ds.__getitems__([0])


def full_logits_metrics(student, teacher, batches):
    ce = kl = agree = tce = n = 0.0
    for b in batches:
        kw = dict(position_ids=b["position_ids"], use_cache=False)
        with torch.no_grad():
            s = student(b["input_ids"], **kw).logits[:, :-1]
            t = teacher(b["input_ids"], **kw).logits[:, :-1]
        lab = b["labels"][:, 1:]
        v = lab != -100
        s, t, lab = s[v], t[v], lab[v]
        ce += F.cross_entropy(s, lab, reduction="sum").item()
        tce += F.cross_entropy(t, lab, reduction="sum").item()
        kl += F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum").item()
        agree += (s.argmax(-1) == t.argmax(-1)).sum().item()
        n += v.sum().item()
    return {"ce": ce / n, "kl": kl / n, "top1_agreement": agree / n, "teacher_ce": tce / n, "tokens": n}


def test_distill_metrics_match_full_logits():
    teacher = tiny_teacher()
    student = build_student(teacher, "every_other")
    ds = PackedDataset(learnable_store(n=20), 64, shuffle=False)
    expected = full_logits_metrics(student, teacher, list(eval_batches(ds, 3)))
    cache: dict = {}
    got = distill_metrics(student, eval_batches(ds, 3), teacher=teacher, teacher_cache=cache, chunk=7)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert len(cache) == math.ceil(len(ds) / 3)
    again = distill_metrics(student, eval_batches(ds, 3), teacher=None, teacher_cache=cache)
    assert math.isnan(again["kl"]) and again["ce"] == pytest.approx(got["ce"], rel=1e-6)
    cached = distill_metrics(student, eval_batches(ds, 3), teacher=teacher, teacher_cache=cache)
    assert cached == pytest.approx(got, rel=1e-6)

    same = distill_metrics(teacher, eval_batches(ds, 3), teacher=teacher)
    assert same["kl"] == pytest.approx(0.0, abs=1e-5) and same["top1_agreement"] == 1.0
    assert same["ce"] == pytest.approx(same["teacher_ce"], rel=1e-6)


def test_distill_metrics_from_topk_batches(tmp_path):
    teacher = tiny_teacher()
    student = build_student(teacher, "every_other")
    ds = PackedDataset(learnable_store(n=20), 64, shuffle=False)
    precompute_teacher_topk(teacher, ds, tmp_path, k=VOCAB, progress=False)
    topk = TopkDataset(ds, tmp_path)
    dense = distill_metrics(student, eval_batches(ds, 4), teacher=teacher)
    sparse = distill_metrics(student, eval_batches(ds, 4, extra=topk.topk))
    for key in ("ce", "kl", "top1_agreement"):
        assert sparse[key] == pytest.approx(dense[key], rel=1e-4, abs=1e-6), key
    assert math.isnan(sparse["teacher_ce"])


def test_distill_metrics_refuses_data_without_trained_tokens():
    teacher = tiny_teacher()
    from tellneo.data import TokenStore

    store = TokenStore.from_sequences([np.arange(5), np.arange(7)], [np.full(5, -100), np.full(7, -100)])
    with pytest.raises(ValueError, match="no trained tokens"):
        distill_metrics(teacher, eval_batches(PackedDataset(store, 16, shuffle=False), 2), teacher=teacher)
