"""A corpus cut into pieces of bounded size: the unit a corpus-scale job reads, computes, writes and resumes by.

    pieces = plan_pieces(resolve_dataset(uri, storage), storage, target_bytes=64 << 20, max_rows=4096)
    table = read_piece(pieces[0], storage, columns=["id", "text"])

A piece is a row range of one Parquet file (whole row groups are read, then sliced), a byte range of one JSON Lines
file (a piece owns the lines that start inside its range), or a row range of a saved Hugging Face dataset. Planning
reads only Parquet footers and file sizes (range reads on S3), never the data. A piece is the same for every run of
the same files and sizes, so its ``key`` names its outputs: a rerun finds what an earlier attempt committed.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from shared.config import StorageConfig
from shared.data import DatasetSource, parse_jsonl, read_hf
from shared.errors import DataError, first_line
from shared.storage import Storage


@dataclass(frozen=True)
class Piece:
    index: int
    """Position in the plan (pieces are in file order, then row or byte order)."""
    file: str
    """The data file (full URI), or the dataset location for Hugging Face datasets."""
    format: str
    start: int
    """First row (Parquet, Hugging Face) or byte (JSON Lines)."""
    stop: int
    """One past the last row or byte."""
    rows: int | None
    """Rows, when known before reading (Parquet footers, Hugging Face); None for JSON Lines."""
    file_size: int

    @property
    def key(self) -> str:
        """A stable name for what is computed from this piece (the same files and plan give the same keys)."""
        text = f"{self.file}|{self.format}|{self.start}|{self.stop}|{self.file_size}"
        return f"{self.index:06d}-{hashlib.blake2b(text.encode(), digest_size=6).hexdigest()}"


HEAD_BYTES = 1 << 16
"""Bytes read from the start of each JSON Lines file to estimate its rows per byte."""


def plan_pieces(source: DatasetSource, storage: StorageConfig | None, target_bytes: int, max_rows: int,
                min_pieces: int = 1) -> list[Piece]:
    """Cut a dataset into pieces of about ``target_bytes`` (uncompressed) and at most ``max_rows`` rows; small
    corpora are cut into at least ``min_pieces`` pieces (when they have that many rows), so a pool has work for
    every actor."""
    spans: list[tuple[str, str, int, int, int | None, int]] = []  # file, format, start, stop, rows, file size
    if source.format in ("hf_disk", "hf_hub"):
        rows = read_hf(source, storage).num_rows
        spans.append((source.location, source.format, 0, rows, rows, 0))
        total_rows: int | None = rows
        total_bytes = max(1, rows) * 512
    elif source.format == "parquet":
        total_rows, total_bytes = 0, 0
        for i, file in enumerate(source.files):
            meta = parquet_metadata(file, storage)
            committed = source.rows[i] if source.rows is not None else None
            if committed is not None and meta.num_rows != committed:
                raise DataError(f"dataset file {file}: {meta.num_rows} rows, but its stage committed {committed} "
                                "(the file changed after the commit)")
            size = sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
            spans.append((file, "parquet", 0, meta.num_rows, meta.num_rows, size))
            total_rows += meta.num_rows
            total_bytes += size
    else:
        total_rows, total_bytes = None, 0
        for file in source.files:
            size = Storage(file, storage).size()
            spans.append((file, "jsonl", 0, size, None, size))
            total_bytes += size
    pieces: list[Piece] = []
    for file, fmt, start, stop, rows, size in spans:
        if fmt == "jsonl":
            cuts = _byte_cuts(file, storage, size, target_bytes, max_rows, total_bytes, min_pieces)
            pieces += [Piece(len(pieces) + j, file, fmt, a, b, None, size) for j, (a, b) in enumerate(cuts)]
            continue
        per_row = max(1.0, size / max(1, rows or 1)) if fmt == "parquet" else 512.0
        step = max(1, min(max_rows, int(target_bytes // per_row)))
        if total_rows and min_pieces > 1:
            step = max(1, min(step, math.ceil(total_rows / min_pieces)))
        for a in range(start, stop, step):
            b = min(stop, a + step)
            pieces.append(Piece(len(pieces), file, fmt, a, b, b - a, size))
    return pieces


def _byte_cuts(file: str, storage: StorageConfig | None, size: int, target_bytes: int, max_rows: int,
               total_bytes: int, min_pieces: int) -> list[tuple[int, int]]:
    """Byte ranges of a JSON Lines file (a JSON array is one range: it cannot be split at lines). The rows per piece
    are bounded by an estimate from the lines in the file's first ``HEAD_BYTES``."""
    if size == 0:
        return [(0, 0)]
    store = Storage(file, storage)
    with store.fs.open(store.path(), "rb") as handle:
        head = handle.read(min(size, HEAD_BYTES))
    if head.lstrip().startswith(b"["):
        return [(0, size)]
    lines = head.count(b"\n") + (len(head) == size and not head.endswith(b"\n"))
    estimated_rows = size / (len(head) / max(1, lines))
    share = size / max(1, total_bytes)
    pieces = max(math.ceil(size / target_bytes), math.ceil(estimated_rows / max_rows), math.ceil(min_pieces * share), 1)
    step = math.ceil(size / pieces)
    return [(a, min(size, a + step)) for a in range(0, size, step)]


def parquet_metadata(file: str, storage: StorageConfig | None = None) -> pq.FileMetaData:
    """A Parquet file's footer (a range read on object storage); a one-line DataError when it does not parse."""
    store = Storage(file, storage)
    try:
        with store.fs.open(store.path(), "rb") as handle:
            return pq.ParquetFile(handle).metadata
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"dataset file {file}: cannot parse as parquet ({first_line(exc)})") from None


def read_piece(piece: Piece, storage: StorageConfig | None = None, columns: list[str] | None = None) -> pa.Table:
    """The rows of one piece (only ``columns`` where given and present)."""
    try:
        if piece.format == "parquet":
            table = _read_parquet_rows(piece, storage, columns)
        elif piece.format == "jsonl":
            table = _read_jsonl_range(piece, storage)
        else:
            table = read_hf(_hf_source(piece), storage).slice(piece.start, piece.stop - piece.start)
    except DataError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DataError(f"dataset file {piece.file}: cannot parse as {piece.format} ({first_line(exc)})") from None
    if columns is not None:
        table = table.select([c for c in columns if c in table.column_names])
    if piece.rows is not None and table.num_rows != piece.rows:
        raise DataError(f"dataset file {piece.file}: rows {piece.start}..{piece.stop} hold {table.num_rows} rows, "
                        f"expected {piece.rows} (the file changed while the job ran)")
    return table


def _hf_source(piece: Piece) -> DatasetSource:
    return DatasetSource(piece.file, piece.format, (), piece.file)  # type: ignore[arg-type]


def _read_parquet_rows(piece: Piece, storage: StorageConfig | None, columns: list[str] | None) -> pa.Table:
    store = Storage(piece.file, storage)
    with store.fs.open(store.path(), "rb") as handle:
        parquet = pq.ParquetFile(handle)
        names = parquet.schema_arrow.names
        wanted = [c for c in columns if c in names] if columns is not None else None
        groups, first, offset = [], None, 0
        for g in range(parquet.metadata.num_row_groups):
            n = parquet.metadata.row_group(g).num_rows
            if offset + n > piece.start and offset < piece.stop:
                groups.append(g)
                first = offset if first is None else first
            offset += n
        if not groups:
            return parquet.schema_arrow.empty_table().select(wanted or names)
        table = parquet.read_row_groups(groups, columns=wanted)
    return table.slice(piece.start - (first or 0), piece.stop - piece.start)


def _read_jsonl_range(piece: Piece, storage: StorageConfig | None) -> pa.Table:
    """The lines that start in ``[start, stop)``: from the first line start at or after ``start`` to the end of the
    line that holds byte ``stop - 1``."""
    store = Storage(piece.file, storage)
    if piece.start == 0 and piece.stop >= piece.file_size:
        return parse_jsonl(store.read_bytes(), piece.file)
    with store.fs.open(store.path(), "rb") as handle:
        begin = piece.start
        if begin > 0:  # skip the line that started before this range (the previous piece owns it)
            handle.seek(begin - 1)
            if handle.read(1) != b"\n":
                handle.readline()
            begin = handle.tell()
        if begin >= piece.stop:
            return pa.table({})
        handle.seek(begin)
        data = handle.read(piece.stop - begin)
        if not data.endswith(b"\n"):
            data += handle.readline()
    try:
        return parse_jsonl(data, piece.file)
    except DataError:  # name the line as the file numbers it: count the lines before this range (error path only)
        with store.fs.open(store.path(), "rb") as handle:
            before = handle.read(begin).count(b"\n")
        return parse_jsonl(data, piece.file, line_offset=before + 1)


def read_all(pieces: list[Piece], storage: StorageConfig | None = None, columns: list[str] | None = None
             ) -> pa.Table:
    """Every piece in order (for tests and small corpora)."""
    return pa.concat_tables([read_piece(p, storage, columns) for p in pieces], promote_options="default")
