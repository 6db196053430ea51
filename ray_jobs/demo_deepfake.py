"""``scopeforge demo deepfake``: build the image dataset, run the detector study, train the from-scratch baseline.

    scopeforge demo deepfake                                  # ray_jobs/configs/deepfake-demo.yaml
    scopeforge demo deepfake --set data_uri=runs/my/generate  # an existing dataset instead of building one

The demo composes one pipeline (written to <output_root>/demo-pipeline.yaml) and runs it with ``scopeforge
pipeline``'s runner, so finished stages are skipped on a rerun:

    <data pipeline's stages>   the dataset (stage data_stage has the 'dataset' output)
    study                      detector-study: frozen pretrained features, every head over splits x seeds
    cnn-baseline, evaluate     the from-scratch CNN on the diverse mixture of the study's first split, and its
                               evaluation on the test split

Then it writes <output_root>/results.md and <output_root>/metrics.json: ``heldout_auc.<variant>`` (the mean over
runs), ``heldout_auc_ci.<variant>`` ([low, high]) and ``heldout_auc_runs.<variant>`` for every study variant.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import yaml

from shared.config import load_config, read_yaml, validate_config
from shared.configs.deepfake_demo import DeepfakeDemoConfig
from shared.configs.detector_study import DetectorStudyConfig
from shared.configs.pipeline import PipelineConfig
from shared.errors import ConfigError
from shared.stage import committed_folder, stage_metrics
from shared.storage import Storage

CONFIGS = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIGS / "deepfake-demo.yaml"


def _config_file(name: str) -> Path:
    path = Path(name).expanduser()
    if path.is_file():
        return path
    if (CONFIGS / name).is_file():
        return CONFIGS / name
    raise ConfigError(f"data_pipeline {name}: no such file (here or in {CONFIGS})")


def compose(cfg: DeepfakeDemoConfig) -> tuple[PipelineConfig, str]:
    """The demo's pipeline, and how its stages refer to the dataset (${stage} or a URI)."""
    stages: list[dict[str, Any]] = []
    if cfg.data_uri:
        data = cfg.data_uri
    else:
        if cfg.data_pipeline is None:
            raise ConfigError("set data_pipeline (to build the dataset) or data_uri (to use an existing one)")
        data_spec = read_yaml(_config_file(cfg.data_pipeline))
        stages += list(data_spec.get("stages") or [])
        if cfg.data_stage not in [s.get("name") for s in stages]:
            raise ConfigError(f"data_pipeline {cfg.data_pipeline}: no stage named '{cfg.data_stage}' (data_stage)")
        data = "${" + cfg.data_stage + "}"
    study = {**cfg.study, "data": data, "families": cfg.families, "heldout_family": cfg.heldout_family,
             "single_generator": cfg.single_generator}
    stages.append({"name": "study", "job": "detector-study", "config": study})
    if cfg.baseline is not None:
        split = validate_config(DetectorStudyConfig, study, "demo deepfake: study").split
        stages.append({"name": "cnn-baseline", "job": "train-detector", "config": {
            **cfg.baseline, "split": split.model_dump(), "boosting": {"method": "uniform"},
            "sources": [{"name": "reals", "uri": data, "labels": ["real"]},
                        {"name": "fakes", "uri": data, "labels": ["fake"], "exclude": cfg.heldout_generators()}]}})
        stages.append({"name": "evaluate", "job": "evaluate-detector", "config": {
            **cfg.evaluate, "detectors": [{"name": "cnn-baseline", "uri": "${cnn-baseline}"}],
            "test_sets": [{"name": "data", "uri": data, "split": "test"}]}})
    pipeline = {"output_root": cfg.output_root, "storage": cfg.storage.model_dump(mode="python", exclude_none=True),
                "stages": stages}
    return validate_config(PipelineConfig, pipeline, "demo deepfake"), data


def baseline_rows(cfg: DeepfakeDemoConfig, root: Storage) -> tuple[list[str], dict[str, Any]]:
    """The CNN baseline's lines and figures: its AUC on each held-out generator (test split, one run)."""
    if cfg.baseline is None:
        return [], {}
    train = stage_metrics(root.uri("cnn-baseline"), cfg.storage)
    evaluation = stage_metrics(root.uri("evaluate"), cfg.storage)
    cells = {g: evaluation["matrix"]["cnn-baseline"][g]["clean"] for g in cfg.heldout_generators()
             if g in evaluation["matrix"]["cnn-baseline"]}
    lines = ["## From-scratch baseline (small CNN, diverse mixture, uniform weights, split 0, one run)", "",
             f"Trained {train['epochs']} epochs on {train['samples']['train']} images (best val AUC "
             f"{train['best_val_auc']:.3f} at epoch {train['best_epoch'] + 1}); on the held-out family's test-split "
             "images:", "", "| generator | AUC | AP | EER | reals | fakes |", "|---|---|---|---|---|---|",
             *(f"| {g} | {c['auc']:.3f} | {c['ap']:.3f} | {c['eer']:.3f} | {c['n_real']} | {c['n_fake']} |"
               for g, c in cells.items()), ""]
    return lines, {"best_val_auc": train["best_val_auc"], "heldout": cells, "train_samples": train["samples"]}


def results(cfg: DeepfakeDemoConfig, summary: dict[str, Any], seconds: float) -> tuple[str, dict[str, Any]]:
    """results.md and metrics.json from the finished stages."""
    root = Storage(cfg.output_root, cfg.storage)
    study = stage_metrics(root.uri("study"), cfg.storage)
    data_metrics = stage_metrics(root.uri(cfg.data_stage), cfg.storage) if not cfg.data_uri else {}
    standin = bool(data_metrics.get("standin"))
    base_lines, base = baseline_rows(cfg, root)
    study_md = Storage(committed_folder(root.uri("study"), cfg.storage), cfg.storage).read_text("study.md")
    stage_lines = [f"| {s['name']} | {s['job']} | {s['status']} | {s['wall_seconds']} |" for s in summary["stages"]]
    dataset_note = ("**Stand-in data**: the fakes are simple image processes applied to lfw faces (blur, noise, "
                    "morph, eye-band swap, eigenface samples), NOT diffusion or GAN images; data_pipeline "
                    "deepfake-data.yaml builds the diffusion, GAN and VAE fakes."
                    if standin else f"Dataset: {summary.get('data')}.")
    md = "\n".join([
        "# scopeforge demo: deepfake detection across generator families", "", dataset_note, "",
        study_md.replace("# Detector study", "## Detector study", 1), "", *base_lines,
        f"Study outputs: {root.uri('study')} (report.html with ROC curves, score histograms, the family matrix and "
        "the robustness sweep; runs.jsonl; scores.npz).", "",
        "| stage | job | status | wall s |", "|---|---|---|---|", *stage_lines, "",
        f"Total wall time: {seconds:.0f} s.", ""])
    metrics = {"heldout_family": cfg.heldout_family, "single_generator": cfg.single_generator,
               "heldout_auc": study["heldout_auc"], "heldout_auc_ci": study["heldout_auc_ci"],
               "heldout_auc_runs": study["heldout_auc_runs"], "comparisons": study["comparisons"],
               "variants": study["variants"], "lofo": study["lofo"], "family_matrix": study["family_matrix"],
               "robustness": study["robustness"], "families": study["families"], "baseline": base,
               "standin_data": standin, "data": summary.get("data"), "seconds": round(seconds, 1),
               "stages": summary["stages"]}
    return md, metrics


def main(args: argparse.Namespace) -> int:
    from ray_jobs.pipeline import run_pipeline

    cfg = load_config(DeepfakeDemoConfig, args.config or DEFAULT_CONFIG, args.overrides)
    pipeline, data = compose(cfg)
    root = Storage(cfg.output_root, cfg.storage)
    root.write_text(yaml.safe_dump(pipeline.model_dump(mode="json", exclude={"storage"}), sort_keys=False),
                    "demo-pipeline.yaml")
    started = time.time()
    summary = run_pipeline(pipeline, source="demo deepfake", ray_address=args.ray_address, force=args.force)
    summary["data"] = root.uri(cfg.data_stage) if not cfg.data_uri else data
    md, metrics = results(cfg, summary, time.time() - started)
    root.write_text(md, "results.md")
    root.write_json(metrics, "metrics.json")
    print(md)
    print(f"results: {root.uri('results.md')}  metrics: {root.uri('metrics.json')}")
    return 0
