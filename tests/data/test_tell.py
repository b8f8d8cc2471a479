"""TELL mixing: ratio, rounds, determinism, dispersion bound, anchor prompt, ablation orders."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tellneo.data import IGNORE_INDEX, TokenStore, mix_order, plan, tell_mix, tell_mix_store


def window_deviation(is_task: np.ndarray, rho: float) -> float:
    """max over all windows [a, b) of |#task - rho * (b - a)|, in O(T^2) vectorised (small T)."""
    c = np.concatenate([[0], np.cumsum(is_task)])
    idx = np.arange(c.size)
    counts = c[None, :] - c[:, None]
    widths = idx[None, :] - idx[:, None]
    upper = widths > 0
    return float(np.abs(counts - rho * widths)[upper].max())


@settings(max_examples=50, deadline=None)
@given(
    n_task=st.integers(1, 40),
    n_general=st.integers(1, 300),
    ratio=st.floats(0.01, 0.9),
    seed=st.integers(0, 2**40),
    epoch=st.integers(0, 5),
)
def test_stratified_dispersion_bound(n_task, n_general, ratio, seed, epoch):
    is_task, index = mix_order(n_task, n_general, task_ratio=ratio, seed=seed, epoch=epoch)
    k = is_task.sum()
    rho = k / is_task.size
    assert window_deviation(is_task, rho) < 2 + rho
    # general samples: each exactly once; task samples: in rounds of full permutations
    assert sorted(index[~is_task].tolist()) == list(range(n_general))
    task_seq = index[is_task]
    for r in range(0, k, n_task):
        block = task_seq[r : r + n_task]
        assert len(set(block.tolist())) == block.size


def test_random_shuffle_is_burstier_than_stratified():
    """The extensive shuffle bounds windows; a uniform shuffle does not (it is the paper's 'random mix')."""
    strat, _ = mix_order(50, 2000, task_ratio=0.05, seed=1, epoch=0, spread="stratified")
    rand, _ = mix_order(50, 2000, task_ratio=0.05, seed=1, epoch=0, spread="random")
    rho = strat.sum() / strat.size
    assert window_deviation(strat, rho) < 2 + rho
    assert window_deviation(rand, rho) > 2 + rho


def test_end_spread_puts_the_task_block_last():
    is_task, _ = mix_order(3, 20, task_ratio=0.2, seed=0, epoch=0, spread="end")
    k = is_task.sum()
    assert is_task[-k:].all() and not is_task[:-k].any()


def test_ratio_and_epochs():
    is_task0, idx0 = mix_order(10, 1000, task_ratio=0.1, seed=7, epoch=0)
    is_task1, idx1 = mix_order(10, 1000, task_ratio=0.1, seed=7, epoch=1)
    again, idx_again = mix_order(10, 1000, task_ratio=0.1, seed=7, epoch=0)
    assert abs(is_task0.mean() - 0.1) < 1e-3
    assert np.array_equal(is_task0, again) and np.array_equal(idx0, idx_again)
    assert not (np.array_equal(is_task0, is_task1) and np.array_equal(idx0, idx1))


def test_order_is_identical_in_another_process():
    code = (
        "from tellneo.data import mix_order; import hashlib;"
        "t, i = mix_order(13, 997, task_ratio=0.07, seed=123456789, epoch=3);"
        "print(hashlib.sha256(t.tobytes() + i.tobytes()).hexdigest())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    import hashlib

    t, i = mix_order(13, 997, task_ratio=0.07, seed=123456789, epoch=3)
    assert out == hashlib.sha256(t.tobytes() + i.tobytes()).hexdigest()


def test_tell_mix_public_contract():
    task = [[101, 102], [103]]
    general = [[1, 2, 3], [4, 5], [6], [7, 8]]
    samples, labels, is_task = tell_mix(task, general, anchor_ids=[900, 901], task_ratio=1 / 3, seed=0, epoch=0)
    assert is_task.dtype == torch.bool and len(samples) == len(labels) == is_task.numel() == 6
    assert int(is_task.sum()) == 2
    for s, lab, t in zip(samples, labels, is_task.tolist()):
        assert s.shape == lab.shape
        if t:
            assert s[:2].tolist() == [900, 901] and lab[:2].tolist() == [IGNORE_INDEX] * 2
            assert lab[2:].tolist() == s[2:].tolist()
        else:
            assert lab.tolist() == s.tolist()
    assert sorted(tuple(s.tolist()) for s, t in zip(samples, is_task) if not t) == sorted(map(tuple, general))


def test_tell_mix_keeps_given_labels_and_can_train_the_anchor():
    samples, labels, is_task = tell_mix(
        [[11, 12, 13]], [[1], [2]], anchor_ids=[5], task_ratio=1 / 3, seed=0, epoch=0,
        task_labels=[[-100, 12, 13]], train_anchor=True,
    )
    (j,) = torch.nonzero(is_task).view(-1).tolist()
    assert samples[j].tolist() == [5, 11, 12, 13] and labels[j].tolist() == [5, -100, 12, 13]


def test_packed_rows_keep_dispersion_with_a_window():
    """Over whole packing windows the rows hold the proportional share of task samples (bound of the docs)."""
    rng = np.random.default_rng(0)
    general = TokenStore.from_sequences([rng.integers(0, 100, size=int(n)).tolist() for n in rng.integers(5, 60, 3000)])
    task = TokenStore.from_sequences([rng.integers(0, 100, size=int(n)).tolist() for n in rng.integers(30, 80, 12)])
    mixed, is_task = tell_mix_store(task, general, anchor_ids=list(range(20)), task_ratio=0.04, seed=3, epoch=0)
    w = 200
    p = plan(mixed.lengths, 256, strategy="bfd", window=w)
    rho = is_task.mean()
    task_per_row = np.bincount(p.row, weights=is_task[p.sample], minlength=p.num_rows)
    samples_per_row = np.bincount(p.row, minlength=p.num_rows)
    # rows of packing windows j..k (whole windows) satisfy the sample-level bound
    window_first_row = [int(p.row[i * w : (i + 1) * w].min()) for i in range(-(-len(mixed) // w))] + [p.num_rows]
    for a in range(len(window_first_row) - 1):
        for b in range(a + 1, len(window_first_row)):
            rows = slice(window_first_row[a], window_first_row[b])
            assert abs(task_per_row[rows].sum() - rho * samples_per_row[rows].sum()) < 2 + rho


def test_bad_tell_input():
    with pytest.raises(ValueError, match="task is empty"):
        tell_mix([], [[1]], anchor_ids=[], task_ratio=0.5, seed=0, epoch=0)
    with pytest.raises(ValueError, match="general is empty"):
        tell_mix([[1]], [], anchor_ids=[], task_ratio=0.5, seed=0, epoch=0)
    for ratio in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError, match="task_ratio must be a number in \\(0, 1\\)"):
            tell_mix([[1]], [[2]], anchor_ids=[], task_ratio=ratio, seed=0, epoch=0)
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        mix_order(1, 1, task_ratio=0.5, seed=-1, epoch=0)
    with pytest.raises(ValueError, match="spread must be one of"):
        mix_order(1, 1, task_ratio=0.5, seed=0, epoch=0, spread="burst")
    with pytest.raises(TypeError, match="integer token ids"):
        tell_mix([[1.5]], [[2]], anchor_ids=[], task_ratio=0.5, seed=0, epoch=0)


def test_spread_task_rows_evens_out_rows_inside_windows():
    from tellneo.data import PackedDataset

    rng = np.random.default_rng(0)
    general = TokenStore.from_sequences([rng.integers(0, 100, size=int(n)).tolist() for n in rng.integers(5, 200, 3000)])
    task = TokenStore.from_sequences([rng.integers(0, 100, size=int(n)).tolist() for n in rng.integers(60, 70, 16)])

    def deviation(ds):
        p, is_task = ds.plan, mixed(ds.epoch)[1]
        per_row = np.bincount(p.row, weights=is_task[p.sample], minlength=p.num_rows)[ds.row_order]
        return window_deviation(per_row, per_row.sum() / per_row.size)

    mixed = lambda epoch: tell_mix_store(task, general, anchor_ids=[1] * 40, task_ratio=0.05, seed=0, epoch=epoch)
    spread = PackedDataset(mixed, 512, shuffle=False, window=400)
    plain = PackedDataset(lambda epoch: mixed(epoch)[0], 512, shuffle=False, window=400)
    assert np.array_equal(np.sort(spread.row_order), np.arange(len(spread)))
    assert deviation(spread) < 0.5 * deviation(plain)


def _task_rounds_loop(n_task, k, seed, epoch):
    """The task sequence as the plain loop over rounds that mix_order vectorises (the readable reference)."""
    from tellneo.data import rng

    rounds = -(-k // n_task)
    return np.concatenate([rng.permutation(n_task, seed, rng.stream_id(epoch, 2, r)) for r in range(rounds)])[:k]


@pytest.mark.parametrize("n_task, n_general, ratio, seed, epoch", [(1, 50, 0.5, 0, 0), (7, 300, 0.6, 11, 2),
                                                                   (40, 30, 0.9, 2**40, 5), (1000, 10, 0.3, 3, 1)])
def test_vectorised_task_rounds_equal_the_loop(n_task, n_general, ratio, seed, epoch):
    from tellneo.data.tell import num_task_slots

    is_task, index = mix_order(n_task, n_general, task_ratio=ratio, seed=seed, epoch=epoch)
    k = num_task_slots(n_general, ratio)
    assert np.array_equal(index[is_task], _task_rounds_loop(n_task, k, seed, epoch))


def test_numpy_scalars_are_accepted_as_ratio_seed_and_epoch():
    a = mix_order(5, 200, task_ratio=0.25, seed=3, epoch=1)
    b = mix_order(np.int32(5), 200, task_ratio=np.float32(0.25), seed=np.int64(3), epoch=np.uint8(1))
    c = mix_order(5, 200, task_ratio=np.float64(0.25), seed=np.uint64(3), epoch=np.int16(1))
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and all(np.array_equal(x, y) for x, y in zip(a, c))
    samples, _, is_task = tell_mix([[1, 2]], [[3, 4]] * 10, anchor_ids=[], task_ratio=np.float32(0.3),
                                   seed=np.int64(1), epoch=np.int32(0))
    assert int(is_task.sum()) == 4 and len(samples) == 14
    for bad in (np.bool_(True), True, "0.5", float("nan"), np.float32(1.0)):
        with pytest.raises(ValueError, match="task_ratio must be a number in"):
            mix_order(5, 200, task_ratio=bad, seed=0, epoch=0)


def test_a_ratio_near_one_is_refused_at_once_and_large_legit_mixes_stay_fast():
    import time

    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"task_ratio=0.999999 asks for 299,999,700 task slots among 300 general .* "
                                         r"at most 100 x the larger input set \(30,000\)"):
        tell_mix([[1, 2]] * 8, [[3, 4, 5]] * 300, anchor_ids=[], task_ratio=0.999999, seed=0, epoch=0)
    assert time.perf_counter() - t0 < 5  # refused before any work (it ran past 300 s before)
    # just inside the bound: 99 task slots per general sample, each of 8 task samples ~3.7k times
    is_task, index = mix_order(8, 300, task_ratio=0.99, seed=0, epoch=0)
    assert int(is_task.sum()) == 29700 and sorted(np.bincount(index[is_task]).tolist()) == [3712] * 4 + [3713] * 4
    # one task sample in a large general stream: 200k rounds, vectorised (a Python loop took ~10 s)
    is_task, index = mix_order(1, 200_000, task_ratio=0.5, seed=0, epoch=0)
    assert int(is_task.sum()) == 200_000 and not index[is_task].any()
