"""curate, step 2: fit the curation model on the survey's sample, on the resources of the scoring pool.

1. ``coordinates_task``: the layer's K_act coordinates from the sample's reference documents (one task);
2. ``CacheActor``: the sample's activations at those coordinates, one cache shard per piece that holds sample
   documents (the actor pool, autoscaling like the scoring pool), under ``<attempt>/cache/``;
3. ``sae_task``: the TopK SAE trained by streaming from the cache (a task; GPU when the pool has one),
   its FVU on the held-out documents, idf, seed vectors and feature snippets; it saves the curation model and the
   fit's figures in the attempt folder.
"""

from __future__ import annotations

import numpy as np
import ray

from ray_jobs.data import actor_pool
from ray_jobs.pieces import items, read_corpus_piece
from ray_jobs.placement import claim
from shared.configs.curate import CurateConfig
from shared.curation.cache import ActivationCache, ActivationExtractor
from shared.curation.documents import Survey, as_text
from shared.curation.fit import Coordinates, FitResult, choose_coordinates, fit_from_cache, settings_from
from shared.curation.model import CurationModel
from shared.models import load_causal_lm
from shared.pieces import Piece
from shared.stage import Stage
from shared.storage import Storage


@ray.remote
def coordinates_task(cfg: CurateConfig, reference_texts: list[str]) -> Coordinates:
    """The layer's coordinates from the reference documents, on the resources of one actor (its GPU if it has one)."""
    import torch

    device = claim(cfg.stage_name, "coordinate task", cfg.runtime.gpus_per_actor, cfg.runtime.threads).device
    model, tokenizer = load_causal_lm(cfg.model, dtype=cfg.dtype, device=device, storage=cfg.storage)
    return choose_coordinates(model, tokenizer, reference_texts, settings_from(cfg),
                              torch.Generator().manual_seed(cfg.seed), log=lambda line: print(line, flush=True))


class CacheActor:
    """Writes the activation cache shard of every piece that holds documents of the SAE's sample."""

    def __init__(self, cfg: CurateConfig, pieces: list[Piece], coordinates: Coordinates, sample: dict[str, bool],
                 cache: str):
        self.cfg, self.sample, self.store = cfg, sample, Storage(cache, cfg.storage)
        self.pieces = {p.index: p for p in pieces}
        device = claim(cfg.stage_name, "cache actor", cfg.runtime.gpus_per_actor, cfg.runtime.threads).device
        self.extract = ActivationExtractor(cfg.model, coordinates.layer, coordinates.coords, cfg.max_tokens,
                                           cfg.skip_first_token, cfg.runtime.micro_batch, cfg.dtype, device,
                                           cfg.storage)
        self.extract.setup()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = []
        for item in (self.pieces[int(i)] for i in batch["piece"]):
            cols = read_corpus_piece(self.cfg, item)
            rows = [j for j, i in enumerate(cols["id"]) if str(i) in self.sample]
            ids = [str(cols["id"][j]) for j in rows]
            shard = self.extract(ids, [as_text(cols[self.cfg.text_column][j]) or "" for j in rows],
                                 [self.sample[i] for i in ids])
            names.append(shard.save(self.store, f"{item.key}.npz"))
        return {"shard": np.array(names, dtype=object)}


@ray.remote(max_retries=2)
def sae_task(cfg: CurateConfig, coordinates: Coordinates, cache: list[str], seed_texts: list[str],
             seed_ids: list[str], store_uri: str) -> None:
    """The SAE trained by streaming from the cache, then everything scoring needs, on the resources of one actor
    (its GPU when the pool has GPUs); the curation model and the fit's figures go to the attempt folder. (A Ray task:
    one process trains, so Ray Train's controller and worker group would only add start-up time.)"""
    device = claim(cfg.stage_name, "sae task", cfg.runtime.gpus_per_actor, cfg.runtime.threads).device
    model, tokenizer = load_causal_lm(cfg.model, dtype=cfg.dtype, device=device, storage=cfg.storage)
    fit = fit_from_cache(model, tokenizer, coordinates, ActivationCache(cache, cfg.storage), seed_texts,
                         settings_from(cfg), log=lambda line: print(line, flush=True))
    store = Storage(store_uri, cfg.storage)
    CurationModel.from_fit(fit, cfg.model, settings_from(cfg), seed_ids).save(store)
    store.write_json({"history": fit.history, "fvu": fit.fvu, "dead_fraction": fit.dead_fraction,
                      "features": fit.features, "stats": fit.stats}, "fit.json")


def fit(cfg: CurateConfig, stage: Stage, pieces: list[Piece], found: Survey, seed_texts: list[str],
        seed_ids: list[str]) -> tuple[FitResult, CurationModel]:
    """Coordinates (a task), the activation cache (the actor pool), the SAE and the rest (a task)."""
    r = cfg.runtime
    coordinates = ray.get(coordinates_task.options(num_cpus=max(1.0, r.cpus_per_actor), num_gpus=r.gpus_per_actor)
                          .remote(cfg, found.texts))
    sample = found.heldout(cfg.sae.heldout_fraction, cfg.seed)
    holding = sorted(set(found.pieces))
    cache = stage.store.child("cache")
    shards = items([p for p in pieces if p.index in holding]).map_batches(
        CacheActor, fn_constructor_kwargs={"cfg": cfg, "pieces": pieces, "coordinates": coordinates,
                                           "sample": sample, "cache": cache.uri()},
        compute=actor_pool(r), batch_size=1, num_cpus=r.cpus_per_actor, num_gpus=r.gpus_per_actor or None)
    uris = sorted(str(row["shard"]) for row in shards.iter_rows())
    ray.get(sae_task.options(num_cpus=max(1.0, r.cpus_per_actor), num_gpus=r.gpus_per_actor)
            .remote(cfg, coordinates, uris, seed_texts, seed_ids, stage.store.uri()))
    curation = CurationModel.load(stage.store)
    figures = stage.store.read_json("fit.json")
    return FitResult(layer=curation.layer, coords=curation.coords, coordinate_scores=curation.coordinate_scores,
                     sae=curation.sae, history=figures["history"], fvu=figures["fvu"],
                     dead_fraction=figures["dead_fraction"], idf=curation.idf, token_idf=curation.token_idf,
                     seeds=curation.seeds,
                     features=figures["features"], stats=figures["stats"]), curation
