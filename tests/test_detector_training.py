"""The detector training step and schedule: the difficulty the booster tracks comes from the clean view (evaluation
mode, no gradient, no side effect on the network), the loss from the augmented one; the learning rate warms up
linearly and follows a cosine over the whole run, stepped by the trainer."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shared.configs.train_detector import DetectorConfig
from shared.detection.augment import resize_batch, to_tensor
from shared.detection.backbones import build_detector, make_spec
from shared.detection.boosting import Booster
from shared.detection.trainer import DetectorTrainer
from shared.detection.training import lr_factor, train_step

SIZE = 16


def _cfg(**kw) -> DetectorConfig:
    return DetectorConfig(sources=[{"name": "d", "uri": "x"}], model={"kind": "small-cnn", "width": 4},
                          augment={"hflip": 1.0, "crop_scale_min": 0.5, "blur_prob": 0.0, "jpeg_prob": 0.0}, **kw)


def _batch(seed: int, n: int = 8, start: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (n, 20, 20, 3), dtype=np.uint8), "label": np.arange(n) % 2,
            "index": np.arange(start, start + n)}


@pytest.mark.parametrize("view", ["clean", "augmented"])
def test_the_tracked_difficulty_is_the_clean_views_in_evaluation_mode(view):
    cfg = _cfg(boosting={"difficulty_view": view, "warmup_epochs": 0})
    spec = make_spec(cfg.model, SIZE)
    torch.manual_seed(0)
    model = build_detector(spec).train()
    before = copy.deepcopy(model).eval()
    booster = Booster(cfg.boosting, np.arange(8) % 2, ["real", "fake"])
    batch = _batch(0)
    labels = torch.tensor(batch["label"])
    with torch.no_grad():
        clean = F.cross_entropy(before(to_tensor(resize_batch(batch["image"], SIZE), spec.mean, spec.std)), labels,
                                reduction="none").double().numpy()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the step leaves the weights alone
    train_step(model, optimizer, booster, batch, 0, spec, cfg.augment, np.random.default_rng(1))
    assert model.training  # the clean pass put the network back in training mode
    if view == "clean":
        np.testing.assert_allclose(booster.state.m, clean, rtol=1e-5)
    else:  # the augmented view's loss in training mode (batch statistics, flipped crops): another difficulty
        assert np.abs(booster.state.m - clean).max() > 1e-3
    # the clean pass adds no BatchNorm update: num_batches_tracked counts the training forward only
    tracked = [b for b in model.buffers() if b.dtype == torch.int64]
    assert tracked
    assert all(int(b) == 1 for b in tracked)


def test_lr_factor_warms_up_linearly_then_follows_half_a_cosine():
    assert [lr_factor(s, 100, 4, "cosine") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 100, 4, "cosine") == 1.0
    assert lr_factor(52, 100, 4, "cosine") == pytest.approx(0.5)
    assert lr_factor(99, 100, 4, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 95 / 96)))
    assert lr_factor(52, 100, 4, "constant") == 1.0
    assert lr_factor(52, None, 4, "cosine") == 1.0  # the run's length not known yet: flat
    with pytest.raises(ValueError, match="lr_schedule 'step'"):
        lr_factor(0, 10, 0, "step")


def test_the_trainer_steps_the_schedule_over_the_whole_run():
    cfg = _cfg(epochs=3, lr=0.01, warmup_steps=2, boosting={"method": "uniform"})
    spec = make_spec(cfg.model, SIZE)
    trainer = DetectorTrainer(cfg, spec, np.arange(32) % 2, ["real", "fake"], pretrained=False)
    lrs = []
    for epoch in range(cfg.epochs):
        batches = [_batch(10 * epoch + k, start=8 * k) for k in range(4)]
        trainer.train_epoch(batches, epoch, on_batch=lambda _: lrs.append(trainer.optimizer.param_groups[0]["lr"]))
        assert trainer.steps_per_epoch == 4
    assert trainer.step == 12
    assert lrs[:2] == pytest.approx([0.005, 0.01])  # warm-up
    assert lrs[4] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 2 / 10)))  # cosine over 12 - 2 steps
    assert lrs[-1] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 9 / 10)))
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    state = trainer.state_dict()
    assert (state["step"], state["steps_per_epoch"]) == (12, 4)
    restored = DetectorTrainer(cfg, spec, np.arange(32) % 2, ["real", "fake"], pretrained=False)
    restored.load_state_dict(state)
    assert restored.learning_rate() == trainer.learning_rate()
