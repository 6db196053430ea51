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
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, DataConfig, LoggingConfig

from ray_jobs.detector_data import decode_mixture, split_of
from ray_jobs.metrics import TrainingProgress
from ray_jobs.placement import claim
from ray_jobs.train_launch import fit_workers
from shared.checkpoint import FINGERPRINT_FILE, check_fingerprint, load_training_state, save_training_state
from shared.configs.train_detector import DetectorConfig
from shared.data import write_parquet
from shared.detection.augment import resize_batch, to_tensor
from shared.detection.backbones import build_detector, fake_probability, make_spec, save_detector, unwrap
from shared.detection.boosting import Booster, torch_all_gather
from shared.detection.metrics import accuracy, average_precision, roc_auc
from shared.detection.mixture import LABEL_NAMES, plan_mixture
from shared.detection.report import training_report
from shared.detection.training import train_step
from shared.errors import DataError
from shared.stage import Stage
from shared.storage import Storage

RUN_NAME = "run"  # Ray Train run folder under <stage>/checkpoints/<config>/; a rerun of the same config resumes it


# ---------------------------------------------------------------------------------------------------------------------
# The loop on each Ray Train worker


def _gather(values: torch.Tensor) -> torch.Tensor:
    return torch_all_gather(values) if dist.is_initialized() and dist.get_world_size() > 1 else values


def validate(model: torch.nn.Module, val_iter: Any, spec: dict[str, Any], batch_size: int, rank: int, world: int,
             device: torch.device) -> dict[str, float]:
    """AUC / AP / ACC on the whole validation split: each worker scores the rows with index % world == rank, then
    every worker gathers all scores (so every worker returns the same figures)."""
    net = unwrap(model).eval()  # no DDP forward: ranks score different numbers of batches
    idx_l, score_l, label_l = [], [], []
    for batch in val_iter.iter_batches(batch_size=batch_size, batch_format="numpy"):
        mine = batch["index"] % world == rank
        if not mine.any():
            continue
        x = to_tensor(resize_batch(batch["image"][mine], spec["input_size"]), spec["mean"], spec["std"])
        score_l.append(fake_probability(net, x.to(device)).double().cpu())
        idx_l.append(torch.from_numpy(batch["index"][mine]).double())
        label_l.append(torch.from_numpy(batch["label"][mine]).double())
    local = torch.stack([torch.cat(idx_l or [torch.zeros(0, dtype=torch.float64)]),
                         torch.cat(score_l or [torch.zeros(0, dtype=torch.float64)]),
                         torch.cat(label_l or [torch.zeros(0, dtype=torch.float64)])], dim=1)
    rows = _gather(local.reshape(-1)).reshape(-1, 3).numpy()
    labels, scores = rows[:, 2].astype(np.int64), rows[:, 1]
    return {"val_auc": roc_auc(labels, scores), "val_ap": average_precision(labels, scores),
            "val_acc": accuracy(labels, scores), "val_samples": int(rows.shape[0])}


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    cfg: DetectorConfig = config["cfg"]
    spec, fingerprint = config["spec"], config["fingerprint"]
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # our own progress lines only
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    # --- setup: model, optimiser, booster; state from the latest checkpoint (a crashed run) or resume_from
    gpus = 1.0 if cfg.runtime.use_gpu else 0.0
    device = torch.device(claim(cfg.stage_name, "training worker", gpus, train=True).device)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng([cfg.seed, rank])
    model = ray.train.torch.prepare_model(build_detector(spec, pretrained=True, options=cfg.storage))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    booster = Booster(cfg.boosting, config["groups"], config["group_names"])
    progress = TrainingProgress("train-detector", cfg.stage_name) if rank == 0 else None
    start_epoch, history, best_auc = 0, [], None
    checkpoint, where = ray.train.get_checkpoint(), None  # this run's latest (after a crash), else resume_from
    if checkpoint is None and config["resume_from"] is not None:
        checkpoint, where = config["resume_from"], cfg.resume_from
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_training_state(folder, fingerprint, where or checkpoint.path)
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])  # moves the moments to the parameters' device
        booster.load_state_dict(state["booster"])
        start_epoch, history = state["epoch"] + 1, list(state["history"])
        best_auc = max((h["val_auc"] for h in history), default=None)
        if rank == 0:
            print(f"resuming after epoch {state['epoch'] + 1} of {cfg.epochs} (difficulty state of "
                  f"{int(booster.state.seen.sum())} tracked samples)", flush=True)
    train_shard = ray.train.get_dataset_shard("train")
    val_iter = ray.train.get_dataset_shard("val")

    # --- the loop: one epoch of weighted training, validation, a checkpoint
    for epoch in range(start_epoch, cfg.epochs):
        started, cpu_started = time.perf_counter(), time.process_time()
        model.train()
        loss_sum = torch.zeros(2, dtype=torch.float64)  # (sum of batch losses x batch size, samples)
        for batch in train_shard.iter_batches(batch_size=cfg.batch_size, batch_format="numpy",
                                              local_shuffle_buffer_size=cfg.shuffle_buffer or None,
                                              local_shuffle_seed=cfg.seed * 10_007 + epoch * 101 + rank):
            loss, n = train_step(model, optimizer, booster, batch, epoch, spec, cfg.augment, rng, device)
            loss_sum += torch.tensor([loss * n, n], dtype=torch.float64)
            if progress is not None:
                progress.report(loss, (epoch + 1) / cfg.epochs)
        totals = _gather(loss_sum).reshape(-1, 2).sum(dim=0)
        train_seconds, train_cpu = time.perf_counter() - started, time.process_time() - cpu_started
        val = validate(model, val_iter, spec, cfg.batch_size, rank, world, device)
        groups = booster.end_epoch(epoch)["groups"]
        checksums = [None] * world
        if world > 1:
            dist.all_gather_object(checksums, booster.state.checksum())
            if len(set(checksums)) != 1:
                raise RuntimeError(f"difficulty state diverged across workers: {checksums}")
        metrics = {"epoch": epoch, "train_loss": float(totals[0] / totals[1]), **val,
                   "train_samples": int(totals[1]), "samples_per_second": float(totals[1] / train_seconds),
                   "train_cpu_seconds_rank0": train_cpu,
                   "epoch_seconds": time.perf_counter() - started, "state_checksum": booster.state.checksum()}
        history.append(metrics)
        best_auc = val["val_auc"] if best_auc is None else max(best_auc, val["val_auc"])
        if rank == 0:
            hardest = max((g for g in groups if g["mean_difficulty"] is not None), key=lambda g: g["mean_difficulty"])
            print(f"epoch {epoch + 1}/{cfg.epochs}: loss {metrics['train_loss']:.4f}  val AUC {val['val_auc']:.4f} "
                  f"(best {best_auc:.4f})  ACC {val['val_acc']:.3f}  {metrics['samples_per_second']:.0f} samples/s  "
                  f"hardest group {hardest['group']} (m={hardest['mean_difficulty']:.3f})", flush=True)
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if rank == 0:
                save_training_state(folder, {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                                             "booster": booster.state_dict(), "epoch": epoch, "history": history},
                                    fingerprint)
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=checkpoint)

    # --- cleanup: the rank-0 return value is the trainer's result
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
    spec = make_spec(cfg.model, cfg.input_size or plan.height, cfg.storage)
    spec["training"] = {"split": cfg.split.model_dump(), "groups": plan.group_names,
                        "sources": [s.model_dump() for s in cfg.sources], "boosting": cfg.boosting.method}
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # worker prints reach the driver once, not twice
    config = {"cfg": cfg, "spec": spec, "fingerprint": fingerprint, "groups": plan.column("group"),
              "group_names": plan.group_names, "resume_from": resume_from}
    started = time.time()
    result = fit_workers(
        train_loop, config, stage, cfg.runtime, run_name=RUN_NAME,
        checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="val_auc",
                                           checkpoint_score_order="max"),
        logging_config=LoggingConfig(log_level="WARNING"),
        datasets={"train": train_ds.randomize_block_order(), "val": val_ds},  # block order redrawn every epoch
        dataset_config=DataConfig(datasets_to_split=["train"]))

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
