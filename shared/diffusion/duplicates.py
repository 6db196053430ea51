"""Near-duplicate pairs across groups (sources, splits): a generator that memorised a training face, or one face in
two splits, shows up as a pair of perceptual hashes a few bits apart.

    hashes = image_hashes(table.column("image").to_pylist())           # pHash per encoded image
    pairs = near_duplicate_pairs(hashes, sources, max_distance=6)       # [(i, j, bits), ...], i < j, groups differ
    counts = pair_counts(pairs, sources)                                # {"ddpm-ddim|lfw": 3, ...}

Exact: every pair of items in different groups within the distance is found (numpy XOR and popcount over all pairs,
in row chunks, so memory stays bounded; a few thousand images take well under a second).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from shared.diffusion.phash import HASH_BITS, phash
from shared.imageset import decode_image

NEAR_DUPLICATE_BITS = 6
"""Hamming distance (of 64 pHash bits) at or below which two images count as near duplicates: re-encoding, mild
blur and small shifts stay within it, while different faces differ in about half the bits (as curate-images'
dedup_distance)."""

_CHUNK = 1024


def image_hashes(images: Sequence[bytes], ids: Sequence[str] | None = None) -> list[int]:
    """The 64-bit pHash of each encoded image (a DataError naming the image when one does not decode)."""
    names = ids if ids is not None else [str(i) for i in range(len(images))]
    return [phash(decode_image(data, f"image {name}")) for data, name in zip(images, names)]


def near_duplicate_pairs(hashes: Sequence[int], groups: Sequence[str], max_distance: int = NEAR_DUPLICATE_BITS
                         ) -> list[tuple[int, int, int]]:
    """Every pair (i, j, distance) with i < j, ``groups[i] != groups[j]`` and Hamming distance <= ``max_distance``,
    sorted by (i, j). Pass sources as groups to find pairs across sources, splits to find pairs across splits."""
    if len(hashes) != len(groups):
        raise ValueError(f"{len(hashes)} hashes but {len(groups)} groups")
    if not 0 <= max_distance < HASH_BITS:
        raise ValueError(f"max_distance must be in [0, {HASH_BITS - 1}], got {max_distance}")
    values = np.array([int(h) for h in hashes], dtype=np.uint64)
    _, codes = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    pairs: list[tuple[int, int, int]] = []
    for start in range(0, len(values), _CHUNK):
        block = values[start:start + _CHUNK]
        distance = np.bitwise_count(block[:, None] ^ values[None, :])
        rows = np.arange(start, start + len(block))
        later = rows[:, None] < np.arange(len(values))[None, :]
        close = (distance <= max_distance) & (codes[rows][:, None] != codes[None, :]) & later
        for i, j in zip(*np.nonzero(close)):
            pairs.append((int(rows[i]), int(j), int(distance[i, j])))
    return pairs


def pair_counts(pairs: Sequence[tuple[int, int, int]], groups: Sequence[str]) -> dict[str, int]:
    """Pairs per pair of groups, keyed "a|b" with a < b (sorted by key)."""
    counts = Counter("|".join(sorted((str(groups[i]), str(groups[j])))) for i, j, _ in pairs)
    return dict(sorted(counts.items()))


def source_duplicates(ids: Sequence[str], sources: Sequence[str], images: Sequence[bytes],
                      max_distance: int = NEAR_DUPLICATE_BITS, examples: int = 10) -> dict:
    """Near-duplicate pairs across the sources of one dataset: their number, per pair of sources, and the first
    ``examples`` pairs (ids and distance), for a job's metrics."""
    pairs = near_duplicate_pairs(image_hashes(images, ids), sources, max_distance)
    return {"max_distance": max_distance, "images": len(ids), "pairs": len(pairs),
            "by_sources": pair_counts(pairs, sources),
            "examples": [{"a": ids[i], "b": ids[j], "distance": d} for i, j, d in pairs[:examples]]}
