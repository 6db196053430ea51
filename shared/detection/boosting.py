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


class DifficultyState:
    """m_i and its running per-group sums, for ``num_samples`` global indices in ``len(group_names)`` groups."""

    def __init__(self, groups: Sequence[int] | np.ndarray | torch.Tensor, group_names: Sequence[str], beta: float):
        self.groups = torch.as_tensor(np.array(groups, dtype=np.int64))
        self.group_names = list(group_names)
        if self.groups.ndim != 1 or self.groups.numel() == 0:
            raise ValueError("groups must be a non-empty 1-D sequence (one group id per sample)")
        if int(self.groups.min()) < 0 or int(self.groups.max()) >= len(self.group_names):
            raise ValueError(f"group ids must be in 0..{len(self.group_names) - 1}")
        self.beta = float(beta)
        n, g = self.groups.numel(), len(self.group_names)
        self.m = torch.zeros(n, dtype=torch.float64)
        self.seen = torch.zeros(n, dtype=torch.bool)
        self.count = torch.zeros(g, dtype=torch.float64)
        self.total = torch.zeros(g, dtype=torch.float64)
        self.total_sq = torch.zeros(g, dtype=torch.float64)

    @property
    def num_samples(self) -> int:
        return self.groups.numel()

    def update(self, idx: torch.Tensor, d: torch.Tensor) -> None:
        """EMA update of the samples ``idx`` with difficulties ``d`` (duplicates are averaged first)."""
        idx = idx.to(torch.int64).cpu()
        d = d.detach().to(torch.float64).cpu()
        if idx.numel() == 0:
            return
        if int(idx.min()) < 0 or int(idx.max()) >= self.num_samples:
            raise IndexError(f"sample index out of range 0..{self.num_samples - 1}")
        uniq, inverse = torch.unique(idx, return_inverse=True)
        if uniq.numel() != idx.numel():
            sums = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, d)
            counts = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(d))
            idx, d = uniq, sums / counts
        old = self.m[idx]
        was = self.seen[idx]
        new = torch.where(was, self.beta * old + (1.0 - self.beta) * d, d)
        g = self.groups[idx]
        self.count.index_add_(0, g, (~was).to(torch.float64))
        self.total.index_add_(0, g, new - torch.where(was, old, torch.zeros_like(old)))
        self.total_sq.index_add_(0, g, new * new - torch.where(was, old * old, torch.zeros_like(old)))
        self.m[idx] = new
        self.seen[idx] = True

    def refresh(self) -> None:
        """Recompute the per-group sums exactly from m (bounds the drift of the incremental updates)."""
        g = len(self.group_names)
        w = self.seen.to(torch.float64)
        self.count = torch.zeros(g, dtype=torch.float64).index_add_(0, self.groups, w)
        self.total = torch.zeros(g, dtype=torch.float64).index_add_(0, self.groups, self.m * w)
        self.total_sq = torch.zeros(g, dtype=torch.float64).index_add_(0, self.groups, self.m * self.m * w)

    def zscores(self, idx: torch.Tensor, normalize: str) -> torch.Tensor:
        """z of the samples ``idx`` over the tracked samples (``global``) or within their group (``group``);
        0 where the spread is zero (a group with one tracked sample, or all equal)."""
        idx = idx.to(torch.int64).cpu()
        if normalize == "global":
            n = self.count.sum().clamp(min=1.0)
            mean = (self.total.sum() / n).expand(idx.numel())
            var = (self.total_sq.sum() / n).expand(idx.numel()) - mean * mean
        elif normalize == "group":
            g = self.groups[idx]
            n = self.count[g].clamp(min=1.0)
            mean = self.total[g] / n
            var = self.total_sq[g] / n - mean * mean
        else:
            raise ValueError(f"normalize {normalize!r}: use global or group")
        std = var.clamp(min=0.0).sqrt()
        tiny = 1e-9 * (mean.abs() + 1.0)
        z = (self.m[idx] - mean) / torch.where(std > tiny, std, torch.ones_like(std))
        return torch.where(std > tiny, z, torch.zeros_like(z))

    def checksum(self) -> str:
        h = hashlib.sha256()
        h.update(self.m.numpy().tobytes())
        h.update(self.seen.numpy().tobytes())
        return h.hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        return {"m": self.m.clone(), "seen": self.seen.clone(), "groups": self.groups.clone(),
                "group_names": list(self.group_names), "beta": self.beta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["m"].numel() != self.num_samples or list(state["group_names"]) != self.group_names \
                or not torch.equal(state["groups"], self.groups):
            raise ModelError(f"difficulty state of {state['m'].numel()} samples in groups {state['group_names']} does "
                             f"not match this mixture ({self.num_samples} samples in groups {self.group_names})")
        self.m = state["m"].to(torch.float64).clone()
        self.seen = state["seen"].to(torch.bool).clone()
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
        self.s = settings
        self.state = DifficultyState(groups, group_names, settings.beta)
        self.gather = gather
        self.history: list[dict[str, Any]] = []
        self._weight_sum = torch.zeros(len(group_names), dtype=torch.float64)
        self._weight_n = torch.zeros(len(group_names), dtype=torch.float64)

    def boosting_active(self, epoch: int) -> bool:
        return self.s.method == "momentum" and epoch >= self.s.warmup_epochs

    def weights(self, idx: torch.Tensor, epoch: int) -> torch.Tensor:
        """w_i for the samples ``idx`` from the current state (ones unless momentum boosting is past warm-up)."""
        if not self.boosting_active(epoch):
            return torch.ones(idx.numel(), dtype=torch.float64)
        z = self.state.zscores(idx, self.s.normalize)
        return torch.exp(self.s.alpha * z).clamp(self.s.w_min, self.s.w_max)

    def track(self, idx: torch.Tensor, d: torch.Tensor) -> None:
        """Gather (index, difficulty) from every worker and update m with all of them."""
        gather = self.gather or default_gather()
        packed = torch.stack([idx.detach().to(torch.float64).cpu(), d.detach().to(torch.float64).cpu()], dim=1)
        everyone = gather(packed.reshape(-1)).reshape(-1, 2)
        self.state.update(everyone[:, 0].round().to(torch.int64), everyone[:, 1])

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor, epoch: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to backpropagate, the weights used) for one batch on this worker."""
        ce = F.cross_entropy(logits, labels, reduction="none")
        d = ce.detach() if self.s.difficulty == "loss" else per_sample_difficulty(logits, labels, self.s.difficulty)
        self.track(idx, d)
        method = self.s.method
        if method == "focal":
            p_true = torch.exp(-ce)
            return ((1.0 - p_true) ** self.s.focal_gamma * ce).mean(), torch.ones_like(ce)
        if method == "ohem":
            keep = max(1, math.ceil(self.s.ohem_fraction * ce.numel()))
            top = torch.topk(ce.detach(), keep).indices
            w = torch.zeros_like(ce)
            w[top] = 1.0
            return ce[top].mean(), w
        w = self.weights(idx, epoch).to(ce.dtype).to(ce.device)
        g = self.state.groups[idx.cpu().to(torch.int64)]
        self._weight_sum.index_add_(0, g, w.detach().cpu().to(torch.float64))
        self._weight_n.index_add_(0, g, torch.ones(g.numel(), dtype=torch.float64))
        if method == "uniform" or not self.boosting_active(epoch):
            return ce.mean(), w
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
                "mean_difficulty": float(values.mean()) if values.numel() else None,
                "std_difficulty": float(values.std(unbiased=False)) if values.numel() else None,
                "mean_weight": float(self._weight_sum[g] / self._weight_n[g]) if self._weight_n[g] > 0 else None,
            })
        record = {"epoch": epoch, "boosting": self.boosting_active(epoch), "groups": groups}
        self.history.append(record)
        self._weight_sum.zero_()
        self._weight_n.zero_()
        return record

    @property
    def group_names(self) -> list[str]:
        return self.state.group_names

    def state_dict(self) -> dict[str, Any]:
        return {"difficulty": self.state.state_dict(), "history": list(self.history), "method": self.s.method}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state.load_state_dict(state["difficulty"])
        self.history = list(state["history"])
