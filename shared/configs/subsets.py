"""A seeded subset of image ids, chosen by a hash of each id: the same ids in every job that names the same subset.

    reals = IdSubset(stop=0.4, seed=0)        # about 40 % of any collection's ids
    reals.selects(["000", "001"])              # [True, False]: stateless, per id, order-free

The train-ddpm and train-vae jobs train only on the reals their ``training_reals`` subset selects; the generate job
records the same subset per real image (the ``generator_training`` column), and the detector split keeps those
images (and everything made from them) in its train split. Complementary subsets ([0, 0.5) and [0.5, 1) with one
seed) split a collection in two without overlap.

Torch-free (pydantic and hashlib only).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from pydantic import Field, model_validator

from shared.config import StrictModel


def id_position(seed: int, image_id: str) -> float:
    """Where an id falls in [0, 1) under a seed: the first 8 bytes of sha256("<seed>:subset:<id>")."""
    digest = hashlib.sha256(f"{seed}:subset:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


class IdSubset(StrictModel):
    """The ids whose seeded hash position falls in [start, stop): a fixed share of a collection, chosen without
    looking at the images, the same for every job and every batch."""

    start: float = Field(0.0, ge=0.0, lt=1.0)
    """Lower end of the hash interval (inclusive)."""
    stop: float = Field(1.0, gt=0.0, le=1.0)
    """Upper end of the hash interval (exclusive); stop - start is the expected share of the ids selected."""
    seed: int = Field(0, ge=0)
    """Seed of the hash: another seed selects another subset of the same share."""

    @model_validator(mode="after")
    def _interval(self) -> IdSubset:
        if self.stop <= self.start:
            raise ValueError(f"subset [{self.start:g}, {self.stop:g}) is empty: stop must be above start")
        return self

    @property
    def share(self) -> float:
        return self.stop - self.start

    def selects(self, ids: Iterable[str]) -> list[bool]:
        """Per id: whether it is in the subset."""
        return [self.start <= id_position(self.seed, str(i)) < self.stop for i in ids]
