"""Throughput of the generate job (Ray Data, one actor pool) against a bare loop over the same pipeline and requests.

    python benchmarks/generate_throughput.py            # CPU: the embedded dataset's DDPM shape, 32 px, DDIM 25 steps
    python benchmarks/generate_throughput.py --gpu      # one CUDA GPU: SD-1.5-shaped random pipeline, 512 px, bf16

Prints one JSON line per measurement and a summary line with ``ratio`` = Ray images/s / bare-loop images/s (goal
>= 0.9), all measured in this run. Both sides do the same work per image: load the pipeline once, generate with one
seeded torch.Generator per image, resize and encode, write Parquet. The Ray side is timed from building the requests
to the last Parquet file written, actor start-up and model loading included (Ray itself is started beforehand, as a
cluster would be); the bare loop is timed from loading the pipeline to its last file. Weights are random: the
throughput of a network does not depend on its values (outputs that are NaN or flat are counted as generated and
reported as dropped, on both sides). The GPU variant refuses to run without CUDA; it needs about 4-5 minutes on one
recent GPU (most of it building and saving the random 1 B-parameter pipeline, and two Ray actor start-ups).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_model(gpu: bool, folder: Path) -> None:
    import torch

    if gpu:
        from shared.diffusion.tiny import sd15_shaped_pipeline

        sd15_shaped_pipeline(dtype=torch.bfloat16).save_pretrained(folder)
        return
    from diffusers import DDPMPipeline, DDPMScheduler

    from shared.configs.train_ddpm import TrainDdpmConfig
    from shared.diffusion.ddpm import build_unet

    cfg = TrainDdpmConfig()  # the embedded dataset's DDPM: same widths, 1 channel, 32 px
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = build_unet(cfg, channels=1)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000,
                                                    beta_schedule="squaredcos_cap_v2")).save_pretrained(folder)


def generator_spec(gpu: bool, model: str, count: int, actors: int) -> dict:
    if gpu:
        return {"name": "sd15", "mode": "text2img", "model": model, "count": count, "steps": 20, "guidance": 7.5,
                "scheduler": "dpm-solver", "dtype": "bfloat16", "batch_size": 8, "batch_invariant": False,
                "runtime": {"num_actors": actors, "gpus_per_actor": 1.0 / actors, "cpus_per_actor": 1.0}}
    # the actors share the cores: each reserves (and runs torch threads on) its share
    return {"name": "ddpm", "mode": "unconditional", "model": model, "count": count, "steps": 25, "scheduler": "ddim",
            "batch_size": 8, "runtime": {"num_actors": actors,
                                         "cpus_per_actor": max(1, (os.cpu_count() or 1) // actors)}}


def make_config(spec: dict, output_root: str, gpu: bool):
    from shared.config import validate_config
    from shared.configs.generate import GenerateConfig

    # random weights may well make NaN or flat images: they are still generated, so they count (and are reported)
    data = {"output_root": output_root, "reals": [], "generators": [spec], "max_drop_fraction": 1.0,
            "output": {"size": 512, "encoding": "jpeg", "quality": 90} if gpu else {"size": 32, "color": "gray"}}
    if gpu:
        data["prompts"] = {"faces": {"count": 64, "seed": 0}}
    return validate_config(GenerateConfig, data, "benchmark")


def bare_loop(cfg, out: Path) -> tuple[float, int, dict[str, bytes]]:
    """The same GeneratorStage, requests and encoding in this process; one Parquet file per batch."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from shared.diffusion.generate import GeneratorStage, count_requests, generator_seed, load_prompts
    from shared.diffusion.pipelines import device_for

    spec = cfg.generators[0]
    started = time.perf_counter()
    stage = GeneratorStage(spec, cfg.output, device=device_for(spec.runtime.gpus_per_actor))
    stage.setup()
    prompts = load_prompts(cfg.prompts)
    requests = count_requests(spec, generator_seed(spec, cfg.seed), prompts, np.arange(spec.count))
    images: dict[str, bytes] = {}
    dropped = 0
    for i, start in enumerate(range(0, spec.count, spec.batch_size)):
        result = stage(requests.slice(start, spec.batch_size))
        pq.write_table(result.table, out / f"part-{i:05d}.parquet")
        images.update(zip(result.table.column("id").to_pylist(), result.table.column("image").to_pylist()))
        dropped += len(result.drops)
    if spec.runtime.gpus_per_actor:
        torch.cuda.synchronize()
    return time.perf_counter() - started, dropped, images


def ray_job(cfg) -> tuple[float, int, dict[str, bytes], float]:
    from ray_jobs.runtime import run_job
    from shared.data import read_table

    metrics = run_job(cfg, force=True)["sources"][cfg.generators[0].name]
    table = read_table(str(Path(cfg.output_root) / "generate")) if metrics["written"] else None
    images = dict(zip(table.column("id").to_pylist(), table.column("image").to_pylist())) if table else {}
    return metrics["wall_seconds"], metrics["dropped"], images, metrics.get("actor_setup_seconds", 0.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="SD-1.5-shaped pipeline at 512 px on one CUDA GPU")
    parser.add_argument("--count", type=int, default=None, help="images per measurement (default: 96 CPU, 256 GPU)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating bare / Ray measurements of each")
    parser.add_argument("--actors", type=int, default=None, help="Ray actors (default: 2 on CPU, 1 on GPU)")
    args = parser.parse_args()

    import torch

    if args.gpu and not torch.cuda.is_available():
        print("generate_throughput: --gpu needs a CUDA GPU; none is visible", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    count = args.count or (256 if args.gpu else 96)
    actors = args.actors or (1 if args.gpu else 2)

    from ray_jobs.runtime import init_ray

    with tempfile.TemporaryDirectory(prefix="scopeforge-bench-") as tmp:
        tmp_path = Path(tmp)
        t0 = time.perf_counter()
        build_model(args.gpu, tmp_path / "model")
        build_seconds = time.perf_counter() - t0
        spec = generator_spec(args.gpu, str(tmp_path / "model"), count, actors)
        init_ray()
        results: dict[str, list[float]] = {"bare": [], "ray": []}
        outputs: dict[str, dict[str, bytes]] = {}
        for repeat in range(args.repeats):
            for kind in ("bare", "ray"):
                out = tmp_path / f"{kind}-{repeat}"
                out.mkdir()
                cfg = make_config(spec, str(out), args.gpu)
                if kind == "bare":
                    seconds, dropped, images = bare_loop(cfg, out)
                    setup = None
                else:
                    seconds, dropped, images, setup = ray_job(cfg)
                assert len(images) + dropped == count, f"{kind}: {len(images)} + {dropped} dropped, not {count}"
                results[kind].append(count / seconds)
                outputs[kind] = images
                print(json.dumps({"variant": "gpu" if args.gpu else "cpu", "kind": kind, "repeat": repeat,
                                  "images": count, "dropped": dropped, "seconds": round(seconds, 3),
                                  "images_per_second": round(count / seconds, 3),
                                  **({"actor_setup_seconds": setup} if setup is not None else {})}), flush=True)
        bare, ray_rate = statistics.median(results["bare"]), statistics.median(results["ray"])
        same = sum(outputs["bare"][k] == outputs["ray"].get(k) for k in outputs["bare"])
        summary = {
            "benchmark": "generate_throughput", "variant": "gpu" if args.gpu else "cpu",
            "device": torch.cuda.get_device_name(0) if args.gpu else f"{os.cpu_count()} CPU cores",
            "pipeline": "SD-1.5-shaped, random weights, bf16, 512 px, DPM-Solver 20 steps, CFG 7.5, batch 8"
            if args.gpu else "DDPM UNet of the embedded dataset (widths 32-64-64, 1 channel), 32 px, DDIM 25 steps",
            "images": count, "ray_actors": actors, "batch_size": spec["batch_size"],
            "batch_invariant": spec.get("batch_invariant", True),
            "bare_images_per_second": round(bare, 3), "ray_images_per_second": round(ray_rate, 3),
            "ratio": round(ray_rate / bare, 3), "goal_ratio": 0.9,
            "identical_images_ray_vs_bare": f"{same}/{count}",
            "model_build_seconds": round(build_seconds, 1),
        }
        print(json.dumps(summary), flush=True)
        import ray

        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
