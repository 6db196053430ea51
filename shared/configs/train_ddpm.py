"""Config of the ``train-ddpm`` job: a small pixel-space DDPM trained on real images, saved as a diffusers pipeline."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from shared.config import JobConfig, TaskConfig
from shared.configs.subsets import IdSubset


def _training_reals() -> IdSubset:
    return IdSubset(stop=0.4)


class TrainDdpmConfig(JobConfig):
    """Train a small unconditional DDPM on real images (default: the embedded lfw-faces) as a Ray task.

    The result is a diffusers DDPMPipeline folder (<stage>/pipeline, the stage's `model` output) that the generate
    job samples with any scheduler (unconditional) or uses to re-noise real images (img2img). The weights saved are
    an exponential moving average of the trained ones. report.html shows the loss curve and samples.
    """

    JOB: ClassVar[str] = "train-ddpm"

    data: str = "lfw-faces"
    """Training images: an embedded alias (lfw-faces: scikit-image's 100 lfw_subset faces), a folder of image files,
    or a Parquet dataset with an `image` column (only its label 0 rows when it has a label column)."""
    limit: int | None = Field(None, ge=1)
    """Use only the first N images. Unset: all."""
    training_reals: IdSubset = Field(default_factory=_training_reals)
    """The only images trained on: the ids in this seeded subset (default: about 40 %). Give the generate stage's
    real collection the same subset as `generator_training`, so the dataset records which reals a generator saw and
    the detector split keeps them (and their fakes) out of val and test."""
    image_size: int = Field(24, ge=8, le=512)
    """Square training and sampling resolution: generate at the dataset's size. Images take the generate job's fit
    (shared.imageset.fit_image: lfw's 25 px faces are centre-cropped to 24, no resampling)."""
    color: Literal["auto", "gray", "rgb"] = "auto"
    """gray trains a 1-channel model on luma; auto picks gray when every training image has equal channels."""
    widths: list[int] = [32, 64, 64]
    """UNet channels per resolution level (each level after the first halves the resolution)."""
    layers_per_block: int = Field(1, ge=1, le=4)
    """ResNet layers per UNet block."""
    attention: bool = False
    """Self-attention at the lowest resolution (better global structure, slower)."""
    train_timesteps: int = Field(1000, ge=10, le=4000)
    """Diffusion timesteps of the noise schedule."""
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    """Noise schedule (squaredcos_cap_v2: the cosine schedule, better at low resolution)."""
    epochs: int = Field(200, ge=1, le=100_000)
    """Passes over the training images (in shuffled batches; a last partial batch is dropped)."""
    batch_size: int = Field(32, ge=1, le=4096)
    """Images per optimisation step."""
    lr: float = Field(1e-3, gt=0.0)
    """Peak AdamW learning rate (linear warm-up, then cosine decay to a tenth of it)."""
    warmup_steps: int = Field(50, ge=0)
    """Learning-rate warm-up, in steps."""
    ema_decay: float = Field(0.995, ge=0.0, lt=1.0)
    """Decay of the weight average that is saved (with the usual (1+n)/(10+n) ramp at the start)."""
    hflip: bool = True
    """Random horizontal flips (faces are roughly symmetric)."""
    seed: int = Field(0, ge=0)
    """Seed of initialisation, batching, flips and noise: the same config gives the same weights on one machine."""
    runtime: TaskConfig = TaskConfig()
    """The training task's resources (num_cpus, num_gpus > 0 trains on CUDA, threads). Not part of the config
    hash."""
    log_every: int | None = Field(None, ge=1)
    """Print a progress line every N epochs. Unset: about 20 lines in all (every epoch when there are few)."""
    preview: int = Field(16, ge=0, le=256)
    """Samples drawn at the end (DDIM, 50 steps) for the report and preview.png."""

    @field_validator("widths")
    @classmethod
    def _widths(cls, widths: list[int]) -> list[int]:
        if not 1 <= len(widths) <= 6 or any(w < 8 or w % 8 for w in widths):
            raise ValueError("widths: 1 to 6 levels, each a multiple of 8 (GroupNorm uses 8 groups)")
        return widths

    @model_validator(mode="after")
    def _divisible(self) -> TrainDdpmConfig:
        factor = 2 ** (len(self.widths) - 1)
        if self.image_size % factor:
            raise ValueError(f"image_size {self.image_size} must be divisible by {factor} "
                             f"({len(self.widths)} UNet levels halve it {len(self.widths) - 1} times)")
        return self

    def input_uris(self) -> list[str]:
        return [self.data]

    def gpus_per_worker(self) -> float:
        return self.runtime.num_gpus
