"""Secure aggregation by pairwise additive masking (Bonawitz et al. 2017, "SecAgg", simplified).

The driver only ever holds masked vectors; their sum is the exact (fixed-point) sum of the
clients' updates because the pairwise masks cancel.

API
---
``generate_keypair() -> (private_key, public_bytes)``
    X25519 key pair (``cryptography``); the 32 public bytes are what the driver relays.
``pair_seed(private_key, client_id, peer_id, peer_public, round) -> bytes``
    32-byte seed shared by clients ``client_id`` and ``peer_id`` for this round: X25519
    shared secret -> HKDF-SHA256 with info = (round, min id, max id). Both ends get the same.
``masked_update(client_id, private_key, peer_public, update, round, scale_bits, weight=1.0)``
    ``encode(weight * update)`` plus, for every peer j != client_id in ``peer_public``,
    ``+mask_ij`` if ``j > client_id`` and ``-mask_ij`` if ``j < client_id`` (mod 2**64).
    Returns ``{key: np.ndarray[uint64]}`` with the update's shapes.
``sum_masked(masked_list) -> {key: uint64 array}``
    wrapping sum mod 2**64; exact and independent of order and grouping, so workers can
    pre-sum their clients' vectors and the driver merges the partials (a fold).
``unmask_sum(masked_sum, scale_bits, revealed=None) -> Tensors``
    remove the dropped clients' leftover masks (if any) and decode the sum (float64).
``reveal_pair_seed(private_key, client_id, dropped_id, dropped_public, round) -> bytes``
    a survivor's seed with a dropped client, sent to the driver for recovery.
``remove_dropped_masks(masked_sum, revealed) -> masked_sum``
    ``revealed = {(survivor_id, dropped_id): seed}``; subtracts each survivor's mask with the
    dropped client (with the survivor's sign), so the survivors' sum unmasks exactly.
``encode(tensors, scale_bits) -> {key: np.ndarray[int64]}`` / ``decode(encoded, scale_bits) -> Tensors``
    fixed point: ``round(x * 2**scale_bits)`` as int64 (two's complement, same bits as the
    uint64 ring element); decode reads the uint64/int64 bits as signed and divides.

Protocol (one round)
--------------------
1. Every selected client makes a key pair; the driver relays ``{id: public_bytes}`` of the
   cohort to all of them (ids are ints, e.g. the client's index in the round's cohort).
2. Each client sends ``masked_update(...)``; workers/the driver ``sum_masked`` them.
3. If client d dropped after step 1, its masks with the survivors do not cancel: each
   survivor i sends ``reveal_pair_seed(..., dropped_id=d, ...)`` and the driver calls
   ``remove_dropped_masks`` (or passes ``revealed`` to ``unmask_sum``). Then the driver must
   NEVER accept d's masked update for this round any more: with d's pair seeds revealed it
   could unmask d alone (real SecAgg has the same rule). If a survivor also drops during
   recovery, redo the round.
4. ``unmask_sum`` -> sum of ``weight_i * update_i``; the driver divides by the total weight
   (weights, e.g. example counts, are sent in the clear).

Simplifications versus full SecAgg: seeds are revealed by the survivors rather than
reconstructed from Shamir shares, there is no self-mask (double masking) and keys are not
authenticated (the driver is trusted to relay public keys honestly, i.e. honest-but-curious).

Arithmetic
----------
Ring Z / 2**64: numpy uint64 addition wraps, which is exactly the modular addition we need,
and 64 bits leave room for fine fixed point. Masks are uniform on the ring, produced by
AES-256-CTR keyed with the pair seed (a cryptographic PRG, unlike PCG64 whose state can be
recovered from outputs), one stream over the keys in sorted order.

Fixed-point range and overflow bound: ``encode`` rejects any value with
``|x| * 2**scale_bits >= 2**53`` (beyond that float64 cannot represent every integer, so the
encoding would not be exact). The sum of ``n <= 2**10 = 1024`` such values has magnitude
< 2**63 and therefore decodes without wrap-around; ``unmask_sum`` does not know n, so callers
must keep cohorts at or below ``MAX_CLIENTS``. With ``scale_bits=24`` (default) a client's
weighted values may reach about 5.4e8 in magnitude and are rounded to 2**-24 ~ 6e-8 (error at
most 2**-25 per value per client).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

Tensors = dict[str, torch.Tensor]
Masked = dict[str, np.ndarray]  # uint64 ring elements, shaped like the update

DEFAULT_SCALE_BITS = 24
MAX_CLIENTS = 2**10  # sum of this many encoded values cannot overflow int64 (see module doc)
_EXACT = 2.0**53  # float64 integers are exact below this
_INFO = b"raysim-secagg-v1 pair seed"


# --------------------------------------------------------------------------- fixed point


def encode(tensors: Mapping[str, torch.Tensor], scale_bits: int = DEFAULT_SCALE_BITS) -> dict[str, np.ndarray]:
    """``round(x * 2**scale_bits)`` as int64 arrays (same shapes). Raises on NaN/Inf or out-of-range values."""
    if not 0 <= scale_bits <= 52:
        raise ValueError(f"scale_bits must be in [0, 52], got {scale_bits}")
    out: dict[str, np.ndarray] = {}
    for k, t in tensors.items():
        x = t.detach().to(torch.float64).cpu().numpy() * 2.0**scale_bits  # exact: power-of-two scaling
        if not np.isfinite(x).all():
            raise ValueError(f"cannot encode NaN/Inf in {k!r}")
        if x.size and np.abs(x).max() >= _EXACT:
            limit = _EXACT / 2.0**scale_bits
            big = np.abs(x).max() / 2.0**scale_bits
            raise OverflowError(f"{k!r}: |value| {big:.6g} >= {limit:.6g} = 2**{53 - scale_bits}")
        out[k] = np.rint(x).astype(np.int64)
    return out


def decode(encoded: Mapping[str, np.ndarray], scale_bits: int = DEFAULT_SCALE_BITS) -> Tensors:
    """Inverse of ``encode`` (also for sums): read the 64 bits as signed, divide by 2**scale_bits; float64."""
    out: Tensors = {}
    for k, v in encoded.items():
        v = np.asarray(v)
        signed = v.view(np.int64) if v.dtype == np.uint64 else v.astype(np.int64)
        # int64 -> float64 rounds above 2**53; only sums of many clients get there, and then
        # the error is still far below the fixed-point resolution times the client count
        # (np.asarray: dividing a 0-d array gives a numpy scalar, which torch rejects)
        out[k] = torch.from_numpy(np.asarray(signed.astype(np.float64) / 2.0**scale_bits))
    return out


# --------------------------------------------------------------------------- keys and seeds


def generate_keypair() -> tuple[X25519PrivateKey, bytes]:
    """A fresh X25519 key pair; make one per client per round (fresh keys give fresh masks)."""
    private = X25519PrivateKey.generate()
    public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return private, public


def _as_private(key) -> X25519PrivateKey:
    if isinstance(key, X25519PrivateKey):
        return key
    return X25519PrivateKey.from_private_bytes(bytes(key))  # raw 32 bytes, e.g. after pickling


def pair_seed(private_key, client_id: int, peer_id: int, peer_public: bytes, round: int) -> bytes:
    """32-byte seed that clients ``client_id`` and ``peer_id`` both derive for ``round``.

    The round and the (ordered) pair of ids go into the HKDF info: if keys were ever reused
    across rounds, masks would repeat and the difference of two masked updates would reveal
    the difference of the plain ones; binding the ids stops one pair's seed being replayed
    for another pair.
    """
    client_id, peer_id = int(client_id), int(peer_id)
    if client_id == peer_id:
        raise ValueError(f"client {client_id} has no pair seed with itself")
    shared = _as_private(private_key).exchange(X25519PublicKey.from_public_bytes(bytes(peer_public)))
    lo, hi = sorted((client_id, peer_id))
    info = _INFO + struct.pack(">qqq", int(round), lo, hi)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


reveal_pair_seed = pair_seed  # same derivation; the name says what a survivor does with it


def _masks(seed: bytes, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Uniform uint64 masks for every key: AES-256-CTR keystream, keys in sorted order."""
    sizes = {k: int(np.prod(shapes[k], dtype=np.int64)) for k in sorted(shapes)}
    total = sum(sizes.values())
    enc = Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor()  # fresh key per pair and round
    stream = np.frombuffer(enc.update(bytes(8 * total)) + enc.finalize(), dtype="<u8")
    out, pos = {}, 0
    for k, n in sizes.items():
        out[k] = stream[pos : pos + n].reshape(shapes[k]).astype(np.uint64)  # copy: frombuffer is read-only
        pos += n
    return out


def _sign(owner: int, other: int) -> int:
    # the lower id adds the mask and the higher id subtracts it, so each pair cancels
    return 1 if other > owner else -1


# --------------------------------------------------------------------------- client side


def masked_update(
    client_id: int,
    private_key,
    peer_public: Mapping[int, bytes],
    update: Mapping[str, torch.Tensor],
    round: int,
    scale_bits: int = DEFAULT_SCALE_BITS,
    weight: float = 1.0,
) -> Masked:
    """``encode(weight * update) + sum_j sign * mask_ij`` mod 2**64; ``peer_public`` may include the client itself."""
    client_id = int(client_id)
    if len(peer_public) > MAX_CLIENTS:
        raise ValueError(f"cohort of {len(peer_public)} > MAX_CLIENTS={MAX_CLIENTS}: the sum could overflow")
    weighted = {k: t.detach().to(torch.float64) * float(weight) for k, t in update.items()}
    out = {k: v.view(np.uint64).copy() for k, v in encode(weighted, scale_bits).items()}
    shapes = {k: v.shape for k, v in out.items()}
    for peer, pub in sorted(peer_public.items()):
        if int(peer) == client_id:
            continue
        masks = _masks(pair_seed(private_key, client_id, int(peer), pub, round), shapes)
        sign = _sign(client_id, int(peer))
        for k in out:
            if sign > 0:
                out[k] += masks[k]  # uint64 arithmetic wraps: addition mod 2**64
            else:
                out[k] -= masks[k]
    return out


# --------------------------------------------------------------------------- driver side


def sum_masked(masked: Iterable[Mapping[str, np.ndarray]]) -> Masked:
    """Sum masked vectors (or partial sums) mod 2**64; inputs are not modified."""
    total: Masked | None = None
    for m in masked:
        if total is None:
            total = {k: np.asarray(v).view(np.uint64).copy() for k, v in m.items()}
            continue
        if m.keys() != total.keys():
            raise ValueError(f"key mismatch: {sorted(total.keys() ^ m.keys())[:5]}")
        for k, v in m.items():
            v = np.asarray(v).view(np.uint64)
            if v.shape != total[k].shape:
                raise ValueError(f"shape mismatch for {k!r}: {v.shape} vs {total[k].shape}")
            total[k] += v
    if total is None:
        raise ValueError("nothing to sum")
    return total


def remove_dropped_masks(masked_sum: Mapping[str, np.ndarray], revealed: Mapping[tuple[int, int], bytes]) -> Masked:
    """Subtract survivor i's leftover mask with dropped client d for every ``(i, d) -> seed``.

    Survivor i added ``sign(i, d) * mask_id``; d is not in the sum to cancel it, so remove it.
    Returns a new dict; ``masked_sum`` is not modified.
    """
    out = {k: np.asarray(v).view(np.uint64).copy() for k, v in masked_sum.items()}
    shapes = {k: v.shape for k, v in out.items()}
    for (survivor, dropped), seed in sorted(revealed.items()):
        masks = _masks(seed, shapes)
        if _sign(int(survivor), int(dropped)) > 0:
            for k in out:
                out[k] -= masks[k]
        else:
            for k in out:
                out[k] += masks[k]
    return out


def unmask_sum(
    masked_sum: Mapping[str, np.ndarray],
    scale_bits: int = DEFAULT_SCALE_BITS,
    revealed: Mapping[tuple[int, int], bytes] | None = None,
) -> Tensors:
    """Decoded (float64) sum of the clients' weighted updates; pass ``revealed`` seeds if clients dropped."""
    if revealed:
        masked_sum = remove_dropped_masks(masked_sum, revealed)
    return decode(masked_sum, scale_bits)


def survivors_reveal(
    survivors: Sequence[tuple[int, object]], dropped: Mapping[int, bytes], round: int
) -> dict[tuple[int, int], bytes]:
    """Convenience for simulations: ``{(i, d): seed}`` from survivors ``[(id, private_key)]`` and ``{d: public}``.

    In a deployment each survivor computes its own entries with ``reveal_pair_seed``.
    """
    return {
        (int(i), int(d)): reveal_pair_seed(key, int(i), int(d), pub, round)
        for i, key in survivors
        for d, pub in dropped.items()
    }
