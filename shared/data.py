"""Tabular datasets by URI: Parquet or JSONL files (a file, a folder of shards, local or s3://), a Hugging Face dataset
saved with ``save_to_disk``, a hub dataset name (where a hub is reachable), or a finished stage that recorded a
``dataset`` output (e.g. a curate stage hands over its selected subset).

Small tables (seeds, calibration sets, evaluation splits) are read here with pyarrow; large corpora are read by Ray
Data from the same file list (``ray_jobs/data.py``).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq

from shared.config import StorageConfig
from shared.errors import DataError
from shared.storage import Storage, split_uri, stage_output

Format = Literal["parquet", "jsonl", "hf_disk", "hf_hub"]
SUFFIXES: dict[str, Format] = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl"}


@dataclass(frozen=True)
class DatasetSource:
    """What a dataset URI resolved to."""

    uri: str
    """The URI the user gave."""
    format: Format
    files: tuple[str, ...]
    """Data files (full URIs), sorted; empty for hub datasets."""
    location: str
    """Where the data is: the stage's dataset folder, the folder or file itself, or the hub name."""


def resolve_dataset(uri: str, options: StorageConfig | None = None) -> DatasetSource:
    """Find the files behind a dataset URI; a clear DataError when there are none."""
    if not uri or not uri.strip():
        raise DataError("dataset URI is empty")
    location = uri
    looks_like_path = "://" in uri or uri.startswith(("/", ".", "~")) or Path(uri).exists()
    if looks_like_path:
        location = stage_output(uri, "dataset", options) or uri
    if not looks_like_path:
        return DatasetSource(uri, "hf_hub", (), uri)
    store = Storage(location, options)
    if not store.exists():
        raise DataError(f"dataset {uri}: not found")
    if store.isdir():
        names = store.list()
        if "dataset_info.json" in names and "state.json" in names:
            return DatasetSource(uri, "hf_disk", (), store.uri())
        files = [f for f in store.find() if Path(f).suffix in SUFFIXES and "/." not in f and "/_" not in f]
    else:
        files = [store.uri()] if Path(location).suffix in SUFFIXES else []
    if not files:
        raise DataError(f"dataset {uri}: no .parquet, .jsonl or .json files there")
    formats = {SUFFIXES[Path(f).suffix] for f in files}
    if len(formats) > 1:
        raise DataError(f"dataset {uri}: mixes Parquet and JSON files; keep one format per dataset")
    return DatasetSource(uri, formats.pop(), tuple(files), store.uri())


def read_table(uri: str, options: StorageConfig | None = None, columns: list[str] | None = None,
               required: tuple[str, ...] = ()) -> pa.Table:
    """Read a (small) dataset into memory as one Arrow table; ``required`` columns must be present."""
    source = resolve_dataset(uri, options)
    if source.format in ("hf_disk", "hf_hub"):
        table = _read_hf(source, options)
    else:
        parts = [_read_file(f, source.format, options) for f in source.files]
        try:
            table = pa.concat_tables(parts, promote_options="default")
        except pa.ArrowInvalid as exc:
            raise DataError(f"dataset {uri}: shards do not share a schema ({exc})") from None
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise DataError(f"dataset {uri}: no '{missing[0]}' column (columns: {', '.join(table.column_names)})")
    if columns is not None:
        table = table.select([c for c in columns if c in table.column_names])
    return table


def _read_file(file_uri: str, fmt: Format, options: StorageConfig | None) -> pa.Table:
    data = Storage(file_uri, options).read_bytes()
    try:
        if fmt == "parquet":
            return pq.read_table(io.BytesIO(data))
        return _read_jsonl(data)
    except (pa.ArrowInvalid, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"dataset file {file_uri}: cannot parse as {fmt} ({str(exc).splitlines()[0]})") from None


def _read_jsonl(data: bytes) -> pa.Table:
    """JSON Lines (one object per line) or a JSON array of objects."""
    text = data.decode("utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        rows = json.loads(text)
        return pa.Table.from_pylist(rows)
    if not stripped:
        return pa.table({})
    return pajson.read_json(io.BytesIO(data))


def _read_hf(source: DatasetSource, options: StorageConfig | None) -> pa.Table:
    import datasets

    try:
        if source.format == "hf_disk":
            protocol, path = split_uri(source.location)
            if protocol != "file":
                import tempfile

                local = tempfile.mkdtemp(prefix="scopeforge-hf-")
                Storage(source.location, options).download(local)
                path = local
            ds = datasets.load_from_disk(path)
        else:
            ds = datasets.load_dataset(source.location)
    except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, DatasetNotFoundError)
        raise DataError(f"dataset {source.uri}: cannot load ({str(exc).strip().splitlines()[0]})") from None
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    return ds.with_format("arrow")[:]


def write_parquet(table: pa.Table, store: Storage, *parts: str) -> str:
    """One Parquet file under the store (through a buffer, so it is written in a single put)."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return store.write_bytes(buffer.getvalue(), *parts)
