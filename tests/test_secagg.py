import numpy as np
import pytest
import torch

from raysim.guard.secagg import (
    MAX_CLIENTS,
    decode,
    encode,
    generate_keypair,
    masked_update,
    pair_seed,
    remove_dropped_masks,
    reveal_pair_seed,
    sum_masked,
    survivors_reveal,
    unmask_sum,
)

S = 20  # scale_bits for most tests: resolution 2**-20


def _cohort(n):
    keys = {i: generate_keypair() for i in range(n)}
    return {i: k[0] for i, k in keys.items()}, {i: k[1] for i, k in keys.items()}


def _updates(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        i: {"w": torch.randn(30, 4, generator=g), "b": torch.randn(7, generator=g), "s": torch.randn((), generator=g)}
        for i in range(n)
    }


def _plain_sum(updates, ids, weights=None):
    weights = weights or {i: 1.0 for i in ids}
    return {k: sum(updates[i][k].to(torch.float64) * weights[i] for i in ids) for k in updates[ids[0]]}


# --------------------------------------------------------------------------- fixed point


def test_encode_hand_computed_and_roundtrip():
    enc = encode({"x": torch.tensor([1.0, -0.5, 0.25, 3.0])}, scale_bits=2)
    assert enc["x"].dtype == np.int64 and enc["x"].tolist() == [4, -2, 1, 12]
    assert decode(enc, 2)["x"].tolist() == [1.0, -0.5, 0.25, 3.0]
    assert encode({"x": torch.tensor([0.3])}, 2)["x"].tolist() == [1]  # round(1.2)
    # uint64 view of negative values decodes as signed
    assert decode({"x": np.array([-4], dtype=np.int64).view(np.uint64)}, 2)["x"].tolist() == [-1.0]


def test_encode_error_bound_and_range():
    x = torch.randn(1000, dtype=torch.float64)
    err = (decode(encode({"x": x}, S), S)["x"] - x).abs().max().item()
    assert err <= 2.0 ** -(S + 1)
    with pytest.raises(OverflowError):
        encode({"x": torch.tensor([2.0 ** (53 - S)])}, S)
    encode({"x": torch.tensor([2.0 ** (52 - S)])}, S)  # just inside
    with pytest.raises(ValueError):
        encode({"x": torch.tensor([float("nan")])}, S)
    with pytest.raises(ValueError):
        encode({"x": torch.tensor([1.0])}, 60)


# --------------------------------------------------------------------------- key agreement


def test_pair_seed_symmetric_and_round_bound():
    (ka, pa), (kb, pb), (_, pc) = generate_keypair(), generate_keypair(), generate_keypair()
    s_ab = pair_seed(ka, 1, 2, pb, round=5)
    assert s_ab == pair_seed(kb, 2, 1, pa, round=5) and len(s_ab) == 32
    assert s_ab != pair_seed(ka, 1, 2, pb, round=6)  # fresh masks every round even with reused keys
    assert s_ab != pair_seed(ka, 1, 3, pc, round=5)
    assert s_ab != pair_seed(ka, 1, 4, pb, round=5)  # ids are bound into the seed
    raw = ka.private_bytes_raw()
    assert pair_seed(raw, 1, 2, pb, 5) == s_ab  # raw private bytes work too (pickling)
    with pytest.raises(ValueError):
        pair_seed(ka, 1, 1, pa, 5)


# --------------------------------------------------------------------------- masking


def test_masked_sum_equals_plain_sum():
    n = 6
    priv, pub = _cohort(n)
    ups = _updates(n)
    masked = [masked_update(i, priv[i], pub, ups[i], round=3, scale_bits=S) for i in range(n)]
    for m in masked:
        assert all(v.dtype == np.uint64 for v in m.values())
        assert m["w"].shape == (30, 4) and m["s"].shape == ()
    got = unmask_sum(sum_masked(masked), S)
    want = _plain_sum(ups, list(range(n)))
    for k in want:
        assert got[k].dtype == torch.float64 and got[k].shape == want[k].shape
        assert (got[k] - want[k]).abs().max().item() <= n * 2.0 ** -(S + 1)
    # exact: the masked sum is bit-identical to the sum of the plain fixed-point encodings
    plain_enc = sum_masked([{k: v.view(np.uint64) for k, v in encode(ups[i], S).items()} for i in range(n)])
    s = sum_masked(masked)
    assert all(np.array_equal(s[k], plain_enc[k]) for k in s)


def test_weighted_sum():
    n = 4
    priv, pub = _cohort(n)
    ups = _updates(n, seed=1)
    weights = {0: 3.0, 1: 10.0, 2: 1.0, 3: 250.0}
    masked = [masked_update(i, priv[i], pub, ups[i], 0, S, weight=weights[i]) for i in range(n)]
    got = unmask_sum(sum_masked(masked), S)
    want = _plain_sum(ups, list(range(n)), weights)
    assert all((got[k] - want[k]).abs().max().item() <= n * 2.0 ** -(S + 1) for k in want)


def test_sum_is_order_and_grouping_independent():
    n = 5
    priv, pub = _cohort(n)
    ups = _updates(n, seed=2)
    masked = [masked_update(i, priv[i], pub, ups[i], 1, S) for i in range(n)]
    a = sum_masked(masked)
    b = sum_masked([sum_masked(masked[3:]), sum_masked(masked[:1]), sum_masked(masked[1:3])][::-1])
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_individual_masked_update_reveals_nothing_obvious():
    n = 3
    priv, pub = _cohort(n)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4000, generator=g)
    masked = masked_update(0, priv[0], pub, {"x": x}, 0, S)
    as_signed = decode(masked, S)["x"]
    # what the driver holds is uniform on the ring: no correlation with the plain values,
    # and far outside their range
    corr = np.corrcoef(as_signed.numpy(), x.numpy())[0, 1]
    assert abs(corr) < 0.1
    assert as_signed.abs().median() > 1e6
    plain = encode({"x": x}, S)["x"].view(np.uint64)
    assert np.mean(masked["x"] == plain) < 0.01
    # the plain value is recoverable only with the pair seeds
    seeds = {(0, j): pair_seed(priv[j], j, 0, pub[0], 0) for j in (1, 2)}
    fixed = remove_dropped_masks(masked, seeds)
    assert np.array_equal(fixed["x"], plain)


def test_inputs_not_mutated():
    priv, pub = _cohort(2)
    ups = _updates(2, seed=4)
    before = {k: t.clone() for k, t in ups[0].items()}
    m0 = masked_update(0, priv[0], pub, ups[0], 0, S)
    m1 = masked_update(1, priv[1], pub, ups[1], 0, S)
    assert all(torch.equal(ups[0][k], before[k]) for k in before)
    copies = [{k: v.copy() for k, v in m.items()} for m in (m0, m1)]
    s = sum_masked([m0, m1])
    remove_dropped_masks(s, {(0, 1): b"\x01" * 32})
    assert all(np.array_equal(m[k], c[k]) for m, c in zip((m0, m1), copies) for k in m)
    s_copy = {k: v.copy() for k, v in s.items()}
    unmask_sum(s, S, revealed={(0, 1): b"\x02" * 32})
    assert all(np.array_equal(s[k], s_copy[k]) for k in s)


def test_dropout_recovery_gives_exact_survivor_sum():
    n = 6
    priv, pub = _cohort(n)
    ups = _updates(n, seed=5)
    dropped = [1, 4]  # dropped after the key exchange: survivors masked with them too
    survivors = [i for i in range(n) if i not in dropped]
    masked = [masked_update(i, priv[i], pub, ups[i], 7, S) for i in survivors]
    s = sum_masked(masked)
    # without recovery the result is garbage
    bad = unmask_sum(s, S)
    assert (bad["w"] - _plain_sum(ups, survivors)["w"]).abs().max() > 1e3
    revealed = {(i, d): reveal_pair_seed(priv[i], i, d, pub[d], 7) for i in survivors for d in dropped}
    assert revealed == survivors_reveal([(i, priv[i]) for i in survivors], {d: pub[d] for d in dropped}, 7)
    got = unmask_sum(s, S, revealed=revealed)
    want = _plain_sum(ups, survivors)
    assert all((got[k] - want[k]).abs().max().item() <= len(survivors) * 2.0 ** -(S + 1) for k in want)
    # and bit-exact against the plain fixed-point sum
    exact = sum_masked([{k: v.view(np.uint64) for k, v in encode(ups[i], S).items()} for i in survivors])
    rec = remove_dropped_masks(s, revealed)
    assert all(np.array_equal(rec[k], exact[k]) for k in rec)


def test_single_survivor_and_self_in_peers():
    priv, pub = _cohort(2)
    ups = _updates(2, seed=6)
    m0 = masked_update(0, priv[0], pub, ups[0], 0, S)
    got = unmask_sum(m0, S, revealed={(0, 1): reveal_pair_seed(priv[0], 0, 1, pub[1], 0)})
    assert (got["w"] - ups[0]["w"].double()).abs().max() <= 2.0 ** -(S + 1)
    # a lone client (only itself in peer_public) adds no mask
    alone = masked_update(5, priv[0], {5: pub[0]}, ups[0], 0, S)
    assert np.array_equal(alone["b"], encode(ups[0], S)["b"].view(np.uint64))


def test_errors():
    priv, pub = _cohort(2)
    ups = _updates(2)
    m0 = masked_update(0, priv[0], pub, ups[0], 0, S)
    with pytest.raises(ValueError):
        sum_masked([])
    with pytest.raises(ValueError, match="key"):
        sum_masked([m0, {"w": m0["w"]}])
    with pytest.raises(ValueError, match="shape"):
        sum_masked([m0, {**m0, "w": np.zeros(3, dtype=np.uint64)}])
    with pytest.raises(OverflowError):
        masked_update(0, priv[0], pub, {"x": torch.tensor([1.0])}, 0, S, weight=2.0**40)
    with pytest.raises(ValueError, match="MAX_CLIENTS"):
        masked_update(0, priv[0], {i: pub[1] for i in range(MAX_CLIENTS + 1)}, ups[0], 0, S)
