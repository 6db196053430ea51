"""One training step of a detector, shared by the Ray Train loop and the bare-PyTorch benchmark baseline."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from shared.detection.augment import augment_batch, to_tensor
from shared.detection.backbones import DetectorSpec
from shared.detection.boosting import Booster


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, booster: Booster | None,
               batch: dict[str, np.ndarray], epoch: int, spec: DetectorSpec, augment: Any,
               rng: np.random.Generator, device: torch.device | str = "cpu") -> tuple[float, int]:
    """Augment, forward, weighted loss (plain mean cross-entropy without a booster), backward, step.

    ``batch`` holds "image" (B, H, W, 3) uint8, "label" (B,) and "index" (B,) global sample indices.
    Returns (loss, batch size). Augmentation runs on the CPU; the step on ``device``.
    """
    x = to_tensor(augment_batch(batch["image"], spec.input_size, augment, rng), spec.mean, spec.std).to(device)
    labels = torch.tensor(batch["label"], dtype=torch.int64, device=device)
    logits = model(x)  # (B, 2)
    if booster is None:
        loss = F.cross_entropy(logits, labels)
    else:
        loss, _ = booster(logits, labels, batch["index"], epoch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.item()), len(labels)
