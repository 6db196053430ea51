"""train-detector: a real/fake image detector on a mixture of image datasets, with Ray Train (DDP) and momentum
difficulty boosting.

    scopeforge run train-detector --config my-detector.yaml
    scopeforge run train-detector --set 'sources=[{name: data, uri: runs/demo-deepfake/data}]' --set epochs=5

1. Plan the mixture from the metadata (rows, splits, stable indices, difficulty groups); decode the images once with
   Ray Data, dropping and listing those that cannot be decoded.
2. Ray Train: each worker trains on its shard of the train split; the loss is weighted by the Booster (whose
   difficulty state is gathered across workers); every epoch ends with the validation AUC, a progress line, and a
   checkpoint (model, optimiser, difficulty state) in Ray Train storage under the stage (local or s3://). A crashed
   run resumes from its latest checkpoint when rerun; Ray Train keeps the best checkpoint by validation AUC.
3. Export the best checkpoint as the stage's model, the difficulty history and per-sample difficulties, a report.

A little over 200 lines: the per-worker loop (dataset shards, the cross-worker check of the difficulty state) and the
resume_from checkpoint are Ray Train glue; the training itself is shared.detection.trainer.DetectorTrainer.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.train
import torch.distributed as dist
from ray.data import ExecutionOptions, RandomSeedConfig
from ray.train import CheckpointConfig, DataConfig, LoggingConfig

from ray_jobs.detector_data import decode_mixture, split_of
from ray_jobs.metrics import TrainingProgress
from ray_jobs.placement import claim
from ray_jobs.train_launch import fit_workers, report_state, restore_state
from shared.checkpoint import FINGERPRINT_FILE, check_fingerprint, load_training_state
from shared.configs.train_detector import DetectorConfig
from shared.data import write_parquet
from shared.detection.backbones import DetectorSpec, TrainedOn, build_detector, make_spec, save_detector
from shared.detection.mixture import LABEL_NAMES, plan_mixture
from shared.detection.report import training_report
from shared.detection.trainer import DetectorTrainer
from shared.errors import DataError
from shared.stage import Stage
from shared.storage import Storage

RUN_NAME = "run"  # Ray Train run folder under <stage>/checkpoints/<config>/; a rerun of the same config resumes it


# ---------------------------------------------------------------------------------------------------------------------
# The loop on each Ray Train worker


@dataclass(frozen=True)
class DetectorWork:
    """What every training worker gets."""

    cfg: DetectorConfig
    spec: DetectorSpec
    fingerprint: dict[str, Any]
    """The settings and the mixture a checkpoint must match to be resumed."""
    groups: np.ndarray
    """The difficulty group of each sample, by its stable index."""
    group_names: list[str]
    resume_from: ray.train.Checkpoint | None
    """``cfg.resume_from`` as a checkpoint, checked on the driver (None: none)."""
    steps_per_epoch: int
    """Optimiser steps of one worker per epoch (the learning-rate schedule spans epochs x this)."""


def train_loop(work: DetectorWork) -> dict[str, Any]:
    cfg, fingerprint = work.cfg, work.fingerprint
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # our own progress lines only
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    # --- setup: model, optimiser, booster; state from the latest checkpoint (a crashed run) or resume_from
    device = claim(cfg.stage_name, "training worker", 1.0 if cfg.runtime.use_gpu else 0.0, train=True).device
    trainer = DetectorTrainer(cfg, work.spec, work.groups, work.group_names, rank=rank, device=device,
                              wrap=ray.train.torch.prepare_model, steps_per_epoch=work.steps_per_epoch)
    progress = TrainingProgress("train-detector", cfg.stage_name) if rank == 0 else None
    # this run's latest checkpoint (after a crash), else resume_from
    resume_from = (work.resume_from, str(cfg.resume_from)) if work.resume_from is not None else None
    state = restore_state(fingerprint, "train-detector", fallback=resume_from)
    if state is not None:
        trainer.load_state_dict(state)
        if rank == 0:
            print(f"resuming after epoch {trainer.next_epoch} of {cfg.epochs} (difficulty state of "
                  f"{int(trainer.booster.state.seen.sum())} tracked samples)", flush=True)
    start_epoch = trainer.next_epoch
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")

    # --- the loop: one epoch of weighted training, validation, a checkpoint
    for epoch in range(start_epoch, cfg.epochs):
        batches = train_shard.iter_batches(batch_size=cfg.batch_size, batch_format="numpy",
                                           local_shuffle_buffer_size=cfg.shuffle_buffer or None,
                                           local_shuffle_seed=cfg.seed * 10_007 + epoch * 101 + rank)
        totals = trainer.train_epoch(batches, epoch, on_batch=None if progress is None else
                                     progress.reporter((epoch + 1) / cfg.epochs))
        val = trainer.validate(val_shard.iter_batches(batch_size=cfg.batch_size, batch_format="numpy"), world)
        metrics, hardest = trainer.end_epoch(epoch, totals, val)
        if world > 1:
            checksums: list[str | None] = [None] * world
            dist.all_gather_object(checksums, metrics["state_checksum"])
            if len(set(checksums)) != 1:
                raise RuntimeError(f"difficulty state diverged across workers: {checksums}")
        if rank == 0:
            print(f"epoch {epoch + 1}/{cfg.epochs}: loss {metrics['train_loss']:.4f}  val AUC {val['val_auc']:.4f} "
                  f"(best {trainer.best_auc:.4f})  ACC {val['val_acc']:.3f}  {metrics['samples_per_second']:.0f} "
                  f"samples/s  hardest group {hardest['group']} (m={hardest['mean_difficulty']:.3f})", flush=True)
        report_state(metrics, trainer.state_dict(), fingerprint, rank=rank)

    # --- the rank-0 return value is the trainer's result
    return {"start_epoch": start_epoch, "epochs_run": cfg.epochs - start_epoch, "world_size": world}


# ---------------------------------------------------------------------------------------------------------------------
# The driver


def _resume_checkpoint(cfg: DetectorConfig, fingerprint: dict[str, Any]) -> ray.train.Checkpoint | None:
    """``resume_from`` as a Ray Train checkpoint, after checking (here, before any worker starts) that it was
    written under the same settings."""
    if not cfg.resume_from:
        return None
    store = Storage(cfg.resume_from, cfg.storage)
    if not store.exists(FINGERPRINT_FILE):
        raise DataError(f"resume_from {cfg.resume_from}: no {FINGERPRINT_FILE} there (expected a checkpoint folder "
                        "of a train-detector stage, <stage>/checkpoints/<config>/run/checkpoint_...)")
    check_fingerprint(fingerprint, store.read_json(FINGERPRINT_FILE), cfg.resume_from)
    fs, path = store.pyarrow_filesystem()
    return ray.train.Checkpoint(path, filesystem=fs)


def _checkpoint_state(checkpoint: ray.train.Checkpoint, fingerprint: dict[str, Any]) -> dict[str, Any]:
    with checkpoint.as_directory() as folder:
        return load_training_state(folder, fingerprint, checkpoint.path)


def run(cfg: DetectorConfig, stage: Stage) -> dict[str, Any]:
    # 1. the mixture: plan from metadata, decode once, drop and count what cannot be decoded
    plan = plan_mixture(cfg.sources, cfg.split, cfg.storage)
    for row in plan.counts():
        print(f"  {row['dataset']}: {row['source']} ({row['label']}) {row['split']}: {row['rows']}")
    fingerprint = {"config": cfg.fingerprint(), "mixture": plan.fingerprint}
    resume_from = _resume_checkpoint(cfg, fingerprint)
    decoded, dropped = decode_mixture(plan, cfg.storage, blocks=max(8, 4 * cfg.runtime.num_workers),
                                      shuffle_seed=cfg.seed)
    if dropped:
        print(f"dropped {len(dropped)} undecodable image(s), e.g. {dropped[0]['dataset']}/{dropped[0]['id']}: "
              f"{dropped[0]['reason']}", flush=True)
    if len(dropped) > cfg.max_bad_fraction * plan.num_samples:
        raise DataError(f"{len(dropped)} of {plan.num_samples} images cannot be decoded (more than max_bad_fraction "
                        f"{cfg.max_bad_fraction:g}), e.g. {dropped[0]['dataset']}/{dropped[0]['id']}: "
                        f"{dropped[0]['reason']}")
    train_ds, val_ds = split_of(decoded, "train"), split_of(decoded, "val")
    bad = {int(d["index"]) for d in dropped}
    labels, splits, index = plan.column("label"), plan.column("split"), plan.column("index")
    for split in ("train", "val"):
        present = {int(y) for y, s, i in zip(labels, splits, index) if s == split and int(i) not in bad}
        if present != {0, 1}:
            raise DataError(f"training mixture: after dropping undecodable images the {split} split has only "
                            f"{', '.join(LABEL_NAMES[y] for y in sorted(present)) or 'no'} images")

    # 2. Ray Train
    spec = replace(make_spec(cfg.model, cfg.input_size or plan.height, cfg.storage),
                   training=TrainedOn(cfg.split.model_dump(), plan.group_names, [s.model_dump() for s in cfg.sources],
                                      cfg.boosting.method))
    train_rows = int(sum(1 for s, i in zip(splits, index) if s == "train" and int(i) not in bad))
    per_worker = -(-train_rows // cfg.runtime.num_workers)
    work = DetectorWork(cfg, spec, fingerprint, plan.column("group"), plan.group_names, resume_from,
                        steps_per_epoch=max(1, -(-per_worker // cfg.batch_size)))
    started = time.time()
    result = fit_workers(
        train_loop, work, stage, cfg.runtime, run_name=RUN_NAME,
        checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="val_auc",
                                           checkpoint_score_order="max"),
        logging_config=LoggingConfig(log_level="WARNING"),
        # the block order is redrawn every epoch, from the seed: the same draws in every run of this config
        datasets={"train": train_ds.randomize_block_order(seed=RandomSeedConfig(cfg.seed, reseed_after_execution=True)),
                  "val": val_ds},
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=ExecutionOptions(preserve_order=True)))

    # 3. outputs: the best model, the difficulty state and history, a report
    best = _checkpoint_state(result.get_best_checkpoint("val_auc", "max"), fingerprint)
    model = build_detector(spec)
    model.load_state_dict(best["model"])
    save_detector(model, spec, stage.store, "model")
    stage.outputs["model"] = "model"
    latest = _checkpoint_state(result.checkpoint, fingerprint)
    history = latest["history"]
    difficulty_history = latest["booster"]["history"]
    state = latest["booster"]["difficulty"]
    per_sample = plan.rows.append_column("difficulty", pa.array(state["m"].numpy())) \
        .append_column("tracked", pa.array(state["seen"].numpy()))
    write_parquet(per_sample, stage.store, "difficulty", "per_sample.parquet")
    stage.store.write_json(difficulty_history, "difficulty", "history.json")
    stage.store.write_json(history, "history.json")
    best_epoch = max(history, key=lambda h: h["val_auc"])
    metrics = {
        "best_epoch": best_epoch["epoch"], "best_val_auc": best_epoch["val_auc"], "best_val_ap": best_epoch["val_ap"],
        "final_val_auc": history[-1]["val_auc"], "epochs": len(history), "boosting": cfg.boosting.method,
        "samples": {s: int((splits == s).sum()) for s in ("train", "val")}, "groups": plan.group_names,
        "dropped": {"count": len(dropped), "rows": dropped[:50]}, "skipped_rows": plan.skipped,
        "train_seconds": round(time.time() - started, 1), "mixture_fingerprint": plan.fingerprint,
        "world_size": cfg.runtime.num_workers,
        "resumed_at_epoch": (result.return_value or {}).get("start_epoch") or None,
        "state_checksum": history[-1]["state_checksum"],
        "history": history, "difficulty_history": difficulty_history,
    }
    training_report(cfg, plan, metrics).save(stage.store, "report.html")
    print(f"best val AUC {metrics['best_val_auc']:.4f} at epoch {metrics['best_epoch'] + 1}; model -> "
          f"{stage.store.uri('model')}", flush=True)
    return metrics
