"""Names that curation's torch modules and its torch-free ones (selection, documents) share."""

from __future__ import annotations

from typing import Literal

KINDS = ("sae", "sae_idf", "sae_max", "sae_tfidf", "dense")
"""Document vectors compared with the seeds': mean-pooled SAE codes as the method defines them (``sae``), the same
codes re-weighted by document-frequency idf (``sae_idf``), max-pooled codes (``sae_max``), binarised firing shares
weighted by an idf from per-token firing rates (``sae_tfidf``), and the mean-pooled hidden state (``dense``, the
baseline)."""

SAE_KINDS = tuple(k for k in KINDS if k.startswith("sae"))
"""The kinds that are FineScope's method (SAE codes, pooled one way or another): each is always measured."""

Mode = Literal["global", "per_seed"]
"""Selection over the whole pool (``global``) or each seed's own top M (``per_seed``)."""
