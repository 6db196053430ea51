"""build-corpus: a labelled mixed-domain pool, seeds and held-out splits from text installed on the machine.

    scopeforge run build-corpus --set output_root=runs/demo-finescope --set target_label=sci.space
"""

from __future__ import annotations

import collections
import json
import random
from typing import Any

import pyarrow as pa
import ray

from shared.configs.build_corpus import DEFAULT_STUDY_TARGETS, BuildCorpusConfig
from shared.curation.corpus import SOURCES, Chunk, split_corpus
from shared.data import write_parquet
from shared.stage import Stage


@ray.remote(num_cpus=1)
def _build(cfg: BuildCorpusConfig) -> dict[str, Any]:
    rng = random.Random(cfg.seed)
    docs: dict[str, list] = collections.defaultdict(list)
    removed: collections.Counter[str] = collections.Counter()
    for name in cfg.sources:
        for doc in SOURCES[name](random.Random(f"{cfg.seed}:{name}"), cfg.max_chunks.get(name), removed):
            docs[doc.label].append(doc)
    split = split_corpus(docs, cfg.target_label, chunk_words=cfg.chunk_words, min_words=cfg.min_chunk_words,
                         caps=cfg.max_chunks, per_doc=cfg.max_chunks_per_doc, n_seeds=cfg.n_seeds,
                         heldout_target_docs=cfg.heldout_target_docs,
                         heldout_general_share=cfg.heldout_general_share, rng=rng, dedup_span=cfg.dedup_span,
                         reserve={label: cfg.study_reserve_docs for label in study_targets(cfg, docs)})
    rows = lambda chunks: [vars(c) for c in chunks]  # noqa: E731
    hygiene = {**dict(sorted(removed.items())), "near_duplicate_chunks": split.near_duplicates}
    return {"pool": rows(split.pool), "seeds": rows(split.seeds), "heldout": rows(split.heldout),
            "heldout_general": rows(split.heldout_general), "study_seeds": rows(split.reserve), "hygiene": hygiene}


def study_targets(cfg: BuildCorpusConfig, docs: dict[str, list]) -> list[str]:
    """The labels that get a seed reserve: as configured, or the default ones the sources gave."""
    if cfg.study_targets is not None:
        return cfg.study_targets
    return [label for label in DEFAULT_STUDY_TARGETS if docs.get(label)]


def _table(rows: list[dict[str, str]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=pa.schema([(f, pa.string()) for f in Chunk.__dataclass_fields__]))


def run(cfg: BuildCorpusConfig, stage: Stage) -> dict[str, Any]:
    parts = ray.get(_build.remote(cfg))
    hygiene = parts.pop("hygiene")
    pool = parts["pool"]
    shards = 8
    for i in range(shards):  # several files, so readers get parallel blocks
        write_parquet(_table(pool[i::shards]), stage.store, "pool", f"part-{i:03d}.parquet")
    write_parquet(_table(parts["heldout"]), stage.store, "heldout", "part-000.parquet")
    write_parquet(_table(parts["heldout_general"]), stage.store, "heldout_general", "part-000.parquet")
    write_parquet(_table(parts["study_seeds"]), stage.store, "study_seeds", "part-000.parquet")
    stage.store.write_text("".join(json.dumps(r) + "\n" for r in parts["seeds"]), "seeds.jsonl")
    stage.outputs.update(dataset="pool", seeds="seeds.jsonl", heldout="heldout", heldout_general="heldout_general",
                         study_seeds="study_seeds")
    counts = {name: dict(collections.Counter(r["label"] for r in rows)) for name, rows in parts.items()}
    words = [len(r["text"].split()) for r in pool]
    print(f"pool: {len(pool)} chunks ({', '.join(f'{k} {v}' for k, v in sorted(counts['pool'].items()))}); "
          f"{len(parts['seeds'])} seeds, {len(parts['heldout'])} held-out {cfg.target_label} chunks, "
          f"{len(parts['heldout_general'])} held-out general chunks")
    print(f"hygiene: {hygiene}")
    return {"counts": counts, "pool_size": len(pool), "mean_words": sum(words) / max(1, len(words)),
            "target_label": cfg.target_label, "hygiene": hygiene}
