"""Committee selection, computed off-chain exactly as ``NodeCoordinator.selectCommittee``.

Every node must find the same committee for a seed from the same registry
state, and it must equal the one the marketplace stores on-chain. Candidates
are the active nodes serving the model (stake at least the minimum, non-zero
reputation); each draws ``keccak256(abi.encode(seed, address)) >> 128`` and
scores ``draw * stake * reputation``; the ``k`` highest scores win, ties going
to the lower address. A paid request's seed comes from ``drawCommittee`` (the
recording block's hash and the request's sequence number); an unpaid job's is
its request id.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from eth_abi.abi import encode as abi_encode
from eth_utils.crypto import keccak


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
