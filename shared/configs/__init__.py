"""Every job's typed config, by job name. Torch-free, so the CLI, the operator and the CRD generator import it cheaply.

A job named ``foo-bar`` has its config here and its Ray glue in ``ray_jobs/foo_bar.py`` (a ``run(cfg, stage)``).
"""

from __future__ import annotations

from shared.config import JobConfig
from shared.configs.build_corpus import BuildCorpusConfig
from shared.configs.curate import CurateConfig
from shared.configs.curate_images import CurateImagesConfig
from shared.configs.detector_study import DetectorStudyConfig
from shared.configs.distill import DistillConfig
from shared.configs.evaluate import EvaluateConfig
from shared.configs.evaluate_detector import EvaluateDetectorConfig
from shared.configs.generate import GenerateConfig
from shared.configs.inspect_model import InspectModelConfig
from shared.configs.prune import PruneConfig
from shared.configs.retrieval_study import RetrievalStudyConfig
from shared.configs.standin_faces import StandinFacesConfig
from shared.configs.train_ddpm import TrainDdpmConfig
from shared.configs.train_detector import DetectorConfig
from shared.configs.train_vae import TrainVaeConfig

JOB_CONFIGS: dict[str, type[JobConfig]] = {
    cls.JOB: cls
    for cls in (
        InspectModelConfig,
        BuildCorpusConfig,
        CurateConfig,
        RetrievalStudyConfig,
        PruneConfig,
        DistillConfig,
        EvaluateConfig,
        TrainDdpmConfig,
        TrainVaeConfig,
        GenerateConfig,
        CurateImagesConfig,
        DetectorConfig,
        EvaluateDetectorConfig,
        DetectorStudyConfig,
        StandinFacesConfig,
    )
}


def summary(cls: type[JobConfig]) -> str:
    """First line of the config's docstring: what the job does."""
    return (cls.__doc__ or "").strip().splitlines()[0]
