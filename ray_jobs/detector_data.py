"""Ray Data glue shared by train-detector and evaluate-detector: read the planned rows of each source, decode them once
in parallel, drop (and list) the images that cannot be decoded.

    decoded, dropped = decode_mixture(plan, storage)      # dropped: [{dataset, id, index, label, reason}]
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import ray
import ray.data
from ray.data.expressions import col

from ray_jobs.data import read_dataset
from shared.config import StorageConfig
from shared.detection.mixture import MixturePlan, decode_batch

_LOOKUPS: dict[str, dict[str, tuple[int, int, int, str]]] = {}


def _lookup(ref: ray.ObjectRef) -> dict[str, tuple[int, int, int, str]]:
    key = ref.hex()
    if key not in _LOOKUPS:  # once per worker process, not once per batch
        _LOOKUPS.clear()
        _LOOKUPS[key] = ray.get(ref)
    return _LOOKUPS[key]


def _decode(batch: dict[str, np.ndarray], *, dataset: str, lookup: list[ray.ObjectRef], height: int, width: int
            ) -> dict[str, np.ndarray]:
    """Decode the planned rows of one source (ok=False with a reason when that fails); rows outside the plan come out
    with planned=False (and a blank image) and are filtered next. Every input row comes out, so a batch is never
    empty (Ray Data cannot type an empty tensor column)."""
    table = _lookup(lookup[0])
    ids = [str(i) for i in batch["id"]]
    planned = np.array([i in table for i in ids], dtype=bool)
    images, ok, reasons = decode_batch([batch["image"][k] if planned[k] else b"" for k in range(len(ids))], ids,
                                       height, width, dataset)
    meta = [table.get(i, (-1, -1, -1, "")) for i in ids]
    return {
        "index": np.array([m[0] for m in meta], dtype=np.int64),
        "label": np.array([m[1] for m in meta], dtype=np.int64),
        "group": np.array([m[2] for m in meta], dtype=np.int64),
        "split": np.array([m[3] for m in meta], dtype=object),
        "dataset": np.array([dataset] * len(ids), dtype=object),
        "id": np.array(ids, dtype=object),
        "image": images,
        "planned": planned,
        "ok": ok,
        "reason": np.array([r or "" for r in reasons], dtype=object),
    }


def quiet_progress() -> None:
    """No Ray Data progress bars or progress log lines (the jobs print their own progress)."""
    ray.data.DataContext.get_current().enable_progress_bars = False


def read_images(uri: str, storage: StorageConfig | None) -> ray.data.Dataset:
    """The id and image columns of an IMAGE_SCHEMA dataset (exactly the files its stage committed), streamed."""
    return read_dataset(uri, storage, columns=["id", "image"])


def decode_mixture(plan: MixturePlan, storage: StorageConfig | None, blocks: int = 8, shuffle_seed: int | None = None
                   ) -> tuple[ray.data.Dataset, list[dict[str, Any]]]:
    """(the decodable planned rows, over a materialised decode; the dropped rows with their reasons).

    With ``shuffle_seed`` the rows are shuffled once before they are cut into blocks, so every block (hence every
    Train worker's shard) is a mixture of all sources rather than a run of one source. Rows keep the plan's order
    through every step (``preserve_order``, which datasets derived from these keep), so the blocks, their rows and
    the shuffle are the same in every run of a config, whatever order Ray's tasks finish in.
    """
    quiet_progress()
    with ordered():
        return _decode_mixture(plan, storage, blocks, shuffle_seed)


@contextlib.contextmanager
def ordered() -> Iterator[None]:
    """Datasets created inside keep their rows in input order (Ray Data's ``preserve_order``)."""
    options = ray.data.DataContext.get_current().execution_options
    previous, options.preserve_order = options.preserve_order, True
    try:
        yield
    finally:
        options.preserve_order = previous


def _decode_mixture(plan: MixturePlan, storage: StorageConfig | None, blocks: int, shuffle_seed: int | None
                    ) -> tuple[ray.data.Dataset, list[dict[str, Any]]]:
    parts = []
    for name, uri in plan.datasets.items():
        ref = ray.put(plan.lookup(name))
        parts.append(read_images(uri, storage).map_batches(
            _decode, batch_format="numpy", batch_size=256,
            fn_kwargs={"dataset": name, "lookup": [ref], "height": plan.height, "width": plan.width})
            .filter(expr=col("planned") == True).drop_columns(["planned"]))  # noqa: E712 (an expression)
    everything = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    if shuffle_seed is not None:
        everything = everything.random_shuffle(seed=shuffle_seed)
    everything = everything.repartition(blocks).materialize()
    dropped = everything.filter(expr=col("ok") == False).select_columns(  # noqa: E712 (an expression, not a test)
        ["dataset", "id", "index", "label", "reason"]).take_all()
    good = everything.filter(expr=col("ok") == True).drop_columns(["ok", "reason", "dataset", "id"])  # noqa: E712
    return good, [{k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()} for row in dropped]


def split_of(ds: ray.data.Dataset, split: str) -> ray.data.Dataset:
    """The rows of one split, materialised (every epoch reads them again)."""
    return ds.filter(expr=col("split") == split).drop_columns(["split"]).materialize()
