"""Fitting a curation model on a corpus sample, in three steps that can run on different workers:

1. :func:`choose_coordinates` on a small reference sample: the layer and the K_act coordinates (JVP sensitivity to
   the input embeddings, or an activation statistic);
2. the activation cache (``shared.curation.cache``): the sample's activations at those coordinates, as shards;
3. :func:`fit_from_cache`: the TopK SAE trained by streaming from the cache, its FVU on the held-out documents,
   latent idf and the corpus mean code over the sample, the seed vectors, and the SAE features the seeds use most.

:func:`fit_curation` runs all three in one process on an in-memory sample (tests, benchmarks, small corpora).
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
from shared.curation.cache import ActivationCache, ActivationExtractor
from shared.curation.features import KINDS, Embedder, length_batches, pad_batch, tokenize
from shared.curation.sae import FVU, SAEShape, TopKSAE, TrainSettings, token_idf, train_sae
from shared.errors import DataError

Log = Callable[[str], None]


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
class Coordinates:
    layer: int
    coords: np.ndarray
    """[K_act] selected hidden coordinates (sorted)."""
    scores: np.ndarray
    """[H] the selector's score of every coordinate."""
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class FitResult:
    layer: int
    coords: np.ndarray
    coordinate_scores: np.ndarray
    sae: TopKSAE
    history: list[dict[str, float]]
    fvu: float
    """On the held-out documents of the sample (on the training rows when none is held out)."""
    dead_fraction: float
    idf: np.ndarray
    token_idf: np.ndarray
    """[n_latents] idf from per-token firing rates over the sample (``sae_tfidf``)."""
    seeds: dict[str, np.ndarray]
    features: list[dict[str, Any]]
    stats: dict[str, Any] = field(default_factory=dict)


def choose_coordinates(model: Any, tokenizer: Any, reference_texts: list[str], settings: FitSettings,
                       generator: torch.Generator, log: Log = print) -> Coordinates:
    """The layer and its K_act coordinates, scored on the first ``reference_docs`` texts."""
    if not reference_texts:
        raise DataError("the corpus sample for SAE training is empty")
    layer = default_layer(len(model.model.layers)) if settings.layer is None else settings.layer
    base = truncate_to_layer(model, layer)
    device = next(base.parameters()).device
    started = time.perf_counter()
    ids = tokenize(tokenizer, reference_texts[: settings.reference_docs], settings.max_tokens).ids
    hidden_size = base.config.hidden_size
    stats: dict[str, Any] = {}
    if settings.selector == "jvp":
        ref_ids = [x[: settings.reference_tokens] for x in ids]
        scores = torch.zeros(hidden_size)
        for group in length_batches([len(x) for x in ref_ids], max(1, settings.micro_batch // 2)):
            input_ids, attention = (t.to(device) for t in pad_batch([ref_ids[i] for i in group],
                                                                    tokenizer.pad_token_id))
            scores += jvp_sensitivity(base, input_ids, attention, settings.probes, generator,
                                      settings.skip_first).cpu() * len(group)
        scores /= len(ref_ids)
    else:
        rows = []
        with torch.inference_mode():
            for group in length_batches([len(x) for x in ids], settings.micro_batch):
                input_ids, attention = (t.to(device) for t in pad_batch([ids[i] for i in group],
                                                                        tokenizer.pad_token_id))
                hidden = hidden_states(base, input_ids, attention).float()
                rows.append(hidden[token_mask(attention, settings.skip_first)].cpu())
        scores = statistic_scores(torch.cat(rows), settings.selector)  # type: ignore[arg-type]
    stats["coordinate_seconds"] = round(time.perf_counter() - started, 2)
    log(f"coordinates ({settings.selector}): {len(ids)} reference documents in {stats['coordinate_seconds']} s")
    k_act = hidden_size if settings.selector == "all" else settings.k_act
    return Coordinates(layer, select_coordinates(scores, k_act).numpy(), scores.numpy(), stats)


def fit_from_cache(model: Any, tokenizer: Any, coordinates: Coordinates, cache: ActivationCache,
                   seed_texts: list[str], settings: FitSettings, log: Log = print) -> FitResult:
    """Train the SAE from the cache and derive everything scoring needs (see the module doc)."""
    if not seed_texts:
        raise DataError("no seed examples")
    base = truncate_to_layer(model, coordinates.layer)
    device = next(base.parameters()).device
    k_act = len(coordinates.coords)
    n_latents = settings.expansion * k_act
    aux_k = settings.aux_k if settings.aux_k is not None else min(512, n_latents // 2)
    shape = SAEShape(d_in=k_act, n_latents=n_latents, k=min(settings.sae_k, n_latents), aux_k=aux_k,
                     dead_tokens=settings.dead_tokens)
    rows = cache.moments()[0]
    log(f"activation cache: {rows} training tokens in {len(cache.shards)} shard(s), layer {coordinates.layer}")
    started = time.perf_counter()
    trained = train_sae(cache, shape, settings.train, log=log, device=device)
    train_seconds = time.perf_counter() - started
    sae = trained.sae
    train_fvu, heldout_fvu = FVU(), FVU()
    for x in cache.rows(heldout=False):
        train_fvu.add(sae, x.to(device))
    for x in cache.rows(heldout=True):
        heldout_fvu.add(sae, x.to(device))
    fvu = heldout_fvu.value if heldout_fvu.value is not None else train_fvu.value

    # latent idf and the mean pooled code over the sample's documents (held-out ones included)
    documents, fired, code_sum = 0, torch.zeros(n_latents), torch.zeros(n_latents)
    tokens, token_fires = 0, torch.zeros(n_latents)
    with torch.inference_mode():
        for shard in cache:
            pooled = _pooled_by_document(sae, shard, device)
            documents += pooled.shape[0]
            fired += (pooled > 0).sum(dim=0).float()
            code_sum += pooled.sum(dim=0)
            tokens += len(shard.acts)
            token_fires += _token_fires(sae, shard, device)
    idf = torch.log(max(documents, 1) / (1.0 + fired)).clamp_min(0.0)
    by_token = token_idf(token_fires, tokens)
    corpus_mean = code_sum / max(documents, 1)

    embedder = Embedder(base=base, pad_id=tokenizer.pad_token_id, coords=torch.as_tensor(coordinates.coords),
                        sae=sae, skip_first=settings.skip_first, idf=idf, token_idf=by_token)
    seeds = tokenize(tokenizer, seed_texts, settings.max_tokens)
    seed_vectors: dict[str, list[tuple[int, torch.Tensor]]] = {kind: [] for kind in KINDS}
    for group in length_batches([len(x) for x in seeds.ids], settings.micro_batch):
        for kind, vec in embedder.vectors([seeds.ids[i] for i in group]).items():
            seed_vectors[kind] += list(zip(group, vec))
    embedder.seeds = {kind: torch.stack([v for _, v in sorted(pairs, key=lambda p: p[0])])
                      for kind, pairs in seed_vectors.items()}
    features = seed_features(embedder, tokenizer, cache, corpus_mean, settings, device)
    held_rows = sum(int(len(s.rows(heldout=True))) for s in cache)
    stats = {**coordinates.stats, "sample_docs": documents, "sample_tokens": rows + held_rows,
             "train_tokens": rows, "heldout_tokens": held_rows, "train_fvu": train_fvu.value,
             "heldout_fvu": heldout_fvu.value, "sae_seconds": round(train_seconds, 2),
             "sae_tokens_per_s": round(settings.train.steps * settings.train.batch_size / max(train_seconds, 1e-9))}
    return FitResult(layer=coordinates.layer, coords=coordinates.coords, coordinate_scores=coordinates.scores,
                     sae=sae, history=trained.history, fvu=float(fvu or 0.0), dead_fraction=trained.dead_fraction,
                     idf=idf.numpy(), token_idf=by_token.numpy(),
                     seeds={k: v.numpy() for k, v in embedder.seeds.items()}, features=features,
                     stats=stats)


def _token_fires(sae: TopKSAE, shard: Any, device: Any, chunk: int = 8192) -> torch.Tensor:
    """[n_latents] tokens of a shard on which each latent fires."""
    fires = torch.zeros(sae.shape.n_latents)
    for start in range(0, len(shard.acts), chunk):
        values, indices = sae.encode(torch.from_numpy(shard.acts[start: start + chunk]).to(device))
        fires += torch.bincount(indices[values > 0].cpu().reshape(-1), minlength=sae.shape.n_latents).float()
    return fires


def _pooled_by_document(sae: TopKSAE, shard: Any, device: Any, chunk: int = 8192) -> torch.Tensor:
    """[D', n_latents] mean SAE code of each document of a shard that has counted tokens."""
    n_docs = len(shard.doc_ids)
    pooled = torch.zeros(n_docs, sae.shape.n_latents)
    for start in range(0, len(shard.acts), chunk):
        x = torch.from_numpy(shard.acts[start: start + chunk]).to(device)
        values, indices = sae.encode(x)
        doc = torch.from_numpy(shard.doc[start: start + chunk].astype(np.int64))
        flat = (doc[:, None] * sae.shape.n_latents + indices.cpu()).reshape(-1)
        pooled.view(-1).scatter_add_(0, flat, values.cpu().float().reshape(-1))
    counts = np.bincount(shard.doc, minlength=n_docs)
    present = torch.from_numpy(np.flatnonzero(counts))
    return pooled[present] / torch.from_numpy(counts[counts > 0]).float().unsqueeze(1)


@torch.inference_mode()
def seed_features(embedder: Embedder, tokenizer: Any, cache: ActivationCache, corpus_mean: torch.Tensor,
                  settings: FitSettings, device: Any) -> list[dict[str, Any]]:
    """The SAE latents the seeds use most (relative to the corpus sample), each with its top-activating snippets."""
    seed_codes = embedder.seeds["sae"]
    seed_mean = seed_codes.mean(dim=0)
    lift = seed_mean / (corpus_mean + 1e-3 * float(corpus_mean.max().clamp_min(1e-6)))
    chosen = [int(i) for i in torch.topk(seed_mean * torch.log1p(lift), settings.top_features).indices
              if seed_mean[i] > 0]
    best: dict[int, list[tuple[float, dict[str, Any]]]] = {latent: [] for latent in chosen}
    keep = settings.snippets_per_feature
    for shard in cache:
        if not len(shard.acts) or not chosen:
            continue
        codes = embedder.sae.dense_codes(torch.from_numpy(shard.acts).to(device))[:, chosen].cpu()
        for j, latent in enumerate(chosen):
            top = torch.topk(codes[:, j], min(keep, codes.shape[0]))
            for value, row in zip(top.values.tolist(), top.indices.tolist()):
                if value <= 0 or (len(best[latent]) >= keep and value <= best[latent][-1][0]):
                    continue
                ids, pos = shard.doc_tokens(int(shard.doc[row])), int(shard.pos[row])
                snippet = {"activation": round(value, 3), "left": tokenizer.decode(ids[max(0, pos - 8): pos]),
                           "token": tokenizer.decode(ids[pos: pos + 1]),
                           "right": tokenizer.decode(ids[pos + 1: pos + 5])}
                best[latent] = sorted(best[latent] + [(value, snippet)], key=lambda p: -p[0])[:keep]
    return [{"latent": latent, "seed_mean": float(seed_mean[latent]), "corpus_mean": float(corpus_mean[latent]),
             "snippets": [s for _, s in best[latent]]} for latent in chosen]


def fit_curation(model: Any, tokenizer: Any, sample_texts: list[str], seed_texts: list[str], settings: FitSettings,
                 generator: torch.Generator, log: Log = print, heldout: list[bool] | None = None) -> FitResult:
    """All three steps in this process on an in-memory sample (``heldout`` marks documents kept out of training)."""
    if not sample_texts:
        raise DataError("the corpus sample for SAE training is empty")
    coordinates = choose_coordinates(model, tokenizer, sample_texts, settings, generator, log)
    extract = ActivationExtractor("", coordinates.layer, coordinates.coords, settings.max_tokens,
                                  settings.skip_first, settings.micro_batch)
    extract.setup(model, tokenizer)
    shard = extract([f"sample-{i}" for i in range(len(sample_texts))], sample_texts,
                    heldout or [False] * len(sample_texts))
    return fit_from_cache(model, tokenizer, coordinates, ActivationCache([shard]), seed_texts, settings, log)


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

