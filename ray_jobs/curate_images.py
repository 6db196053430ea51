"""curate-images: a subject-filtered, deduplicated, re-encoded subset of an existing generated-image collection.

    scopeforge run curate-images --set manifest=s3://bucket/diffusiondb/metadata.parquet \
        --set columns.path=image_name --set 'subject.keywords=[face, portrait]' --set output_root=runs/curated

Two passes of Ray Data over the manifest: (1) filter by prompt and size and compute a perceptual hash per image,
keeping only small columns; the driver then drops near duplicates over all hashes (first id kept); (2) re-encode the
kept rows exactly like the generate job and write them to <stage>/images/<name>/ (the stage's `dataset` output).
Every dropped row is listed in drops.jsonl with its reason; report.html has counts and contact sheets.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pyarrow as pa
import ray

from ray_jobs.data import read_dataset, shard_uris, write_shards
from shared.configs.curate_images import CurateImagesConfig
from shared.data import resolve_dataset
from shared.diffusion.curation import SCAN_SCHEMA, encode_batch, manifest_base, scan_batch, select
from shared.errors import DataError
from shared.stage import Stage


def run(cfg: CurateImagesConfig, stage: Stage) -> dict[str, Any]:
    source = resolve_dataset(cfg.manifest, cfg.storage)
    base = manifest_base(source.location)

    print(f"curate-images: scanning {cfg.manifest} (prompt filter, size bounds, perceptual hashes)", flush=True)
    run = cfg.runtime
    scan = read_dataset(cfg.manifest, cfg.storage).repartition(target_num_rows_per_block=run.batch_size).map_batches(
        scan_batch, fn_args=(cfg, base), batch_size=run.batch_size, batch_format="pyarrow", num_cpus=run.cpus_per_task)
    table = _concat([ray.get(ref) for ref in scan.to_arrow_refs()])
    if table.num_rows == 0:
        raise DataError(f"manifest {cfg.manifest}: no rows")
    keep, drops = select(table, cfg.dedup_distance)
    print(f"curate-images: {table.num_rows} rows, {len(keep)} kept; dropped: "
          + ", ".join(f"{n} {r}" for r, n in Counter(d["reason"] for d in drops).most_common()), flush=True)

    shards = []
    if keep:
        encoded = read_dataset(cfg.manifest, cfg.storage).repartition(target_num_rows_per_block=run.batch_size) \
            .map_batches(encode_batch, fn_args=(cfg, keep, base), batch_size=run.batch_size, batch_format="pyarrow",
                         num_cpus=run.cpus_per_task)
        shards = shard_uris(stage, f"images/{cfg.name}", write_shards(encoded, stage, "images", cfg.name))
    stage.outputs["dataset"] = "images"

    from shared.diffusion.report import curate_report

    return curate_report(cfg, stage.store, table, keep, drops, shards)


def _concat(tables: list[pa.Table]) -> pa.Table:
    tables = [t.select(SCAN_SCHEMA.names).cast(SCAN_SCHEMA) for t in tables if t.num_rows]
    return pa.concat_tables(tables) if tables else SCAN_SCHEMA.empty_table()
