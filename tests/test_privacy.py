import json
import math

import dp_accounting
import pytest
import torch
from dp_accounting import rdp

from raysim.guard.privacy import DPAccountant, add_gaussian_noise, clip_update, noise_for_target_epsilon
from raysim.aggregate.robust import global_norm

Q, DELTA = 0.01, 1e-5  # e.g. 10 of 1000 clients per round (small q also keeps the library fast)


def _library_epsilon(noise, q, delta, steps):
    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(noise)), count=steps)
    return acc.get_epsilon(delta)


# --------------------------------------------------------------------------- mechanism


def test_clip_update_hand_computed():
    u = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[0.0, 4.0]])}  # norm 5
    c = clip_update(u, 2.5)
    assert c["a"].tolist() == [1.5, 0.0] and c["b"].tolist() == [[0.0, 2.0]]
    assert u["a"].tolist() == [3.0, 0.0]  # input untouched
    assert clip_update(u, 10.0)["a"].tolist() == [3.0, 0.0]
    assert math.isclose(global_norm(clip_update(u, 1.0)), 1.0, rel_tol=1e-6)


def test_noise_std_is_multiplier_times_clip():
    summed = {"w": torch.zeros(200_000), "b": torch.full((3,), 7.0, dtype=torch.float64)}
    out = add_gaussian_noise(summed, clip_norm=0.5, noise_multiplier=2.0, generator=torch.Generator().manual_seed(0))
    assert abs(out["w"].std().item() - 1.0) < 0.01  # 2.0 * 0.5
    assert abs(out["w"].mean().item()) < 0.01
    assert out["w"].dtype == torch.float32 and out["b"].dtype == torch.float64
    assert list(out) == ["w", "b"]
    assert torch.equal(summed["w"], torch.zeros(200_000)) and summed["b"].tolist() == [7.0] * 3


def test_noise_deterministic_and_key_order_independent():
    a = {"x": torch.ones(5), "y": torch.zeros(2, 2)}
    b = {"y": torch.zeros(2, 2), "x": torch.ones(5)}
    na = add_gaussian_noise(a, 1.0, 1.0, torch.Generator().manual_seed(3))
    nb = add_gaussian_noise(b, 1.0, 1.0, torch.Generator().manual_seed(3))
    assert all(torch.equal(na[k], nb[k]) for k in a)
    nc = add_gaussian_noise(a, 1.0, 1.0, torch.Generator().manual_seed(4))
    assert not torch.equal(na["x"], nc["x"])


def test_zero_noise_is_identity_and_validation():
    a = {"x": torch.tensor([1.0, -2.0])}
    assert add_gaussian_noise(a, 1.0, 0.0, torch.Generator().manual_seed(0))["x"].tolist() == [1.0, -2.0]
    with pytest.raises(ValueError):
        add_gaussian_noise(a, 0.0, 1.0, torch.Generator())
    with pytest.raises(ValueError):
        add_gaussian_noise(a, 1.0, -1.0, torch.Generator())


# --------------------------------------------------------------------------- accountant


def test_epsilon_zero_before_any_step():
    assert DPAccountant(1.0, Q, DELTA).epsilon() == 0.0


def test_epsilon_matches_library_called_directly():
    acc = DPAccountant(1.1, Q, DELTA)
    for _ in range(5):
        acc.step()
    assert acc.epsilon() == pytest.approx(_library_epsilon(1.1, Q, DELTA, 5), rel=1e-12)


def test_epsilon_increases_with_steps():
    acc = DPAccountant(1.1, Q, DELTA)
    eps = []
    for _ in range(4):
        acc.step(5)
        eps.append(acc.epsilon())
    assert all(a < b for a, b in zip(eps, eps[1:]))
    assert acc.steps == 20


def test_epsilon_decreases_with_noise_and_sampling():
    by_noise = [DPAccountant(z, Q, DELTA, steps=20).epsilon() for z in (0.8, 1.1, 2.0, 4.0)]
    assert all(a > b for a, b in zip(by_noise, by_noise[1:]))
    assert DPAccountant(1.1, Q, DELTA, 20).epsilon() < DPAccountant(1.1, 2 * Q, DELTA, 20).epsilon()
    assert DPAccountant(0.0, Q, DELTA, 1).epsilon() == math.inf


def test_accountant_roundtrip():
    acc = DPAccountant(1.3, Q, DELTA)
    acc.step(7)
    d = json.loads(json.dumps(acc.to_dict()))
    back = DPAccountant.from_dict(d)
    assert back == acc and back.epsilon() == acc.epsilon()
    back.step()
    assert back.steps == 8 and acc.steps == 7


def test_accountant_validation():
    for bad in [(-1.0, Q, DELTA), (1.0, 0.0, DELTA), (1.0, 1.5, DELTA), (1.0, Q, 0.0), (1.0, Q, 1.0)]:
        with pytest.raises(ValueError):
            DPAccountant(*bad)
    with pytest.raises(ValueError):
        DPAccountant(1.0, Q, DELTA).step(-1)


def test_noise_calibration_hits_target():
    target, rounds, q = 2.0, 20, Q
    z = noise_for_target_epsilon(target, DELTA, q, rounds)
    eps = DPAccountant(z, q, DELTA, steps=rounds).epsilon()
    assert target * 0.99 <= eps <= target  # within budget and within 1% of it
    assert _library_epsilon(z, q, DELTA, rounds) == pytest.approx(eps, rel=1e-12)
    # slightly less noise would overspend
    assert DPAccountant(z * 0.99, q, DELTA, steps=rounds).epsilon() > target


def test_noise_calibration_validation():
    with pytest.raises(ValueError):
        noise_for_target_epsilon(0.0, DELTA, Q, 10)
    with pytest.raises(ValueError):
        noise_for_target_epsilon(1.0, DELTA, Q, 0)
    with pytest.raises(ValueError):
        noise_for_target_epsilon(1.0, DELTA, 0.0, 10)
