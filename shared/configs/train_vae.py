"""Config of the ``train-vae`` job: a small convolutional VAE trained on real images, a non-diffusion generator."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from shared.config import JobConfig, TaskConfig
from shared.configs.subsets import IdSubset
from shared.configs.train_ddpm import _training_reals  # one default subset for every generator trained here


class TrainVaeConfig(JobConfig):
    """Train a small convolutional VAE on real images (default: the embedded lfw-faces) as a Ray task.

    The result is a model folder (<stage>/model: vae.json + model.safetensors, the stage's `model` output) that the
    generate job's `vae` mode samples: z ~ N(0, temperature^2 I), decoded to the mean image. report.html shows the
    loss curves, reconstructions and samples.
    """

    JOB: ClassVar[str] = "train-vae"

    data: str = "lfw-faces"
    """Training images: an embedded alias (lfw-faces: scikit-image's 100 lfw_subset faces), a folder of image files,
    or a Parquet dataset with an `image` column (only its label 0 rows when it has a label column)."""
    limit: int | None = Field(None, ge=1)
    """Use only the first N images. Unset: all."""
    training_reals: IdSubset = Field(default_factory=_training_reals)
    """The only images trained on: the ids in this seeded subset (default: about 40 %, as train-ddpm's). Give the
    generate stage's real collection the same subset as `generator_training`, so the dataset records which reals a
    generator saw and the detector split keeps them (and their fakes) out of val and test."""
    image_size: int = Field(24, ge=8, le=256)
    """Square training and sampling resolution: generate at the dataset's size. Images take the generate job's fit
    (shared.imageset.fit_image: lfw's 25 px faces are centre-cropped to 24, no resampling)."""
    color: Literal["auto", "gray", "rgb"] = "auto"
    """gray trains a 1-channel model on luma; auto picks gray when every training image has equal channels."""
    widths: list[int] = [32, 64]
    """Encoder channels per stride-2 convolution (each halves the resolution; the decoder mirrors them)."""
    latent_dim: int = Field(16, ge=1, le=1024)
    """Dimensions of the flat Gaussian latent z."""
    sigma: float | None = Field(0.3, gt=0.0, le=1.0)
    """Standard deviation of the Gaussian likelihood, on the [-1, 1] pixel scale: larger gives the KL term more
    weight (smoother latents, blurrier images whose prior samples look like the training faces; on 47 lfw faces
    0.3 gives about 30 nats of KL per image). Unset: sigma^2 is the batch's mean squared reconstruction error (a
    calibrated decoder: sharper reconstructions, but prior samples fall off the faces when the images are few)."""
    kl_weight: float = Field(1.0, gt=0.0)
    """Weight of the KL term after the warm-up (1: the ELBO; above 1: a beta-VAE, smoother and blurrier)."""
    kl_warmup: int = Field(100, ge=0)
    """Epochs over which the KL weight rises linearly from 0 to kl_weight (0: no warm-up)."""
    epochs: int = Field(300, ge=1, le=100_000)
    """Passes over the training images (in shuffled batches; a last partial batch is dropped)."""
    batch_size: int = Field(16, ge=1, le=4096)
    """Images per optimisation step."""
    lr: float = Field(2e-3, gt=0.0)
    """Peak AdamW learning rate (cosine decay to a tenth of it)."""
    hflip: bool = True
    """Random horizontal flips (faces are roughly symmetric)."""
    seed: int = Field(0, ge=0)
    """Seed of initialisation, batching, flips and latent noise: the same config gives the same weights on one
    machine."""
    runtime: TaskConfig = TaskConfig()
    """The training task's resources (num_cpus, num_gpus > 0 trains on CUDA, threads). Not part of the config
    hash."""
    log_every: int | None = Field(None, ge=1)
    """Print a progress line every N epochs. Unset: about 20 lines in all (every epoch when there are few)."""
    preview: int = Field(16, ge=0, le=256)
    """Reconstructions and samples (seeds 0..N-1, temperature 1) drawn at the end for the report and preview.png."""

    @field_validator("widths")
    @classmethod
    def _widths(cls, widths: list[int]) -> list[int]:
        if not 1 <= len(widths) <= 5 or any(w < 1 for w in widths):
            raise ValueError("widths: 1 to 5 levels of at least 1 channel")
        return widths

    @model_validator(mode="after")
    def _divisible(self) -> TrainVaeConfig:
        factor = 2 ** len(self.widths)
        if self.image_size % factor:
            raise ValueError(f"image_size {self.image_size} must be divisible by {factor} "
                             f"({len(self.widths)} encoder levels halve it {len(self.widths)} times)")
        return self

    def input_uris(self) -> list[str]:
        return [self.data]

    def gpus_per_worker(self) -> float:
        return self.runtime.num_gpus
