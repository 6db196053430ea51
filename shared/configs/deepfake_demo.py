"""Config of ``scopeforge demo deepfake`` (not a job: it composes a pipeline of jobs)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from shared.config import StorageConfig, StrictModel


class DeepfakeDemoConfig(StrictModel):
    """Build the image dataset, train detectors (a) on one generator and (b) on all generators but a held-out one,
    each with uniform weights and with momentum difficulty boosting, and evaluate them on the held-out generator."""

    output_root: str = "runs/demo-deepfake"
    """Root URI of the demo run (every stage, results.md and metrics.json)."""
    storage: StorageConfig = Field(default_factory=StorageConfig)
    """Object-storage settings for every stage."""
    data_pipeline: str | None = "deepfake-data.yaml"
    """Pipeline YAML whose stages build the image dataset (a bare file name is looked up in ray_jobs/configs/); its
    stage named data_stage must hand over a 'dataset' output. Its output_root and storage are replaced by the
    demo's. Ignored when data_uri is set."""
    data_stage: str = "data"
    """The stage of data_pipeline that holds the dataset (the training stages refer to it as ${data_stage})."""
    data_uri: str | None = None
    """An existing image dataset (or dataset stage) to use instead of building one."""
    single_generator: str
    """Variant (a) trains on the reals and this generator's fakes only."""
    heldout_generator: str
    """Variant (b) trains on the reals and every generator but this one; all variants are evaluated on it."""
    train: dict[str, Any] = Field(default_factory=dict)
    """train-detector keys shared by the four variants (model, epochs, batch_size, split, ...); not 'sources' or
    'boosting'."""
    boost: dict[str, Any] = Field(default_factory=lambda: {"method": "momentum"})
    """The 'boosting' section of the boosted variants (the uniform variants use method: uniform)."""
    evaluate: dict[str, Any] = Field(default_factory=dict)
    """evaluate-detector keys (robustness, threshold, runtime, ...); not 'detectors' or 'test_sets'."""

    @model_validator(mode="after")
    def _checks(self) -> DeepfakeDemoConfig:
        if self.single_generator == self.heldout_generator:
            raise ValueError("single_generator and heldout_generator must differ")
        for key in ("sources", "boosting", "output_root", "stage", "storage"):
            if key in self.train:
                raise ValueError(f"train.{key} is set by the demo, not in 'train'")
        for key in ("detectors", "test_sets", "output_root", "stage", "storage"):
            if key in self.evaluate:
                raise ValueError(f"evaluate.{key} is set by the demo, not in 'evaluate'")
        if self.data_pipeline is None and self.data_uri is None:
            raise ValueError("set data_pipeline (to build the dataset) or data_uri (to use an existing one)")
        return self
