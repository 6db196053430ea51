"""curate, steps 4 and 5: every method's selection from the committed score shards, then the subset.

Selection runs as Ray tasks over the shards (``map_files``), reading only the columns a pass needs; the driver
holds histograms and boundary ids (``shared.curation.selection``), never candidates. The subset is joined back from
the corpus a few pieces per task; its rows stay in the object store until a writer task puts them in Parquet files
of about ``runtime.subset_shard_mb``, in corpus order.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from ray_jobs.data import READ_CPUS, map_files, task_groups
from ray_jobs.pieces import read_corpus_piece
from shared.configs.curate import CurateConfig
from shared.curation.kinds import SAE_KINDS
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
from shared.data import write_parquet
from shared.errors import DataError
from shared.pieces import Piece
from shared.stage import CommittedFile, Stage
from shared.storage import Storage


def select_all(cfg: CurateConfig, shards: list[str], seeds: int) -> tuple[list[MethodRule], CorpusCounts, int]:
    """Every method's rule. The methods without seeds (random, ngram) take as many documents as the subset's method
    selects: with a fixed M in global mode that size is known up front and one round does everything; otherwise
    a second round follows."""
    r = cfg.retrieval
    primary = r.scoring
    known_size = r.mode == "global" and r.threshold is None
    seeded = [k for k in SAE_KINDS if k != primary] + [b for b in cfg.baselines if b in SEEDED]
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


def tally_all(cfg: CurateConfig, shards: list[str], rules: list[MethodRule]) -> tuple[Tally, list[ray.ObjectRef]]:
    """Every method's tally over the shards, and the subset method's selected rows per group of shards (object
    refs, in shard order)."""
    parts, selected = [], []
    for group in task_groups(len(shards)):
        part, table = _tally_shards.options(num_returns=2).remote([shards[i] for i in group], cfg, rules)
        parts.append(part)
        selected.append(table)
    return sum(ray.get(parts), start=Tally()), selected


@ray.remote(num_cpus=READ_CPUS)
def _tally_shards(uris: list[str], cfg: CurateConfig, rules: list[MethodRule]) -> tuple[Tally, pa.Table]:
    """The shards' tally, and the subset method's selected rows (id, score, seed index), which stay in the object
    store for the join."""
    from ray_jobs.data import read_columns

    primary = cfg.retrieval.scoring
    totals, tables = Tally(), []
    for uri in uris:
        cols = read_columns(uri, cfg.storage)
        part, masks = tally(cols, rules, primary, cfg.target_label)
        mask = masks[primary]
        totals = totals + part
        tables.append(pa.table({"id": pa.array(cols["id"][mask].tolist(), pa.string()),
                                "score": pa.array(cols[SCORE_COLUMN[primary]][mask].astype(np.float32)),
                                "seed": pa.array(cols[f"{primary}_seed"][mask].astype(np.int32))}))
    return totals, pa.concat_tables(tables)


@ray.remote(num_cpus=READ_CPUS)
def selected_table(corpus: str, seed_ids: list[str], *parts: pa.Table) -> pa.Table:
    table = pa.concat_tables(parts)
    if (repeated := repeated_id(np.asarray(table.column("id").to_pylist(), dtype=object))) is not None:
        raise DataError(f"corpus {corpus}: id '{repeated[0]}' is on {repeated[1]} rows ({repeated[2]} repeated "
                        "id(s) among the selected documents); ids must be unique (drop id_column to use content ids)")
    seeds = pa.array(seed_ids, pa.string())
    return table.append_column("matched_seed", pc.take(seeds, table.column("seed"))).drop(["seed"])


@ray.remote(num_cpus=READ_CPUS, num_returns=3)
def _join_pieces(cfg: CurateConfig, group: list[Piece], selected: pa.Table, preview: set[str]
                 ) -> tuple[pa.Table, int, list[dict[str, Any]]]:
    """The selected documents of consecutive pieces with their score and matched seed, and the report's preview
    rows."""
    tables = []
    for item in group:
        cols = read_corpus_piece(cfg, item)
        ids = pa.array(cols["id"].tolist(), pa.string())
        where = pc.index_in(ids, value_set=selected.column("id"))
        keep = np.flatnonzero(~np.asarray(pc.is_null(where)))
        at = pa.array(np.asarray(where.drop_null()), pa.int64())
        tables.append(pa.table({
            "id": ids.take(keep), "text": pa.array(cols[cfg.text_column][keep].tolist(), pa.string()),
            "score": selected.column("score").take(at), "matched_seed": selected.column("matched_seed").take(at),
            **({"label": pa.array([str(x) for x in cols["label"][keep]], pa.string())} if "label" in cols else {})}))
    table = pa.concat_tables(tables)
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
    joined = [_join_pieces.remote(cfg, [pieces[i] for i in group], selected, preview)
              for group in task_groups(len(pieces))]
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
