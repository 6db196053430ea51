"""A small pixel-space DDPM trained from scratch on a few real images, saved as a diffusers DDPMPipeline.

    images, color = training_images(table, 24, "auto")          # (N, C, H, W) floats in [-1, 1]; gray|rgb
    result = train_ddpm(images, cfg, color, log=print)           # cfg: TrainDdpmConfig
    result.pipeline.save_pretrained(folder)                      # DDPMPipeline(unet=EMA weights, scheduler)

Epsilon prediction with an MSE loss on uniformly drawn timesteps (Ho et al. 2020), AdamW with a linear warm-up and
cosine decay, gradient clipping, random horizontal flips, and an exponential moving average of the weights (the
saved model). One ``torch.Generator`` drives batching, flips, timesteps and noise, so a config trains the same
weights again on the same machine.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from shared.configs.train_ddpm import TrainDdpmConfig
from shared.errors import DataError
from shared.imageset import decode_image, finish_image


def training_images(table: pa.Table, size: int, color: str = "auto") -> tuple[torch.Tensor, str]:
    """Decode (id, image) rows, fit them like the generate job does (fit_image), scale to [-1, 1]: (N, C, H, W).

    ``color`` auto becomes gray when every image has three equal channels (1-channel model), else rgb. An image
    that cannot be decoded is an error naming it: a model is never trained on a silently shortened set.
    """
    pixels = []
    for rid, data in zip(table.column("id").to_pylist(), table.column("image").to_pylist()):
        pixels.append(finish_image(decode_image(data or b"", f"training image {rid}"), size, "rgb"))
    if not pixels:
        raise DataError("no training images")
    stack = np.stack(pixels)  # (N, H, W, 3) uint8
    gray = bool((stack[..., 0] == stack[..., 1]).all() and (stack[..., 1] == stack[..., 2]).all())
    chosen = ("gray" if gray else "rgb") if color == "auto" else color
    if chosen == "gray":
        stack = np.stack([finish_image(p, size, "gray")[..., :1] for p in stack])
    x = torch.from_numpy(stack).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    return x.contiguous(), chosen


def build_unet(cfg: TrainDdpmConfig, channels: int):
    from diffusers import UNet2DModel

    levels = len(cfg.widths)
    down = ["DownBlock2D"] * levels
    up = ["UpBlock2D"] * levels
    if cfg.attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(sample_size=cfg.image_size, in_channels=channels, out_channels=channels,
                       block_out_channels=tuple(cfg.widths), layers_per_block=cfg.layers_per_block,
                       down_block_types=tuple(down), up_block_types=tuple(up), norm_num_groups=8,
                       attention_head_dim=8)


@dataclass
class TrainResult:
    pipeline: Any
    """DDPMPipeline with the EMA weights."""
    history: list[dict[str, float]] = field(default_factory=list)
    """One entry per epoch: epoch, step, loss (mean over the epoch), lr, seconds."""
    color: str = "gray"
    parameters: int = 0


def train_ddpm(images: torch.Tensor, cfg: TrainDdpmConfig, color: str,
               log: Callable[[str], None] = print, device: str = "cpu") -> TrainResult:
    """Train on ``device``; every random draw (order, flips, noise, timesteps) comes from one CPU generator seeded
    by the config, so the draws are the same on any device."""
    from diffusers import DDPMPipeline, DDPMScheduler

    n, channels = images.shape[0], images.shape[1]
    batch = min(cfg.batch_size, n)
    steps_per_epoch = n // batch  # a last partial batch is dropped (different images each epoch)
    total = steps_per_epoch * cfg.epochs
    log_every = cfg.log_every or max(1, round(cfg.epochs / 20))

    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        unet = build_unet(cfg, channels).to(device)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    images = images.to(device)
    scheduler = DDPMScheduler(num_train_timesteps=cfg.train_timesteps, beta_schedule=cfg.beta_schedule)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)

    def lr_at(step: int) -> float:
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        return cfg.lr * warm * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * step / max(1, total))))

    parameters = sum(p.numel() for p in unet.parameters())
    log(f"train-ddpm: {n} images {tuple(images.shape[1:])} ({color}), UNet {parameters / 1e6:.2f} M parameters, "
        f"{cfg.epochs} epochs x {steps_per_epoch} steps of {batch} = {total} steps")
    history: list[dict[str, float]] = []
    step, started = 0, time.perf_counter()
    unet.train()
    for epoch in range(1, cfg.epochs + 1):
        order = torch.randperm(n, generator=gen)
        losses = []
        for b in range(steps_per_epoch):
            x0 = images[order[b * batch:(b + 1) * batch].to(device)]                       # (B, C, H, W)
            if cfg.hflip:
                flip = (torch.rand(x0.shape[0], generator=gen) < 0.5).to(device)
                x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
            noise = torch.randn(x0.shape, generator=gen).to(device)
            t = torch.randint(0, cfg.train_timesteps, (x0.shape[0],), generator=gen).to(device)
            loss = F.mse_loss(unet(scheduler.add_noise(x0, noise, t), t).sample, noise)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), unet.parameters()):
                    p_ema.lerp_(p, 1.0 - decay)
            losses.append(loss.item())
            step += 1
        if not all(math.isfinite(v) for v in losses):
            raise DataError(f"train-ddpm: the loss became NaN/inf in epoch {epoch}; lower lr (now {cfg.lr})")
        elapsed = time.perf_counter() - started
        history.append({"epoch": epoch, "step": step, "loss": float(np.mean(losses)), "lr": lr_at(step - 1),
                        "seconds": round(elapsed, 2)})
        if epoch % log_every == 0 or epoch in (1, cfg.epochs):
            eta = elapsed / epoch * (cfg.epochs - epoch)
            log(f"train-ddpm: epoch {epoch}/{cfg.epochs} step {step}/{total} loss {history[-1]['loss']:.4f} "
                f"lr {history[-1]['lr']:.2e} {elapsed:.0f} s (eta {eta:.0f} s)")
    pipeline = DDPMPipeline(unet=ema, scheduler=scheduler)
    return TrainResult(pipeline=pipeline, history=history, color=color, parameters=parameters)
