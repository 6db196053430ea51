"""The seed examples of a curate job: an inline list of texts, or a JSONL/Parquet dataset with a text column."""

from __future__ import annotations

from shared.config import StorageConfig
from shared.data import read_table
from shared.errors import DataError


def load_seeds(seeds: str | list[str], text_column: str, id_column: str,
               storage: StorageConfig | None = None) -> tuple[list[str], list[str]]:
    """(seed texts, seed ids), empty texts left out; no seed at all is an error naming the input."""
    if isinstance(seeds, list):
        texts = [t for t in seeds if t.strip()]
        if not texts:
            raise DataError("seeds: every inline seed is empty")
        return texts, [f"seed-{i}" for i in range(len(texts))]
    table = read_table(seeds, storage, required=(text_column,))
    column = table.column(text_column).to_pylist()
    ids = (table.column(id_column).to_pylist() if id_column in table.column_names
           else [f"seed-{i}" for i in range(table.num_rows)])
    kept = [(str(i), t) for i, t in zip(ids, column) if isinstance(t, str) and t.strip()]
    if not kept:
        raise DataError(f"seeds {seeds}: no non-empty '{text_column}' values")
    return [t for _, t in kept], [i for i, _ in kept]
