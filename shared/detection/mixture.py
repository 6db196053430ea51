"""Training and test mixtures of IMAGE_SCHEMA datasets: which rows, in which split, under which stable index.

``plan_mixture`` reads only the metadata columns of each source (never the image bytes), keeps the rows the config
asks for, assigns each a split by hashing its group key, and numbers the kept rows 0..N-1 in a stable order (sources
in config order, rows by id), so sample i is the same image in every run, on every worker and after a resume. Each
row also gets a difficulty group, its (source, label) pair, e.g. ``lfw/real`` or ``ddpm-ddim/fake``.

The images themselves are decoded later, where they are read (Ray Data), with ``decode_batch``: an image that cannot
be decoded, or whose decoded size differs from the mixture's, is reported as a dropped row with its reason; it is
never replaced by another image.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shared.config import StorageConfig
from shared.data import resolve_dataset
from shared.errors import DataError
from shared.imageset import FAKE, REAL, decode_image
from shared.storage import Storage, split_uri

META_COLUMNS = ("id", "label", "source", "mode", "width", "height", "source_image_id")
LABEL_NAMES = {REAL: "real", FAKE: "fake"}
SPLITS = ("train", "val", "test")


def split_keys(table: pa.Table) -> list[str]:
    """Group key per row: the real photo an image derives from (source_image_id) or the image's own id."""
    ids = table.column("id").to_pylist()
    parents = table.column("source_image_id").to_pylist()
    return [p if p else i for i, p in zip(ids, parents)]


def assign_split(keys: Sequence[str], seed: int, val_fraction: float, test_fraction: float) -> np.ndarray:
    """'train' / 'val' / 'test' per key from a seeded hash: stable, order-free, the same in every job."""
    u = np.array([int.from_bytes(hashlib.sha256(f"{seed}:{k}".encode()).digest()[:8], "big") / 2.0**64 for k in keys],
                 dtype=np.float64)
    out = np.full(len(keys), "train", dtype=object)
    out[u < test_fraction + val_fraction] = "val"
    out[u < test_fraction] = "test"
    return out


def read_metadata(uri: str, storage: StorageConfig | None = None) -> pa.Table:
    """The metadata columns of an IMAGE_SCHEMA dataset (Parquet), without the image bytes."""
    source = resolve_dataset(uri, storage)
    if source.format != "parquet":
        raise DataError(f"dataset {uri}: image datasets are Parquet (IMAGE_SCHEMA); this one is {source.format}")
    parts = []
    for f in source.files:
        fs, path = Storage(f, storage).pyarrow_filesystem()
        try:
            schema = pq.read_schema(path, filesystem=fs)
        except (OSError, pa.ArrowInvalid) as exc:
            raise DataError(f"dataset file {f}: cannot read as Parquet ({str(exc).splitlines()[0]})") from None
        missing = [c for c in (*META_COLUMNS, "image") if c not in schema.names]
        if missing:
            raise DataError(f"dataset {uri}: no '{missing[0]}' column in {f.rsplit('/', 1)[-1]} (not an image dataset "
                            "in IMAGE_SCHEMA?)")
        table = pq.read_table(path, filesystem=fs, columns=list(META_COLUMNS))
        parts.append(table.append_column("file", pa.array([split_uri(f)[1]] * table.num_rows, pa.string())))
    table = pa.concat_tables(parts, promote_options="default")
    labels = set(table.column("label").to_pylist())
    if not labels <= {REAL, FAKE}:
        raise DataError(f"dataset {uri}: labels {sorted(labels - {REAL, FAKE})} are not 0 (real) or 1 (fake)")
    ids = table.column("id").to_pylist()
    if len(set(ids)) != len(ids):
        dup = next(k for k, n in Counter(ids).items() if n > 1)
        raise DataError(f"dataset {uri}: id {dup!r} appears more than once")
    return table


@dataclass
class MixturePlan:
    """The kept rows, in index order: index, dataset, id, label, source, group, split."""

    rows: pa.Table
    group_names: list[str]
    datasets: dict[str, str]
    """Config name -> URI of every source."""
    height: int
    width: int
    fingerprint: str
    skipped: dict[str, int] = field(default_factory=dict)
    """Rows not kept, per reason."""

    @property
    def num_samples(self) -> int:
        return self.rows.num_rows

    def column(self, name: str) -> np.ndarray:
        return self.rows.column(name).to_numpy(zero_copy_only=False)

    def lookup(self, dataset: str) -> dict[str, tuple[int, int, int, str]]:
        """id -> (index, label, group, split) for the kept rows of one source."""
        mask = self.column("dataset") == dataset
        cols = [self.column(c)[mask] for c in ("id", "index", "label", "group", "split")]
        return {i: (int(x), int(y), int(g), str(s)) for i, x, y, g, s in zip(*cols)}

    def counts(self) -> list[dict[str, Any]]:
        """Rows per (dataset, source, label, split)."""
        keys = zip(self.column("dataset"), self.column("source"), self.column("label"), self.column("split"))
        table = Counter(keys)
        return [{"dataset": d, "source": s, "label": LABEL_NAMES[int(y)], "split": sp, "rows": n}
                for (d, s, y, sp), n in sorted(table.items())]


def plan_mixture(sources: Sequence[Any], split: Any, storage: StorageConfig | None = None,
                 keep_splits: Sequence[str] = ("train", "val"), require_both_classes: Sequence[str] = ("train", "val"),
                 what: str = "training mixture") -> MixturePlan:
    """Select, split and index the rows of ``sources`` (SourceConfig-like: name, uri, include, exclude, labels)."""
    kept: list[pa.Table] = []
    skipped: Counter[str] = Counter()
    sizes: dict[tuple[int, int], Counter[str]] = {}
    for src in sources:
        meta = read_metadata(src.uri, storage)
        present = sorted(set(meta.column("source").to_pylist()))
        for name in (*src.include, *src.exclude):
            if name not in present:
                raise DataError(f"source '{src.name}' ({src.uri}): no '{name}' in its 'source' column "
                                f"(it has: {', '.join(present)})")
        values = np.asarray(meta.column("source").to_pylist(), dtype=object)
        labels = meta.column("label").to_numpy()
        keep = np.ones(meta.num_rows, dtype=bool)
        if src.include:
            keep &= np.isin(values, list(src.include))
        if src.exclude:
            keep &= ~np.isin(values, list(src.exclude))
        wanted = [REAL if name == "real" else FAKE for name in src.labels]
        keep &= np.isin(labels, wanted)
        skipped[f"{src.name}: not selected"] += int((~keep).sum())
        meta = meta.filter(pa.array(keep))
        splits = assign_split(split_keys(meta), split.seed, split.val_fraction, split.test_fraction)
        in_split = np.isin(splits, list(keep_splits))
        skipped[f"{src.name}: other splits"] += int((~in_split).sum())
        meta = meta.append_column("split", pa.array(splits.tolist(), pa.string())).filter(pa.array(in_split))
        if meta.num_rows == 0:
            raise DataError(f"source '{src.name}' ({src.uri}): no rows left in split(s) {', '.join(keep_splits)} "
                            f"after include/exclude/labels (its sources: {', '.join(present)})")
        for w, h, s in zip(meta.column("width").to_pylist(), meta.column("height").to_pylist(),
                           meta.column("source").to_pylist()):
            sizes.setdefault((h, w), Counter())[s] += 1
        meta = meta.append_column("dataset", pa.array([src.name] * meta.num_rows, pa.string()))
        kept.append(meta.sort_by("id"))
    if len(sizes) > 1:
        described = "; ".join(f"{h}x{w}: {', '.join(f'{s} ({n})' for s, n in sorted(c.items()))}"
                              for (h, w), c in sorted(sizes.items()))
        raise DataError(f"{what}: mismatched image sizes ({described}); a detector could learn the size instead of "
                        "the content: produce every source at one size")
    (height, width), = sizes
    rows = pa.concat_tables(kept)
    labels = rows.column("label").to_numpy()
    split_col = np.asarray(rows.column("split").to_pylist(), dtype=object)
    for name in require_both_classes:
        in_split = labels[split_col == name]
        for cls in (REAL, FAKE):
            if not (in_split == cls).any():
                have = "fake" if cls == REAL else "real"
                raise DataError(f"{what}: the {name} split has only {have} images (no {LABEL_NAMES[cls]} ones) from "
                                f"sources {', '.join(s.name for s in sources)}; a detector needs both classes: "
                                f"add a source with {LABEL_NAMES[cls]} images")
    sources_col = rows.column("source").to_pylist()
    group_keys = [f"{s}/{LABEL_NAMES[int(y)]}" for s, y in zip(sources_col, labels)]
    group_names = sorted(set(group_keys))
    group_of = {g: i for i, g in enumerate(group_names)}
    table = pa.table({
        "index": pa.array(np.arange(rows.num_rows, dtype=np.int64)),
        "dataset": rows.column("dataset"),
        "id": rows.column("id"),
        "label": rows.column("label").cast(pa.int64()),
        "source": rows.column("source"),
        "group": pa.array([group_of[g] for g in group_keys], pa.int64()),
        "split": rows.column("split"),
    })
    h = hashlib.sha256()
    for d, i, y, s in zip(table.column("dataset").to_pylist(), table.column("id").to_pylist(), labels.tolist(),
                          split_col.tolist()):
        h.update(f"{d}\x00{i}\x00{y}\x00{s}\n".encode())
    return MixturePlan(table, group_names, {s.name: s.uri for s in sources}, int(height), int(width),
                       h.hexdigest()[:16], {k: v for k, v in skipped.items() if v})


def decode_batch(images: Sequence[bytes | None], ids: Sequence[str], height: int, width: int, what: str
                 ) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """Decode encoded images to (n, height, width, 3) uint8; (arrays, ok mask, reason per row).

    A row that does not decode, or decodes to another size, gets ok=False, a zero image and its reason: the caller
    drops and reports it (it is never replaced by another sample).
    """
    out = np.zeros((len(ids), height, width, 3), dtype=np.uint8)
    ok = np.zeros(len(ids), dtype=bool)
    reasons: list[str | None] = []
    for k, (data, image_id) in enumerate(zip(images, ids)):
        if not data:
            reasons.append("no image bytes")
            continue
        try:
            pixels = decode_image(data, f"{what} image {image_id}")
        except DataError as exc:
            reasons.append(str(exc).rsplit(": ", 1)[-1])
            continue
        if pixels.shape[:2] != (height, width):
            reasons.append(f"decoded size {pixels.shape[0]}x{pixels.shape[1]} differs from {height}x{width}")
            continue
        out[k] = pixels
        ok[k] = True
        reasons.append(None)
    return out, ok, reasons
