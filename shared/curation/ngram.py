"""Baselines that need no model: hashed uni+bigram importance resampling in the style of DSIR (Xie et al., 2023),
and uniform random selection.

DSIR: with hashed n-gram counts c_x(h) of a document, bucket distributions of the target (the seeds) and of the raw
pool are estimated with add-alpha smoothing; log w(x) = sum_h c_x(h) (log p_target(h) - log p_raw(h)), and M
documents are drawn without replacement with probability proportional to w by Gumbel top-k. Hashes and Gumbel noise
are derived from stable digests of the text and document id, so results do not depend on how the corpus is split.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

WORD = re.compile(r"[a-z0-9]+")


def _bucket(token: str, buckets: int) -> int:
    return int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "little") % buckets


def ngram_buckets(text: str, buckets: int) -> np.ndarray:
    """The hash bucket of every unigram and bigram of the lower-cased words of ``text`` (int64, with repeats)."""
    words = WORD.findall(text.lower())
    tokens = words + [f"{a} {b}" for a, b in zip(words, words[1:])]
    return np.fromiter((_bucket(t, buckets) for t in tokens), dtype=np.int64, count=len(tokens))


def hashed_ngrams(text: str, buckets: int) -> np.ndarray:
    """Counts of hashed unigrams and bigrams of the lower-cased words of ``text`` ([buckets] float32)."""
    return np.bincount(ngram_buckets(text, buckets), minlength=buckets).astype(np.float32)


def log_distribution(counts: np.ndarray, alpha: float) -> np.ndarray:
    smoothed = counts.astype(np.float64) + alpha
    return np.log(smoothed / smoothed.sum())


def log_importance(doc_counts: np.ndarray, log_target: np.ndarray, log_raw: np.ndarray) -> np.ndarray:
    """[N] log importance weights of documents given their [N, buckets] counts."""
    return doc_counts.astype(np.float64) @ (log_target - log_raw)


def stable_uniform(keys: list[str], seed: int) -> np.ndarray:
    """A uniform(0,1) number per key, the same in every process and for every partitioning."""
    out = np.empty(len(keys), dtype=np.float64)
    for i, key in enumerate(keys):
        digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
        out[i] = (int.from_bytes(digest, "little") + 0.5) / 2.0**64
    return out


def gumbel_keys(log_weights: np.ndarray, keys: list[str], seed: int) -> np.ndarray:
    """Gumbel-perturbed log weights: top-k of these is sampling without replacement proportional to the weights."""
    return log_weights - np.log(-np.log(stable_uniform(keys, seed)))
