"""Rows of ``--data`` given as a ``datasets`` directory or Parquet files (needs the ``datasets`` package).

- A directory written by ``datasets.Dataset.save_to_disk`` (``state.json`` + ``dataset_info.json``), read with
  ``datasets.load_from_disk`` (memory-mapped Arrow files);
- one written by ``DatasetDict.save_to_disk`` (``dataset_dict.json``): its ``train`` split;
- a ``.parquet`` file, or a directory of them (its own ``*.parquet`` files in name order, not its subfolders).

Rows come a batch at a time, as Python objects through Arrow (``to_pylist``: nested messages as lists of dicts),
and only the columns the data formats use (``text``, ``prompt``, ``completion``, ``messages``) are read. A row
is named ``PATH[i]``, ``i`` counted from 0 as ``dataset[i]`` counts (per file for Parquet; ``PATH[train][i]`` for
a ``DatasetDict``).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["COLUMNS", "is_dataset_path", "iter_rows"]

COLUMNS = ("text", "prompt", "completion", "messages")
_BATCH_ROWS = 256


def is_dataset_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` is read as a dataset (a directory or a ``.parquet`` file) rather than as JSONL."""
    return os.path.isdir(path) or str(path).endswith(".parquet")


def _needs_datasets(path: str | os.PathLike, what: str) -> ValueError:
    return ValueError(f"{path}: reading {what} needs the datasets package: pip install datasets")


def iter_rows(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(name, row)`` for every row of a ``datasets`` directory or Parquet file(s), in order.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a directory that is neither kind, a ``DatasetDict`` without ``train``, unreadable Parquet,
            or ``datasets`` / ``pyarrow`` missing.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
    if p.is_dir() and ((p / "dataset_dict.json").is_file() or (p / "state.json").is_file()):
        yield from _saved_rows(p)
        return
    files = sorted(q for q in p.glob("*.parquet") if q.is_file()) if p.is_dir() else [p]
    if not files:
        raise ValueError(f"{path}: is a directory, not a JSONL file, a datasets directory (save_to_disk) "
                         "or a directory of .parquet files")  # fmt: skip
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise _needs_datasets(path, "Parquet files") from None
    for f in files:
        try:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            batches = pf.iter_batches(batch_size=_BATCH_ROWS, columns=_columns(names))
            yield from _rows(str(f), (pa.Table.from_batches([b]) for b in batches))
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{f}: not a readable Parquet file ({str(e).splitlines()[0]})") from None


def _columns(names: list[str]) -> list[str] | None:
    """The data formats' columns among ``names``; all of them (``None``) when there are none, so that the first
    row's error lists what the data holds."""
    used = [n for n in names if n in COLUMNS]
    return used or None


def _saved_rows(p: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Rows of a ``save_to_disk`` directory (a ``DatasetDict``'s ``train`` split)."""
    try:
        import datasets
    except ImportError:
        raise _needs_datasets(p, "a datasets directory") from None
    try:
        ds = datasets.load_from_disk(str(p))
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{p}: not a readable datasets directory ({str(e).splitlines()[0]})") from None
    name = str(p)
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"{p}: a DatasetDict without a 'train' split (it has {sorted(ds)}): --data reads 'train'")
        ds, name = ds["train"], f"{p}[train]"
    used = _columns(ds.column_names)
    if used is not None:
        ds = ds.select_columns(used)
    yield from _rows(name, ds.with_format("arrow").iter(batch_size=_BATCH_ROWS))


def _rows(name: str, tables: Iterator[Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Number the rows of a stream of Arrow tables ``name[0]``, ``name[1]``, ..."""
    i = 0
    for table in tables:
        for row in table.to_pylist():
            yield f"{name}[{i}]", row
            i += 1
