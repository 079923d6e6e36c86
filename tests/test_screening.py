import json
import math

import pytest
import torch

from raysim.aggregate.robust import global_norm
from raysim.guard.screening import REJECT_KINDS, Quarantine, check_update, reject_kind


def _ref():
    return {"a": torch.zeros(2, 2), "b": torch.zeros(3)}


def _upd():
    return {"a": torch.tensor([[1.0, 2.0], [2.0, 0.0]]), "b": torch.tensor([0.0, 0.0, 4.0])}  # norm sqrt(25) = 5


def test_global_norm_hand_computed():
    assert global_norm(_upd()) == 5.0
    assert global_norm({"x": torch.tensor([3.0]), "y": torch.tensor([[4.0]])}) == 5.0
    assert global_norm({}) == 0.0


def test_global_norm_does_not_overflow_in_float32():
    big = {"x": torch.full((4,), 1e30, dtype=torch.float32)}  # squares overflow float32
    assert math.isclose(global_norm(big), 2e30, rel_tol=1e-6)


def test_ok_update():
    assert check_update(_upd(), _ref(), max_norm=5.0) is None  # exactly at the bound is allowed
    assert check_update(_upd(), _ref(), max_norm=None) is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite(bad):
    u = _upd()
    u["b"] = torch.tensor([0.0, bad, 1.0])
    reason = check_update(u, _ref(), max_norm=None)
    assert reject_kind(reason) == "nonfinite" and "'b'" in reason


def test_missing_and_extra_keys_are_named():
    u = _upd()
    del u["b"]
    u["zzz"] = torch.zeros(1)
    reason = check_update(u, _ref(), max_norm=10.0)
    assert reject_kind(reason) == "keys"
    assert "missing ['b']" in reason and "unexpected ['zzz']" in reason


def test_many_extra_keys_reason_stays_short():
    u = _upd()
    u.update({f"x{i:04d}": torch.zeros(1) for i in range(1000)})
    reason = check_update(u, _ref(), max_norm=None)
    assert reject_kind(reason) == "keys" and "+995 more" in reason and len(reason) < 200


def test_shape_mismatch_names_key_and_shapes():
    u = _upd()
    u["a"] = torch.zeros(2, 3)
    reason = check_update(u, _ref(), max_norm=None)
    assert reason == "shape: 'a' is (2, 3), expected (2, 2)"


def test_norm_bound_reports_value():
    reason = check_update(_upd(), _ref(), max_norm=4.0)
    assert reason == "norm: 5 > max_norm 4"


def test_type_checks():
    u = _upd()
    u["b"] = [0.0, 0.0, 4.0]
    assert reject_kind(check_update(u, _ref(), None)) == "type"
    u["b"] = torch.tensor([0, 0, 4])  # integer tensor
    assert reject_kind(check_update(u, _ref(), None)) == "type"
    assert reject_kind(check_update(None, _ref(), None)) == "type"


def test_keys_checked_before_values():
    # a NaN in an unexpected key is reported as a key problem: values are only compared once layout matches
    u = _upd()
    u["extra"] = torch.tensor([float("nan")])
    assert reject_kind(check_update(u, _ref(), None)) == "keys"


def test_all_kinds_are_listed():
    assert set(REJECT_KINDS) == {"type", "keys", "shape", "nonfinite", "norm"}


def test_check_does_not_mutate():
    u, r = _upd(), _ref()
    u_before = {k: t.clone() for k, t in u.items()}
    check_update(u, r, max_norm=1.0)
    assert all(torch.equal(u[k], u_before[k]) for k in u)
    assert all(torch.equal(r[k], torch.zeros_like(r[k])) for k in r)


# --------------------------------------------------------------------------- quarantine


def test_quarantine_after_consecutive_strikes():
    q = Quarantine(strikes=2, rounds=3)
    q.record("c1", 0, ok=False)
    assert not q.is_quarantined("c1", 1)
    q.record("c1", 1, ok=False)  # second strike in a row -> out for rounds 2, 3, 4
    assert [q.is_quarantined("c1", r) for r in range(1, 7)] == [False, True, True, True, False, False]
    assert q.quarantined(2) == ["c1"] and q.quarantined(5) == []
    assert not q.is_quarantined("other", 2)


def test_success_resets_streak():
    q = Quarantine(strikes=2, rounds=3)
    q.record("c", 0, ok=False)
    q.record("c", 1, ok=True)
    q.record("c", 2, ok=False)
    assert not q.is_quarantined("c", 3)
    q.record("c", 5, ok=False)  # consecutive over the rounds it took part in, not calendar rounds
    assert q.is_quarantined("c", 6)


def test_released_client_starts_clean():
    q = Quarantine(strikes=2, rounds=1)
    q.record("c", 0, False)
    q.record("c", 1, False)
    assert q.is_quarantined("c", 2) and not q.is_quarantined("c", 3)
    q.record("c", 3, False)  # one strike after release is not enough
    assert not q.is_quarantined("c", 4)


def test_strikes_one_and_rounds_zero():
    q = Quarantine(strikes=1, rounds=2)
    q.record(7, 10, False)  # int ids are stored as strings
    assert q.is_quarantined(7, 11) and q.is_quarantined("7", 12) and not q.is_quarantined(7, 13)
    q0 = Quarantine(strikes=1, rounds=0)
    q0.record("c", 0, False)
    assert not q0.is_quarantined("c", 1)
    with pytest.raises(ValueError):
        Quarantine(strikes=0)


def test_state_stays_bounded():
    q = Quarantine(strikes=1, rounds=1)
    for r in range(100):
        q.record(f"c{r}", r, False)
        q.record(f"good{r}", r, True)
    assert len(q.until) <= 2 and not q.streak


def test_quarantine_roundtrip_json():
    q = Quarantine(strikes=3, rounds=4)
    q.record("a", 0, False)
    q.record("b", 0, False)
    for r in range(3):
        q.record("c", r, False)
    d = json.loads(json.dumps(q.to_dict()))
    q2 = Quarantine.from_dict(d)
    assert q2 == q and q2.to_dict() == q.to_dict()
    assert q2.is_quarantined("c", 3) and q2.streak == {"a": 1, "b": 1}
    q2.record("a", 1, False)
    q2.record("a", 2, False)
    assert q2.is_quarantined("a", 3) and not q.is_quarantined("a", 3)  # copies are independent
