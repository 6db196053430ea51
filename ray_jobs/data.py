"""Ray Data over dataset URIs: reading the exact files a URI resolves to, and writing shards a stage commits.

    ds = read_dataset("runs/demo/corpus", cfg.storage)      # the files its marker lists, row counts checked
    write_shards(ds, stage, "scores")                        # <attempt>/scores/part-*.parquet, registered

Reading goes through ``shared.data.read_file`` in Ray tasks, one file per task, so a file that does not parse (a
truncated Parquet shard, JSON Lines that is not UTF-8) fails the job with one line naming it, and a file whose row
count differs from its stage's marker is refused. Writing goes through a Datasink whose tasks return the name, size
and rows of each file they wrote: the stage commits exactly those, so a stray file from a retried task is never read.
"""

from __future__ import annotations

import io
import math
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
from ray.data.block import Block, BlockAccessor
from ray.data.datasource import Datasink
from ray.data.datasource.datasink import WriteResult

from shared.config import ActorPoolConfig, StorageConfig
from shared.data import DatasetSource, Format, read_file, resolve_dataset
from shared.errors import DataError, first_line
from shared.stage import CommittedFile, Stage
from shared.storage import Storage

READ_CPUS = 0.25
"""Logical CPUs per read or write task (fractional: actor pools keep their slots on small machines)."""


def actor_pool(runtime: ActorPoolConfig) -> ray.data.ActorPoolStrategy:
    """A fixed pool of ``num_actors``, or one that autoscales from ``num_actors`` to ``max_actors``."""
    if runtime.max_actors is None:
        return ray.data.ActorPoolStrategy(size=runtime.num_actors)
    return ray.data.ActorPoolStrategy(min_size=runtime.num_actors, max_size=runtime.max_actors)


TASK_FILES = 16
"""At most this many files (or corpus pieces) per task of ``task_groups``: a small job is a few tasks, not one per
file (each costs a worker's start-up on a small machine), and a large one still spreads over the cluster."""


def task_groups(n: int, slots: int | None = None) -> list[range]:
    """Consecutive ranges covering ``range(n)``: at least two per CPU slot (the cluster's CPUs unless ``slots``),
    at most ``TASK_FILES`` long."""
    if n == 0:
        return []
    slots = max(1, int(ray.cluster_resources().get("CPU", 1)) if slots is None else slots)
    count = max(min(n, 2 * slots), math.ceil(n / TASK_FILES))
    bounds = [n * k // count for k in range(count + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def map_files(fn: Callable[..., Any], uris: Sequence[str], storage: StorageConfig | None,
              columns: Sequence[str] | None, *args: Any) -> Iterator[Any]:
    """``fn(columns of one Parquet file, *args)`` for every file, in Ray tasks of a few files each
    (``task_groups``), results in file order. At most two tasks per CPU are in flight, so the driver holds a bounded
    number of (small) results."""
    shared_args = ray.put(args)
    window = max(2, int(2 * ray.cluster_resources().get("CPU", 1)))
    pending: list[ray.ObjectRef] = []
    for group in task_groups(len(uris)):
        pending.append(_files_task.remote(fn, [uris[i] for i in group], storage,
                                          None if columns is None else list(columns), shared_args))
        if len(pending) >= window:
            yield from ray.get(pending.pop(0))
    for ref in pending:
        yield from ray.get(ref)


@ray.remote(num_cpus=READ_CPUS)
def _files_task(fn: Callable[..., Any], uris: list[str], storage: StorageConfig | None, columns: list[str] | None,
                args: tuple[Any, ...]) -> list[Any]:
    return [fn(read_columns(uri, storage, columns), *args) for uri in uris]


def read_columns(uri: str, storage: StorageConfig | None, columns: list[str] | None = None) -> dict[str, np.ndarray]:
    """A Parquet file's columns as numpy arrays (list columns as object arrays of arrays)."""
    try:
        parquet = pq.ParquetFile(io.BytesIO(Storage(uri, storage).read_bytes()))
        present = parquet.schema_arrow.names
        table = parquet.read(columns=None if columns is None else [c for c in columns if c in present])
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"dataset file {uri}: cannot parse as parquet ({first_line(exc)})") from None
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def read_dataset(uri: str, storage: StorageConfig | None = None, columns: list[str] | None = None
                 ) -> ray.data.Dataset:
    """A Ray Dataset over Parquet / JSONL shards (local or s3://), a saved or hub Hugging Face dataset, or a stage's
    dataset output (exactly the files it committed)."""
    return read_source(resolve_dataset(uri, storage), storage, columns)


def read_source(source: DatasetSource, storage: StorageConfig | None = None, columns: list[str] | None = None
                ) -> ray.data.Dataset:
    if source.format in ("hf_disk", "hf_hub"):
        from shared.data import read_table

        return ray.data.from_arrow(read_table(source.uri, storage, columns=columns))
    rows = source.rows or (None,) * len(source.files)
    items = [{"file": f, "rows": -1 if r is None else int(r)} for f, r in zip(source.files, rows)]
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _read_files, fn_kwargs={"fmt": source.format, "storage": storage, "columns": columns},
        batch_size=1, batch_format="numpy", num_cpus=READ_CPUS)


def _read_files(batch: dict[str, np.ndarray], fmt: Format, storage: StorageConfig | None,
                columns: list[str] | None) -> Iterator[pa.Table]:
    for file, rows in zip(batch["file"], batch["rows"]):
        table = read_file(str(file), fmt, storage, columns=columns, expected_rows=None if rows < 0 else int(rows))
        if table.num_rows:
            yield table


def source_rows(source: DatasetSource, storage: StorageConfig | None = None) -> int | None:
    """Rows of a dataset without reading its data: the committed counts, else Parquet footers; None for JSON."""
    if source.rows is not None and all(r is not None for r in source.rows):
        return int(sum(r for r in source.rows if r is not None))
    if source.format != "parquet":
        return None
    total = 0
    for file in source.files:
        store = Storage(file, storage)
        try:
            total += pq.read_metadata(io.BytesIO(store.read_bytes())).num_rows
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"dataset file {file}: cannot parse as parquet ({str(exc).splitlines()[0]})") from None
    return total


def require_columns(ds: ray.data.Dataset, uri: str, *columns: str) -> None:
    schema = ds.schema()
    names = schema.names if schema is not None else []
    for column in columns:
        if column not in names:
            raise DataError(f"dataset {uri}: no '{column}' column (columns: {', '.join(names) or 'none'})")


# ---------------------------------------------------------------------------------------------------------------------
# Writing


class ShardSink(Datasink[list[dict[str, Any]]]):
    """Parquet shards under one folder of a stage attempt; each write task returns what it wrote."""

    def __init__(self, uri: str, storage: StorageConfig | None, min_rows: int | None = None):
        self.uri, self.config, self.min_rows = uri, storage, min_rows
        self.written: list[dict[str, Any]] = []

    @property
    def min_rows_per_write(self) -> int | None:
        return self.min_rows

    def write(self, blocks: Iterable[Block], ctx: Any) -> list[dict[str, Any]]:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return []
        table = pa.concat_tables(tables, promote_options="default")
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        name = f"part-{ctx.task_idx:05d}-{uuid.uuid4().hex[:8]}.parquet"  # unique: a retried task never overwrites
        Storage(self.uri, self.config).write_bytes(buffer.getvalue(), name)
        return [{"path": name, "bytes": buffer.tell(), "rows": table.num_rows}]

    def on_write_complete(self, write_result: WriteResult[list[dict[str, Any]]]) -> None:
        self.written = [entry for entries in write_result.write_returns for entry in entries]


def write_shards(ds: ray.data.Dataset, stage: Stage, *folder: str, min_rows: int | None = None
                 ) -> list[CommittedFile]:
    """Write ``ds`` as Parquet shards to ``<attempt>/<folder>/`` and register them with the stage; returns them."""
    rel = "/".join(folder)
    sink = ShardSink(stage.store.uri(rel), stage.root.config, min_rows)
    ds.write_datasink(sink, ray_remote_args={"num_cpus": READ_CPUS})
    files = sorted((CommittedFile(e["path"], int(e["bytes"]), int(e["rows"])) for e in sink.written),
                   key=lambda f: f.path)
    stage.add_files(rel, files)
    return files


def shard_uris(stage: Stage, folder: str, files: list[CommittedFile]) -> list[str]:
    """Full URIs of shards written by ``write_shards`` (to read them back within the same attempt)."""
    return [stage.store.uri(folder, f.path) for f in files]


def read_shards(stage: Stage, folder: str, files: list[CommittedFile], columns: list[str] | None = None
                ) -> ray.data.Dataset:
    """Read back, within the attempt that wrote them, exactly the shards ``write_shards`` returned."""
    source = DatasetSource(stage.store.uri(folder), "parquet", tuple(shard_uris(stage, folder, files)),
                           stage.store.uri(folder), tuple(f.rows for f in files))
    if not files:
        raise DataError(f"{stage.store.uri(folder)}: nothing was written there")
    return read_source(source, stage.root.config, columns)
