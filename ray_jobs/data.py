"""Ray Data readers for dataset URIs (the same resolution as ``shared.data``, streamed instead of loaded)."""

from __future__ import annotations

import ray
import ray.data

from shared.config import StorageConfig
from shared.data import resolve_dataset
from shared.errors import DataError
from shared.storage import Storage, split_uri


def read_dataset(uri: str, options: StorageConfig | None = None) -> ray.data.Dataset:
    """A Ray Dataset over Parquet / JSONL shards (local or s3://), a saved or hub Hugging Face dataset, or a stage's
    dataset output."""
    source = resolve_dataset(uri, options)
    if source.format in ("hf_disk", "hf_hub"):
        from shared.data import read_table

        return ray.data.from_arrow(read_table(uri, options))
    fs, _ = Storage(source.location, options).pyarrow_filesystem()
    paths = [split_uri(f)[1] for f in source.files]
    if source.format == "parquet":
        return ray.data.read_parquet(paths, filesystem=fs)
    return ray.data.read_json(paths, filesystem=fs)


def require_columns(ds: ray.data.Dataset, uri: str, *columns: str) -> None:
    names = ds.schema().names if ds.schema() is not None else []
    for column in columns:
        if column not in names:
            raise DataError(f"dataset {uri}: no '{column}' column (columns: {', '.join(names) or 'none'})")
