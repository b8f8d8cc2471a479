"""Packed rows as a map-style dataset, a batch sampler for ranks/resume, and a collator for HF and plain loops.

Determinism: the rows of an epoch are a pure function of ``(seed, epoch)`` (and the data), and global step s of an
epoch holds rows ``order[s*B*W : (s+1)*B*W]`` (B rows per rank, W ranks), rank r taking the r-th block of B. So a
resumed run that starts at step s sees exactly the batches it would have seen, and ranks never share a row.
DataLoader workers fetch rows by index, so they are disjoint too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from tellneo.data import rng
from tellneo.data.emit import emit_rows
from tellneo.data.planning import Plan, plan
from tellneo.data.tell import spread_task_rows
from tellneo.data.tokens import IGNORE_INDEX, TokenStore, check_pad_id

_SAMPLE_ORDER, _ROW_ORDER = 11, 12


class PackedDataset(torch.utils.data.Dataset):
    """Rows of ``seq_len`` tokens packed from a :class:`TokenStore`, emitted on demand.

    Args:
        source: a TokenStore, or a function ``epoch -> TokenStore`` whose output is already in training order, or
            ``epoch -> (TokenStore, is_task)`` as :func:`tellneo.data.tell_mix_store` returns for TELL; with
            ``is_task`` and ``shuffle=False`` the rows of each packing window are ordered by
            :func:`tellneo.data.tell.spread_task_rows` so task samples stay evenly spread after packing.
        seq_len: row length.
        strategy, overlong, window: packing options (see :mod:`tellneo.data.planning`).
        seed: drives the per-epoch sample shuffle and row shuffle.
        shuffle: permute samples before packing and rows after (per epoch). Use ``False`` to keep the source
            order (TELL: the mixer already spread the task samples; pair it with ``window``).
        pad_id: padding token id (a non-negative int, below ``vocab_size`` when that is given).
        vocab_size: optional; checks ``pad_id`` against it.
        fill_batches: optional; every epoch's row count is rounded up to a multiple of it with *filler rows*
            (a copy of the epoch's first row with every label -100: no loss, no gradient), so that a trainer that
            drops a partial last batch of ``fill_batches`` rows drops no sample (TELL's exposure counting). The
            filler rows come last; ``num_rows`` is the packed rows without them.

    Item ``i`` is row ``i`` of the current epoch as a dict of 1-D tensors ``input_ids``, ``labels``,
    ``position_ids`` (int64, ``[seq_len]``) and ``num_tokens`` (the real tokens before the row's padding).
    """

    def __init__(
        self,
        source: TokenStore | Callable[[int], TokenStore],
        seq_len: int,
        *,
        strategy: str = "bfd",
        overlong: str = "truncate",
        window: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        pad_id: int = 0,
        epoch: int = 0,
        backend: str = "auto",
        vocab_size: int | None = None,
        fill_batches: int | None = None,
    ) -> None:
        if not isinstance(source, TokenStore) and not callable(source):
            raise TypeError("source must be a TokenStore or a function epoch -> TokenStore")
        if isinstance(source, TokenStore) and len(source) == 0:
            raise ValueError("source is empty: PackedDataset needs at least one sample")
        if fill_batches is not None and (isinstance(fill_batches, bool) or not isinstance(fill_batches, int)
                                         or fill_batches <= 0):
            raise ValueError(f"fill_batches must be a positive int or None, got {fill_batches!r}")
        self.fill_batches = fill_batches
        self.source = source
        self.seq_len = seq_len
        self.strategy = strategy
        self.overlong = overlong
        self.window = window
        self.seed = seed
        self.shuffle = shuffle
        self.pad_id = check_pad_id(pad_id, vocab_size)
        self.backend = backend
        self._epoch = -1
        self._cache: tuple[TokenStore, Plan, np.ndarray] | None = None
        self.set_epoch(epoch)

    # ------------------------------------------------------------------ epoch state
    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Re-plan for ``epoch`` (cheap to call repeatedly with the same epoch)."""
        if epoch == self._epoch and self._cache is not None:
            return
        self._epoch = int(epoch)
        self._cache = self._build(self._epoch)

    def _build(self, epoch: int) -> tuple[TokenStore, Plan, np.ndarray]:
        is_task = None
        if isinstance(self.source, TokenStore):
            store = self.source
            if self.shuffle:
                store = store.take(rng.permutation(len(store), self.seed, rng.stream_id(epoch, _SAMPLE_ORDER)))
        else:
            store = self.source(epoch)
            if isinstance(store, tuple):
                store, is_task = store
            if not isinstance(store, TokenStore) or len(store) == 0:
                raise ValueError(f"source({epoch}) must return a non-empty TokenStore (or a (TokenStore, is_task) pair)")
        p = plan(store.lengths, self.seq_len, strategy=self.strategy, overlong=self.overlong, window=self.window,
                 backend="torch" if self.backend == "torch" else "auto")
        if self.shuffle:
            order = rng.permutation(p.num_rows, self.seed, rng.stream_id(epoch, _ROW_ORDER))
        elif is_task is not None:
            order = spread_task_rows(p, is_task)
        else:
            order = np.arange(p.num_rows, dtype=np.int64)
        self.is_task = is_task  # [samples] bool or None, for this epoch's store
        return store, p, order

    @property
    def store(self) -> TokenStore:
        return self._cache[0]

    @property
    def plan(self) -> Plan:
        return self._cache[1]

    @property
    def row_order(self) -> np.ndarray:
        """``[num_rows]``: item i of this epoch is plan row ``row_order[i]``."""
        return self._cache[2]

    @property
    def num_rows(self) -> int:
        """Packed rows of this epoch, filler rows (``fill_batches``) not counted."""
        return self.plan.num_rows

    def __len__(self) -> int:
        rows = self.plan.num_rows
        return rows if self.fill_batches is None else -(-rows // self.fill_batches) * self.fill_batches

    # ------------------------------------------------------------------ access
    def batch(self, indices: Sequence[int] | np.ndarray, *, layout: str = "rows",
              device: torch.device | str | None = None) -> dict[str, Any]:
        """Items ``indices`` of this epoch emitted together (one native call); see :func:`emit_rows`."""
        store, p, _ = self._cache
        idx = np.asarray(indices)
        if idx.size and (idx.dtype.kind not in "iu" or idx.ndim != 1):
            raise TypeError(f"row indices must be a 1-D sequence of ints, got dtype {idx.dtype}, shape {idx.shape}")
        idx = idx.astype(np.int64)
        n = len(self)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            bad = int(idx[(idx < 0) | (idx >= n)][0])
            raise IndexError(f"row index {bad} is out of range: epoch {self.epoch} has {n} rows "
                             f"(indices 0..{n - 1})")
        rows, filler = self._plan_rows(idx)
        if not filler.any():
            return emit_rows(store, p, rows, layout=layout, pad_id=self.pad_id, backend=self.backend, device=device)
        if layout != "rows":  # a filler row carries no label: leaving it out of a flat batch changes nothing
            return emit_rows(store, p, rows[~filler], layout=layout, pad_id=self.pad_id, backend=self.backend,
                             device=device)
        out = emit_rows(store, p, rows, layout=layout, pad_id=self.pad_id, backend=self.backend, device=device)
        out["labels"][torch.from_numpy(filler).to(out["labels"].device)] = IGNORE_INDEX
        return out

    def _plan_rows(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(plan row of each item, which items are filler rows)``; a filler row reuses the epoch's first row."""
        order = self._cache[2]
        filler = idx >= len(order)
        return np.where(filler, order[0], order[np.minimum(idx, len(order) - 1)]), filler

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        out = self.batch(indices)
        used = torch.from_numpy(self.plan.row_lengths()[self._plan_rows(np.asarray(indices, dtype=np.int64))[0]])
        return [
            {"input_ids": out["input_ids"][k], "labels": out["labels"][k], "position_ids": out["position_ids"][k],
             "num_tokens": used[k]}
            for k in range(len(indices))
        ]

    def steps_per_epoch(self, batch_size: int, world_size: int = 1) -> int:
        """Full global batches of ``batch_size * world_size`` rows in this epoch (a partial last one is dropped)."""
        return len(self) // (batch_size * world_size)

    def batch_indices(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[int]:
        """Item indices of ``rank``'s part of global ``step`` of the current epoch."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if not 0 <= step < self.steps_per_epoch(batch_size, world_size):
            raise IndexError(f"step {step} is past the end of epoch {self.epoch} "
                             f"({self.steps_per_epoch(batch_size, world_size)} steps)")
        first = (step * world_size + rank) * batch_size
        return list(range(first, first + batch_size))


class PackedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields this rank's item indices for every step of the dataset's current epoch, from ``start_step`` on.

    Use as ``DataLoader(ds, batch_sampler=PackedBatchSampler(ds, 8, rank=r, world_size=w), collate_fn=...)``.
    Call :meth:`set_epoch` at the start of every epoch (it also re-plans the dataset); ``start_step`` applies to
    the first epoch iterated (resume).
    """

    def __init__(self, dataset: PackedDataset, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 start_step: int = 0) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.dataset, self.batch_size, self.rank, self.world_size = dataset, batch_size, rank, world_size
        self.start_step = start_step

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return max(0, self.dataset.steps_per_epoch(self.batch_size, self.world_size) - self.start_step)

    def __iter__(self) -> Iterator[list[int]]:
        start, self.start_step = self.start_step, 0
        for step in range(start, self.dataset.steps_per_epoch(self.batch_size, self.world_size)):
            yield self.dataset.batch_indices(step, self.batch_size, self.rank, self.world_size)


class PackedCollator:
    """Collates :class:`PackedDataset` items for a Hugging Face model.

    ``layout="rows"``: ``input_ids``/``labels``/``position_ids`` ``[B, seq_len]``. Transformers (>= 4.56) builds a
    block-diagonal attention mask from ``position_ids`` when no ``attention_mask`` is passed (and no KV cache is
    used: call the model with ``use_cache=False``), so samples in a row do not see each other.

    ``layout="flat"``: one ``[1, T]`` row without padding, the ``DataCollatorWithFlattening`` format, for
    flash-attention varlen kernels.

    ``return_seq_idx`` / ``return_flash_attn_kwargs`` add ``seq_idx`` and ``cu_seq_lens_q/k``, ``max_length_q/k``
    (computed from the position ids, so they always agree with them).
    """

    def __init__(self, layout: str = "rows", *, return_seq_idx: bool = False,
                 return_flash_attn_kwargs: bool = False) -> None:
        if layout not in ("rows", "flat"):
            raise ValueError(f"layout must be 'rows' or 'flat', got {layout!r}")
        self.layout = layout
        self.return_seq_idx = return_seq_idx
        self.return_flash_attn_kwargs = return_flash_attn_kwargs

    def __call__(self, items: Sequence[dict[str, torch.Tensor]]) -> dict[str, Any]:
        if len(items) == 0:
            raise ValueError("cannot collate an empty batch")
        if self.layout == "rows":
            batch = {k: torch.stack([it[k] for it in items]) for k in ("input_ids", "labels", "position_ids")}
        else:
            n = [int(it["num_tokens"]) for it in items]
            batch = {k: torch.cat([it[k][:m] for it, m in zip(items, n)]).unsqueeze(0)
                     for k in ("input_ids", "labels", "position_ids")}
        if self.return_seq_idx or self.return_flash_attn_kwargs:
            flat_pos = batch["position_ids"].reshape(-1)
            starts = flat_pos == 0
            if self.return_seq_idx:
                batch["seq_idx"] = (torch.cumsum(starts.to(torch.int32), 0) - 1).to(torch.int32).view_as(
                    batch["position_ids"])
            if self.return_flash_attn_kwargs:
                bounds = torch.cat([torch.nonzero(starts).view(-1), torch.tensor([flat_pos.numel()])]).to(torch.int32)
                longest = int(torch.diff(bounds).max())
                batch.update(cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=longest, max_length_k=longest)
        return batch


def trained_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Number of positions with a label (what HF calls ``num_items_in_batch`` before shifting)."""
    return int((batch["labels"] != IGNORE_INDEX).sum())
