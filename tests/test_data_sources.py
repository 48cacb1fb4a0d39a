"""Loading rows: JSONL / JSON / Parquet / in-memory, and source-level errors that name the file and row."""

import json

import pytest

from jrft.config import DataSource
from jrft.data import DataError, load_rows

ROWS = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d", "extra": 3}]


def test_jsonl_json_and_inline(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    assert load_rows(p).rows == ROWS
    assert load_rows(str(p)).name == str(p)
    j = tmp_path / "x.json"
    j.write_text(json.dumps(ROWS))
    assert load_rows(j).rows == ROWS
    j.write_text(json.dumps({"data": ROWS}))
    assert load_rows(j).rows == ROWS
    assert load_rows(ROWS).rows == ROWS
    assert load_rows(ROWS, limit=1).rows == ROWS[:1]


def test_parquet_and_datasets_objects(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}])
    path = tmp_path / "x.parquet"
    ds.to_parquet(str(path))
    assert load_rows(path).rows == [dict(r) for r in ds]
    assert load_rows(ds).rows == [dict(r) for r in ds]
    ds.save_to_disk(str(tmp_path / "saved"))
    assert load_rows(tmp_path / "saved").rows == [dict(r) for r in ds]
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "saved_dict"))
    assert load_rows(tmp_path / "saved_dict", split="test").rows == [dict(r) for r in ds]
    with pytest.raises(DataError, match="no split 'train'"):
        load_rows(tmp_path / "saved_dict")


def test_data_source_config(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in ROWS))
    assert load_rows(DataSource(path=str(p), limit=1)).rows == ROWS[:1]
    assert load_rows(DataSource(rows=tuple(ROWS))).rows == ROWS


def test_bad_sources_are_named(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl: row 1: line 2 is not valid JSON") as info:
        load_rows(p)
    assert info.value.row == 1
    p.write_text('{"prompt": "a"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: row 1: line 2: expected a JSON object"):
        load_rows(p)
    p.write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        load_rows(p)
    with pytest.raises(DataError, match=r"missing\.jsonl: file not found"):
        load_rows(tmp_path / "missing.jsonl")
    txt = tmp_path / "rows.txt"
    txt.write_text("hello")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load_rows(txt)
    with pytest.raises(DataError, match="row 1: expected a mapping"):
        load_rows([{"a": 1}, "oops"])


def test_unknown_hub_name_is_a_named_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(
        DataError, match=r"^no-such-org/no-such-dataset: the datasets library could not load it"
    ):
        load_rows("no-such-org/no-such-dataset")


def test_rename_maps_columns_and_names_missing_ones():
    from jrft.config import DataSource
    from jrft.data import DataError, load_rows

    rows = load_rows(
        DataSource(rows=({"question": "1+1=", "answer": "#### 2"},), rename={"question": "prompt"})
    )
    assert rows.rows == [{"prompt": "1+1=", "answer": "#### 2"}]
    with pytest.raises(DataError, match=r"no column\(s\) \['nope'\]"):
        load_rows(DataSource(rows=({"question": "x"},), rename={"nope": "prompt"}))
