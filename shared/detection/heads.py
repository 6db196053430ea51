"""Detector heads on cached frozen-backbone features, in plain torch: one head per (training set, seed) in about a
second on a CPU, so a study of dozens of runs fits in minutes.

    head = fit_head(features, labels, groups, group_names, train, val, cfg.head, boosting, seed=...)
    scores = head.score(features[test])            # probability of 'fake'

Training: features standardised with the training rows' mean and spread; each step takes half its batch from the
training reals and half from the training fakes (drawn without replacement within a pass, the smaller class
recycled), so the classes weigh the same whatever their counts; AdamW with a cosine decay; the loss weighted by the
:class:`~shared.detection.boosting.Booster` (uniform, momentum difficulty boosting, focal, OHEM). The head kept is
the one of the epoch with the best validation AUC (the last on ties). Everything random is drawn from ``seed``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from shared.detection.boosting import Booster, local_gather
from shared.detection.metrics import roc_auc


def _net(cfg: Any, dim: int) -> nn.Module:
    if cfg.kind == "mlp":
        return nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(dim, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, 2))
    return nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(dim, 2))


@dataclass
class Head:
    """A trained head and the standardisation it was trained with."""

    net: nn.Module
    mean: np.ndarray
    std: np.ndarray
    val_auc: float
    best_epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)

    @torch.no_grad()
    def score(self, features: np.ndarray) -> np.ndarray:
        """Probability of 'fake' per row."""
        self.net.eval()
        x = torch.from_numpy(((features - self.mean) / self.std).astype(np.float32))
        return torch.softmax(self.net(x), dim=-1)[:, 1].double().numpy()


def _balanced_batches(reals: np.ndarray, fakes: np.ndarray, batch_size: int, rng: np.random.Generator
                      ) -> list[np.ndarray]:
    """One pass over the larger class, each batch half reals and half fakes."""
    half = max(1, batch_size // 2)
    steps = math.ceil(max(reals.size, fakes.size) / half)

    def stream(members: np.ndarray) -> np.ndarray:
        need = steps * half
        reps = math.ceil(need / members.size)
        return np.concatenate([rng.permutation(members) for _ in range(reps)])[:need]

    r, f = stream(reals), stream(fakes)
    return [np.concatenate([r[i * half:(i + 1) * half], f[i * half:(i + 1) * half]]) for i in range(steps)]


def fit_head(features: np.ndarray, labels: np.ndarray, groups: np.ndarray, group_names: Sequence[str],
             train: np.ndarray, val: np.ndarray, cfg: Any, boosting: Any, seed: Sequence[int] | int) -> Head:
    """Train a head on ``features[train]`` (row indices), keep the epoch with the best AUC on ``features[val]``.

    ``groups`` / ``group_names``: the difficulty group of every row of ``features`` (the Booster's groups, e.g.
    (source, label)); ``boosting`` a BoostingConfig; ``cfg`` a HeadConfig; ``seed`` an int or a sequence of ints.
    """
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
    mean = features[train].mean(axis=0)
    std = features[train].std(axis=0) + 1e-6
    x = torch.from_numpy(((features - mean) / std).astype(np.float32))
    y = torch.from_numpy(labels.astype(np.int64))
    net = _net(cfg, features.shape[1])
    with torch.no_grad():  # seeded initialisation, independent of the global torch RNG; the output layer at zero
        layers = [m for m in net.modules() if isinstance(m, nn.Linear)]
        for layer in layers:
            bound = 1.0 / math.sqrt(layer.in_features)
            layer.weight.copy_(torch.empty_like(layer.weight).uniform_(-bound, bound, generator=gen))
            layer.bias.zero_()
        layers[-1].weight.zero_()
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    reals, fakes = train[labels[train] == 0], train[labels[train] == 1]
    steps_per_epoch = math.ceil(max(reals.size, fakes.size) / max(1, cfg.batch_size // 2))
    total = steps_per_epoch * cfg.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total)
                                                                                          / total)))
    booster = Booster(boosting, groups, list(group_names), gather=local_gather)
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    history = []
    val_y = labels[val]
    for epoch in range(cfg.epochs):
        net.train()
        losses = []
        for idx in _balanced_batches(reals, fakes, cfg.batch_size, rng):
            torch.manual_seed(int(rng.integers(0, 2**62)))  # dropout masks
            logits = net(x[idx])
            loss, _ = booster(logits, y[idx], idx, epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
        record = booster.end_epoch(epoch)
        net.eval()
        with torch.no_grad():
            val_scores = torch.softmax(net(x[val]), dim=-1)[:, 1].double().numpy()
        val_auc = roc_auc(val_y, val_scores)
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "val_auc": val_auc,
                        **{k: v for k, v in record.items() if k not in ("epoch", "groups")}})
        if best is None or val_auc >= best[0]:
            best = (val_auc, epoch, {k: v.clone() for k, v in net.state_dict().items()})
    assert best is not None
    net.load_state_dict(best[2])
    return Head(net, mean, std, best[0], best[1], history)
