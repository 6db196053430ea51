"""Training and test mixtures of IMAGE_SCHEMA datasets: which rows, in which split, under which stable index.

``plan_mixture`` reads only the metadata columns of each source (never the image bytes), assigns every row of a
dataset a split by hashing its group key, keeps the rows the config asks for, and numbers them 0..N-1 in a stable
order (sources in config order, rows by id), so sample i is the same image in every run, on every worker and after a
resume. Each row also gets a difficulty group, its (source, label) pair, e.g. ``lfw/real`` or ``ddpm-ddim/fake``.

Groups: an image, the real images it uses (source_image_ids: an img2img fake's source, both faces of a morph) and
every other image using them form one group, which always shares a split. A group holding a real that a generator
trained on (generator_training) is always in the train split, so no val or test image comes from, or is, a face a
generator saw; val and test are drawn from the other groups, still as fractions of all groups. Splits are computed
per dataset over all its rows (before include / exclude / labels), so train-detector and evaluate-detector agree.

Format guard: every source must be encoded like the reals (codec and quality) and have their size; a mixture that
differs is refused, naming the source, since a detector could learn the format instead of the content.

The images themselves are decoded later, where they are read (Ray Data), with ``decode_batch``: an image that cannot
be decoded, or whose decoded size differs from the mixture's, is reported as a dropped row with its reason; it is
never replaced by another image.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shared.config import StorageConfig
from shared.data import resolve_dataset
from shared.errors import DataError
from shared.imageset import FAKE, REAL, RESAMPLED, decode_image
from shared.storage import Storage, split_uri

META_COLUMNS = ("id", "label", "source", "mode", "width", "height", "source_image_id", "encoding")
OPTIONAL_COLUMNS = {"quality": pa.int32(), "family": pa.string(), "source_image_ids": pa.list_(pa.string()),
                    "generator_training": pa.bool_(), "fit": pa.string()}
"""Columns added to IMAGE_SCHEMA later: datasets written before them read them as null (unknown)."""
LABEL_NAMES = {REAL: "real", FAKE: "fake"}
SPLITS = ("train", "val", "test")


def _parents(table: pa.Table) -> list[list[str]]:
    """Per row: the ids of the real images it uses (source_image_ids, else source_image_id)."""
    single = table.column("source_image_id").to_pylist()
    many = (table.column("source_image_ids").to_pylist() if "source_image_ids" in table.column_names
            else [None] * table.num_rows)
    return [list(m) if m else ([p] if p else []) for p, m in zip(single, many)]


def split_groups(table: pa.Table) -> tuple[list[str], set[str], set[str]]:
    """Group key per row, the keys of groups that trained a generator, and the keys of groups holding a real.

    A group is a connected component of images and the real images they use; its key is the smallest id among its
    real images (the id itself for an image that uses none), so an img2img fake's key is its source's id even where
    that source is in another dataset.
    """
    ids = [str(i) for i in table.column("id").to_pylist()]
    parents = _parents(table)
    up: dict[str, str] = {}

    def root(x: str) -> str:
        up.setdefault(x, x)
        while up[x] != x:
            up[x] = up[up[x]]
            x = up[x]
        return x

    for image_id, used in zip(ids, parents):
        for parent in used:
            a, b = root(image_id), root(parent)
            if a != b:
                up[max(a, b)] = min(a, b)
    labels = table.column("label").to_pylist()
    reals = {i for i, y in zip(ids, labels) if y == REAL} | {p for used in parents for p in used}
    members: defaultdict[str, list[str]] = defaultdict(list)
    for node in up.keys() | set(ids):
        members[root(node)].append(node)
    key_of = {r: min([n for n in nodes if n in reals] or nodes) for r, nodes in members.items()}
    keys = [key_of[root(i)] for i in ids]
    trained = (table.column("generator_training").to_pylist() if "generator_training" in table.column_names
               else [None] * table.num_rows)
    return keys, {k for k, t in zip(keys, trained) if t}, {k for k in keys if k in reals}


def split_keys(table: pa.Table) -> list[str]:
    """Group key per row (see :func:`split_groups`)."""
    return split_groups(table)[0]


def _position(seed: int, key: str) -> float:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") / 2.0**64


def assign_split(keys: Sequence[str], seed: int, val_fraction: float, test_fraction: float,
                 train_only: Collection[str] = (), pool: Collection[str] | None = None, what: str = "split"
                 ) -> np.ndarray:
    """'train' / 'val' / 'test' per key from a seeded hash: stable, order-free, the same in every job.

    Keys in ``train_only`` (groups that trained a generator) are always train. Val and test still take
    val_fraction and test_fraction of the distinct keys of ``pool`` (the kind of key train_only comes from, e.g.
    groups holding a real; default: all keys), drawn from its other keys; a DataError when those are too few.
    """
    members = set(keys) if pool is None else set(pool) & set(keys)
    pinned = set(train_only) & set(keys)
    free = 1.0 - len(pinned & members) / max(1, len(members))
    if pinned and val_fraction + test_fraction > free:
        raise DataError(f"{what}: val_fraction + test_fraction = {val_fraction + test_fraction:g} of the "
                        f"{len(members)} groups with reals, but only {free:.0%} of them trained no generator; lower "
                        "the fractions or train the generators on fewer reals (training_reals)")
    array = np.asarray(keys, dtype=object)
    scale = np.where(np.isin(array, list(members)), 1.0 / free if pinned and free > 0 else 1.0, 1.0)
    u = np.array([_position(seed, k) for k in keys], dtype=np.float64)
    out = np.full(len(keys), "train", dtype=object)
    out[u < (test_fraction + val_fraction) * scale] = "val"
    out[u < test_fraction * scale] = "test"
    out[np.isin(array, list(pinned))] = "train"
    return out


def table_splits(table: pa.Table, split: Any, what: str = "split") -> np.ndarray:
    """The split of every row of one dataset (SplitConfig-like ``split``: seed, val_fraction, test_fraction)."""
    keys, trained, with_reals = split_groups(table)
    return assign_split(keys, split.seed, split.val_fraction, split.test_fraction, trained, with_reals, what)


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
        optional = [c for c in OPTIONAL_COLUMNS if c in schema.names]
        table = pq.read_table(path, filesystem=fs, columns=[*META_COLUMNS, *optional])
        for name, kind in OPTIONAL_COLUMNS.items():
            if name not in optional:
                table = table.append_column(name, pa.nulls(table.num_rows, kind))
        table = table.select([*META_COLUMNS, *OPTIONAL_COLUMNS])
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


def _codec(fmt: tuple[str, int | None]) -> str:
    return f"{fmt[0]} quality {fmt[1]}" if fmt[1] is not None else fmt[0]


def check_formats(codecs: dict[str, set[tuple[str, int | None]]], real_sources: set[str], what: str) -> None:
    """A DataError naming the first source whose (encoding, quality) differs from the reals' (from every other
    source's when there are no reals), or a source that mixes formats itself."""
    for name, fmts in sorted(codecs.items()):
        if len(fmts) > 1:
            raise DataError(f"{what}: source '{name}' mixes formats ({', '.join(sorted(map(_codec, fmts)))}); "
                            "encode every image of a mixture alike")
    reference = sorted(real_sources) or sorted(codecs)
    if not reference:
        return
    ref = next(iter(codecs[reference[0]]))
    for name in reference:
        if codecs[name] != {ref}:
            raise DataError(f"{what}: source '{name}' is {_codec(next(iter(codecs[name])))}, source "
                            f"'{reference[0]}' is {_codec(ref)}; reals must share one format")
    for name, fmts in sorted(codecs.items()):
        if fmts != {ref}:
            raise DataError(f"{what}: source '{name}' is {_codec(next(iter(fmts)))} but the reals "
                            f"({', '.join(reference)}) are {_codec(ref)}; a detector could learn the format instead "
                            "of the content: encode every source like the reals")


@dataclass
class MixturePlan:
    """The kept rows, in index order: index, dataset, id, label, source, family, group, split."""

    rows: pa.Table
    group_names: list[str]
    datasets: dict[str, str]
    """Config name -> URI of every source."""
    height: int
    width: int
    fingerprint: str
    skipped: dict[str, int] = field(default_factory=dict)
    """Rows not kept, per reason."""
    resampled: dict[str, int] = field(default_factory=dict)
    """Kept rows per source that were resampled to the mixture's size (fit area or bicubic; reports say so)."""

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
    codecs: dict[str, set[tuple[str, int | None]]] = {}
    real_sources: set[str] = set()
    for src in sources:
        meta = read_metadata(src.uri, storage)
        meta = meta.append_column("split", pa.array(table_splits(meta, split, f"{what}, source '{src.name}' "
                                                                             f"({src.uri})").tolist(), pa.string()))
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
        in_split = np.isin(np.asarray(meta.column("split").to_pylist(), dtype=object), list(keep_splits))
        skipped[f"{src.name}: other splits"] += int((~in_split).sum())
        meta = meta.filter(pa.array(in_split))
        if meta.num_rows == 0:
            raise DataError(f"source '{src.name}' ({src.uri}): no rows left in split(s) {', '.join(keep_splits)} "
                            f"after include/exclude/labels (its sources: {', '.join(present)})")
        for w, h, s, enc, q, y in zip(*(meta.column(c).to_pylist() for c in ("width", "height", "source", "encoding",
                                                                             "quality", "label"))):
            sizes.setdefault((h, w), Counter())[s] += 1
            codecs.setdefault(s, set()).add((enc, q))
            real_sources.update([s] if y == REAL else [])
        meta = meta.append_column("dataset", pa.array([src.name] * meta.num_rows, pa.string()))
        kept.append(meta.sort_by("id"))
    check_formats(codecs, real_sources, what)
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
        "family": rows.column("family"),
        "group": pa.array([group_of[g] for g in group_keys], pa.int64()),
        "split": rows.column("split"),
    })
    h = hashlib.sha256()
    for d, i, y, s in zip(table.column("dataset").to_pylist(), table.column("id").to_pylist(), labels.tolist(),
                          split_col.tolist()):
        h.update(f"{d}\x00{i}\x00{y}\x00{s}\n".encode())
    resampled = Counter(s for s, f in zip(sources_col, rows.column("fit").to_pylist()) if f in RESAMPLED)
    return MixturePlan(table, group_names, {s.name: s.uri for s in sources}, int(height), int(width),
                       h.hexdigest()[:16], {k: v for k, v in skipped.items() if v}, dict(sorted(resampled.items())))


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
