"""generate: fakes from several generators and their real counterparts, as one Parquet image dataset (Ray Data).

    scopeforge run generate --set output_root=runs/try                       # defaults: lfw-faces + the face GAN
    scopeforge pipeline --config ray_jobs/configs/deepfake-data.yaml          # train-ddpm -> generate, offline

For each real collection: read -> re-encode (same resize and encoder as the fakes) -> write. For each generator:
requests (id, per-image seed, prompt, source image) -> repartition so every actor gets work -> one actor pool
(the model loaded once per actor, fractional CPUs) -> write. Everything lands in <stage>/images/<source>/*.parquet
(shared/imageset.py's IMAGE_SCHEMA; the stage's `dataset` output). Dropped requests (NaN or blank images,
undecodable sources) are counted in a ledger actor, listed in drops.jsonl and reported; a source that drops more
than max_drop_fraction fails the job. report.html shows counts, throughput and a contact sheet (contact_sheet.png).

A little over 200 lines: the drop ledger is an actor every generation actor reports to, which is Ray glue.
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data

from ray_jobs.data import actor_pool, read_dataset, require_columns, shard_uris, write_shards
from ray_jobs.metrics import Throughput
from ray_jobs.placement import claim
from shared.configs.generate import GenerateConfig, GeneratorSpec, Img2ImgGenerator, RealSource
from shared.diffusion.generate import (
    GeneratorStage,
    check_drops,
    count_requests,
    encode_reals,
    generator_seed,
    load_prompts,
    source_requests,
)
from shared.diffusion.realsets import REAL_ALIASES, REAL_COLUMNS, file_id, image_files, real_kind
from shared.errors import DataError
from shared.stage import Stage
from shared.storage import Storage, split_uri


@ray.remote(num_cpus=0)
class DropLedger:
    """Counts what every batch made and dropped (Ray Data has no side outputs)."""

    def __init__(self) -> None:
        self.made: Counter[str] = Counter()
        self.model_seconds: defaultdict[str, float] = defaultdict(float)
        self.cpu_seconds: defaultdict[str, float] = defaultdict(float)
        self.setup_seconds: defaultdict[str, list[float]] = defaultdict(list)
        self.drops: list[dict[str, Any]] = []

    def setup(self, source: str, seconds: float) -> None:
        self.setup_seconds[source].append(seconds)

    def record(self, source: str, made: int, seconds: float, drops: list[dict[str, Any]], cpu_seconds: float = 0.0
               ) -> None:
        self.made[source] += made
        self.model_seconds[source] += seconds
        self.cpu_seconds[source] += cpu_seconds
        self.drops.extend(drops)

    def summary(self) -> dict[str, Any]:
        return {"made": dict(self.made), "model_seconds": dict(self.model_seconds),
                "cpu_seconds": dict(self.cpu_seconds),
                "setup_seconds": {k: list(v) for k, v in self.setup_seconds.items()}, "drops": list(self.drops)}


class GenerateActor:
    """One actor of a generator's pool: loads the model once, then turns request batches into image rows."""

    def __init__(self, spec: GeneratorSpec, cfg: GenerateConfig, stage_name: str, ledger: Any) -> None:
        started = time.perf_counter()
        device = claim(stage_name, f"{spec.name} actor", spec.runtime.gpus_per_actor, spec.runtime.threads).device
        self.spec, self.ledger = spec, ledger
        self.stage = GeneratorStage(spec, cfg.output, cfg.storage, device=device)
        self.stage.setup()
        self.throughput = Throughput(cfg.JOB, stage_name, units=("images",))
        ray.get(ledger.setup.remote(spec.name, time.perf_counter() - started))

    def __call__(self, requests: pa.Table) -> pa.Table:
        cpu = time.process_time()
        result = self.stage(requests)
        ray.get(self.ledger.record.remote(self.spec.name, result.table.num_rows, result.seconds, result.drops,
                                          time.process_time() - cpu))
        if result.table.num_rows:  # a Ray counter refuses increments of 0
            self.throughput.add(images=result.table.num_rows)
        return result.table


def _encode_real_batch(table: pa.Table, collection: str, cfg: GenerateConfig, ledger: Any) -> pa.Table:
    trained = next(r.generator_training for r in cfg.reals if r.name == collection)
    result = encode_reals(table, collection, cfg.output, trained)
    ray.get(ledger.record.remote(collection, result.table.num_rows, 0.0, result.drops))
    return result.table


def _files_to_reals(table: pa.Table, ids: dict[str, str]) -> pa.Table:
    return pa.table({"id": [ids[p] for p in table.column("path").to_pylist()], "image": table.column("bytes")},
                    schema=REAL_COLUMNS)


def _dataset_to_reals(table: pa.Table) -> pa.Table:
    if "label" in table.column_names:  # an image dataset: only its real rows
        table = table.filter(pc.equal(table.column("label"), 0))
    return pa.table({"id": table.column("id").cast(pa.string()), "image": table.column("image")},
                    schema=REAL_COLUMNS)


def real_dataset(real: RealSource, cfg: GenerateConfig) -> ray.data.Dataset:
    """Columns id (the collection's own id) and image (encoded bytes, not decoded yet)."""
    kind = real_kind(real.uri, cfg.storage)
    if kind == "alias":
        table = REAL_ALIASES[real.uri]()
        ds = ray.data.from_arrow(table.slice(0, real.limit) if real.limit else table)
    elif kind == "files":
        files = image_files(real.uri, cfg.storage)[: real.limit]
        fs, _ = Storage(real.uri, cfg.storage).pyarrow_filesystem()
        ids = {split_uri(f)[1]: file_id(real.uri, f) for f in files}
        ds = ray.data.read_binary_files([split_uri(f)[1] for f in files], filesystem=fs, include_paths=True)
        ds = ds.map_batches(_files_to_reals, fn_kwargs={"ids": ids}, batch_format="pyarrow", num_cpus=0.25)
    else:
        ds = read_dataset(real.uri, cfg.storage)
        require_columns(ds, real.uri, "id", "image")
        ds = ds.map_batches(_dataset_to_reals, batch_format="pyarrow", num_cpus=0.25)
        if real.limit:
            ds = ds.limit(real.limit)
    return ds


def request_dataset(spec: GeneratorSpec, cfg: GenerateConfig, prompts: list[str] | None) -> ray.data.Dataset:
    """The generator's requests, in enough blocks that every actor of its pool gets work."""
    base_seed = generator_seed(spec, cfg.seed)
    if isinstance(spec, Img2ImgGenerator):
        real = next(r for r in cfg.reals if r.name == spec.sources)
        ds = real_dataset(real, cfg).map_batches(
            lambda batch: source_requests(spec, base_seed, real.name, batch, prompts), batch_format="pyarrow",
            num_cpus=0.25)
        total = ds.count() * spec.per_source
        if total == 0:
            raise DataError(f"generator {spec.name}: real collection '{real.name}' ({real.uri}) has no images")
    else:
        total = spec.count
        ds = ray.data.range(total).map_batches(
            lambda batch: count_requests(spec, base_seed, prompts, batch["id"]), batch_format="numpy", num_cpus=0.25)
    actors = spec.runtime.num_actors
    blocks = max(2 * actors, min(math.ceil(total / spec.batch_size), 16 * actors))
    return ds.repartition(blocks)


def check_inputs(cfg: GenerateConfig) -> list[str] | None:
    """Everything that can be checked before any actor starts: prompts, model references, real collections."""
    from shared.diffusion.gan import check_gan_ref
    from shared.diffusion.pipelines import check_pipeline_ref
    from shared.diffusion.vae import check_vae_ref

    prompts = load_prompts(cfg.prompts, cfg.storage)
    checks = {"gan": check_gan_ref, "vae": check_vae_ref}
    for spec in cfg.generators:
        checks.get(spec.mode, check_pipeline_ref)(spec.model, cfg.storage)
    for real in cfg.reals:
        real_kind(real.uri, cfg.storage)
    return prompts


def run(cfg: GenerateConfig, stage: Stage) -> dict[str, Any]:
    prompts = check_inputs(cfg)
    ledger = DropLedger.remote()  # type: ignore[attr-defined]  # added by @ray.remote, unseen by mypy
    wall: dict[str, float] = {}
    shards: dict[str, list[str]] = {}

    for real in cfg.reals:
        if not real.write:
            continue
        print(f"generate: real collection {real.name} ({real.uri}) -> images/{real.name}", flush=True)
        started = time.perf_counter()
        ds = real_dataset(real, cfg).repartition(4).map_batches(
            _encode_real_batch, fn_args=(real.name, cfg, ledger), batch_format="pyarrow", num_cpus=0.25)
        shards[real.name] = _write(ds, stage, real.name)
        wall[real.name] = time.perf_counter() - started
        check_drops(ray.get(ledger.summary.remote()), real.name, cfg.max_drop_fraction)

    for spec in cfg.generators:
        pool = spec.runtime
        print(f"generate: {spec.name} ({spec.mode}, {spec.model}) on {pool.num_actors} actor(s) -> images/{spec.name}",
              flush=True)
        started = time.perf_counter()
        ds = request_dataset(spec, cfg, prompts).map_batches(
            GenerateActor, fn_constructor_args=(spec, cfg, stage.name, ledger),
            compute=actor_pool(pool), batch_size=spec.batch_size,
            batch_format="pyarrow", num_cpus=pool.cpus_per_actor, num_gpus=pool.gpus_per_actor or None)
        shards[spec.name] = _write(ds, stage, spec.name)
        wall[spec.name] = time.perf_counter() - started
        check_drops(ray.get(ledger.summary.remote()), spec.name, cfg.max_drop_fraction)

    summary = ray.get(ledger.summary.remote())
    stage.outputs["dataset"] = "images"
    from shared.diffusion.duplicates import source_duplicates
    from shared.diffusion.report import generate_report, read_written

    metrics = generate_report(cfg, stage.store, wall, summary, shards)
    written = read_written(stage.store, [f for files in shards.values() for f in files], ["id", "source", "image"])
    metrics["near_duplicates"] = source_duplicates(written.column("id").to_pylist(),
                                                   written.column("source").to_pylist(),
                                                   written.column("image").to_pylist())
    print(f"generate: {metrics['near_duplicates']['pairs']} near-duplicate pair(s) across sources "
          f"{metrics['near_duplicates']['by_sources']}", flush=True)
    return metrics


def _write(ds: ray.data.Dataset, stage: Stage, source: str) -> list[str]:
    """Stream the rows to images/<source>/ in this attempt; returns the files written (registered with the stage)."""
    return shard_uris(stage, f"images/{source}", write_shards(ds, stage, "images", source))
