"""Offline distillation: the teacher's top-k log-probabilities computed once, stored on disk, and fed to
:class:`tellneo.recipes.neo.KDTrainer` without loading the teacher again.

Layout of a top-k directory (written by :func:`precompute_teacher_topk`)::

    manifest.json                  k, temperature, seq_len, data and teacher fingerprints (resume-or-refuse)
    epoch-000/shard-00000.npz      input_ids [R, T] int32, ids [R, T, k] int32, logprobs [R, T, k] float32

Row r of shard s of epoch e holds item ``s * rows_per_shard + r`` of the PackedDataset's epoch e. Position t's
top-k describe the teacher's distribution of the token at t+1 (the same position-to-target alignment as the
hidden states the fused loss takes), at the given temperature. Shards are written atomically and skipped when
present, so an interrupted precomputation resumes; :class:`TopkDataset` checks every row's tokens against the
stored ones, so top-k of other data are never used silently.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tellneo.data import PackedCollator
from tellneo.io import atomic_save_npz, prepare_run_dir
from tellneo.recipes.model_parts import hidden_state_no_grad, output_head
from tellneo.ops import topk_logprobs
from tellneo.recipes.head import head_transform, kd_transform_kwargs, read_head

__all__ = ["TopkCollator", "TopkDataset", "dataset_fingerprint", "precompute_teacher_topk"]

TOPK_IDS, TOPK_LOGPROBS = "teacher_topk_ids", "teacher_topk_logprobs"


def dataset_fingerprint(dataset: Any, epoch: int) -> str:
    """sha256 (16 hex digits) of an epoch's rows: tokens, labels and the row order."""
    dataset.set_epoch(epoch)
    store = dataset.store
    h = hashlib.sha256()
    for arr in (store.tokens, store.offsets, store.labels if store.labels is not None else np.zeros(0),
                dataset.row_order, np.asarray([dataset.seq_len])):
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:16]


def _teacher_fingerprint(teacher: nn.Module) -> dict[str, Any]:
    w, _ = output_head(teacher)
    probe = w[:: max(1, w.shape[0] // 64)].double().sum().item()
    n = sum(p.numel() for p in teacher.parameters())
    out = {"class": type(teacher).__name__, "parameters": n, "head_probe": round(probe, 6)}
    transform = head_transform(teacher)
    if transform.logit_scale != 1.0 or transform.softcap is not None:
        # top-k of these logits differ from those of the bare head (as written before the transform was applied)
        out["logit_transform"] = {"logit_scale": transform.logit_scale, "softcap": transform.softcap}
    return out


def _shard_path(root: Path, epoch: int, shard: int) -> Path:
    return root / f"epoch-{epoch:03d}" / f"shard-{shard:05d}.npz"


@torch.no_grad()
def _topk_rows(teacher: nn.Module, batch: dict[str, torch.Tensor], k: int, temperature: float, chunk: int,
               vocab_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    head = read_head(teacher)
    inputs = {key: batch[key].to(head.weight.device) for key in ("input_ids", "position_ids")}
    hidden = hidden_state_no_grad(teacher, inputs)  # [B, T, H]
    flat = hidden.reshape(-1, hidden.shape[-1]).to(head.weight.dtype)
    # a padded teacher head (vocab_size given): shared ids only, renormalised, as the fused loss does online
    ids, lps = topk_logprobs(flat, head.weight, k, bias=head.bias, temperature=temperature, vocab_size=vocab_size,
                             chunk_rows=chunk, **kd_transform_kwargs(head.transform))
    shape = (*hidden.shape[:2], k)
    return (ids.to(torch.int32).cpu().reshape(shape).numpy(),
            lps.to(torch.float32).cpu().reshape(shape).numpy())


def precompute_teacher_topk(
    teacher: nn.Module,
    dataset: Any,
    out_dir: str | Path,
    *,
    k: int = 32,
    temperature: float = 1.0,
    epochs: Sequence[int] = (0,),
    batch_size: int = 4,
    rows_per_shard: int = 64,
    vocab_size: int | None = None,
    chunk: int = 1024,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write the teacher's top-k log-probabilities for every row of ``dataset`` (a PackedDataset) in ``epochs``.

    ``vocab_size``: the student's vocabulary; a teacher with a larger (padded) head is restricted to the first
    ``vocab_size`` ids and renormalised there, as the fused loss does online. Resumes when ``out_dir`` holds
    the same configuration (existing shards are kept); a different one raises FileExistsError unless
    ``overwrite``. Returns ``out_dir``.
    """
    from tqdm.auto import tqdm

    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    root = Path(out_dir)
    fingerprints = {int(e): dataset_fingerprint(dataset, int(e)) for e in epochs}
    config = {"k": k, "temperature": temperature, "seq_len": dataset.seq_len, "rows_per_shard": rows_per_shard,
              "vocab_size": vocab_size, "data": fingerprints, "teacher": _teacher_fingerprint(teacher)}
    prepare_run_dir(root, config, overwrite=overwrite, outputs=("epoch-*",))
    teacher.eval()
    for epoch in epochs:
        dataset.set_epoch(int(epoch))
        n_shards = math.ceil(len(dataset) / rows_per_shard)
        todo = [s for s in range(n_shards) if not _shard_path(root, int(epoch), s).exists()]
        bar = tqdm(total=len(todo), desc=f"teacher top-{k}, epoch {epoch}", unit="shard", disable=not progress)
        for s in todo:
            first, last = s * rows_per_shard, min(len(dataset), (s + 1) * rows_per_shard)
            ids, lps, tokens = [], [], []
            for a in range(first, last, batch_size):
                batch = dataset.batch(list(range(a, min(last, a + batch_size))))
                i, lp = _topk_rows(teacher, batch, k, temperature, chunk, vocab_size)
                ids.append(i)
                lps.append(lp)
                tokens.append(batch["input_ids"].numpy().astype(np.int32))
            atomic_save_npz(_shard_path(root, int(epoch), s), input_ids=np.concatenate(tokens),
                            ids=np.concatenate(ids), logprobs=np.concatenate(lps))
            bar.update(1)
        bar.close()
    return root


class TopkDataset(torch.utils.data.Dataset):
    """A PackedDataset whose items also carry the stored teacher top-k: ``teacher_topk_ids`` ``[T, k]`` int64 and
    ``teacher_topk_logprobs`` ``[T, k]`` float32. ``set_epoch`` is forwarded; an epoch without stored top-k, or a
    row whose tokens differ from the stored ones, raises ValueError."""

    def __init__(self, dataset: Any, topk_dir: str | Path) -> None:
        self.dataset = dataset
        self.root = Path(topk_dir)
        manifest = self.root / "manifest.json"
        if not manifest.is_file():
            raise ValueError(f"{self.root} holds no teacher top-k (manifest.json missing)")
        config = json.loads(manifest.read_text(encoding="utf-8"))["config"]
        self.rows_per_shard = int(config["rows_per_shard"])
        self.k = int(config["k"])
        self.epochs = {int(e) for e in config["data"]}
        if int(config["seq_len"]) != dataset.seq_len:
            raise ValueError(f"top-k in {self.root} were computed for seq_len {config['seq_len']}, "
                             f"the dataset has {dataset.seq_len}")
        self._cache: tuple[tuple[int, int], dict[str, np.ndarray]] | None = None

    @property
    def seq_len(self) -> int:
        return self.dataset.seq_len

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, indices: Sequence[int]) -> dict[str, Any]:
        return self.dataset.batch(indices)

    def _shard(self, epoch: int, shard: int) -> dict[str, np.ndarray]:
        if self._cache is None or self._cache[0] != (epoch, shard):
            path = _shard_path(self.root, epoch, shard)
            if epoch not in self.epochs or not path.is_file():
                raise ValueError(f"no teacher top-k for epoch {epoch} (shard {path.name}) in {self.root}: "
                                 "precompute them for every epoch you train")
            with np.load(path) as z:
                self._cache = ((epoch, shard), {key: z[key] for key in ("input_ids", "ids", "logprobs")})
        return self._cache[1]

    def topk(self, indices: Sequence[int], input_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``{teacher_topk_ids, teacher_topk_logprobs}`` ``[len(indices), T, k]`` for items ``indices``."""
        ids, lps = [], []
        for row, i in enumerate(indices):
            shard = self._shard(self.epoch, i // self.rows_per_shard)
            r = i % self.rows_per_shard
            if input_ids is not None and not np.array_equal(shard["input_ids"][r], input_ids[row].numpy()):
                raise ValueError(f"stored teacher top-k of item {i} (epoch {self.epoch}) belong to other tokens: "
                                 f"the data changed since they were computed; recompute them")
            ids.append(shard["ids"][r])
            lps.append(shard["logprobs"][r])
        return {TOPK_IDS: torch.from_numpy(np.stack(ids).astype(np.int64)),
                TOPK_LOGPROBS: torch.from_numpy(np.stack(lps))}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        items = self.dataset.__getitems__(indices)
        extra = self.topk(indices, torch.stack([it["input_ids"] for it in items]))
        for j, item in enumerate(items):
            item[TOPK_IDS] = extra[TOPK_IDS][j]
            item[TOPK_LOGPROBS] = extra[TOPK_LOGPROBS][j]
        return items


class TopkCollator(PackedCollator):
    """:class:`tellneo.data.PackedCollator` (rows layout) that also stacks the top-k columns."""

    def __init__(self) -> None:
        super().__init__("rows")

    def __call__(self, items: Sequence[dict[str, torch.Tensor]]) -> dict[str, Any]:
        batch = super().__call__(items)
        for key in (TOPK_IDS, TOPK_LOGPROBS):
            if key in items[0]:
                batch[key] = torch.stack([it[key] for it in items])
        return batch
