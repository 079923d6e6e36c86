import itertools
import math

import pytest
import torch

from raysim.aggregate.robust import (
    buffer_add,
    buffer_merge,
    buffer_subset,
    buffer_updates,
    buffer_zero,
    clip_by_norm,
    assumed_byzantine,
    coordinate_median,
    cosine_filter_clip,
    cosine_filter_select,
    geometric_median,
    krum_scores,
    leave_one_out_medians,
    multi_krum,
    multi_krum_select,
    norm_clipped_mean,
    norm_screen_select,
    robust_aggregate,
    trimmed_mean,
)
from raysim.aggregate.robust import global_norm


def _u(*vals, other=None):
    """Update with key 'w' = vals and optionally key 'b' = other."""
    out = {"w": torch.tensor(vals, dtype=torch.float32)}
    if other is not None:
        out["b"] = torch.tensor(other, dtype=torch.float32)
    return out


def _snapshot(updates):
    return [{k: t.clone() for k, t in u.items()} for u in updates]


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- median


def test_median_odd_hand_computed():
    ups = [_u(1.0, 10.0, other=[[0.0]]), _u(5.0, -2.0, other=[[7.0]]), _u(3.0, 4.0, other=[[-1.0]])]
    m = coordinate_median(ups)
    assert m["w"].tolist() == [3.0, 4.0]
    assert m["b"].tolist() == [[0.0]] and m["b"].shape == (1, 1) and m["w"].dtype == torch.float32


def test_median_even_is_mean_of_middle_two():
    m = coordinate_median([_u(1.0), _u(5.0), _u(3.0), _u(100.0)])
    assert m["w"].tolist() == [4.0]  # (3 + 5) / 2


def test_median_resists_outlier_and_single():
    ups = [_u(1.0), _u(1.1), _u(0.9), _u(1e9)]
    assert abs(coordinate_median(ups)["w"].item() - 1.05) < 1e-6
    assert coordinate_median([_u(2.5)])["w"].tolist() == [2.5]


# --------------------------------------------------------------------------- trimmed mean


def test_trimmed_mean_hand_computed():
    ups = [_u(1.0), _u(2.0), _u(3.0), _u(100.0)]
    assert trimmed_mean(ups, 0.25)["w"].tolist() == [2.5]  # k = 1: mean(2, 3)
    assert trimmed_mean(ups, 0.0)["w"].tolist() == [26.5]  # plain mean


def test_trimmed_mean_per_coordinate():
    ups = [_u(1.0, 40.0), _u(2.0, 30.0), _u(3.0, 20.0), _u(100.0, 10.0), _u(-50.0, 0.0)]
    # k = floor(0.2 * 5) = 1; w: drop -50 and 100 -> mean(1,2,3) = 2; second: drop 0, 40 -> 20
    assert trimmed_mean(ups, 0.2)["w"].tolist() == [2.0, 20.0]
    # k = floor(0.39 * 5) = 1 as well
    assert trimmed_mean(ups, 0.39)["w"].tolist() == [2.0, 20.0]


def test_trimmed_mean_rejects_trimming_everything():
    with pytest.raises(ValueError):
        trimmed_mean([_u(1.0), _u(2.0)], 0.5)  # fraction out of range
    with pytest.raises(ValueError):
        trimmed_mean([_u(1.0), _u(2.0), _u(3.0), _u(4.0)], 0.6)
    # 2 updates, fraction 0.49 -> k = 0, fine
    assert trimmed_mean([_u(1.0), _u(2.0)], 0.49)["w"].tolist() == [1.5]


def test_rules_reject_mismatched_layouts():
    with pytest.raises(ValueError, match="key mismatch"):
        coordinate_median([_u(1.0), {"v": torch.zeros(1)}])
    with pytest.raises(ValueError, match="shape mismatch"):
        trimmed_mean([_u(1.0), _u(1.0, 2.0)], 0.0)
    with pytest.raises(ValueError):
        coordinate_median([])


# --------------------------------------------------------------------------- clipping


def test_clip_by_norm_hand_computed():
    u = {"a": torch.tensor([3.0]), "b": torch.tensor([[4.0]], dtype=torch.float64)}  # norm 5
    c = clip_by_norm(u, 1.0)
    assert c["a"].tolist() == pytest.approx([0.6]) and c["b"].item() == pytest.approx(0.8)
    assert c["a"].dtype == torch.float32 and c["b"].dtype == torch.float64
    assert math.isclose(global_norm(c), 1.0, rel_tol=1e-6)
    same = clip_by_norm(u, 5.0)  # at/below the bound: unchanged values, but new tensors
    assert _same(same, u) and same["a"].data_ptr() != u["a"].data_ptr()


def test_clip_rejects_bad_input():
    with pytest.raises(ValueError):
        clip_by_norm(_u(1.0), 0.0)
    with pytest.raises(ValueError):
        clip_by_norm(_u(float("nan")), 1.0)


def test_norm_clipped_mean_hand_computed():
    ups = [_u(3.0, 4.0), _u(0.0, 1.0), _u(300.0, 400.0)]  # norms 5, 1, 500
    m = norm_clipped_mean(ups, [1.0, 1.0, 2.0], max_norm=5.0)
    # clipped: (3,4), (0,1), (3,4) -> (1*3 + 0 + 2*3)/4, (1*4 + 1 + 2*4)/4
    assert m["w"].tolist() == pytest.approx([9 / 4, 13 / 4])
    with pytest.raises(ValueError):
        norm_clipped_mean(ups, [1.0, 1.0], 5.0)
    with pytest.raises(ValueError):
        norm_clipped_mean(ups, [0.0, 0.0, 0.0], 5.0)


def test_rules_do_not_mutate_inputs():
    g = torch.Generator().manual_seed(0)
    ups = [{"w": torch.randn(4, 3, generator=g), "b": torch.randn(2, generator=g)} for _ in range(5)]
    before = _snapshot(ups)
    coordinate_median(ups)
    trimmed_mean(ups, 0.2)
    norm_clipped_mean(ups, [1, 2, 3, 4, 5], 0.5)
    multi_krum(ups, [1, 2, 3, 4, 5], 1)
    geometric_median(ups, [1, 2, 3, 4, 5])
    cosine_filter_clip(ups, [1, 2, 3, 4, 5])
    for u in ups:
        clip_by_norm(u, 0.1)
    assert all(_same(a, b) for a, b in zip(ups, before))


def test_rules_are_order_independent():
    g = torch.Generator().manual_seed(1)
    ups = [{"w": torch.randn(6, generator=g)} for _ in range(5)]
    ref_med, ref_tm = coordinate_median(ups)["w"], trimmed_mean(ups, 0.2)["w"]
    for perm in itertools.permutations(range(5)):
        p = [ups[i] for i in perm]
        assert torch.equal(coordinate_median(p)["w"], ref_med)
        assert torch.equal(trimmed_mean(p, 0.2)["w"], ref_tm)


def test_byzantine_sign_flip_scaled():
    # 8 honest clients near +1, 2 attackers at -100: mean is dragged negative, robust rules are not
    g = torch.Generator().manual_seed(2)
    honest = [{"w": 1.0 + 0.1 * torch.randn(50, generator=g)} for _ in range(8)]
    bad = [{"w": -100.0 * torch.ones(50)} for _ in range(2)]
    ups = honest + bad
    plain = sum(u["w"] for u in ups) / len(ups)
    assert plain.mean() < -10
    assert (coordinate_median(ups)["w"] - 1).abs().max() < 0.3
    assert (trimmed_mean(ups, 0.2)["w"] - 1).abs().max() < 0.3
    assert norm_clipped_mean(ups, [1.0] * 10, max_norm=8.0)["w"].mean() > 0.2
    assert multi_krum_select(ups, f=2) == list(range(8))  # both attackers dropped
    assert (multi_krum(ups, [1.0] * 10, f=2)["w"] - 1).abs().max() < 0.2
    assert (geometric_median(ups, [1.0] * 10)["w"] - 1).abs().max() < 0.3
    assert cosine_filter_select(ups) == list(range(8))  # both attackers dropped
    assert (cosine_filter_clip(ups, [1.0] * 10)["w"] - 1).abs().max() < 0.2


# --------------------------------------------------------------------------- bounded buffer


def _buf_from(items, capacity):
    b = buffer_zero(capacity)
    for cid, u, w in items:
        buffer_add(b, u, w, cid)
    return b


def test_buffer_sorted_and_copies():
    u = _u(1.0)
    b = _buf_from([("c2", _u(2.0), 2.0), ("c1", u, 1.0), ("c3", _u(3.0), 3.0)], capacity=3)
    ids, ups, ws = buffer_updates(b)
    assert ids == ["c1", "c2", "c3"] and ws == [1.0, 2.0, 3.0]
    assert [x["w"].item() for x in ups] == [1.0, 2.0, 3.0]
    u["w"].add_(100.0)  # caller keeps training its tensor; the buffer must not change
    assert buffer_updates(b)[1][0]["w"].item() == 1.0


def test_buffer_capacity_and_duplicates():
    b = _buf_from([("a", _u(1.0), 1.0)], capacity=2)
    with pytest.raises(ValueError, match="already"):
        buffer_add(b, _u(5.0), 1.0, "a")
    buffer_add(b, _u(2.0), 1.0, "b")
    with pytest.raises(OverflowError):
        buffer_add(b, _u(3.0), 1.0, "c")
    with pytest.raises(ValueError):
        buffer_add(buffer_zero(2), _u(1.0), -1.0, "x")
    with pytest.raises(ValueError):
        buffer_zero(0)
    with pytest.raises(ValueError, match="shape mismatch"):
        buffer_add(_buf_from([("a", _u(1.0), 1.0)], 3), _u(1.0, 2.0), 1.0, "b")


def test_buffer_merge_order_independent_and_pure():
    items = [(f"c{i}", _u(float(i * i % 7), float(-i)), float(i + 1)) for i in range(6)]
    results = []
    for perm in itertools.permutations(range(6), 6):
        if len(results) > 40:
            break
        part = [items[i] for i in perm]
        a, b = _buf_from(part[:2], 6), _buf_from(part[2:], 6)
        a_ids, b_ids = buffer_updates(a)[0], buffer_updates(b)[0]
        m = buffer_merge(a, b) if perm[0] % 2 else buffer_merge(b, a)
        assert buffer_updates(a)[0] == a_ids and buffer_updates(b)[0] == b_ids  # inputs untouched
        results.append(m)
    ref_ids, ref_ups, ref_ws = buffer_updates(results[0])
    assert ref_ids == [f"c{i}" for i in range(6)]
    for m in results[1:]:
        ids, ups, ws = buffer_updates(m)
        assert ids == ref_ids and ws == ref_ws and all(_same(x, y) for x, y in zip(ups, ref_ups))
    for rule in ("median", "trimmed_mean", "norm_clip", "multi_krum", "geometric_median"):
        ref = robust_aggregate(results[0], rule, trim_fraction=0.2, max_norm=3.0)
        assert all(_same(robust_aggregate(m, rule, trim_fraction=0.2, max_norm=3.0), ref) for m in results[1:])


def test_buffer_merge_errors():
    a = _buf_from([("a", _u(1.0), 1.0), ("b", _u(1.0), 1.0)], 3)
    with pytest.raises(OverflowError):
        buffer_merge(a, _buf_from([("c", _u(1.0), 1.0), ("d", _u(1.0), 1.0)], 3))
    with pytest.raises(ValueError, match="both"):
        buffer_merge(a, _buf_from([("b", _u(1.0), 1.0)], 3))
    with pytest.raises(ValueError, match="capacity"):
        buffer_merge(a, buffer_zero(4))
    empty = buffer_merge(buffer_zero(3), buffer_zero(3))
    assert buffer_updates(empty) == ([], [], [])
    m = buffer_merge(a, buffer_zero(3))
    assert buffer_updates(m)[0] == ["a", "b"] and m.entries is not a.entries


def test_robust_aggregate_dispatch():
    b = _buf_from([("a", _u(1.0), 1.0), ("b", _u(5.0), 1.0), ("c", _u(3.0), 2.0)], 3)
    assert robust_aggregate(b, "median")["w"].tolist() == [3.0]
    assert robust_aggregate(b, "trimmed_mean", trim_fraction=0.34)["w"].tolist() == [3.0]
    assert robust_aggregate(b, "norm_clip", max_norm=2.0)["w"].tolist() == [(1 + 2 + 2 * 2) / 4]
    with pytest.raises(ValueError):
        robust_aggregate(b, "norm_clip")
    with pytest.raises(ValueError, match="unknown"):
        robust_aggregate(b, "bogus")


def test_robust_aggregate_multi_krum_f():
    items = [(f"c{i}", _u(v), 1.0) for i, v in enumerate([0.0, 1.0, 3.0, 100.0])]
    b = _buf_from(items, 4)
    # n = 4: default f = min(95th pct of Binomial(4, 0.2) = 2, n - 3 = 1) = 1; scores 1, 1, 4, 9409: drop 100
    assert robust_aggregate(b, "multi_krum")["w"].tolist() == pytest.approx([4 / 3])
    assert robust_aggregate(b, "multi_krum", num_byzantine=0)["w"].tolist() == [26.0]  # f = 0 keeps all n - 0
    assert robust_aggregate(b, "multi_krum", num_byzantine=5)["w"].tolist() == pytest.approx([4 / 3])  # capped at 1
    two = _buf_from(items[:2], 4)  # too few to score: plain weighted mean
    assert robust_aggregate(two, "multi_krum")["w"].tolist() == [0.5]


# --------------------------------------------------------------------------- Multi-Krum, geometric median


def test_krum_scores_hand_computed():
    # points (w, b): (0,0) (1,0) (0,2) (10,10) (1,1); squared distances:
    # d01=1 d02=4 d03=200 d04=2 d12=5 d13=181 d14=1 d23=164 d24=2 d34=162
    ups = [_u(0.0, other=[0.0]), _u(1.0, other=[0.0]), _u(0.0, other=[2.0]), _u(10.0, other=[10.0]), _u(1.0, other=[1.0])]
    # n=5, f=1: the n-f-2 = 2 nearest: 0:{1,2} 1:{1,1} 2:{2,4} 3:{162,164} 4:{1,2}
    assert krum_scores(ups, 1) == [3.0, 2.0, 6.0, 326.0, 3.0]
    assert multi_krum_select(ups, 1) == [0, 1, 2, 4]  # m = n - f = 4: the outlier (10,10) goes
    assert multi_krum_select(ups, 1, m=2) == [0, 1]  # scores 2, then the tie 3/3 goes to the lower index
    assert multi_krum_select(ups, 1, m=1) == [1]  # m = 1 is Krum
    m = multi_krum(ups, [1.0, 2.0, 1.0, 100.0, 4.0], 1)  # the heavy outlier's weight buys nothing
    # w: (0*1 + 1*2 + 0*1 + 1*4) / 8 ; b: (0 + 0 + 2*1 + 1*4) / 8
    assert m["w"].tolist() == [0.75] and m["b"].tolist() == [0.75] and m["w"].dtype == torch.float32
    with pytest.raises(ValueError, match="neighbours"):
        krum_scores(ups, 3)  # n - f - 2 = 0
    with pytest.raises(ValueError):
        multi_krum_select(ups, 1, m=0)
    with pytest.raises(ValueError):
        multi_krum(ups, [1.0] * 4, 1)


def test_assumed_byzantine():
    # Binomial(10, 0.2): P(X<=3) = 0.879, P(X<=4) = 0.967 -> 4
    assert assumed_byzantine(10, 0.2) == 4
    assert assumed_byzantine(10, 0.0) == 0
    # Binomial(100, 0.2) 95th percentile is 27 (mean 20, sd 4)
    assert assumed_byzantine(100, 0.2) == 27
    assert assumed_byzantine(4, 0.2) == 1  # 2, capped at n - 3
    assert assumed_byzantine(2, 0.2) == 0


def test_geometric_median_hand_computed():
    # (0,0) with its four unit neighbours pulls balanced; the far point (1000, 0) pulls with force 1,
    # which the data point (0,0) itself absorbs (subgradient |sum of others' unit vectors| = 0 <= 1)
    pts = [(-1.0, 0.0), (0.0, 1.0), (0.0, -1.0), (0.0, 0.0), (1000.0, 0.0)]
    gm = geometric_median([_u(a, b) for a, b in pts], [1.0] * 5)
    assert gm["w"].tolist() == pytest.approx([0.0, 0.0], abs=1e-4)
    # 1-D, equal weights: the median; weight 3 at 10 outweighs 1 + 1: the GM moves to 10
    line = [_u(0.0), _u(1.0), _u(10.0)]
    assert geometric_median(line, [1.0, 1.0, 1.0])["w"].item() == pytest.approx(1.0, abs=1e-4)
    assert geometric_median(line, [1.0, 1.0, 3.0])["w"].item() == pytest.approx(10.0, abs=1e-4)
    # several keys are one vector: a single update is its own median
    one = _u(1.0, 2.0, other=[[3.0]])
    g1 = geometric_median([one], [2.0])
    assert g1["w"].tolist() == [1.0, 2.0] and g1["b"].tolist() == [[3.0]]
    with pytest.raises(ValueError):
        geometric_median(line, [1.0, -1.0, 1.0])


# --------------------------------------------------------------------------- cosine filter + median-norm clip


def test_leave_one_out_medians_match_brute_force():
    g = torch.Generator().manual_seed(3)
    for n in (2, 3, 4, 5, 10, 11):
        # small integers: many ties
        ups = [{"w": torch.randint(-3, 4, (7,), generator=g).float(), "b": torch.randn(3, generator=g)} for _ in range(n)]
        loo = leave_one_out_medians(ups)
        assert loo.shape == (n, 10) and loo.dtype == torch.float64
        for i in range(n):
            med = coordinate_median(ups[:i] + ups[i + 1 :])
            assert torch.equal(loo[i].float(), torch.cat([med["w"], med["b"]]))
    with pytest.raises(ValueError):
        leave_one_out_medians([_u(1.0)])


def test_cosine_filter_clip_hand_computed():
    # (3,4) (4,3) honest, norm 5; (30,40) = 10 x (3,4); (-6,-8) = -2 x (3,4), sign-flipped.
    # each is compared with the coordinate median of the OTHER three:
    #   0: of (4,3) (30,40) (-6,-8) = (4,3): cos 24/25 = 0.96     1: (3,4): 0.96
    #   2: of (3,4) (4,3) (-6,-8) = (3,3): cos 0.98995            3: (4,4): cos -0.98995
    ups = [_u(3.0, 4.0), _u(4.0, 3.0), _u(30.0, 40.0), _u(-6.0, -8.0)]
    assert cosine_filter_select(ups) == [0, 1, 2]
    # norms 5, 5, 50, 10 -> median (5 + 10) / 2 = 7.5: (30,40) is clipped to (4.5, 6), the others pass
    # weights 1, 2, 1, 100 (the flipped one's claimed weight buys nothing):
    # ((3,4) + 2 (4,3) + (4.5,6)) / 4 = (15.5, 16) / 4
    out = cosine_filter_clip(ups, [1.0, 2.0, 1.0, 100.0])
    assert out["w"].tolist() == pytest.approx([3.875, 4.0]) and out["w"].dtype == torch.float32
    assert cosine_filter_select(ups, 0.95) == [0, 1, 2]
    assert cosine_filter_select(ups, 0.97) == [2]
    assert cosine_filter_clip(ups, [1.0, 2.0, 1.0, 100.0], 0.97)["w"].tolist() == pytest.approx([4.5, 6.0])
    # a threshold above 0.98995 keeps nothing: the model does not move
    assert cosine_filter_select(ups, 0.99) == []
    assert cosine_filter_clip(ups, [1.0] * 4, 0.99)["w"].tolist() == [0.0, 0.0]


def test_cosine_filter_clip_keys_are_one_vector_and_threshold():
    # 5 updates split over two keys, w = x, b = y; medians of the others:
    #   0: (2,4) cos 22/(5 sqrt 20) = 0.984   1: (1.5,4.5) 0.822   2: (1.5,3.5) 0.972
    #   3: (3.5,4.5) -0.99985                 4: (3.5,3.5) 0.707
    ups = [_u(x, other=[y]) for x, y in [(3, 4), (4, 3), (30, 40), (-6, -8), (0, 5)]]
    assert cosine_filter_select(ups) == [0, 1, 2, 4]
    assert cosine_filter_select(ups, 0.8) == [0, 1, 2]
    assert cosine_filter_select(ups, 0.9) == [0, 2]
    assert cosine_filter_select(ups, -1.0) == [0, 1, 2, 3, 4]
    # norms 5,5,50,10,5 -> median 5: (30,40) -> (3,4); weights 1,2,1,100,1 -> kept total 5
    # ((3,4) + 2 (4,3) + (3,4) + (0,5)) / 5 = (14, 19) / 5
    out = cosine_filter_clip(ups, [1.0, 2.0, 1.0, 100.0, 1.0])
    assert out["w"].tolist() == pytest.approx([2.8]) and out["b"].tolist() == pytest.approx([3.8])
    # a zero update has similarity 0: dropped at threshold 0, kept (adding only weight) below it
    zero = [_u(1.0, 0.0), _u(1.0, 0.0), _u(0.0, 0.0)]
    assert cosine_filter_select(zero) == [0, 1]
    assert cosine_filter_clip(zero, [1.0, 1.0, 2.0], -0.5)["w"].tolist() == pytest.approx([0.5, 0.0])
    # one update is kept as is; two that disagree are both dropped
    assert cosine_filter_select([_u(1.0)]) == [0]
    assert cosine_filter_select([_u(1.0), _u(-1.0)]) == []
    with pytest.raises(ValueError, match="threshold"):
        cosine_filter_select(ups, 1.0)
    with pytest.raises(ValueError):
        cosine_filter_clip(ups, [1.0] * 4)
    with pytest.raises(ValueError, match="NaN"):
        cosine_filter_clip([_u(1.0), _u(float("inf")), _u(1.0)], [1.0] * 3)


def test_robust_aggregate_cosine_filter_clip():
    b = _buf_from([("a", _u(3.0, 4.0), 1.0), ("b", _u(4.0, 3.0), 2.0), ("c", _u(30.0, 40.0), 1.0), ("d", _u(-6.0, -8.0), 100.0)], 4)
    assert robust_aggregate(b, "cosine_filter_clip")["w"].tolist() == pytest.approx([3.875, 4.0])
    assert robust_aggregate(b, "cosine_filter_clip", cosine_threshold=0.99)["w"].tolist() == [0.0, 0.0]


def test_config_rejects_bad_cosine_threshold():
    from raysim.config import ConfigError, load_config

    cfg = load_config("configs/quickstart.yaml", ["robust.rule=cosine_filter_clip", "robust.cosine_threshold=0.1"])
    assert cfg.robust.rule == "cosine_filter_clip" and cfg.robust.cosine_threshold == 0.1
    with pytest.raises(ConfigError, match=r"robust\.cosine_threshold"):
        load_config("configs/quickstart.yaml", ["robust.cosine_threshold=1.5"])


# --------------------------------------------------------------------------- norm screen


def test_norm_screen_hand_computed():
    # norms 1, 1, 2, 10 -> median (1 + 2) / 2 = 1.5; ratio 3 -> bound 4.5: the 10 goes
    ups = [_u(1.0, 0.0), _u(0.0, -1.0), _u(0.0, 2.0), _u(6.0, 8.0)]
    assert norm_screen_select(ups, 3.0) == [0, 1, 2]
    assert norm_screen_select(ups, 20 / 3) == [0, 1, 2, 3]  # bound exactly 10: kept (drop only above)
    # ratio 1: everything above the median goes; odd count: norms 3, 4, 5 -> median 4
    assert norm_screen_select([_u(5.0), _u(-3.0), _u(4.0)], 1.0) == [1, 2]
    # all keys are one vector: (3 | 4) has norm 5, (1 | 0) and (0 | 1) norm 1 -> median 1
    two = [_u(3.0, other=[4.0]), _u(1.0, other=[0.0]), _u(0.0, other=[1.0])]
    assert norm_screen_select(two, 4.9) == [1, 2] and norm_screen_select(two, 5.0) == [0, 1, 2]
    assert norm_screen_select([_u(0.0), _u(0.0), _u(1.0)], 1.0) == [0, 1]  # median 0: only zeros pass
    assert norm_screen_select([_u(7.0)], 1.0) == [0]
    with pytest.raises(ValueError, match="max_ratio"):
        norm_screen_select(ups, 0.5)
    with pytest.raises(ValueError, match="NaN"):
        norm_screen_select([_u(1.0), _u(float("nan")), _u(1.0)], 3.0)


def test_norm_screen_composes_with_rules_via_buffer_subset():
    b = _buf_from([("a", _u(1.0), 1.0), ("b", _u(2.0), 3.0), ("c", _u(-10.0), 1.0), ("d", _u(1.0), 1.0)], 4)
    ids, ups, _ = buffer_updates(b)
    keep = norm_screen_select(ups, 3.0)  # norms 1, 2, 10, 1 -> median 1.5, bound 4.5
    assert [ids[i] for i in keep] == ["a", "b", "d"]
    sub = buffer_subset(b, keep)
    assert buffer_updates(sub)[0] == ["a", "b", "d"] and len(b.entries) == 4 and sub.capacity == 4
    # "mean" is the weighted mean: (1 + 3 * 2 + 1) / 5 after the screen, (1 + 6 - 10 + 1) / 6 without
    assert robust_aggregate(sub, "mean")["w"].tolist() == pytest.approx([8 / 5])
    assert robust_aggregate(b, "mean")["w"].tolist() == pytest.approx([-2 / 6])
    assert robust_aggregate(sub, "median")["w"].tolist() == [1.0]


def test_config_max_norm_ratio():
    from raysim.config import ConfigError, load_config

    assert load_config("configs/quickstart.yaml").robust.max_norm_ratio is None
    assert load_config("configs/quickstart.yaml", ["robust.max_norm_ratio=3"]).robust.max_norm_ratio == 3.0
    with pytest.raises(ConfigError, match=r"robust\.max_norm_ratio"):
        load_config("configs/quickstart.yaml", ["robust.max_norm_ratio=0.5"])
    with pytest.raises(ConfigError, match="max_norm_ratio"):
        load_config("configs/quickstart.yaml", ["robust.max_norm_ratio=3", "privacy.secure_aggregation=true"])
