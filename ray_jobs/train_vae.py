"""train-vae: a small convolutional VAE trained on real images in one Ray task (a non-diffusion generator family).

    scopeforge run train-vae --set output_root=runs/deepfake     # lfw-faces' training reals: ~40 CPU-seconds

One Ray task, like train-ddpm: a model of a few hundred thousand parameters on a few dozen images gains nothing
from data parallelism, and the task writes the model folder straight to the stage (local or s3://). Progress lines
come from the task through Ray's log forwarding.

Outputs: <stage>/model (vae.json + model.safetensors, the stage's `model` output, what the generate job's `vae`
mode loads), history.json, training_ids.json, preview.png, report.html.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import ray

from shared.configs.train_vae import TrainVaeConfig
from shared.stage import Stage
from shared.storage import Storage


def _train(cfg: TrainVaeConfig, attempt_uri: str) -> dict[str, Any]:
    import torch

    from ray_jobs.placement import claim
    from shared.diffusion.ddpm import training_images
    from shared.diffusion.realsets import read_real_table, training_subset
    from shared.diffusion.report import image_grid
    from shared.diffusion.vae import reconstruct, sample_vae, save_vae, train_vae

    cpu_started = time.process_time()
    device = claim(cfg.stage_name, "training task", cfg.runtime.num_gpus, cfg.runtime.threads).device
    table = training_subset(read_real_table(cfg.data, cfg.storage, cfg.limit), cfg.training_reals, cfg.data)
    images, color = training_images(table, cfg.image_size, cfg.color)
    result = train_vae(images, cfg, color, log=lambda line: print(line, flush=True), device=device)

    preview = None
    if cfg.preview:
        reals = images[: cfg.preview]
        preview = image_grid({"real (training)": list(((reals.permute(0, 2, 3, 1).numpy() + 1.0) / 2.0).clip(0, 1)),
                              "reconstruction": list(reconstruct(result.model, reals)),
                              "VAE sample": list(sample_vae(result.model, list(range(cfg.preview))))})
    store = Storage(attempt_uri, cfg.storage)
    with tempfile.TemporaryDirectory(prefix="scopeforge-vae-") as tmp:
        save_vae(result.model, tmp)
        store.upload(tmp, "model")
    if preview is not None:
        store.write_bytes(preview, "preview.png")
    return {"history": result.history, "color": color, "images": int(images.shape[0]),
            "training_ids": [str(i) for i in table.column("id").to_pylist()],
            "parameters": result.parameters, "preview": preview, "threads": torch.get_num_threads(),
            "cpu_seconds": round(time.process_time() - cpu_started, 1)}


def run(cfg: TrainVaeConfig, stage: Stage) -> dict[str, Any]:
    task = ray.remote(num_cpus=cfg.runtime.num_cpus, num_gpus=cfg.runtime.num_gpus)(_train)
    out = ray.get(task.remote(cfg, stage.store.uri()))
    stage.outputs["model"] = "model"
    history = out["history"]
    stage.store.write_json(history, "history.json")
    stage.store.write_json(out["training_ids"], "training_ids.json")

    from shared.diffusion.report import train_vae_report

    train_vae_report(cfg, out, stage.store)
    last = history[-1]
    return {"images": out["images"], "training_reals": cfg.training_reals.model_dump(), "color": out["color"],
            "parameters": out["parameters"], "latent_dim": cfg.latent_dim, "epochs": cfg.epochs,
            "steps": int(last["step"]), "final_loss": round(last["loss"], 5), "kl": round(last["kl"], 3),
            "recon_mse": round(last["recon_mse"], 6), "sigma": round(last["sigma"], 5),
            "train_seconds": last["seconds"], "threads": out["threads"], "cpu_seconds": out["cpu_seconds"]}
