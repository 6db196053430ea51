"""curate: SAE-guided domain curation over a corpus streamed by Ray Data.

    scopeforge run curate --config ray_jobs/configs/curate-demo.yaml

1. check the inputs (columns, sizes, layer) before any model work;
2. fit on a corpus sample, in one Ray task: coordinates, the TopK SAE, the seed vectors;
3. score every document: read -> tokenise (tasks) -> embed (actor pool, model loaded once per actor) -> Parquet;
4. select per method as a streaming reduce (each block keeps its own top candidates), write the subset and report.
"""

from __future__ import annotations

import pickle
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
from shared.curation.curate_report import write_report
from shared.curation.features import KINDS, fit_curation, load_embedder, settings_from, tokenize
from shared.curation.ngram import gumbel_keys, hashed_ngrams, log_distribution, stable_uniform
from shared.curation.retrieval import block_candidates, purity_and_recall, select
from shared.data import read_table, resolve_dataset, write_parquet
from shared.errors import DataError
from shared.models import load_causal_lm, load_tokenizer, resolve_model
from shared.stage import Stage

SEEDED = KINDS  # methods scored by similarity to the seeds: sae, sae_idf, dense
SCORE_COLUMN = {"ngram": "ngram_key", "random": "random_key", **{k: f"{k}_score" for k in KINDS}}


# ---------------------------------------------------------------------------------------------------------------------
# Per-row work (Ray Data tasks and actors)


_TOKENIZERS: dict[str, Any] = {}


def _tokenizer(cfg: CurateConfig) -> Any:
    """One tokenizer per worker process (tasks reuse their worker)."""
    if cfg.model not in _TOKENIZERS:
        _TOKENIZERS[cfg.model] = load_tokenizer(cfg.model, cfg.storage)
    return _TOKENIZERS[cfg.model]


def _as_text(value: Any) -> str | None:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


def tokenise_batch(batch: dict[str, np.ndarray], cfg: CurateConfig, ngram_weights: np.ndarray) -> dict[str, Any]:
    """Ids, status (ok / empty / not_text), truncation, the DSIR key and the random key of each document."""
    texts = [_as_text(t) for t in batch[cfg.text_column]]
    status = np.array(["not_text" if t is None else "empty" if not t.strip() else "ok" for t in texts], dtype=object)
    ok = [i for i, s in enumerate(status) if s == "ok"]
    tokenized = tokenize(_tokenizer(cfg), [texts[i] for i in ok], cfg.max_tokens)
    ids: list[list[int]] = [[] for _ in texts]
    truncated = np.zeros(len(texts), dtype=bool)
    for j, i in enumerate(ok):
        ids[i] = tokenized.ids[j]
        truncated[i] = tokenized.truncated[j]
    keys = [str(k) for k in batch["id"]]
    ngram_log_w = np.array([float(hashed_ngrams(t or "", len(ngram_weights)) @ ngram_weights) for t in texts])
    out = {
        "id": np.array(keys, dtype=object),
        "text": np.array([t if t is not None else "" for t in texts], dtype=object),
        "status": status,
        "input_ids": np.array([np.asarray(x, dtype=np.int32).tobytes() for x in ids], dtype=object),  # binary
        "n_tokens": np.array([len(x) for x in ids], dtype=np.int32),
        "truncated": truncated,
        "ngram_key": gumbel_keys(ngram_log_w, keys, cfg.seed),
        "random_key": stable_uniform(keys, cfg.seed),
    }
    if "label" in batch:
        out["label"] = np.array([str(x) if x is not None else "" for x in batch["label"]], dtype=object)
    return out


class EmbedActor:
    """Holds the truncated model, the SAE and the seed vectors; scores batches of tokenised documents."""

    def __init__(self, cfg: CurateConfig, layer: int, state: dict[str, Any], stage_name: str):
        device = claim(stage_name, "embed actor", cfg.runtime.gpus_per_actor, cfg.runtime.threads).device
        model, tokenizer = load_causal_lm(cfg.model, dtype=cfg.dtype, device=device, options=cfg.storage)
        self.embedder = load_embedder(model, tokenizer, layer, state)
        self.micro_batch = cfg.runtime.micro_batch
        self.throughput = Throughput("curate", stage_name, ("documents", "tokens"))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.flatnonzero(batch["status"] == "ok")
        n, s = len(batch["status"]), next(iter(self.embedder.seeds.values())).shape[0]
        scores: dict[str, np.ndarray] = {}
        for kind in KINDS:
            scores[f"{kind}_score"] = np.full(n, np.nan, np.float32)
            scores[f"{kind}_seed"] = np.full(n, -1, np.int32)
            scores[f"{kind}_seed_scores"] = np.full((n, s), np.nan, np.float32)
        if len(ok):
            ids = [np.frombuffer(batch["input_ids"][i], dtype=np.int32).tolist() for i in ok]
            found = self.embedder.score(ids, self.micro_batch)
            for key, values in found.items():
                scores[key][ok] = values
        self.throughput.add(documents=int(len(ok)), tokens=int(batch["n_tokens"][ok].sum()))
        out = {k: v for k, v in batch.items() if k != "input_ids"}
        out.update(scores)
        return out


def ngram_counts(batch: dict[str, np.ndarray], column: str, buckets: int) -> dict[str, np.ndarray]:
    total = np.zeros(buckets, dtype=np.float64)
    for text in batch[column]:
        t = _as_text(text)
        if t:
            total += hashed_ngrams(t, buckets)
    return {"counts": total[None, :]}


def block_reduce(batch: dict[str, np.ndarray], plans: list[dict[str, Any]], bins: np.ndarray | None,
                 target: str | None, primary: str = "sae") -> dict[str, list]:
    """One block -> one row: its candidates for each planned selection (a superset of the block's share of the
    final selection) and, when ``bins`` is given, its counts and SAE-score histogram."""
    usable = np.flatnonzero(batch["status"] == "ok")
    found = {}
    for plan in plans:
        method, mode = plan["method"], plan["mode"]
        scores = np.asarray(batch[SCORE_COLUMN[method]], dtype=np.float64)[usable]
        seed_scores = np.stack(batch[f"{method}_seed_scores"])[usable] if mode == "per_seed" else None
        rows = usable[block_candidates(scores, mode, plan["m"], plan["threshold"], seed_scores)] if len(usable) \
            else usable
        found[method] = {key: values[rows] for key, values in batch.items()}
    payload: dict[str, Any] = {"candidates": found}
    if bins is not None:
        ok = batch["status"] == "ok"
        labels = batch["label"][ok] if "label" in batch else np.array([])
        payload["stats"] = {
            "hist": np.histogram(np.asarray(batch[SCORE_COLUMN[primary]], dtype=np.float64)[ok], bins=bins)[0],
            "ok": int(ok.sum()), "empty": int((batch["status"] == "empty").sum()),
            "not_text": int((batch["status"] == "not_text").sum()), "truncated": int(batch["truncated"][ok].sum()),
            "tokens": int(batch["n_tokens"][ok].sum()),
            "target": int((labels == target).sum()) if target is not None else 0,
            "rows": int(len(batch["status"])),
            "top": float(np.nanmax(np.asarray(batch[SCORE_COLUMN[primary]], dtype=np.float64)[ok], initial=-np.inf)),
        }
    return {"payload": [pickle.dumps(payload)]}  # one opaque cell per block


# ---------------------------------------------------------------------------------------------------------------------
# Driver


@ray.remote
def fit_task(cfg: CurateConfig, sample_texts: list[str], seed_texts: list[str]) -> dict[str, Any]:
    """Coordinates, SAE and seed vectors, on the resources of one embedding actor (its GPU when it has one)."""
    import torch

    device = claim(cfg.stage_name, "fit task", cfg.runtime.gpus_per_actor, cfg.runtime.threads).device
    model, tokenizer = load_causal_lm(cfg.model, dtype=cfg.dtype, device=device, options=cfg.storage)
    generator = torch.Generator().manual_seed(cfg.seed)
    fit = fit_curation(model, tokenizer, sample_texts, seed_texts, settings_from(cfg), generator,
                       log=lambda line: print(line, flush=True))
    return {"layer": fit.layer, "state": fit.portable(cfg.skip_first_token), "history": fit.history,
            "fvu": fit.fvu, "dead_fraction": fit.dead_fraction, "features": fit.features, "stats": fit.stats,
            "coordinate_scores": fit.coordinate_scores}


def load_seeds(cfg: CurateConfig) -> tuple[list[str], list[str]]:
    """(seed texts, seed ids) from the inline list or the seeds dataset; empty seeds are an error."""
    if isinstance(cfg.seeds, list):
        texts = [t for t in cfg.seeds if t.strip()]
        return texts, [f"seed-{i}" for i in range(len(texts))]
    table = read_table(cfg.seeds, cfg.storage, required=(cfg.text_column,))
    texts = [t for t in table.column(cfg.text_column).to_pylist() if isinstance(t, str) and t.strip()]
    if not texts:
        raise DataError(f"seeds {cfg.seeds}: no non-empty '{cfg.text_column}' values")
    ids = (table.column(cfg.id_column).to_pylist() if cfg.id_column in table.column_names
           else [f"seed-{i}" for i in range(table.num_rows)])
    return texts, [str(i) for i, t in zip(ids, table.column(cfg.text_column).to_pylist())
                   if isinstance(t, str) and t.strip()]


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
        ds = ds.map_batches(_content_ids, fn_kwargs={"column": cfg.text_column}, batch_size=256)
    elif cfg.id_column != "id":
        ds = ds.rename_columns({cfg.id_column: "id"})
    if cfg.label_column in names and cfg.label_column != "label":
        ds = ds.rename_columns({cfg.label_column: "label"})
    return ds, rows, num_layers


def _content_ids(batch: dict[str, np.ndarray], column: str) -> dict[str, np.ndarray]:
    """Stable ids for corpora without an id column: a digest of the text (the same for every partitioning)."""
    import hashlib

    batch["id"] = np.array([f"doc-{hashlib.blake2b(str(t).encode(), digest_size=8).hexdigest()}"
                            for t in batch[column]], dtype=object)
    return batch


def run(cfg: CurateConfig, stage: Stage) -> dict[str, Any]:
    timings: dict[str, float] = {}
    t0 = time.time()
    seed_texts, seed_ids = load_seeds(cfg)
    corpus, rows, num_layers = check_inputs(cfg)
    print(f"corpus: {rows} documents; {len(seed_texts)} seeds; model {cfg.model} ({num_layers} layers)", flush=True)

    # 2. fit on a sample: coordinates, SAE, seed vectors
    fraction = min(1.0, 3.0 * cfg.sae.train_docs / rows)
    sample = corpus.random_sample(fraction, seed=cfg.seed).limit(cfg.sae.train_docs).take_all()
    sample_texts = [t for t in (_as_text(r[cfg.text_column]) for r in sample) if t and t.strip()]
    fit = ray.get(fit_task.options(num_cpus=max(1.0, cfg.runtime.cpus_per_actor),
                                   num_gpus=cfg.runtime.gpus_per_actor).remote(cfg, sample_texts, seed_texts))
    timings["fit_s"] = round(time.time() - t0, 1)
    print(f"fit: layer {fit['layer']}, {len(fit['state']['coords'])} coordinates, SAE FVU {fit['fvu']:.3f}, "
          f"dead latents {fit['dead_fraction']:.1%} ({timings['fit_s']} s)", flush=True)

    # DSIR: target distribution from the seeds, raw distribution from the whole corpus (a streaming sum)
    buckets = cfg.ngram.buckets
    raw_counts = _sum_rows(corpus.map_batches(ngram_counts, fn_kwargs={"column": cfg.text_column, "buckets": buckets},
                                              batch_size=256))["counts"]
    target_counts = sum(hashed_ngrams(t, buckets) for t in seed_texts)
    ngram_weights = log_distribution(target_counts, cfg.ngram.alpha) - log_distribution(raw_counts, cfg.ngram.alpha)

    # 3. score every document
    t1 = time.time()
    scored = score_corpus(cfg, corpus, fit, ngram_weights, stage.name, rows)
    shards = write_shards(scored, stage, "scores")
    timings["embed_s"] = round(time.time() - t1, 1)

    # 4. streaming reduce over the written scores (exactly the shards this attempt wrote)
    t2 = time.time()
    selected, totals = select_all(cfg, read_shards(stage, "scores", shards))
    timings["select_s"] = round(time.time() - t2, 1)

    # outputs
    primary = cfg.retrieval.scoring
    subset = check_subset(cfg, selected[primary])
    table = pa.table({
        "id": subset["id"], "text": subset["text"], "score": subset[f"{primary}_score"].astype(np.float32),
        "matched_seed": [seed_ids[i] for i in subset[f"{primary}_seed"]],
        **({"label": subset["label"]} if "label" in subset else {}),
    })
    write_parquet(table, stage.store, "subset", "part-000.parquet")
    save_sae(stage, fit, cfg)
    stage.outputs.update(dataset="subset", sae="sae")

    metrics = build_metrics(cfg, fit, totals, selected, rows, timings, t0)
    write_report(stage.store, cfg, fit, metrics, totals["hist"], totals["bins"], subset, seed_texts)
    _print_summary(metrics)
    return metrics


def score_corpus(cfg: CurateConfig, corpus: ray.data.Dataset, fit: dict[str, Any], ngram_weights: np.ndarray,
                 stage_name: str, rows: int) -> ray.data.Dataset:
    """read -> tokenise (tasks) -> embed and score (actor pool, the model loaded once per actor); lazy."""
    blocks = max(cfg.runtime.num_actors * 4, -(-rows // cfg.runtime.batch_docs))
    return (
        corpus.repartition(blocks)
        .map_batches(tokenise_batch, fn_kwargs={"cfg": cfg, "ngram_weights": ngram_weights},
                     batch_size=cfg.runtime.batch_docs, num_cpus=0.25)
        .map_batches(EmbedActor, fn_constructor_kwargs={"cfg": cfg, "layer": fit["layer"], "state": fit["state"],
                                                         "stage_name": stage_name},
                     compute=ray.data.ActorPoolStrategy(size=cfg.runtime.num_actors),
                     batch_size=cfg.runtime.batch_docs, num_cpus=cfg.runtime.cpus_per_actor,
                     num_gpus=cfg.runtime.gpus_per_actor or None)
    )


def _sum_rows(ds: ray.data.Dataset) -> dict[str, Any]:
    totals: dict[str, Any] = {}
    for batch in ds.iter_batches(batch_size=None):
        for key, values in batch.items():
            totals[key] = totals.get(key, 0) + np.asarray(values).sum(axis=0)
    return totals


def _plan(cfg: CurateConfig, method: str, m: int | None) -> dict[str, Any]:
    """Seeded methods follow the configured mode; the threshold applies to the method that makes the subset."""
    return {"method": method, "m": m, "mode": cfg.retrieval.mode if method in SEEDED else "global",
            "threshold": cfg.retrieval.threshold if method == cfg.retrieval.scoring else None}


def select_all(cfg: CurateConfig, scores: ray.data.Dataset) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
    """Every method's selection, as a streaming reduce: each block keeps its own candidates and the driver picks
    among them (exact: a document in the global top-M is in the top-M of its block).

    The methods without seeds (random, ngram) take as many documents as the subset's method selected. With a fixed
    M in global mode that size is known up front and one pass does everything; otherwise a second pass follows.
    """
    m = cfg.retrieval.m
    primary = cfg.retrieval.scoring
    known_size = cfg.retrieval.mode == "global" and cfg.retrieval.threshold is None
    seeded = [k for k in ("sae", "sae_idf") if k != primary] + [b for b in cfg.baselines if b == "dense"]
    # without a fixed M (a threshold only), the other methods take as many documents as the subset's method did
    first = [_plan(cfg, primary, m)] + [_plan(cfg, k, m) for k in seeded if m is not None] + \
        [_plan(cfg, b, m) for b in cfg.baselines if b not in seeded and known_size]
    bins = np.linspace(-1.0, 1.0, 201)
    candidates, totals = _reduce(scores, first, bins, cfg.target_label, primary)
    usable = int(totals["ok"])
    if usable == 0:
        raise DataError(f"corpus {cfg.corpus}: no usable documents ({totals['empty']} empty, "
                        f"{totals['not_text']} not text)")
    if m is not None and m > usable:
        raise DataError(f"retrieval.m={m} is larger than the {usable} usable documents of the corpus")
    selected = {plan["method"]: _final(candidates[plan["method"]], plan) for plan in first}
    size = len(selected[primary]["id"])
    if size == 0:
        raise DataError(f"retrieval.threshold={cfg.retrieval.threshold} selects no document of {cfg.corpus} (the "
                        f"highest {primary} score is {totals.get('top', float('nan')):.4f}); lower the threshold")
    second = [_plan(cfg, b, size) for b in dict.fromkeys([*seeded, *cfg.baselines]) if b not in selected]
    if second:
        more, _ = _reduce(scores, second, None, cfg.target_label, primary)
        selected.update({plan["method"]: _final(more[plan["method"]], plan) for plan in second})
    totals["bins"] = bins
    return selected, totals


def _reduce(scores: ray.data.Dataset, plans: list[dict[str, Any]], bins: np.ndarray | None, target: str | None,
            primary: str) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    parts: dict[str, list[dict[str, np.ndarray]]] = {plan["method"]: [] for plan in plans}
    totals: dict[str, Any] = {}
    reduced = scores.map_batches(block_reduce, fn_kwargs={"plans": plans, "bins": bins, "target": target,
                                                          "primary": primary},
                                 batch_size=None)
    for row in reduced.iter_rows():
        payload = pickle.loads(row["payload"])
        for method, cols in payload["candidates"].items():
            parts[method].append(cols)
        for key, value in payload.get("stats", {}).items():
            totals[key] = max(totals.get(key, value), value) if key == "top" else totals.get(key, 0) + value
    merged = {}
    for method, blocks in parts.items():
        blocks = [b for b in blocks if len(b["id"])]
        merged[method] = ({key: np.concatenate([np.asarray(b[key]) for b in blocks]) for key in blocks[0]}
                          if blocks else {})
    return merged, totals


def _final(cols: dict[str, np.ndarray], plan: dict[str, Any]) -> dict[str, np.ndarray]:
    if not cols:
        return {"id": np.array([], dtype=object)}
    method = plan["method"]
    seed_scores = np.stack(cols[f"{method}_seed_scores"]) if plan["mode"] == "per_seed" else None
    order = select(cols[SCORE_COLUMN[method]].astype(np.float64), plan["mode"], plan["m"], plan["threshold"],
                   seed_scores)
    return {key: values[order] for key, values in cols.items()}


def check_subset(cfg: CurateConfig, subset: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The subset holds each document once: a corpus with repeated ids cannot be curated by id."""
    ids, counts = np.unique(np.asarray(subset["id"], dtype=object).astype(str), return_counts=True)
    if (counts > 1).any():
        repeated = ids[counts > 1]
        raise DataError(f"corpus {cfg.corpus}: id '{repeated[0]}' is on {int(counts[counts > 1][0])} rows "
                        f"({len(repeated)} repeated id(s) among the selected documents); ids must be unique "
                        f"(drop id_column to use content ids)")
    return subset


def save_sae(stage: Stage, fit: dict[str, Any], cfg: CurateConfig) -> None:
    import torch
    import yaml
    from safetensors.torch import save

    state = fit["state"]
    stage.store.write_bytes(save(state["sae_tensors"]), "sae", "sae.safetensors")
    stage.store.write_bytes(save({"latent_idf": torch.as_tensor(np.array(state["idf"]))}), "sae",
                            "latent_idf.safetensors")
    meta = {"model": cfg.model, "layer": fit["layer"], "selector": cfg.coordinates.selector,
            "skip_first_token": cfg.skip_first_token, **state["sae_shape"]}
    stage.store.write_text(yaml.safe_dump(meta, sort_keys=False), "sae", "config.yaml")
    stage.store.write_json({"layer": fit["layer"], "selector": cfg.coordinates.selector,
                            "indices": [int(i) for i in state["coords"]],
                            "scores": [float(fit["coordinate_scores"][i]) for i in state["coords"]]},
                           "coordinates.json")


def build_metrics(cfg: CurateConfig, fit: dict[str, Any], totals: dict[str, Any],
                  selected: dict[str, dict[str, np.ndarray]], rows: int, timings: dict[str, float],
                  started: float) -> dict[str, Any]:
    usable = int(totals["ok"])
    retrieval: dict[str, Any] = {}
    for method, cols in selected.items():
        entry: dict[str, Any] = {"selected": int(len(cols["id"]))}
        if cfg.target_label is not None and "label" in cols:
            entry.update(purity_and_recall(list(cols["label"]), int(totals["target"]), cfg.target_label))
        retrieval[method] = entry
    embed_s = max(timings.get("embed_s", 0.0), 1e-9)
    timings["total_s"] = round(time.time() - started, 1)
    return {
        "corpus": {"rows": rows, "scored": int(totals["rows"]), "usable": usable, "skipped_empty": int(totals["empty"]),
                   "skipped_not_text": int(totals["not_text"]), "truncated": int(totals["truncated"]),
                   "tokens": int(totals["tokens"]), "target_documents": int(totals["target"]),
                   "max_tokens": cfg.max_tokens},
        "layer": fit["layer"],
        "coordinates": {"selector": cfg.coordinates.selector, "k": int(len(fit["state"]["coords"]))},
        "sae": {"fvu": fit["fvu"], "dead_fraction": fit["dead_fraction"], **fit["state"]["sae_shape"],
                "history": fit["history"]},
        "fit": fit["stats"],
        "retrieval": retrieval, "subset_method": cfg.retrieval.scoring,
        "retrieval_mode": cfg.retrieval.mode, "m": cfg.retrieval.m, "threshold": cfg.retrieval.threshold,
        "target_label": cfg.target_label,
        "throughput": {"documents_per_s": round(usable / embed_s, 2),
                       "tokens_per_s": round(int(totals["tokens"]) / embed_s, 1)},
        "timings": timings,
    }


def _print_summary(metrics: dict[str, Any]) -> None:
    c = metrics["corpus"]
    print(f"scored {c['usable']} documents ({c['skipped_empty']} empty and {c['skipped_not_text']} non-text skipped, "
          f"{c['truncated']} truncated to {c['max_tokens']} tokens) at {metrics['throughput']['tokens_per_s']} "
          f"tokens/s", flush=True)
    for method, entry in metrics["retrieval"].items():
        extra = (f": purity {entry['purity']:.3f}, recall {entry['recall']:.3f}" if "purity" in entry else "")
        print(f"  {method:<7} selected {entry['selected']}{extra}", flush=True)
