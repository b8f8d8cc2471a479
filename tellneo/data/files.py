"""Instruction records from local files in the formats people keep data in: jsonl, parquet, arrow, and
directories written by ``datasets``' ``save_to_disk``.

:func:`read_records` returns the same validated records as :func:`tellneo.data.chat.read_jsonl` (``prompt`` +
``response``, ``messages`` or ``text``; see :mod:`tellneo.data.chat`), whatever the format; errors name the file
and the row. Columnar formats hold every column for every row: a missing value (null) counts as an absent key,
so a table may mix record kinds. Nothing is downloaded; ``datasets`` is only needed for ``save_to_disk``
directories, ``pyarrow`` for parquet / arrow files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tellneo.data.chat import DataFileError, _validate_record, read_jsonl

__all__ = ["read_records", "DATA_FORMATS"]

#: what ``--data`` / ``--general`` / ``--task-file`` accept, for help texts and error messages
DATA_FORMATS = "jsonl, parquet or arrow file, or a datasets save_to_disk directory"


def _rows_from_table(table: Any, where: str) -> list[dict[str, Any]]:
    rows = table.to_pylist() if hasattr(table, "to_pylist") else table.to_list()  # pyarrow Table or Dataset
    return [_validate_record({k: v for k, v in row.items() if v is not None}, f"{where}: row {i}")
            for i, row in enumerate(rows)]


def _read_arrow(path: Path) -> Any:
    import pyarrow as pa

    with pa.memory_map(str(path), "r") as source:
        try:
            return pa.ipc.open_file(source).read_all()
        except pa.ArrowInvalid:  # datasets' cache files are IPC streams, not IPC files
            source.seek(0)
            return pa.ipc.open_stream(source).read_all()


def _read_saved_dataset(path: Path) -> Any:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency of the train extra
        raise DataFileError(f"{path}: reading a datasets directory needs the 'datasets' package") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataFileError(f"{path}: a DatasetDict without a 'train' split (splits: {sorted(ds)}); pass the "
                                "split's own directory instead")
        ds = ds["train"]
    return ds  # rows read with Dataset.to_list(): a select()/shuffle() index mapping is honoured


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """All records of a data file or ``save_to_disk`` directory, validated (see the module docstring).

    The format follows the path: a directory holding ``dataset_info.json`` or ``dataset_dict.json`` is a saved
    ``datasets`` dataset (a ``DatasetDict``'s ``train`` split is used); ``*.parquet`` and ``*.arrow`` files are
    read with pyarrow (row order kept); anything else is jsonl. Raises :class:`DataFileError` naming the path (and
    the 0-based row) for a missing path, an unreadable file, an empty table or an invalid record.
    """
    path = Path(path)
    if path.is_dir():
        if not any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json")):
            raise DataFileError(f"{path}: a directory but not a datasets save_to_disk directory (expected "
                                f"{DATA_FORMATS})")
        reader, kind = _read_saved_dataset, "datasets directory"
    elif not path.is_file():
        raise DataFileError(f"{path}: no such file or directory")
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        reader, kind = (lambda p: pq.read_table(str(p))), "parquet file"
    elif path.suffix == ".arrow":
        reader, kind = _read_arrow, "arrow file"
    else:
        return read_jsonl(path)
    try:
        table = reader(path)
    except DataFileError:
        raise
    except Exception as exc:  # pyarrow / datasets raise many types for a corrupt file
        raise DataFileError(f"{path}: cannot read it as a {kind} ({type(exc).__name__}: {exc})") from None
    records = _rows_from_table(table, str(path))
    if not records:
        raise DataFileError(f"{path}: the {kind} holds no records")
    return records

