"""Config of ``standin-faces``: a small offline real/fake face dataset for testing detectors without generators."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from shared.config import JobConfig
from shared.configs.subsets import IdSubset

StandinGenerator = Literal["pca", "blur", "noise", "morph", "swap"]


def _all_generators() -> list[StandinGenerator]:
    return ["pca", "blur", "noise", "morph", "swap"]


class StandinFacesConfig(JobConfig):
    """Build a stand-in real/fake face dataset (IMAGE_SCHEMA Parquet) from scikit-image's lfw_subset, offline.

    NOT diffusion or GAN fakes: the 'generators' are simple, honest image processes applied to the 100 real faces
    (pca: faces sampled from an eigenface model; blur / noise: re-synthesis with lost detail or added sensor noise;
    morph: the average of two faces; swap: the eye band of another face pasted in). They exist so that detector
    training and evaluation can be tested end to end before (or without) the generation job's dataset.
    """

    JOB: ClassVar[str] = "standin-faces"

    size: int = Field(24, ge=16, le=256)
    """Side of the square images (reals and fakes, made at lfw's 25 px, take the same fit and encoder: 24 is a
    centre crop, other sizes resample)."""
    generators: list[StandinGenerator] = Field(default_factory=_all_generators, min_length=1)
    """Which stand-in fake processes to include (each is one 'source')."""
    reals: int = Field(100, ge=2, le=100)
    """How many of lfw_subset's 100 real faces to include."""
    training_reals: IdSubset = Field(default_factory=lambda: IdSubset(stop=0.4))
    """The reals the pca eigenface model is fitted on (ids 000-099, as in train-ddpm's training_reals), recorded
    per real image (generator_training) so that the detector split keeps them in train."""
    fakes_per_generator: int = Field(100, ge=1, le=10000)
    """Fake images per generator."""
    encoding: Literal["png", "jpeg"] = "png"
    """Encoder for every image."""
    jpeg_quality: int = Field(95, ge=1, le=100)
    """JPEG quality when encoding is jpeg."""
    seed: int = 0
    """Seed of every random choice."""
