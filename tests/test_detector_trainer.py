"""The detector trainer called directly (no Ray): what every Ray Train worker of train-detector runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.checkpoint import load_training_state, save_training_state
from shared.config import validate_config
from shared.configs.standin_faces import StandinFacesConfig
from shared.configs.train_detector import DetectorConfig
from shared.data import write_parquet
from shared.detection.backbones import make_spec
from shared.detection.mixture import plan_mixture
from shared.detection.standin import standin_table
from shared.detection.trainer import DetectorTrainer
from shared.imageset import decode_image
from shared.storage import Storage


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Stand-in faces (reals and blurred fakes, separable; no blur in the augmentations), planned and decoded in this
    process."""
    faces = StandinFacesConfig(size=16, reals=60, fakes_per_generator=60, generators=["blur"])
    table = standin_table(faces)
    root = tmp_path_factory.mktemp("faces")
    write_parquet(table, Storage(str(root)), "part-0.parquet")
    cfg = validate_config(DetectorConfig, {"sources": [{"name": "faces", "uri": str(root)}], "batch_size": 16,
                                           "model": {"kind": "small-cnn", "width": 8},
                                           "augment": {"blur_prob": 0.0, "jpeg_prob": 0.0},
                                           "boosting": {"method": "momentum", "warmup_epochs": 1}}, "test")
    plan = plan_mixture(cfg.sources, cfg.split)
    by_id = dict(zip(table.column("id").to_pylist(), table.column("image").to_pylist()))
    rows = plan.rows.to_pylist()

    def split(name: str) -> dict[str, np.ndarray]:
        mine = [r for r in rows if r["split"] == name]
        return {"image": np.stack([decode_image(by_id[r["id"]]) for r in mine]),
                "label": np.array([r["label"] for r in mine]), "index": np.array([r["index"] for r in mine])}

    return cfg, plan, make_spec(cfg.model, plan.height), split("train"), split("val")


def _batches(data: dict[str, np.ndarray], size: int, seed: int):
    order = np.random.default_rng(seed).permutation(len(data["label"]))
    for start in range(0, len(order), size):
        sel = order[start: start + size]
        yield {key: values[sel] for key, values in data.items()}


def test_a_few_epochs_beat_chance_and_a_restored_trainer_continues_identically(setup, tmp_path):
    cfg, plan, spec, train, val = setup
    trainer = DetectorTrainer(cfg, spec, plan.column("group"), plan.group_names, pretrained=False)
    seen = []
    for epoch in range(4):
        totals = trainer.train_epoch(_batches(train, cfg.batch_size, epoch), epoch, on_batch=seen.append)
        metrics, hardest = trainer.end_epoch(epoch, totals, trainer.validate(_batches(val, 32, 0), world=1))
    assert totals.samples == len(train["label"])
    assert len(seen) == 4 * -(-len(train["label"]) // cfg.batch_size)
    assert metrics["val_samples"] == len(val["label"])
    assert metrics["val_auc"] > 0.75, trainer.history  # blurred fakes are separable from sharp reals
    assert hardest["group"] in plan.group_names
    assert int(trainer.booster.state.seen.sum()) == len(train["label"])  # every training sample tracked

    # a checkpointed state restores model, optimiser, difficulty state and history: the next epoch is the same
    save_training_state(tmp_path, trainer.state_dict(), {"config": "c"})
    restored = DetectorTrainer(cfg, spec, plan.column("group"), plan.group_names, pretrained=False)
    restored.load_state_dict(load_training_state(tmp_path, {"config": "c"}, "ck"))
    assert restored.next_epoch == 4
    assert restored.history == trainer.history
    results = []
    for t in (trainer, restored):  # the same draws for augmentation (numpy) and dropout (torch) in both
        t.rng = np.random.default_rng(7)
        torch.manual_seed(7)
        results.append(t.train_epoch(_batches(train, cfg.batch_size, 9), 4))
    a, b = results
    assert a.loss == pytest.approx(b.loss, rel=1e-6)
    for p, q in zip(trainer.model.parameters(), restored.model.parameters()):
        torch.testing.assert_close(p, q)
    assert trainer.booster.state.checksum() == restored.booster.state.checksum()
