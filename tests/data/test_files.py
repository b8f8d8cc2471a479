"""tellneo.data.files.read_records: jsonl, parquet, arrow (IPC file and stream) and datasets save_to_disk
directories give the same validated records; bad files give one message naming the file and the row."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tellneo.data.chat import DataFileError, read_jsonl
from tellneo.data.files import read_records

RECORDS = [
    {"prompt": "What is 2+2?", "response": "4"},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    {"text": "plain text, every token trained"},
    {"prompt": "Name a colour.", "response": "Blue", "source": "hand-written"},
]
# the same rows as a table holds them: every column in every row, null where a record lacks the key
COLUMNS = sorted({k for r in RECORDS for k in r})
ROWS = [{k: r.get(k) for k in COLUMNS} for r in RECORDS]


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def test_every_format_reads_the_same_records(tmp_path, jsonl):
    datasets = pytest.importorskip("datasets")
    expected = read_jsonl(jsonl)
    table = pa.Table.from_pylist(ROWS)  # nulls read back as absent keys
    pq.write_table(table, tmp_path / "data.parquet")
    with pa.OSFile(str(tmp_path / "file.arrow"), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    with pa.OSFile(str(tmp_path / "stream.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table)
    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "saved_dict"))
    ds.select([3, 2, 1, 0]).save_to_disk(str(tmp_path / "reordered"))
    for name in ("data.jsonl", "data.parquet", "file.arrow", "stream.arrow", "saved", "saved_dict"):
        assert read_records(tmp_path / name) == expected, name
    assert read_records(tmp_path / "reordered") == expected[::-1]


def test_bad_files_name_the_file_and_row(tmp_path):
    with pytest.raises(DataFileError, match="nope.parquet: no such file or directory"):
        read_records(tmp_path / "nope.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataFileError, match="broken.parquet: cannot read it as a parquet file"):
        read_records(tmp_path / "broken.parquet")
    pq.write_table(pa.Table.from_pylist([{"prompt": "q", "response": "a"}, {"prompt": "q2", "other": 1}]),
                   tmp_path / "bad_row.parquet")
    with pytest.raises(DataFileError, match=r"bad_row.parquet: row 1: 'prompt' and 'response' must both be strings"):
        read_records(tmp_path / "bad_row.parquet")
    pq.write_table(pa.Table.from_pylist([{"prompt": "q", "response": "a"}]).slice(0, 0), tmp_path / "empty.parquet")
    with pytest.raises(DataFileError, match="empty.parquet: the parquet file holds no records"):
        read_records(tmp_path / "empty.parquet")
    (tmp_path / "somedir").mkdir()
    with pytest.raises(DataFileError, match="somedir: a directory but not a datasets save_to_disk directory"):
        read_records(tmp_path / "somedir")


def test_dataset_dict_without_train_split_is_refused(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(RECORDS[:1])
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(DataFileError, match=r"without a 'train' split \(splits: \['validation'\]\)"):
        read_records(tmp_path / "d")
