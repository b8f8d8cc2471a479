"""Emit: turn plan rows (or a list of samples) into training tensors.

Output of :func:`emit_rows` with ``layout="rows"`` for B selected rows of length L::

    input_ids     [B, L] int64   token ids; padding = pad_id
    labels        [B, L] int64   unshifted (Hugging Face shifts inside the model); -100 on untrained tokens, on
                                 padding, and on the first token of every piece, so that no position is trained
                                 to predict across a sample boundary
    position_ids  [B, L] int64   restart at 0 for every piece; a row's trailing padding is one more run 0..k-1
    seq_idx       [B, L] int32   index of the segment (piece or padding run) in row-major order
    cu_seqlens    [S + 1] int32  segment boundaries over the B*L flattened tokens (padding runs included, so
                                 that tokens of segment j are exactly [cu_seqlens[j], cu_seqlens[j+1]))
    max_seqlen    int            longest segment

``layout="flat"`` drops the padding and returns one row ``[1, T]`` in the format of Hugging Face's
``DataCollatorWithFlattening`` (``input_ids``, ``labels``, ``position_ids``, ``seq_idx``, ``cu_seq_lens_q``,
``cu_seq_lens_k``, ``max_length_q``, ``max_length_k``), which HF models use to attend within samples only.

Backends: ``cpp`` (CPU, tellneo._C), ``cuda`` (tellneo._C CUDA kernel, outputs on the GPU, same bits),
``torch`` (:func:`emit_rows_reference`, readable NumPy, the specification).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from tellneo._backend import choose_backend
from tellneo._ext import has_native, native, native_cuda_status
from tellneo.data.planning import Plan
from tellneo.data.tokens import IGNORE_INDEX, TokenStore, check_pad_id

LAYOUTS = ("rows", "flat")


def _rows_array(rows: Any, num_rows: int) -> np.ndarray:
    if isinstance(rows, slice):
        rows = range(*rows.indices(num_rows))
    if isinstance(rows, range):
        arr = np.arange(rows.start, rows.stop, rows.step, dtype=np.int64)
    else:
        from tellneo.data.tokens import _as_int_array

        arr = _as_int_array(rows, "rows").astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= num_rows):
        raise ValueError(f"rows must lie in [0, {num_rows}) for this plan, got [{arr.min()}, {arr.max()}]")
    return np.ascontiguousarray(arr)


def _resolve(backend: str, device: torch.device) -> str:
    return choose_backend(
        "tellneo.data.emit",
        backend,
        is_cuda=device.type == "cuda",
        available={
            "cpp": lambda: None if has_native() else "tellneo._C is not built",
            "cuda": lambda: (native_cuda_status()[1] or None) if device.type == "cuda" else "device is not CUDA",
            "torch": lambda: None,
        },
        auto_cuda=("cuda", "torch"),
        auto_cpu=("cpp", "torch"),
    )


def row_segments(plan: Plan, store: TokenStore, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(src, length) int64 segments laying out ``rows`` one after the other; src = -1 marks padding."""
    if not has_native():
        return _row_segments_reference(plan, store, rows)
    return native().row_segments(
        plan.seq_len, plan.sample, plan.start, plan.length, plan.offset, plan.row_ptr, plan.row_pieces,
        store.offsets, rows,
    )


def _row_segments_reference(plan: Plan, store: TokenStore, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    src: list[int] = []
    length: list[int] = []
    for r in rows.tolist():
        fill = 0
        for p in plan.row_pieces[plan.row_ptr[r] : plan.row_ptr[r + 1]].tolist():
            src.append(int(store.offsets[plan.sample[p]] + plan.start[p]))
            length.append(int(plan.length[p]))
            fill += int(plan.length[p])
        if fill < plan.seq_len:
            src.append(-1)
            length.append(plan.seq_len - fill)
    return np.array(src, dtype=np.int64), np.array(length, dtype=np.int64)


def emit_segments(
    store: TokenStore,
    src: np.ndarray,
    length: np.ndarray,
    *,
    pad_id: int = 0,
    backend: str = "auto",
    device: torch.device | str | None = None,
    num_threads: int = 1,
) -> dict[str, Any]:
    """Emit the concatenation of segments as flat ``[T]`` tensors plus ``cu_seqlens`` / ``max_seqlen``."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    which = _resolve(backend, device)
    pad_id = check_pad_id(pad_id)
    src = np.ascontiguousarray(src, dtype=np.int64)
    length = np.ascontiguousarray(length, dtype=np.int64)
    if which == "torch":
        return _emit_segments_reference(store, src, length, pad_id, device)
    cu_seqlens, max_seqlen = native().check_segments(src, length, store.num_tokens)
    total = int(cu_seqlens[-1])
    if which == "cpp":
        out = {
            "input_ids": np.empty(total, np.int64),
            "labels": np.empty(total, np.int64),
            "position_ids": np.empty(total, np.int64),
            "seq_idx": np.empty(total, np.int32),
        }
        native().emit(store.tokens, store.labels, src, cu_seqlens, int(pad_id), out["input_ids"], out["labels"],
                      out["position_ids"], out["seq_idx"], int(num_threads))
        result: dict[str, Any] = {k: torch.from_numpy(v) for k, v in out.items()}
        result["cu_seqlens"] = torch.from_numpy(cu_seqlens)
        if device.type != "cpu":
            result = {k: v.to(device) for k, v in result.items()}
    else:
        result = _emit_cuda(store, src, cu_seqlens, pad_id, device)
    result["max_seqlen"] = int(max_seqlen)
    return result


def _emit_cuda(store: TokenStore, src: np.ndarray, cu_seqlens: np.ndarray, pad_id: int, device: torch.device):
    tokens, labels = device_tokens(store, device)
    total = int(cu_seqlens[-1])
    src_d = torch.from_numpy(src).pin_memory().to(device, non_blocking=True)
    cu_d = torch.from_numpy(cu_seqlens).pin_memory().to(device, non_blocking=True)
    out = {
        "input_ids": torch.empty(total, dtype=torch.int64, device=device),
        "labels": torch.empty(total, dtype=torch.int64, device=device),
        "position_ids": torch.empty(total, dtype=torch.int64, device=device),
        "seq_idx": torch.empty(total, dtype=torch.int32, device=device),
    }
    stream = torch.cuda.current_stream(device)
    native().emit_cuda(
        tokens.data_ptr(), tokens.element_size(), 0 if labels is None else labels.data_ptr(), src_d.data_ptr(),
        cu_d.data_ptr(), int(src.size), int(pad_id), out["input_ids"].data_ptr(), out["labels"].data_ptr(),
        out["position_ids"].data_ptr(), out["seq_idx"].data_ptr(), stream.cuda_stream,
    )
    out["cu_seqlens"] = cu_d
    return out


_DEVICE_CACHE: dict[tuple[int, str], tuple[TokenStore, torch.Tensor, torch.Tensor | None]] = {}


def device_tokens(store: TokenStore, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The store's tokens (and labels) on ``device``, uploaded once per (store, device) and cached."""
    key = (id(store), str(device))
    hit = _DEVICE_CACHE.get(key)
    if hit is None or hit[0] is not store:
        tokens = torch.from_numpy(store.tokens).to(device)
        labels = None if store.labels is None else torch.from_numpy(store.labels).to(device)
        hit = (store, tokens, labels)
        _DEVICE_CACHE[key] = hit
    return hit[1], hit[2]


def _emit_segments_reference(
    store: TokenStore, src: np.ndarray, length: np.ndarray, pad_id: int, device: torch.device
) -> dict[str, Any]:
    """The specification of emit, one segment at a time (see tellneo/csrc/mixer/emit.h for the formula)."""
    if length.size and length.min() <= 0:
        raise ValueError("segment lengths must be positive")
    if src.size and (src.min() < -1 or ((src >= 0) & (src + length > store.num_tokens)).any()):
        raise ValueError("a segment lies outside the token array")
    total = int(length.sum())
    ids = np.empty(total, np.int64)
    labels = np.empty(total, np.int64)
    positions = np.empty(total, np.int64)
    seq_idx = np.empty(total, np.int32)
    cu = np.zeros(length.size + 1, dtype=np.int32)
    t = 0
    for s, (start, n) in enumerate(zip(src.tolist(), length.tolist())):
        if start < 0:
            ids[t : t + n] = pad_id
            labels[t : t + n] = IGNORE_INDEX
        else:
            ids[t : t + n] = store.tokens[start : start + n]
            source = store.labels if store.labels is not None else store.tokens
            labels[t : t + n] = source[start : start + n]
            labels[t] = IGNORE_INDEX  # nothing predicts the first token of a segment
        positions[t : t + n] = np.arange(n)
        seq_idx[t : t + n] = s
        t += n
        cu[s + 1] = t
    out = {"input_ids": ids, "labels": labels, "position_ids": positions, "seq_idx": seq_idx, "cu_seqlens": cu}
    result: dict[str, Any] = {k: torch.from_numpy(v).to(device) for k, v in out.items()}
    result["max_seqlen"] = int(length.max()) if length.size else 0
    return result


def emit_rows(
    store: TokenStore,
    plan: Plan,
    rows: Sequence[int] | np.ndarray | range | slice | None = None,
    *,
    layout: str = "rows",
    pad_id: int = 0,
    backend: str = "auto",
    device: torch.device | str | None = None,
    num_threads: int = 1,
    pad_to_multiple_of: int | None = None,
) -> dict[str, Any]:
    """Training tensors for ``rows`` of ``plan`` (default: all rows) over ``store``; see the module docstring.

    ``pad_to_multiple_of`` (flat layout only) appends one padding segment so the total length is a multiple of it
    (stable shapes for ``torch.compile`` / tensor cores); the padding has position ids 0..k-1, label -100 and
    its own ``cu_seq_lens`` entry.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    pad_id = check_pad_id(pad_id)
    if plan.num_pieces and int(plan.sample.max()) >= len(store):
        raise ValueError(f"plan refers to sample {int(plan.sample.max())} but the store holds {len(store)} samples")
    if pad_to_multiple_of is not None and layout != "flat":
        raise ValueError("pad_to_multiple_of applies to layout='flat' (rows are always seq_len long)")
    rows_arr = _rows_array(range(plan.num_rows) if rows is None else rows, plan.num_rows)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if _resolve(backend, dev) == "torch":
        return emit_rows_reference(store, plan, rows_arr, layout=layout, pad_id=pad_id, device=dev,
                                   pad_to_multiple_of=pad_to_multiple_of)
    src, length = row_segments(plan, store, rows_arr)
    if layout == "flat":
        keep = src >= 0
        src, length = _pad_segments(src[keep], length[keep], pad_to_multiple_of)
    flat = emit_segments(store, src, length, pad_id=pad_id, backend=backend, device=dev, num_threads=num_threads)
    return _shape_output(flat, layout, rows_arr.size, plan.seq_len)


def _pad_segments(src: np.ndarray, length: np.ndarray, multiple: int | None) -> tuple[np.ndarray, np.ndarray]:
    if multiple is None:
        return src, length
    if isinstance(multiple, bool) or not isinstance(multiple, (int, np.integer)) or multiple <= 0:
        raise ValueError(f"pad_to_multiple_of must be a positive int or None, got {multiple!r}")
    short = -int(length.sum()) % multiple
    if short == 0:
        return src, length
    return np.append(src, -1).astype(np.int64), np.append(length, short).astype(np.int64)


def emit_samples(
    store: TokenStore,
    samples: Sequence[int] | np.ndarray | None = None,
    *,
    pad_id: int = 0,
    backend: str = "auto",
    device: torch.device | str | None = None,
    pad_to_multiple_of: int | None = None,
) -> dict[str, Any]:
    """The flattened one-row format (``DataCollatorWithFlattening``) for whole ``samples`` (default: all);
    ``pad_to_multiple_of`` as in :func:`emit_rows`."""
    from tellneo.data.tokens import _as_int_array

    idx = np.arange(len(store)) if samples is None else _as_int_array(samples, "samples").astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= len(store)):
        raise ValueError(f"samples must lie in [0, {len(store)}), got [{idx.min()}, {idx.max()}]")
    src, length = _pad_segments(store.offsets[idx], store.lengths[idx], pad_to_multiple_of)
    flat = emit_segments(store, src, length, pad_id=pad_id, backend=backend, device=device)
    return _shape_output(flat, "flat", 1, None)


def _shape_output(flat: dict[str, Any], layout: str, num_rows: int, seq_len: int | None) -> dict[str, Any]:
    if layout == "rows":
        out = {k: flat[k].view(num_rows, seq_len) for k in ("input_ids", "labels", "position_ids", "seq_idx")}
        out["cu_seqlens"] = flat["cu_seqlens"]
        out["max_seqlen"] = flat["max_seqlen"]
        return out
    out = {k: flat[k].view(1, -1) for k in ("input_ids", "labels", "position_ids", "seq_idx")}
    out["cu_seq_lens_q"] = flat["cu_seqlens"]
    out["cu_seq_lens_k"] = flat["cu_seqlens"]
    out["max_length_q"] = flat["max_seqlen"]
    out["max_length_k"] = flat["max_seqlen"]
    return out


def emit_rows_reference(
    store: TokenStore,
    plan: Plan,
    rows: Sequence[int] | np.ndarray,
    *,
    layout: str = "rows",
    pad_id: int = 0,
    device: torch.device | str = "cpu",
    pad_to_multiple_of: int | None = None,
) -> dict[str, Any]:
    """Readable specification of :func:`emit_rows`, written from the plan directly (no segment helpers)."""
    L = plan.seq_len
    rows = list(np.asarray(rows, dtype=np.int64).tolist())
    ids = np.full((len(rows), L), pad_id, np.int64)
    labels = np.full((len(rows), L), IGNORE_INDEX, np.int64)
    positions = np.zeros((len(rows), L), np.int64)
    seq_idx = np.zeros((len(rows), L), np.int32)
    bounds = [0]
    used = np.zeros(len(rows), np.int64)
    segment = 0
    for b, r in enumerate(rows):
        in_row = [p for p in range(plan.num_pieces) if plan.row[p] == r]
        for p in sorted(in_row, key=lambda p: plan.offset[p]):
            s, start, n, off = (int(plan.sample[p]), int(plan.start[p]), int(plan.length[p]), int(plan.offset[p]))
            if off != used[b]:
                raise ValueError(f"plan row {r} has a gap or overlap at offset {off}")
            tokens = store.sample(s)[start : start + n]
            ids[b, off : off + n] = tokens
            labels[b, off : off + n] = store.sample_labels(s)[start : start + n]
            labels[b, off] = IGNORE_INDEX
            positions[b, off : off + n] = np.arange(n)
            seq_idx[b, off : off + n] = segment
            segment += 1
            used[b] += n
            bounds.append(b * L + off + n)
        if used[b] < L:
            positions[b, used[b] :] = np.arange(L - used[b])
            seq_idx[b, used[b] :] = segment
            segment += 1
            bounds.append((b + 1) * L)
    to = torch.device(device)
    if layout == "rows":
        seg_lengths = np.diff(bounds)
        return {
            "input_ids": torch.from_numpy(ids).to(to),
            "labels": torch.from_numpy(labels).to(to),
            "position_ids": torch.from_numpy(positions).to(to),
            "seq_idx": torch.from_numpy(seq_idx).to(to),
            "cu_seqlens": torch.tensor(bounds, dtype=torch.int32, device=to),
            "max_seqlen": int(seg_lengths.max()) if seg_lengths.size else 0,
        }
    # flat: keep real tokens only, renumber segments
    keep = np.arange(L)[None, :] < used[:, None]
    flat_ids, flat_labels, flat_pos = ids[keep], labels[keep], positions[keep]
    if pad_to_multiple_of:
        short = -flat_ids.size % pad_to_multiple_of
        flat_ids = np.append(flat_ids, np.full(short, pad_id, np.int64))
        flat_labels = np.append(flat_labels, np.full(short, IGNORE_INDEX, np.int64))
        flat_pos = np.append(flat_pos, np.arange(short, dtype=np.int64))
    starts = np.flatnonzero(flat_pos == 0)
    flat_seq = (np.cumsum(flat_pos == 0) - 1).astype(np.int32)
    cu = np.append(starts, flat_ids.size).astype(np.int32)
    return {
        "input_ids": torch.from_numpy(flat_ids).view(1, -1).to(to),
        "labels": torch.from_numpy(flat_labels).view(1, -1).to(to),
        "position_ids": torch.from_numpy(flat_pos).view(1, -1).to(to),
        "seq_idx": torch.from_numpy(flat_seq).view(1, -1).to(to),
        "cu_seq_lens_q": torch.from_numpy(cu).to(to),
        "cu_seq_lens_k": torch.from_numpy(cu).to(to),
        "max_length_q": int(np.diff(cu).max()) if cu.size > 1 else 0,
        "max_length_k": int(np.diff(cu).max()) if cu.size > 1 else 0,
    }
