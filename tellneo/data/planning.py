"""Packing plans: which row and offset every sample (piece) gets in rows of ``seq_len`` tokens.

Strategies (all deterministic):

* ``bfd`` best fit decreasing: samples sorted longest first (ties keep input order), each placed in the open row
  with the least room that still holds it (among equals, the row that reached that room most recently), else a
  new row. O(n log seq_len) in C++.
* ``ffd`` first fit decreasing: same order, each placed in the lowest-numbered row that holds it. O(n log n).
* ``wrap``: samples in input order, rows filled to the brim; a sample crossing a row end is split there (the
  continuation starts a new row at position 0 and its first token is not trained). Fill rate ~1.

Overlong samples (longer than ``seq_len``) follow ``overlong``: ``error`` raises, ``truncate`` keeps the first
``seq_len`` tokens, ``split`` cuts them into ``seq_len``-token pieces packed independently.

``window`` (bfd/ffd): pack consecutive windows of that many pieces independently, so that sample order (e.g. the
TELL dispersion of task samples) is preserved at the scale of a window; rows of window k all precede rows of
window k+1.

``seq_len`` is at most :data:`MAX_SEQ_LEN` (the planners' bookkeeping grows with it).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

import numpy as np

from tellneo._backend import choose_backend
from tellneo._ext import has_native, native

STRATEGIES = ("bfd", "ffd", "wrap")
OVERLONG = ("error", "truncate", "split")
# The planners keep O(seq_len) bookkeeping (a capacity tree over remaining room 0..seq_len), so seq_len is bounded:
# 2^20 tokens is far beyond any model's context and costs ~50 MB; 10^9 would need tens of GB even for one sample.
MAX_SEQ_LEN = 1 << 20


@dataclass(frozen=True)
class Plan:
    """Placement of every piece of every sample.

    A *piece* is a run of one sample's tokens placed in one row. Without ``overlong="split"`` and with a strategy
    other than ``wrap``, pieces are exactly the samples, in order: ``row[i]`` / ``offset[i]`` belong to sample i.
    Otherwise ``sample[p]`` says which sample piece p came from (pieces of one sample are consecutive).

    Attributes (1-D int64 NumPy arrays, one entry per piece unless noted):
        sample, start (first token of the piece inside its sample), length, row, offset (inside the row);
        row_ptr ``[num_rows + 1]`` and row_pieces: the pieces of row r, by offset, are
        ``row_pieces[row_ptr[r]:row_ptr[r + 1]]``.
    """

    seq_len: int
    num_rows: int
    num_tokens: int
    sample: np.ndarray
    start: np.ndarray
    length: np.ndarray
    row: np.ndarray
    offset: np.ndarray
    row_ptr: np.ndarray
    row_pieces: np.ndarray
    strategy: str
    overlong: str
    window: int

    @property
    def num_pieces(self) -> int:
        return int(self.sample.size)

    @property
    def fill_rate(self) -> float:
        """Placed tokens / (num_rows * seq_len); 1.0 for an empty plan."""
        return self.num_tokens / (self.num_rows * self.seq_len) if self.num_rows else 1.0

    def row_lengths(self) -> np.ndarray:
        """``[num_rows]`` int64 tokens placed in each row (the rest is padding)."""
        return np.bincount(self.row, weights=self.length, minlength=self.num_rows).astype(np.int64)

    def __repr__(self) -> str:
        return (
            f"Plan(strategy={self.strategy!r}, seq_len={self.seq_len}, num_rows={self.num_rows}, "
            f"pieces={self.num_pieces}, tokens={self.num_tokens}, fill_rate={self.fill_rate:.4f})"
        )


def _check_args(lengths: Any, seq_len: int, strategy: str, overlong: str, window: int | None) -> np.ndarray:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if overlong not in OVERLONG:
        raise ValueError(f"overlong must be one of {OVERLONG}, got {overlong!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or not 0 < seq_len <= MAX_SEQ_LEN:
        raise ValueError(f"seq_len must be a positive int of at most {MAX_SEQ_LEN}, got {seq_len!r}")
    if window is not None and (not isinstance(window, (int, np.integer)) or window <= 0):
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    from tellneo.data.tokens import _as_int_array

    arr = _as_int_array(lengths, "lengths").astype(np.int64, copy=False)
    if arr.size and arr.min() <= 0:
        i = int(np.argmax(arr <= 0))
        raise ValueError(f"lengths[{i}] = {int(arr[i])}: every sample needs at least one token")
    if overlong == "error" and arr.size and arr.max() > seq_len:
        i = int(np.argmax(arr > seq_len))
        raise ValueError(
            f"sample {i} has {int(arr[i])} tokens, more than seq_len={seq_len} "
            "(overlong='error'; use overlong='truncate' or 'split')"
        )
    return np.ascontiguousarray(arr)


def plan(
    lengths: Any,
    seq_len: int,
    *,
    strategy: str = "bfd",
    overlong: str = "error",
    window: int | None = None,
    backend: str = "auto",
) -> Plan:
    """Plan rows of ``seq_len`` tokens for samples of the given ``lengths`` (1-D ints, list/NumPy/torch).

    ``backend``: ``"cpp"`` (tellneo._C, the default) or ``"torch"`` (:func:`plan_reference`, pure Python; the
    readable specification, identical output, slow for big inputs).
    """
    arr = _check_args(lengths, seq_len, strategy, overlong, window)
    which = choose_backend(
        "tellneo.data.planning",
        backend,
        is_cuda=False,
        available={"cpp": lambda: None if has_native() else "tellneo._C is not built", "torch": lambda: None},
        auto_cuda=("cpp", "torch"),
        auto_cpu=("cpp", "torch"),
    )
    if which == "torch":
        return plan_reference(arr, seq_len, strategy=strategy, overlong=overlong, window=window)
    d = native().plan(arr, int(seq_len), strategy, overlong, int(window or 0))
    return Plan(
        seq_len=int(seq_len),
        num_rows=int(d["num_rows"]),
        num_tokens=int(d["num_tokens"]),
        sample=d["sample"],
        start=d["start"],
        length=d["length"],
        row=d["row"],
        offset=d["offset"],
        row_ptr=d["row_ptr"],
        row_pieces=d["row_pieces"],
        strategy=strategy,
        overlong=overlong,
        window=int(window or 0),
    )


def plan_reference(
    lengths: Any, seq_len: int, *, strategy: str = "bfd", overlong: str = "error", window: int | None = None
) -> Plan:
    """Pure-Python plan with exactly the C++ semantics (including tie-breaking); the specification of :func:`plan`."""
    lengths = _check_args(lengths, seq_len, strategy, overlong, window)
    items: list[tuple[int, int, int]] = []  # (sample, start, length)
    for i, n in enumerate(lengths.tolist()):
        if n <= seq_len:
            items.append((i, 0, n))
        elif overlong == "truncate":
            items.append((i, 0, seq_len))
        else:  # split ("error" was rejected by _check_args)
            items.extend((i, s, min(seq_len, n - s)) for s in range(0, n, seq_len))

    pieces: list[tuple[int, int, int, int, int]] = []  # (sample, start, length, row, offset)
    num_rows = 0
    if strategy == "wrap":
        row, fill = 0, 0
        for sample, start, length in items:
            while length > 0:
                take = min(length, seq_len - fill)
                pieces.append((sample, start, take, row, fill))
                fill, start, length = fill + take, start + take, length - take
                if fill == seq_len:
                    row, fill = row + 1, 0
        num_rows = row + (1 if fill else 0)
    else:
        placement: dict[int, tuple[int, int]] = {}
        step = window or max(len(items), 1)
        for begin in range(0, len(items), step):
            window_items = range(begin, min(len(items), begin + step))
            order = sorted(window_items, key=lambda i: (-items[i][2], i))
            if strategy == "bfd":
                rows_by_room: dict[int, list[int]] = {}  # room left -> rows (stack: last reached is used first)
                rooms: list[int] = []  # sorted rooms that have at least one row
                for i in order:
                    need = items[i][2]
                    k = bisect.bisect_left(rooms, need)
                    if k == len(rooms):
                        row, room = num_rows, seq_len
                        num_rows += 1
                    else:
                        room = rooms[k]
                        row = rows_by_room[room].pop()
                        if not rows_by_room[room]:
                            rooms.pop(k)
                    placement[i] = (row, seq_len - room)
                    room -= need
                    if room > 0:
                        if not rows_by_room.get(room):
                            bisect.insort(rooms, room)
                        rows_by_room.setdefault(room, []).append(row)
            else:  # ffd
                first_row = num_rows
                rooms_by_row: list[int] = []
                for i in order:
                    need = items[i][2]
                    local = next((r for r, room in enumerate(rooms_by_row) if room >= need), None)
                    if local is None:
                        local = len(rooms_by_row)
                        rooms_by_row.append(seq_len)
                        num_rows += 1
                    placement[i] = (first_row + local, seq_len - rooms_by_row[local])
                    rooms_by_row[local] -= need
        pieces = [(s, st, n, *placement[i]) for i, (s, st, n) in enumerate(items)]

    cols = np.array(pieces, dtype=np.int64).reshape(-1, 5)
    sample, start, length, row, offset = (np.ascontiguousarray(cols[:, j]) for j in range(5))
    row_pieces = np.lexsort((offset, row)).astype(np.int64)
    row_ptr = np.zeros(num_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(row, minlength=num_rows), out=row_ptr[1:])
    return Plan(
        seq_len=int(seq_len),
        num_rows=num_rows,
        num_tokens=int(length.sum()),
        sample=sample,
        start=start,
        length=length,
        row=row,
        offset=offset,
        row_ptr=row_ptr,
        row_pieces=row_pieces,
        strategy=strategy,
        overlong=overlong,
        window=int(window or 0),
    )
