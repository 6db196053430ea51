"""train-ddpm: a small DDPM trained on real images in one Ray task, saved as a diffusers pipeline.

    scopeforge run train-ddpm --set output_root=runs/deepfake            # 40 % of lfw-faces, about a minute

One Ray task rather than a Ray Train TorchTrainer: a model of about a million parameters on a hundred images gains
nothing from data parallelism, and the task writes the pipeline straight to the stage (local or s3://). Progress
lines come from the task through Ray's log forwarding.

It trains only on the reals in ``training_reals`` (listed in training_ids.json), never on the rest of the
collection, so the faces a detector is tested on were never seen by the generator.

Outputs: <stage>/pipeline (DDPMPipeline, the stage's `model` output), history.json, training_ids.json,
preview.png, report.html.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import ray

from shared.configs.train_ddpm import TrainDdpmConfig
from shared.stage import Stage
from shared.storage import Storage


def _train(cfg: TrainDdpmConfig, attempt_uri: str) -> dict[str, Any]:
    import torch

    from ray_jobs.placement import claim
    from shared.diffusion.ddpm import train_ddpm, training_images
    from shared.diffusion.pipelines import PixelDiffusion
    from shared.diffusion.realsets import read_real_table, training_subset
    from shared.diffusion.report import image_grid

    cpu_started = time.process_time()
    device = claim(cfg.stage_name, "training task", cfg.runtime.num_gpus, cfg.runtime.threads).device
    table = training_subset(read_real_table(cfg.data, cfg.storage, cfg.limit), cfg.training_reals, cfg.data)
    images, color = training_images(table, cfg.image_size, cfg.color)
    result = train_ddpm(images, cfg, color, log=lambda line: print(line, flush=True), device=device)

    preview = None
    if cfg.preview:
        model = PixelDiffusion(result.pipeline, "ddim")
        samples = model.generate(list(range(cfg.preview)), 50, batch_invariant=False)
        reals = ((images[: cfg.preview].permute(0, 2, 3, 1).numpy() + 1.0) / 2.0).clip(0.0, 1.0)
        preview = image_grid({"real (training)": list(reals), "DDPM (DDIM 50)": list(samples)})
    store = Storage(attempt_uri, cfg.storage)
    with tempfile.TemporaryDirectory(prefix="scopeforge-ddpm-") as tmp:
        result.pipeline.to("cpu").save_pretrained(tmp)
        store.upload(tmp, "pipeline")
    if preview is not None:
        store.write_bytes(preview, "preview.png")
    return {"history": result.history, "color": color, "images": int(images.shape[0]),
            "training_ids": [str(i) for i in table.column("id").to_pylist()],
            "parameters": result.parameters, "preview": preview, "threads": torch.get_num_threads(),
            "cpu_seconds": round(time.process_time() - cpu_started, 1)}


def run(cfg: TrainDdpmConfig, stage: Stage) -> dict[str, Any]:
    task = ray.remote(num_cpus=cfg.runtime.num_cpus, num_gpus=cfg.runtime.num_gpus)(_train)
    out = ray.get(task.remote(cfg, stage.store.uri()))
    stage.outputs["model"] = "pipeline"
    history = out["history"]
    stage.store.write_json(history, "history.json")
    stage.store.write_json(out["training_ids"], "training_ids.json")

    from shared.diffusion.report import train_report

    train_report(cfg, out, stage.store)
    last = history[-1]
    return {"images": out["images"], "training_reals": cfg.training_reals.model_dump(),
            "color": out["color"], "parameters": out["parameters"],
            "epochs": cfg.epochs, "steps": int(last["step"]), "final_loss": round(last["loss"], 5),
            "train_seconds": last["seconds"], "threads": out["threads"], "cpu_seconds": out["cpu_seconds"]}
