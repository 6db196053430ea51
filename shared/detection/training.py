"""One training step of a detector, shared by the Ray Train loop and the bare-PyTorch benchmark baseline, and the
learning-rate schedule the trainer applies before each step."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from shared.detection.augment import augment_batch, resize_batch, to_tensor
from shared.detection.backbones import DetectorSpec, unwrap
from shared.detection.boosting import Booster


def lr_factor(step: int, total_steps: int | None, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based): linear warm-up from
    1/warmup_steps to 1 over the first ``warmup_steps`` steps, then 1 (``constant``) or half a cosine from 1 down
    towards 0 at ``total_steps`` (``cosine``; flat while the total is not known yet)."""
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"lr_schedule {schedule!r}: use cosine or constant")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or total_steps is None or total_steps <= warmup_steps:
        return 1.0
    progress = min((step - warmup_steps) / (total_steps - warmup_steps), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def clean_difficulty(model: torch.nn.Module, images: np.ndarray, labels: torch.Tensor, spec: DetectorSpec,
                     booster: Booster, device: torch.device | str) -> torch.Tensor:
    """d_i of the clean view (resized, not augmented) under no gradient, with the network in evaluation mode (no
    dropout, BatchNorm's running statistics: no batch statistics are updated), outside any DDP wrapper."""
    net = unwrap(model)
    was_training = net.training
    x = to_tensor(resize_batch(images, spec.input_size), spec.mean, spec.std).to(device)
    try:
        with torch.no_grad():
            net.eval()
            return booster.difficulty(net(x), labels)
    finally:
        net.train(was_training)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, booster: Booster | None,
               batch: dict[str, np.ndarray], epoch: int, spec: DetectorSpec, augment: Any,
               rng: np.random.Generator, device: torch.device | str = "cpu") -> tuple[float, int]:
    """Augment, forward, weighted loss (plain mean cross-entropy without a booster), backward, step.

    ``batch`` holds "image" (B, H, W, 3) uint8, "label" (B,) and "index" (B,) global sample indices. With a booster
    whose ``difficulty_view`` is ``clean`` (the default), the difficulty it tracks comes from one extra forward pass
    on the clean view (:func:`clean_difficulty`); the loss is always that of the augmented view.
    Returns (loss, batch size). Augmentation runs on the CPU; the step on ``device``.
    """
    labels = torch.tensor(batch["label"], dtype=torch.int64, device=device)
    clean = None
    if booster is not None and booster.settings.difficulty_view == "clean":
        clean = clean_difficulty(model, batch["image"], labels, spec, booster, device)
    x = to_tensor(augment_batch(batch["image"], spec.input_size, augment, rng), spec.mean, spec.std).to(device)
    logits = model(x)  # (B, 2)
    if booster is None:
        loss = F.cross_entropy(logits, labels)
    else:
        loss, _ = booster(logits, labels, batch["index"], epoch, difficulty=clean)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.item()), len(labels)
