"""standin-faces: a small offline real/fake face dataset (IMAGE_SCHEMA Parquet) for testing detectors.

    scopeforge run standin-faces --set output_root=runs/standin --set size=32

Reals are scikit-image's lfw_subset faces; the fakes are simple image processes (see shared/detection/standin.py),
not diffusion or GAN output. The stage hands over its 'dataset' output like a generate stage does.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pyarrow.compute as pc

from shared.configs.standin_faces import StandinFacesConfig
from shared.data import write_parquet
from shared.detection.standin import standin_table
from shared.stage import Stage


def run(cfg: StandinFacesConfig, stage: Stage) -> dict[str, Any]:
    table = standin_table(cfg)
    sources = table.column("source").to_pylist()
    for shard, name in enumerate(sorted(set(sources))):
        part = table.filter(pc.equal(table.column("source"), name))
        write_parquet(part, stage.store, "dataset", f"part-{shard:05d}.parquet")
    stage.outputs["dataset"] = "dataset"
    counts = dict(sorted(Counter(sources).items()))
    per_source = ", ".join(f"{k}: {v}" for k, v in counts.items())
    print(f"stand-in faces: {table.num_rows} images of {cfg.size}x{cfg.size} ({per_source})"
          f" -> {stage.store.uri('dataset')}")
    return {"images": table.num_rows, "per_source": counts, "size": cfg.size, "standin": True}
