"""Tests for raysim.aggregate; expected values are computed by hand and written literally."""

import pytest
import torch

from raysim.aggregate.weighted import ws_add, ws_mean, ws_sums, ws_merge, ws_zero
from raysim.aggregate.lora import lora_pairs, lora_rank, pad_lora, product_add, product_to_lora, refactor, split_lora, truncate_lora

T = torch.tensor
Q = "base_model.model.text_model.encoder.layers.0.self_attn.q_proj"
V = "base_model.model.text_model.encoder.layers.0.self_attn.v_proj"
PROJ = "base_model.model.visual_projection.weight"


def lora(prefix, a, b):
    return {f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": b}


def fold(items, acc=None):
    acc = acc if acc is not None else ws_zero()
    for tensors, w in items:
        ws_add(acc, tensors, w)
    return acc


def assert_tensors_equal(x, y, atol=0.0):
    assert x.keys() == y.keys()
    for k in x:
        assert x[k].shape == y[k].shape, k
        torch.testing.assert_close(x[k], y[k], atol=atol, rtol=0, check_dtype=False, msg=k)


# ----------------------------------------------------------------------------- ws fold

X1 = {"a": T([1.0, 2.0]), "b": T([[2.0]])}
X2 = {"a": T([5.0, 6.0]), "b": T([[6.0]])}
X3 = {"a": T([0.0, 4.0]), "b": T([[0.0]])}
ITEMS = [(X1, 1.0), (X2, 3.0), (X3, 4.0)]


def test_ws_two_tensors_hand_computed():
    # (1*[1,2] + 3*[5,6]) / 4 = [16, 20] / 4
    mean = ws_mean(fold([({"a": T([1.0, 2.0])}, 1.0), ({"a": T([5.0, 6.0])}, 3.0)]))
    assert mean["a"].dtype == torch.float32
    assert torch.equal(mean["a"], T([4.0, 5.0]))


def test_ws_three_tensors_hand_computed():
    acc = fold(ITEMS)
    assert (acc.weight, acc.count) == (8.0, 3)
    assert acc.sums["a"].dtype == torch.int64  # exact fixed-point sums
    # a: [1 + 15 + 0, 2 + 18 + 16] / 8 = [2, 4.5];  b: (2 + 18 + 0) / 8 = 2.5
    assert_tensors_equal(ws_mean(acc), {"a": T([2.0, 4.5]), "b": T([[2.5]])})


@pytest.mark.parametrize(
    "left, right",
    [([0, 1], [2]), ([2, 0], [1]), ([1], [2, 0]), ([], [0, 1, 2]), ([0, 1, 2], [])],
)
def test_ws_merge_is_associative(left, right):
    full = fold(ITEMS)
    a, b = fold([ITEMS[i] for i in left]), fold([ITEMS[i] for i in right])
    for merged in (ws_merge(a, b), ws_merge(b, a)):
        assert (merged.weight, merged.count) == (8.0, 3)
        assert all(torch.equal(merged.sums[k], full.sums[k]) for k in full.sums)  # bit-identical
        assert_tensors_equal(ws_mean(merged), {"a": T([2.0, 4.5]), "b": T([[2.5]])})


def test_ws_merge_leaves_partials_untouched_and_unaliased():
    a, b = fold(ITEMS[:2]), fold(ITEMS[2:])
    a_sums, b_sums = {k: t.clone() for k, t in a.sums.items()}, {k: t.clone() for k, t in b.sums.items()}
    merged = ws_merge(a, b)
    ws_add(merged, X1, 1.0)  # in-place growth of the result must not leak into the partials
    only = ws_merge(ws_zero(), a)
    ws_add(only, X1, 1.0)
    assert (a.weight, a.count, b.weight, b.count) == (4.0, 2, 4.0, 1)
    assert_tensors_equal(a.sums, a_sums)
    assert_tensors_equal(b.sums, b_sums)


def test_ws_add_does_not_mutate_inputs():
    # float64 inputs with weight 1 are the aliasing trap: .to(float64) is then a no-op
    x = {"a": T([1.0, 2.0], dtype=torch.float64)}
    y = {"a": T([5.0, 6.0], dtype=torch.float64)}
    x0, y0 = {k: t.clone() for k, t in x.items()}, {k: t.clone() for k, t in y.items()}
    acc = fold([(x, 1.0), (y, 1.0), (y, 2.0)])
    assert_tensors_equal(x, x0)
    assert_tensors_equal(y, y0)
    assert_tensors_equal(ws_mean(acc), {"a": T([4.0, 5.0])})  # [1+5+10, 2+6+12] / 4


@pytest.mark.parametrize(
    "bad",
    [
        {"a": T([1.0, 2.0])},  # missing key
        {"a": T([1.0, 2.0]), "b": T([[1.0]]), "c": T([1.0])},  # extra key
        {"a": T([1.0, 2.0, 3.0]), "b": T([[1.0]])},  # wrong shape
    ],
)
def test_ws_mismatch_raises(bad):
    with pytest.raises(ValueError):
        ws_add(fold([(X1, 1.0)]), bad, 1.0)
    with pytest.raises(ValueError):
        ws_merge(fold([(X1, 1.0)]), fold([(bad, 1.0)]))


def test_ws_zero_weight_raises():
    with pytest.raises(ValueError):
        ws_mean(ws_zero())
    with pytest.raises(ValueError):
        ws_mean(fold([(X1, 0.0), (X2, 0.0)]))
    with pytest.raises(ValueError):
        ws_add(ws_zero(), X1, -1.0)


# ----------------------------------------------------------------------------- LoRA keys


def test_lora_pairs_and_split():
    t = {**lora(Q, torch.zeros(2, 5), torch.zeros(6, 2)), **lora(V, torch.zeros(2, 5), torch.zeros(6, 2)), PROJ: torch.zeros(3)}
    assert lora_pairs(t) == {
        Q: (f"{Q}.lora_A.weight", f"{Q}.lora_B.weight"),
        V: (f"{V}.lora_A.weight", f"{V}.lora_B.weight"),
    }
    pairs, other = split_lora(t)
    assert set(pairs) == {Q, V} and list(other) == [PROJ]
    assert pairs[Q][0] is t[f"{Q}.lora_A.weight"] and pairs[Q][1] is t[f"{Q}.lora_B.weight"]
    assert lora_rank(t) == 2


@pytest.mark.parametrize("key", [f"{Q}.lora_A.weight", f"{Q}.lora_B.weight"])
def test_lora_pairs_unpaired_raises(key):
    with pytest.raises(ValueError, match="unpaired"):
        lora_pairs([key, f"{V}.lora_A.weight", f"{V}.lora_B.weight", PROJ])


def test_lora_rank_disagreement_raises():
    with pytest.raises(ValueError):
        lora_rank({**lora(Q, torch.zeros(2, 5), torch.zeros(6, 2)), **lora(V, torch.zeros(4, 5), torch.zeros(6, 4))})
    with pytest.raises(ValueError):
        lora_rank({PROJ: torch.zeros(3)})


# ----------------------------------------------------------------------------- product aggregation


def test_product_tiny_hand_computed():
    c1 = lora(Q, T([[1.0, 0.0]]), T([[1.0], [0.0]]))  # B @ A = [[1, 0], [0, 0]]
    c2 = lora(Q, T([[0.0, 1.0]]), T([[0.0], [1.0]]))  # B @ A = [[0, 0], [0, 1]]
    acc = product_add(product_add(ws_zero(), c1, 1.0, 1.0), c2, 1.0, 1.0)
    assert_tensors_equal(ws_mean(acc), {f"{Q}.delta": T([[0.5, 0.0], [0.0, 0.5]])})

    # Averaging the factors instead (plain FedAvg on lora_A / lora_B) gives
    # mean A = [[0.5, 0.5]], mean B = [[0.5], [0.5]], so B @ A = [[0.25, 0.25], [0.25, 0.25]]:
    # wrong off-diagonal mass and half the diagonal -- not the mean update.
    fm = ws_mean(fold([(c1, 1.0), (c2, 1.0)]))
    a, b = fm[f"{Q}.lora_A.weight"], fm[f"{Q}.lora_B.weight"]
    assert torch.equal(a, T([[0.5, 0.5]])) and torch.equal(b, T([[0.5], [0.5]]))
    assert torch.equal(b @ a, T([[0.25, 0.25], [0.25, 0.25]]))


def _client(gen, r, out=6, inp=5):
    a = lambda: torch.randn(r, inp, generator=gen, dtype=torch.float64)  # noqa: E731
    b = lambda: torch.randn(out, r, generator=gen, dtype=torch.float64)  # noqa: E731
    return {**lora(Q, a(), b()), **lora(V, a(), b()), PROJ: torch.randn(3, 4, generator=gen, dtype=torch.float64)}


ALPHA = 2.0
RANKS, WEIGHTS = (2, 4, 8), (1.0, 2.0, 3.0)


@pytest.fixture
def het_clients():
    gen = torch.Generator().manual_seed(0)
    return [_client(gen, r) for r in RANKS]


def test_product_fold_heterogeneous_ranks_exact(het_clients):
    acc = ws_zero()
    for c, r, w in zip(het_clients, RANKS, WEIGHTS):
        product_add(acc, c, w, ALPHA / r)  # peft scaling = lora_alpha / r differs per client
    expected = {
        f"{p}.delta": sum(w * (ALPHA / r) * c[f"{p}.lora_B.weight"] @ c[f"{p}.lora_A.weight"]
                          for c, r, w in zip(het_clients, RANKS, WEIGHTS)) / 6.0
        for p in (Q, V)
    }
    expected[PROJ] = sum(w * c[PROJ] for c, w in zip(het_clients, WEIGHTS)) / 6.0
    assert acc.weight == 6.0 and acc.count == 3 and acc.sums[f"{Q}.delta"].shape == (6, 5)
    assert_tensors_equal({k: s / acc.weight for k, s in ws_sums(acc).items()}, expected, atol=1e-9)
    mean = ws_mean(acc)
    assert all(t.dtype == torch.float32 for t in mean.values())
    assert_tensors_equal(mean, {k: t.float() for k, t in expected.items()}, atol=1e-6)


def test_product_fold_merge_matches_single_fold(het_clients):
    single, p1, p2 = ws_zero(), ws_zero(), ws_zero()
    for i, (c, r, w) in enumerate(zip(het_clients, RANKS, WEIGHTS)):
        product_add(single, c, w, ALPHA / r)
        product_add(p1 if i != 1 else p2, c, w, ALPHA / r)
    assert all(torch.equal(ws_merge(p2, p1).sums[k], single.sums[k]) for k in single.sums)


def test_refactor_full_rank_reconstructs(het_clients):
    delta = het_clients[2][f"{Q}.lora_B.weight"] @ het_clients[2][f"{Q}.lora_A.weight"]  # 6x5, rank 5
    s = 0.25
    a, b = refactor(delta, 5, s)
    assert a.shape == (5, 5) and b.shape == (6, 5) and a.dtype == torch.float32
    torch.testing.assert_close(s * b.double() @ a.double(), delta, atol=1e-5, rtol=1e-5)
    # symmetric split: A A^T == B^T B == diag(S / scaling)
    sv = torch.linalg.svdvals(delta)
    torch.testing.assert_close((a @ a.T).double(), torch.diag(sv / s), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close((b.T @ b).double(), torch.diag(sv / s), atol=1e-4, rtol=1e-5)
    # rank above min(out, in) = 5: zero padded, still exact
    a8, b8 = refactor(delta, 8, s)
    assert a8.shape == (8, 5) and b8.shape == (6, 8)
    assert not a8[5:].any() and not b8[:, 5:].any()
    torch.testing.assert_close(s * b8.double() @ a8.double(), delta, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_refactor_low_rank_is_eckart_young(het_clients, rank):
    delta = het_clients[2][f"{V}.lora_B.weight"] @ het_clients[2][f"{V}.lora_A.weight"]
    a, b = refactor(delta, rank, 2.0)
    assert a.shape == (rank, 5) and b.shape == (6, rank)
    err = torch.linalg.matrix_norm(delta - 2.0 * b.double() @ a.double())
    discarded = torch.linalg.svdvals(delta)[rank:]
    torch.testing.assert_close(err, discarded.square().sum().sqrt(), atol=1e-5, rtol=1e-5)


def test_refactor_hand_computed():
    # diag(3, 1) at rank 1, scaling 1: keep the 3 (A = [[sqrt3, 0]], B = [[sqrt3], [0]] up to sign),
    # error = discarded singular value 1
    a, b = refactor(T([[3.0, 0.0], [0.0, 1.0]]), 1, 1.0)
    torch.testing.assert_close(b @ a, T([[3.0, 0.0], [0.0, 0.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(a.abs(), T([[3.0**0.5, 0.0]]), atol=1e-6, rtol=0)


def test_product_to_lora_round_trip(het_clients):
    acc = ws_zero()
    for c, r, w in zip(het_clients, RANKS, WEIGHTS):
        product_add(acc, c, w, ALPHA / r)
    mean = ws_mean(acc)
    mean_before = {k: t.clone() for k, t in mean.items()}
    out = product_to_lora(mean, rank=5, scaling=ALPHA / 5)
    assert out.keys() == het_clients[0].keys()
    assert lora_rank(out) == 5 and all(t.dtype == torch.float32 for t in out.values())
    for p in (Q, V):
        rebuilt = (ALPHA / 5) * out[f"{p}.lora_B.weight"] @ out[f"{p}.lora_A.weight"]
        torch.testing.assert_close(rebuilt, mean[f"{p}.delta"], atol=1e-5, rtol=1e-5)
    assert torch.equal(out[PROJ], mean[PROJ]) and out[PROJ] is not mean[PROJ]
    assert_tensors_equal(mean, mean_before)


# ----------------------------------------------------------------------------- hetlora


def test_pad_truncate_round_trip(het_clients):
    c = het_clients[0]  # rank 2
    c0 = {k: t.clone() for k, t in c.items()}
    padded = pad_lora(c, 8)
    assert lora_rank(padded) == 8
    assert not padded[f"{Q}.lora_A.weight"][2:].any() and not padded[f"{Q}.lora_B.weight"][:, 2:].any()
    back = truncate_lora(padded, 2)
    assert_tensors_equal(back, c)
    back[f"{Q}.lora_A.weight"].add_(1.0)  # truncation copies: training the slice must not touch the source
    assert_tensors_equal(padded, pad_lora(c0, 8))
    assert_tensors_equal(c, c0)
    with pytest.raises(ValueError):
        pad_lora(c, 1)
    with pytest.raises(ValueError):
        truncate_lora(c, 3)


def test_hetlora_padded_mean_hand_computed():
    c1 = {**lora(Q, T([[1.0, 2.0]]), T([[3.0], [4.0]])), PROJ: T([1.0, 2.0])}  # rank 1
    c2 = {**lora(Q, T([[5.0, 6.0], [7.0, 8.0]]), T([[1.0, 2.0], [3.0, 4.0]])), PROJ: T([3.0, 4.0])}  # rank 2
    mean = ws_mean(fold([(pad_lora(c1, 2), 1.0), (pad_lora(c2, 2), 3.0)]))
    # A: ([[1,2],[0,0]] + 3*[[5,6],[7,8]]) / 4 = [[16,20],[21,24]] / 4
    # B: ([[3,0],[4,0]] + 3*[[1,2],[3,4]]) / 4 = [[6,6],[13,12]] / 4
    # PROJ: ([1,2] + 3*[3,4]) / 4 = [10,14] / 4
    assert_tensors_equal(mean, {
        f"{Q}.lora_A.weight": T([[4.0, 5.0], [5.25, 6.0]]),
        f"{Q}.lora_B.weight": T([[1.5, 1.5], [3.25, 3.0]]),
        PROJ: T([2.5, 3.5]),
    })
    # client 1 (rank 1) takes the first row of A / first column of B
    assert_tensors_equal(truncate_lora(mean, 1), {
        f"{Q}.lora_A.weight": T([[4.0, 5.0]]),
        f"{Q}.lora_B.weight": T([[1.5], [3.25]]),
        PROJ: T([2.5, 3.5]),
    })


def test_exact_sum_is_order_independent_bit_for_bit():
    gen = torch.Generator().manual_seed(3)
    updates = [({"w": torch.randn(50, generator=gen) * 10 ** (i % 4)}, float(1 + i)) for i in range(12)]

    def fold(items):
        acc = ws_zero()
        for t, w in items:
            ws_add(acc, t, w)
        return acc

    forward = ws_mean(fold(updates))
    backward = ws_mean(fold(updates[::-1]))
    split = ws_mean(ws_merge(fold(updates[7:]), fold(updates[:7])))
    assert torch.equal(forward["w"], backward["w"]) and torch.equal(forward["w"], split["w"])
    expected = sum(w * t["w"].double() for t, w in updates) / sum(w for _, w in updates)
    torch.testing.assert_close(forward["w"].double(), expected, rtol=1e-6, atol=1e-7)


def test_exact_sum_rejects_nonfinite_and_out_of_range():
    with pytest.raises(ValueError, match="exact-sum range"):
        ws_add(ws_zero(), {"w": torch.tensor([float("nan")])}, 1.0)
    with pytest.raises(ValueError, match="exact-sum range"):
        ws_add(ws_zero(), {"w": torch.tensor([3e9])}, 1.0)


def test_merge_into_equals_pure_merge_and_leaves_other_untouched():
    a, b = ws_zero(), ws_zero()
    ws_add(a, {"w": T([1.0, 2.0])}, 1.0)
    ws_add(b, {"w": T([5.0, 6.0])}, 3.0)
    expected = ws_merge(a, b)
    b_before = b.sums["w"].clone()
    from raysim.aggregate.weighted import ws_merge_into

    into = ws_merge_into(ws_merge_into(ws_zero(), a), b)
    assert torch.equal(into.sums["w"], expected.sums["w"]) and into.weight == 4.0 and into.count == 2
    assert torch.equal(b.sums["w"], b_before)
    assert ws_mean(into)["w"].tolist() == [4.0, 5.0]
