"""curate: SAE-guided domain curation over a corpus streamed piece by piece.

    scopeforge run curate --config ray_jobs/configs/curate-demo.yaml

The corpus is cut into pieces of bounded size (``shared.pieces``; Parquet footers and file sizes only), and every
pass streams over them, so neither the driver nor the object store ever holds the corpus:

1. survey (Ray Data tasks): rows, the raw n-gram distribution for DSIR, and a uniform sample keyed by a hash of
   (document id, seed);
2. fit on that sample, in one task on an actor's resources: coordinates, the TopK SAE, the seed vectors;
3. score (Ray Data actor pool, the model loaded once per actor, autoscaling between num_actors and max_actors): each
   actor reads a piece, scores it and commits ``<checkpoints>/scores/<piece key>.parquet`` (ids and scores, no
   text). A rerun of the same config scores only the pieces without a committed shard;
4. select (tasks over the score shards): each method's top M by histogram passes (``shared.curation.selection``),
   then a tally per method;
5. write the subset (tasks per piece: the corpus joined with the selected ids, written in Parquet files of about
   ``subset_shard_mb``, in corpus order), the curation model and the report.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data

from ray_jobs.data import READ_CPUS, actor_pool, map_files
from ray_jobs.metrics import Throughput
from ray_jobs.placement import claim
from ray_jobs.train_launch import fit_workers
from shared.config import WorkersConfig
from shared.configs.curate import CurateConfig
from shared.curation.cache import ActivationCache, ActivationExtractor
from shared.curation.curate_report import curate_metrics, summary_lines, write_report
from shared.curation.fit import Coordinates, FitResult, choose_coordinates, fit_from_cache, settings_from
from shared.curation.model import CurationModel
from shared.curation.ngram import hashed_ngrams, log_distribution
from shared.curation.scoring import (
    DocumentScorer,
    DocumentTokenizer,
    Survey,
    as_text,
    document_columns,
    score_table,
    survey,
)
from shared.curation.seeds import load_seeds
from shared.curation.selection import (
    COUNT_COLUMNS,
    SCORE_COLUMN,
    SEEDED,
    CorpusCounts,
    MethodRule,
    Selection,
    Tally,
    count_block,
    merge_results,
    repeated_id,
    rule_for,
    scan,
    tally,
)
from shared.data import resolve_dataset, write_parquet
from shared.errors import DataError
from shared.models import load_causal_lm, resolve_model
from shared.pieces import Piece, plan_pieces, read_piece
from shared.stage import CommittedFile, Stage
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
        device = claim(cfg.stage_name, "embed actor", cfg.runtime.gpus_per_actor, cfg.runtime.threads).device
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


def sae_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: the SAE trained by streaming from the cache, then everything scoring needs; the curation
    model and the fit's figures are written to the attempt folder."""
    cfg: CurateConfig = config["cfg"]
    device = claim(cfg.stage_name, "sae worker", 1.0 if cfg.runtime.gpus_per_actor else 0.0, train=True).device
    model, tokenizer = load_causal_lm(cfg.model, dtype=cfg.dtype, device=device, storage=cfg.storage)
    fit = fit_from_cache(model, tokenizer, config["coordinates"], ActivationCache(config["cache"], cfg.storage),
                         config["seed_texts"], settings_from(cfg), log=lambda line: print(line, flush=True))
    store = Storage(config["store"], cfg.storage)
    CurationModel.from_fit(fit, cfg.model, settings_from(cfg), config["seed_ids"]).save(store)
    store.write_json({"history": fit.history, "fvu": fit.fvu, "dead_fraction": fit.dead_fraction,
                      "features": fit.features, "stats": fit.stats}, "fit.json")


def fit(cfg: CurateConfig, stage: Stage, pieces: list[Piece], found: Survey, seed_texts: list[str],
        seed_ids: list[str]) -> tuple[FitResult, CurationModel]:
    """Coordinates (a task), the activation cache (the actor pool), the SAE and the rest (a Ray Train worker)."""
    r = cfg.runtime
    coordinates = ray.get(coordinates_task.options(num_cpus=max(1.0, r.cpus_per_actor), num_gpus=r.gpus_per_actor)
                          .remote(cfg, found.texts))
    sample = found.heldout(cfg.sae.heldout_fraction, cfg.seed)
    holding = sorted(set(found.pieces))
    cache = stage.store.child("cache")
    shards = _items([p for p in pieces if p.index in holding]).map_batches(
        CacheActor, fn_constructor_kwargs={"cfg": cfg, "pieces": pieces, "coordinates": coordinates,
                                           "sample": sample, "cache": cache.uri()},
        compute=actor_pool(r), batch_size=1, num_cpus=r.cpus_per_actor, num_gpus=r.gpus_per_actor or None)
    uris = sorted(str(row["shard"]) for row in shards.iter_rows())
    fit_workers(sae_worker, {"cfg": cfg, "coordinates": coordinates, "cache": uris, "seed_texts": seed_texts,
                             "seed_ids": seed_ids, "store": stage.store.uri()}, stage,
                WorkersConfig(num_workers=1, cpus_per_worker=max(1.0, r.cpus_per_actor),
                              use_gpu=r.gpus_per_actor > 0), role="sae worker", run_name="sae", resumable=False)
    curation = CurationModel.load(stage.store)
    figures = stage.store.read_json("fit.json")
    return FitResult(layer=curation.layer, coords=curation.coords, coordinate_scores=curation.coordinate_scores,
                     sae=curation.sae, history=figures["history"], fvu=figures["fvu"],
                     dead_fraction=figures["dead_fraction"], idf=curation.idf, seeds=curation.seeds,
                     features=figures["features"], stats=figures["stats"]), curation


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


def read_corpus_piece(cfg: CurateConfig, item: Piece) -> dict[str, np.ndarray]:
    columns = [cfg.text_column, cfg.id_column, cfg.label_column]
    return document_columns(read_piece(item, cfg.storage, columns), cfg.text_column, cfg.id_column, cfg.label_column)


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
    for row in _items(pieces).map_batches(_survey, fn_kwargs={"cfg": cfg, "pieces": pieces, "fraction": fraction},
                                          batch_size=1, num_cpus=READ_CPUS).iter_rows():
        found = found.add(row["survey"])
        if row["survey"].rows == 0:
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
    totals = Tally()
    selected_refs = []
    for uri in shard_uris:
        part, table = _tally_shard.options(num_returns=2).remote(uri, cfg, rules)
        totals = totals + ray.get(part)
        selected_refs.append(table)
    timings["select_s"] = round(time.time() - t2, 1)
    if totals.selected[primary.method] == 0:
        raise DataError(f"retrieval.threshold={cfg.retrieval.threshold} selects no document of {cfg.corpus} (the "
                        f"highest {primary.method} score is {counts.top:.4f}); lower the threshold")

    # 5. the subset, joined back from the corpus
    t3 = time.time()
    selected = _selected_table.remote(cfg.corpus, seed_ids, *selected_refs)
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
    scored = _items(pieces).map_batches(
        ScoreActor, fn_constructor_kwargs={"cfg": cfg, "pieces": pieces, "curation": curation,
                                           "ngram_weights": ngram_weights, "shards": shards},
        compute=actor_pool(cfg.runtime), batch_size=1, num_cpus=cfg.runtime.cpus_per_actor,
        num_gpus=cfg.runtime.gpus_per_actor or None)
    return sum(int(row["rows"]) for row in scored.iter_rows())


def _items(pieces: list[Piece]) -> ray.data.Dataset:
    """One row per piece (its index into the plan, which travels with the functions)."""
    return ray.data.from_items([{"piece": p.index} for p in pieces], override_num_blocks=max(1, len(pieces)))


def _survey(batch: dict[str, np.ndarray], cfg: CurateConfig, pieces: list[Piece], fraction: float
            ) -> dict[str, Any]:
    return {"piece": batch["piece"],
            "survey": [survey(read_corpus_piece(cfg, pieces[int(i)]), cfg.text_column, cfg.ngram.buckets, cfg.seed,
                              cfg.sae.train_docs, fraction, int(i), cfg.coordinates.reference_docs)
                       for i in batch["piece"]]}


def select_all(cfg: CurateConfig, shards: list[str], seeds: int) -> tuple[list[MethodRule], CorpusCounts, int]:
    """Every method's rule. The methods without seeds (random, ngram) take as many documents as the subset's method
    selects: with a fixed M in global mode that size is known up front and one round does everything; otherwise
    a second round follows."""
    r = cfg.retrieval
    primary = r.scoring
    known_size = r.mode == "global" and r.threshold is None
    seeded = [k for k in ("sae", "sae_idf") if k != primary] + [b for b in cfg.baselines if b in SEEDED]
    first = [rule_for(primary, r.m, primary, r.mode, r.threshold, seeds)]
    first += [rule_for(k, r.m, primary, r.mode, r.threshold, seeds) for k in seeded if r.m is not None]
    first += [rule_for(b, r.m, primary, r.mode, r.threshold, seeds) for b in cfg.baselines
              if b not in seeded and known_size]
    counts = sum(map_files(count_block, shards, cfg.storage, [*COUNT_COLUMNS, SCORE_COLUMN[primary]], primary,
                           cfg.target_label), start=CorpusCounts())
    if counts.ok == 0:
        raise DataError(f"corpus {cfg.corpus}: no usable documents ({counts.empty} empty, {counts.not_text} not text)")
    if r.m is not None and r.m > counts.ok:
        raise DataError(f"retrieval.m={r.m} is larger than the {counts.ok} usable documents of the corpus")
    passes = _resolve(cfg, shards, first)
    size = _size(cfg, shards, first[0]) if len(first[0].cuts) > 1 else first[0].cuts[0].selected
    second = [rule_for(b, size, primary, r.mode, None, seeds) for b in dict.fromkeys([*seeded, *cfg.baselines])
              if b not in {rule.method for rule in first}]
    if second and size:
        passes += _resolve(cfg, shards, second)
    return first + (second if size else []), counts, passes


def _resolve(cfg: CurateConfig, shards: list[str], rules: list[MethodRule]) -> int:
    driver = Selection([cut for rule in rules for cut in rule.cuts])
    needs = list(dict.fromkeys(c for rule in rules for c in rule.needs))
    while not driver.done:
        requests = driver.requests()
        driver.update(merge_results(map_files(scan, shards, cfg.storage, needs, requests), requests))
    return driver.passes


def _size(cfg: CurateConfig, shards: list[str], rule: MethodRule) -> int:
    """Documents a per-seed rule selects (the union of its seeds' top M)."""
    return sum(map_files(lambda cols, rule: int(rule.mask(cols).sum()), shards, cfg.storage, list(rule.needs), rule))


@ray.remote(num_cpus=READ_CPUS)
def _tally_shard(uri: str, cfg: CurateConfig, rules: list[MethodRule]) -> tuple[Tally, pa.Table]:
    """A score shard's tally, and the subset method's selected rows (id, score, seed index), which stay in the
    object store for the join."""
    from ray_jobs.data import read_columns

    cols = read_columns(uri, cfg.storage)
    part, masks = tally(cols, rules, cfg.retrieval.scoring, cfg.target_label)
    mask, primary = masks[cfg.retrieval.scoring], cfg.retrieval.scoring
    return part, pa.table({"id": pa.array(cols["id"][mask].tolist(), pa.string()),
                           "score": pa.array(cols[SCORE_COLUMN[primary]][mask].astype(np.float32)),
                           "seed": pa.array(cols[f"{primary}_seed"][mask].astype(np.int32))})


@ray.remote(num_cpus=READ_CPUS)
def _selected_table(corpus: str, seed_ids: list[str], *parts: pa.Table) -> pa.Table:
    table = pa.concat_tables(parts)
    if (repeated := repeated_id(np.asarray(table.column("id").to_pylist(), dtype=object))) is not None:
        raise DataError(f"corpus {corpus}: id '{repeated[0]}' is on {repeated[1]} rows ({repeated[2]} repeated "
                        "id(s) among the selected documents); ids must be unique (drop id_column to use content ids)")
    seeds = pa.array(seed_ids, pa.string())
    return table.append_column("matched_seed", pc.take(seeds, table.column("seed"))).drop(["seed"])


@ray.remote(num_cpus=READ_CPUS, num_returns=3)
def _join_piece(cfg: CurateConfig, item: Piece, selected: pa.Table, preview: set[str]
                ) -> tuple[pa.Table, int, list[dict[str, Any]]]:
    """The piece's selected documents with their score and matched seed, and the report's preview rows."""
    cols = read_corpus_piece(cfg, item)
    ids = pa.array(cols["id"].tolist(), pa.string())
    where = pc.index_in(ids, value_set=selected.column("id"))
    keep = np.flatnonzero(~np.asarray(pc.is_null(where)))
    at = pa.array(np.asarray(where.drop_null()), pa.int64())
    table = pa.table({"id": ids.take(keep), "text": pa.array(cols[cfg.text_column][keep].tolist(), pa.string()),
                      "score": selected.column("score").take(at),
                      "matched_seed": selected.column("matched_seed").take(at),
                      **({"label": pa.array([str(x) for x in cols["label"][keep]], pa.string())}
                         if "label" in cols else {})})
    shown = [{"id": r["id"], "score": float(r["score"]), "label": r.get("label", ""),
              "text": str(r["text"])[:160].replace("\n", " ")} for r in table.to_pylist() if r["id"] in preview]
    return table, table.nbytes, shown


@ray.remote(num_cpus=READ_CPUS)
def _write_part(uri: str, storage: Any, name: str, *tables: pa.Table) -> CommittedFile:
    table = pa.concat_tables(tables)
    write_parquet(table, Storage(uri, storage), name)
    return CommittedFile(name, Storage(uri, storage).size(name), table.num_rows)


def write_subset(cfg: CurateConfig, stage: Stage, pieces: list[Piece], selected: ray.ObjectRef, preview: set[str]
                 ) -> tuple[list[CommittedFile], list[dict[str, Any]]]:
    """Join every piece with the selected ids (tasks), then write consecutive pieces' rows into Parquet files of
    about ``subset_shard_mb``; the rows stay in the object store, the driver sees only sizes and the preview."""
    target = cfg.runtime.subset_shard_mb * 2**20
    uri = stage.store.uri("subset")
    joined = [_join_piece.remote(cfg, p, selected, preview) for p in pieces]
    writes: list[ray.ObjectRef] = []
    group: list[ray.ObjectRef] = []
    size, shown = 0, []
    for table, nbytes, rows in joined:
        group.append(table)
        size += ray.get(nbytes)
        shown += ray.get(rows)
        if size >= target:
            writes.append(_write_part.remote(uri, cfg.storage, f"part-{len(writes):05d}.parquet", *group))
            group, size = [], 0
    if group:
        writes.append(_write_part.remote(uri, cfg.storage, f"part-{len(writes):05d}.parquet", *group))
    return list(ray.get(writes)), shown
