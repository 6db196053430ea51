"""From text to the vectors curation compares: token ids, layer activations, pooled SAE codes and pooled hidden states.

:class:`Embedder` is what one worker holds (the truncated model, the selected coordinates, the SAE, the seed
vectors); :func:`fit_curation` is the once-per-job step on a corpus sample that produces those (coordinates, SAE,
seed vectors, centring mean, the SAE features the seeds use most).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from shared.curation.activations import (
    hidden_states,
    token_mask,
)
from shared.curation.kinds import KINDS
from shared.curation.retrieval import mean_pool, seed_similarities
from shared.curation.sae import (
    PooledViews,
    TopKSAE,
    firing_tfidf,
    idf_codes,
    pooled_views,
)
from shared.tokens import cap_text

Log = Callable[[str], None]


# ---------------------------------------------------------------------------------------------------------------------
# Tokens


@dataclass
class Tokenized:
    ids: list[list[int]]
    truncated: list[bool]


def tokenize(tokenizer: Any, texts: list[str], max_tokens: int) -> Tokenized:
    """Token ids per text, cut to ``max_tokens`` (the cut is recorded per text); a huge text is cut to a bounded
    number of characters before it reaches the tokenizer (``shared.tokens``)."""
    capped = [cap_text(t, max_tokens) for t in texts]
    encoded = tokenizer([t for t, _ in capped], add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    return Tokenized([ids[:max_tokens] for ids in encoded],
                     [len(ids) > max_tokens or cut for ids, (_, cut) in zip(encoded, capped)])


def pad_batch(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [B, T] ids and attention mask."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return input_ids, mask


def length_batches(lengths: list[int], size: int) -> list[list[int]]:
    """Positions grouped into micro-batches of similar length (longest first), so padding stays small."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i: i + size] for i in range(0, len(order), size)]


# ---------------------------------------------------------------------------------------------------------------------
# The per-worker embedder


def document_vectors(views: PooledViews, dense: torch.Tensor, idf: torch.Tensor,
                     token_idf: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every kind of document vector (:data:`KINDS`) from pooled codes and hidden states (the cosine normalises)."""
    normalize = torch.nn.functional.normalize
    return {"sae": normalize(views.mean, dim=-1), "sae_idf": idf_codes(views.mean, idf),
            "sae_max": normalize(views.max, dim=-1), "sae_tfidf": firing_tfidf(views.fired, token_idf),
            "dense": dense}


@dataclass
class Embedder:
    """Truncated model + coordinates + SAE + seed vectors: scores token-id lists against the seeds."""

    base: torch.nn.Module
    pad_id: int
    coords: torch.Tensor
    sae: TopKSAE
    skip_first: bool
    idf: torch.Tensor
    """[n_latents] document-frequency idf (``sae_idf``)."""
    token_idf: torch.Tensor
    """[n_latents] idf from per-token firing rates (``sae_tfidf``)."""
    seeds: dict[str, torch.Tensor] = field(default_factory=dict)

    @torch.inference_mode()
    def pooled(self, ids: list[list[int]]) -> tuple[PooledViews, torch.Tensor]:
        """(the SAE codes pooled three ways, mean-pooled hidden states [B, H]), not normalised, on the CPU."""
        device = next(self.base.parameters()).device
        input_ids, attention = (t.to(device) for t in pad_batch(ids, self.pad_id))
        hidden = hidden_states(self.base, input_ids, attention)
        mask = token_mask(attention, self.skip_first)
        mask = torch.where(mask.any(dim=1, keepdim=True), mask, attention.bool())  # one-token documents
        views = pooled_views(self.sae.to(device), hidden[..., self.coords.to(device)].float(), mask)
        cpu = PooledViews(mean=views.mean.cpu(), max=views.max.cpu(), fired=views.fired.cpu())
        return cpu, mean_pool(hidden.float(), mask).cpu()

    def vectors(self, ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """Every kind of document vector (:data:`KINDS`) for one micro-batch."""
        views, dense = self.pooled(ids)
        return document_vectors(views, dense, self.idf, self.token_idf)

    def embed(self, ids: list[list[int]], micro_batch: int) -> dict[str, np.ndarray]:
        """Every kind of document vector ([B, d] per kind, normalised) and the SAE firing shares (``fired``,
        [B, n_latents], for weights learned from a seed set later)."""
        out: dict[str, np.ndarray] = {}
        for group in length_batches([len(x) for x in ids], micro_batch):
            views, dense = self.pooled([ids[i] for i in group])
            vectors = {k: torch.nn.functional.normalize(v, dim=-1)
                       for k, v in document_vectors(views, dense, self.idf, self.token_idf).items()}
            for name, values in [*vectors.items(), ("fired", views.fired)]:
                if name not in out:
                    out[name] = np.zeros((len(ids), values.shape[1]), dtype=np.float32)
                out[name][group] = values.numpy()
        return out

    def score(self, ids: list[list[int]], micro_batch: int) -> dict[str, np.ndarray]:
        """Per document and kind: the best cosine to a seed (``<kind>_score``), which seed (``<kind>_seed``) and
        the similarity to every seed (``<kind>_seed_scores`` [B, S], for per-seed selection)."""
        n, s = len(ids), next(iter(self.seeds.values())).shape[0]
        out = {f"{kind}_seed_scores": np.zeros((n, s), dtype=np.float32) for kind in KINDS}
        for group in length_batches([len(x) for x in ids], micro_batch):
            for kind, vec in self.vectors([ids[i] for i in group]).items():
                out[f"{kind}_seed_scores"][group] = seed_similarities(vec, self.seeds[kind]).numpy()
        for kind in KINDS:
            sims = out[f"{kind}_seed_scores"]
            out[f"{kind}_score"] = sims.max(axis=1)
            out[f"{kind}_seed"] = sims.argmax(axis=1).astype(np.int32)
        return out
