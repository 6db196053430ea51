"""One way to start Ray Train for every job that trains or scores on workers (prune, distill, train-detector).

    result = fit_workers(train_loop, work, stage, resources, run_name="train")

- Inputs: ``work`` is the job's own dataclass (its config, a ``StageRef``, its data); every worker gets it as the
  one argument of ``train_loop(work)``.

- Storage: ``<stage>/checkpoints/<config>/<run_name>`` when the run is resumable (a rerun of the same config finds
  its latest checkpoint through ``ray.train.get_checkpoint()``), else a folder of this attempt.
- Failures: ``FailureConfig(max_failures)``; a user error raised in a worker comes out as itself (one line, exit 2),
  not wrapped in Ray Train's exceptions.
- State: ``report_state`` / ``restore_state`` put a worker's state in Ray Train checkpoints as
  ``shared.checkpoint`` folders (state + fingerprint, loaded with weights_only=True): one folder written by rank 0,
  or one ``rank-<r>/`` folder per worker when every worker's state differs (Ray Train merges them into one
  checkpoint).
- Devices and the process group: ``ray_jobs.process_group.CheckedTorchConfig`` (GPUs checked before the group
  forms; loopback only on the local instance).
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import ray
import ray.train
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from ray_jobs.errors import user_error_in
from ray_jobs.process_group import CheckedTorchConfig
from ray_jobs.runtime import started_locally
from shared.config import WorkersConfig
from shared.stage import Stage


@dataclass(frozen=True)
class StageRef:
    """What a worker knows of the stage it computes for: its name (placement, progress), this attempt's folder (where
    rank 0 writes outputs) and the config hash (checkpoint fingerprints)."""

    name: str
    attempt_uri: str
    config_hash: str

    @classmethod
    def of(cls, stage: Stage) -> StageRef:
        return cls(stage.name, stage.store.uri(), stage.config_hash)


Work = TypeVar("Work")


def fit_workers(train_loop: Callable[[Work], Any], work: Work, stage: Stage,
                resources: WorkersConfig, *, role: str = "training worker", run_name: str = "run",
                resumable: bool = True,
                datasets: dict[str, ray.data.Dataset] | None = None, dataset_config: DataConfig | None = None,
                checkpoint_config: CheckpointConfig | None = None, logging_config: Any = None) -> ray.train.Result:
    """Run ``train_loop(work)`` on the workers and return Ray Train's result."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # worker prints reach the driver once, not twice
    store = stage.checkpoints if resumable else stage.store.child("ray_train")
    fs, path = store.pyarrow_filesystem()
    run_config = RunConfig(name=run_name, storage_path=path, storage_filesystem=fs,
                           checkpoint_config=checkpoint_config or CheckpointConfig(num_to_keep=2),
                           failure_config=FailureConfig(max_failures=resources.max_failures),
                           **({"logging_config": logging_config} if logging_config is not None else {}))
    trainer = TorchTrainer(
        functools.partial(_per_worker, train_loop), train_loop_config={"work": work},
        scaling_config=ScalingConfig(num_workers=resources.num_workers, use_gpu=resources.use_gpu,
                                     resources_per_worker={"CPU": resources.cpus_per_worker}),
        torch_config=CheckedTorchConfig(stage=stage.name, role=role, loopback=started_locally()),
        run_config=run_config, datasets=datasets, dataset_config=dataset_config,
    )
    try:
        return trainer.fit()
    except Exception as exc:
        error = user_error_in(exc)
        if error is not None:
            raise error from None
        raise


def _per_worker(train_loop: Callable[[Work], Any], config: dict[str, Any]) -> Any:
    return train_loop(config["work"])  # Ray Train hands a worker one dict; the job's loop takes its typed work


def _state_folder(root: str | Path, rank: int | None) -> Path:
    return Path(root) if rank is None else Path(root) / f"rank-{rank}"


def report_state(metrics: dict[str, Any], state: dict[str, Any], fingerprint: dict[str, Any], *, rank: int,
                 per_rank: bool = False) -> None:
    """``ray.train.report`` with ``state`` as a checkpoint: rank 0's only, or (``per_rank``) every worker's in its
    own folder. Every worker must call it the same number of times."""
    from shared.checkpoint import save_training_state

    if not per_rank and rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        save_training_state(_state_folder(folder, rank if per_rank else None), state, fingerprint)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def restore_state(fingerprint: dict[str, Any], job: str, *, rank: int | None = None,
                  fallback: tuple[ray.train.Checkpoint, str] | None = None) -> dict[str, Any] | None:
    """The state of this run's latest checkpoint (``rank``: this worker's own), else of ``fallback`` (a checkpoint
    and the name errors give it, e.g. a ``resume_from`` setting); None when there is none, or when it was written by
    another number of workers (``fingerprint["workers"]``; the caller starts over). Any other difference in the
    fingerprint is an error naming it."""
    from shared.checkpoint import FINGERPRINT_FILE, load_training_state

    checkpoint, where = ray.train.get_checkpoint(), None
    if checkpoint is None and fallback is not None:
        checkpoint, where = fallback
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as root:
        folder = _state_folder(root, rank)
        found = json.loads((folder / FINGERPRINT_FILE).read_text()) if (folder / FINGERPRINT_FILE).is_file() else {}
        if "workers" in fingerprint and found.get("workers") != fingerprint["workers"]:
            return None
        return load_training_state(folder, fingerprint, where or checkpoint.path, job=job)
