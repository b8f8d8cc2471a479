"""Emit: C++ == reference bit for bit; labels / positions / seq_idx / cu_seqlens consistent; HF format parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tellneo.data import IGNORE_INDEX, TokenStore, emit_rows, emit_rows_reference, emit_samples, pack, plan

KEYS_ROWS = ("input_ids", "labels", "position_ids", "seq_idx", "cu_seqlens")
KEYS_FLAT = ("input_ids", "labels", "position_ids", "seq_idx", "cu_seq_lens_q", "cu_seq_lens_k")


def assert_bitwise_equal(a, b, keys):
    for k in keys:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def random_store(rng, n, max_len, vocab=1000, with_labels=True, dtype=np.int32):
    lengths = rng.integers(1, max_len + 1, size=n)
    tokens = rng.integers(0, vocab, size=int(lengths.sum())).astype(dtype)
    labels = None
    if with_labels:
        labels = np.where(rng.random(tokens.size) < 0.3, IGNORE_INDEX, tokens).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return TokenStore.from_flat(tokens, offsets, labels)


def check_consistency(out, store, p, rows):
    """Every emitted token traces back to its sample; labels, positions, seq_idx and cu_seqlens agree."""
    ids, labels, pos, seq = (out[k].numpy() for k in ("input_ids", "labels", "position_ids", "seq_idx"))
    cu = out["cu_seqlens"].numpy()
    flat_seq = seq.reshape(-1)
    assert cu[0] == 0 and cu[-1] == ids.size
    for j in range(cu.size - 1):
        seg = slice(cu[j], cu[j + 1])
        assert np.all(flat_seq[seg] == j)
        assert np.array_equal(pos.reshape(-1)[seg], np.arange(cu[j + 1] - cu[j]))
        assert labels.reshape(-1)[cu[j]] == IGNORE_INDEX
    assert out["max_seqlen"] == np.diff(cu).max()
    for b, r in enumerate(rows):
        for q in p.row_pieces[p.row_ptr[r] : p.row_ptr[r + 1]]:
            s, start, n, off = p.sample[q], p.start[q], p.length[q], p.offset[q]
            assert np.array_equal(ids[b, off : off + n], store.sample(s)[start : start + n])
            assert np.array_equal(labels[b, off + 1 : off + n], store.sample_labels(s)[start + 1 : start + n])
        used = p.row_lengths()[r]
        assert np.all(labels[b, used:] == IGNORE_INDEX)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 60),
    max_len=st.integers(1, 40),
    seq_len=st.integers(1, 48),
    strategy=st.sampled_from(["bfd", "ffd", "wrap"]),
    with_labels=st.booleans(),
    int64_tokens=st.booleans(),
)
def test_cpp_emit_equals_reference(seed, n, max_len, seq_len, strategy, with_labels, int64_tokens):
    rng = np.random.default_rng(seed)
    store = random_store(rng, n, max_len, with_labels=with_labels, dtype=np.int64 if int64_tokens else np.int32)
    p = plan(store.lengths, seq_len, strategy=strategy, overlong="split")
    rows = rng.permutation(p.num_rows)[: max(1, p.num_rows // 2)]
    for layout, keys in (("rows", KEYS_ROWS), ("flat", KEYS_FLAT)):
        cpp = emit_rows(store, p, rows, layout=layout, pad_id=7, backend="cpp")
        ref = emit_rows_reference(store, p, rows, layout=layout, pad_id=7)
        assert_bitwise_equal(cpp, ref, keys)
        if layout == "rows":
            check_consistency(cpp, store, p, rows)
            assert cpp["max_seqlen"] == ref["max_seqlen"]
        else:
            assert cpp["max_length_q"] == ref["max_length_q"]


def test_multithreaded_emit_is_identical():
    rng = np.random.default_rng(3)
    store = random_store(rng, 5000, 700)
    p = plan(store.lengths, 1024)
    one = emit_rows(store, p, num_threads=1)
    two = emit_rows(store, p, num_threads=2)
    assert_bitwise_equal(one, two, KEYS_ROWS)


def test_flat_layout_matches_hf_data_collator_with_flattening():
    from transformers import DataCollatorWithFlattening

    rng = np.random.default_rng(5)
    samples = [rng.integers(0, 500, size=int(k)).tolist() for k in rng.integers(1, 30, size=17)]
    ours = emit_samples(TokenStore.from_sequences(samples))
    hf = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_seq_idx=True)(
        [{"input_ids": s} for s in samples]
    )
    for k in ("input_ids", "labels", "position_ids", "seq_idx", "cu_seq_lens_q", "cu_seq_lens_k"):
        assert torch.equal(ours[k], hf[k].to(ours[k].dtype)), k
        assert ours[k].dtype == hf[k].dtype, k
    assert ours["max_length_q"] == hf["max_length_q"] and ours["max_length_k"] == hf["max_length_k"]


def test_pack_public_contract():
    out = pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 5, labels=[[-100, 2, 3], [4, 5], [-100, -100, 8, 9]])
    assert set(out) == {"input_ids", "labels", "position_ids", "seq_idx", "cu_seqlens", "max_seqlen"}
    for k in ("input_ids", "labels", "position_ids"):
        assert out[k].dtype == torch.int64 and out[k].shape == (2, 5)
    assert out["cu_seqlens"].dtype == torch.int32 and out["seq_idx"].dtype == torch.int32
    # every sample's first token is untrained; the given -100 labels survive
    assert sorted(out["input_ids"].flatten().tolist()) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    trained = sorted(out["labels"][out["labels"] != IGNORE_INDEX].tolist())
    assert trained == [2, 3, 5, 8, 9]  # 1, 4 and 6 start their samples; 6 and 7 were given -100


def test_all_labels_ignored_is_fine():
    out = pack([[1, 2], [3]], 4, labels=[[-100, -100], [-100]])
    assert torch.all(out["labels"] == IGNORE_INDEX)


def test_split_pieces_restart_positions_and_untrain_their_first_token():
    out = pack([list(range(1, 11))], 4, overlong="split", strategy="wrap")
    assert out["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 0, 0]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 0, 1]]
    assert out["labels"][:, 0].tolist() == [IGNORE_INDEX] * 3


def test_emit_rejects_a_plan_for_another_store():
    store = TokenStore.from_sequences([[1, 2, 3], [4]])
    other = plan([3, 3], 4)  # sample 1 has 1 token in the store, 3 in the plan
    with pytest.raises(ValueError, match="does not fit its sample"):
        emit_rows(store, other, backend="cpp")
    with pytest.raises(ValueError, match="rows must lie in"):
        emit_rows(store, plan([3, 1], 4), [5])


def test_cpp_extension_checks_arguments():
    from tellneo._ext import native

    C = native()
    with pytest.raises(TypeError, match="lengths must have dtype int64"):
        C.plan(np.array([1, 2], dtype=np.int32), 4, "bfd", "error", 0)
    with pytest.raises(ValueError, match="strategy must be"):
        C.plan(np.array([1, 2]), 4, "best", "error", 0)
    with pytest.raises(ValueError, match="outside the token array"):
        C.check_segments(np.array([5]), np.array([10]), 8)
    cu, _ = C.check_segments(np.array([0]), np.array([4]), 8)
    small = np.empty(2, np.int64)
    with pytest.raises(ValueError, match="input_ids must have 4 elements"):
        C.emit(np.arange(8), None, np.array([0]), cu, 0, small, small, small, np.empty(2, np.int32))


@pytest.mark.parametrize("multiple", [1, 8, 64])
def test_flat_padding_to_a_multiple(multiple):
    rng = np.random.default_rng(11)
    store = random_store(rng, 30, 20)
    p = plan(store.lengths, 32)
    cpp = emit_rows(store, p, layout="flat", pad_to_multiple_of=multiple, pad_id=3, backend="cpp")
    ref = emit_rows_reference(store, p, range(p.num_rows), layout="flat", pad_to_multiple_of=multiple, pad_id=3)
    assert_bitwise_equal(cpp, ref, KEYS_FLAT)
    total = cpp["input_ids"].shape[1]
    assert total % multiple == 0 and total - store.num_tokens < multiple
    pad = total - store.num_tokens
    if pad:
        assert cpp["input_ids"][0, -pad:].eq(3).all() and cpp["labels"][0, -pad:].eq(IGNORE_INDEX).all()
        assert cpp["cu_seq_lens_q"][-2] == store.num_tokens
    samples = emit_samples(store, pad_to_multiple_of=multiple)
    assert samples["input_ids"].shape[1] % multiple == 0
    with pytest.raises(ValueError, match="applies to layout='flat'"):
        emit_rows(store, p, pad_to_multiple_of=8)
