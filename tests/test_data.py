import numpy as np
import pytest

from raysim.config import load_config
from raysim.data import EOS, FederatedData, WordTokenizer, partition_dirichlet, partition_iid, split_indices
from raysim.run.seeding import derive_seed, sample_clients


def labels_of(n_per_class=30, classes=10):
    return np.repeat(np.arange(classes), n_per_class)


def assert_exact_cover(parts, n):
    allidx = np.concatenate(parts)
    assert len(allidx) == n and len(np.unique(allidx)) == n


def test_iid_partition_sizes_and_cover():
    parts = partition_iid(103, 10, np.random.default_rng(0))
    assert_exact_cover(parts, 103)
    assert sorted(len(p) for p in parts) == [10] * 7 + [11] * 3


def test_dirichlet_partition_cover_nonempty_and_skew():
    y = labels_of()
    skewed = partition_dirichlet(y, 20, 0.1, np.random.default_rng(0))
    mild = partition_dirichlet(y, 20, 100.0, np.random.default_rng(0))
    for parts in (skewed, mild):
        assert_exact_cover(parts, len(y))
        assert all(len(p) >= 1 for p in parts)

    def mean_classes(parts):
        return np.mean([len(np.unique(y[p])) for p in parts])

    # alpha=0.1 concentrates each client on few classes; alpha=100 is near-uniform.
    assert mean_classes(skewed) < 4 < 8 < mean_classes(mild)


def test_dirichlet_rejects_bad_alpha_and_too_many_clients():
    with pytest.raises(ValueError, match="alpha must be > 0"):
        partition_dirichlet(labels_of(), 5, 0.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="at least one"):
        partition_dirichlet(labels_of(1), 11, 1.0, np.random.default_rng(0))


def test_dirichlet_with_more_clients_than_some_classes_still_gives_everyone_data():
    parts = partition_dirichlet(labels_of(3), 25, 0.05, np.random.default_rng(1))
    assert_exact_cover(parts, 30)
    assert min(len(p) for p in parts) == 1


def test_split_is_disjoint_and_skewed():
    y = labels_of(100)
    pool, test, pre = split_indices(y, 0.2, [0.5] * 5 + [0.1] * 5, seed=0)
    assert_exact_cover([pool, test, pre], len(y))
    assert np.bincount(y[test]).tolist() == [20] * 10
    assert np.bincount(y[pre]).tolist() == [40] * 5 + [8] * 5


def test_federated_data_from_config():
    cfg = load_config("configs/quickstart.yaml")
    fd = FederatedData(cfg)
    assert len(fd.all) == 1797
    assert fd.all.images.shape[1:] == (3, 32, 32)
    assert float(fd.all.images.min()) >= -1 and float(fd.all.images.max()) <= 1
    assert sum(fd.client_sizes()) == len(fd.pool_idx)
    # clients never see the pre-training or test split
    seen = np.concatenate(fd.client_partition)
    assert not set(seen) & set(fd.pretrain_idx) and not set(seen) & set(fd.test_idx)
    again = FederatedData(cfg)
    assert all(np.array_equal(a, b) for a, b in zip(fd.client_partition, again.client_partition))


def test_tokenizer_ends_with_eos_not_two():
    tok = WordTokenizer.for_digits(8)
    ids, mask = tok(["a photo of the digit seven", "a handwritten one two three four five six"])
    assert ids[0, 0] == 1 and ids[0, 7] == EOS and mask[0].sum() == 8  # BOS + 6 words + EOS
    assert ids[1, 7] == EOS and mask[1].sum() == 8  # truncated, EOS kept
    assert EOS != 2


def test_seeds_derive_from_seed_round_client():
    assert derive_seed(0, 1, 5) == derive_seed(0, 1, 5)
    assert len({derive_seed(0, r, c) for r in range(5) for c in range(20)}) == 100
    assert derive_seed(1, 1, 5) != derive_seed(0, 1, 5)


def test_client_sampling():
    a = sample_clients(0, 3, 100, 10)
    assert a == sample_clients(0, 3, 100, 10) and a == sorted(set(a)) and len(a) == 10
    assert a != sample_clients(0, 4, 100, 10)
    assert set(sample_clients(0, 3, 100, 10, exclude=set(a))).isdisjoint(a)


def test_digits_read_without_sklearn_equal_sklearns_loader():
    from sklearn.datasets import load_digits

    from raysim.data import digits_arrays

    images, targets = digits_arrays()
    reference = load_digits()
    assert images.shape == (1797, 8, 8)
    np.testing.assert_array_equal(images, reference.images)
    np.testing.assert_array_equal(targets, reference.target)
    assert targets.dtype == reference.target.dtype
