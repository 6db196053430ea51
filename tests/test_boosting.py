"""Momentum difficulty boosting in one process: the EMA and its time constant, the re-base after warm-up, the
rank-based weights shrunk by the reliability of the difficulty, their bounds, the normalisation units, the weighted
loss, the epoch record (effective batch size), the baselines and the state round trip. Two gloo workers:
tests/test_boosting_ddp.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shared.configs.train_detector import BoostingConfig
from shared.detection.boosting import Booster, DifficultyState, average_ranks, rank_weights
from shared.errors import DataError, ModelError


def test_first_sight_sets_m_then_ema_and_duplicates_are_averaged():
    st = DifficultyState([0, 0, 1, 1], ["a", "b"], beta=0.9)
    st.update(torch.tensor([0, 2]), torch.tensor([1.0, 2.0]))
    assert st.m.tolist() == [1.0, 0.0, 2.0, 0.0]
    assert st.q.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert st.seen.tolist() == [True, False, True, False]
    assert np.isnan(st.r).all()  # no repeated measurement yet
    st.update(torch.tensor([0, 1]), torch.tensor([3.0, 5.0]))
    assert st.m[0] == pytest.approx(0.9 * 1.0 + 0.1 * 3.0)  # EMA of a seen sample
    assert st.q[0] == pytest.approx(0.81 + 0.01)  # the sum of the squared EMA weights
    assert st.r[0] == pytest.approx((3.0 - 1.0) / math.sqrt(2.0))  # innovation over its standard deviation
    assert st.m[1] == 5.0  # first sight: m = d, not 0.1 * d
    st.update(torch.tensor([3, 3, 2]), torch.tensor([1.0, 3.0, 2.0]))  # index 3 twice in one step: mean 2.0
    assert st.m[3] == 2.0
    assert st.m[2] == pytest.approx(2.0)
    st.update([1], [1.0], beta=0.0)  # a re-base: the new difficulty alone
    assert (st.m[1], st.q[1]) == (1.0, 1.0)
    with pytest.raises(IndexError):
        st.update(torch.tensor([4]), torch.tensor([1.0]))
    st.update([0], [1.0], labels=[1])
    with pytest.raises(DataError, match="sample 0 was tracked with label 1, now 0"):
        st.update([0], [1.0], labels=[0])


@pytest.mark.parametrize("tau", [1.0, 2.0, 5.0])
def test_the_time_constant_is_in_epochs(tau):
    """A step change of the difficulty is 1 - 1/e of the way through after tau epochs (one sighting per epoch),
    whatever tau; with beta = 0.9 per update that took 10 epochs however short the run."""
    b = Booster(BoostingConfig(tau_epochs=tau, warmup_epochs=0), [0, 1], ["real", "fake"])
    assert b.state.beta == pytest.approx(math.exp(-1.0 / tau))
    b.track([0, 1], [1.0, 1.0], epoch=0, labels=[0, 1])
    for epoch in range(1, int(tau) + 1):
        b.track([0, 1], [0.0, 0.0], epoch=epoch, labels=[0, 1])
    assert 1.0 - b.state.m[0] == pytest.approx(1.0 - math.exp(-1.0), rel=1e-9)


def test_the_last_warmup_epoch_rebases_m_on_its_own_difficulty():
    b = Booster(BoostingConfig(warmup_epochs=3, tau_epochs=2.0), [0, 0], ["real", "fake"])
    b.track([0, 1], [5.0, 4.0], epoch=0, labels=[0, 0])  # random-init losses
    b.track([0, 1], [3.0, 3.0], epoch=1, labels=[0, 0])
    assert b.state.m[0] > 3.0  # still remembers epoch 0
    b.track([0, 1], [0.2, 0.7], epoch=2, labels=[0, 0])  # the last warm-up epoch
    assert b.state.m.tolist() == [0.2, 0.7]
    assert b.state.q.tolist() == [1.0, 1.0]
    b.track([0, 1], [0.4, 0.7], epoch=3, labels=[0, 0])  # boosted: the EMA again
    assert b.state.m[0] == pytest.approx(math.exp(-0.5) * 0.2 + (1 - math.exp(-0.5)) * 0.4)


def test_average_ranks_share_ties():
    assert average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_rank_weights_are_bounded_geometric_and_shrunk_by_the_noise():
    rng = np.random.default_rng(0)
    n = 500
    true = rng.gamma(2.0, 0.5, n)
    w_min, w_max = 0.5, 2.0
    # noiseless difficulty (innovations all equal): reliability 1, ranks mapped onto the whole range
    w, rec = rank_weights(true, np.full(n, 1.0), np.zeros(n), w_min, w_max)
    assert rec["reliability"] == 1.0
    assert w_min <= w.min() < 0.51
    assert 1.98 < w.max() <= w_max
    assert np.median(w) == pytest.approx(1.0, abs=0.01)
    assert np.array_equal(np.argsort(w, kind="stable"), np.argsort(true, kind="stable"))  # monotone in m
    assert w[np.argmax(true)] == pytest.approx(w_max ** (1 - 1 / n))  # geometric in the rank
    # pure noise: m = noise (q = 1), innovations of the same noise: the weights stay near 1 where a z-score
    # would have stretched them over the full range
    noise = rng.normal(0.0, 0.3, n)
    w, rec = rank_weights(1.0 + noise, np.ones(n), rng.normal(0.0, 0.3, n), w_min, w_max)
    assert rec["reliability"] < 0.15
    assert 0.88 < w.min()
    assert w.max() < 1.12
    # signal as large as the noise: about half the log-range
    m = true / true.std() * 0.3 + noise
    w, rec = rank_weights(m, np.ones(n), rng.normal(0.0, 0.3, n), w_min, w_max)
    assert 0.35 < rec["reliability"] < 0.65
    assert w.max() < w_max ** 0.7
    assert w.min() > w_min ** 0.7
    # no repeated measurement (no innovations) or no spread: no evidence of a signal, all weights 1
    for m, r in ((true, np.full(n, np.nan)), (np.ones(n), np.zeros(n))):
        w, rec = rank_weights(m, np.ones(n), r, w_min, w_max)
        assert rec["reliability"] == 0.0
        assert np.all(w == 1.0)


def _fixed_difficulty_booster(within: str) -> Booster:
    """Six reals, easy (0.1..0.6); fakes hard, three from source A (1.1..1.3), three from B (1.4..1.6); every
    sample seen twice with the same difficulty (noise 0: reliability 1), each time followed by an epoch end."""
    groups = [0] * 6 + [1] * 3 + [2] * 3
    labels = np.array([0] * 6 + [1] * 6)
    d = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6])
    b = Booster(BoostingConfig(within=within, warmup_epochs=1, w_min=0.5, w_max=2.0), groups,
                ["lfw/real", "A/fake", "B/fake"])
    for epoch in range(2):
        b.track(np.arange(12), d, epoch=epoch, labels=labels)
        b.end_epoch(epoch)
    return b


def test_normalisation_within_class_source_or_globally():
    w_class = _fixed_difficulty_booster("class").weights(np.arange(12), epoch=2).numpy()
    # within class: the hardest real weighs as much as the hardest fake, although every fake is harder
    np.testing.assert_allclose(w_class[:6], w_class[6:])
    assert w_class[5] == pytest.approx(2.0 ** (5 / 6))
    assert w_class[0] * w_class[5] == pytest.approx(1.0)  # geometric: symmetric around 1
    w_global = _fixed_difficulty_booster("global").weights(np.arange(12), epoch=2).numpy()
    assert (w_global[:6] < 1.0).all()
    assert (w_global[6:] > 1.0).all()
    w_source = _fixed_difficulty_booster("source").weights(np.arange(12), epoch=2).numpy()
    np.testing.assert_allclose(w_source[6:9], w_source[9:])  # each source ranked on its own, even the easier one
    assert w_source[6] < 1.0 < w_source[8]
    for w in (w_class, w_global, w_source):
        assert 0.5 <= w.min()
        assert w.max() <= 2.0
        assert np.all(np.diff(w[:6]) > 0)  # harder reals weigh more in every unit
    with pytest.raises(ModelError, match="tracked without its label"):
        unlabelled = Booster(BoostingConfig(), [0, 1], ["real", "fake"])
        unlabelled.track([0, 1], [0.1, 0.2])
        unlabelled.end_epoch(0)


def _booster(**kw) -> Booster:
    return Booster(BoostingConfig(**kw), [0, 0, 0, 1, 1, 1], ["real", "fake"])


LOGITS = [[2.0, -1.0], [0.0, 0.0], [-1.0, 2.0], [1.0, 1.5], [3.0, -2.0], [0.5, 0.0]]
LABELS = [0, 0, 0, 1, 1, 1]


def test_warmup_is_uniform_then_the_loss_is_the_weighted_mean_with_last_epochs_weights():
    b = _booster(warmup_epochs=2, within="global")
    logits = torch.tensor(LOGITS, requires_grad=True)
    labels, idx = torch.tensor(LABELS), torch.arange(6)
    ce = F.cross_entropy(logits, labels, reduction="none")
    for epoch in range(2):
        loss, w = b(logits, labels, idx, epoch=epoch)
        assert torch.equal(w, torch.ones(6))
        assert loss.item() == pytest.approx(ce.mean().item())
        record = b.end_epoch(epoch)
        assert not record["boosting"]
    assert b.state.seen.all()  # tracked during the warm-up
    expected = torch.from_numpy(b.state.w.copy())  # set at the end of epoch 1 (identical losses: reliability 1)
    assert record["next_weights"]["units"][0]["reliability"] == 1.0
    loss, w = b(logits, labels, idx, epoch=2)
    np.testing.assert_allclose(w.detach().numpy(), expected.float().numpy(), rtol=1e-6)
    hardest = int(ce.argmax())
    assert w[hardest].item() == pytest.approx(2.0 ** (5 / 6), rel=1e-6)
    assert loss.item() == pytest.approx((w * ce).sum().item() / w.sum().item(), rel=1e-6)
    assert loss.item() > ce.mean().item()  # the hard samples weigh more
    loss.backward()  # weights are constants: the gradient flows through the losses only
    assert logits.grad is not None
    assert not w.requires_grad
    record = b.end_epoch(2)
    assert record["boosting"]
    ws = w.double()
    assert record["weights"]["effective_batch_size"] == pytest.approx((ws.sum() ** 2 / (ws ** 2).sum()).item())
    assert record["weights"]["effective_batch_size"] < 6
    assert record["weights"]["min"] == pytest.approx(ws.min().item())
    assert record["weights"]["max"] == pytest.approx(ws.max().item())
    assert record["weights"]["mean"] == pytest.approx(ws.mean().item())


def test_a_given_difficulty_replaces_the_one_from_the_logits():
    b = _booster()
    clean = torch.tensor([0.5, 0.1, 0.9, 0.2, 0.3, 0.4])
    b(torch.tensor(LOGITS), torch.tensor(LABELS), torch.arange(6), epoch=0, difficulty=clean)
    np.testing.assert_allclose(b.state.m, clean.double().numpy(), rtol=1e-6)


def test_baselines_focal_and_ohem_and_uniform_track_too():
    logits = torch.tensor(LOGITS[:4])
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
    for epoch in range(2):
        logits = torch.randn(6, 2, generator=torch.Generator().manual_seed(epoch))
        b(logits, torch.tensor(LABELS), torch.arange(6), epoch=epoch)
        record = b.end_epoch(epoch)
    assert [g["group"] for g in record["groups"]] == ["real", "fake"]
    assert record["groups"][0]["tracked"] == 3
    assert record["groups"][0]["mean_weight"] is not None
    assert [u["unit"] for u in record["next_weights"]["units"]] == ["real", "fake"]
    assert not np.all(b.state.w == 1.0)
    other = _booster(warmup_epochs=0)
    other.load_state_dict(b.state_dict())
    assert other.state.checksum() == b.state.checksum()
    assert other.history == b.history
    assert torch.equal(other.weights(torch.arange(6), 2), b.weights(torch.arange(6), 2))
    wrong = Booster(BoostingConfig(), [0, 1, 1], ["real", "fake"])
    with pytest.raises(ModelError, match="does not match this mixture"):
        wrong.load_state_dict(b.state_dict())
    old = b.state_dict()
    del old["difficulty"]["q"]
    with pytest.raises(ModelError, match="without q"):
        other.load_state_dict(old)
