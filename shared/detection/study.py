"""The detector study's design and its runs, on cached features (numpy + torch, no Ray).

    design = study_design(families, heldout_family, single_generator)
    result = split_runs(inputs, design, split_index, cfg)       # one split: every block, variant and seed
    stats  = shared.detection.intervals.bootstrap([...cells of every split...], rounds, seed)

Blocks (each block's variants are tested on the same images, so their differences are paired):

- ``headline``: the held-out family never trains. single-uniform / single-boost train on the reals and
  ``single_generator``; diverse-uniform / -boost / -focal / -ohem on the reals and every generator of the other
  families. Test: the split's test reals and *every* image of the held-out family. Scored clean and under each
  robustness perturbation.
- ``lofo/<family>``: the same question for every family held out in turn (uniform weights): diverse (every other
  family) against single (one generator of another family: ``single_generator``, or when that one is held out, the
  first generator of the first other family, by name).
- ``matrix``: train on one family's fakes (uniform), test on each family's test-split fakes, one cell per tested
  family.

Within a block every variant trains on the same number of fakes (the smallest training pool of the block; a pool is
subsampled evenly across its generators) and on the same reals, so only the kind of fake changes. The subsample is
drawn from (seed, split, training seed, block, generators): the -uniform and -boost variants of one training set see
the same images.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared.detection.heads import fit_head
from shared.detection.intervals import Cell, run_figures
from shared.errors import ConfigError

CLEAN = "clean"
HEADLINE = "headline"
WEIGHTINGS = {"uniform": "uniform", "boost": "momentum", "focal": "focal", "ohem": "ohem"}
HEADLINE_VARIANTS = ("single-uniform", "single-boost", "diverse-uniform", "diverse-boost", "diverse-focal",
                     "diverse-ohem")
COMPARISONS = (("diverse-uniform", "single-uniform"), ("diverse-boost", "diverse-uniform"),
               ("single-boost", "single-uniform"), ("diverse-focal", "diverse-uniform"),
               ("diverse-ohem", "diverse-uniform"), ("diverse-boost", "diverse-focal"))
"""The paired differences reported: diversity, MDB (diverse and single), the weighting baselines, MDB vs focal."""


@dataclass(frozen=True)
class Variant:
    name: str
    generators: tuple[str, ...]
    """The generators whose fakes it trains on."""
    weighting: str
    """uniform, momentum, focal or ohem."""


@dataclass(frozen=True)
class Block:
    name: str
    variants: tuple[Variant, ...]
    tests: tuple[tuple[str, tuple[str, ...], bool], ...]
    """One cell per entry: (cell name, the generators of its fakes, all of their images (True) or their test split
    only)."""
    robustness: bool = False
    """Score this block under every perturbation too."""


def resolve_families(sources: Sequence[str], labels: Sequence[int], family_column: Sequence[str | None] | None,
                     configured: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """family -> generators: the config's mapping (every generator of the data in exactly one family), else the
    data's 'family' column, else each generator its own family."""
    generators = sorted({s for s, y in zip(sources, labels) if int(y) == 1})
    if configured:
        named = {g for members in configured.values() for g in members}
        missing = sorted(set(generators) - named)
        unknown = sorted(named - set(generators))
        if unknown:
            raise ConfigError(f"families: generator '{unknown[0]}' is not in the data (generators: "
                              f"{', '.join(generators)})")
        if missing:
            raise ConfigError(f"families: generator '{missing[0]}' of the data is in no family")
        return {f: sorted(m) for f, m in sorted(configured.items())}
    out: dict[str, set[str]] = {}
    for s, y, f in zip(sources, labels, family_column or [None] * len(sources)):
        if int(y) == 1:
            out.setdefault(f or s, set()).add(s)
    for fam, members in out.items():
        others = [g for other, m in out.items() if other != fam for g in m if g in members]
        if others:
            raise ConfigError(f"family column: generator '{others[0]}' is in more than one family")
    return {f: sorted(m) for f, m in sorted(out.items())}


def study_design(families: Mapping[str, Sequence[str]], heldout: str, single: str) -> list[Block]:
    """The blocks of the study (see the module docstring)."""
    if len(families) < 2:
        raise ConfigError(f"the study needs at least two generator families (has: {', '.join(families) or 'none'})")
    if heldout not in families:
        raise ConfigError(f"heldout_family '{heldout}' is not a family of the data ({', '.join(families)})")
    family_of = {g: f for f, members in families.items() for g in members}
    if single not in family_of:
        raise ConfigError(f"single_generator '{single}' is not a generator of the data ({', '.join(family_of)})")
    if family_of[single] == heldout:
        raise ConfigError(f"single_generator '{single}' belongs to heldout_family '{heldout}'")

    def others(h: str) -> tuple[str, ...]:
        return tuple(g for f in sorted(families) if f != h for g in families[f])

    def single_for(h: str) -> str:
        if family_of[single] != h:
            return single
        return sorted(families[sorted(f for f in families if f != h)[0]])[0]

    held = tuple(families[heldout])
    headline = Block(HEADLINE, tuple(
        Variant(name, (single,) if name.startswith("single") else others(heldout), WEIGHTINGS[name.split("-")[1]])
        for name in HEADLINE_VARIANTS), ((heldout, held, True),), robustness=True)
    lofo = [Block(f"lofo/{h}", (Variant("diverse", others(h), "uniform"), Variant("single", (single_for(h),),
                                                                                  "uniform")),
                  ((h, tuple(families[h]), True),)) for h in sorted(families)]
    matrix = Block("matrix", tuple(Variant(f, tuple(families[f]), "uniform") for f in sorted(families)),
                   tuple((f, tuple(families[f]), False) for f in sorted(families)))
    return [headline, *lofo, matrix]


@dataclass
class StudyInputs:
    """Every image of the study, in one order: metadata, the split of each split index, features per condition."""

    labels: np.ndarray
    sources: np.ndarray
    groups: np.ndarray
    """The Booster's difficulty group per image ((source, label))."""
    group_names: list[str]
    splits: list[np.ndarray]
    """Per split index: 'train' / 'val' / 'test' per image."""
    features: dict[str, np.ndarray]
    """condition ('clean', 'jpeg75', ...) -> (N, D) features."""


def _key(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big")


def even_subsample(candidates: np.ndarray, sources: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` of ``candidates`` (row indices), as even across their sources as their sizes allow."""
    by_source = {s: rng.permutation(candidates[sources[candidates] == s]) for s in sorted(set(sources[candidates]))}
    taken: dict[str, int] = dict.fromkeys(by_source, 0)
    left = n
    while left > 0:
        open_ = [s for s in by_source if taken[s] < by_source[s].size]
        if not open_:
            break
        share = max(1, left // len(open_))
        for s in open_:
            add = min(share, by_source[s].size - taken[s], left)
            taken[s] += add
            left -= add
            if left == 0:
                break
    return np.sort(np.concatenate([by_source[s][:taken[s]] for s in by_source]))


def split_runs(inputs: StudyInputs, design: Sequence[Block], k: int, cfg: Any) -> dict[str, Any]:
    """Every run of split ``k``: {'runs': [per-run records], 'cells': {(block, cell, condition): Cell}}."""
    split = inputs.splits[k]
    labels, sources = inputs.labels, inputs.sources
    reals = {s: np.flatnonzero((labels == 0) & (split == s)) for s in ("train", "val", "test")}
    runs: list[dict[str, Any]] = []
    cells: dict[tuple[str, str, str], Cell] = {}
    conditions = list(inputs.features)

    def fakes_of(generators: Sequence[str], part: str | None) -> np.ndarray:
        mask = (labels == 1) & np.isin(sources, list(generators))
        return np.flatnonzero(mask if part is None else mask & (split == part))

    for block in design:
        budget = min(fakes_of(v.generators, "train").size for v in block.variants)
        if budget == 0 or reals["train"].size == 0:
            raise ConfigError(f"split {k}, block {block.name}: no training fakes or reals (budget {budget})")
        tests = {name: np.concatenate([reals["test"], fakes_of(gens, None if everything else "test")])
                 for name, gens, everything in block.tests}
        for name, rows in tests.items():
            if rows.size == reals["test"].size or reals["test"].size == 0:
                raise ConfigError(f"split {k}, block {block.name}: the test cell '{name}' lacks reals or fakes")
            for cond in conditions if block.robustness else [CLEAN]:
                cells[(block.name, name, cond)] = Cell(labels[rows], {v.name: [] for v in block.variants})
        for t in range(cfg.seeds):
            for v in block.variants:
                pool = fakes_of(v.generators, "train")
                rng = np.random.default_rng([cfg.seed, k, t, _key(block.name, v.generators) % 2**32])
                train = np.concatenate([reals["train"], even_subsample(pool, sources, budget, rng)])
                val = np.concatenate([reals["val"], fakes_of(v.generators, "val")])
                boosting = cfg.boosting.model_copy(update={"method": v.weighting})
                head = fit_head(inputs.features[CLEAN], labels, inputs.groups, inputs.group_names, train, val,
                                cfg.head, boosting, seed=[cfg.seed, k, t, _key(block.name, v.name) % 2**32])
                record: dict[str, Any] = {
                    "block": block.name, "variant": v.name, "split": k, "seed": t, "weighting": v.weighting,
                    "generators": list(v.generators), "train_reals": int(reals["train"].size),
                    "train_fakes": int(budget), "val_auc": head.val_auc, "best_epoch": head.best_epoch,
                    "effective_batch": head.history[-1].get("effective_batch_size"), "test": {}}
                for name, rows in tests.items():
                    for cond in conditions if block.robustness else [CLEAN]:
                        scores = head.score(inputs.features[cond][rows])
                        cells[(block.name, name, cond)].scores[v.name].append(scores)
                        if cond == CLEAN:
                            record["test"][name] = run_figures(labels[rows], scores)
                runs.append(record)
    return {"runs": runs, "cells": cells}


def hamming_pairs(a: np.ndarray, b: np.ndarray, max_distance: int) -> np.ndarray:
    """(i, j) pairs of 64-bit hashes a[i], b[j] within ``max_distance`` bits of each other."""
    x = (a[:, None] ^ b[None, :]).astype(np.uint64)
    bits = np.unpackbits(x.view(np.uint8).reshape(*x.shape, 8), axis=-1).sum(axis=-1)
    return np.argwhere(bits <= max_distance)


def cross_split_near_duplicates(hashes: np.ndarray, labels: np.ndarray, split: np.ndarray, max_distance: int
                                ) -> dict[str, int]:
    """Near-duplicate pairs between a training image and a test image: real-real, and fake (train) - real (test)."""
    train, test = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
    test_reals = test[labels[test] == 0]
    out = {}
    for name, rows in (("real_train~real_test", train[labels[train] == 0]),
                       ("fake_train~real_test", train[labels[train] == 1])):
        out[name] = int(len(hamming_pairs(hashes[rows], hashes[test_reals], max_distance)))
    return out
