"""Diffusers pipelines as image generators: loading a reference, swapping the sampler, seeded sampling per image.

    pipe = load_pipeline("runs/deepfake/train-ddpm")             # a finished train-ddpm stage, a folder, s3://, hub id
    model = PixelDiffusion(pipe, scheduler="ddim")               # UNet2DModel pipelines: unconditional and img2img
    images = model.generate(seeds=[1, 2], steps=25)              # (2, H, W, C) floats in [0, 1]; NaN stays NaN
    model = TextDiffusion(pipe, scheduler="dpm-solver")          # text-conditioned pipelines: UNet ones (Stable
    images, nsfw = model.generate(seeds=[1], steps=25,           # Diffusion 1/2, SDXL) and transformer ones (SD3,
                                  prompts=["a face"], guidance=7.5)  # Flux, PixArt); nsfw: (B,) bool, the checker's

The safety checker is off unless asked for (``load_pipeline(..., safety_checker=True)``): a pipeline saved with one
is loaded without it; asking for it on a pipeline that has none is a ModelError. When it runs, the images it flags
(and blacks out) are reported in ``nsfw`` so that the caller drops them.

Every image gets its own ``torch.Generator`` (on the CPU, so the noise does not depend on the device), used for its
initial noise and every later noise draw, so an image depends on its seed and never on its neighbours. With
``batch_invariant`` (the default) the model also runs one image at a time: matrix kernels round differently for
different batch shapes, so this is what makes an image byte-identical whatever batch it was generated in.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch

from shared.config import StorageConfig
from shared.errors import ConfigError, ModelError
from shared.stage import resolve_output

SCHEDULERS: dict[str, str] = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "dpm-solver": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-ancestral": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def scheduler_name(scheduler: Any) -> str:
    """Our short name of a scheduler instance (its class name when it has none)."""
    cls = type(scheduler).__name__
    return next((short for short, name in SCHEDULERS.items() if name == cls), cls)


def swap_scheduler(pipe: Any, name: str) -> None:
    """Replace the pipeline's scheduler by ``name`` built from its current config ("default" keeps it). Only a
    scheduler diffusers lists as compatible with the current one is accepted: a flow-matching pipeline (SD3, Flux)
    cannot take a noise-prediction sampler, and the images would be wrong, not an error."""
    if name == "default":
        return
    if name not in SCHEDULERS:
        raise ConfigError(f"scheduler {name!r}: unknown (known: default, {', '.join(SCHEDULERS)})")
    import diffusers

    cls = getattr(diffusers, SCHEDULERS[name])
    current = pipe.scheduler
    compatible = {type(current), *getattr(current, "compatibles", [])}
    if cls not in compatible:
        ours = sorted(short for short, full in SCHEDULERS.items() if getattr(diffusers, full) in compatible)
        raise ConfigError(f"scheduler {name!r}: not compatible with {type(pipe).__name__}'s "
                          f"{type(current).__name__} (use: default{''.join(', ' + s for s in ours)})")
    pipe.scheduler = cls.from_config(current.config)


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def resolve_pipeline(ref: str, storage: StorageConfig | None = None) -> str:
    """Local folder of a diffusers pipeline (a finished stage hands over its ``model`` output; s3:// prefixes are
    copied once to the node-local cache), or a hub id left to ``from_pretrained``."""
    from shared.models import resolve_saved  # the same stage, s3-cache and path rules as language models

    return resolve_saved(ref, storage, what="pipeline", marker="model_index.json",
                         kinds="a directory, s3:// prefix, finished stage or hub id")


def check_pipeline_ref(ref: str, storage: StorageConfig | None = None) -> None:
    """Fail early, in the driver, on a reference that cannot be a pipeline (nothing is downloaded): a missing folder,
    a folder or s3:// prefix without model_index.json, a stage without a model output."""
    from shared.models import _looks_local
    from shared.storage import Storage

    if ref.startswith(("s3://", "s3a://")):
        ref = resolve_output(ref, "model", storage)
        if not Storage(ref, storage).exists("model_index.json"):
            raise ModelError(f"pipeline {ref!r}: no model_index.json there (expected a diffusers save_pretrained "
                             "folder)")
    elif _looks_local(ref):
        resolve_pipeline(ref, storage)


def checker_kwargs(index: dict[str, Any], safety_checker: bool, ref: str) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for the safety-checker switch, from the pipeline's model_index.json:
    off drops a saved checker (and its requirement); on needs one saved (a ModelError otherwise)."""
    slot = index.get("safety_checker")  # absent: this kind of pipeline has none; [null, null]: saved without one
    if safety_checker:
        if not slot or slot[0] is None:
            raise ModelError(f"pipeline {ref!r}: safety_checker is on but this {index.get('_class_name', 'pipeline')}"
                             " has no safety checker; set safety_checker: false")
        return {}
    if "safety_checker" not in index:
        return {}
    return {"safety_checker": None, **({"requires_safety_checker": False} if "requires_safety_checker" in index
                                       else {})}


def load_pipeline(ref: str, storage: StorageConfig | None = None, dtype: str = "float32",
                  device: str = "cpu", safety_checker: bool = False) -> Any:
    """The pipeline ``ref`` names (see :func:`resolve_pipeline`) in ``dtype`` on ``device``, with or without its
    safety checker (see :func:`checker_kwargs`)."""
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    where = resolve_pipeline(ref, storage)
    diffusers_logging.disable_progress_bar()
    try:
        index = DiffusionPipeline.load_config(where)
        extra = checker_kwargs(index, safety_checker, ref)
        pipe = DiffusionPipeline.from_pretrained(where, dtype=DTYPES[dtype], **extra)
    except (OSError, ValueError) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"pipeline {ref!r}: cannot load ({text})") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def device_for(num_gpus: float, where: str = "generator") -> str:
    """The device outside Ray (benchmarks, tests): 'cpu' without GPUs, else the first CUDA device (an error if none);
    Ray workers decide through ray_jobs/placement.claim instead."""
    from shared.placement import choose_device

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return choose_device(where, "process", num_gpus, visible, [])


def cpu_generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator(device="cpu").manual_seed(int(seed)) for seed in seeds]


def set_timesteps(scheduler: Any, steps: int, device: Any) -> None:
    try:
        scheduler.set_timesteps(steps, device=device)
    except ValueError as exc:  # e.g. PNDM's Runge-Kutta warm-up needs at least 4 steps
        raise ConfigError(f"scheduler {scheduler_name(scheduler)}: cannot run {steps} steps "
                          f"({str(exc).splitlines()[0]})") from None


def img2img_timesteps(scheduler: Any, steps: int, strength: float) -> torch.Tensor:
    """The last ``strength`` x ``steps`` timesteps (as diffusers' img2img pipelines choose them)."""
    begin = max(steps - min(int(steps * strength), steps), 0)
    timesteps = scheduler.timesteps[begin * scheduler.order:]
    if len(timesteps) == 0:
        raise ConfigError(f"img2img: strength {strength} x steps {steps} leaves no denoising step; raise one of them")
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin * scheduler.order)
    return timesteps


def per_image(batch_invariant: bool, n: int, run: Any) -> np.ndarray:
    """``run(slice)`` over the whole batch, or image by image (see the module docstring)."""
    if not batch_invariant:
        return run(slice(0, n))
    return np.concatenate([run(slice(i, i + 1)) for i in range(n)])


# ---------------------------------------------------------------------------------------------------------------------
# Pixel-space pipelines (UNet2DModel + scheduler): unconditional and SDEdit-style img2img


class PixelDiffusion:
    """A UNet2DModel pipeline (DDPMPipeline, DDIMPipeline, a train-ddpm stage) sampled with our own loop, so that
    any scheduler works (scale_model_input, per-image noise) and img2img starts from a noised real image."""

    def __init__(self, pipe: Any, scheduler: str = "default"):
        from diffusers import UNet2DModel

        unet = getattr(pipe, "unet", None)
        if not isinstance(unet, UNet2DModel) or getattr(pipe, "scheduler", None) is None:
            raise ModelError(f"{type(pipe).__name__}: unconditional and pixel img2img need a pipeline with a "
                             "UNet2DModel and a scheduler (e.g. DDPMPipeline); text-conditioned pipelines use "
                             "mode text2img or img2img with prompts")
        swap_scheduler(pipe, scheduler)
        self.unet, self.scheduler = unet.eval(), pipe.scheduler
        size = unet.config.sample_size
        self.native_size = int(size if isinstance(size, int) else size[0])
        self.channels = int(unet.config.in_channels)

    @property
    def scheduler_name(self) -> str:
        return scheduler_name(self.scheduler)

    @torch.inference_mode()
    def generate(self, seeds: list[int], steps: int, *, sources: np.ndarray | None = None, strength: float = 1.0,
                 resolution: int | None = None, batch_invariant: bool = True) -> np.ndarray:
        """(B, H, W, C) floats in [0, 1]. ``sources``: (B, H, W, 3) uint8 real images at ``resolution`` for img2img."""
        size = resolution or self.native_size
        x0 = None if sources is None else self._to_model_space(sources)

        def run(part: slice) -> np.ndarray:
            return self._sample(seeds[part], steps, None if x0 is None else x0[part], strength, size)

        return per_image(batch_invariant, len(seeds), run)

    def _to_model_space(self, sources: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(sources)).float().div(127.5).sub(1.0)  # (B, H, W, 3) in [-1, 1]
        if self.channels == 1:
            x = (x * torch.tensor([0.299, 0.587, 0.114])).sum(-1, keepdim=True)
        elif self.channels != 3:
            raise ModelError(f"img2img: the model has {self.channels} input channels; only 1 or 3 are supported")
        return x.permute(0, 3, 1, 2).contiguous()

    def _sample(self, seeds: list[int], steps: int, x0: torch.Tensor | None, strength: float, size: int) -> np.ndarray:
        from diffusers.utils.torch_utils import randn_tensor

        device, dtype = self.unet.device, self.unet.dtype
        generators = cpu_generators(seeds)
        shape = (len(seeds), self.channels, size, size)
        set_timesteps(self.scheduler, steps, device)
        step_kwargs = {"generator": generators} if "generator" in inspect.signature(self.scheduler.step).parameters \
            else {}  # stochastic samplers take the per-image generators; deterministic ones have no such argument
        if x0 is None:
            timesteps = self.scheduler.timesteps
            x = randn_tensor(shape, generator=generators, device=device, dtype=torch.float32)
            x = x * self.scheduler.init_noise_sigma
        else:
            timesteps = img2img_timesteps(self.scheduler, steps, strength)
            noise = randn_tensor(shape, generator=generators, device=device, dtype=torch.float32)
            x = self.scheduler.add_noise(x0.to(device), noise, timesteps[:1].repeat(len(seeds)))
        for t in timesteps:
            model_input = self.scheduler.scale_model_input(x, t).to(dtype)
            eps = self.unet(model_input, t).sample.float()
            x = self.scheduler.step(eps, t, x, **step_kwargs).prev_sample
        images = (x / 2.0 + 0.5).clamp(0.0, 1.0)  # NaN stays NaN
        return images.permute(0, 2, 3, 1).cpu().numpy()


# ---------------------------------------------------------------------------------------------------------------------
# Text-conditioned pipelines (Stable Diffusion and the like), through diffusers' own text2img / img2img pipelines


def denoiser(pipe: Any) -> Any:
    """The pipeline's denoising network: its transformer (SD3, Flux, PixArt-alpha/sigma, ...) or its UNet."""
    for name in ("transformer", "unet"):
        net = getattr(pipe, name, None)
        if net is not None:
            return net
    raise ModelError(f"{type(pipe).__name__}: has neither a transformer nor a unet to denoise with")


def native_resolution(pipe: Any) -> int | None:
    """The side a text-conditioned pipeline generates at when given no size, as its own ``__call__`` computes it:
    ``default_sample_size`` (SDXL, SD3; Flux's is a fixed 128) or else the denoiser's ``config.sample_size``, in
    latent pixels, times ``vae_scale_factor``. None when the pipeline has no such figures."""
    size = getattr(pipe, "default_sample_size", None) or denoiser(pipe).config.get("sample_size")
    scale = getattr(pipe, "vae_scale_factor", None)
    if size is None or scale is None:
        return None
    return int(size if isinstance(size, int) else size[0]) * int(scale)


class TextDiffusion:
    """A text-conditioned pipeline, UNet- or transformer-based; img2img uses diffusers' image-to-image variant of the
    same components."""

    def __init__(self, pipe: Any, scheduler: str = "default", img2img: bool = False):
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image

        if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None:
            raise ModelError(f"{type(pipe).__name__}: text2img needs a text-conditioned pipeline (a text encoder and "
                             "a tokenizer); pixel-space pipelines use mode unconditional or img2img")
        swap_scheduler(pipe, scheduler)
        auto = AutoPipelineForImage2Image if img2img else AutoPipelineForText2Image
        try:
            self.pipe = auto.from_pipe(pipe)
        except ValueError as exc:
            raise ModelError(f"{type(pipe).__name__}: has no {'image-to-image' if img2img else 'text-to-image'} "
                             f"variant in diffusers ({str(exc).splitlines()[0]})") from None
        self.pipe.set_progress_bar_config(disable=True)
        self.native_size = native_resolution(self.pipe)  # None: the pipeline does not say; set a resolution
        self.checks_safety = getattr(self.pipe, "safety_checker", None) is not None
        self.bins_resolution = "use_resolution_binning" in inspect.signature(self.pipe.__call__).parameters
        self.channels = 3

    @property
    def scheduler_name(self) -> str:
        return scheduler_name(self.pipe.scheduler)

    @torch.inference_mode()
    def generate(self, seeds: list[int], steps: int, *, prompts: list[str], guidance: float,
                 negative_prompt: str | None = None, sources: np.ndarray | None = None, strength: float = 1.0,
                 resolution: int | None = None, batch_invariant: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(B, H, W, C) floats in [0, 1], and (B,) bools: the safety checker flagged (and blacked out) the image."""
        size = resolution or self.native_size
        if sources is None and size is None:
            raise ModelError(f"{type(self.pipe).__name__}: its native resolution is unknown; set a resolution")
        flagged: list[bool] = []

        def run(part: slice) -> np.ndarray:
            n = len(seeds[part])
            kwargs: dict[str, Any] = dict(prompt=prompts[part], num_inference_steps=steps, guidance_scale=guidance,
                                          generator=cpu_generators(seeds[part]), output_type="np")
            if negative_prompt:  # only when given: PixArt, for one, cannot encode a None negative prompt
                kwargs.update(negative_prompt=[negative_prompt] * n)
            if self.bins_resolution:  # PixArt and Sana: generate at the size asked for, not the nearest trained bin
                kwargs.update(use_resolution_binning=False)  # (which they would then resize, unrecorded)
            if sources is None:
                kwargs.update(height=size, width=size)
            else:
                kwargs.update(image=sources[part].astype(np.float32) / 255.0, strength=strength)
            try:
                out = self.pipe(**kwargs)
            except ValueError as exc:  # the pipeline's own input checks, or a scheduler refusing the step count
                raise ConfigError(f"{type(self.pipe).__name__}: {str(exc).strip().splitlines()[0]}") from None
            nsfw = getattr(out, "nsfw_content_detected", None)  # None: no checker ran
            flagged.extend([False] * n if nsfw is None else [bool(f) for f in nsfw])
            return np.asarray(out.images, dtype=np.float32)

        images = per_image(batch_invariant, len(seeds), run)
        return images, np.array(flagged, dtype=bool)
