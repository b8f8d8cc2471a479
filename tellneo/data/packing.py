"""``pack``: plan + emit in one call, for lists of token sequences."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tellneo.data.emit import emit_rows
from tellneo.data.planning import plan as make_plan
from tellneo.data.tokens import TokenStore, check_pad_id


def pack(
    samples: Sequence[Any] | TokenStore,
    seq_len: int,
    *,
    labels: Sequence[Any] | None = None,
    strategy: str = "bfd",
    overlong: str = "error",
    window: int | None = None,
    pad_id: int = 0,
    layout: str = "rows",
    vocab_size: int | None = None,
    backend: str = "auto",
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Pack 1-D token sequences into rows of ``seq_len`` tokens.

    Args:
        samples: list of 1-D int sequences (lists, NumPy or torch, int32/int64), or a :class:`TokenStore`.
        seq_len: row length.
        labels: optional list shaped like ``samples``; -100 marks tokens that are not trained. Default: every
            token is trained (label = token).
        strategy / overlong / window: see :mod:`tellneo.data.planning`.
        pad_id: token id written into padding (its label is always -100); a non-negative int, below
            ``vocab_size`` when that is given.
        layout: ``"rows"`` (``[rows, seq_len]`` tensors) or ``"flat"`` (one ``[1, T]`` row without padding, the
            ``DataCollatorWithFlattening`` format).
        vocab_size: if given, ids outside ``[0, vocab_size)`` raise ValueError.
        backend: ``"auto"``, ``"cpp"``, ``"cuda"`` (emit on the GPU) or ``"torch"`` (pure reference).
        device: where the output tensors live (default CPU; ``cuda`` selects the CUDA emit under ``auto``).

    Returns:
        dict with ``input_ids``, ``labels``, ``position_ids`` (int64, ``[rows, seq_len]``), ``seq_idx`` (int32,
        same shape), ``cu_seqlens`` (int32 ``[segments + 1]``) and ``max_seqlen`` (int); see
        :mod:`tellneo.data.emit` for their exact meaning and for the ``flat`` layout's keys.

    Example:
        >>> out = pack([[5, 6, 7], [8, 9], [10]], seq_len=4)
        >>> out["input_ids"].tolist()
        [[5, 6, 7, 10], [8, 9, 0, 0]]
        >>> out["labels"].tolist()
        [[-100, 6, 7, -100], [-100, 9, -100, -100]]
        >>> out["position_ids"].tolist()
        [[0, 1, 2, 0], [0, 1, 0, 1]]
    """
    pad_id = check_pad_id(pad_id, vocab_size)
    if isinstance(samples, TokenStore):
        if labels is not None:
            raise ValueError("labels must be None when samples is a TokenStore (the store carries its labels)")
        store = samples
        store.validate(vocab_size=vocab_size)
    else:
        if len(samples) == 0:
            raise ValueError("samples is empty: pack needs at least one sample")
        store = TokenStore.from_sequences(samples, labels, vocab_size=vocab_size)
    plan_backend = "torch" if backend == "torch" else "auto"
    p = make_plan(store.lengths, seq_len, strategy=strategy, overlong=overlong, window=window, backend=plan_backend)
    return emit_rows(store, p, layout=layout, pad_id=pad_id, backend=backend, device=device)
