"""Momentum difficulty boosting across two real gloo processes: the gather of unequal batches, bit-identical state
on both workers, and global normalisation: the workers' weights and their averaged gradient (what DDP applies)
equal one process's over the concatenated batch, at every step of a boosted epoch."""

from __future__ import annotations

import json
import socket

import numpy as np
import torch
import torch.nn.functional as F

from shared.configs.train_detector import BoostingConfig
from shared.detection.boosting import Booster, torch_all_gather

N, FEATURES, EPOCHS, STEPS = 40, 3, 4, 5
SETTINGS = {"warmup_epochs": 2, "within": "class", "tau_epochs": 1.5}
SIZES = (5, 3)
"""Per step, rank 0 takes 5 samples and rank 1 takes 3 (unequal batches exercise the padded gather and make a
per-worker normalisation visibly wrong)."""


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features, labels and a fixed linear head; the samples differ in difficulty (a real signal)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, FEATURES, generator=g)
    labels = (torch.arange(N) % 2).long()
    head = torch.randn(FEATURES, 2, generator=g)
    return x, labels, head


def _batch(rank: int, epoch: int, step: int) -> torch.Tensor:
    """Global indices of one rank's batch: every epoch a permutation of all samples, split 5 | 3 per step."""
    order = torch.randperm(N, generator=torch.Generator().manual_seed(epoch))
    start = step * sum(SIZES) + (0 if rank == 0 else SIZES[0])
    return order[start: start + SIZES[rank]]


def _noise(epoch: int, idx: torch.Tensor) -> torch.Tensor:
    """Small per-epoch logit noise, a function of (epoch, sample) only."""
    return 0.1 * torch.randn(N, 2, generator=torch.Generator().manual_seed(100 + epoch))[idx]


def _step(booster: Booster, head: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor,
          epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, gradient of the head) of one step."""
    w_head = head.clone().requires_grad_(True)
    loss, w = booster(x[idx] @ w_head + _noise(epoch, idx), labels[idx], idx, epoch)
    loss.backward()
    assert w_head.grad is not None
    return w.detach(), w_head.grad


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        gathered = torch_all_gather(torch.arange(rank + 2, dtype=torch.float64))  # lengths 2 and 3
        x, labels, head = _data()
        booster = Booster(BoostingConfig(**SETTINGS), labels, ["real", "fake"])  # default gather: dist
        weights, grads, checksums = [], [], []
        for epoch in range(EPOCHS):
            for step in range(STEPS):
                w, grad = _step(booster, head, x, labels, _batch(rank, epoch, step), epoch)
                dist.all_reduce(grad)  # what DDP does: the mean of the workers' gradients
                weights.append(w.tolist())
                grads.append((grad / world).flatten().tolist())
            booster.end_epoch(epoch)
            checksums.append(booster.state.checksum())
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump({"gathered": gathered.tolist(), "weights": weights, "grads": grads, "checksums": checksums,
                       "history": booster.history}, f)
    finally:
        dist.destroy_process_group()


def test_two_gloo_workers_match_one_process_over_the_concatenated_batch(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["gathered"] == r1["gathered"] == [0.0, 1.0, 0.0, 1.0, 2.0]
    assert r0["checksums"] == r1["checksums"]  # bit-identical state after every epoch
    assert r0["history"] == r1["history"]  # the epoch records (weights, effective batch size) are global
    np.testing.assert_allclose(r0["grads"], r1["grads"], rtol=0, atol=0)

    # one process, the same steps over the concatenated batches (rank order)
    x, labels, head = _data()
    reference = Booster(BoostingConfig(**SETTINGS), labels, ["real", "fake"])
    k = 0
    for epoch in range(EPOCHS):
        for step in range(STEPS):
            idx = torch.cat([_batch(r, epoch, step) for r in (0, 1)])
            w, grad = _step(reference, head, x, labels, idx, epoch)
            np.testing.assert_allclose(r0["weights"][k] + r1["weights"][k], w.numpy(), rtol=1e-6)
            np.testing.assert_allclose(r0["grads"][k], grad.flatten().numpy(), rtol=1e-5, atol=1e-7)
            k += 1
        reference.end_epoch(epoch)
    assert reference.state.checksum() == r0["checksums"][-1]
    assert reference.history == r0["history"]

    # the boosted epochs really weight (else the test would not tell a global from a per-worker normalisation)
    boosted = np.concatenate(r0["weights"][STEPS * SETTINGS["warmup_epochs"]:])
    assert boosted.max() / boosted.min() > 1.3
    assert r0["history"][-1]["weights"]["effective_batch_size"] < sum(SIZES)
    # a per-worker normalisation (each rank's own weighted mean, then DDP's mean) gives another gradient
    last = STEPS * EPOCHS - 1
    w0, w1 = (torch.tensor(r["weights"][last]) for r in (r0, r1))
    idx = [_batch(r, EPOCHS - 1, STEPS - 1) for r in (0, 1)]
    per_worker = []
    for w, i in zip((w0, w1), idx):
        h = head.clone().requires_grad_(True)
        ce = F.cross_entropy(x[i] @ h + _noise(EPOCHS - 1, i), labels[i], reduction="none")
        ((w * ce).sum() / w.sum()).backward()
        assert h.grad is not None
        per_worker.append(h.grad)
    wrong = ((per_worker[0] + per_worker[1]) / 2).flatten().numpy()
    assert np.abs(wrong - np.array(r0["grads"][last])).max() > 1e-4
