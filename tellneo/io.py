"""Atomic file writes and run directories that can be resumed but never silently clobbered."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def _atomic_write(path: Path, write: Any, mode: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
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


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare_run_dir(path: str | os.PathLike[str], config: dict[str, Any], *, overwrite: bool = False,
                    manifest: str = "manifest.json") -> tuple[Path, bool]:
    """Create or reopen a run directory for ``config``.

    Returns ``(path, resumed)``: ``resumed`` is True when the directory already holds a run of the same config
    (its finished outputs may be reused). A directory holding a different run raises FileExistsError unless
    ``overwrite`` (then the old manifest is replaced; files are overwritten as they are rewritten). An
    unwritable location raises PermissionError naming it.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PermissionError(f"cannot create output directory {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"output directory {path} is not writable")
    digest = config_hash(config)
    mpath = path / manifest
    if mpath.exists():
        try:
            old = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            old = {}
        if old.get("config_hash") == digest:
            return path, True
        if not overwrite:
            raise FileExistsError(
                f"{path} holds a different run (config hash {old.get('config_hash')}, this one {digest}); "
                "choose another --output-dir or pass --overwrite"
            )
    atomic_write_text(mpath, json.dumps({"config_hash": digest, "config": config}, indent=2, default=str))
    return path, False
