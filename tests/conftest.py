import os
import warnings
from pathlib import Path

import pytest

# One pre-training cache for the whole suite (and across runs), never the user's home.
os.environ.setdefault("RAYSIM_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "raysim"))
warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture(scope="session")
def ray_cluster():
    """One embedded Ray for the whole session (ray.init takes ~5 s)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def tiny_overrides(**extra) -> list[str]:
    """A fast config: small model, few clients, short pre-training."""
    base = {
        "rounds": 2,
        "clients.total": 20,
        "clients.per_round": 3,
        "model.hidden_size": 32,
        "model.intermediate_size": 64,
        "model.projection_dim": 32,
        "pretrain.epochs": 2,
        "train.local_epochs": 1,
        "runtime.num_workers": 0,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def one_thread():
    """The suite shares 2 cores with Ray workers; a second torch thread only adds contention
    (and the algorithm contract is stated at one thread). Use: pytestmark = usefixtures."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def clone_all(tensors):
    return {k: v.clone() for k, v in tensors.items()}


def assert_same(a, b, atol: float = 0.0):
    """Same keys; equal tensors (to the last bit unless `atol` is given)."""
    import torch

    assert a.keys() == b.keys()
    for k in a:
        if atol:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)
        else:
            assert torch.equal(a[k], b[k]), k
