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
from shared.errors import DataError, first_line
from shared.stage import locate
from shared.storage import Storage, split_uri

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
    rows: tuple[int | None, ...] | None = None
    """Row count of each file as its stage committed it (None for plain folders: nothing to check against)."""


def resolve_dataset(uri: str, storage: StorageConfig | None = None) -> DatasetSource:
    """Find the files behind a dataset URI; a clear DataError when there are none.

    A finished stage (or a path inside one, such as ``<corpus stage>/heldout``) gives exactly the files its marker
    lists, with their row counts; a plain folder gives the data files found under it.
    """
    if not uri or not uri.strip():
        raise DataError("dataset URI is empty")
    physical = "://" in uri or uri.startswith(("/", ".", "~")) or Path(uri).exists()
    found = locate(uri, storage, "dataset") if physical or "/" in uri else None
    if found is None or (not physical and found.stage is None):
        return DatasetSource(uri, "hf_hub", (), uri)
    store = Storage(found.uri, storage)
    base = store.path().rstrip("/")
    if found.files is not None:  # a stage: exactly what it committed
        if not found.files:
            raise DataError(f"dataset {uri}: not found (its stage {found.stage} committed nothing there)")
        pairs = [(f, r) for f, r in zip(found.files, found.rows or ()) if _is_data_file(split_uri(f)[1], base)]
        if not pairs:
            raise DataError(f"dataset {uri}: its stage committed no .parquet, .jsonl or .json files there")
        files, rows = tuple(f for f, _ in pairs), tuple(r for _, r in pairs)
    else:
        rows = None
        if not store.exists():
            raise DataError(f"dataset {uri}: not found")
        if store.isdir():
            names = store.list()
            if "dataset_info.json" in names and "state.json" in names:
                return DatasetSource(uri, "hf_disk", (), store.uri())
            files = tuple(f for f in store.find() if _is_data_file(split_uri(f)[1], base))
        else:
            files = (store.uri(),) if Path(found.uri).suffix in SUFFIXES else ()
        if not files:
            raise DataError(f"dataset {uri}: no .parquet, .jsonl or .json files there")
    formats = {SUFFIXES[Path(f).suffix] for f in files}
    if len(formats) > 1:
        raise DataError(f"dataset {uri}: mixes Parquet and JSON files; keep one format per dataset")
    return DatasetSource(uri, formats.pop(), files, store.uri(), rows)


def _is_data_file(path: str, base: str) -> bool:
    """A .parquet / .jsonl / .json file that is not hidden or a marker (``_SUCCESS``, ``_common_metadata``) below
    ``base``."""
    below = path[len(base):] if path.startswith(base) else "/" + path.rsplit("/", 1)[-1]
    return Path(path).suffix in SUFFIXES and "/." not in below and "/_" not in below


def read_table(uri: str, storage: StorageConfig | None = None, columns: list[str] | None = None,
               required: tuple[str, ...] = ()) -> pa.Table:
    """Read a (small) dataset into memory as one Arrow table; ``required`` columns must be present."""
    source = resolve_dataset(uri, storage)
    if source.format in ("hf_disk", "hf_hub"):
        table = read_hf(source, storage)
    else:
        rows = source.rows or (None,) * len(source.files)
        parts = [read_file(f, source.format, storage, expected_rows=r) for f, r in zip(source.files, rows)]
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


def read_file(file_uri: str, fmt: Format, storage: StorageConfig | None = None, columns: list[str] | None = None,
              expected_rows: int | None = None) -> pa.Table:
    """One Parquet or JSON Lines file as a table. A file that does not parse is a one-line DataError naming it (and
    the line, for JSON Lines); so is a row count that differs from what its stage committed."""
    data = Storage(file_uri, storage).read_bytes()
    try:
        if fmt == "parquet":
            table = pq.read_table(io.BytesIO(data), columns=columns)
        else:
            table = parse_jsonl(data, file_uri)
            if columns is not None:
                table = table.select([c for c in columns if c in table.column_names])
    except DataError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:  # ArrowInvalid, a damaged footer, JSON errors
        raise DataError(f"dataset file {file_uri}: cannot parse as {fmt} ({first_line(exc)})") from None
    if expected_rows is not None and table.num_rows != expected_rows:
        raise DataError(f"dataset file {file_uri}: {table.num_rows} rows, but its stage committed {expected_rows} "
                        "(the file changed after the commit)")
    return table


def parse_jsonl(data: bytes, where: str, line_offset: int = 1) -> pa.Table:
    """JSON Lines (one object per line) or a JSON array of objects; text that is not UTF-8 is an error naming the
    first bad line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad_line = data[: exc.start].count(b"\n") + line_offset
        raise DataError(f"dataset file {where}: line {bad_line} is not UTF-8 text (byte {exc.start}: "
                        f"{data[exc.start:exc.start + 1]!r})") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"dataset file {where}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
        return pa.Table.from_pylist(rows)
    if not stripped:
        return pa.table({})
    try:
        return pajson.read_json(io.BytesIO(data))
    except pa.ArrowInvalid:
        for number, line in enumerate(text.splitlines(), line_offset):  # name the line pyarrow could not read
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"dataset file {where}: line {number} is not a JSON object ({exc.msg})"
                                    ) from None
        raise


def read_hf(source: DatasetSource, storage: StorageConfig | None) -> pa.Table:
    import datasets

    try:
        if source.format == "hf_disk":
            protocol, path = split_uri(source.location)
            if protocol != "file":
                import tempfile

                local = tempfile.mkdtemp(prefix="scopeforge-hf-")
                Storage(source.location, storage).download(local)
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
