"""PackedDataset / PackedBatchSampler / PackedCollator: determinism, resume, ranks, workers, Trainer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tellneo.data import PackedBatchSampler, PackedCollator, PackedDataset, TokenStore, tell_mix_store


def make_store(n=400, seed=0):
    rng = np.random.default_rng(seed)
    return TokenStore.from_sequences([rng.integers(3, 250, size=int(k)).tolist() for k in rng.integers(1, 50, n)])


def batches(ds, batch_size, *, rank=0, world_size=1, start_step=0, workers=0, epoch=0):
    sampler = PackedBatchSampler(ds, batch_size, rank=rank, world_size=world_size, start_step=start_step)
    sampler.set_epoch(epoch)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=PackedCollator(), num_workers=workers)
    return [b["input_ids"] for b in loader]


def test_same_seed_same_batches_and_epochs_differ():
    a = batches(PackedDataset(make_store(), 64, seed=1), 4)
    b = batches(PackedDataset(make_store(), 64, seed=1), 4)
    c = batches(PackedDataset(make_store(), 64, seed=1), 4, epoch=1)
    assert len(a) > 5 and all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_resume_sees_exactly_the_remaining_batches():
    full = batches(PackedDataset(make_store(), 64, seed=2), 4)
    resumed = batches(PackedDataset(make_store(), 64, seed=2), 4, start_step=3)
    assert len(resumed) == len(full) - 3
    assert all(torch.equal(x, y) for x, y in zip(full[3:], resumed))


def test_ranks_are_disjoint_and_cover_the_global_batches():
    ds = PackedDataset(make_store(), 64, seed=3)
    world = 3
    per_rank = [
        [idx for step in PackedBatchSampler(ds, 2, rank=r, world_size=world) for idx in step] for r in range(world)
    ]
    flat = [i for rank in per_rank for i in rank]
    assert len(flat) == len(set(flat)), "a row went to two ranks"
    steps = ds.steps_per_epoch(2, world)
    assert sorted(flat) == list(range(steps * 2 * world))
    # and the samples inside those rows are disjoint too
    store, p, order = ds._cache
    seen = [s for i in flat for s in p.sample[p.row_pieces[p.row_ptr[order[i]] : p.row_ptr[order[i] + 1]]].tolist()]
    assert len(seen) == len(set(seen))


def test_workers_give_the_same_batches():
    ds = PackedDataset(make_store(), 64, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(batches(ds, 4), batches(ds, 4, workers=2)))


def test_every_sample_is_in_exactly_one_row_per_epoch():
    store = make_store(300, seed=9)
    ds = PackedDataset(store, 64, seed=5)
    tokens = torch.cat([ds[i]["input_ids"][: int(ds[i]["num_tokens"])] for i in range(len(ds))])
    assert tokens.numel() == store.num_tokens
    assert torch.equal(torch.sort(tokens).values, torch.sort(torch.from_numpy(store.tokens.astype(np.int64))).values)


def test_flat_collator_matches_rows_minus_padding():
    ds = PackedDataset(make_store(), 64, seed=6)
    items = ds.__getitems__([0, 1, 2])
    rows = PackedCollator("rows")(items)
    flat = PackedCollator("flat", return_flash_attn_kwargs=True, return_seq_idx=True)(items)
    used = [int(it["num_tokens"]) for it in items]
    assert torch.equal(flat["input_ids"][0], torch.cat([rows["input_ids"][b, :n] for b, n in enumerate(used)]))
    cu = flat["cu_seq_lens_q"]
    assert cu[-1] == sum(used) and torch.all(flat["position_ids"][0, cu[:-1].long()] == 0)
    assert flat["seq_idx"][0, -1] == cu.numel() - 2


def test_tell_source_keeps_order_without_shuffle():
    general = make_store(500, seed=1)
    task = make_store(5, seed=2)
    ds = PackedDataset(
        lambda epoch: tell_mix_store(task, general, anchor_ids=[1, 2], task_ratio=0.1, seed=0, epoch=epoch)[0],
        64, shuffle=False, strategy="bfd", window=100,
    )
    n0 = len(ds)
    first = ds[0]["input_ids"].clone()
    ds.set_epoch(1)
    assert len(ds) > 0 and (len(ds) != n0 or not torch.equal(first, ds[0]["input_ids"]))


def test_bad_dataset_input():
    with pytest.raises(ValueError, match="source is empty"):
        PackedDataset(TokenStore.from_sequences([]), 8)
    with pytest.raises(TypeError, match="source must be"):
        PackedDataset([[1, 2]], 8)
    ds = PackedDataset(make_store(), 64)
    with pytest.raises(ValueError, match="rank must be in"):
        PackedBatchSampler(ds, 2, rank=2, world_size=2)
    with pytest.raises(IndexError, match="past the end"):
        ds.batch_indices(10**6, 2)
    with pytest.raises(ValueError, match="empty batch"):
        PackedCollator()([])


def test_hf_trainer_trains_on_packed_rows(tmp_path):
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments

    from tests.conftest import tiny_llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    ds = PackedDataset(make_store(200), 64, seed=0)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-3,
        report_to=[], logging_steps=1, save_strategy="no", use_cpu=True, dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=PackedCollator())
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(np.isfinite(losses)) and result.global_step == 4


def test_dataset_indices_must_be_ints_in_range():
    ds = PackedDataset(TokenStore.from_sequences([[1, 2, 3], [4, 5]]), 4, shuffle=False)
    assert len(ds) == 2 and ds[np.int64(1)]["input_ids"].tolist() == [4, 5, 0, 0]
    for bad in (2, -1, 10**6):
        with pytest.raises(IndexError, match=rf"row index {bad} is out of range: epoch 0 has 2 rows \(indices 0..1\)"):
            ds[bad]
    with pytest.raises(TypeError, match="row indices must be a 1-D sequence of ints"):
        ds[0.5]  # was silently row 0
    with pytest.raises(TypeError, match="row indices must be a 1-D sequence of ints"):
        ds.batch([[0, 1]])
