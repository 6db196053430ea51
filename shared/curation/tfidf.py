"""TF-IDF max-cosine retrieval, the strongest simple bar for seed-based selection: hashed unigrams and bigrams,
sublinear term frequency (1 + log tf), smoothed idf fitted on the pool (log((1 + N) / (1 + df)) + 1), L2-normalised
rows, and each document scored by its largest cosine to a seed. Sparse (scipy), so 2**20 buckets cost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse

from shared.curation.ngram import ngram_buckets

BUCKETS = 1 << 20
"""Hash buckets: enough that unigrams and bigrams of a large pool rarely collide."""


def term_counts(texts: list[str], buckets: int = BUCKETS) -> sparse.csr_matrix:
    """[N, buckets] counts of hashed unigrams and bigrams."""
    rows, cols = [], []
    for i, text in enumerate(texts):
        ids = ngram_buckets(text, buckets)
        rows.append(np.full(len(ids), i, dtype=np.int64))
        cols.append(ids)
    r = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
    counts = sparse.csr_matrix((np.ones(len(r), dtype=np.float32), (r, c)), shape=(len(texts), buckets))
    counts.sum_duplicates()
    return counts


@dataclass
class TfidfModel:
    """The idf of every bucket, fitted on a pool."""

    idf: np.ndarray
    buckets: int = BUCKETS

    @classmethod
    def fit(cls, pool_counts: sparse.csr_matrix) -> TfidfModel:
        n = pool_counts.shape[0]
        df = np.bincount(pool_counts.indices, minlength=pool_counts.shape[1])
        return cls(idf=(np.log((1.0 + n) / (1.0 + df)) + 1.0).astype(np.float32), buckets=pool_counts.shape[1])

    def transform(self, counts: sparse.csr_matrix) -> sparse.csr_matrix:
        """Sublinear tf times idf, each row L2-normalised (an empty row stays zero)."""
        weighted = counts.copy().astype(np.float32)
        weighted.data = (1.0 + np.log(weighted.data)) * self.idf[weighted.indices]
        norms = np.sqrt(np.asarray(weighted.multiply(weighted).sum(axis=1)).ravel())
        return sparse.diags(1.0 / np.maximum(norms, 1e-12)) @ weighted


def max_cosine(documents: sparse.csr_matrix, seeds: sparse.csr_matrix) -> np.ndarray:
    """[N] the largest cosine of each (normalised) document row to a (normalised) seed row."""
    return np.asarray((documents @ seeds.T).max(axis=1).todense()).ravel().astype(np.float64)
