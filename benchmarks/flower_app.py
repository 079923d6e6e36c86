"""The same FedAvg-of-LoRA workload on Flower's Ray-based simulation engine, written the
way Flower's own examples write it (ClientApp / ServerApp, Message API, strategy.start).

Runs in Flower's own venv (benchmarks/setup_flower.sh: flwr[simulation] with its pinned
ray), reusing raysim's data, model and training code, which is installed there --no-deps:

    benchmarks/.flower-venv/bin/python benchmarks/flower_app.py configs/quickstart.yaml \
        clients.total=100 rounds=5 eval.every=1000 --json /tmp/flower.json

What is the same as raysim: the pre-trained base and LoRA (the algorithm's `build_resident`
on the one LoRA path, raysim/lora/), data and Dirichlet partition (partition id = raysim
client id), client sampling (`sample_clients`, through a small FedAvg override that picks
the nodes whose partition ids raysim samples), per-client seeds (`derive_seed`), local
steps (the algorithm's `client_step`), each client's optimizer moments kept across rounds (in the
node's `context.state`, Flower's way to keep client state), sample-weighted averaging
(Flower's FedAvg), and central evaluation on the server at round 0 and at the last round
(plus every `eval.every` rounds, as raysim's engine does).

What is Flower's way: the ClientApp builds the model inside the client function on every
call (as Flower's examples do), the data set object is cached per process (as Flower's
examples cache their FederatedDataset), messages carry the adapter as an ArrayRecord.
2 CPUs for the simulation, 1 CPU (and 1 torch thread) per ClientApp: 2 at a time.

The algorithm object (settings, tokenizer, tokenized data set) is what is cached per
process; with `algorithm.name: fedlarge` (configs/fedlarge.yaml, workload c2) its model
is the MiniLM dual encoder, loaded with from_pretrained from its local directory. The
server starts from the algorithm's `init_server` and evaluates with its `evaluate`.
"""
from __future__ import annotations

import time

T_PROCESS = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

from actors.protocol import Broadcast, ClientContext  # noqa: E402
from raysim import algorithms  # noqa: E402
from raysim.config import config_from_dict, load_config  # noqa: E402
from raysim.lora.adapters import l2_norm  # noqa: E402
from raysim.run.memory import PeakMemorySampler  # noqa: E402
from raysim.run.seeding import derive_seed, sample_clients  # noqa: E402

T_IMPORTED = time.perf_counter()

# ------------------------------------------------------------------------------ ClientApp

_ALGORITHMS: dict[str, object] = {}  # per-process cache of the algorithm and its data set (as Flower examples cache fds)


def _algorithm(cfg_json: str):
    """The algorithm's settings with its tokenizer and tokenized data set, cached per process."""
    if cfg_json not in _ALGORITHMS:
        cfg = config_from_dict(json.loads(cfg_json))
        algo = _ALGORITHMS[cfg_json] = algorithms.load(cfg.algorithm.name)(cfg)
        if algo.lora.quality.mode != "none":  # its scores would need to persist in context.state too
            raise ValueError("the Flower benchmark runs without data-quality scoring (quality none)")
    return _ALGORITHMS[cfg_json]


def _load_moments(context: Context) -> dict:
    if "optimizer" in context.state:  # this node's optimizer moments from its last round
        return {"optimizer": dict(context.state["optimizer"].to_torch_state_dict())}
    return {}


def _save_moments(context: Context, client_state: dict) -> None:
    if "optimizer" in client_state:
        context.state["optimizer"] = ArrayRecord(client_state["optimizer"])


def _train(cfg_json: str, cid: int, rnd: int, arrays: dict, context: Context):
    algo = _algorithm(cfg_json)
    # The model is built inside the client function, on every call (Flower's examples).
    resident = algo.build_resident()
    ctx = ClientContext(cid, rnd, derive_seed(algo.cfg.seed, rnd, cid), None, resident, _load_moments(context))
    result = algo.client_step(ctx, Broadcast(round=rnd, tensors=arrays))
    _save_moments(context, ctx.state)
    return result.tensors, result.metrics["train_loss"], result.num_examples


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # the same thread budget as raysim's workers (1 CPU each)
    config = msg.content["config"]
    cid = int(context.node_config["partition-id"])
    if cid != config["client-id"]:
        raise RuntimeError(f"node serves partition {cid}, the server meant client {config['client-id']}")
    arrays = dict(msg.content["arrays"].to_torch_state_dict())
    tensors, loss, n = _train(config["cfg"], cid, int(config["server-round"]), arrays, context)
    reply = RecordDict(
        {"arrays": ArrayRecord(tensors), "metrics": MetricRecord({"train_loss": loss, "num-examples": n})}
    )
    return Message(content=reply, reply_to=msg)


# ------------------------------------------------------------------------------ ServerApp

# node id -> partition id, captured where Flower's simulation registers its nodes (below):
# the server-side strategy needs it to send round r's messages to raysim's sampled clients.
NODE_PARTITION: dict[int, int] = {}


class SameClientsFedAvg(FedAvg):
    """FedAvg whose training sample is raysim's `sample_clients(seed, round, ...)` instead
    of random node ids; records when each round starts (for per-round times)."""

    def __init__(self, cfg, cfg_json: str, **kw):
        super().__init__(**kw)
        self.cfg, self.cfg_json = cfg, cfg_json
        self.round_starts: dict[int, float] = {}
        self.sampled: dict[int, list[int]] = {}

    def configure_train(self, server_round, arrays, config, grid):
        self.round_starts[server_round] = time.perf_counter()
        c = self.cfg
        ids = sample_clients(c.seed, server_round, c.clients.total, c.clients.per_round)
        self.sampled[server_round] = ids
        node_of = {p: n for n, p in NODE_PARTITION.items()}
        live = set(grid.get_node_ids())
        messages = []
        for cid in ids:
            node = node_of[cid]
            assert node in live, f"node of client {cid} not connected"
            cfg_rec = ConfigRecord({"server-round": server_round, "client-id": cid, "cfg": self.cfg_json})
            content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: cfg_rec})
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node))
        return messages


RESULT: dict = {}


def make_server_app(cfg) -> ServerApp:
    app = ServerApp()
    cfg_json = json.dumps(cfg.to_dict())

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        warnings.filterwarnings("ignore")
        algo = algorithms.load(cfg.algorithm.name)(cfg)  # its evaluation model is built once, on first use
        initial, central_eval = ArrayRecord(algo.init_server()), algo.evaluate
        evals, eval_s = {}, {}

        def evaluate_fn(server_round: int, arrays: ArrayRecord):
            if server_round % cfg.eval.every and server_round not in (0, cfg.rounds):
                return None
            t0 = time.perf_counter()
            evals[server_round] = central_eval(dict(arrays.to_torch_state_dict()))
            eval_s[server_round] = time.perf_counter() - t0
            return MetricRecord(evals[server_round])

        strategy = SameClientsFedAvg(
            cfg,
            cfg_json,
            fraction_train=0.0 + cfg.clients.per_round / cfg.clients.total,
            fraction_evaluate=0.0,  # central evaluation only, as raysim does
            min_available_nodes=cfg.clients.total,
        )
        result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=cfg.rounds, evaluate_fn=evaluate_fn)
        t_end = time.perf_counter()
        starts = [strategy.round_starts[r] for r in range(1, cfg.rounds + 1)] + [t_end]
        final = dict(result.arrays.to_torch_state_dict())
        RESULT.update(
            rounds=[
                {"round": r, "clients": strategy.sampled[r], "wall_s": starts[r] - starts[r - 1]}
                for r in range(1, cfg.rounds + 1)
            ],
            initial=evals.get(0),
            final=evals.get(cfg.rounds),
            eval_s=eval_s,
            adapter_norm=l2_norm({k: v.float() for k, v in final.items()}),
        )

    return app


def _capture_node_mapping() -> None:
    """Flower's simulation gives node i (a random node id) partition i; keep that mapping
    for the strategy above. Only records what Flower returns; changes nothing."""
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api._register_nodes

    def register(num_nodes, state_factory):
        mapping = original(num_nodes, state_factory)
        NODE_PARTITION.clear()
        NODE_PARTITION.update(mapping)
        return mapping

    vce_api._register_nodes = register


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("flwr").setLevel(logging.WARNING)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    t0 = time.perf_counter()
    cfg = load_config(args.config, args.overrides)
    _capture_node_mapping()
    with PeakMemorySampler() as memory:
        run_simulation(
            server_app=make_server_app(cfg),
            client_app=client_app,
            num_supernodes=cfg.clients.total,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"num_cpus": args.cpus, "include_dashboard": False, "logging_level": "ERROR"},
            },
        )
    if not RESULT:
        raise SystemExit("flower_app: the ServerApp did not finish (see the log above)")
    result = {
        "side": "flower",
        "config": args.config,
        "overrides": args.overrides,
        "imports_s": T_IMPORTED - T_PROCESS,
        "after_imports_s": time.perf_counter() - t0,
        **RESULT,
        "peak_memory_mb": memory.peak_mb,
    }
    text = json.dumps(result)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
