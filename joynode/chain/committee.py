"""Committee selection, computed off-chain exactly as ``NodeCoordinator.selectCommittee``.

Every node must find the same committee for a seed from the same registry
state, and it must equal the one the marketplace stores on-chain. Candidates
are the active nodes serving the model (stake at least the minimum, non-zero
reputation); each draws ``keccak256(abi.encode(seed, address)) >> 128`` and
scores ``draw * stake * reputation``; the ``k`` highest scores win, ties going
to the lower address. A paid request's seed comes from ``drawCommittee`` (the
recording block's hash and the request's sequence number); an unpaid job's is
``unpaid_seed``: the hash of a recent epoch boundary block and the requester,
so the requester cannot search for one (no nonce or input enters it).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from eth_abi.abi import encode as abi_encode
from eth_utils.crypto import keccak

SEED_EPOCH_BLOCKS = 8  # unpaid jobs draw from the hash of a block whose number is a multiple
SEED_EPOCHS_VALID = 2  # ... among the last this many boundaries at or below a node's cursor


def unpaid_seed(block_hash: bytes, requester: str) -> bytes:
    """An unpaid job's committee seed: ``keccak256(abi.encode(blockHash, requester))``."""
    return bytes(keccak(abi_encode(["bytes32", "address"], [block_hash, requester])))


def chainless_seed(requester: str, nonce: int) -> bytes:
    """An unpaid job's seed where there is no chain: ``keccak256(abi.encode(requester, nonce))``
    (the requester can search nonces; members have no agreed block to check it by)."""
    return bytes(keccak(abi_encode(["address", "uint256"], [requester, nonce])))


def is_recent_boundary(number: int, cursor: int) -> bool:
    """Whether block ``number`` may seed an unpaid committee for a node whose watcher is at
    ``cursor``: an epoch boundary among the last ``SEED_EPOCHS_VALID`` at or below it, or
    the next one (a requester's watcher may run one epoch ahead)."""
    if number % SEED_EPOCH_BLOCKS:
        return False
    latest = cursor - cursor % SEED_EPOCH_BLOCKS
    oldest = latest - SEED_EPOCH_BLOCKS * (SEED_EPOCHS_VALID - 1)
    return oldest <= number <= latest + SEED_EPOCH_BLOCKS


@dataclass(frozen=True)
class Candidate:
    address: str  # checksummed
    stake: int
    reputation: int


def select_committee(
    candidates: Iterable[Candidate], seed: bytes, k: int, min_stake: int
) -> list[str]:
    scored = []
    for candidate in candidates:
        weight = candidate.stake * candidate.reputation
        if weight == 0 or candidate.stake < min_stake:
            continue
        draw = (
            int.from_bytes(
                keccak(abi_encode(["bytes32", "address"], [seed, candidate.address])), "big"
            )
            >> 128
        )
        scored.append((draw * weight, candidate.address))
    # Highest score first; equal scores: lower address first (as uint160).
    scored.sort(key=lambda s: (-s[0], int(s[1], 16)))
    return [address for _, address in scored[:k]]
