"""Config of ``evaluate-detector``: a matrix of detectors x test sets."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from shared.config import ActorPoolConfig, JobConfig, StrictModel
from shared.configs.train_detector import SplitConfig


class DetectorRef(StrictModel):
    """One trained detector (a row of the matrix)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Row name in the matrix and in metrics.json."""
    uri: str
    """A train-detector stage (its 'model' output) or a detector folder (detector.json + model.safetensors)."""


class TestSetConfig(StrictModel):
    """An image dataset to test on; every generator in it and every real collection becomes a column."""

    __test__ = False  # not a pytest test class

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Name of this dataset (prefixes its columns when there are several test sets)."""
    uri: str
    """Dataset URI (IMAGE_SCHEMA Parquet, or a stage with a 'dataset' output)."""
    split: Literal["test", "val", "train", "all"] = "test"
    """Which split of the dataset to use; 'all' only for data no detector was trained on."""


class RobustnessConfig(StrictModel):
    """Perturbations applied to every test image (to reals and fakes alike) before scoring."""

    jpeg_quality: list[int] = Field(default_factory=lambda: [75])
    """JPEG re-compression qualities (one column each)."""
    blur_sigma: list[float] = Field(default_factory=lambda: [1.0])
    """Gaussian blur sigmas in pixels (one column each)."""

    @model_validator(mode="after")
    def _ranges(self) -> RobustnessConfig:
        if any(not 1 <= q <= 100 for q in self.jpeg_quality):
            raise ValueError("robustness.jpeg_quality: qualities must be in 1..100")
        if any(s <= 0 for s in self.blur_sigma):
            raise ValueError("robustness.blur_sigma: sigmas must be > 0")
        return self


class ScoringRuntime(ActorPoolConfig):
    """Resources of the scoring actors."""

    num_actors: int = Field(2, ge=1, le=1024)
    """Actors in the pool; each loads every detector once."""


class EvaluateDetectorConfig(JobConfig):
    """Evaluate detectors on test sets with Ray Data: a matrix of ACC, AUC, AP and EER per generator and collection.

    Robustness columns (JPEG re-compression, blur), ROC curves as PNG, metrics.json and a markdown table."""

    JOB: ClassVar[str] = "evaluate-detector"

    detectors: list[DetectorRef] = Field(min_length=1)
    """The detectors (rows)."""
    test_sets: list[TestSetConfig] = Field(min_length=1)
    """The test datasets (their generators and real collections are the columns)."""
    split: SplitConfig | None = None
    """How the test sets are split. Unset: the split the detectors were trained with (they must agree)."""
    robustness: RobustnessConfig = Field(default_factory=RobustnessConfig)
    """Perturbations for the robustness columns."""
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    """Score threshold for ACC (score = probability of fake)."""
    batch_size: int = Field(64, ge=1, le=4096)
    """Images per scoring batch."""
    runtime: ScoringRuntime = Field(default_factory=lambda: ScoringRuntime())
    """The scoring actors (each loads every detector once). Not part of the config hash."""

    def input_uris(self) -> list[str]:
        return [d.uri for d in self.detectors] + [t.uri for t in self.test_sets]

    def gpus_per_worker(self) -> float:
        return self.runtime.gpus_per_actor

    @model_validator(mode="after")
    def _unique(self) -> EvaluateDetectorConfig:
        for kind, names in (("detector", [d.name for d in self.detectors]),
                            ("test set", [t.name for t in self.test_sets])):
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"{kind} name '{dup[0]}' is used twice")
        return self
