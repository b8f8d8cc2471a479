"""PackedDataset(fill_batches=): an epoch rounded up to whole batches with filler rows that train nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tellneo.data import PackedDataset, TokenStore


def store(n=9, seed=0):
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(1, 99, size=int(k)) for k in rng.integers(5, 30, size=n)]
    return TokenStore.from_sequences(seqs, [np.where(np.arange(s.size) < 2, -100, s) for s in seqs])


@pytest.mark.parametrize("fill", [1, 3, 4, 7])
def test_filler_rows_round_the_epoch_up_and_carry_no_label(fill):
    plain = PackedDataset(store(), 32, shuffle=False)
    ds = PackedDataset(store(), 32, shuffle=False, fill_batches=fill)
    rows = plain.num_rows
    assert ds.num_rows == rows and len(ds) == -(-rows // fill) * fill and len(plain) == rows
    out = ds.batch(list(range(len(ds))))
    ref = plain.batch(list(range(rows)))
    assert torch.equal(out["input_ids"][:rows], ref["input_ids"]) and torch.equal(out["labels"][:rows], ref["labels"])
    assert bool((out["labels"][rows:] == -100).all())
    items = ds.__getitems__(list(range(len(ds))))
    assert [int(i["num_tokens"]) for i in items[:rows]] == plain.plan.row_lengths()[plain.row_order].tolist()
    flat = ds.batch(list(range(len(ds))), layout="flat")  # filler rows hold no label: left out of a flat batch
    assert torch.equal(flat["input_ids"], plain.batch(list(range(rows)), layout="flat")["input_ids"])
    with pytest.raises(IndexError, match="out of range"):
        ds.batch([len(ds)])


def test_bad_fill_batches_is_refused():
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="fill_batches must be a positive int"):
            PackedDataset(store(), 32, fill_batches=bad)
