"""Momentum difficulty boosting and its baselines: per-sample loss weights from a moving average of each sample's loss.

A reconstruction of the method the Diffusion Deepfake work describes (the paper gives no code; the choices below are
ours and documented):

    d_i   = the detached per-sample loss (or 1 - p(true class))        difficulty seen in this step
    m_i  <- beta * m_i + (1 - beta) * d_i,   m_i = d_i on first sight  tracked per global sample index
    z_i   = (m_i - mean) / std                                        over the tracked samples, globally or within
                                                                      the sample's (source, label) group
    w_i   = clip(exp(alpha * z_i), w_min, w_max)
    loss  = sum_i w_i * l_i / sum_i w_i                               uniform weights during the warm-up

The state is updated *before* the weights are computed, so a sample's weight already reflects the current step.
Under data parallelism every worker gathers the (index, d) pairs of every worker's batch, in rank order, and applies
the same update, so all workers hold bit-identical state (``checksum`` proves it). The gather is injected
(``gather=``): ``torch_all_gather`` over ``torch.distributed`` by default when a process group is up.

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

from shared.errors import ModelError

Gather = Callable[[torch.Tensor], torch.Tensor]
"""Concatenate a 1-D tensor from every worker, in rank order (lengths may differ between workers)."""


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


class DifficultyState:
    """m_i and its running per-group sums, for ``num_samples`` global indices in ``len(group_names)`` groups.

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
        self.beta = float(beta)
        n, g = self.groups.size, len(self.group_names)
        self.m = np.zeros(n, dtype=np.float64)
        self.seen = np.zeros(n, dtype=bool)
        self.count = np.zeros(g, dtype=np.float64)
        self.total = np.zeros(g, dtype=np.float64)
        self.total_sq = np.zeros(g, dtype=np.float64)

    @property
    def num_samples(self) -> int:
        return self.groups.size

    def _per_group(self, g: np.ndarray, values: np.ndarray) -> np.ndarray:
        return np.bincount(g, weights=values, minlength=len(self.group_names))

    def update(self, idx: Any, d: Any) -> None:
        """EMA update of the samples ``idx`` with difficulties ``d`` (duplicates are averaged first)."""
        idx, d = _np(idx, np.int64), _np(d, np.float64)
        if idx.size == 0:
            return
        if int(idx.min()) < 0 or int(idx.max()) >= self.num_samples:
            raise IndexError(f"sample index out of range 0..{self.num_samples - 1}")
        ordered = np.sort(idx)
        if (ordered[1:] == ordered[:-1]).any():  # rare (one index twice in a step): average its difficulties
            uniq, inverse, counts = np.unique(idx, return_inverse=True, return_counts=True)
            d = np.bincount(inverse, weights=d, minlength=uniq.size) / counts
            idx = uniq
        old = self.m[idx]
        was = self.seen[idx]
        new = np.where(was, self.beta * old + (1.0 - self.beta) * d, d)
        g = self.groups[idx]
        self.count += self._per_group(g, (~was).astype(np.float64))
        self.total += self._per_group(g, new - np.where(was, old, 0.0))
        self.total_sq += self._per_group(g, new * new - np.where(was, old * old, 0.0))
        self.m[idx] = new
        self.seen[idx] = True

    def refresh(self) -> None:
        """Recompute the per-group sums exactly from m (bounds the drift of the incremental updates)."""
        w = self.seen.astype(np.float64)
        self.count = self._per_group(self.groups, w)
        self.total = self._per_group(self.groups, self.m * w)
        self.total_sq = self._per_group(self.groups, self.m * self.m * w)

    def zscores(self, idx: Any, normalize: str) -> np.ndarray:
        """z of the samples ``idx`` over the tracked samples (``global``) or within their group (``group``);
        0 where the spread is zero (a group with one tracked sample, or all equal)."""
        idx = _np(idx, np.int64)
        if normalize == "global":
            n = max(self.count.sum(), 1.0)
            mean = np.full(idx.size, self.total.sum() / n)
            var = self.total_sq.sum() / n - mean * mean
        elif normalize == "group":
            g = self.groups[idx]
            n = np.maximum(self.count[g], 1.0)
            mean = self.total[g] / n
            var = self.total_sq[g] / n - mean * mean
        else:
            raise ValueError(f"normalize {normalize!r}: use global or group")
        std = np.sqrt(np.maximum(var, 0.0))
        spread = std > 1e-9 * (np.abs(mean) + 1.0)
        return np.where(spread, (self.m[idx] - mean) / np.where(spread, std, 1.0), 0.0)

    def checksum(self) -> str:
        h = hashlib.sha256()
        h.update(self.m.tobytes())
        h.update(self.seen.tobytes())
        return h.hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        return {"m": torch.from_numpy(self.m.copy()), "seen": torch.from_numpy(self.seen.copy()),
                "groups": torch.from_numpy(self.groups.copy()), "group_names": list(self.group_names),
                "beta": self.beta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        groups = _np(state["groups"], np.int64)
        if groups.size != self.num_samples or list(state["group_names"]) != self.group_names \
                or not np.array_equal(groups, self.groups):
            raise ModelError(f"difficulty state of {groups.size} samples in groups {state['group_names']} does "
                             f"not match this mixture ({self.num_samples} samples in groups {self.group_names})")
        self.m = _np(state["m"], np.float64).copy()
        self.seen = _np(state["seen"], bool).copy()
        self.refresh()


def per_sample_difficulty(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    """d_i (detached): cross-entropy, or 1 - p(true class)."""
    with torch.no_grad():
        if kind == "loss":
            return F.cross_entropy(logits.float(), labels, reduction="none")
        if kind == "one_minus_p":
            return 1.0 - F.softmax(logits.float(), dim=-1).gather(1, labels[:, None]).squeeze(1)
    raise ValueError(f"difficulty {kind!r}: use loss or one_minus_p")


class Booster:
    """The training objective with per-sample weighting; holds the difficulty state.

    ``settings`` is a ``shared.configs.train_detector.BoostingConfig`` (or anything with the same attributes).
    """

    def __init__(self, settings: Any, groups: Sequence[int] | np.ndarray, group_names: Sequence[str],
                 gather: Gather | None = None):
        self.settings = settings
        self.state = DifficultyState(groups, group_names, settings.beta)
        self.gather = gather
        self.history: list[dict[str, Any]] = []
        self._weight_sum = np.zeros(len(group_names), dtype=np.float64)
        self._weight_n = np.zeros(len(group_names), dtype=np.float64)

    def boosting_active(self, epoch: int) -> bool:
        return self.settings.method == "momentum" and epoch >= self.settings.warmup_epochs

    def weights(self, idx: Any, epoch: int) -> torch.Tensor:
        """w_i for the samples ``idx`` from the current state (ones unless momentum boosting is past warm-up)."""
        idx = _np(idx, np.int64)
        if not self.boosting_active(epoch):
            return torch.ones(idx.size, dtype=torch.float64)
        z = self.state.zscores(idx, self.settings.normalize)
        return torch.from_numpy(np.clip(np.exp(self.settings.alpha * z), self.settings.w_min, self.settings.w_max))

    def track(self, idx: Any, d: Any) -> None:
        """Gather (index, difficulty) from every worker and update m with all of them."""
        gather = self.gather or default_gather()
        if gather is local_gather:  # one worker: nothing to exchange
            self.state.update(idx, d)
            return
        packed = torch.stack([torch.as_tensor(_np(idx, np.float64)), torch.as_tensor(_np(d, np.float64))], dim=1)
        everyone = gather(packed.reshape(-1)).reshape(-1, 2).numpy()
        self.state.update(np.rint(everyone[:, 0]).astype(np.int64), everyone[:, 1])

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, idx: Any, epoch: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to backpropagate, the weights used) for one batch on this worker; ``idx`` are the samples' global
        indices (a tensor or an array)."""
        ce = F.cross_entropy(logits, labels, reduction="none")
        kind = self.settings.difficulty
        d = ce.detach() if kind == "loss" else per_sample_difficulty(logits, labels, kind)
        idx = _np(idx, np.int64)
        self.track(idx, d)
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
        w64 = self.weights(idx, epoch)
        g = self.state.groups[idx]
        self._weight_sum += np.bincount(g, weights=w64.numpy(), minlength=len(self.group_names))
        self._weight_n += np.bincount(g, minlength=len(self.group_names))
        if method == "uniform" or not self.boosting_active(epoch):
            return ce.mean(), w64.to(ce.dtype)
        w = w64.to(device=ce.device, dtype=ce.dtype)
        return (w * ce).sum() / w.sum(), w

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        """Refresh the sums, append and return this epoch's per-group summary to the history."""
        self.state.refresh()
        st = self.state
        groups = []
        for g, name in enumerate(self.group_names):
            mask = (st.groups == g) & st.seen
            values = st.m[mask]
            groups.append({
                "group": name, "tracked": int(mask.sum()), "size": int((st.groups == g).sum()),
                "mean_difficulty": float(values.mean()) if values.size else None,
                "std_difficulty": float(values.std()) if values.size else None,
                "mean_weight": float(self._weight_sum[g] / self._weight_n[g]) if self._weight_n[g] > 0 else None,
            })
        record = {"epoch": epoch, "boosting": self.boosting_active(epoch), "groups": groups}
        self.history.append(record)
        self._weight_sum[:] = 0.0
        self._weight_n[:] = 0.0
        return record

    @property
    def group_names(self) -> list[str]:
        return self.state.group_names

    def state_dict(self) -> dict[str, Any]:
        return {"difficulty": self.state.state_dict(), "history": list(self.history), "method": self.settings.method}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state.load_state_dict(state["difficulty"])
        self.history = list(state["history"])
