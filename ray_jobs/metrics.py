"""Throughput and progress metrics through ``ray.util.metrics``, so they show on the Ray dashboard and in Prometheus.

Exported names (Ray adds its ``ray_`` prefix): ``scopeforge_<unit>_total`` counters (rate() gives documents/s,
tokens/s, images/s), ``scopeforge_<unit>_per_second`` gauges per actor, ``scopeforge_train_loss`` and
``scopeforge_progress`` gauges. Every series carries the job as ``scopeforge_job`` and the stage as ``stage``: a tag
named ``job`` would collide with the ``job`` label Prometheus gives every scraped target (it would arrive renamed to
``exported_job``). ``EXPORTED`` names every series and its labels (the Grafana dashboard's test reads it).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ray.util.metrics import Counter, Gauge

TAGS = ("scopeforge_job", "stage")
UNITS = ("documents", "tokens", "images")
"""The units a Throughput may count (each gives a ``_total`` counter and a ``_per_second`` gauge)."""
EXPORTED = {f"ray_scopeforge_{u}_{kind}": TAGS for u in UNITS for kind in ("total", "per_second")} | {
    "ray_scopeforge_train_loss": TAGS, "ray_scopeforge_progress": TAGS}
"""Prometheus series name (with Ray's ``ray_`` prefix) -> the tags this module sets on it."""


def _tags(job: str, stage: str) -> dict[str, str]:
    return {"scopeforge_job": job, "stage": stage}


class Throughput:
    """Counts units of work (documents, tokens, images, samples) in one worker and exports totals and rates."""

    def __init__(self, job: str, stage: str, units: tuple[str, ...]):
        unknown = sorted(set(units) - set(UNITS))
        if unknown:
            raise ValueError(f"Throughput units {unknown}: not in metrics.UNITS {UNITS} (the dashboard plots those)")
        self.tags = _tags(job, stage)
        self.counters = {u: Counter(f"scopeforge_{u}_total", description=f"{u} processed", tag_keys=TAGS)
                         for u in units}
        self.gauges = {u: Gauge(f"scopeforge_{u}_per_second", description=f"{u} per second in one worker",
                                tag_keys=TAGS) for u in units}
        self.started = time.perf_counter()
        self.totals = dict.fromkeys(units, 0)

    def add(self, **counts: int) -> None:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        for unit, n in counts.items():
            if n > 0:  # Ray's Counter.inc refuses 0 (a batch that yielded nothing)
                self.counters[unit].inc(n, tags=self.tags)
            self.totals[unit] += n
            self.gauges[unit].set(self.totals[unit] / elapsed, tags=self.tags)


class TrainingProgress:
    """Loss and progress (0..1) of a training loop, reported from rank 0."""

    def __init__(self, job: str, stage: str):
        self.tags = _tags(job, stage)
        self.loss = Gauge("scopeforge_train_loss", description="training loss", tag_keys=TAGS)
        self.progress = Gauge("scopeforge_progress", description="fraction of the job done", tag_keys=TAGS)

    def report(self, loss: float, progress: float) -> None:
        self.loss.set(float(loss), tags=self.tags)
        self.progress.set(float(progress), tags=self.tags)

    def reporter(self, progress: float) -> Callable[[float], None]:
        """``report(loss, progress)`` for the batches of one epoch that ends at ``progress``."""
        return lambda loss: self.report(loss, progress)


class Progress:
    """Fraction (0..1) of a job done, for jobs without a training loop (same scopeforge_progress gauge)."""

    def __init__(self, job: str, stage: str):
        self.tags = _tags(job, stage)
        self.progress = Gauge("scopeforge_progress", description="fraction of the job done", tag_keys=TAGS)

    def report(self, progress: float) -> None:
        self.progress.set(float(progress), tags=self.tags)
