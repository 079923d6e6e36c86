"""FedAvg that reports, from the process its client step runs in, which images that process
has decoded (tests/test_local_data.py: a worker decodes its own clients' images only). Ray
workers import it as tests.probe_algorithm: they start in the driver's working directory."""
from actors.protocol import ClientResult
from raysim.algorithms.fedavg import FedAvg

SERVED: set[int] = set()  # the clients this process has served


class DecodeProbe(FedAvg):
    def client_step(self, ctx, msg):
        result = super().client_step(ctx, msg)
        data = ctx.resident.data
        SERVED.add(ctx.client_id)
        own = {int(r) for c in SERVED for r in data.client_partition[c]}
        decoded = data.train.decoded
        probe = {
            "foreign_decoded": float(len(decoded - own)),
            "missing_decoded": float(len(own - decoded)),
            "held_clients": float(len(data._decoded_clients)),
            "memory_mapped": float(bool(data.train.dataset.cache_files)),
        }
        return ClientResult(result.client_id, result.num_examples, result.tensors, {**result.metrics, **probe})


ALGORITHM = DecodeProbe
