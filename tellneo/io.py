"""Atomic file writes and run directories that can be resumed but never silently clobbered."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"  # temporary files of the atomic writers are ``.<name>.<random>.tmp`` beside their target
LOCK_NAME = ".tellneo.lock"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, write: Any, mode: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the mode open() would
        with os.fdopen(fd, mode, **({"encoding": "utf-8", "newline": ""} if "b" not in mode else {})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary file in the same directory and a rename."""
    return _atomic_write(Path(path), lambda f: f.write(text), "w")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file in the same directory, then a rename)."""
    return _atomic_write(Path(path), lambda f: f.write(data), "wb")


def atomic_write_csv(path: str | os.PathLike[str], records: Iterable[dict[str, Any]],
                     first_columns: Sequence[str] = ()) -> Path:
    """Write dict records as CSV atomically: ``first_columns`` first, then every other key in order of appearance;
    missing cells are empty."""
    import csv
    import io

    records = list(records)
    columns = list(dict.fromkeys([*first_columns, *(k for r in records for k in r)]))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(records)
    return atomic_write_text(path, buf.getvalue())


def atomic_save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 110) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def atomic_save_npz(path: str | os.PathLike[str], **arrays: Any) -> Path:
    import numpy as np

    return _atomic_write(Path(path), lambda f: np.savez(f, **arrays), "wb")


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, +-Infinity) replaced by None, through dicts, lists and tuples,
    so that it serialises as valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def to_json(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` that always writes valid JSON: non-finite floats become ``null`` (:func:`json_safe`), and
    values JSON does not know are written as ``str(value)``."""
    return json.dumps(json_safe(value), allow_nan=False, default=str, **kwargs)


def file_sha256(path: str | os.PathLike[str] | None) -> str | None:
    """sha256 (16 hex digits) of a file's contents; None for ``None`` or a path that is not a readable file (the
    caller's own check reports those)."""
    if path is None:
        return None
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()[:16]


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_changes(old: dict[str, Any], new: dict[str, Any], limit: int = 4) -> str:
    """What differs between two configs, for an error message: ``"seq_len 128 -> 256, data_sha256 ab.. -> cd.."``
    (nested dicts flattened with dots; at most ``limit`` items, then a count)."""
    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix: d}
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a = {k: json.dumps(v, default=str) for k, v in flat(old).items()}
    b = {k: json.dumps(v, default=str) for k, v in flat(new).items()}
    changed = [f"{k} {a.get(k, 'null')} -> {b.get(k, 'null')}" for k in sorted(set(a) | set(b))
               if a.get(k, "null") != b.get(k, "null")]
    more = f" and {len(changed) - limit} more" if len(changed) > limit else ""
    return ", ".join(changed[:limit]) + more


def read_manifest(path: str | os.PathLike[str], manifest: str = "manifest.json") -> dict[str, Any] | None:
    """The ``{"config_hash", "config"}`` of a run directory; None when there is none, ``{}`` when it is unreadable."""
    mpath = Path(path) / manifest
    if not mpath.exists():
        return None
    try:
        old = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return old if isinstance(old, dict) else {}


def different_run_message(path: str | os.PathLike[str], old: dict[str, Any], config: dict[str, Any]) -> str:
    """The one-line refusal for a run directory that holds another configuration, naming what changed."""
    digest = config_hash(config)
    if isinstance(old.get("config"), dict):
        what = f"changed: {config_changes(old['config'], config)}"
    else:
        what = f"config hash {old.get('config_hash')}, this one {digest}"
    return f"{path} holds a different run ({what}); choose another --output-dir or pass --overwrite"


def remove_stale_tmp(directory: str | os.PathLike[str]) -> int:
    """Delete the temporary files that atomic writes killed mid-way (``kill -9``) left under ``directory``; call it
    only while holding the directory's lock. Returns how many were removed."""
    removed = 0
    root = Path(directory)
    if root.is_dir():
        for p in root.rglob(f".*{TMP_SUFFIX}"):
            if p.is_file():
                p.unlink(missing_ok=True)
                removed += 1
    return removed


class RunDirLockedError(BlockingIOError):
    """Another process holds the run directory's lock."""


_LOCKS: dict[Path, int] = {}


def lock_run_dir(path: str | os.PathLike[str], *, create: bool = True) -> Path:
    """Take the exclusive lock of run directory ``path`` for the rest of this process, or until
    :func:`release_run_dirs`: ``flock`` on ``path/.tellneo.lock``, which the kernel releases when the process
    ends, however it ends. Re-entrant within a process. A missing ``path`` is created, or with ``create=False``
    left alone (nothing is locked: call again once the run really starts). Another process holding the lock:
    :class:`RunDirLockedError` naming the directory. Returns ``path``."""
    import fcntl

    path = Path(path)
    key = path.resolve()
    if key in _LOCKS or (not create and not path.is_dir()):
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise PermissionError(f"cannot create output directory {path}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise RunDirLockedError(f"{path} is in use by another running tellneo process; wait for it to finish or "
                                "choose another --output-dir") from None
    _LOCKS[key] = fd
    return path


def release_run_dirs() -> None:
    """Release every run-directory lock this process took (the lock files stay; they are reused)."""
    import fcntl

    while _LOCKS:
        _, fd = _LOCKS.popitem()
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def remove_outputs(path: str | os.PathLike[str], patterns: Iterable[str]) -> list[str]:
    """Delete what matches the glob ``patterns`` (relative to run directory ``path``; files or directories).
    Returns the names removed."""
    import shutil

    removed = []
    for pattern in patterns:
        for target in sorted(Path(path).glob(pattern)):
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
            removed.append(target.name)
    return removed


def prepare_run_dir(path: str | os.PathLike[str], config: dict[str, Any], *, overwrite: bool = False,
                    manifest: str = "manifest.json", outputs: Sequence[str] = ()) -> tuple[Path, bool]:
    """Create or reopen a run directory for ``config``.

    Returns ``(path, resumed)``: ``resumed`` is True when the directory already holds a run of the same config
    (its finished outputs may be reused). A directory holding a different run raises FileExistsError naming what
    changed, unless ``overwrite``; then the old run's ``outputs`` (glob patterns of everything the run writes)
    are deleted *before* the new manifest is written, so an interrupted start never mixes the new manifest with
    old results. Outputs without any manifest are refused the same way unless ``overwrite``. The directory is
    locked for this process (:func:`lock_run_dir`) and temporary files of killed writes are removed. An
    unwritable location raises PermissionError naming it.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PermissionError(f"cannot create output directory {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"output directory {path} is not writable")
    lock_run_dir(path)
    remove_stale_tmp(path)
    digest = config_hash(config)
    old = read_manifest(path, manifest)
    if old is not None:
        if old.get("config_hash") == digest:
            return path, True
        if not overwrite:
            raise FileExistsError(different_run_message(path, old, config))
    elif not overwrite:
        found = sorted({p.name for pattern in outputs for p in path.glob(pattern)})
        if found:
            raise FileExistsError(f"{path} holds {', '.join(found)} without a manifest of their run; pass "
                                  "--overwrite to replace them or choose another --output-dir")
    remove_outputs(path, outputs)
    atomic_write_text(path / manifest, to_json({"config_hash": digest, "config": config}, indent=2))
    return path, False
