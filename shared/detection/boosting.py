"""Momentum difficulty boosting (MDB) and its baselines: per-sample loss weights from a moving average of each
sample's difficulty.

What the Diffusion Deepfake paper states: hard samples are up-weighted by a momentum (moving-average) estimate of
their difficulty, tracked per sample over training. Its exact formula is not public; everything below is our
reconstruction, chosen so that the weights follow the signal and never amplify noise:

    d_i   = difficulty of sample i at this sighting: the detached cross-entropy (or 1 - p(true class)) of the
            *clean* view (resized, not augmented; the trainer's default), so augmentation draws are not difficulty
    m_i  <- beta * m_i + (1 - beta) * d_i,  m_i = d_i on first sight,  beta = exp(-1 / tau_epochs)
            a sample is seen once per epoch, so tau_epochs is the time constant in epochs whatever the run length
            (the old per-update beta 0.9 meant 10 epochs: a 3-epoch run never forgot the random-init losses)
    re-base: during the last warm-up epoch beta = 0, so the first boosted epoch starts from that epoch's
            difficulty alone, not from the losses at random initialisation
    q_i  <- beta^2 q_i + (1 - beta)^2, q_i = 1 on first sight         Var(noise of m_i) = sigma^2 q_i
    r_i   = (d_i - m_i_before) / sqrt(1 + q_i_before)                 standardised innovation: variance sigma^2
                                                                      when the true difficulty does not move

At the end of every epoch the weights of the next epoch are computed, per normalisation unit u (``within``: the
sample's class (default), its (source, label) group, or all samples), from the tracked samples of u:

    V_u   = Var(m_i)                      the spread of the tracked difficulty
    N_u   = Var(r_i) * mean(q_i)          the part of that spread that is measurement noise (the innovations of
                                          this epoch; their mean is removed, so a drift shared by the unit, e.g.
                                          the whole class getting easier, is not counted as noise)
    s_u   = clip(1 - N_u / V_u, 0, 1)     the reliability of m (Kelley's formula, an empirical-Bayes shrinkage):
                                          0 when the spread is no larger than its noise, or when there is no
                                          repeated measurement yet to estimate the noise; towards 1 when it is
    p_i   = (rank of m_i in u - 1/2) / n_u, a_i = 2 p_i - 1 in (-1, 1)        rank-based: outliers cannot blow up
    w_i   = exp(s_u * |a_i| * log(w_max if a_i > 0 else w_min))              geometric, median weight 1,
                                                                             always within [w_min, w_max]

Weights computed from the state at an epoch's end are used, frozen, for the whole next epoch: every sample is then
ranked against difficulties of the same age (ranking a just-updated m against the rest of the epoch's mix would
favour the samples seen early in the epoch). Before the first epoch end, during the warm-up and for untracked
samples, w = 1. Why the changes from the first version (z-scores of an EMA, exp(alpha z) clipped to [0.25, 4]):
z-scoring stretches even pure noise to unit variance, so the weights always spanned the full range; the
per-(source, label) normalisation up-weighted near-identical real / light image-to-image pairs; a per-update beta
made the memory depend on the run length.

The loss of a step is sum_i w_i l_i / sum_i w_i over the *global* batch (every worker's samples): worker r
backpropagates R * sum_{i in B_r} w_i l_i / W, with W the sum of the weights over all R workers, so DDP's mean of
the workers' gradients is exactly the gradient of one process over the union of the batches. ``uniform`` and the
warm-up use the same normalisation with w = 1 (the global mean; with equal batches each worker's plain mean).

Under data parallelism every worker gathers the (index, difficulty, label, weight) rows of every worker's batch,
in rank order, and applies the same update, so all workers hold bit-identical state (``checksum`` proves it). The
gather is injected (``gather=``): ``torch_all_gather`` over ``torch.distributed`` by default when a process group
is up; one process needs nothing (no ``torch.distributed``).

Each epoch's record (``end_epoch``, ``history``) holds per (source, label) group the mean difficulty and weight,
the weights' min / max / mean and the effective batch size (sum w)^2 / sum w^2 of the global batches, and per
normalisation unit the spread, noise and reliability behind the next epoch's weights.

Baselines, selected by ``method``: ``uniform`` (plain mean), ``focal`` (mean focal loss, Lin et al. 2017: the
cross-entropy times (1 - p_t)^gamma), ``ohem`` (mean over the hardest ``ohem_fraction`` of each worker's own batch,
Shrivastava et al. 2016). All of them track m_i too, so every run has a difficulty history.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from shared.errors import DataError, ModelError

Gather = Callable[[torch.Tensor], torch.Tensor]
"""Concatenate a 1-D tensor from every worker, in rank order (lengths may differ between workers)."""

CLASS_NAMES = ("real", "fake")
"""Names of the class labels 0 and 1 (the detectors' two-way output)."""


def local_gather(t: torch.Tensor) -> torch.Tensor:
    return t


def torch_all_gather(t: torch.Tensor) -> torch.Tensor:
    """All-gather of 1-D tensors of different lengths over the default ``torch.distributed`` process group."""
    import torch.distributed as dist

    world = dist.get_world_size()
    home = t.device
    if dist.get_backend() == "nccl":  # NCCL only moves CUDA tensors
        t = t.to(torch.device("cuda", torch.cuda.current_device()))
    size = torch.tensor([t.numel()], dtype=torch.int64, device=t.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    padded = torch.zeros(longest, dtype=t.dtype, device=t.device)
    padded[: t.numel()] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, counts)]).to(home)


def default_gather() -> Gather:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return torch_all_gather
    return local_gather


def _np(x: Any, dtype: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``, ties sharing their average rank."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]


def rank_weights(m: np.ndarray, q: np.ndarray, r: np.ndarray, w_min: float, w_max: float
                 ) -> tuple[np.ndarray, dict[str, Any]]:
    """The weights of one normalisation unit's tracked samples (see the module docstring) and how they were made.

    ``m``: tracked difficulties; ``q``: their noise factors; ``r``: their standardised innovations (NaN where the
    sample had no repeated measurement). Returns (w, {"tracked", "spread", "noise", "reliability"}).
    """
    n = m.size
    spread = float(m.var()) if n else 0.0
    innovations = r[np.isfinite(r)]
    noise = float(innovations.var(ddof=1) * q.mean()) if innovations.size >= 2 else None
    reliability = 0.0 if noise is None or spread <= 0.0 else min(max(1.0 - noise / spread, 0.0), 1.0)
    a = 2.0 * (average_ranks(m) - 0.5) / max(n, 1) - 1.0
    log_w = reliability * np.abs(a) * np.where(a > 0, math.log(w_max), math.log(w_min))
    return np.exp(log_w), {"tracked": int(n), "spread": spread, "noise": noise, "reliability": reliability}


class DifficultyState:
    """Per-sample m_i, q_i, this epoch's innovations r_i, the observed class label and the weights w_i of the
    current epoch, for ``num_samples`` global indices in ``len(group_names)`` (source, label) groups.

    Kept in numpy (float64): a step touches a few dozen entries, where numpy's per-call cost is a fraction of
    torch's. ``state_dict`` hands out torch tensors (for checkpoints).
    """

    def __init__(self, groups: Sequence[int] | np.ndarray | torch.Tensor, group_names: Sequence[str], beta: float):
        self.groups = _np(groups, np.int64).copy()
        self.group_names = list(group_names)
        if self.groups.ndim != 1 or self.groups.size == 0:
            raise ValueError("groups must be a non-empty 1-D sequence (one group id per sample)")
        if int(self.groups.min()) < 0 or int(self.groups.max()) >= len(self.group_names):
            raise ValueError(f"group ids must be in 0..{len(self.group_names) - 1}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta {beta:g} must be in [0, 1)")
        self.beta = float(beta)
        n = self.groups.size
        self.m = np.zeros(n, dtype=np.float64)
        self.q = np.zeros(n, dtype=np.float64)
        self.seen = np.zeros(n, dtype=bool)
        self.label = np.full(n, -1, dtype=np.int64)
        self.r = np.full(n, np.nan)
        self.w = np.ones(n, dtype=np.float64)

    @property
    def num_samples(self) -> int:
        return self.groups.size

    def update(self, idx: Any, d: Any, beta: float | None = None, labels: Any = None) -> None:
        """EMA update of the samples ``idx`` with difficulties ``d`` (duplicates are averaged first) at momentum
        ``beta`` (default: the state's); ``labels`` (optional) are the samples' classes, recorded."""
        idx, d = _np(idx, np.int64), _np(d, np.float64)
        if idx.size == 0:
            return
        if int(idx.min()) < 0 or int(idx.max()) >= self.num_samples:
            raise IndexError(f"sample index out of range 0..{self.num_samples - 1}")
        if labels is not None:
            self._record_labels(idx, _np(labels, np.int64))
        ordered = np.sort(idx)
        if (ordered[1:] == ordered[:-1]).any():  # rare (one index twice in a step): average its difficulties
            uniq, inverse, counts = np.unique(idx, return_inverse=True, return_counts=True)
            d = np.bincount(inverse, weights=d, minlength=uniq.size) / counts
            idx = uniq
        b = self.beta if beta is None else float(beta)
        old, q_old, was = self.m[idx], self.q[idx], self.seen[idx]
        self.r[idx] = np.where(was, (d - old) / np.sqrt(1.0 + q_old), np.nan)
        self.m[idx] = np.where(was, b * old + (1.0 - b) * d, d)
        self.q[idx] = np.where(was, b * b * q_old + (1.0 - b) ** 2, 1.0)
        self.seen[idx] = True

    def _record_labels(self, idx: np.ndarray, labels: np.ndarray) -> None:
        known = self.label[idx]
        clash = (known >= 0) & (known != labels)
        if clash.any():
            i = int(np.flatnonzero(clash)[0])
            raise DataError(f"sample {int(idx[i])} was tracked with label {int(known[i])}, now {int(labels[i])}: "
                            "the global sample indices do not name the same images")
        self.label[idx] = labels

    def units(self, within: str) -> tuple[np.ndarray, list[str]]:
        """The normalisation unit of every sample, and the units' names."""
        if within == "source":
            return self.groups, self.group_names
        if within == "global":
            return np.zeros(self.num_samples, dtype=np.int64), ["all"]
        if within == "class":
            unlabelled = self.seen & (self.label < 0)
            if unlabelled.any():
                raise ModelError(f"boosting within class: sample {int(np.flatnonzero(unlabelled)[0])} was tracked "
                                 "without its label (pass labels= to track)")
            count = max(int(self.label.max()) + 1, 1)
            names = [CLASS_NAMES[k] if k < len(CLASS_NAMES) else f"class {k}" for k in range(count)]
            return np.maximum(self.label, 0), names
        raise ValueError(f"within {within!r}: use class, source or global")

    def reweight(self, within: str, w_min: float, w_max: float) -> list[dict[str, Any]]:
        """Set ``w`` from the tracked samples, unit by unit (untracked samples: 1); clear this epoch's innovations.
        Returns each unit's record (rank_weights' figures plus the weights' range)."""
        units, names = self.units(within)
        self.w = np.ones(self.num_samples, dtype=np.float64)
        records = []
        for u, name in enumerate(names):
            mine = np.flatnonzero((units == u) & self.seen)
            w, record = rank_weights(self.m[mine], self.q[mine], self.r[mine], w_min, w_max)
            self.w[mine] = w
            records.append({"unit": name, **record, "min_weight": float(w.min()) if w.size else None,
                            "max_weight": float(w.max()) if w.size else None})
        self.r[:] = np.nan
        return records

    def checksum(self) -> str:
        h = hashlib.sha256()
        for values in (self.m, self.q, self.seen, self.label, self.w):
            h.update(values.tobytes())
        return h.hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        """Everything but this epoch's innovations (a checkpoint is written at an epoch's end, once they are used)."""
        return {"m": torch.from_numpy(self.m.copy()), "q": torch.from_numpy(self.q.copy()),
                "seen": torch.from_numpy(self.seen.copy()), "label": torch.from_numpy(self.label.copy()),
                "w": torch.from_numpy(self.w.copy()), "groups": torch.from_numpy(self.groups.copy()),
                "group_names": list(self.group_names), "beta": self.beta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        groups = _np(state["groups"], np.int64)
        if groups.size != self.num_samples or list(state["group_names"]) != self.group_names \
                or not np.array_equal(groups, self.groups):
            raise ModelError(f"difficulty state of {groups.size} samples in groups {state['group_names']} does "
                             f"not match this mixture ({self.num_samples} samples in groups {self.group_names})")
        missing = sorted({"m", "q", "seen", "label", "w"} - set(state))
        if missing:
            raise ModelError(f"difficulty state without {', '.join(missing)}: written by an older version of the "
                             "booster; start a fresh run")
        self.m = _np(state["m"], np.float64).copy()
        self.q = _np(state["q"], np.float64).copy()
        self.seen = _np(state["seen"], bool).copy()
        self.label = _np(state["label"], np.int64).copy()
        self.w = _np(state["w"], np.float64).copy()
        self.r = np.full(self.num_samples, np.nan)


def per_sample_difficulty(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    """d_i (detached): cross-entropy, or 1 - p(true class)."""
    with torch.no_grad():
        if kind == "loss":
            return F.cross_entropy(logits.float(), labels, reduction="none")
        if kind == "one_minus_p":
            return 1.0 - F.softmax(logits.float(), dim=-1).gather(1, labels[:, None]).squeeze(1)
    raise ValueError(f"difficulty {kind!r}: use loss or one_minus_p")


class _EpochWeights:
    """Running sums of the weights the global batches of one epoch used."""

    def __init__(self, num_groups: int):
        self.group_sum = np.zeros(num_groups)
        self.group_n = np.zeros(num_groups)
        self.total = self.total_sq = 0.0
        self.low, self.high = math.inf, -math.inf
        self.batch_ess = self.batch_n = 0.0
        self.steps = 0

    def add(self, groups: np.ndarray, w: np.ndarray) -> None:
        if w.size == 0:
            return
        self.group_sum += np.bincount(groups, weights=w, minlength=self.group_sum.size)
        self.group_n += np.bincount(groups, minlength=self.group_n.size)
        s, s2 = float(w.sum()), float((w * w).sum())
        self.total += s
        self.total_sq += s2
        self.low, self.high = min(self.low, float(w.min())), max(self.high, float(w.max()))
        self.batch_ess += s * s / s2
        self.batch_n += w.size
        self.steps += 1

    def record(self) -> dict[str, Any]:
        if self.steps == 0:
            return {"min": None, "max": None, "mean": None, "effective_batch_size": None, "batch_size": None,
                    "effective_fraction": None}
        n = float(self.group_n.sum())
        return {"min": self.low, "max": self.high, "mean": self.total / n,
                "effective_batch_size": self.batch_ess / self.steps, "batch_size": self.batch_n / self.steps,
                "effective_fraction": self.total * self.total / self.total_sq / n}


class Booster:
    """The training objective with per-sample weighting; holds the difficulty state.

    ``settings`` is a ``shared.configs.train_detector.BoostingConfig`` (or anything with the same attributes).
    ``groups`` gives every global sample index its group id in ``group_names``: the (source, label) group in
    train-detector, or simply the class label (0 real, 1 fake, names ["real", "fake"]); the groups are what the
    history summarises and what ``within: source`` normalises over (``within: class`` uses the labels the calls
    pass). Use: ``loss, w = booster(logits, labels, idx, epoch)`` for every batch, ``booster.end_epoch(epoch)``
    once per epoch (it computes the next epoch's weights). One process needs no ``gather``.
    """

    def __init__(self, settings: Any, groups: Sequence[int] | np.ndarray, group_names: Sequence[str],
                 gather: Gather | None = None):
        self.settings = settings
        self.state = DifficultyState(groups, group_names, math.exp(-1.0 / settings.tau_epochs))
        self.gather = gather
        self.history: list[dict[str, Any]] = []
        self._epoch = _EpochWeights(len(self.group_names))

    def boosting_active(self, epoch: int) -> bool:
        return self.settings.method == "momentum" and epoch >= self.settings.warmup_epochs

    def beta(self, epoch: int | None) -> float:
        """The momentum of an update in ``epoch``: 0 in the last warm-up epoch (the re-base), else the state's."""
        return 0.0 if epoch is not None and epoch == self.settings.warmup_epochs - 1 else self.state.beta

    def weights(self, idx: Any, epoch: int) -> torch.Tensor:
        """w_i of the samples ``idx`` in ``epoch`` (float64; ones unless momentum boosting is past warm-up)."""
        idx = _np(idx, np.int64)
        if not self.boosting_active(epoch):
            return torch.ones(idx.size, dtype=torch.float64)
        return torch.from_numpy(self.state.w[idx].copy())

    def difficulty(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """d_i of a batch's logits (e.g. of the clean view, computed without gradient), as the settings define it."""
        return per_sample_difficulty(logits, labels, self.settings.difficulty)

    def track(self, idx: Any, d: Any, epoch: int | None = None, labels: Any = None,
              weights: torch.Tensor | None = None) -> tuple[float, int]:
        """Gather (index, difficulty, label, weight) from every worker, update m with all of them (momentum of
        ``epoch``), and count the weights into the epoch's summary. Returns (sum of the weights over every worker,
        number of workers): what the loss normalisation needs."""
        idx = _np(idx, np.int64)
        w = np.ones(idx.size) if weights is None else _np(weights, np.float64)
        y = np.full(idx.size, -1.0) if labels is None else _np(labels, np.float64)
        gather = self.gather or default_gather()
        if gather is local_gather:  # one worker: nothing to exchange
            rows, workers = np.stack([idx.astype(np.float64), _np(d, np.float64), y, w], axis=1), 1
        else:  # one marker row (index -1) per worker counts the workers
            packed = np.concatenate([[[-1.0, 0.0, 0.0, 0.0]],
                                     np.stack([idx.astype(np.float64), _np(d, np.float64), y, w], axis=1)])
            everyone = gather(torch.from_numpy(packed.reshape(-1))).reshape(-1, 4).numpy()
            rows, workers = everyone[everyone[:, 0] >= 0], int((everyone[:, 0] < 0).sum())
        every_idx = np.rint(rows[:, 0]).astype(np.int64)
        every_label = np.rint(rows[:, 2]).astype(np.int64)
        self.state.update(every_idx, rows[:, 1], self.beta(epoch),
                          None if (every_label < 0).all() else every_label)
        self._epoch.add(self.state.groups[every_idx], rows[:, 3])
        return float(rows[:, 3].sum()), workers

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, idx: Any, epoch: int,
                 difficulty: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to backpropagate, the weights used) for one batch on this worker; ``idx`` are the samples' global
        indices (a tensor or an array); ``difficulty`` is d_i measured elsewhere (the clean view), else from
        ``logits``."""
        ce = F.cross_entropy(logits, labels, reduction="none")
        d = self.difficulty(logits, labels) if difficulty is None else difficulty.detach()
        idx = _np(idx, np.int64)
        w64 = self.weights(idx, epoch)
        total, workers = self.track(idx, d, epoch, labels, w64)
        method = self.settings.method
        if method == "focal":
            p_true = torch.exp(-ce)
            return ((1.0 - p_true) ** self.settings.focal_gamma * ce).mean(), torch.ones_like(ce)
        if method == "ohem":
            keep = max(1, math.ceil(self.settings.ohem_fraction * ce.numel()))
            top = torch.topk(ce.detach(), keep).indices
            w = torch.zeros_like(ce)
            w[top] = 1.0
            return ce[top].mean(), w
        w = w64.to(device=ce.device, dtype=ce.dtype)  # ones for uniform and during the warm-up
        return (w * ce).sum() * (workers / total), w  # DDP averages the workers' gradients: the global mean

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        """Compute the next epoch's weights; append and return this epoch's summary to the history."""
        st, seen = self.state, self._epoch
        groups = []
        for g, name in enumerate(self.group_names):
            mask = (st.groups == g) & st.seen
            values = st.m[mask]
            groups.append({
                "group": name, "tracked": int(mask.sum()), "size": int((st.groups == g).sum()),
                "mean_difficulty": float(values.mean()) if values.size else None,
                "std_difficulty": float(values.std()) if values.size else None,
                "mean_weight": float(seen.group_sum[g] / seen.group_n[g]) if seen.group_n[g] > 0 else None,
            })
        s = self.settings
        units = st.reweight(s.within, s.w_min, s.w_max)
        record = {"epoch": epoch, "boosting": self.boosting_active(epoch), "groups": groups,
                  "weights": seen.record(), "next_weights": {"within": s.within, "units": units}}
        self.history.append(record)
        self._epoch = _EpochWeights(len(self.group_names))
        return record

    @property
    def group_names(self) -> list[str]:
        return self.state.group_names

    def state_dict(self) -> dict[str, Any]:
        return {"difficulty": self.state.state_dict(), "history": list(self.history), "method": self.settings.method}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state.load_state_dict(state["difficulty"])
        self.history = list(state["history"])
