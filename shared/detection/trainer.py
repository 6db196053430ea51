"""One worker's detector training, in plain torch: the model, its optimiser and the difficulty booster, an epoch of
weighted training, validation over the whole split, and the state a checkpoint holds.

The Ray Train loop (``ray_jobs/train_detector.py``) and the bare-PyTorch benchmark baseline run the same
:class:`DetectorTrainer`; across workers it needs only ``gather`` (concatenate a 1-D tensor from every worker in rank
order: ``shared.detection.boosting.default_gather()`` under ``torch.distributed``, identity in one process).

The learning rate follows ``cfg.lr_schedule`` (linear warm-up over ``cfg.warmup_steps``, then a cosine over the
whole run), set before every optimiser step; the run's length in steps is ``cfg.epochs`` times the steps per epoch,
given (``steps_per_epoch=``) or counted in the first epoch this trainer runs (the cosine stays flat until then).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from shared.detection.augment import resize_batch, to_tensor
from shared.detection.backbones import DetectorSpec, build_detector, fake_probability, unwrap
from shared.detection.boosting import Booster, Gather, default_gather
from shared.detection.metrics import accuracy, average_precision, roc_auc
from shared.detection.training import lr_factor, train_step

Batch = dict[str, np.ndarray]
"""Decoded rows: "image" (B, H, W, 3) uint8, "label" (B,), "index" (B,) global sample indices."""


@dataclass
class EpochTotals:
    loss_sum: float
    """Sum over batches of batch loss x batch size, over every worker."""
    samples: int
    """Training samples seen by every worker together."""
    seconds: float
    cpu_seconds: float
    """This process's CPU time for the epoch's training."""

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.samples, 1)


class DetectorTrainer:
    """Model, optimiser and booster of one worker (``cfg`` is a DetectorConfig, ``spec`` the detector spec)."""

    def __init__(self, cfg: Any, spec: DetectorSpec, groups: Any, group_names: list[str], *, rank: int = 0,
                 device: torch.device | str = "cpu", wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
                 gather: Gather | None = None, pretrained: bool = True, steps_per_epoch: int | None = None):
        self.cfg, self.spec, self.rank, self.device = cfg, spec, rank, torch.device(device)
        torch.manual_seed(cfg.seed)
        self.rng = np.random.default_rng([cfg.seed, rank])
        model = build_detector(spec, pretrained=pretrained, storage=cfg.storage)
        self.model = wrap(model) if wrap is not None else model.to(self.device)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=cfg.lr,
                                           weight_decay=cfg.weight_decay)
        self.booster = Booster(cfg.boosting, groups, group_names)
        self.gather = gather
        self.history: list[dict[str, Any]] = []
        self.next_epoch = 0
        self.step = 0
        """Optimiser steps taken so far (the schedule's position)."""
        self.steps_per_epoch = steps_per_epoch
        """This worker's batches per epoch (None until the first epoch has counted them)."""

    def learning_rate(self) -> float:
        """The learning rate of the next optimiser step."""
        total = None if self.steps_per_epoch is None else self.cfg.epochs * self.steps_per_epoch
        return self.cfg.lr * lr_factor(self.step, total, self.cfg.warmup_steps, self.cfg.lr_schedule)

    def _gather(self, values: torch.Tensor) -> torch.Tensor:
        return (self.gather or default_gather())(values)

    def train_epoch(self, batches: Iterable[Batch], epoch: int,
                    on_batch: Callable[[float], None] | None = None) -> EpochTotals:
        """Weighted training over this worker's batches; totals summed over every worker."""
        started, cpu_started = time.perf_counter(), time.process_time()
        self.model.train()
        local = torch.zeros(2, dtype=torch.float64)
        steps = 0
        for batch in batches:
            for group in self.optimizer.param_groups:
                group["lr"] = self.learning_rate()
            loss, n = train_step(self.model, self.optimizer, self.booster, batch, epoch, self.spec, self.cfg.augment,
                                 self.rng, self.device)
            local += torch.tensor([loss * n, n], dtype=torch.float64)
            self.step += 1
            steps += 1
            if on_batch is not None:
                on_batch(loss)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        if self.steps_per_epoch is None:
            self.steps_per_epoch = steps
        totals = self._gather(local).reshape(-1, 2).sum(dim=0)
        return EpochTotals(float(totals[0]), int(totals[1]), seconds, cpu)

    @torch.no_grad()
    def validate(self, batches: Iterable[Batch], world: int) -> dict[str, float]:
        """AUC / AP / ACC over the whole validation split: this worker scores the rows with index % world == rank,
        then every worker gathers all scores (so every worker returns the same figures)."""
        net = unwrap(self.model).eval()  # no DDP forward: ranks score different numbers of batches
        parts: list[torch.Tensor] = []
        for batch in batches:
            mine = batch["index"] % world == self.rank
            if not mine.any():
                continue
            x = to_tensor(resize_batch(batch["image"][mine], self.spec.input_size), self.spec.mean, self.spec.std)
            parts.append(torch.stack([torch.from_numpy(batch["index"][mine]).double(),
                                      fake_probability(net, x.to(self.device)).double().cpu(),
                                      torch.from_numpy(batch["label"][mine]).double()], dim=1))
        local = torch.cat(parts) if parts else torch.zeros((0, 3), dtype=torch.float64)
        rows = self._gather(local.reshape(-1)).reshape(-1, 3).numpy()
        labels, scores = rows[:, 2].astype(np.int64), rows[:, 1]
        return {"val_auc": roc_auc(labels, scores), "val_ap": average_precision(labels, scores),
                "val_acc": accuracy(labels, scores), "val_samples": int(rows.shape[0])}

    def end_epoch(self, epoch: int, totals: EpochTotals, val: dict[str, float]) -> tuple[dict[str, Any], dict]:
        """Close the epoch: the booster's epoch summary, the epoch's metrics (appended to :attr:`history`), and the
        hardest group (for the progress line)."""
        record = self.booster.end_epoch(epoch)
        groups, weights = record["groups"], record["weights"]
        metrics = {"epoch": epoch, "train_loss": totals.loss, **val, "train_samples": totals.samples,
                   "lr": self.optimizer.param_groups[0]["lr"], "effective_batch_size": weights["effective_batch_size"],
                   "weight_min": weights["min"], "weight_max": weights["max"],
                   "samples_per_second": totals.samples / max(totals.seconds, 1e-9),
                   "train_cpu_seconds_rank0": totals.cpu_seconds, "epoch_seconds": totals.seconds,
                   "state_checksum": self.booster.state.checksum()}
        self.history.append(metrics)
        self.next_epoch = epoch + 1
        hardest = max((g for g in groups if g["mean_difficulty"] is not None), key=lambda g: g["mean_difficulty"],
                      default={"group": None, "mean_difficulty": float("nan")})
        return metrics, hardest

    @property
    def best_auc(self) -> float | None:
        return max((h["val_auc"] for h in self.history), default=None)

    def state_dict(self) -> dict[str, Any]:
        """Model, optimiser, difficulty state, the last finished epoch and the history (weights_only-safe)."""
        return {"model": unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                "booster": self.booster.state_dict(), "epoch": self.next_epoch - 1, "history": self.history,
                "step": self.step, "steps_per_epoch": self.steps_per_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])  # moves the moments to the parameters' device
        self.booster.load_state_dict(state["booster"])
        self.history = list(state["history"])
        self.next_epoch = int(state["epoch"]) + 1
        self.step = int(state["step"])
        self.steps_per_epoch = self.steps_per_epoch or state["steps_per_epoch"]
