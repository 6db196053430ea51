"""A small convolutional VAE trained from scratch on a few real images: a non-diffusion generator family.

    images, color = training_images(table, 24, "auto")           # ddpm.training_images: (N, C, H, W) in [-1, 1]
    result = train_vae(images, cfg, color, log=print)            # cfg: TrainVaeConfig
    save_vae(result.model, folder)                               # folder/vae.json + folder/model.safetensors
    model = load_vae(folder)                                     # a folder, s3:// prefix or finished train-vae stage
    images = sample_vae(model, seeds=[1, 2], temperature=1.0)    # (2, H, W, C) floats in [0, 1]; NaN stays NaN

The model (Kingma & Welling 2014): an encoder q(z|x) = N(mu(x), diag(exp(logvar(x)))) over a flat latent z of
``latent_dim`` dimensions (stride-2 convolutions, then a linear layer), a decoder that mirrors it to the mean
image m(z), and the prior p(z) = N(0, I). Training minimises the negative ELBO per image,

    L = sum_pixels [ (x - m(z))^2 / (2 sigma^2) + log sigma + log(2 pi) / 2 ]  +  beta * KL(q(z|x) || N(0, I)),
    z = mu + exp(logvar / 2) * eps,  eps ~ N(0, I)   (the reparameterisation trick),
    KL = 1/2 sum_dims (mu^2 + exp(logvar) - 1 - logvar),

reported divided by the number of pixel values (nats per dimension). The choices:

- Gaussian likelihood on the [-1, 1] scale with a fixed ``sigma`` (default 0.3): with a few dozen training
  images, a small sigma lets every image take its own corner of latent space (sharp reconstructions, but prior
  samples between them are noise); 0.3 keeps the KL near 30 nats per image and prior samples look like blurry
  faces. ``sigma`` unset: sigma^2 is the batch's mean squared reconstruction error (detached; the calibrated
  decoder of Rybkin et al. 2021), which needs no tuned value but shows exactly that failure on the lfw faces.
- KL warm-up: beta rises linearly from 0 to ``kl_weight`` over ``kl_warmup`` epochs, so the decoder learns to use
  z before the KL pulls the posteriors onto the prior (the usual remedy for posterior collapse).
- AdamW with a cosine decay to a tenth of ``lr``, random horizontal flips, gradient clipping at 1. One CPU
  ``torch.Generator`` drives batching, flips and eps, so a config trains the same weights again on one machine.

Sampling draws z ~ N(0, temperature^2 I) from the image's own ``torch.Generator(seed)`` and returns the decoded
mean m(z), never a noisy draw from the likelihood: temperature 1 samples the prior as trained; below 1 it trades
variety for typical, smoother faces.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, ValidationError, model_validator
from torch import nn

from shared.config import StorageConfig, StrictModel
from shared.configs.train_vae import TrainVaeConfig
from shared.errors import DataError, ModelError

VAE_CONFIG = "vae.json"
VAE_WEIGHTS = "model.safetensors"
MIN_SIGMA = 1e-2
"""Floor of the calibrated sigma (on the [-1, 1] scale): a perfect reconstruction must not give an infinite weight."""


class VaeArchitecture(StrictModel):
    """What vae.json records: enough to rebuild the network before its weights are loaded."""

    image_size: int = Field(ge=2)
    """Side of the square images the decoder makes, in pixels."""
    channels: Literal[1, 3]
    """1 for a gray model (luma), 3 for RGB."""
    widths: list[int] = Field(min_length=1)
    """Encoder channels per stride-2 convolution (the decoder mirrors them)."""
    latent_dim: int = Field(ge=1)
    """Dimensions of the latent z."""

    @model_validator(mode="after")
    def _divisible(self) -> VaeArchitecture:
        if self.image_size % 2 ** len(self.widths):
            raise ValueError(f"image_size {self.image_size} is not divisible by 2^{len(self.widths)} (one halving "
                             "per width)")
        return self


class ConvVAE(nn.Module):
    """x (B, C, S, S) in [-1, 1] -> (mu, logvar) of q(z|x), each (B, latent_dim); z -> mean image (B, C, S, S)."""

    def __init__(self, arch: VaeArchitecture):
        super().__init__()
        self.arch = arch
        self.bottom = arch.image_size // 2 ** len(arch.widths)  # side of the last encoder feature map
        down: list[nn.Module] = []
        in_ch: int = arch.channels
        for width in arch.widths:  # each level halves the side
            down += [nn.Conv2d(in_ch, width, 4, 2, 1), nn.SiLU(), nn.Conv2d(width, width, 3, 1, 1), nn.SiLU()]
            in_ch = width
        self.encoder = nn.Sequential(*down, nn.Flatten())
        flat = arch.widths[-1] * self.bottom ** 2
        self.to_posterior = nn.Linear(flat, 2 * arch.latent_dim)
        self.from_latent = nn.Sequential(nn.Linear(arch.latent_dim, flat), nn.SiLU())
        up: list[nn.Module] = []
        widths = list(reversed(arch.widths))
        for width, out_ch in zip(widths, [*widths[1:], widths[-1]]):  # each level doubles the side
            up += [nn.ConvTranspose2d(width, out_ch, 4, 2, 1), nn.SiLU(), nn.Conv2d(out_ch, out_ch, 3, 1, 1),
                   nn.SiLU()]
        self.decoder = nn.Sequential(*up, nn.Conv2d(widths[-1], arch.channels, 3, 1, 1))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.to_posterior(self.encoder(x)).chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 8.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.from_latent(z).view(z.shape[0], self.arch.widths[-1], self.bottom, self.bottom)
        return self.decoder(h)


def elbo_terms(model: ConvVAE, x: torch.Tensor, eps: torch.Tensor, sigma: float | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image: the Gaussian negative log-likelihood of x (summed over pixels), KL(q(z|x) || N(0, I)), and the
    mean squared reconstruction error (on the [-1, 1] scale), for one draw ``eps`` (B, latent_dim)."""
    mu, logvar = model.encode(x)
    mean = model.decode(mu + torch.exp(0.5 * logvar) * eps)
    squared = (x - mean).pow(2).flatten(1)                                                   # (B, D)
    mse = squared.mean(dim=1)
    var = (mse.mean().detach().clamp(min=MIN_SIGMA ** 2) if sigma is None
           else torch.tensor(sigma ** 2, device=x.device))
    nll = (squared / (2 * var)).sum(dim=1) + squared.shape[1] * 0.5 * (torch.log(var) + math.log(2 * math.pi))
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)
    return nll, kl, mse


@dataclass
class VaeResult:
    model: ConvVAE
    """The trained network, in eval mode."""
    history: list[dict[str, float]] = field(default_factory=list)
    """One entry per epoch (means over its batches): epoch, step, loss (the objective, nats per pixel value), kl
    (nats per image), recon_mse (on the [0, 1] pixel scale), sigma, kl_weight, lr, seconds."""
    parameters: int = 0


def train_vae(images: torch.Tensor, cfg: TrainVaeConfig, color: str,
              log: Callable[[str], None] = print, device: str = "cpu") -> VaeResult:
    """Train on ``images`` (N, C, S, S) in [-1, 1] on ``device``; every random draw (order, flips, eps) comes from
    one CPU generator seeded by the config, so the draws are the same on any device."""
    n, channels, size = images.shape[0], images.shape[1], images.shape[-1]
    if size != cfg.image_size:
        raise DataError(f"train-vae: training images are {size} px, the config says image_size {cfg.image_size}")
    arch = VaeArchitecture(image_size=size, channels=channels, widths=cfg.widths, latent_dim=cfg.latent_dim)
    batch = min(cfg.batch_size, n)
    steps_per_epoch = n // batch  # a last partial batch is dropped (different images each epoch)
    total = steps_per_epoch * cfg.epochs
    warmup = cfg.kl_warmup * steps_per_epoch
    log_every = cfg.log_every or max(1, round(cfg.epochs / 20))

    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = ConvVAE(arch).to(device)
    images = images.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total), eta_min=cfg.lr / 10)
    parameters = sum(p.numel() for p in model.parameters())
    log(f"train-vae: {n} images {tuple(images.shape[1:])} ({color}), VAE {parameters / 1e6:.2f} M parameters, "
        f"latent {cfg.latent_dim}, {cfg.epochs} epochs x {steps_per_epoch} steps of {batch} = {total} steps")

    history: list[dict[str, float]] = []
    step, started = 0, time.perf_counter()
    model.train()
    for epoch in range(1, cfg.epochs + 1):
        order = torch.randperm(n, generator=gen)
        sums = {"loss": 0.0, "kl": 0.0, "recon_mse": 0.0, "sigma": 0.0}
        for b in range(steps_per_epoch):
            x = images[order[b * batch:(b + 1) * batch].to(device)]                          # (B, C, S, S)
            if cfg.hflip:
                flip = (torch.rand(x.shape[0], generator=gen) < 0.5).to(device)
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            eps = torch.randn((x.shape[0], cfg.latent_dim), generator=gen).to(device)
            beta = cfg.kl_weight * (min(1.0, step / warmup) if warmup else 1.0)
            nll, kl, mse = elbo_terms(model, x, eps, cfg.sigma)
            loss = (nll + beta * kl).mean() / x[0].numel()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            sums["loss"] += loss.item()
            sums["kl"] += kl.mean().item()
            sums["recon_mse"] += mse.mean().item() / 4.0  # [-1, 1] -> [0, 1] scale
            sums["sigma"] += cfg.sigma or max(MIN_SIGMA, math.sqrt(mse.mean().item()))
        means = {k: v / steps_per_epoch for k, v in sums.items()}
        if not all(math.isfinite(v) for v in means.values()):
            raise DataError(f"train-vae: the loss became NaN/inf in epoch {epoch}; lower lr (now {cfg.lr})")
        elapsed = time.perf_counter() - started
        history.append({"epoch": epoch, "step": step, **{k: round(v, 6) for k, v in means.items()},
                        "kl_weight": round(beta, 6), "lr": schedule.get_last_lr()[0], "seconds": round(elapsed, 2)})
        if epoch % log_every == 0 or epoch in (1, cfg.epochs):
            eta = elapsed / epoch * (cfg.epochs - epoch)
            log(f"train-vae: epoch {epoch}/{cfg.epochs} step {step}/{total} loss {means['loss']:.4f} "
                f"kl {means['kl']:.2f} recon_mse {means['recon_mse']:.5f} beta {beta:.2f} {elapsed:.0f} s "
                f"(eta {eta:.0f} s)")
    return VaeResult(model=model.eval(), history=history, parameters=parameters)


# ---------------------------------------------------------------------------------------------------------------------
# Sampling and reconstruction


def _to_images(x: torch.Tensor) -> np.ndarray:
    """(B, C, S, S) on the [-1, 1] scale -> (B, S, S, C) floats in [0, 1] (NaN stays NaN, to be caught downstream)."""
    return x.float().add(1.0).div(2.0).clamp(0.0, 1.0).permute(0, 2, 3, 1).cpu().numpy()


@torch.inference_mode()
def sample_vae(model: ConvVAE, seeds: list[int], *, temperature: float = 1.0, batch_invariant: bool = True,
               dtype: torch.dtype = torch.float32) -> np.ndarray:
    """Decoded means of z ~ N(0, temperature^2 I), one z per image from its own ``torch.Generator(seed)``;
    (B, S, S, C) floats in [0, 1]. ``batch_invariant`` decodes one image at a time (see pipelines.per_image)."""
    if temperature <= 0:
        raise ModelError(f"VAE sampling: temperature must be > 0, got {temperature}")
    size, channels = model.arch.image_size, model.arch.channels
    if not seeds:
        return np.zeros((0, size, size, channels), np.float32)
    device = next(model.parameters()).device
    dim = model.arch.latent_dim
    z = torch.cat([torch.randn(1, dim, generator=torch.Generator().manual_seed(int(s))) for s in seeds]) * temperature
    model = model.to(dtype=dtype)
    z = z.to(device=device, dtype=dtype)
    chunks = [model.decode(z[i:i + 1]) for i in range(len(seeds))] if batch_invariant else [model.decode(z)]
    return _to_images(torch.cat(chunks))


@torch.inference_mode()
def reconstruct(model: ConvVAE, images: torch.Tensor) -> np.ndarray:
    """Decoded posterior means m(mu(x)) of (N, C, S, S) images in [-1, 1]: (N, S, S, C) floats in [0, 1]."""
    device = next(model.parameters()).device
    mu, _ = model.encode(images.to(device))
    return _to_images(model.decode(mu))


# ---------------------------------------------------------------------------------------------------------------------
# The model folder: vae.json (architecture) + model.safetensors (state dict)


def save_vae(model: ConvVAE, folder: str | Path) -> None:
    from safetensors.torch import save_file

    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    (path / VAE_CONFIG).write_text(json.dumps(model.arch.model_dump(), indent=2) + "\n")
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / VAE_WEIGHTS))


KINDS = f"a folder with {VAE_CONFIG} and {VAE_WEIGHTS}, an s3:// prefix holding one, or a finished train-vae stage"


def resolve_vae(ref: str, storage: StorageConfig | None = None) -> Path:
    """Local folder of a saved VAE (a finished stage hands over its ``model`` output; s3:// is copied once to the
    node-local cache)."""
    from shared.models import resolve_saved

    where = resolve_saved(ref, storage, what="VAE model", marker=VAE_CONFIG, kinds=KINDS)
    path = Path(where)
    if not path.is_dir():  # resolve_saved leaves what looks like a hub id as it is: a VAE has none
        raise ModelError(f"VAE model {ref!r}: no such folder (expected {KINDS})")
    return path


def check_vae_ref(ref: str, storage: StorageConfig | None = None) -> None:
    """Fail early, in the driver, on a reference that cannot be a saved VAE (nothing is downloaded)."""
    from shared.stage import resolve_output
    from shared.storage import Storage

    if ref.startswith(("s3://", "s3a://")):
        where = resolve_output(ref, "model", storage)
        if not Storage(where, storage).exists(VAE_CONFIG):
            raise ModelError(f"VAE model {ref!r}: no {VAE_CONFIG} there (expected {KINDS})")
    else:
        resolve_vae(ref, storage)


def load_vae(ref: str, storage: StorageConfig | None = None, device: str | torch.device = "cpu") -> ConvVAE:
    """The VAE saved at ``ref`` by :func:`save_vae`, in eval mode on ``device``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = resolve_vae(ref, storage)
    try:
        arch = VaeArchitecture.model_validate_json((path / VAE_CONFIG).read_text())
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ModelError(f"VAE model {ref!r}: bad {VAE_CONFIG} ({where}: {first['msg']})") from None
    if not (path / VAE_WEIGHTS).is_file():
        raise ModelError(f"VAE model {ref!r}: no {VAE_WEIGHTS} there")
    try:
        state = load_file(str(path / VAE_WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"VAE model {ref!r}: {VAE_WEIGHTS} is not a safetensors file "
                         f"({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})") from None
    model = ConvVAE(arch)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        raise ModelError(f"VAE model {ref!r}: the weights do not fit {VAE_CONFIG} ({lines[-1].rstrip('.')})") from None
    return model.eval().to(device)
