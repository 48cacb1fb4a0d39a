"""Loading raw rows (dicts) from local files, the Hugging Face hub, or in-memory lists.

* ``.jsonl`` / ``.json`` files are read with the standard ``json`` module, row by row, so that a broken line
  or a value of the wrong type is reported against its row by jrft's validation (Arrow's schema inference in
  ``datasets`` would instead coerce or reject mixed types without naming the row).
* ``.parquet`` files and hub datasets are read with the ``datasets`` library (``load_dataset``); a hub name is
  anything that is not an existing local path, e.g. ``"openai/gsm8k"`` with ``subset="main"`` and a split.
  Hub loading needs internet and is not exercised by jrft's tests.
* a directory: a ``Dataset.save_to_disk`` folder, or a folder of data files (both through ``datasets``).
* in-memory rows: a list of dicts, or a ``datasets.Dataset``.

Every loader returns :class:`Rows`: the rows and the name used in error messages.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from jrft.data.errors import DataError

INLINE = "<inline rows>"


@dataclass(frozen=True)
class Rows:
    """Raw rows from one source. ``name`` is the file / dataset used in error messages."""

    name: str
    rows: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.rows)


def _decode_line(path: str, raw: bytes, lineno: int, row: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            path, f"line {lineno} is not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})", row=row
        ) from None


def _read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode_line(path, raw, lineno, len(rows))
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(path, f"line {lineno} is not valid JSON ({e.msg})", row=len(rows)) from None
            if not isinstance(row, dict):
                raise DataError(
                    path, f"line {lineno}: expected a JSON object, got {type(row).__name__}", row=len(rows)
                )
            rows.append(row)
    return rows


def _read_json(path: str) -> list[dict]:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(path, f"not UTF-8 (byte {raw[e.start]:#04x} on line {line})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, f"not valid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(data, dict):  # {"data": [...]} / {"rows": [...]} wrappers are common
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(path, "expected a JSON list of objects (or an object holding exactly one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(path, f"expected a JSON list of objects, got {type(data).__name__}")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(path, f"expected a JSON object, got {type(row).__name__}", row=i)
    return data


def _read_with_datasets(path: str, **kwargs) -> list[dict]:
    import datasets  # imported lazily: it is slow to import and only needed here

    try:
        ds = datasets.load_dataset(path, **kwargs)
    except Exception as e:  # offline, unknown name, bad split: say which source failed and why
        raise DataError(path, f"the datasets library could not load it ({type(e).__name__}: {e})") from e
    return [dict(r) for r in ds]


def _read_parquet(path: str) -> list[dict]:
    return _read_with_datasets("parquet", data_files=path, split="train")


def _read_directory(path: str, split: str) -> list[dict]:
    """A ``save_to_disk`` folder (``load_from_disk``), or a folder of data files (``load_dataset``)."""
    import datasets

    saved = ("dataset_info.json", "state.json", "dataset_dict.json")
    if any(os.path.exists(os.path.join(path, f)) for f in saved):
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(path, f"no split {split!r} (splits: {sorted(ds)})")
            ds = ds[split]
        return [dict(r) for r in ds]
    return _read_with_datasets(path, split=split)


FILE_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}


def load_rows(
    source: Any,
    *,
    split: str = "train",
    subset: str | None = None,
    limit: int | None = None,
) -> Rows:
    """Reads raw rows from ``source``.

    Args:
      source: a path to a .json/.jsonl/.parquet file, a hub dataset name, a list of dicts, a
        ``datasets.Dataset``, or a :class:`jrft.config.DataSource` (whose split/subset/limit then apply).
      split: hub dataset split.
      subset: hub dataset configuration name.
      limit: keep only the first ``limit`` rows.

    Returns:
      :class:`Rows`.

    Raises:
      DataError: a missing or unreadable file, a line that is not a JSON object, an empty source.
    """
    rename: Mapping[str, str] = {}
    if hasattr(source, "rows") and hasattr(source, "path") and hasattr(source, "split"):  # a DataSource
        split, subset, limit = source.split, source.subset, source.limit
        rename = getattr(source, "rename", None) or {}
        source = list(source.rows) if source.rows is not None else source.path
    if isinstance(source, Rows):
        name, rows = source.name, list(source.rows)
    elif isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        ext = os.path.splitext(name)[1].lower()
        if os.path.isdir(name):
            rows = _read_directory(name, split)
        elif os.path.exists(name):
            if ext not in FILE_READERS:
                raise DataError(
                    name, f"unsupported file type {ext!r}; expected one of {sorted(FILE_READERS)}"
                )
            rows = FILE_READERS[ext](name)
        elif ext in FILE_READERS:
            raise DataError(name, "file not found")
        else:
            rows = _read_with_datasets(name, name=subset, split=split)
            name = f"{name}[{subset + ':' if subset else ''}{split}]"
    elif isinstance(source, Sequence) or hasattr(source, "column_names"):  # a list or a datasets.Dataset
        name = INLINE
        rows = []
        for i, row in enumerate(source):
            if not isinstance(row, Mapping):
                raise DataError(name, f"expected a mapping, got {type(row).__name__}", row=i)
            rows.append(dict(row))
    else:
        raise DataError(str(source), f"cannot load rows from a {type(source).__name__}")
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise DataError(name, "no rows")
    if rename:
        missing = sorted(set(rename) - set(rows[0]))
        if missing:
            raise DataError(
                name, f"data.rename: no column(s) {missing} to rename; columns: {sorted(rows[0])}"
            )
        rows = [{rename.get(k, k): v for k, v in row.items()} for row in rows]
    return Rows(name=name, rows=rows)
