"""evaluate-detector: score test sets with trained detectors (Ray Data actor pool) and write the evaluation matrix.

    scopeforge run evaluate-detector --config my-eval.yaml

1. Check the detectors load and agree on the split; plan each test set (its split's rows), decode it with Ray Data
   (undecodable images are dropped and listed).
2. Score: one actor pool, each actor loads every detector once and scores every batch under every condition (clean,
   JPEG re-compression, blur), the same perturbation for reals and fakes.
3. The matrix (ACC / AUC / AP / EER per detector x generator and real collection, per condition), ROC curves as PNG,
   results.md, report.html, scores.parquet and metrics.json.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from ray_jobs.data import actor_pool
from ray_jobs.detector_data import decode_mixture
from ray_jobs.placement import claim
from shared.config import ActorPoolConfig, StorageConfig
from shared.configs.evaluate_detector import EvaluateDetectorConfig
from shared.configs.train_detector import SourceConfig, SplitConfig
from shared.data import write_parquet
from shared.detection.augment import perturb_batch, resize_batch, to_tensor
from shared.detection.backbones import DetectorSpec, TrainedOn, fake_probability, load_detector
from shared.detection.evaluation import conditions, evaluation_matrix, markdown_report, roc_curves
from shared.detection.mixture import SPLITS, plan_mixture
from shared.detection.report import difficulty_figure, roc_figure
from shared.errors import ConfigError
from shared.report import Report
from shared.stage import Stage, committed_folder
from shared.storage import Storage


class Scorer:
    """Ray Data actor: every detector loaded once; a batch in, one score column per (detector, condition) out."""

    def __init__(self, detectors: list[tuple[str, str]], conditions: list[tuple[str, str, float]],
                 storage: StorageConfig | None, stage_name: str, pool: ActorPoolConfig):
        self.device = claim(stage_name, "scoring actor", pool.gpus_per_actor, pool.threads).device
        self.models = []
        for name, uri in detectors:
            model, spec = load_detector(uri, storage)
            self.models.append((name, model.to(self.device), spec))
        self.conditions = conditions

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {"index": batch["index"], "label": batch["label"]}
        for cond, kind, strength in self.conditions:
            images = perturb_batch(batch["image"], kind, strength)  # at the data's resolution, reals and fakes alike
            for name, model, spec in self.models:
                x = to_tensor(resize_batch(images, spec.input_size), spec.mean, spec.std)
                out[f"{name}|{cond}"] = fake_probability(model, x.to(self.device)).cpu().numpy().astype(np.float64)
        return out


def _same_place(a: str, b: str) -> bool:
    return Storage(a).uri() == Storage(b).uri() if "://" not in a + b else a.rstrip("/") == b.rstrip("/")


def _seen(training: TrainedOn | None, testset_uri: str, column_source: str, label: str) -> bool:
    """Whether a detector's training mixture took ``column_source`` images of this class from this dataset."""
    for s in training.sources if training is not None else []:
        if _same_place(s["uri"], testset_uri) and (not s["include"] or column_source in s["include"]) \
                and column_source not in s["exclude"] and label in s["labels"]:
            return True
    return False


def resolve_split(cfg: EvaluateDetectorConfig, specs: dict[str, DetectorSpec]) -> SplitConfig:
    """The configured split, or the one every detector was trained with; refuses to test on training images."""
    trained = {name: spec.training.split if spec.training else None for name, spec in specs.items()}
    if cfg.split is None:
        known = [v for v in trained.values() if v is not None]
        if len(known) != len(trained) or len({str(v) for v in known}) != 1:
            raise ConfigError(f"evaluate-detector: the detectors were trained with different (or unknown) splits "
                              f"({'; '.join(f'{k}: {v}' for k, v in trained.items())}); set 'split' explicitly")
        return SplitConfig(**known[0])
    for t in cfg.test_sets:
        for name, spec in specs.items():
            sources = spec.training.sources if spec.training else []
            overlaps = any(_same_place(s["uri"], t.uri) for s in sources)
            if overlaps and (t.split != "test" or trained[name] != cfg.split.model_dump()):
                raise ConfigError(f"test set '{t.name}': detector '{name}' was trained on {t.uri}, so only its own "
                                  "test split is unseen (leave 'split' unset and use split: test)")
    return cfg.split


def run(cfg: EvaluateDetectorConfig, stage: Stage) -> dict[str, Any]:
    # 1. detectors, split, test sets
    specs = {d.name: load_detector(d.uri, cfg.storage)[1] for d in cfg.detectors}
    split = resolve_split(cfg, specs)
    conds = conditions(cfg.robustness.jpeg_quality, cfg.robustness.blur_sigma)
    frames, dropped, started = [], [], time.time()
    for t in cfg.test_sets:
        keep = SPLITS if t.split == "all" else (t.split,)
        plan = plan_mixture([SourceConfig(name=t.name, uri=t.uri)], split, cfg.storage, keep_splits=keep,
                            require_both_classes=(), what=f"test set '{t.name}'")
        decoded, bad = decode_mixture(plan, cfg.storage, blocks=max(2, 2 * cfg.runtime.most_actors))
        dropped += [{**row, "test_set": t.name} for row in bad]
        if bad:
            print(f"test set '{t.name}': dropped {len(bad)} undecodable image(s), e.g. {bad[0]['id']}: "
                  f"{bad[0]['reason']}", flush=True)

        # 2. score every image with every detector under every condition
        scored = decoded.map_batches(
            Scorer, fn_constructor_kwargs={"detectors": [(d.name, d.uri) for d in cfg.detectors], "conditions": conds,
                                           "storage": cfg.storage, "stage_name": cfg.stage_name,
                                           "pool": cfg.runtime},
            compute=actor_pool(cfg.runtime), num_cpus=cfg.runtime.cpus_per_actor,
            num_gpus=cfg.runtime.gpus_per_actor or None,
            batch_size=cfg.batch_size, batch_format="numpy")
        frame = scored.to_pandas()
        meta = plan.rows.to_pandas()[["index", "id", "source"]]
        frame = frame.merge(meta, on="index", how="left").assign(test_set=t.name)
        frames.append(frame)
        print(f"test set '{t.name}' ({t.split} split): scored {len(frame)} images with {len(cfg.detectors)} "
              f"detector(s) under {len(conds)} condition(s)", flush=True)
    scores = pd.concat(frames, ignore_index=True).sort_values(["test_set", "index"], kind="mergesort")

    # 3. the matrix and its reports
    testset = scores["test_set"].to_numpy(dtype=object)
    source = scores["source"].to_numpy(dtype=object)
    label = scores["label"].to_numpy(dtype=np.int64)
    by_key = {(d.name, c[0]): scores[f"{d.name}|{c[0]}"].to_numpy() for d in cfg.detectors for c in conds}
    matrix, columns = evaluation_matrix(testset, source, label, by_key, cfg.threshold)
    names = [d.name for d in cfg.detectors]
    column_meta = {}
    for col in columns:
        t_name = col.split("/", 1)[0] if len(cfg.test_sets) > 1 else cfg.test_sets[0].name
        src = col.split("/", 1)[1] if len(cfg.test_sets) > 1 else col
        is_real = bool(((source == src) & (label == 0) & (testset == t_name)).any())
        column_meta[col] = (next(t.uri for t in cfg.test_sets if t.name == t_name), src, "real" if is_real else "fake")
    seen = {d: {c for c, (uri, src, lab) in column_meta.items() if _seen(specs[d].training, uri, src, lab)}
            for d in names}
    counts = {c: {k: v for k, v in matrix[names[0]][c]["clean"].items() if k.startswith("n_")} for c in columns}
    markdown = markdown_report(matrix, names, list(columns), [c[0] for c in conds], counts, cfg.threshold, seen)
    stage.store.write_text(markdown + "\n", "results.md")
    report = Report(f"evaluate-detector: {cfg.stage_name}")
    report.pre(markdown)
    for d in names:
        curves = roc_curves(label, by_key[(d, "clean")], columns)
        png = report.add_figure(roc_figure(report, d, curves), f"ROC curves of {d} (clean test images)")
        stage.store.write_bytes(png, "roc", f"{d}.png")
    for det in cfg.detectors:  # which sources were hard to learn, for detectors that are train-detector stages
        folder = Storage(committed_folder(det.uri, cfg.storage), cfg.storage)
        if folder.exists("difficulty", "history.json"):
            report.add_figure(difficulty_figure(report, folder.read_json("difficulty", "history.json")),
                              f"{det.name}: mean difficulty (EMA of the loss) and loss weight per training group")
    if dropped:
        report.table(f"Dropped: {len(dropped)} undecodable test image(s)", dropped[:50])
    report.save(stage.store, "report.html")
    write_parquet(pa.Table.from_pandas(scores, preserve_index=False), stage.store, "scores.parquet")
    print(markdown.split("## ACC")[0], flush=True)
    return {
        "matrix": matrix, "columns": list(columns), "conditions": [c[0] for c in conds], "detectors": names,
        "auc": {d: {c: matrix[d][c]["clean"]["auc"] for c in columns} for d in names},
        "seen_in_training": {d: sorted(v) for d, v in seen.items()}, "split": split.model_dump(),
        "test_images": int(len(scores)), "dropped": {"count": len(dropped), "rows": dropped[:50]},
        "seconds": round(time.time() - started, 1),
    }
