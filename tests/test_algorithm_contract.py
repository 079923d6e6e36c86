"""The contract every file in raysim/algorithms/ keeps, checked for each of them: a new
algorithm gets these tests by being there.

- determinism: the same client, round and seed give the same result, also from a pickled copy;
- the settings pickle: an algorithm ships as its settings, however much it has built;
- inputs untouched: client steps leave the broadcast alone, the fold leaves the results
  alone, `merge` leaves its second argument alone, `finalize` leaves the old state alone;
- merge order: however the clients are split into partials and merged, the result is the same;
- local mode equals the Ray pool at 1 thread, round for round, to the last bit.

A new algorithm runs on configs/<name>.yaml (else the quickstart's) at the suite's tiny
sizes; one that needs other small settings adds them to SMALL below.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from actors.protocol import ClientContext, state_tensors
from conftest import assert_same, clone_all, tiny_overrides
from raysim import algorithms
from raysim.config import load_config
from raysim.run.engine import Engine
from raysim.run.seeding import derive_seed

ROOT = Path(__file__).resolve().parents[1]
ALGORITHMS = sorted(p.stem for p in (ROOT / "raysim" / "algorithms").glob("*.py") if p.stem not in {"__init__", "common"})

# Settings the suite's tiny overrides do not cover: client kinds or tasks that must add up
# to clients.total, phase schedules that need more rounds, a base that is cached elsewhere.
SMALL: dict[str, dict[str, object]] = {
    "creamfl": {
        "clients.total": 6,
        "clients.per_round": 4,
        "algorithm.options.kinds": "{image: 0.334, text: 0.333, image_text: 0.333}",
        "algorithm.options.public_size": 24,
        "algorithm.options.client_width": 16,
        "algorithm.options.public_batch_size": 8,
        "algorithm.options.server_batch_size": 12,
        "model.projection_dim": 16,
        "model.num_layers": 1,
    },
    "fedrecon": {
        "rounds": 3,
        "clients.total": 6,
        "clients.per_round": 4,
        "algorithm.options.phase_a": 1,
        "algorithm.options.phase_b": 1,
        "algorithm.options.latent_dim": 8,
        "algorithm.options.hidden_dim": 32,
        "algorithm.options.mapping_hidden": 16,
        "algorithm.options.classifier_hidden": 16,
    },
    "mfed": {
        "clients.total": 4,
        "clients.per_round": 4,
        "algorithm.options.tasks": "{classify: 2, regress: 1, denoise: 1}",
        "model.hidden_size": 16,
    },
    "fedlarge": {  # the tiny CLIP base of the rest of the suite (cached), not MiniLM's
        "algorithm.options.base": "config",
        "algorithm.options.caption_noise.clients": "[]",
        "lora.target_modules": "[q_proj,v_proj]",
        "model.max_text_len": 16,
        "clients.total": 6,
        "clients.per_round": 3,
    },
}


pytestmark = pytest.mark.usefixtures("one_thread")


def config(name: str, **extra):
    own = ROOT / "configs" / f"{name}.yaml"
    path = own if own.is_file() else ROOT / "configs" / "quickstart.yaml"
    settings = {"algorithm.name": name, "runtime.torch_threads": 1, **SMALL.get(name, {}), **extra}
    return load_config(path, tiny_overrides(**settings))


def build(name: str, **extra):
    return algorithms.load(name)(config(name, **extra))


def step(alg, resident, client_id: int, msg):
    seed = derive_seed(alg.cfg.seed, msg.round, client_id)
    return alg.client_step(ClientContext(client_id, msg.round, seed, None, resident, {}), msg)


def round_one(alg):
    """The first round's state, broadcast and results of up to three clients."""
    state = alg.init_server()
    ids = list(range(min(3, alg.cfg.clients.total)))
    msg = alg.broadcast(state, 1, ids)
    resident = alg.build_resident()
    return state, msg, [step(alg, resident, c, msg) for c in ids]


@pytest.mark.parametrize("name", ALGORITHMS)
def test_settings_pickle(name):
    alg = build(name)
    before = pickle.dumps(alg)
    round_one(alg)  # builds and caches data, models and the resident
    after = pickle.dumps(alg)
    assert after == before and len(after) < 64 * 1024  # the settings, nothing built from them
    assert pickle.loads(after).cfg == alg.cfg


@pytest.mark.parametrize("name", ALGORITHMS)
def test_client_step_is_deterministic_and_leaves_the_broadcast_alone(name):
    alg = build(name)
    state = alg.init_server()
    msg = alg.broadcast(state, 1, [0, 1])
    sent = clone_all(msg.tensors)
    first = step(alg, alg.build_resident(), 1, msg)
    copy_ = pickle.loads(pickle.dumps(alg))  # what a worker receives
    again = step(copy_, copy_.build_resident(), 1, msg)
    assert_same(first.tensors, again.tensors)
    assert dict(first.metrics) == dict(again.metrics) and first.num_examples == again.num_examples
    assert_same(msg.tensors, sent)  # shared by every client of the round
    other = step(alg, alg.build_resident(), 1, alg.broadcast(state, 1, [0, 1]))
    assert_same(first.tensors, other.tensors)  # a fresh resident changes nothing either


def fold(alg, msg, partials):
    """Each partial folded in client order (as a worker does), merged in the given order."""
    acc = alg.zero(msg)
    for part in partials:
        p = alg.zero(msg)
        for r in sorted(part, key=lambda r: r.client_id):
            p = alg.accumulate(p, r)
        p = pickle.loads(pickle.dumps(p))  # a partial travels from its worker
        seen = pickle.dumps(p)
        acc = alg.merge(acc, p)
        assert pickle.dumps(p) == seen  # merge only reads its second argument
    return acc


@pytest.mark.parametrize("name", ALGORITHMS)
def test_fold_ignores_merge_order_and_leaves_its_inputs_alone(name):
    alg = build(name)
    state, msg, results = round_one(alg)
    uploaded = [clone_all(r.tensors) for r in results]
    old_state = clone_all(state_tensors(alg, state))
    a, b, c = (results + results[:1] * 3)[:3] if len(results) < 3 else results
    splits = [[[a, b, c]], [[a], [b, c]], [[b, c], [a]], [[c], [b], [a]], [[], [c, a], [b]]]
    finals = [state_tensors(alg, alg.finalize(state, fold(alg, msg, s))) for s in splits]
    for got in finals[1:]:
        assert got.keys() == finals[0].keys()
        for k in got:
            torch.testing.assert_close(got[k], finals[0][k], rtol=1e-6, atol=1e-7, msg=k)
    for r, before in zip(results, uploaded):
        assert_same(r.tensors, before)
    assert_same(state_tensors(alg, state), old_state)  # finalize returns a new state


def run(cfg, out: Path) -> tuple[list[dict], dict]:
    engine = Engine(cfg, str(out), resume=False)
    try:
        engine.start()
        while not engine.done():
            engine.run_round()
        return engine.history, state_tensors(engine.algorithm, engine.state)
    finally:
        engine.close()


TIMING = {"wall_s", "compute_s", "transfer_s", "aggregate_s", "eval_s", "checkpoint_s", "workers", "served_by"}


@pytest.mark.parametrize("name", ALGORITHMS)
def test_local_mode_equals_the_ray_pool_at_one_thread(name, ray_cluster, tmp_path):
    local = run(config(name, **{"runtime.num_workers": 0}), tmp_path / "local")
    remote = run(config(name, **{"runtime.num_workers": 2}), tmp_path / "ray")
    assert_same(local[1], remote[1])  # the final model, bit for bit
    assert len(local[0]) == len(remote[0]) == config(name).rounds + 1
    for a, b in zip(local[0], remote[0]):
        assert {k: v for k, v in a.items() if k not in TIMING} == {k: v for k, v in b.items() if k not in TIMING}
