"""TokenStore construction and bad input: clear errors that name the argument."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tellneo.data import IGNORE_INDEX, TokenStore, pack


def test_from_sequences_accepts_lists_numpy_torch():
    a = TokenStore.from_sequences([[1, 2], np.array([3], dtype=np.int32), torch.tensor([4, 5, 6])])
    assert a.tokens.tolist() == [1, 2, 3, 4, 5, 6] and a.offsets.tolist() == [0, 2, 3, 6]
    b = TokenStore.from_sequences([np.array([1, 2], dtype=np.int32)])
    assert b.tokens.dtype == np.int32


def test_from_hf_dataset_with_labels_and_masks():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict(
        {"input_ids": [[1, 2, 3], [4, 5]], "labels": [[-100, 2, 3], [4, -100]], "assistant_masks": [[0, 1, 1], [1, 0]]}
    )
    a = TokenStore.from_hf_dataset(ds, labels_column="labels")
    b = TokenStore.from_hf_dataset(ds, mask_column="assistant_masks")
    assert a.labels.tolist() == b.labels.tolist() == [IGNORE_INDEX, 2, 3, 4, IGNORE_INDEX]
    sub = TokenStore.from_hf_dataset(ds.select([1]))
    assert sub.tokens.tolist() == [4, 5] and sub.labels is None
    with pytest.raises(ValueError, match="no column 'ids'"):
        TokenStore.from_hf_dataset(ds, input_column="ids")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(samples=[]), ValueError, "samples is empty"),
        (dict(samples=[[1, 2], []]), ValueError, r"samples\[1\] is empty"),
        (dict(samples=[[1, -2]]), ValueError, "token ids must be >= 0"),
        (dict(samples=[[1, 50]], vocab_size=50), ValueError, "token id 50 in sample 0 is out of range for vocab_size=50"),
        (dict(samples=[[1.0, 2.0]]), TypeError, "integer token ids"),
        (dict(samples=[np.array([1.0, 2.0])]), TypeError, r"samples\[0\] must hold integer token ids"),
        (dict(samples=[[[1, 2]]]), TypeError, "integer"),
        (dict(samples=[[1, 2]], labels=[[1]]), ValueError, r"labels\[0\] has 1 entries but samples\[0\] has 2"),
        (dict(samples=[[1, 2]], labels=[[1, 2], [3]]), ValueError, "labels has 2 entries but samples has 1"),
        (dict(samples=[[1, 2]], labels=[[1, -5]]), ValueError, "label -5 in sample 0 is neither -100"),
        (dict(samples=[[1, 2, 3]], seq_len=2), ValueError, "sample 0 has 3 tokens, more than seq_len=2"),
        (dict(samples=[[1]], seq_len=0), ValueError, "seq_len must be a positive int"),
        (dict(samples=[[1]], strategy="best"), ValueError, "strategy must be one of"),
        (dict(samples=[[1]], overlong="drop"), ValueError, "overlong must be one of"),
        (dict(samples=[[1]], layout="2d"), ValueError, "layout must be one of"),
        (dict(samples=[[1]], backend="gpu"), ValueError, "backend must be one of"),
        (dict(samples="hello"), TypeError, "samples must be a list"),
    ],
)
def test_bad_input_gets_a_clear_error(kwargs, error, match):
    kwargs = dict(kwargs)
    samples = kwargs.pop("samples")
    seq_len = kwargs.pop("seq_len", 8)
    with pytest.raises(error, match=match):
        pack(samples, seq_len, **kwargs)


def test_explicit_unavailable_backend_raises():
    from tellneo._backend import BackendError

    with pytest.raises(BackendError, match="backend 'cuda' cannot run this call"):
        pack([[1, 2]], 4, backend="cuda")


def test_env_backend_is_honoured(monkeypatch):
    monkeypatch.setenv("TELLNEO_BACKEND", "torch")
    a = pack([[1, 2], [3]], 4)
    monkeypatch.setenv("TELLNEO_BACKEND", "cpp")
    b = pack([[1, 2], [3]], 4)
    assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "labels", "position_ids", "seq_idx", "cu_seqlens"))


def test_flat_store_validation():
    with pytest.raises(ValueError, match="offsets must start with 0"):
        TokenStore.from_flat(np.array([1, 2]), np.array([1, 2]))
    with pytest.raises(ValueError, match=r"offsets\[-1\] = 3 must equal the number of tokens 2"):
        TokenStore.from_flat(np.array([1, 2]), np.array([0, 3]))
    with pytest.raises(ValueError, match="non-decreasing"):
        TokenStore.from_flat(np.array([1, 2, 3]), np.array([0, 2, 1, 3]))


@pytest.mark.parametrize(
    "samples, error, match",
    [
        ([[1, 2], [3, [4, 5]]], TypeError, r"samples\[1\] must be a flat sequence of integer token ids, got nested"),
        ([[[1, 2], [3]], [4]], TypeError, r"samples\[0\] must be a flat sequence of integer token ids"),
        ([[1], (2, [3])], TypeError, r"samples\[1\] must be a flat sequence"),
        ([np.array([2**63 + 1], dtype=np.uint64)], ValueError, r"samples\[0\] holds 9223372036854775809, which does "
                                                               "not fit a 64-bit signed token id"),
        ([[1, 2], [2**63 + 1, 1]], ValueError, r"samples\[1\] holds 9223372036854775809"),
        ([[2**64 + 1]], ValueError, r"samples\[0\] holds 18446744073709551617"),
    ],
)
def test_ragged_nested_and_out_of_int64_ids_are_named(samples, error, match):
    with pytest.raises(error, match=match):
        TokenStore.from_sequences(samples)
    with pytest.raises(error, match=match):
        pack(samples, 8)


def test_unsigned_ids_that_fit_are_accepted_exactly():
    store = TokenStore.from_sequences([np.array([1, 2**40], dtype=np.uint64), np.array([7], dtype=np.uint32)])
    assert store.tokens.dtype == np.int64 and store.tokens.tolist() == [1, 2**40, 7]


def test_pad_id_is_checked_against_the_vocabulary():
    from tellneo.data import PackedDataset

    out = pack([[1, 2, 3], [4]], 3, pad_id=np.int64(9), vocab_size=10)
    assert out["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    for backend in ("torch", "cpp"):
        with pytest.raises(ValueError, match="pad_id 10 is out of range for vocab_size=10"):
            pack([[1, 2, 3], [4]], 3, pad_id=10, vocab_size=10, backend=backend)
        with pytest.raises(ValueError, match="pad_id must be a token id >= 0, got -1"):
            pack([[1, 2, 3], [4]], 3, pad_id=-1, backend=backend)
    for bad in (2.0, True, "0", None):
        with pytest.raises(TypeError, match="pad_id must be an int token id"):
            pack([[1]], 3, pad_id=bad)
    store = TokenStore.from_sequences([[1, 2, 3], [4]])
    with pytest.raises(ValueError, match="pad_id 50 is out of range for vocab_size=50"):
        PackedDataset(store, 3, pad_id=50, vocab_size=50)
    with pytest.raises(ValueError, match="pad_id must be a token id >= 0"):
        PackedDataset(store, 3, pad_id=-100)
