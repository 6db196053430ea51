"""curate: SAE-guided domain curation over a corpus streamed by Ray Data.

    scopeforge run curate --config ray_jobs/configs/curate-demo.yaml

1. check the inputs (columns, sizes, layer) before any model work;
2. fit on a corpus sample, in one Ray task: coordinates, the TopK SAE, the seed vectors (a CurationModel);
3. score every document: read -> DocumentTokenizer (tasks) -> DocumentScorer (actor pool, the model loaded once
   per actor) -> Parquet shards of the stage;
4. select per method as a streaming reduce over the written shards (shared.curation.selection), write the subset,
   the curation model and the report.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.data

from ray_jobs.data import read_shards, read_source, require_columns, source_rows, write_shards
from ray_jobs.metrics import Throughput
from ray_jobs.placement import claim
from shared.configs.curate import CurateConfig
from shared.curation.curate_report import curate_metrics, summary_lines, write_report
from shared.curation.features import FitResult, fit_curation, settings_from
from shared.curation.model import CurationModel
from shared.curation.ngram import hashed_ngrams, log_distribution
from shared.curation.scoring import DocumentScorer, DocumentTokenizer, as_text, content_ids, ngram_counts
from shared.curation.seeds import load_seeds
from shared.curation.selection import (
    SEEDED,
    BlockSummary,
    Columns,
    CorpusCounts,
    SelectionPlan,
    finish,
    merge,
    plan_for,
    repeated_id,
    summarise_block,
)
from shared.data import resolve_dataset, write_parquet
from shared.errors import DataError
from shared.models import load_causal_lm, resolve_model
from shared.stage import Stage


@ray.remote
def fit_task(cfg: CurateConfig, sample_texts: list[str], seed_texts: list[str]) -> FitResult:
    """Coordinates, SAE and seed vectors, on the resources of one embedding actor (its GPU when it has one)."""
    import torch

    device = claim(cfg.stage_name, "fit task", cfg.runtime.gpus_per_actor, cfg.runtime.threads).device
    model, tokenizer = load_causal_lm(cfg.model, dtype=cfg.dtype, device=device, storage=cfg.storage)
    return fit_curation(model, tokenizer, sample_texts, seed_texts, settings_from(cfg),
                        torch.Generator().manual_seed(cfg.seed), log=lambda line: print(line, flush=True))


class ScoreActor:
    """A DocumentScorer on the device Ray assigned to this actor."""

    def __init__(self, cfg: CurateConfig, curation: CurationModel):
        device = claim(cfg.stage_name, "embed actor", cfg.runtime.gpus_per_actor, cfg.runtime.threads).device
        self.step = DocumentScorer(curation, cfg.runtime.micro_batch, cfg.dtype, device, cfg.storage)
        self.step.setup()
        self.throughput = Throughput("curate", cfg.stage_name, ("documents", "tokens"))

    def __call__(self, batch: Columns) -> Columns:
        ok = batch["status"] == "ok"
        self.throughput.add(documents=int(ok.sum()), tokens=int(batch["n_tokens"][ok].sum()))
        return self.step(batch)


def check_inputs(cfg: CurateConfig) -> tuple[ray.data.Dataset, int, int]:
    """Columns, corpus size, M and the layer index, checked before any model is loaded."""
    source = resolve_dataset(cfg.corpus, cfg.storage)
    ds = read_source(source, cfg.storage)
    rows = source_rows(source, cfg.storage)
    if rows is None:
        rows = ds.count()
    if rows == 0:
        raise DataError(f"corpus {cfg.corpus}: no documents")
    require_columns(ds, cfg.corpus, cfg.text_column)
    names = ds.schema().names
    if cfg.retrieval.m is not None and cfg.retrieval.m > rows:
        raise DataError(f"retrieval.m={cfg.retrieval.m} is larger than the corpus ({rows} documents)")
    from transformers import AutoConfig

    num_layers = AutoConfig.from_pretrained(resolve_model(cfg.model, cfg.storage)).num_hidden_layers
    if cfg.layer is not None and not 0 <= cfg.layer < num_layers:
        raise DataError(f"layer={cfg.layer} is out of range: {cfg.model} has layers 0..{num_layers - 1}")
    if cfg.id_column not in names:
        ds = ds.map_batches(content_ids, fn_kwargs={"column": cfg.text_column}, batch_size=256)
    elif cfg.id_column != "id":
        ds = ds.rename_columns({cfg.id_column: "id"})
    if cfg.label_column in names and cfg.label_column != "label":
        ds = ds.rename_columns({cfg.label_column: "label"})
    return ds, rows, num_layers


def run(cfg: CurateConfig, stage: Stage) -> dict[str, Any]:
    timings: dict[str, float] = {}
    t0 = time.time()
    seed_texts, seed_ids = load_seeds(cfg.seeds, cfg.text_column, cfg.id_column, cfg.storage)
    corpus, rows, num_layers = check_inputs(cfg)
    print(f"corpus: {rows} documents; {len(seed_texts)} seeds; model {cfg.model} ({num_layers} layers)", flush=True)

    # 2. fit on a sample: coordinates, SAE, seed vectors
    fraction = min(1.0, 3.0 * cfg.sae.train_docs / rows)
    sample = corpus.random_sample(fraction, seed=cfg.seed).limit(cfg.sae.train_docs).take_all()
    sample_texts = [t for t in (as_text(r[cfg.text_column]) for r in sample) if t and t.strip()]
    fit = ray.get(fit_task.options(num_cpus=max(1.0, cfg.runtime.cpus_per_actor),
                                   num_gpus=cfg.runtime.gpus_per_actor).remote(cfg, sample_texts, seed_texts))
    curation = CurationModel.from_fit(fit, cfg.model, settings_from(cfg), seed_ids)
    timings["fit_s"] = round(time.time() - t0, 1)
    print(f"fit: layer {curation.layer}, {len(curation.coords)} coordinates, SAE FVU {fit.fvu:.3f}, "
          f"dead latents {fit.dead_fraction:.1%} ({timings['fit_s']} s)", flush=True)

    # DSIR: target distribution from the seeds, raw distribution from the whole corpus (a streaming sum)
    buckets = cfg.ngram.buckets
    counted = corpus.map_batches(ngram_counts, fn_kwargs={"column": cfg.text_column, "buckets": buckets},
                                 batch_size=256)
    raw_counts = sum((np.asarray(b["counts"]).sum(axis=0) for b in counted.iter_batches(batch_size=None)),
                     start=np.zeros(buckets))
    target_counts = sum((hashed_ngrams(t, buckets) for t in seed_texts), start=np.zeros(buckets))
    ngram_weights = log_distribution(target_counts, cfg.ngram.alpha) - log_distribution(raw_counts, cfg.ngram.alpha)

    # 3. score every document
    t1 = time.time()
    scored = score_corpus(cfg, corpus, curation, ngram_weights, rows)
    shards = write_shards(scored, stage, "scores")
    timings["embed_s"] = round(time.time() - t1, 1)

    # 4. streaming reduce over the written scores (exactly the shards this attempt wrote)
    t2 = time.time()
    selected, counts = select_all(cfg, read_shards(stage, "scores", shards))
    timings["select_s"] = round(time.time() - t2, 1)

    # outputs
    primary = cfg.retrieval.scoring
    subset = selected[primary]
    if (repeated := repeated_id(subset["id"])) is not None:
        raise DataError(f"corpus {cfg.corpus}: id '{repeated[0]}' is on {repeated[1]} rows ({repeated[2]} repeated "
                        "id(s) among the selected documents); ids must be unique (drop id_column to use content ids)")
    table = pa.table({
        "id": subset["id"], "text": subset["text"], "score": subset[f"{primary}_score"].astype(np.float32),
        "matched_seed": [seed_ids[i] for i in subset[f"{primary}_seed"]],
        **({"label": subset["label"]} if "label" in subset else {}),
    })
    write_parquet(table, stage.store, "subset", "part-000.parquet")
    curation.save(stage.store)
    stage.outputs.update(dataset="subset", sae="sae")

    metrics = curate_metrics(cfg, fit, curation, counts, selected, rows, timings, t0)
    write_report(stage.store, cfg, fit, curation, metrics, counts.hist, subset)
    for line in summary_lines(metrics):
        print(line, flush=True)
    return metrics


def score_corpus(cfg: CurateConfig, corpus: ray.data.Dataset, curation: CurationModel, ngram_weights: np.ndarray,
                 rows: int) -> ray.data.Dataset:
    """read -> tokenize (tasks) -> score (actor pool, the model loaded once per actor); lazy."""
    blocks = max(cfg.runtime.num_actors * 4, -(-rows // cfg.runtime.batch_docs))
    tokenizer = DocumentTokenizer(cfg.model, cfg.text_column, cfg.max_tokens, cfg.seed, ngram_weights, cfg.storage)
    return (
        corpus.repartition(blocks)
        .map_batches(tokenizer, batch_size=cfg.runtime.batch_docs, num_cpus=0.25)
        .map_batches(ScoreActor, fn_constructor_kwargs={"cfg": cfg, "curation": curation},
                     compute=ray.data.ActorPoolStrategy(size=cfg.runtime.num_actors),
                     batch_size=cfg.runtime.batch_docs, num_cpus=cfg.runtime.cpus_per_actor,
                     num_gpus=cfg.runtime.gpus_per_actor or None)
    )


def select_all(cfg: CurateConfig, scores: ray.data.Dataset) -> tuple[dict[str, Columns], CorpusCounts]:
    """Every method's selection. The methods without seeds (random, ngram) take as many documents as the subset's
    method selected: with a fixed M in global mode that size is known up front and one pass does everything;
    otherwise a second pass follows."""
    r = cfg.retrieval
    primary = r.scoring
    known_size = r.mode == "global" and r.threshold is None
    seeded = [k for k in ("sae", "sae_idf") if k != primary] + [b for b in cfg.baselines if b in SEEDED]
    first = [plan_for(primary, r.m, primary, r.mode, r.threshold)]
    first += [plan_for(k, r.m, primary, r.mode, r.threshold) for k in seeded if r.m is not None]
    first += [plan_for(b, r.m, primary, r.mode, r.threshold) for b in cfg.baselines if b not in seeded and known_size]
    candidates, counts = _reduce(cfg, scores, first)
    if counts.ok == 0:
        raise DataError(f"corpus {cfg.corpus}: no usable documents ({counts.empty} empty, {counts.not_text} not text)")
    if r.m is not None and r.m > counts.ok:
        raise DataError(f"retrieval.m={r.m} is larger than the {counts.ok} usable documents of the corpus")
    selected = {plan.method: finish(candidates[plan.method], plan) for plan in first}
    size = len(selected[primary]["id"])
    if size == 0:
        raise DataError(f"retrieval.threshold={r.threshold} selects no document of {cfg.corpus} (the highest "
                        f"{primary} score is {counts.top:.4f}); lower the threshold")
    second = [plan_for(b, size, primary, r.mode, None) for b in dict.fromkeys([*seeded, *cfg.baselines])
              if b not in selected]
    if second:
        more, _ = _reduce(cfg, scores, second)
        selected.update({plan.method: finish(more[plan.method], plan) for plan in second})
    return selected, counts


def _reduce(cfg: CurateConfig, scores: ray.data.Dataset, plans: list[SelectionPlan]
            ) -> tuple[dict[str, Columns], CorpusCounts]:
    def summarise(batch: Columns) -> dict[str, list[BlockSummary]]:
        return {"summary": [summarise_block(batch, plans, cfg.retrieval.scoring, cfg.target_label)]}

    return merge(row["summary"] for row in scores.map_batches(summarise, batch_size=None).iter_rows())
