"""TokenStore: tokenized samples as one flat token array plus offsets (and optional per-token labels).

Everything the mixer does starts from a TokenStore. It can be built from a list of 1-D sequences (Python lists,
NumPy arrays or torch tensors), from flat arrays, or from a ``datasets.Dataset`` with an ``input_ids`` column
(zero-copy from Arrow where possible). Validation happens once, here, with errors that name the argument.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

IGNORE_INDEX = -100
_INT64 = np.iinfo(np.int64)


def _out_of_int64(values: Any) -> int | None:
    """The first Python int in a flat list/tuple that does not fit int64 (NumPy then makes it float or object)."""
    if isinstance(values, (list, tuple)):
        for v in values:
            if isinstance(v, int) and not isinstance(v, bool) and not _INT64.min <= v <= _INT64.max:
                return v
    return None


def _as_int_array(x: Any, name: str) -> np.ndarray:
    """A 1-D integer NumPy view/copy of a list, NumPy array or (CPU) torch tensor.

    TypeError for non-integer, nested or ragged data; ValueError for ids that do not fit int64 (e.g. uint64
    values >= 2**63, which a cast would silently wrap to negative numbers) and for arrays that are not 1-D.
    """
    if hasattr(x, "detach") and hasattr(x, "numpy"):  # torch.Tensor, without importing torch here
        if x.device.type != "cpu":
            x = x.detach().cpu()
        x = x.detach().numpy()
    nested = f"{name} must be a flat sequence of integer token ids, got nested or ragged lists"
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError):  # ragged nesting: NumPy cannot build an array at all
        raise TypeError(nested) from None
    big = _out_of_int64(x) if arr.dtype.kind in "fO" else None
    if big is not None:
        raise ValueError(f"{name} holds {big}, which does not fit a 64-bit signed token id")
    if isinstance(x, (list, tuple)) and arr.ndim > 1:
        raise TypeError(nested)
    if arr.dtype == object:
        raise TypeError(f"{name} must be a sequence of integers, got ragged or non-numeric data")
    if arr.size == 0 and arr.dtype.kind == "f":
        arr = arr.astype(np.int64)  # np.asarray([]) is float64
    if arr.dtype.kind not in "iu" or arr.dtype == np.bool_:
        raise TypeError(f"{name} must hold integer token ids (int32/int64), got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) > _INT64.max:
        raise ValueError(f"{name} holds {int(arr.max())}, which does not fit a 64-bit signed token id")
    return arr


def check_pad_id(pad_id: Any, vocab_size: int | None = None) -> int:
    """``pad_id`` as a Python int: a non-negative integer (NumPy integers accepted), below ``vocab_size`` when
    one is given. TypeError / ValueError naming ``pad_id`` otherwise (a padding id outside the vocabulary would
    make the embedding lookup of every padded row fail, or read a wrong row)."""
    if isinstance(pad_id, (bool, np.bool_)) or not isinstance(pad_id, (int, np.integer)):
        raise TypeError(f"pad_id must be an int token id, got {pad_id!r}")
    if not 0 <= pad_id <= _INT64.max:
        raise ValueError(f"pad_id must be a token id >= 0, got {pad_id}")
    if vocab_size is not None and pad_id >= vocab_size:
        raise ValueError(f"pad_id {pad_id} is out of range for vocab_size={vocab_size}")
    return int(pad_id)


def _narrowest_token_dtype(max_value: int) -> type:
    return np.int32 if max_value < 2**31 else np.int64


@dataclass(frozen=True)
class TokenStore:
    """Samples as ``tokens[offsets[i]:offsets[i+1]]``.

    Attributes:
        tokens: ``[T]`` int32 or int64 token ids, all >= 0 (and < vocab_size when one was given).
        offsets: ``[n + 1]`` int64, ``offsets[0] == 0``, non-decreasing, ``offsets[-1] == T``.
        labels: ``[T]`` int64 or None. Per-token training targets in the unshifted Hugging Face convention:
            ``IGNORE_INDEX`` (-100) marks tokens that are not trained; None means every token is trained (its
            label is the token itself).
    """

    tokens: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        tokens = _as_int_array(self.tokens, "tokens")
        offsets = _as_int_array(self.offsets, "offsets").astype(np.int64, copy=False)
        if offsets.size == 0 or offsets[0] != 0:
            raise ValueError("offsets must start with 0 (offsets has one more entry than there are samples)")
        if offsets[-1] != tokens.size:
            raise ValueError(f"offsets[-1] = {offsets[-1]} must equal the number of tokens {tokens.size}")
        if offsets.size > 1 and (np.diff(offsets) < 0).any():
            raise ValueError("offsets must be non-decreasing")
        if tokens.dtype not in (np.int32, np.int64):
            tokens = tokens.astype(_narrowest_token_dtype(int(tokens.max(initial=0))))
        object.__setattr__(self, "tokens", np.ascontiguousarray(tokens))
        object.__setattr__(self, "offsets", np.ascontiguousarray(offsets))
        if self.labels is not None:
            labels = _as_int_array(self.labels, "labels").astype(np.int64, copy=False)
            if labels.size != tokens.size:
                raise ValueError(f"labels has {labels.size} entries but tokens has {tokens.size}")
            object.__setattr__(self, "labels", np.ascontiguousarray(labels))

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_sequences(
        cls,
        samples: Sequence[Any],
        labels: Sequence[Any] | None = None,
        *,
        vocab_size: int | None = None,
        allow_empty: bool = False,
    ) -> TokenStore:
        """From a list of 1-D token sequences (lists, NumPy arrays or torch tensors, int32/int64).

        ``labels``, if given, is a list of the same length whose i-th entry has the same length as
        ``samples[i]`` (-100 = not trained). Empty samples raise unless ``allow_empty``.
        """
        if isinstance(samples, (str, bytes)) or not isinstance(samples, Sequence):
            raise TypeError(f"samples must be a list of 1-D token sequences, got {type(samples).__name__}")
        if labels is not None and len(labels) != len(samples):
            raise ValueError(f"labels has {len(labels)} entries but samples has {len(samples)}")
        if len(samples) > 0 and all(isinstance(s, list) for s in samples[:64]) and all(
            isinstance(s, list) for s in samples
        ):
            lengths = np.fromiter(map(len, samples), dtype=np.int64, count=len(samples))
            try:
                flat = np.asarray(list(itertools.chain.from_iterable(samples)))
            except (ValueError, TypeError):  # ragged nesting inside a sample
                flat = None
            if flat is not None and flat.size == 0:
                flat = flat.astype(np.int64)
            if flat is None or flat.dtype.kind not in "iu" or flat.ndim != 1 or (
                    flat.dtype == np.uint64 and int(flat.max()) > _INT64.max):
                for i, s in enumerate(samples):  # the first bad sample raises an error that names it
                    _as_int_array(s, f"samples[{i}]")
                got = flat.dtype if flat is not None else "mixed data"
                raise TypeError(f"samples must hold integer token ids, got {got}")
        else:
            arrays = [_as_int_array(s, f"samples[{i}]") for i, s in enumerate(samples)]
            lengths = np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays))
            dtype = np.int32 if arrays and all(a.dtype == np.int32 for a in arrays) else np.int64
            flat = np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype)
        if not allow_empty and (lengths == 0).any():
            i = int(np.argmax(lengths == 0))
            raise ValueError(f"samples[{i}] is empty: every sample needs at least one token")
        flat_labels = None
        if labels is not None:
            label_arrays = [_as_int_array(lab, f"labels[{i}]") for i, lab in enumerate(labels)]
            for i, (lab, n) in enumerate(zip(label_arrays, lengths)):
                if lab.size != n:
                    raise ValueError(f"labels[{i}] has {lab.size} entries but samples[{i}] has {n} tokens")
            flat_labels = np.concatenate(label_arrays).astype(np.int64) if label_arrays else np.zeros(0, np.int64)
        offsets = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        store = cls(flat, offsets, flat_labels)
        store.validate(vocab_size=vocab_size)
        return store

    @classmethod
    def from_flat(
        cls, tokens: Any, offsets: Any, labels: Any = None, *, vocab_size: int | None = None
    ) -> TokenStore:
        """From flat ``tokens [T]`` and ``offsets [n+1]`` (NumPy or torch, int32/int64)."""
        store = cls(_as_int_array(tokens, "tokens"), _as_int_array(offsets, "offsets"),
                    None if labels is None else _as_int_array(labels, "labels"))
        store.validate(vocab_size=vocab_size)
        return store

    @classmethod
    def from_hf_dataset(
        cls,
        dataset: Any,
        *,
        input_column: str = "input_ids",
        labels_column: str | None = None,
        mask_column: str | None = None,
        vocab_size: int | None = None,
    ) -> TokenStore:
        """From a ``datasets.Dataset`` with a list-of-int ``input_column``.

        Labels come from ``labels_column`` (per-token ids, -100 = untrained) or from ``mask_column`` (per-token
        0/1, e.g. the ``assistant_masks`` of ``apply_chat_template(return_assistant_tokens_mask=True)``: tokens
        with mask 0 get label -100). Give at most one of them.
        """
        if labels_column is not None and mask_column is not None:
            raise ValueError("give labels_column or mask_column, not both")
        for col in (input_column, labels_column, mask_column):
            if col is not None and col not in dataset.column_names:
                raise ValueError(f"dataset has no column {col!r}; its columns are {dataset.column_names}")
        if getattr(dataset, "_indices", None) is not None:
            dataset = dataset.flatten_indices()
        tokens, offsets = _arrow_list_column(dataset, input_column)
        labels = None
        if labels_column is not None:
            labels, label_offsets = _arrow_list_column(dataset, labels_column)
            if not np.array_equal(label_offsets, offsets):
                raise ValueError(f"column {labels_column!r} must have the same per-row lengths as {input_column!r}")
        elif mask_column is not None:
            mask, mask_offsets = _arrow_list_column(dataset, mask_column)
            if not np.array_equal(mask_offsets, offsets):
                raise ValueError(f"column {mask_column!r} must have the same per-row lengths as {input_column!r}")
            labels = np.where(mask.astype(bool), tokens, IGNORE_INDEX).astype(np.int64)
        lengths = np.diff(offsets)
        if (lengths == 0).any():
            raise ValueError(f"dataset row {int(np.argmax(lengths == 0))} has an empty {input_column!r}")
        return cls.from_flat(tokens, offsets, labels, vocab_size=vocab_size)

    # ---------------------------------------------------------------- properties
    def __len__(self) -> int:
        return self.offsets.size - 1

    @property
    def lengths(self) -> np.ndarray:
        """``[n]`` int64 tokens per sample."""
        return np.diff(self.offsets)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.size)

    def sample(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def sample_labels(self, i: int) -> np.ndarray:
        """Labels of sample i (-100 = untrained); the tokens themselves when the store has no labels."""
        src = self.labels if self.labels is not None else self.tokens
        return src[self.offsets[i] : self.offsets[i + 1]].astype(np.int64)

    def validate(self, *, vocab_size: int | None = None) -> None:
        """Raise ValueError on negative ids, ids >= vocab_size, or labels that are neither -100 nor valid ids."""
        if self.tokens.size:
            lo, hi = int(self.tokens.min()), int(self.tokens.max())
            if lo < 0:
                at = int(np.argmax(self.tokens < 0))
                raise ValueError(f"token ids must be >= 0; sample {self._sample_of(at)} holds {lo}")
            if vocab_size is not None and hi >= vocab_size:
                at = int(np.argmax(self.tokens >= vocab_size))
                raise ValueError(
                    f"token id {hi} in sample {self._sample_of(at)} is out of range for vocab_size={vocab_size}"
                )
        if self.labels is not None and self.labels.size:
            bad = (self.labels < 0) & (self.labels != IGNORE_INDEX)
            if vocab_size is not None:
                bad |= self.labels >= vocab_size
            if bad.any():
                at = int(np.argmax(bad))
                raise ValueError(
                    f"label {int(self.labels[at])} in sample {self._sample_of(at)} is neither {IGNORE_INDEX} "
                    f"nor a token id" + (f" < vocab_size={vocab_size}" if vocab_size is not None else " >= 0")
                )

    def _sample_of(self, token_index: int) -> int:
        return int(np.searchsorted(self.offsets, token_index, side="right") - 1)

    # ---------------------------------------------------------------- combination
    def take(self, indices: Any) -> TokenStore:
        """A new store holding samples ``indices`` (1-D int array, repeats allowed) in that order."""
        idx = _as_int_array(indices, "indices").astype(np.int64, copy=False)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise ValueError(f"indices must lie in [0, {len(self)}), got range [{idx.min()}, {idx.max()}]")
        lengths = self.lengths[idx]
        offsets = np.zeros(idx.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        gather = _ranges(self.offsets[idx], lengths)
        labels = self.labels[gather] if self.labels is not None else None
        return TokenStore(self.tokens[gather], offsets, labels)

    @staticmethod
    def concat(stores: Sequence[TokenStore]) -> TokenStore:
        """Samples of every store, in order. The result has labels if any input has (others get their tokens)."""
        if not stores:
            raise ValueError("concat needs at least one store")
        dtype = np.int64 if any(s.tokens.dtype == np.int64 for s in stores) else np.int32
        tokens = np.concatenate([s.tokens.astype(dtype, copy=False) for s in stores])
        offsets = [np.zeros(1, np.int64)]
        base = 0
        for s in stores:
            offsets.append(s.offsets[1:] + base)
            base += s.num_tokens
        labels = None
        if any(s.labels is not None for s in stores):
            labels = np.concatenate(
                [s.labels if s.labels is not None else s.tokens.astype(np.int64) for s in stores]
            )
        return TokenStore(tokens, np.concatenate(offsets), labels)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(starts[i], starts[i] + lengths[i]) for all i, vectorised."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    seg_start = np.zeros(lengths.size, dtype=np.int64)
    np.cumsum(lengths[:-1], out=seg_start[1:])
    return np.repeat(starts - seg_start, lengths) + np.arange(total, dtype=np.int64)


def _arrow_list_column(dataset: Any, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, offsets starting at 0) of a list column, without a Python-level loop."""
    import pyarrow as pa

    arr = dataset.data.column(column).combine_chunks()
    if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
        raise TypeError(f"column {column!r} must be a list of integers, got Arrow type {arr.type}")
    if arr.null_count:
        raise ValueError(f"column {column!r} has {arr.null_count} missing (null) rows")
    values = arr.flatten().to_numpy(zero_copy_only=False)
    offsets = np.asarray(arr.offsets, dtype=np.int64)
    return values, offsets - offsets[0]
