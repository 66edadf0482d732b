"""Unpaid committees: drawn from a recent block the requester cannot choose, checked by members.

In-memory: a real peer table and an in-memory chain mirror; no sockets.
"""

from __future__ import annotations

import pytest
from eth_account import Account

from joynode import wire
from joynode.chain.committee import (
    SEED_EPOCH_BLOCKS,
    Candidate,
    is_recent_boundary,
    select_committee,
    unpaid_seed,
)
from joynode.consensus.committee import Committees, CommitteeUnavailable
from joynode.messages import ServingStatus
from joynode.p2p.peers import PeerTable

MODEL = "QmModel"
NODES = [Account.create().address for _ in range(10)]
REQUESTER = NODES[0]


class MirrorChain:
    """A chain mirror in memory: registered nodes and the hashes of the blocks seen."""

    def __init__(self, cursor: int) -> None:
        self.cursor = cursor
        self.candidates = {a: Candidate(a, 100 + i, 1000) for i, a in enumerate(NODES)}
        self.hashes = {n: bytes([n % 256]) * 32 for n in range(0, cursor + 1, SEED_EPOCH_BLOCKS)}
        # The registry as the chain had it at each boundary (``candidates`` is the mirror's now).
        self.at_block = {n: dict(self.candidates) for n in self.hashes}

    async def registry_candidates(self) -> dict[str, Candidate]:
        return dict(self.candidates)

    async def committee_candidates(self, block: wire.BlockRef) -> dict[str, Candidate]:
        return dict(self.at_block[block.number])

    async def seed_block(self) -> wire.BlockRef | None:
        number = self.cursor - self.cursor % SEED_EPOCH_BLOCKS
        return wire.BlockRef(number, self.hashes[number])

    async def recent_block_hash(self, number: int) -> bytes | None:
        if not is_recent_boundary(number, self.cursor):
            return None
        return self.hashes.get(number)


def view(
    me: str, down: frozenset[str] = frozenset(), chain: MirrorChain | None = None
) -> Committees:
    """Node ``me``'s committees: every registered node up and serving, but ``down``."""
    peers = PeerTable(timeout_s=10)
    for address in NODES:
        if address != me and address not in down:
            peers.heartbeat(
                f"peer-{address}",
                address,
                wire.Heartbeat(1, "1.0", 2, [], [MODEL], 0, 4),
                sent_ms=1,
            )
    chain = chain or MirrorChain(cursor=100)
    return Committees(me, peers, lambda: ServingStatus((MODEL,), 0, 4), chain)


def offer(committee: list[str], block: wire.BlockRef | None) -> wire.JobOffer:
    return wire.JobOffer(
        b"\0" * 32, MODEL, "prompt", None, 8, 0.0, 1.0, -1, None, False,
        REQUESTER, 1, committee, 1, 2, committee_block=block,
    )  # fmt: skip


async def test_the_committee_comes_from_the_block_and_requester_not_from_the_nonce() -> None:
    requester = view(REQUESTER)
    drawn = {tuple((await requester.draw(MODEL, 3, nonce))[0]) for nonce in range(200)}
    assert len(drawn) == 1, "grinding nonces changed the committee"
    committee, block = await requester.draw(MODEL, 3, 0)
    assert block == wire.BlockRef(96, bytes([96]) * 32)
    chain = MirrorChain(cursor=100)
    ranking = select_committee(chain.candidates.values(), unpaid_seed(block.hash, REQUESTER), 10, 0)
    assert committee == ranking[:3]
    # Another boundary, or another requester, draws otherwise.
    seeds = [unpaid_seed(bytes([n]) * 32, REQUESTER) for n in (0, 8, 16, 24, 32, 40)]
    seeds += [unpaid_seed(block.hash, other) for other in NODES[1:4]]
    others = {tuple(select_committee(chain.candidates.values(), s, 3, 0)) for s in seeds}
    assert len(others | {tuple(committee)}) > 1


async def test_members_accept_a_fairly_drawn_committee() -> None:
    committee, block = await view(REQUESTER).draw(MODEL, 3, 0)
    for member in committee:
        assert await view(member).check(offer(committee, block)) is None


async def test_members_rank_by_the_registry_at_the_block_not_by_their_mirrors_latest() -> None:
    """Settlements move reputations every few blocks, and mirrors apply them at different
    moments: a member whose mirror has moved on since the boundary agrees all the same."""
    committee, block = await view(REQUESTER).draw(MODEL, 3, 0)
    assert block is not None
    moved_on = MirrorChain(cursor=100)
    moved_on.candidates = {
        a: Candidate(a, c.stake, 1000 if a in committee else 50_000)
        for a, c in moved_on.candidates.items()
    }
    for member in committee:
        assert await view(member, chain=moved_on).check(offer(committee, block)) is None
    # What the chain had at the block is what counts.
    moved_on.at_block[block.number] = dict(moved_on.candidates)
    assert await view(committee[0], chain=moved_on).check(offer(committee, block)) is not None


async def test_a_requester_may_skip_nodes_that_are_down_but_not_ones_that_are_up() -> None:
    full, block = await view(REQUESTER).draw(MODEL, 3, 0)
    skipped = full[0] if full[0] != REQUESTER else full[1]
    committee, _ = await view(REQUESTER, down=frozenset({skipped})).draw(MODEL, 3, 0)
    assert skipped not in committee
    member = next(a for a in committee if a != REQUESTER)
    sees_it_down = view(member, down=frozenset({skipped}))
    assert await sees_it_down.check(offer(committee, block)) is None
    sees_it_up = view(member)
    assert await sees_it_up.check(offer(committee, block)) == "committee_skips_live_node"


async def test_members_drop_a_committee_the_requester_chose() -> None:
    drawn, block = await view(REQUESTER).draw(MODEL, 3, 0)
    assert block is not None
    chain = MirrorChain(cursor=100)
    ranking = select_committee(chain.candidates.values(), unpaid_seed(block.hash, REQUESTER), 10, 0)
    chosen = ranking[3:6]  # in ranking order, but past three live nodes (its own, say)
    reordered = list(reversed(drawn))
    outsider = [drawn[0], drawn[1], Account.create().address]
    for committee, reason in (
        (chosen, "committee_skips_live_node"),
        (reordered, "committee_not_drawn"),
        (outsider, "committee_not_drawn"),
    ):
        for member in committee:
            if member in NODES:
                assert await view(member).check(offer(committee, block)) == reason


async def test_members_drop_a_committee_from_an_unknown_or_old_block() -> None:
    committee, block = await view(REQUESTER).draw(MODEL, 3, 0)
    assert block is not None
    member = view(committee[1])
    forged = wire.BlockRef(block.number, b"\xee" * 32)
    old = wire.BlockRef(block.number - 3 * SEED_EPOCH_BLOCKS, bytes([72]) * 32)
    not_boundary = wire.BlockRef(block.number + 1, block.hash)
    for bad in (forged, old, not_boundary):
        assert await member.check(offer(committee, bad)) == "unknown_committee_block"
    assert await member.check(offer(committee, None)) == "no_committee_block"


async def test_no_committee_without_a_recent_block_or_anyone_serving() -> None:
    class Unsynced(MirrorChain):
        async def seed_block(self) -> wire.BlockRef | None:
            return None

    peers = PeerTable(timeout_s=10)
    serving = ServingStatus((MODEL,), 0, 4)
    unsynced = Committees(REQUESTER, peers, lambda: serving, Unsynced(cursor=100))
    with pytest.raises(CommitteeUnavailable, match="no recent block"):
        await unsynced.draw(MODEL, 3, 0)
    nobody = Committees(REQUESTER, peers, lambda: ServingStatus((), 0, 4), MirrorChain(100))
    with pytest.raises(CommitteeUnavailable, match="serves model"):
        await nobody.draw(MODEL, 3, 0)


def test_recent_boundaries() -> None:
    # cursor 100: boundaries 96 (latest), 88 (the one before), 104 (a requester ahead)
    assert [n for n in range(70, 120) if is_recent_boundary(n, 100)] == [88, 96, 104]


def test_only_members_reporting_this_nodes_batch_invariant_build_compare_exactly() -> None:
    peers = PeerTable(timeout_s=10)
    build = "cuda NVIDIA H100 80GB HBM3; vllm 0.32.0; torch 2.9.0; bfloat16"
    same, other, silent = NODES[1], NODES[2], NODES[3]
    for address, reported in (
        (same, build),
        (other, build.replace("H100", "A100")),
        (silent, None),
    ):
        beat = wire.Heartbeat(1, "1.0", 2, [], [MODEL], 0, 4, build=reported)
        peers.heartbeat(f"peer-{address}", address, beat, sent_ms=1)
    chain = MirrorChain(cursor=100)
    mine = Committees(REQUESTER, peers, lambda: ServingStatus((MODEL,), 0, 4, build), chain)
    assert [mine.same_build(a) for a in (same, other, silent)] == [True, False, False]
    assert mine.same_build(same.lower())
    tolerant = Committees(REQUESTER, peers, lambda: ServingStatus((MODEL,), 0, 4), chain)
    assert not tolerant.same_build(same)  # this node runs no batch-invariant build
