"""retrieval-study: every selection method, several targets, several seed draws, intervals.

    scopeforge run retrieval-study --set corpus=runs/demo-finescope/corpus \
        --set reserve=runs/demo-finescope/corpus/study_seeds --set curation=runs/demo-finescope/curate

1. read the labelled pool and the seed reserve (the study holds their vectors in memory: ``max_documents``);
2. embed both in Ray tasks of ``block_docs`` documents, each loading a curate stage's curation model (the main one
   and every variant) and the sentence encoder once, on the device Ray assigned: every SAE kind, the dense hidden
   state, SAE firing shares and the sentence embedding;
3. TF-IDF (idf fitted on the pool) and the DSIR n-gram counts on the driver (no model);
4. ``shared.curation.study``: the draws, every method's top M, the SAE kind chosen on the development target, the
   hybrid, bootstrap intervals and paired differences; then metrics.json, runs.jsonl, study.md and study.png.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import ray

from ray_jobs.placement import claim
from shared.configs.retrieval_study import RetrievalStudyConfig
from shared.curation.features import tokenize
from shared.curation.kinds import KINDS, SAE_KINDS
from shared.curation.model import CurationModel
from shared.curation.ngram import hashed_ngrams
from shared.curation.sentence import SentenceEncoder
from shared.curation.study import StudyInputs, StudyResult, draw_seeds, run_study, table
from shared.curation.tfidf import TfidfModel, term_counts
from shared.data import read_table
from shared.errors import DataError
from shared.report import Report
from shared.stage import Stage, committed_folder
from shared.storage import Storage

COLUMNS = ("id", "text", "label")
NGRAM_BUCKETS = 10_000
METHOD_ORDER = {name: i for i, name in enumerate(
    [*SAE_KINDS, "sae_lift", "hybrid", "tfidf", "minilm", "dense", "ngram", "random"])}


@ray.remote
def embed_block(cfg: RetrievalStudyConfig, curation_uri: str, texts: list[str],
                sentence: bool) -> dict[str, np.ndarray]:
    """Every vector of one block of documents under one curation model (and the sentence embedding), on the device
    Ray assigned to this task."""
    from shared.models import load_causal_lm

    device = claim(cfg.stage_name, "embedding task", cfg.runtime.gpus_per_task, cfg.runtime.threads).device
    curation = CurationModel.load(Storage(committed_folder(curation_uri, cfg.storage), cfg.storage))
    model, tokenizer = load_causal_lm(curation.model, dtype=cfg.dtype, device=device, storage=cfg.storage)
    ids = [x if x else [tokenizer.eos_token_id] for x in tokenize(tokenizer, texts, cfg.max_tokens).ids]
    out = curation.embedder(model, tokenizer).embed(ids, cfg.runtime.micro_batch)
    if sentence and cfg.sentence_model:
        out["minilm"] = SentenceEncoder.load(cfg.sentence_model, device, cfg.storage).encode(texts)
    return out


def read_documents(cfg: RetrievalStudyConfig, uri: str, what: str) -> dict[str, np.ndarray]:
    table = read_table(uri, cfg.storage, columns=list(COLUMNS), required=COLUMNS)
    if table.num_rows == 0:
        raise DataError(f"{what} {uri}: no rows")
    cols = {c: np.array([str(v) for v in table.column(c).to_pylist()], dtype=object) for c in COLUMNS}
    empty = [i for i, t in zip(cols["id"], cols["text"]) if not t.strip()]
    if empty:
        raise DataError(f"{what} {uri}: document {empty[0]} has empty text ({len(empty)} such)")
    return cols


def embed(cfg: RetrievalStudyConfig, texts: list[str]) -> dict[str, np.ndarray]:
    """Every vector of every document: the main curation model's kinds, ``fired`` and ``minilm`` under their own
    names, each variant's kinds as ``<variant>:<kind>``."""
    step = cfg.runtime.block_docs
    task = embed_block.options(num_cpus=cfg.runtime.cpus_per_task, num_gpus=cfg.runtime.gpus_per_task)
    models = {"": cfg.curation, **cfg.variants}
    refs = {name: [task.remote(cfg, uri, texts[i: i + step], name == "") for i in range(0, len(texts), step)]
            for name, uri in models.items()}
    out: dict[str, np.ndarray] = {}
    for name, parts in ((name, ray.get(r)) for name, r in refs.items()):
        for key in parts[0]:
            if name == "" or key in KINDS:
                out[f"{name}:{key}" if name else key] = np.concatenate([p[key] for p in parts])
    return out


def run(cfg: RetrievalStudyConfig, stage: Stage) -> dict[str, Any]:
    pool = read_documents(cfg, cfg.corpus, "corpus")
    reserve = read_documents(cfg, cfg.reserve, "reserve")
    if len(pool["id"]) + len(reserve["id"]) > cfg.max_documents:
        raise DataError(f"corpus {cfg.corpus}: {len(pool['id'])} + {len(reserve['id'])} reserve documents exceed "
                        f"max_documents={cfg.max_documents}")
    shared_ids = set(pool["id"]) & set(reserve["id"])
    if shared_ids:
        raise DataError(f"reserve {cfg.reserve}: {len(shared_ids)} documents are also in the pool "
                        f"(e.g. {sorted(shared_ids)[0]})")
    targets = cfg.targets or sorted(set(reserve["label"]))
    missing = [t for t in [*targets, cfg.development_target] if t not in set(pool["label"])]
    if missing:
        raise DataError(f"target {missing[0]!r} has no document in the pool {cfg.corpus}")
    draws = draw_seeds(reserve["label"], targets, cfg.draws, cfg.seeds_per_draw, cfg.seed)
    print(f"study: {len(pool['id'])} pool documents, {len(reserve['id'])} reserve documents, targets "
          f"{', '.join(targets)} (development: {cfg.development_target}), {cfg.draws} draws of "
          f"{cfg.seeds_per_draw} seeds, M={cfg.m}", flush=True)

    n = len(pool["id"])
    vectors = embed(cfg, [*pool["text"], *reserve["text"]])
    tfidf = TfidfModel.fit(term_counts(list(pool["text"])))
    inputs = StudyInputs(
        pool_labels=pool["label"], reserve_labels=reserve["label"],
        vectors={name: (v[:n], v[n:]) for name, v in vectors.items() if name != "fired"},
        pool_fired=vectors["fired"][:n], reserve_fired=vectors["fired"][n:], pool_ids=list(pool["id"]),
        pool_ngrams=np.stack([hashed_ngrams(t, NGRAM_BUCKETS) for t in pool["text"]]),
        reserve_ngrams=np.stack([hashed_ngrams(t, NGRAM_BUCKETS) for t in reserve["text"]]))
    inputs.vectors["tfidf"] = (tfidf.transform(term_counts(list(pool["text"]))),
                               tfidf.transform(term_counts(list(reserve["text"]))))
    candidates = [*SAE_KINDS, "sae_lift", *(f"{v}:{k}" for v in cfg.variants for k in SAE_KINDS)]
    result = run_study(inputs, draws, cfg.m, cfg.development_target, candidates, cfg.compare_with,
                       cfg.bootstrap_rounds, cfg.seed)
    return write_outputs(cfg, stage, result, {"pool": n, "reserve": len(reserve["id"]), "targets": targets})


def write_outputs(cfg: RetrievalStudyConfig, stage: Stage, result: StudyResult, sizes: dict[str, Any]) -> dict:
    stage.store.write_text("".join(json.dumps(r) + "\n" for r in result.runs), "runs.jsonl")
    lines = [f"# Retrieval study (M={cfg.m}, {cfg.draws} seed draws of {cfg.seeds_per_draw} per target)", "",
             f"SAE kind chosen on the development target {result.development_target}: **{result.chosen_sae}**. "
             "Cells: mean over draws [95% bootstrap interval]; the headline mean leaves the development target out.",
             ""]
    for fig in ("purity", "recall", "r_precision"):
        lines += [f"## {fig}", "", *table(result, fig, METHOD_ORDER), ""]
    lines += ["## Paired differences in purity (headline targets)", "", "| comparison | mean | 95% CI |",
              "|---|---|---|"]
    lines += [f"| {k} | {v['mean']:+.3f} | [{v['ci'][0]:+.3f}, {v['ci'][1]:+.3f}] |"
              for k, v in result.comparisons.items()]
    stage.store.write_text("\n".join(lines) + "\n", "study.md")
    report = Report("retrieval study")
    fig, ax = report.figure(width=9, height=4)
    names = sorted(result.summary, key=lambda s: METHOD_ORDER.get(s, 100))
    for j, group in enumerate([result.development_target, *result.headline_targets, "headline"]):
        means = [result.summary[s].get(group, {}).get("purity", {}).get("mean", np.nan) for s in names]
        cis = [result.summary[s].get(group, {}).get("purity", {}).get("ci", [np.nan, np.nan]) for s in names]
        x = np.arange(len(names)) + (j - 2) * 0.13
        ax.errorbar(x, means, yerr=np.abs(np.array(cis).T - np.array(means)), fmt="o", capsize=2, label=group)
    ax.set_xticks(np.arange(len(names)), names, rotation=45, ha="right")
    ax.set_ylabel(f"purity@{cfg.m}")
    ax.legend(fontsize=7)
    stage.store.write_bytes(report.add_figure(fig, "purity per method and target"), "study.png")
    metrics = {"chosen_sae": result.chosen_sae, "development_target": result.development_target,
               "headline_targets": result.headline_targets, "m": cfg.m, "draws": cfg.draws, **sizes,
               "summary": result.summary, "comparisons": result.comparisons}
    for line in lines[2:3] + [f"{k}: {v['mean']:+.3f} [{v['ci'][0]:+.3f}, {v['ci'][1]:+.3f}]"
                              for k, v in result.comparisons.items()]:
        print(line, flush=True)
    return metrics
