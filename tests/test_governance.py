"""The JoyNet DAO on a real anvil chain: proposals, votes, the timelock, and every power it holds.

Proposals go the whole way (propose, vote, queue, execute) with the devnet's
settings (voting delay 1 s, period 120 s, late-quorum extension 30 s, timelock
delay 10 s, quorum 4 % of JOY's supply) and time travel (``Chain.advance``:
``evm_increaseTime`` and ``evm_mine``). The deployer holds almost all JOY; it
hands voters what they need. A quorum is 40M JOY of votes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount
from eth_utils.crypto import keccak
from web3 import Web3
from web3.contract import Contract
from web3.types import TxReceipt

from joynode.chain.artifacts import load_artifacts
from joynode.chain.deploy import ADMINISTERED, JOY
from tests.chain_fixtures import Chain, anvil_url, chain, deployed, dev_account
from tests.test_contracts import (
    OWNER,
    PRICE,
    REQUESTER,
    STRANGER,
    World,
    account,
    node_accounts,
    reverts,
    unauthorized,
)

__all__ = ["anvil_url", "chain", "deployed"]  # fixtures used by name below

QUORUM = 40_000_000 * JOY  # 4 % of the 1e9 JOY supply
VOTING_DELAY_S, VOTING_PERIOD_S, EXTENSION_S, TIMELOCK_S = 1, 120, 30, 10
ALICE, BOB, CAROL = 20, 21, 22  # voters: anvil's 20 dev accounts are the World's
GUARDIAN = 23
MAX_RUNTIME = 24_576  # EIP-170
IMPLEMENTATION_SLOT = int(
    "360894a13ba1a3210667c828492db98dca3e2076cc3735a920a3ca505d382bbc", 16
)  # ERC-1967
PENDING, ACTIVE, CANCELED, DEFEATED, SUCCEEDED, QUEUED, EXPIRED, EXECUTED = range(8)
AGAINST, FOR, ABSTAIN = range(3)


@dataclass(frozen=True)
class Proposal:
    targets: list[str]
    values: list[int]
    calldatas: list[bytes]
    description: str

    @property
    def args(self) -> tuple[list[str], list[int], list[bytes], bytes]:
        return self.targets, self.values, self.calldatas, keccak(text=self.description)


class Dao:
    """The governor, its timelock and the world they govern, with time travel."""

    def __init__(self, chain: Chain) -> None:
        self.chain = chain
        self.world = World.of(chain)
        self.governor = chain.contract("JoyGovernor")
        self.timelock = chain.contract("JoyTimelock")
        self.staked = chain.contract("StakedJoy")
        self.disputes = chain.contract("DisputeResolver")

    def fund(self, who: LocalAccount, amount: int, *, delegate: bool = True) -> None:
        """Ether for gas, ``amount`` JOY from the deployer; ``who`` delegates to itself."""
        self.chain.w3.provider.make_request(
            "anvil_setBalance", [who.address, hex(10**20)]  # type: ignore[arg-type]
        )
        self.world.tx(self.chain.admin, self.world.token.functions.transfer(who.address, amount))
        if delegate:
            self.world.tx(who, self.world.token.functions.delegate(who.address))

    def propose(
        self, actions: Sequence[tuple[Contract, str, Sequence[Any]]], description: str
    ) -> tuple[Proposal, int]:
        """Propose ``actions`` (contract, function, arguments) from Alice; the proposal id."""
        proposal = Proposal(
            [contract.address for contract, _, _ in actions],
            [0] * len(actions),
            [
                bytes.fromhex(contract.encode_abi(fn, args=list(args))[2:])
                for contract, fn, args in actions
            ],
            description,
        )
        receipt = self.world.tx(
            account(ALICE),
            self.governor.functions.propose(
                proposal.targets, proposal.values, proposal.calldatas, description
            ),
        )
        (created,) = self.world.events(self.governor, "ProposalCreated", receipt)
        return proposal, int(created["proposalId"])

    def vote(self, who: int, proposal_id: int, support: int = FOR) -> TxReceipt:
        return self.world.tx(account(who), self.governor.functions.castVote(proposal_id, support))

    def state(self, proposal_id: int) -> int:
        return int(self.governor.functions.state(proposal_id).call())

    def deadline(self, proposal_id: int) -> int:
        return int(self.governor.functions.proposalDeadline(proposal_id).call())

    def open_voting(self) -> None:
        self.chain.advance(VOTING_DELAY_S + 1)

    def close_voting(self, proposal_id: int) -> None:
        self.chain.advance(self.deadline(proposal_id) - self.world.now() + 1)

    def queue(self, proposal: Proposal) -> TxReceipt:
        return self.world.tx(account(BOB), self.governor.functions.queue(*proposal.args))

    def execute(self, proposal: Proposal) -> TxReceipt:
        return self.world.tx(account(CAROL), self.governor.functions.execute(*proposal.args))

    def pass_(self, actions: Sequence[tuple[Contract, str, Sequence[Any]]], description: str) -> Proposal:
        """Propose, vote through with Alice's quorum, queue and wait out the timelock."""
        proposal, proposal_id = self.propose(actions, description)
        self.open_voting()
        self.vote(ALICE, proposal_id)
        self.close_voting(proposal_id)
        self.queue(proposal)
        self.chain.advance(TIMELOCK_S)
        return proposal


@pytest.fixture
def dao(chain: Chain) -> Dao:
    dao = Dao(chain)
    dao.fund(account(ALICE), QUORUM)
    for who in (BOB, CAROL):  # they pay for gas, and hold a few votes
        dao.fund(account(who), 1000 * JOY)
    return dao


def proposal_error(proposal_id: int, current: int, expected: int) -> str:
    return (
        f"JoyGovernor.GovernorUnexpectedProposalState(proposalId={proposal_id}, current={current}, "
        f"expectedStates=0x{expected:064x})"
    )


def state_bits(*states: int) -> int:
    return sum(1 << s for s in states)


# ------------------------------------------------------------- the whole path


def test_a_fee_change_passes_and_the_next_job_pays_it_to_the_wei(dao: Dao) -> None:
    w, market = dao.world, dao.world.marketplace
    treasury = dao.chain.treasury
    proposal, pid = dao.propose(
        [(market, "setParameters", (500, 5000, 2000, treasury))], "JIP-1: fee 5 %"
    )
    assert dao.state(pid) == PENDING
    with reverts(proposal_error(pid, PENDING, state_bits(ACTIVE))):
        dao.vote(ALICE, pid)
    dao.open_voting()
    assert dao.state(pid) == ACTIVE
    receipt = dao.world.tx(
        account(ALICE), dao.governor.functions.castVoteWithReason(pid, FOR, "cheaper is not better")
    )
    (cast,) = w.events(dao.governor, "VoteCast", receipt)
    assert (cast["voter"], cast["support"], cast["weight"]) == (account(ALICE).address, FOR, QUORUM)
    assert cast["reason"] == "cheaper is not better"
    dao.vote(BOB, pid, AGAINST)
    with reverts(f"JoyGovernor.GovernorAlreadyCastVote(voter={account(ALICE).address.lower()})"):
        dao.vote(ALICE, pid, AGAINST)
    against, for_, abstain = dao.governor.functions.proposalVotes(pid).call()
    assert (against, for_, abstain) == (1000 * JOY, QUORUM, 0)
    dao.close_voting(pid)
    assert dao.state(pid) == SUCCEEDED
    receipt = dao.queue(proposal)
    assert dao.state(pid) == QUEUED
    eta = int(dao.governor.functions.proposalEta(pid).call())
    assert eta == w.now() + TIMELOCK_S
    operation = w.events(dao.timelock, "CallScheduled", receipt)[0]["id"]
    with reverts(
        f"JoyTimelock.TimelockUnexpectedOperationState(operationId=0x{operation.hex()}, "
        f"expectedStates=0x{state_bits(2):064x})"  # Ready
    ):
        dao.execute(proposal)  # the timelock delay has not passed
    assert market.functions.feeBps().call() == 250
    dao.chain.advance(TIMELOCK_S)
    dao.execute(proposal)
    assert dao.state(pid) == EXECUTED
    assert market.functions.feeBps().call() == 500

    # The next paid job pays 5 %: 50 JOY, 25 to the signers, 10 to the stakers, 15 to the treasury.
    req = w.pending([1000 * JOY] * 3)
    owner, treasury_before = account(OWNER).address, dao.chain.balance(treasury)
    owner_before = dao.chain.balance(owner)
    w.certify(req.request_id, req.committee[:2])
    assert dao.chain.balance(owner) - owner_before == PRICE - 50 * JOY
    per_token = 10 * JOY * 10**18 // (3000 * JOY)
    staker_share = 1000 * JOY * per_token // 10**18
    dust = 10 * JOY - per_token * 3000 * JOY // 10**18  # what per-token rounding leaves
    assert dao.chain.balance(treasury) - treasury_before == 15 * JOY + dust
    for node in req.committee:
        signer_share = 25 * JOY // 2 if node in req.committee[:2] else 0
        assert w.earned(node) == signer_share + staker_share
