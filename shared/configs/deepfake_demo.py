"""Config of ``scopeforge demo deepfake`` (not a job: it composes a pipeline of jobs)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from shared.config import StorageConfig, StrictModel


class DeepfakeDemoConfig(StrictModel):
    """Build the image dataset, run the detector study (frozen pretrained features; single-source vs diverse
    training, momentum difficulty boosting vs uniform / focal / OHEM, over several splits and seeds, on a held-out
    generator family; a leave-one-family-out block and a train x test family matrix), and train the from-scratch
    CNN baseline on the diverse mixture of one split."""

    output_root: str = "runs/demo-deepfake"
    """Root URI of the demo run (every stage, results.md and metrics.json)."""
    storage: StorageConfig = Field(default_factory=StorageConfig)
    """Object-storage settings for every stage."""
    data_pipeline: str | None = "deepfake-data.yaml"
    """Pipeline YAML whose stages build the image dataset (a bare file name is looked up in ray_jobs/configs/); its
    stage named data_stage must hand over a 'dataset' output. Its output_root and storage are replaced by the
    demo's. Ignored when data_uri is set."""
    data_stage: str = "data"
    """The stage of data_pipeline that holds the dataset (the other stages refer to it as ${data_stage})."""
    data_uri: str | None = None
    """An existing image dataset (or dataset stage) to use instead of building one."""
    families: dict[str, list[str]] = {}
    """Generator family -> its generators. Empty: the dataset's 'family' column (the CNN baseline then needs
    'baseline_exclude')."""
    heldout_family: str
    """The family no headline detector trains on; the headline figures are its AUCs."""
    single_generator: str
    """The single-source variants' generator (of another family)."""
    study: dict[str, Any] = Field(default_factory=dict)
    """detector-study keys (backbone, head, boosting, splits, seeds, robustness, ...); not data, families,
    heldout_family or single_generator."""
    baseline: dict[str, Any] | None = Field(default_factory=dict)
    """train-detector keys of the from-scratch CNN baseline (trained on the reals and every generator outside the
    held-out family, uniform weights, the study's first split); null: no baseline."""
    baseline_exclude: list[str] = []
    """Generators the baseline leaves out. Empty: the held-out family's, from 'families'."""
    evaluate: dict[str, Any] = Field(default_factory=dict)
    """evaluate-detector keys for the baseline (robustness, runtime, ...); not 'detectors' or 'test_sets'."""

    @model_validator(mode="after")
    def _checks(self) -> DeepfakeDemoConfig:
        for key in ("data", "families", "heldout_family", "single_generator", "output_root", "stage", "storage"):
            if key in self.study:
                raise ValueError(f"study.{key} is set by the demo, not in 'study'")
        for key in ("sources", "boosting", "split", "output_root", "stage", "storage"):
            if key in (self.baseline or {}):
                raise ValueError(f"baseline.{key} is set by the demo, not in 'baseline'")
        for key in ("detectors", "test_sets", "output_root", "stage", "storage"):
            if key in self.evaluate:
                raise ValueError(f"evaluate.{key} is set by the demo, not in 'evaluate'")
        if self.data_pipeline is None and self.data_uri is None:
            raise ValueError("set data_pipeline (to build the dataset) or data_uri (to use an existing one)")
        if self.families and self.heldout_family not in self.families:
            raise ValueError(f"heldout_family '{self.heldout_family}' is not one of families "
                             f"({', '.join(self.families)})")
        if self.baseline is not None and not self.families and not self.baseline_exclude:
            raise ValueError("the CNN baseline needs the held-out generators: set 'families' or 'baseline_exclude' "
                             "(or baseline: null)")
        return self

    def heldout_generators(self) -> list[str]:
        return list(self.baseline_exclude or self.families.get(self.heldout_family, []))
