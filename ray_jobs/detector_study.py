"""detector-study: frozen-backbone features once per image, then every detector head of the study, with intervals.

    scopeforge run detector-study --set data=runs/demo-deepfake/data --set heldout_family=gan \
        --set single_generator=ddpm-ddim

1. plan every image of the dataset once per split seed (grouped splits; the format guard of every mixture);
2. Ray Data: decode each image once, and a pool of actors (each loads the backbone once) turns it into features,
   clean and under every robustness perturbation, plus a perceptual hash; cached in features.npz;
3. one Ray task per split trains every head of the study's design on the cached features
   (``shared.detection.study``);
4. the paired bootstrap over every split's test images (``shared.detection.intervals``); metrics.json, runs.jsonl,
   scores.npz, study.md and report.html with ROC curves, score histograms, the family matrix and the robustness sweep.
"""

from __future__ import annotations

import io
import json
import time
from collections import defaultdict
from dataclasses import replace
from typing import Any

import numpy as np
import ray

from ray_jobs.data import actor_pool
from ray_jobs.detector_data import decode_mixture
from ray_jobs.placement import claim
from shared.configs.detector_study import DetectorStudyConfig
from shared.configs.train_detector import SourceConfig
from shared.data import read_table
from shared.detection import study_report
from shared.detection.augment import perturb_batch
from shared.detection.intervals import Cell, bootstrap, difference, summarise
from shared.detection.mixture import SPLITS, MixturePlan, plan_mixture
from shared.detection.study import (
    CLEAN,
    COMPARISONS,
    HEADLINE,
    HEADLINE_VARIANTS,
    StudyInputs,
    cross_split_near_duplicates,
    resolve_families,
    split_runs,
    study_design,
)
from shared.diffusion.phash import phash
from shared.errors import DataError
from shared.stage import Stage


def conditions(cfg: DetectorStudyConfig) -> list[tuple[str, str, float]]:
    """(name, perturbation, strength) of every cached view, clean first."""
    r = cfg.robustness
    return [(CLEAN, "clean", 0.0), *((f"jpeg{q}", "jpeg", float(q)) for q in r.jpeg_quality),
            *((f"blur{s:g}", "blur", s) for s in r.blur_sigma), *((f"down{f:g}", "downscale", f) for f in r.downscale)]


class Featurizer:
    """Ray Data actor: the backbone loaded once; a batch of images in, its features under every view out."""

    def __init__(self, cfg: DetectorStudyConfig):
        from shared.detection.features import load_backbone

        pool = cfg.runtime.features
        device = claim(cfg.stage_name, "feature actor", pool.gpus_per_actor, pool.threads).device
        self.backbone = load_backbone(cfg.backbone, cfg.storage, device=device)
        if cfg.input_size:
            self.backbone.preprocess = replace(self.backbone.preprocess, size=cfg.input_size)
        self.views = conditions(cfg)
        self.batch = cfg.feature_batch

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {"index": batch["index"], "phash": np.array([phash(im) for im in batch["image"]], dtype=np.uint64)}
        for name, kind, strength in self.views:
            out[f"f:{name}"] = self.backbone(perturb_batch(batch["image"], kind, strength), self.batch)
        return out


def extract_features(cfg: DetectorStudyConfig, plan: MixturePlan) -> tuple[dict[str, np.ndarray], np.ndarray]:
    # one block per forward batch, cut from the plan's order: every image is featurised in the same batch whatever
    # the number of actors, so the features (and every figure after them) do not depend on the runtime
    pool = cfg.runtime.features
    decoded, dropped = decode_mixture(plan, cfg.storage, blocks=-(-plan.num_samples // cfg.feature_batch))
    if dropped:
        raise DataError(f"dataset {cfg.data}: {len(dropped)} image(s) cannot be decoded, e.g. {dropped[0]['id']}: "
                        f"{dropped[0]['reason']} (the study scores every image; fix or drop them upstream)")
    featured = decoded.map_batches(Featurizer, fn_constructor_kwargs={"cfg": cfg}, compute=actor_pool(pool),
                                   num_cpus=pool.cpus_per_actor, num_gpus=pool.gpus_per_actor or None,
                                   batch_size=None, batch_format="numpy")
    parts: dict[str, list[np.ndarray]] = defaultdict(list)
    for batch in featured.iter_batches(batch_size=None, batch_format="numpy"):
        for key, value in batch.items():
            parts[key].append(value)
    index = np.concatenate(parts.pop("index"))
    order = np.argsort(index)
    if not np.array_equal(index[order], np.arange(plan.num_samples)):
        raise DataError(f"dataset {cfg.data}: features came back for {index.size} of {plan.num_samples} images")
    hashes = np.concatenate(parts.pop("phash"))[order]
    return {k[2:]: np.concatenate(v)[order] for k, v in parts.items()}, hashes


@ray.remote
def run_split(inputs: StudyInputs, design: list, k: int, cfg: DetectorStudyConfig) -> dict[str, Any]:
    claim(cfg.stage_name, "head-training task", 0.0, 1)  # one thread: fastest for heads this small, and the same sums
    return split_runs(inputs, design, k, cfg)


def family_column(cfg: DetectorStudyConfig, ids: np.ndarray) -> list[str | None] | None:
    table = read_table(cfg.data, cfg.storage, columns=["id", "family"])
    if "family" not in table.column_names:
        return None
    of = dict(zip(table.column("id").to_pylist(), table.column("family").to_pylist()))
    return [of.get(i) for i in ids]


def run(cfg: DetectorStudyConfig, stage: Stage) -> dict[str, Any]:
    started = time.time()
    # 1. every image, once per split seed
    source = [SourceConfig(name="data", uri=cfg.data)]
    plans = [plan_mixture(source, cfg.split.model_copy(update={"seed": cfg.split.seed + k}), cfg.storage,
                          keep_splits=SPLITS, require_both_classes=(), what=f"dataset {cfg.data}")
             for k in range(cfg.splits)]
    plan = plans[0]
    ids, labels, sources = plan.column("id"), plan.column("label"), plan.column("source")
    families = resolve_families(list(sources), list(labels), family_column(cfg, ids), cfg.families)
    design = study_design(families, cfg.heldout_family, cfg.single_generator)
    listed = "; ".join(f"{f}: {', '.join(m)}" for f, m in families.items())
    print(f"study: {plan.num_samples} images ({int((labels == 0).sum())} real), families {listed}; held out "
          f"{cfg.heldout_family}; "
          f"{cfg.splits} splits x {cfg.seeds} seeds", flush=True)

    # 2. features, once per image and view
    features, hashes = extract_features(cfg, plan)
    dim = next(iter(features.values())).shape[1]
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, **{"ids": ids.astype(str), **features})
    stage.store.write_bytes(buffer.getvalue(), "features.npz")
    print(f"features: {len(features)} views x {plan.num_samples} images x {dim} dims in "
          f"{time.time() - started:.0f} s", flush=True)

    # 3. every head of every split
    inputs = StudyInputs(labels=labels, sources=sources, groups=plan.column("group"), group_names=plan.group_names,
                         splits=[p.column("split") for p in plans], features=features)
    ref = ray.put(inputs)
    task = run_split.options(num_cpus=cfg.runtime.cpus_per_task)
    pending = {task.remote(ref, design, k, cfg): k for k in range(cfg.splits)}
    results: dict[int, dict[str, Any]] = {}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        k = pending.pop(done[0])
        results[k] = ray.get(done[0])
        print(f"split {k + 1}/{cfg.splits}: {len(results[k]['runs'])} heads trained "
              f"({time.time() - started:.0f} s)", flush=True)
    runs = [r for k in sorted(results) for r in results[k]["runs"]]
    cells: dict[tuple[str, str, str], list[Cell]] = defaultdict(list)
    for k in sorted(results):
        for key, cell in results[k]["cells"].items():
            cells[key].append(cell)

    # 4. intervals, comparisons, outputs
    figures = study_figures(cfg, design, cells, runs)
    near = [cross_split_near_duplicates(hashes, labels, split, cfg.near_duplicate_distance)
            for split in inputs.splits]
    metrics = {"backbone": cfg.backbone, "feature_dim": int(dim), "images": int(plan.num_samples),
               "families": families, "heldout_family": cfg.heldout_family, "single_generator": cfg.single_generator,
               "splits": cfg.splits, "seeds": cfg.seeds, "near_duplicates": near, **figures,
               "seconds": round(time.time() - started, 1)}
    stage.store.write_text("".join(json.dumps(r) + "\n" for r in runs), "runs.jsonl")
    scores = io.BytesIO()
    np.savez(scores, allow_pickle=False, **{"|".join(map(str, key)) + f"|split{k}|{v}|seed{t}": s
                        for key, per_split in cells.items() for k, cell in enumerate(per_split)
                        for v, seeds in cell.scores.items() for t, s in enumerate(seeds)})
    stage.store.write_bytes(scores.getvalue(), "scores.npz")
    md = study_report.markdown(metrics)
    stage.store.write_text(md, "study.md")
    study_report.html(metrics, cells).save(stage.store, "report.html")
    print(md, flush=True)
    return metrics


def study_figures(cfg: DetectorStudyConfig, design: list, cells: dict[tuple[str, str, str], list[Cell]],
                  runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Every interval of the study from the cells of every split."""
    rounds, seed = cfg.bootstrap_rounds, cfg.seed
    held = cfg.heldout_family
    headline = bootstrap(cells[(HEADLINE, held, CLEAN)], rounds, seed, ("auc", "ap", "eer", "tpr_at_1pct_fpr"))
    val_auc = {v: float(np.mean([r["val_auc"] for r in runs if r["block"] == HEADLINE and r["variant"] == v]))
               for v in HEADLINE_VARIANTS}
    variants = {v: {**summarise(headline)[v], "runs": len(cells[(HEADLINE, held, CLEAN)]) * cfg.seeds,
                    "val_auc": val_auc[v]} for v in HEADLINE_VARIANTS}
    comparisons = {f"{a} - {b}": difference(headline, a, b) for a, b in COMPARISONS}
    lofo: dict[str, Any] = {}
    for block in design:
        if block.name.startswith("lofo/"):
            family = block.name.split("/", 1)[1]
            stats = bootstrap(cells[(block.name, family, CLEAN)], rounds, seed)
            lofo[family] = {"diverse": summarise(stats)["diverse"]["auc"], "single": summarise(stats)["single"]["auc"],
                            "single_generator": next(v.generators[0] for v in block.variants if v.name == "single"),
                            "diverse - single": difference(stats, "diverse", "single")}
    matrix_block = next(b for b in design if b.name == "matrix")
    matrix: dict[str, dict[str, Any]] = defaultdict(dict)
    for test_family, _, _ in matrix_block.tests:
        stats = summarise(bootstrap(cells[("matrix", test_family, CLEAN)], rounds, seed))
        for train_family in stats:
            matrix[train_family][test_family] = stats[train_family]["auc"]
    # the diverse variants share one validation set (the other families' val fakes), so their val AUCs compare
    best = max((v for v in HEADLINE_VARIANTS if v.startswith("diverse")), key=lambda v: val_auc[v])
    robustness = {}
    for name in [c for (b, cell, c) in cells if b == HEADLINE and cell == held]:
        robustness[name] = summarise(bootstrap(cells[(HEADLINE, held, name)], rounds, seed))[best]["auc"]
    return {"variants": variants, "comparisons": comparisons, "lofo": lofo, "family_matrix": dict(matrix),
            "robustness": {"variant": best, "chosen_by": "mean validation AUC among the diverse variants",
                           "auc": robustness},
            "heldout_auc": {v: variants[v]["auc"]["mean"] for v in HEADLINE_VARIANTS},
            "heldout_auc_ci": {v: variants[v]["auc"]["ci"] for v in HEADLINE_VARIANTS},
            "heldout_auc_runs": {v: variants[v]["runs"] for v in HEADLINE_VARIANTS},
            "train_counts": {"reals": int(np.median([r["train_reals"] for r in runs if r["block"] == HEADLINE])),
                             "fakes": int(np.median([r["train_fakes"] for r in runs if r["block"] == HEADLINE]))}}
