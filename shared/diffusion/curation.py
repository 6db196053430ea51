"""Curation of an existing collection of generated images, as plain per-batch steps (the curate-images job).

    matches = subject_matcher(cfg.subject)            # prompt -> bool
    scan = scan_batch(manifest_rows, cfg, base)       # id, status, width, height, phash: no image bytes kept
    keep, drops = select(scan, cfg.dedup_distance)    # near duplicates removed, first id kept
    table = encode_batch(manifest_rows, cfg, keep, base)   # IMAGE_SCHEMA rows of the kept ids

Statuses of a row: ok, no_prompt, off_subject, missing_file, undecodable, too_small, too_large, bad_aspect, and
(from :func:`select`) near_duplicate. Only ok rows that survive deduplication are written.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from shared.configs.curate_images import CurateImagesConfig, SubjectFilter
from shared.diffusion.phash import near_duplicates, phash
from shared.errors import ConfigError, DataError, StorageError
from shared.imageset import FAKE, REAL, decode_image, fit_image, image_row, rows_to_table
from shared.storage import Storage

SCAN_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("phash", pa.uint64()),
])


def _words_pattern(words: list[str]) -> re.Pattern[str] | None:
    if not words:
        return None
    alternatives = "|".join(re.escape(w.strip()) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"(?<![\w])(?:{alternatives})(?:s|es)?(?![\w])", re.IGNORECASE)


def _features(text: str) -> list[str]:
    words = re.findall(r"\w+", text.lower())
    return words + [f"{a} {b}" for a, b in zip(words, words[1:])]


class NaiveBayesPrompts:
    """Multinomial naive Bayes over unigrams and bigrams with add-one smoothing and equal class priors."""

    def __init__(self, positive: list[str], negative: list[str]):
        self.counts = [Counter(f for text in texts for f in _features(text)) for texts in (negative, positive)]
        self.totals = [sum(c.values()) for c in self.counts]
        self.vocabulary = len(set(self.counts[0]) | set(self.counts[1])) + 1

    def probability(self, text: str) -> float:
        """P(about the subject | text)."""
        logits = [sum(math.log((c[f] + 1) / (t + self.vocabulary)) for f in _features(text))
                  for c, t in zip(self.counts, self.totals)]
        return 1.0 / (1.0 + math.exp(max(-50.0, min(50.0, logits[0] - logits[1]))))


def subject_matcher(subject: SubjectFilter) -> Callable[[str], bool]:
    """prompt -> kept? (a keyword, the regex or the classifier matches, and no excluded word)."""
    include = _words_pattern(subject.keywords)
    regex = re.compile(subject.regex, re.IGNORECASE) if subject.regex else None
    exclude = _words_pattern(subject.exclude)
    classifier = subject.classifier
    model = NaiveBayesPrompts(classifier.positive, classifier.negative) if classifier else None
    threshold = classifier.threshold if classifier else 0.0

    def matches(prompt: str) -> bool:
        hit = ((include is None and regex is None and model is None)
               or bool(include and include.search(prompt)) or bool(regex and regex.search(prompt))
               or bool(model and model.probability(prompt) >= threshold))
        return hit and not (exclude and exclude.search(prompt))

    return matches


def source_id(cfg: CurateImagesConfig, row: dict[str, Any]) -> str:
    column = cfg.columns.id or cfg.columns.path
    if column is None:
        raise ConfigError("curate-images: set columns.id or columns.path (the id of each row)")
    original = row[column]
    if original is None or str(original) == "":
        raise DataError(f"manifest {cfg.manifest}: a row has no {column}")
    return f"{cfg.name}-{original}"


def _image_bytes(cfg: CurateImagesConfig, row: dict[str, Any], base: str | None) -> bytes | None:
    """The row's encoded image; None when its file is missing."""
    if cfg.columns.image:
        return row[cfg.columns.image]
    if cfg.columns.path is None:
        raise ConfigError("curate-images: set columns.image or columns.path (where each row's image is)")
    path = row[cfg.columns.path]
    uri = path if "://" in path or path.startswith("/") or base is None else f"{base.rstrip('/')}/{path}"
    try:
        return Storage(uri, cfg.storage).read_bytes()
    except StorageError:
        return None


def _check_columns(cfg: CurateImagesConfig, table: pa.Table) -> None:
    c = cfg.columns
    for key, column in (("id", c.id), ("prompt", c.prompt), ("image", c.image), ("path", c.path),
                        ("model_ref", c.model_ref), ("scheduler", c.scheduler), ("steps", c.steps),
                        ("guidance", c.guidance), ("seed", c.seed)):
        if column is not None and column not in table.column_names:
            raise DataError(f"manifest {cfg.manifest}: no '{column}' column (columns.{key}); it has: "
                            f"{', '.join(table.column_names)}")


def scan_batch(table: pa.Table, cfg: CurateImagesConfig, base: str | None) -> pa.Table:
    """Filter and hash one batch of manifest rows; the image bytes are not carried on."""
    _check_columns(cfg, table)
    matches = subject_matcher(cfg.subject)
    out: dict[str, list[Any]] = {name: [] for name in SCAN_SCHEMA.names}
    for row in table.to_pylist():
        rid = source_id(cfg, row)
        status, width, height, value = _scan_row(cfg, row, base, matches)
        for key, v in (("id", rid), ("status", status), ("width", width), ("height", height), ("phash", value)):
            out[key].append(v)
    return pa.table(out, schema=SCAN_SCHEMA)


def _scan_row(cfg: CurateImagesConfig, row: dict[str, Any], base: str | None, matches: Callable[[str], bool]
              ) -> tuple[str, int | None, int | None, int | None]:
    prompt = row[cfg.columns.prompt]
    if prompt is None or not str(prompt).strip():
        return "no_prompt", None, None, None
    if not matches(str(prompt)):
        return "off_subject", None, None, None
    data = _image_bytes(cfg, row, base)
    if data is None:
        return "missing_file", None, None, None
    try:
        pixels = decode_image(data)
    except DataError:
        return "undecodable", None, None, None
    height, width = pixels.shape[:2]
    if min(height, width) < cfg.min_side:
        return "too_small", width, height, None
    if cfg.max_side is not None and max(height, width) > cfg.max_side:
        return "too_large", width, height, None
    if cfg.max_aspect is not None and max(height, width) / min(height, width) > cfg.max_aspect:
        return "bad_aspect", width, height, None
    return "ok", width, height, phash(pixels)


def select(scan: pa.Table, dedup_distance: int | None) -> tuple[set[str], list[dict[str, Any]]]:
    """Kept ids and one drop record per other row (reason = its status, or near_duplicate with the id it
    duplicates). Duplicate ids in the manifest are an error: rows could not be told apart afterwards."""
    ids = scan.column("id").to_pylist()
    if len(set(ids)) != len(ids):
        dup, n = next((i, n) for i, n in Counter(ids).items() if n > 1)
        raise DataError(f"manifest: id {dup!r} appears {n} times; ids must be unique (set columns.id)")
    rows = sorted(scan.to_pylist(), key=lambda r: r["id"])
    drops = [{"id": r["id"], "reason": r["status"]} for r in rows if r["status"] != "ok"]
    ok = [r for r in rows if r["status"] == "ok"]
    if dedup_distance is None:
        return {r["id"] for r in ok}, drops
    twins = near_duplicates([int(r["phash"]) for r in ok], dedup_distance)
    for r, twin in zip(ok, twins):
        if twin is not None:
            drops.append({"id": r["id"], "reason": "near_duplicate", "duplicate_of": ok[twin]["id"]})
    return {r["id"] for r, twin in zip(ok, twins) if twin is None}, drops


def _number(cfg: CurateImagesConfig, column: str | None, row: dict[str, Any], cast: type) -> Any:
    if column is None or row[column] is None:
        return None
    try:
        return cast(row[column])
    except (TypeError, ValueError):
        raise DataError(f"manifest {cfg.manifest}: column '{column}' has {row[column]!r}, not a number "
                        f"(row {source_id(cfg, row)})") from None


def encode_batch(table: pa.Table, cfg: CurateImagesConfig, keep: set[str], base: str | None) -> pa.Table:
    """IMAGE_SCHEMA rows for the kept ids of one batch, re-encoded like the generate job's images."""
    c = cfg.columns
    rows = []
    for row in table.to_pylist():
        rid = source_id(cfg, row)
        if rid not in keep:
            continue
        data = _image_bytes(cfg, row, base)
        if data is None:
            raise DataError(f"manifest {cfg.manifest}: image of {rid} disappeared between the scan and the write")
        pixels = fit_image(decode_image(data, f"image {rid}"), cfg.output.size, cfg.output.color)
        rows.append(image_row(
            rid, pixels, encoding=cfg.output.encoding, quality=cfg.output.quality,
            label=FAKE if cfg.label == "fake" else REAL, source=cfg.name,
            mode="collected" if cfg.label == "fake" else "real",
            model_ref=str(row[c.model_ref]) if c.model_ref and row[c.model_ref] is not None else None,
            scheduler=str(row[c.scheduler]) if c.scheduler and row[c.scheduler] is not None else None,
            steps=_number(cfg, c.steps, row, int), guidance=_number(cfg, c.guidance, row, float),
            seed=_number(cfg, c.seed, row, int), prompt=str(row[c.prompt])))
    return rows_to_table(rows)


def manifest_base(location: str) -> str:
    """The folder relative image paths are resolved against: the manifest's folder (or the folder itself)."""
    from pathlib import PurePosixPath

    if location.endswith((".parquet", ".jsonl", ".json")):
        parent = str(PurePosixPath(location.split("://", 1)[-1]).parent)
        return f"{location.split('://', 1)[0]}://{parent}" if "://" in location else parent
    return location
