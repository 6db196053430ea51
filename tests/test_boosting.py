"""Momentum difficulty boosting: EMA, normalisation (global and per group), clipping, warm-up, baselines, state, and
the gather across two real gloo processes giving identical state."""

from __future__ import annotations

import json
import math
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shared.configs.train_detector import BoostingConfig
from shared.detection.boosting import Booster, DifficultyState, torch_all_gather
from shared.errors import ModelError


def test_first_sight_sets_m_then_ema_and_duplicates_are_averaged():
    st = DifficultyState([0, 0, 1, 1], ["a", "b"], beta=0.9)
    st.update(torch.tensor([0, 2]), torch.tensor([1.0, 2.0]))
    assert st.m.tolist() == [1.0, 0.0, 2.0, 0.0]
    assert st.seen.tolist() == [True, False, True, False]
    st.update(torch.tensor([0, 1]), torch.tensor([3.0, 5.0]))
    assert st.m[0].item() == pytest.approx(0.9 * 1.0 + 0.1 * 3.0)  # EMA of a seen sample
    assert st.m[1].item() == 5.0  # first sight: m = d, not 0.1 * d
    st.update(torch.tensor([3, 3, 2]), torch.tensor([1.0, 3.0, 2.0]))  # index 3 twice in one step: mean 2.0
    assert st.m[3].item() == 2.0
    assert st.m[2].item() == pytest.approx(2.0)
    with pytest.raises(IndexError):
        st.update(torch.tensor([4]), torch.tensor([1.0]))


def _random_state(seed: int = 0, n: int = 200, groups: int = 4, steps: int = 30) -> DifficultyState:
    rng = np.random.default_rng(seed)
    st = DifficultyState(rng.integers(0, groups, n), [f"g{i}" for i in range(groups)], beta=0.8)
    for _ in range(steps):
        idx = rng.choice(n, size=16, replace=False)
        st.update(torch.from_numpy(idx), torch.from_numpy(rng.gamma(2.0, 0.5, 16) * (1 + st.groups[idx])))
    return st


def test_zscores_match_numpy_globally_and_per_group():
    st = _random_state()
    m, seen, groups = st.m, st.seen, st.groups
    assert 0 < seen.sum() < len(m)  # some samples never seen: they must not count
    idx = np.flatnonzero(seen)[:40]
    tracked = m[seen]
    expected = (m[idx] - tracked.mean()) / tracked.std()
    np.testing.assert_allclose(st.zscores(torch.from_numpy(idx), "global"), expected, rtol=1e-9, atol=1e-9)
    per_group = []
    for i in idx:
        peers = m[seen & (groups == groups[i])]
        per_group.append((m[i] - peers.mean()) / peers.std())
    np.testing.assert_allclose(st.zscores(torch.from_numpy(idx), "group"), per_group, rtol=1e-9, atol=1e-9)
    # group normalisation removes the group offset that global normalisation keeps
    z_global = st.zscores(np.flatnonzero(seen), "global")
    z_group = st.zscores(np.flatnonzero(seen), "group")
    g = groups[seen]
    assert z_global[g == 3].mean() > 0.5 > abs(z_group[g == 3].mean())


def test_zero_spread_gives_zero_z_and_incremental_sums_stay_exact():
    st = DifficultyState([0, 0, 1], ["a", "b"], beta=0.9)
    st.update(torch.tensor([0, 2]), torch.tensor([0.7, 0.3]))
    assert st.zscores(torch.tensor([0, 2]), "group").tolist() == [0.0, 0.0]  # one tracked sample per group
    st = _random_state(seed=3, steps=300)
    before = (st.count.copy(), st.total.copy(), st.total_sq.copy())
    st.refresh()
    for a, b in zip(before, (st.count, st.total, st.total_sq)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)


def _booster(**kw) -> Booster:
    return Booster(BoostingConfig(**kw), [0, 0, 0, 1, 1, 1], ["real", "fake"])


def test_weights_are_exp_of_alpha_z_clipped():
    b = _booster(alpha=2.0, w_min=0.5, w_max=3.0, normalize="global", warmup_epochs=0)
    b.state.update(torch.arange(6), torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 5.0]))
    idx = torch.arange(6)
    z = b.state.zscores(idx, "global")
    w = b.weights(idx, epoch=0)
    np.testing.assert_allclose(w.numpy(), np.clip(np.exp(2.0 * z), 0.5, 3.0))
    assert w.max().item() == 3.0
    assert w.min().item() == 0.5


def test_warmup_is_uniform_then_the_loss_is_the_weighted_mean():
    b = _booster(warmup_epochs=1, normalize="global", alpha=1.0)
    logits = torch.tensor([[2.0, -1.0], [0.0, 0.0], [-1.0, 2.0], [1.0, 1.5], [3.0, -2.0], [0.5, 0.0]],
                          requires_grad=True)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    idx = torch.arange(6)
    ce = F.cross_entropy(logits, labels, reduction="none")
    loss, w = b(logits, labels, idx, epoch=0)
    assert torch.equal(w, torch.ones(6, dtype=w.dtype))
    assert loss.item() == pytest.approx(ce.mean().item())
    assert b.state.seen.all()  # tracked during the warm-up
    loss, w = b(logits, labels, idx, epoch=1)
    m = 0.9 * ce.detach().double() + 0.1 * ce.detach().double()  # second sight of the same losses: m = d
    z = (m - m.mean()) / m.std(unbiased=False)
    expected_w = torch.exp(z).clamp(0.25, 4.0)
    np.testing.assert_allclose(w.detach().numpy(), expected_w.float().numpy(), rtol=1e-5)
    assert loss.item() == pytest.approx((expected_w.float() * ce).sum().item() / expected_w.sum().item(), rel=1e-5)
    assert loss.item() > ce.mean().item()  # the hard samples weigh more
    loss.backward()  # weights are constants: the gradient flows through the losses only
    assert logits.grad is not None
    assert not w.requires_grad


def test_baselines_focal_and_ohem_and_uniform_track_too():
    logits = torch.tensor([[2.0, -1.0], [0.0, 0.0], [-1.0, 2.0], [1.0, 1.5]])
    labels = torch.tensor([0, 0, 0, 1])
    idx = torch.tensor([0, 1, 2, 3])
    ce = F.cross_entropy(logits, labels, reduction="none")
    loss, _ = _booster(method="uniform")(logits, labels, idx, epoch=5)
    assert loss.item() == pytest.approx(ce.mean().item())
    focal = _booster(method="focal", focal_gamma=2.0)
    loss, _ = focal(logits, labels, idx, epoch=0)
    p = torch.softmax(logits, -1)[torch.arange(4), labels]
    assert loss.item() == pytest.approx(((1 - p) ** 2 * ce).mean().item(), rel=1e-6)
    assert focal.state.seen[:4].all()
    loss, w = _booster(method="ohem", ohem_fraction=0.5)(logits, labels, idx, epoch=0)
    assert loss.item() == pytest.approx(ce.sort(descending=True).values[:2].mean().item())
    assert w.tolist() == [0.0, 1.0, 1.0, 0.0]  # samples 1 and 2 are the hardest


def test_end_epoch_history_and_state_roundtrip():
    b = _booster(warmup_epochs=0)
    logits = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    b(logits, torch.tensor([0, 0, 0, 1, 1, 1]), torch.arange(6), epoch=0)
    record = b.end_epoch(0)
    assert [g["group"] for g in record["groups"]] == ["real", "fake"]
    assert record["groups"][0]["tracked"] == 3
    assert record["groups"][0]["mean_weight"] is not None
    other = _booster(warmup_epochs=0)
    other.load_state_dict(b.state_dict())
    assert other.state.checksum() == b.state.checksum()
    assert other.history == b.history
    wrong = Booster(BoostingConfig(), [0, 1, 1], ["real", "fake"])
    with pytest.raises(ModelError, match="does not match this mixture"):
        wrong.load_state_dict(b.state_dict())


# --- two real processes over gloo ------------------------------------------------------------------------------------

N, STEPS = 40, 6


def _batches(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank 0 gets 5 samples, rank 1 gets 3 (different lengths exercise the padded gather); disjoint indices."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    size = 5 if rank == 0 else 3
    idx = (torch.randperm(N // 2, generator=g)[:size] * 2 + rank)  # even indices on rank 0, odd on rank 1
    logits = torch.randn(size, 2, generator=g)
    labels = (idx % 4 == 0).long()
    return logits, labels, idx


def _groups() -> list[int]:
    return [i % 3 for i in range(N)]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        gathered = torch_all_gather(torch.arange(rank + 2, dtype=torch.float64))  # lengths 2 and 3
        booster = Booster(BoostingConfig(warmup_epochs=1), _groups(), ["a", "b", "c"])  # default gather: dist
        weights = []
        for step in range(STEPS):
            logits, labels, idx = _batches(rank, step)
            _, w = booster(logits, labels, idx, epoch=step // 3)
            weights.append(w.tolist())
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump({"gathered": gathered.tolist(), "m": booster.state.m.tolist(),
                       "seen": booster.state.seen.tolist(), "checksum": booster.state.checksum(),
                       "weights": weights}, f)
    finally:
        dist.destroy_process_group()


def test_ddp_gather_on_two_gloo_processes_gives_identical_state(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["gathered"] == r1["gathered"] == [0.0, 1.0, 0.0, 1.0, 2.0]
    assert r0["checksum"] == r1["checksum"]
    assert r0["m"] == r1["m"]
    assert r0["seen"] == r1["seen"]

    # The same as one process that sees both ranks' batches, in rank order, at every step.
    reference = Booster(BoostingConfig(warmup_epochs=1), _groups(), ["a", "b", "c"])
    for step in range(STEPS):
        parts = [_batches(r, step) for r in (0, 1)]
        reference.track(torch.cat([p[2] for p in parts]),
                        torch.cat([F.cross_entropy(p[0], p[1], reduction="none") for p in parts]))
        for rank, rec in ((0, r0), (1, r1)):
            expected = reference.weights(parts[rank][2], epoch=step // 3)
            np.testing.assert_allclose(rec["weights"][step], expected.float().numpy(), rtol=1e-6)
    assert reference.state.checksum() == r0["checksum"]
    assert sum(r0["seen"]) > 0
    assert not all(math.isclose(w, 1.0) for w in r0["weights"][-1])
