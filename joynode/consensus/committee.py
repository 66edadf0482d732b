"""Who runs a job: an unpaid committee the requester cannot choose, checked by its members;
and which members share this node's exact build (``same_build``, for prefill checks).

A paid job's committee is the marketplace's (``drawCommittee``, from a block
after the request). An unpaid job has no transaction, so with a chain its seed
is ``unpaid_seed``: the hash of a recent epoch boundary block (``BlockRef`` in
the offer; members accept only the last boundaries their own watcher knows)
and the requester's address. No nonce, prompt or deadline enters the seed, so a
requester cannot search for a committee; it can choose between the two most
recent boundaries at most. The ranking is ``select_committee`` over the
registered nodes (stake x reputation as of that block, read from the chain at
it, so that settlements since cannot make two nodes rank apart; nodes that
registered since, as the mirror has them); the committee is
its first ``k`` nodes that serve the model and are up as the requester sees
them. A member accepts an offer only if the committee is in ranking order and
every node ranked above its last member that was left out is, as the member
sees it, down or not serving the model: a requester may skip nodes that are
down, not the ones it dislikes. (Views of who is up differ for a heartbeat or
two; an offer caught in that window is dropped by the members who disagree.)
The request id binds the committee, the block and the deadlines.
A prepaid job's committee is drawn the same way for its client's address, which
the client signs with the committee (so the relaying node cannot choose either).

The price of no choice: one requester's unpaid jobs go to the same committee
until the next boundary (``SEED_EPOCH_BLOCKS`` blocks). Without a chain there
is no agreed block nor registry: the seed is the requester's address and nonce
and members do not check the committee.
"""

from __future__ import annotations

from collections.abc import Callable

from eth_utils.address import to_checksum_address

from joynode import wire
from joynode.abc import CommitteeChain
from joynode.chain.committee import Candidate, chainless_seed, select_committee, unpaid_seed
from joynode.messages import ServingStatus
from joynode.p2p.peers import PeerState, PeerTable


class CommitteeUnavailable(Exception):
    """No committee can be drawn now (nobody serves the model, or the chain is not synced)."""


class Committees:
    """Drawing unpaid committees (as the requester) and checking them (as a member)."""

    def __init__(
        self,
        address: str,
        peers: PeerTable,
        serving_status: Callable[[], ServingStatus],
        chain: CommitteeChain | None,
    ) -> None:
        self._address = to_checksum_address(address)
        self._peers = peers
        self._serving_status = serving_status
        self._chain = chain

    async def draw(
        self, model_id: str, k: int, nonce: int, requester: str | None = None
    ) -> tuple[list[str], wire.BlockRef | None]:
        """The committee of an unpaid job of ``requester`` (default: this node; a prepaid
        job's: its client), and the block it was drawn from."""
        requester = to_checksum_address(requester or self._address)
        up = self._up_and_serving(model_id)
        if self._chain is None:
            seed = chainless_seed(requester, nonce)
            committee = select_committee([Candidate(a, 1, 1) for a in up], seed, k, 0)
            block = None
        else:
            block = await self._chain.seed_block()
            if block is None:
                raise CommitteeUnavailable(
                    "the chain mirror holds no recent block yet to draw a committee from"
                )
            ranking = await self._ranking(block, requester)
            committee = [a for a in ranking if a in up][:k]
        if not committee:
            raise CommitteeUnavailable(
                f"no healthy node (this one included) serves model {model_id}"
            )
        return committee, block

    async def check(self, offer: wire.JobOffer) -> str | None:
        """Why a member must drop this unpaid (or prepaid) offer's committee; None if it was
        drawn fairly."""
        if self._chain is None:
            return None
        block = offer.committee_block
        if block is None:
            return "no_committee_block"
        if await self._chain.recent_block_hash(block.number) != block.hash:
            return "unknown_committee_block"
        requester = offer.prepaid.client if offer.prepaid is not None else offer.requester
        ranking = await self._ranking(block, requester)
        position = {address.lower(): rank for rank, address in enumerate(ranking)}
        ranks = [position.get(a.lower(), -1) for a in offer.committee]
        if -1 in ranks or ranks != sorted(ranks):
            return "committee_not_drawn"
        chosen = set(ranks)
        up = {a.lower() for a in self._up_and_serving(offer.model)}
        skipped = [ranking[r] for r in range(ranks[-1]) if r not in chosen]
        if any(a.lower() in up for a in skipped):
            return "committee_skips_live_node"
        return None

    def same_build(self, member: str) -> bool:
        """Whether ``member``'s heartbeat reports this node's batch-invariant build (so the two
        may compare outputs exactly); never for a build this node does not report."""
        mine = self._serving_status().build
        if mine is None:
            return False
        return any(
            r.build == mine and r.address.lower() == member.lower() and r.state is PeerState.UP
            for r in self._peers.records()
        )

    async def _ranking(self, block: wire.BlockRef, requester: str) -> list[str]:
        """Every registered node, in the order the committees of ``requester`` drawn from
        ``block`` take them (weights as of that block, the same on every node)."""
        assert self._chain is not None
        candidates = await self._chain.committee_candidates(block)
        seed = unpaid_seed(block.hash, requester)
        return select_committee(candidates.values(), seed, len(candidates), 0)

    def _up_and_serving(self, model_id: str) -> list[str]:
        """The nodes this one sees up and serving ``model_id`` (itself too)."""
        up: list[str] = [self._address] if model_id in self._serving_status().models else []
        for record in self._peers.records():
            if record.state is PeerState.UP and model_id in record.models:
                up.append(to_checksum_address(record.address))
        return up
