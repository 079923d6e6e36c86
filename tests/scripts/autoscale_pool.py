"""Run by tests/test_elastic.py in its own process (it needs its own multi-node Ray).

A two-node cluster simulated on this machine: the head has 1 CPU, so of a pool of two
1-CPU workers only one starts. A node is added (the second worker starts and joins the
next round), then removed (that worker dies; its clients re-run on the other one). The
final adapter must equal local mode's bit for bit. Prints one JSON line."""
import json
import sys
import time
from pathlib import Path

import ray
import torch
from ray.cluster_utils import Cluster

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import tiny_overrides  # noqa: E402
from raysim.config import load_config  # noqa: E402
from raysim.run.engine import Engine  # noqa: E402

out = Path(sys.argv[1])
torch.set_num_threads(1)  # local mode below uses the workers' thread count: identical floats
over = tiny_overrides(
    **{
        "rounds": 8,
        "clients.per_round": 4,
        "runtime.num_workers": 2,
        "runtime.warm_start": "false",
        "runtime.start_wait_s": 2,
        "eval.every": 1000,
    }
)
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
ray.init(address=cluster.address, logging_level="ERROR")
engine = Engine(load_config("configs/quickstart.yaml", over), str(out / "elastic"), False)
engine.start()
log = {"workers": [], "failures": [], "requeued": []}


def round_() -> None:
    rec = engine.run_round()
    log["workers"].append(rec["workers"])
    log["failures"].append(rec["worker_failures"])
    log["requeued"].append(rec["requeued"])


round_()  # one worker: the other waits for a CPU
node = cluster.add_node(num_cpus=1)
deadline = time.monotonic() + 240
while len(engine.pool.refresh()) < 2:  # the second worker starts on the new node
    assert time.monotonic() < deadline, "the second worker never started"
    time.sleep(0.5)
round_()
round_()
cluster.remove_node(node)  # scale down: the worker on that node dies
while not engine.done():
    round_()
engine.pool.shutdown()
ray.shutdown()
cluster.shutdown()

local = Engine(load_config("configs/quickstart.yaml", over + ["runtime.num_workers=0"]), str(out / "local"), False)
local.start()
while not local.done():
    local.run_round()
log["identical"] = all(torch.equal(local.state[k], engine.state[k]) for k in local.state)
log["max_abs_diff"] = max(float((local.state[k] - engine.state[k]).abs().max()) for k in local.state)
print(json.dumps(log))
