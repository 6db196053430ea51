"""Perceptual hashes and near-duplicate removal, in numpy.

    h = phash(pixels)                                  # 64-bit DCT hash of an image (as a Python int)
    twins = near_duplicates(hashes, max_distance=6)    # [None, 0, ...]: index of the earlier image it duplicates

pHash: the image as 32x32 luma (box-filtered), its 2-D DCT, the 8x8 lowest frequencies without the DC term's
influence on the threshold: each bit says whether a coefficient is above their median. Re-encoding, mild blur,
small brightness changes and resizing move only a few bits; different images differ in about half of them.

Duplicates are found without comparing every pair: two hashes within distance d agree exactly on at least one of
d + 1 disjoint bands of bits (pigeonhole), so only hashes sharing a band value are compared. Among near duplicates
the first in the given order (the caller sorts by id) is kept.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from PIL import Image

HASH_BITS = 64
_N = 32


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_DCT = _dct_matrix(_N)


def phash(image: np.ndarray) -> int:
    """64-bit perceptual hash of an HxWx3 (or HxW) uint8 image."""
    pil = Image.fromarray(np.asarray(image)).convert("L").resize((_N, _N), Image.Resampling.BOX)
    pixels = np.asarray(pil, dtype=np.float64)
    coeffs = (_DCT @ pixels @ _DCT.T)[:8, :8].ravel()
    bits = coeffs > np.median(coeffs[1:])  # the DC term is left out of the threshold
    bits[0] = False
    value = 0
    for bit in bits:
        value = (value << 1) | int(bit)
    return value


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def near_duplicates(hashes: list[int], max_distance: int) -> list[int | None]:
    """For each item in the given order: None when it is kept, else the index of the earlier kept item within
    ``max_distance`` bits of it (the first such in order).

    Exact: every pair within the distance is found (the band index only prunes pairs that cannot be that close).
    """
    if not 0 <= max_distance < HASH_BITS:
        raise ValueError(f"max_distance must be in [0, {HASH_BITS - 1}]")
    bands = max_distance + 1
    edges = [int(e) for e in np.linspace(0, HASH_BITS, bands + 1).round()]
    masks = [((1 << (hi - lo)) - 1) << lo for lo, hi in zip(edges[:-1], edges[1:])]
    index: list[defaultdict[int, list[int]]] = [defaultdict(list) for _ in range(bands)]
    twins: list[int | None] = [None] * len(hashes)
    for i, h in enumerate(hashes):
        candidates = {j for band, mask in enumerate(masks) for j in index[band].get(h & mask, ())}
        close = [j for j in candidates if hamming(h, hashes[j]) <= max_distance]
        if close:
            twins[i] = min(close)
            continue
        for band, mask in enumerate(masks):
            index[band][h & mask].append(i)
    return twins
