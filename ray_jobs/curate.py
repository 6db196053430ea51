"""curate: SAE-guided domain curation over a corpus streamed piece by piece.

    scopeforge run curate --config ray_jobs/configs/curate-demo.yaml

The corpus is cut into pieces of bounded size (``shared.pieces``; Parquet footers and file sizes only), and every
pass streams over them, so neither the driver nor the object store ever holds the corpus:

1. survey (Ray Data tasks): rows, the raw n-gram distribution for DSIR, and a uniform sample keyed by a hash of
   (document id, seed);
2. fit on that sample (``ray_jobs.curate_fit``): coordinates in a task, the sample's activations cached per piece by
   the actor pool, the TopK SAE trained from the cache in a task, then the seed vectors;
3. score (Ray Data actor pool, the model loaded once per actor, autoscaling between num_actors and max_actors): each
   actor reads a piece, scores it and commits ``<checkpoints>/scores/<piece key>.parquet`` (ids and scores, no
   text). A rerun of the same config scores only the pieces without a committed shard;
4. select (``ray_jobs.curate_select``, tasks over the score shards): each method's top M by histogram passes
   (``shared.curation.selection``), then a tally per method;
5. write the subset (tasks of a few pieces each: the corpus joined with the selected ids, written in Parquet files
   of about ``subset_shard_mb``, in corpus order) and the report.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ray_jobs.curate_fit import fit
from ray_jobs.curate_select import select_all, selected_table, tally_all, write_subset
from ray_jobs.data import actor_pool, task_groups
from ray_jobs.metrics import Throughput
from ray_jobs.pieces import items, read_corpus_piece, survey_batch
from ray_jobs.placement import claim
from shared.configs.curate import CurateConfig
from shared.curation.curate_report import curate_metrics, summary_lines, write_report
from shared.curation.documents import Survey
from shared.curation.model import CurationModel
from shared.curation.ngram import hashed_ngrams, log_distribution
from shared.curation.scoring import DocumentScorer, DocumentTokenizer, score_table
from shared.curation.seeds import load_seeds
from shared.data import resolve_dataset, write_parquet
from shared.errors import DataError
from shared.models import resolve_model
from shared.pieces import Piece, plan_pieces, read_piece
from shared.stage import Stage
from shared.storage import Storage


class ScoreActor:
    """Scores whole pieces on the device Ray assigned to this actor, and commits one score shard per piece."""

    def __init__(self, cfg: CurateConfig, pieces: list[Piece], curation: CurationModel, ngram_weights: np.ndarray,
                 shards: str):
        self.cfg, self.shards = cfg, Storage(shards, cfg.storage)
        self.pieces = {p.index: p for p in pieces}
        device = claim(cfg.stage_name, "embed actor", cfg.runtime.gpus_per_actor, cfg.runtime.threads).device
        self.tokenize = DocumentTokenizer(cfg.model, cfg.text_column, cfg.max_tokens, cfg.seed, ngram_weights,
                                          cfg.storage)
        self.score = DocumentScorer(curation, cfg.runtime.micro_batch, cfg.dtype, device, cfg.storage)
        self.tokenize.setup()
        self.score.setup()
        self.throughput = Throughput("curate", cfg.stage_name, ("documents", "tokens"))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys, rows = [], []
        for item in (self.pieces[int(i)] for i in batch["piece"]):
            cols = self.score(self.tokenize(read_corpus_piece(self.cfg, item)))
            cols.pop("text")
            ok = cols["status"] == "ok"
            self.throughput.add(documents=int(ok.sum()), tokens=int(cols["n_tokens"][ok].sum()))
            write_parquet(score_table(cols), self.shards, f"{item.key}.parquet")  # one atomic put: the commit
            keys.append(item.key)
            rows.append(len(cols["id"]))
        return {"key": np.array(keys, dtype=object), "rows": np.array(rows)}


def check_inputs(cfg: CurateConfig) -> tuple[list[Piece], int]:
    """The pieces and the layer count; columns and the layer are checked before any model is loaded."""
    source = resolve_dataset(cfg.corpus, cfg.storage)
    r = cfg.runtime
    pieces = plan_pieces(source, cfg.storage, int(r.piece_mb * 2**20), r.piece_docs, 4 * r.most_actors)
    first = next((read_piece(p, cfg.storage) for p in pieces if p.rows != 0), None)
    if first is not None and first.num_rows:
        if cfg.text_column not in first.column_names:
            raise DataError(f"dataset {cfg.corpus}: no '{cfg.text_column}' column "
                            f"(columns: {', '.join(first.column_names) or 'none'})")
    from transformers import AutoConfig

    num_layers = AutoConfig.from_pretrained(resolve_model(cfg.model, cfg.storage)).num_hidden_layers
    if cfg.layer is not None and not 0 <= cfg.layer < num_layers:
        raise DataError(f"layer={cfg.layer} is out of range: {cfg.model} has layers 0..{num_layers - 1}")
    return pieces, num_layers


def run(cfg: CurateConfig, stage: Stage) -> dict[str, Any]:
    timings: dict[str, float] = {}
    t0 = time.time()
    seed_texts, seed_ids = load_seeds(cfg.seeds, cfg.text_column, cfg.id_column, cfg.storage)
    pieces, num_layers = check_inputs(cfg)

    # 1. survey: rows, raw n-gram counts, the SAE sample (and which pieces have no rows)
    empty: set[int] = set()
    known = sum(p.rows or 0 for p in pieces) if all(p.rows is not None for p in pieces) else None
    fraction = 1.0 if not known else min(1.0, 3.0 * cfg.sae.train_docs / known)
    found = Survey(cfg.sae.train_docs, cfg.coordinates.reference_docs)
    blocks = len(task_groups(len(pieces)))  # a few pieces per task: CPU-bound n-gram hashing, one CPU each
    for row in items(pieces, blocks).map_batches(survey_batch, fn_kwargs={"cfg": cfg, "pieces": pieces,
                                                                     "fraction": fraction},
                                                 batch_size=None, num_cpus=1).iter_rows():
        found = found.add(Survey.from_row(row, found.size, found.text_size))
        if row["rows"] == 0:
            empty.add(int(row["piece"]))
    pieces = [p for p in pieces if p.index not in empty]
    if found.rows == 0:
        raise DataError(f"corpus {cfg.corpus}: no documents")
    if cfg.retrieval.m is not None and cfg.retrieval.m > found.rows:
        raise DataError(f"retrieval.m={cfg.retrieval.m} is larger than the corpus ({found.rows} documents)")
    print(f"corpus: {found.rows} documents in {len(pieces)} pieces; {len(seed_texts)} seeds; model {cfg.model} "
          f"({num_layers} layers); SAE sample {len(found.ids)} documents", flush=True)

    # 2. fit on the sample
    fitted, curation = fit(cfg, stage, pieces, found, seed_texts, seed_ids)
    timings["fit_s"] = round(time.time() - t0, 1)
    print(f"fit: layer {curation.layer}, {len(curation.coords)} coordinates, SAE held-out FVU {fitted.fvu:.3f}, "
          f"dead latents {fitted.dead_fraction:.1%} ({timings['fit_s']} s)", flush=True)
    buckets, alpha = cfg.ngram.buckets, cfg.ngram.alpha
    target_counts = sum((hashed_ngrams(t, buckets) for t in seed_texts), start=np.zeros(buckets))
    raw_counts = found.counts if found.counts is not None else np.zeros(buckets)
    ngram_weights = log_distribution(target_counts, alpha) - log_distribution(raw_counts, alpha)

    # 3. score the pieces without a committed shard
    t1 = time.time()
    shards = stage.checkpoints.child("scores")
    todo = [p for p in pieces if p.key not in committed_shards(shards, curation.fingerprint(ngram_weights))]
    if len(todo) < len(pieces):
        print(f"resuming: {len(pieces) - len(todo)} of {len(pieces)} pieces already scored", flush=True)
    scored_rows = score_pieces(cfg, todo, curation, ngram_weights, shards.uri())
    timings["embed_s"] = round(time.time() - t1, 1)
    shard_uris = [shards.uri(f"{p.key}.parquet") for p in pieces]  # the plan's order, whoever scored them

    # 4. select
    t2 = time.time()
    rules, counts, passes = select_all(cfg, shard_uris, len(seed_ids))
    primary = next(rule for rule in rules if rule.method == cfg.retrieval.scoring)
    totals, selected_refs = tally_all(cfg, shard_uris, rules)
    timings["select_s"] = round(time.time() - t2, 1)
    if totals.selected[primary.method] == 0:
        raise DataError(f"retrieval.threshold={cfg.retrieval.threshold} selects no document of {cfg.corpus} (the "
                        f"highest {primary.method} score is {counts.top:.4f}); lower the threshold")

    # 5. the subset, joined back from the corpus
    t3 = time.time()
    selected = selected_table.remote(cfg.corpus, seed_ids, *selected_refs)
    files, preview = write_subset(cfg, stage, pieces, selected, {i for _, i in totals.best})
    stage.add_files("subset", files)
    stage.outputs.update(dataset="subset", sae="sae")
    timings["subset_s"] = round(time.time() - t3, 1)

    scale = {"pieces": len(pieces), "resumed_pieces": len(pieces) - len(todo), "rescored_documents": scored_rows,
             "selection_passes": passes, "subset_files": len(files), "scores": shards.uri()}
    metrics = curate_metrics(cfg, fitted, curation, counts, totals, found.rows, timings, t0)
    metrics["scale"] = scale
    write_report(stage.store, cfg, fitted, curation, metrics, counts.hist,
                 totals.lowest.get(primary.method), sorted(preview, key=lambda r: -r["score"]))
    for line in summary_lines(metrics):
        print(line, flush=True)
    return metrics


def committed_shards(shards: Storage, fingerprint: str) -> set[str]:
    """Keys of the pieces an earlier attempt of this config scored with this very curation model. Shards of another
    model (a fit that came out differently) are removed, so scores of two models never mix."""
    if shards.exists("_model.json") and shards.read_json("_model.json").get("fingerprint") == fingerprint:
        return {name.rsplit("/", 1)[-1].removesuffix(".parquet") for name in shards.find(suffix=".parquet")}
    if shards.exists():
        shards.rm()
    shards.write_json({"fingerprint": fingerprint}, "_model.json")
    return set()


def score_pieces(cfg: CurateConfig, pieces: list[Piece], curation: CurationModel, ngram_weights: np.ndarray,
                 shards: str) -> int:
    """Score ``pieces`` in the actor pool, each committed as ``<shards>/<piece key>.parquet``; returns the rows."""
    if not pieces:
        return 0
    scored = items(pieces).map_batches(
        ScoreActor, fn_constructor_kwargs={"cfg": cfg, "pieces": pieces, "curation": curation,
                                           "ngram_weights": ngram_weights, "shards": shards},
        compute=actor_pool(cfg.runtime), batch_size=1, num_cpus=cfg.runtime.cpus_per_actor,
        num_gpus=cfg.runtime.gpus_per_actor or None)
    return sum(int(row["rows"]) for row in scored.iter_rows())
