"""From text to the vectors curation compares: token ids, layer activations, pooled SAE codes and pooled hidden states.

:class:`Embedder` is what one worker holds (the truncated model, the selected coordinates, the SAE, the seed
vectors); :func:`fit_curation` is the once-per-job step on a corpus sample that produces those (coordinates, SAE,
seed vectors, centring mean, the SAE features the seeds use most).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from shared.curation.activations import (
    default_layer,
    hidden_states,
    jvp_sensitivity,
    select_coordinates,
    statistic_scores,
    token_mask,
    truncate_to_layer,
)
from shared.curation.retrieval import mean_pool, seed_similarities
from shared.curation.sae import (
    SAEShape,
    TopKSAE,
    TrainSettings,
    idf_codes,
    idf_weights,
    pooled_codes,
    train_sae,
)
from shared.errors import DataError
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


KINDS = ("sae", "sae_idf", "dense")
"""Document vectors compared with the seeds': pooled SAE codes as the method defines them, the same codes
re-weighted by latent idf, and the mean-pooled hidden state (the dense baseline)."""


@dataclass
class Embedder:
    """Truncated model + coordinates + SAE + seed vectors: scores token-id lists against the seeds."""

    base: torch.nn.Module
    pad_id: int
    coords: torch.Tensor
    sae: TopKSAE
    skip_first: bool
    idf: torch.Tensor
    seeds: dict[str, torch.Tensor] = field(default_factory=dict)

    @torch.inference_mode()
    def pooled(self, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean-pooled SAE codes [B, n_latents], mean-pooled hidden states [B, H]), not normalised, on the CPU."""
        device = next(self.base.parameters()).device
        input_ids, attention = (t.to(device) for t in pad_batch(ids, self.pad_id))
        hidden = hidden_states(self.base, input_ids, attention)
        mask = token_mask(attention, self.skip_first)
        mask = torch.where(mask.any(dim=1, keepdim=True), mask, attention.bool())  # one-token documents
        codes = pooled_codes(self.sae.to(device), hidden[..., self.coords.to(device)].float(), mask, normalise=False)
        return codes.cpu(), mean_pool(hidden.float(), mask).cpu()

    def vectors(self, ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """Every kind of document vector for one micro-batch."""
        codes, dense = self.pooled(ids)
        return {"sae": torch.nn.functional.normalize(codes, dim=-1), "sae_idf": idf_codes(codes, self.idf),
                "dense": dense}

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


# ---------------------------------------------------------------------------------------------------------------------
# Fitting on a sample


@dataclass
class FitSettings:
    layer: int | None
    max_tokens: int
    skip_first: bool
    selector: str
    k_act: int
    probes: int
    reference_docs: int
    reference_tokens: int
    sae_k: int
    expansion: int
    aux_k: int | None
    dead_tokens: int
    train: TrainSettings
    micro_batch: int = 8
    top_features: int = 8
    snippets_per_feature: int = 3


@dataclass
class FitResult:
    layer: int
    coords: np.ndarray
    coordinate_scores: np.ndarray
    sae: TopKSAE
    history: list[dict[str, float]]
    fvu: float
    dead_fraction: float
    idf: np.ndarray
    seeds: dict[str, np.ndarray]
    features: list[dict[str, Any]]
    stats: dict[str, Any] = field(default_factory=dict)


def fit_curation(model: Any, tokenizer: Any, sample_texts: list[str], seed_texts: list[str], settings: FitSettings,
                 generator: torch.Generator, log: Log = print) -> FitResult:
    """Choose coordinates, train the SAE on the sample's activations, embed the seeds."""
    if not sample_texts:
        raise DataError("the corpus sample for SAE training is empty")
    if not seed_texts:
        raise DataError("no seed examples")
    num_layers = len(model.model.layers)
    layer = default_layer(num_layers) if settings.layer is None else settings.layer
    base = truncate_to_layer(model, layer)
    device = next(base.parameters()).device
    pad_id = tokenizer.pad_token_id
    stats: dict[str, Any] = {}

    # 1. coordinates
    started = time.perf_counter()
    sample = tokenize(tokenizer, sample_texts, settings.max_tokens)
    hidden_size = base.config.hidden_size
    if settings.selector == "jvp":
        ref_ids = [ids[: settings.reference_tokens] for ids in sample.ids[: settings.reference_docs]]
        scores = torch.zeros(hidden_size)
        for group in length_batches([len(x) for x in ref_ids], max(1, settings.micro_batch // 2)):
            input_ids, attention = (t.to(device) for t in pad_batch([ref_ids[i] for i in group], pad_id))
            scores += jvp_sensitivity(base, input_ids, attention, settings.probes, generator,
                                      settings.skip_first).cpu() * len(group)
        scores /= len(ref_ids)
        stats["jvp_seconds"] = round(time.perf_counter() - started, 2)
        log(f"jvp sensitivity: {len(ref_ids)} documents x {settings.probes} probes in {stats['jvp_seconds']} s")

    # 2. activations of the sample (all counted tokens)
    token_acts = []
    with torch.inference_mode():
        for group in length_batches([len(x) for x in sample.ids], settings.micro_batch):
            input_ids, attention = (t.to(device) for t in pad_batch([sample.ids[i] for i in group], pad_id))
            hidden = hidden_states(base, input_ids, attention).float()
            token_acts.append(hidden[token_mask(attention, settings.skip_first)].cpu())
    acts = torch.cat(token_acts)
    stats.update(sample_docs=len(sample.ids), sample_tokens=int(acts.shape[0]),
                 sample_truncated=int(sum(sample.truncated)))
    log(f"activations: {acts.shape[0]} tokens from {len(sample.ids)} sample documents at layer {layer}")
    if settings.selector != "jvp":
        scores = statistic_scores(acts, settings.selector)  # type: ignore[arg-type]
    k_act = hidden_size if settings.selector == "all" else settings.k_act
    coords = select_coordinates(scores, k_act)

    # 3. SAE on the selected coordinates
    n_latents = settings.expansion * k_act
    aux_k = settings.aux_k if settings.aux_k is not None else min(512, n_latents // 2)
    shape = SAEShape(d_in=k_act, n_latents=n_latents, k=min(settings.sae_k, n_latents), aux_k=aux_k,
                     dead_tokens=settings.dead_tokens)
    trained = train_sae(acts[:, coords], shape, settings.train, log=log)

    # 4. latent idf over the sample, then the seeds, through the same embedder the workers use
    embedder = Embedder(base=base, pad_id=pad_id, coords=coords, sae=trained.sae, skip_first=settings.skip_first,
                        idf=torch.zeros(n_latents))
    sample_codes = torch.cat([embedder.pooled([sample.ids[i] for i in group])[0]
                              for group in length_batches([len(x) for x in sample.ids], settings.micro_batch)])
    embedder.idf = idf_weights(sample_codes)
    seeds = tokenize(tokenizer, seed_texts, settings.max_tokens)
    seed_vectors: dict[str, list[tuple[int, torch.Tensor]]] = {kind: [] for kind in KINDS}
    for group in length_batches([len(x) for x in seeds.ids], settings.micro_batch):
        for kind, vec in embedder.vectors([seeds.ids[i] for i in group]).items():
            seed_vectors[kind] += list(zip(group, vec))
    embedder.seeds = {kind: torch.stack([v for _, v in sorted(pairs, key=lambda p: p[0])])
                      for kind, pairs in seed_vectors.items()}

    features = seed_features(embedder, tokenizer, sample.ids, sample_codes, settings)
    return FitResult(layer=layer, coords=coords.numpy(), coordinate_scores=scores.numpy(), sae=trained.sae,
                     history=trained.history, fvu=trained.fvu, dead_fraction=trained.dead_fraction,
                     idf=embedder.idf.numpy(), seeds={k: v.numpy() for k, v in embedder.seeds.items()},
                     features=features, stats=stats)


@torch.inference_mode()
def seed_features(embedder: Embedder, tokenizer: Any, sample_ids: list[list[int]], sample_codes: torch.Tensor,
                  settings: FitSettings) -> list[dict[str, Any]]:
    """The SAE latents the seeds use most (relative to the corpus sample), each with its top-activating snippets."""
    seed_codes = embedder.seeds["sae"]
    corpus_mean = sample_codes.mean(dim=0)
    seed_mean = seed_codes.mean(dim=0)
    lift = seed_mean / (corpus_mean + 1e-3 * float(corpus_mean.max().clamp_min(1e-6)))
    chosen = [int(i) for i in torch.topk(seed_mean * torch.log1p(lift), settings.top_features).indices
              if seed_mean[i] > 0]
    best: dict[int, list[tuple[float, int, int]]] = {latent: [] for latent in chosen}
    device = next(embedder.base.parameters()).device
    for group in length_batches([len(x) for x in sample_ids], settings.micro_batch):
        input_ids, attention = (t.to(device) for t in pad_batch([sample_ids[i] for i in group], embedder.pad_id))
        hidden = hidden_states(embedder.base, input_ids, attention)
        mask = token_mask(attention, embedder.skip_first).cpu()
        codes = embedder.sae.to(device).dense_codes(hidden[..., embedder.coords.to(device)].float()).cpu()
        codes = codes * mask.unsqueeze(-1)
        for latent in chosen:
            acts = codes[..., latent]
            top = torch.topk(acts.flatten(), min(settings.snippets_per_feature, acts.numel()))
            for value, flat in zip(top.values.tolist(), top.indices.tolist()):
                if value > 0:
                    best[latent].append((value, group[flat // acts.shape[1]], flat % acts.shape[1]))
    features = []
    for latent in chosen:
        snippets = []
        for value, doc, pos in sorted(best[latent], reverse=True)[: settings.snippets_per_feature]:
            ids = sample_ids[doc]
            snippets.append({"activation": round(value, 3), "left": tokenizer.decode(ids[max(0, pos - 8): pos]),
                             "token": tokenizer.decode(ids[pos: pos + 1]),
                             "right": tokenizer.decode(ids[pos + 1: pos + 5])})
        features.append({"latent": latent, "seed_mean": float(seed_mean[latent]),
                         "corpus_mean": float(corpus_mean[latent]), "snippets": snippets})
    return features


def settings_from(cfg: Any) -> FitSettings:
    """FitSettings from a CurateConfig (kept here so the job and the benchmark build them the same way)."""
    return FitSettings(
        layer=cfg.layer, max_tokens=cfg.max_tokens, skip_first=cfg.skip_first_token,
        selector=cfg.coordinates.selector, k_act=cfg.coordinates.k, probes=cfg.coordinates.probes,
        reference_docs=cfg.coordinates.reference_docs, reference_tokens=cfg.coordinates.reference_tokens,
        sae_k=cfg.sae.k, expansion=cfg.sae.expansion, aux_k=cfg.sae.aux_k, dead_tokens=cfg.sae.dead_tokens,
        train=TrainSettings(steps=cfg.sae.steps, batch_size=cfg.sae.batch_size, lr=cfg.sae.lr,
                            aux_alpha=cfg.sae.aux_alpha, l1=cfg.sae.l1, seed=cfg.seed),
        micro_batch=cfg.runtime.micro_batch,
    )
