"""SecAgg key material: a per-client secret kept with the client's own state, from which
each round's X25519 key is derived. These run where the client runs (a worker)."""
from __future__ import annotations

from actors.state_store import ClientStateStore


def _secret(client_id: int, state_root: str) -> bytes:
    """The client's secret, in its state directory (`<state_root>/<client>/secagg.secret`;
    a path or a URL such as s3://..., as runtime client state)."""
    return ClientStateStore(state_root).secret(client_id, "secagg.secret")


def client_private_key(client_id: int, round: int, state_root: str):
    """This round's X25519 key of a client, derived from its secret (fresh keys each round)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    material = HKDF(hashes.SHA256(), 32, salt=None, info=f"raysim-secagg-key-{round}".encode()).derive(
        _secret(client_id, state_root)
    )
    return X25519PrivateKey.from_private_bytes(material)


def client_public_key(client_id: int, round: int, state_root: str) -> bytes:
    from cryptography.hazmat.primitives import serialization

    pub = client_private_key(client_id, round, state_root).public_key()
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def reveal_for_dropped(client_id: int, dropped: dict[int, bytes], round: int, state_root: str) -> dict:
    """A surviving client's pairwise seeds with the clients whose masked update was not
    summed, so the driver can remove the masks that no longer cancel (SecAgg's recovery)."""
    from raysim.guard import secagg

    key = client_private_key(client_id, round, state_root)
    return {(client_id, d): secagg.reveal_pair_seed(key, client_id, d, pub, round) for d, pub in dropped.items()}
