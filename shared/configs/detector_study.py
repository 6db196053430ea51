"""Config of ``detector-study``: frozen-backbone features once per image, then many detector heads over splits x
seeds x training sets x weightings, with intervals."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from shared.config import ActorPoolConfig, JobConfig, StrictModel
from shared.configs.train_detector import BoostingConfig, SplitConfig


class HeadConfig(StrictModel):
    """The detector head trained on the frozen features (UnivFD-style linear probe, or a small MLP)."""

    kind: Literal["linear", "mlp"] = "linear"
    """linear: one linear layer on the standardised features; mlp: one hidden layer with ReLU."""
    hidden: int = Field(256, ge=1)
    """mlp: width of the hidden layer."""
    epochs: int = Field(40, ge=1, le=10_000)
    """Passes over the training fakes (each batch is half real, half fake; reals are drawn as often as needed)."""
    batch_size: int = Field(32, ge=2)
    """Images per optimiser step (half real, half fake)."""
    lr: float = Field(1e-2, gt=0)
    """AdamW learning rate (cosine decay to zero over the run)."""
    weight_decay: float = Field(1e-2, ge=0)
    """AdamW weight decay."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the features during training."""


class StudyRobustness(StrictModel):
    """Perturbations of every image (reals and fakes alike) whose features are cached for the robustness sweep."""

    jpeg_quality: list[int] = Field(default_factory=lambda: [95, 75, 50, 30])
    """JPEG re-compression qualities."""
    blur_sigma: list[float] = Field(default_factory=lambda: [1.0, 2.0])
    """Gaussian blur sigmas in pixels."""
    downscale: list[float] = Field(default_factory=lambda: [0.5])
    """Downscale factors (down with area averaging, back up bilinearly to the original size)."""

    @model_validator(mode="after")
    def _ranges(self) -> StudyRobustness:
        if any(not 1 <= q <= 100 for q in self.jpeg_quality):
            raise ValueError("robustness.jpeg_quality: qualities must be in 1..100")
        if any(s <= 0 for s in self.blur_sigma):
            raise ValueError("robustness.blur_sigma: sigmas must be > 0")
        if any(not 0 < f < 1 for f in self.downscale):
            raise ValueError("robustness.downscale: factors must be in (0, 1)")
        return self


class FeatureRuntime(ActorPoolConfig):
    """The feature-extraction actors (each loads the backbone once)."""

    cpus_per_actor: float = Field(2.0, gt=0)
    """Logical CPUs per actor; it runs that many torch threads unless ``threads`` says otherwise."""


class DetectorStudyRuntime(StrictModel):
    """Resources (not part of the config hash)."""

    features: FeatureRuntime = FeatureRuntime()
    """The feature-extraction actor pool."""
    cpus_per_task: float = Field(1.0, gt=0)
    """Logical CPUs per head-training task (one task per split; it runs one torch thread per CPU)."""


class DetectorStudyConfig(JobConfig):
    """Detector study: features of a frozen pretrained backbone, then linear/MLP heads on many training sets, with
    intervals over splits, seeds and test images.

    Ray Data extracts the features of every image once (clean, and under each robustness perturbation); one Ray task
    per split then trains every head of that split on them. For each split (``splits`` seeded, grouped splits: a real
    face and its image-to-image fakes always share one; reals that trained a generator stay in train) and each
    training seed: (1) the headline block, with ``heldout_family`` never in training: single-uniform / single-boost
    (the reals + ``single_generator``), diverse-uniform / diverse-boost / diverse-focal / diverse-ohem (the reals +
    every generator of the other families), all with the same number of fakes and the same reals; (2) a
    leave-one-family-out block per family (diverse vs single, uniform); (3) a train x test matrix over families (one
    family's fakes in training, every family tested). A held-out generator's images are all scored (with the test
    split's reals); a generator seen in training is scored on its test split. Outputs: metrics.json (mean with a 95%
    paired bootstrap interval for AUC, AP, EER and TPR at 1% FPR per variant; paired differences; the matrices; the
    robustness sweep of the variant with the best validation AUC), runs.jsonl, scores.parquet, study.md and
    report.html.
    """

    JOB: ClassVar[str] = "detector-study"

    data: str
    """The image dataset: a generate (or standin-faces) stage, or IMAGE_SCHEMA Parquet."""
    families: dict[str, list[str]] = {}
    """Generator family -> its generators (values of the 'source' column). Empty: the dataset's 'family' column, or
    (without one) each generator its own family."""
    heldout_family: str
    """The family no headline variant trains on; the headline figures are its AUCs."""
    single_generator: str
    """The single-source variants' generator (of a family other than heldout_family)."""
    backbone: str = "efficientnet-lite0"
    """The frozen feature extractor (an alias of an embedded backbone, a local folder or s3:// prefix)."""
    input_size: int | None = Field(None, ge=16, le=1024)
    """Side the images are resized to for the backbone. Unset: the backbone's own preprocessing size."""
    feature_batch: int = Field(64, ge=1)
    """Images per forward pass of the backbone; the images are cut into batches in the dataset's order, the same
    whatever the number of actors (a config key, not a runtime one: the batch can change features in their last
    bits)."""
    head: HeadConfig = HeadConfig()
    """The head trained on the features."""
    boosting: BoostingConfig = Field(default_factory=BoostingConfig)
    """Settings of the weighted variants (momentum difficulty boosting, focal, OHEM); 'method' is set by each
    variant."""
    split: SplitConfig = Field(default_factory=lambda: SplitConfig(val_fraction=0.15, test_fraction=0.3))
    """Fractions of the grouped split; split k uses seed split.seed + k."""
    splits: int = Field(5, ge=1, le=100)
    """Independent splits."""
    seeds: int = Field(3, ge=1, le=100)
    """Training seeds per split (initialisation, the fake subsample and the batch order)."""
    robustness: StudyRobustness = StudyRobustness()
    """Perturbations for the robustness sweep."""
    bootstrap_rounds: int = Field(1000, ge=100)
    """Paired bootstrap resamples of the test images (per split, reals and fakes resampled separately)."""
    near_duplicate_distance: int = Field(4, ge=0, le=64)
    """Perceptual-hash Hamming distance up to which a fake and a real of another split count as near-duplicates
    (reported per split)."""
    seed: int = 0
    """Seeds the fake subsamples, the head training and the bootstrap."""
    runtime: DetectorStudyRuntime = DetectorStudyRuntime()
    """Resources (not part of the config hash)."""

    def input_uris(self) -> list[str]:
        return [self.data]

    @model_validator(mode="after")
    def _checks(self) -> DetectorStudyConfig:
        every = [g for members in self.families.values() for g in members]
        dup = sorted({g for g in every if every.count(g) > 1})
        if dup:
            raise ValueError(f"families: generator '{dup[0]}' is in more than one family")
        if self.families and self.heldout_family not in self.families:
            raise ValueError(f"heldout_family '{self.heldout_family}' is not one of families "
                             f"({', '.join(self.families)})")
        if self.heldout_family in self.families and self.single_generator in self.families[self.heldout_family]:
            raise ValueError(f"single_generator '{self.single_generator}' is in heldout_family "
                             f"'{self.heldout_family}'")
        return self
