"""Detector training cost, as JSON lines (no assertion on time; each figure is compared with a baseline measured in the
same run):

1. step time with momentum difficulty boosting vs a plain mean cross-entropy: the same model, optimiser and batches,
   stepped in alternation (median per-step wall and CPU time), one process (no gather across workers).
   Goal: ratio <= 1.03.
2. samples/s of the train-detector job (Ray Train, 1 worker, Ray Data shard) vs a bare PyTorch loop over the same
   decoded images with the same train_step, batch size, augmentations and booster, one thread each (a Ray Train
   worker with 1 CPU gets OMP_NUM_THREADS=1).

    .venv/bin/python benchmarks/detector_step.py [--epochs 6] [--rounds 5] [--steps 40] [--only step|throughput]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from shared.config import validate_config
from shared.configs.standin_faces import StandinFacesConfig
from shared.configs.train_detector import DetectorConfig
from shared.data import write_parquet
from shared.detection.backbones import build_detector, make_spec
from shared.detection.boosting import Booster
from shared.detection.mixture import plan_mixture
from shared.detection.standin import standin_table
from shared.detection.trainer import DetectorTrainer
from shared.detection.training import train_step
from shared.imageset import decode_image
from shared.storage import Storage

MODEL = {"kind": "small-cnn", "width": 16}


def step_overhead(rounds: int, steps: int, batch: int = 32, size: int = 32, samples: int = 2000) -> dict:
    """Per-step time of the plain and the boosted objective on identical batches (past the warm-up).

    One model and optimiser take every batch twice, once per objective, in swapped order every other step, so a
    change of machine load hits both alike; wall time and this thread's CPU time are both kept (CPU time is the
    fairer measure on a shared machine).
    """
    torch.set_num_threads(1)
    cfg = DetectorConfig(sources=[{"name": "d", "uri": "x"}], model=MODEL,
                         boosting={"method": "momentum", "warmup_epochs": 0})
    spec = make_spec(cfg.model, size)
    rng = np.random.default_rng(0)
    n = rounds * steps
    images = rng.integers(0, 256, (n, batch, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, 2, (n, batch))
    index = np.stack([rng.choice(samples, batch, replace=False) for _ in range(n)])
    groups = rng.integers(0, 6, samples)
    no_aug = cfg.augment.model_copy(update={"hflip": 0.0, "crop_scale_min": 1.0, "blur_prob": 0.0, "jpeg_prob": 0.0})
    torch.manual_seed(0)
    model = build_detector(spec)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    boosters = {"plain": None, "boosted": Booster(cfg.boosting, groups, [f"g{i}" for i in range(6)])}
    wall: dict[str, list[float]] = {"plain": [], "boosted": []}
    cpu: dict[str, list[float]] = {"plain": [], "boosted": []}
    for k in range(-2, n):  # two untimed warm-up steps
        batch_k = {"image": images[max(k, 0)], "label": labels[max(k, 0)], "index": index[max(k, 0)]}
        for name in (("plain", "boosted") if k % 2 == 0 else ("boosted", "plain")):
            w0, c0 = time.perf_counter(), time.thread_time()
            train_step(model, opt, boosters[name], batch_k, 1, spec, no_aug, rng)
            if k >= 0:
                wall[name].append(time.perf_counter() - w0)
                cpu[name].append(time.thread_time() - c0)
    med = {f"{m}_{name}": statistics.median(v[name]) for m, v in (("wall", wall), ("cpu", cpu)) for name in v}
    return {"benchmark": "detector_step", "model": f"small-cnn width {MODEL['width']}", "batch": batch,
            "input": size, "tracked_samples": samples, "steps": n,
            "plain_step_ms": round(med["wall_plain"] * 1e3, 3), "boosted_step_ms": round(med["wall_boosted"] * 1e3, 3),
            "ratio_wall": round(med["wall_boosted"] / med["wall_plain"], 4),
            "plain_step_cpu_ms": round(med["cpu_plain"] * 1e3, 3),
            "boosted_step_cpu_ms": round(med["cpu_boosted"] * 1e3, 3),
            "ratio_cpu": round(med["cpu_boosted"] / med["cpu_plain"], 4), "goal": "ratio <= 1.03",
            "load_average_1m": os.getloadavg()[0]}


def throughput(epochs: int) -> dict:
    """train-detector on Ray Train (1 worker) vs the same loop in this process."""
    from ray_jobs.runtime import init_ray, run_job

    work = Path(tempfile.mkdtemp(prefix="detector-bench-"))
    faces = StandinFacesConfig(size=32, fakes_per_generator=100)
    data = Storage(str(work)).child("faces")
    write_parquet(standin_table(faces), data, "part-0.parquet")
    settings = {"output_root": str(work / "runs"), "sources": [{"name": "faces", "uri": data.uri()}],
                "model": MODEL, "epochs": epochs, "batch_size": 32,
                "runtime": {"num_workers": 1, "max_failures": 0},
                "boosting": {"method": "momentum", "warmup_epochs": 1}}
    cfg = validate_config(DetectorConfig, settings, "benchmark")

    # bare loop: the same planned rows, decoded here, the same step function, one thread
    torch.set_num_threads(1)
    plan = plan_mixture(cfg.sources, cfg.split)
    table = standin_table(faces)
    by_id = dict(zip(table.column("id").to_pylist(), table.column("image").to_pylist()))
    train = plan.rows.filter(np.asarray(plan.column("split")) == "train")
    images = np.stack([decode_image(by_id[i]) for i in train.column("id").to_pylist()])
    labels, index = train.column("label").to_numpy(), train.column("index").to_numpy()
    spec = make_spec(cfg.model, plan.height)

    def bare_loop() -> tuple[list[float], list[float]]:
        """The job's DetectorTrainer.train_epoch over in-memory batches (a plain permutation per epoch)."""
        trainer = DetectorTrainer(cfg, spec, plan.column("group"), plan.group_names)
        order_rng = np.random.default_rng(0)
        rates, cpu_rates = [], []
        for epoch in range(epochs):
            order = order_rng.permutation(len(labels))
            batches = ({"image": images[sel], "label": labels[sel], "index": index[sel]}
                       for sel in (order[k: k + cfg.batch_size] for k in range(0, len(order), cfg.batch_size)))
            totals = trainer.train_epoch(batches, epoch)
            trainer.booster.end_epoch(epoch)
            rates.append(totals.samples / totals.seconds)
            cpu_rates.append(totals.samples / totals.cpu_seconds)
        return rates, cpu_rates

    before = bare_loop()
    init_ray()
    started = time.time()
    metrics = run_job(cfg)
    wall = time.time() - started
    after = bare_loop()
    ray_rates = [h["samples_per_second"] for h in metrics["history"]]
    ray_cpu = [h["train_samples"] / h["train_cpu_seconds_rank0"] for h in metrics["history"]]
    steady = lambda values: statistics.median(values[1:])  # noqa: E731 (first epoch excluded everywhere)
    bare_wall = statistics.median([steady(before[0]), steady(after[0])])
    bare_cpu = statistics.median([steady(before[1]), steady(after[1])])
    return {"benchmark": "detector_throughput", "workers": 1, "epochs": epochs, "train_images": int(len(labels)),
            "ray_train_samples_per_s": round(steady(ray_rates), 1),
            "bare_loop_samples_per_s": round(bare_wall, 1),
            "bare_loop_before_after": [round(steady(before[0]), 1), round(steady(after[0]), 1)],
            "ratio_wall": round(steady(ray_rates) / bare_wall, 3),
            "ray_train_samples_per_cpu_s": round(steady(ray_cpu), 1), "bare_loop_samples_per_cpu_s": round(bare_cpu, 1),
            "ratio_cpu": round(steady(ray_cpu) / bare_cpu, 3),
            "note": "medians over epochs 2..N; bare loop run before and after the Ray job; the Ray CPU time is the "
                    "training worker process's (Ray Data's own processes not included)",
            "ray_job_wall_s": round(wall, 1),
            "ray_job_epochs_s": round(sum(h["epoch_seconds"] for h in metrics["history"]), 1),
            "load_average_1m": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--only", choices=["step", "throughput"], help="run one of the two measurements")
    args = parser.parse_args()
    if args.only != "throughput":
        print(json.dumps(step_overhead(args.rounds, args.steps)), flush=True)
    if args.only != "step":
        print(json.dumps(throughput(args.epochs)), flush=True)


if __name__ == "__main__":
    main()
