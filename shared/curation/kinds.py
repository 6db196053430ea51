"""Names that curation's torch modules and its torch-free ones (selection, documents) share."""

from __future__ import annotations

from typing import Literal

KINDS = ("sae", "sae_idf", "dense")
"""Document vectors compared with the seeds': pooled SAE codes as the method defines them, the same codes
re-weighted by latent idf, and the mean-pooled hidden state (the dense baseline)."""

Mode = Literal["global", "per_seed"]
"""Selection over the whole pool (``global``) or each seed's own top M (``per_seed``)."""
