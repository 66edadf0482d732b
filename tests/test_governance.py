"""The JoyNet DAO on a real anvil chain: proposals, votes, the timelock, and every power it holds.

Proposals go the whole way (propose, vote, queue, execute) with the devnet's
settings (voting delay 1 s, period 120 s, late-quorum extension 30 s, timelock
delay 10 s, quorum 4 % of JOY's supply) and time travel (``Chain.advance``:
``evm_increaseTime`` and ``evm_mine``). The deployer holds almost all JOY; it
hands voters what they need. A quorum is 40M JOY of votes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount
from eth_utils.crypto import keccak
from web3 import Web3
from web3.contract import Contract
from web3.types import RPCEndpoint, TxReceipt

from joynode.chain.artifacts import load_artifacts
from joynode.chain.deploy import (
    ADMINISTERED,
    JOY,
    UPGRADEABLE,
    Deployment,
    GovernanceParams,
    implementation_of,
)
from tests.chain_fixtures import (
    AnvilProcess,
    Chain,
    anvil_url,
    chain,
    deploy_chain,
    deployed,
    dev_account,
)
from tests.factories import make_home, run_cli
from tests.test_contracts import (
    OWNER,
    PRICE,
    REQUESTER,
    STRANGER,
    UNBONDING_S,
    World,
    account,
    by_address,
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
        set_balance = RPCEndpoint("anvil_setBalance")
        self.chain.w3.provider.make_request(set_balance, [who.address, hex(10**20)])
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

    def pass_(
        self, actions: Sequence[tuple[Contract, str, Sequence[Any]]], description: str
    ) -> Proposal:
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


def test_a_proposal_without_quorum_is_defeated(dao: Dao) -> None:
    _, pid = dao.propose(
        [(dao.world.marketplace, "setParameters", (0, 0, 0, dao.chain.treasury))], "free"
    )
    dao.open_voting()
    dao.vote(BOB, pid)  # 1000 JOY for, none against: a majority, far from a quorum
    dao.vote(CAROL, pid, ABSTAIN)
    dao.close_voting(pid)
    assert dao.state(pid) == DEFEATED
    assert dao.governor.functions.quorum(dao.world.now() - 1).call() == QUORUM


def test_a_late_quorum_extends_the_deadline(dao: Dao) -> None:
    _, pid = dao.propose(
        [(dao.world.marketplace, "setParameters", (300, 4000, 3000, dao.chain.treasury))], "late"
    )
    dao.open_voting()
    deadline = dao.deadline(pid)
    dao.chain.advance(deadline - dao.world.now() - 5)  # five seconds before the end
    receipt = dao.vote(ALICE, pid)  # this vote reaches the quorum
    (extended,) = dao.world.events(dao.governor, "ProposalExtended", receipt)
    voted_at = dao.world.now()
    assert dao.deadline(pid) == voted_at + EXTENSION_S > deadline
    assert extended["extendedDeadline"] == voted_at + EXTENSION_S
    dao.chain.advance(deadline - dao.world.now() + 1)  # past the first deadline: still open
    assert dao.state(pid) == ACTIVE
    dao.vote(BOB, pid, AGAINST)  # opponents have time to react
    dao.close_voting(pid)
    assert dao.state(pid) == SUCCEEDED


def test_fees_reach_the_treasury_and_only_a_proposal_spends_them(dao: Dao) -> None:
    w, treasury = dao.world, dao.chain.treasury
    req = w.pending([1000 * JOY] * 3)
    w.certify(req.request_id, req.committee[:2])
    held = dao.chain.balance(treasury)
    assert held >= 7_500 * JOY // 1000  # 30 % of the 25 JOY fee
    grantee = account(STRANGER).address
    deployer = dao.chain.admin.address.lower()
    with reverts(f"ERC20InsufficientAllowance(spender={deployer}, allowance=0, needed={held})"):
        # Nobody signs for the treasury: the deployer's key moves only its own JOY.
        w.tx(dao.chain.admin, w.token.functions.transferFrom(treasury, grantee, held))
    proposal = dao.pass_([(w.token, "transfer", (grantee, held))], "grant to a contributor")
    dao.execute(proposal)
    assert dao.chain.balance(grantee) == held
    assert dao.chain.balance(treasury) == 0


def test_an_upgrade_keeps_stakes_models_and_pending_requests(dao: Dao) -> None:
    w, chain = dao.world, dao.chain
    req = w.pending([1000 * JOY, 2000 * JOY, 3000 * JOY])

    def state() -> dict[str, Any]:
        return {
            "nodes": [w.node(n) for n in req.committee],
            "serving": w.serving(),
            "model": w.marketplace.functions.modelInfo(req.model).call(),
            "request": w.marketplace.functions.requestInfo(req.request_id).call(),
            "total": w.coordinator.functions.totalStaked().call(),
        }

    before = state()
    artifacts = load_artifacts()
    sender = chain.sender(chain.admin)  # anyone may deploy an implementation
    new_coordinator, _ = sender.deploy(artifacts["NodeCoordinator"])
    new_market, _ = sender.deploy(artifacts["ModelMarketplace"])
    old_coordinator = implementation_of(chain.w3, w.coordinator.address)
    # Nobody but the DAO upgrades: not the deployer, not a node.
    for who in (chain.admin, account(OWNER)):
        with reverts(unauthorized(who, "DEFAULT_ADMIN_ROLE")):
            w.tx(who, w.coordinator.functions.upgradeToAndCall(new_coordinator, b""))
    proposal = dao.pass_(
        [
            (w.coordinator, "upgradeToAndCall", (new_coordinator, b"")),
            (w.marketplace, "upgradeToAndCall", (new_market, b"")),
        ],
        "JIP-7: upgrade the coordinator and the marketplace",
    )
    assert implementation_of(chain.w3, w.coordinator.address) == old_coordinator
    dao.execute(proposal)
    assert implementation_of(chain.w3, w.coordinator.address) == new_coordinator
    assert implementation_of(chain.w3, w.marketplace.address) == new_market
    assert state() == before
    # The pending request settles through the new code, and the stakes still vote.
    w.certify(req.request_id, req.committee[:2])
    assert w.status(req.request_id) == 2
    for node in req.committee:
        assert dao.staked.functions.getVotes(node).call() == w.node(node)["stake"]
    # An implementation cannot be initialized on its own (and so never taken over).
    bare = chain.w3.eth.contract(
        address=Web3.to_checksum_address(new_coordinator), abi=artifacts["NodeCoordinator"].abi
    )
    owner = account(OWNER).address
    with reverts("InvalidInitialization()"):
        w.tx(account(OWNER), bare.functions.initialize(w.token.address, owner, owner, owner, 1, 60))


def certified_request(
    w: World, stakes: Sequence[int] = (1000 * JOY,) * 3
) -> tuple[bytes, list[str]]:
    """A request settled by a certificate of two of its three committee members."""
    req = w.pending(list(stakes))
    w.certify(req.request_id, req.committee[:2])
    return req.request_id, req.committee


def test_an_upheld_dispute_slashes_the_signers_and_refunds_the_requester(dao: Dao) -> None:
    w, chain = dao.world, dao.chain
    request_id, committee = certified_request(w)
    signers, bystander = committee[:2], committee[2]
    requester = account(REQUESTER)
    with reverts(f"DisputeResolver.WrongSigners(requestId=0x{request_id.hex()})"):
        w.tx(requester, dao.disputes.functions.dispute(request_id, committee, "wrong signers"))
    requester_before, treasury_before = (
        chain.balance(requester.address),
        chain.balance(chain.treasury),
    )
    receipt = w.tx(
        requester, dao.disputes.functions.dispute(request_id, signers, "the answer is made up")
    )
    (opened,) = w.events(dao.disputes, "DisputeOpened", receipt)
    assert (opened["disputer"], opened["bond"]) == (
        requester.address,
        0,
    )  # the requester posts no bond
    with reverts(f"DisputeResolver.AlreadyDisputed(requestId=0x{request_id.hex()})"):
        w.tx(account(OWNER), dao.disputes.functions.dispute(request_id, signers, "me too"))
    with reverts(unauthorized(chain.admin, "DEFAULT_ADMIN_ROLE")):
        w.tx(chain.admin, dao.disputes.functions.resolve(request_id, True))
    earned = {s: w.earned(s) for s in signers}

    dao.execute(dao.pass_([(dao.disputes, "resolve", (request_id, True))], "uphold the dispute"))
    assert chain.balance(requester.address) - requester_before == PRICE
    # Both stakes (2000 JOY) and the signers' unclaimed rewards go: the price to the
    # requester, the rest to the treasury.
    assert chain.balance(chain.treasury) - treasury_before == 2000 * JOY - PRICE + sum(
        earned.values()
    )
    for signer in signers:
        assert w.node(signer)["stake"] == 0
        assert not w.node(signer)["registered"]
        assert dao.staked.functions.getVotes(signer).call() == 0
    assert w.node(bystander)["stake"] == 1000 * JOY
    status, disputer, *_ = dao.disputes.functions.disputeOf(request_id).call()
    assert (status, disputer) == (2, requester.address)  # Upheld


def test_a_rejected_dispute_sends_the_bond_to_the_treasury(dao: Dao) -> None:
    w, chain = dao.world, dao.chain
    request_id, committee = certified_request(w)
    challenger = account(STRANGER)
    dao.fund(challenger, 500 * JOY, delegate=False)
    bond = int(dao.disputes.functions.bond().call())
    assert bond == 100 * JOY
    w.tx(challenger, w.token.functions.approve(dao.disputes.address, bond))
    w.tx(challenger, dao.disputes.functions.dispute(request_id, committee[:2], "looks wrong"))
    assert chain.balance(challenger.address) == 500 * JOY - bond
    # A signer leaving while the dispute is open unbonds, but its stake stays slashable.
    leaver = by_address()[committee[0]]
    w.tx(leaver, w.coordinator.functions.unstake(1000 * JOY))
    chain.advance(UNBONDING_S + 1)
    with reverts("NodeCoordinator.UnderDispute(openDisputes=1)"):
        w.tx(leaver, w.coordinator.functions.withdraw())
    treasury_before = chain.balance(chain.treasury)
    dao.execute(dao.pass_([(dao.disputes, "resolve", (request_id, False))], "reject the dispute"))
    assert chain.balance(chain.treasury) - treasury_before == bond
    assert chain.balance(challenger.address) == 500 * JOY - bond
    assert [w.node(n)["stake"] for n in committee[1:]] == [1000 * JOY] * 2
    w.tx(leaver, w.coordinator.functions.withdraw())  # rejected: the stake is free
    assert w.node(leaver.address)["unbonding"] == 0
    with reverts(f"DisputeResolver.NotOpen(requestId=0x{request_id.hex()})"):
        chain.as_timelock(dao.disputes.functions.resolve(request_id, True))


def test_a_dispute_the_dao_leaves_unresolved_expires(dao: Dao) -> None:
    w, chain = dao.world, dao.chain
    request_id, committee = certified_request(w)
    challenger = account(STRANGER)
    dao.fund(challenger, 500 * JOY, delegate=False)
    w.tx(challenger, w.token.functions.approve(dao.disputes.address, 100 * JOY))
    w.tx(challenger, dao.disputes.functions.dispute(request_id, committee[:2], "looks wrong"))
    _, _, opened_at, *_ = dao.disputes.functions.disputeOf(request_id).call()
    expires_at = opened_at + int(dao.disputes.functions.resolutionPeriod().call())
    with reverts(f"DisputeResolver.NotExpired(expiresAt={expires_at})"):
        w.tx(account(OWNER), dao.disputes.functions.expire(request_id))
    assert [w.coordinator.functions.openDisputes(n).call() for n in committee] == [1, 1, 0]
    chain.advance_to(expires_at + 1)
    receipt = w.tx(account(OWNER), dao.disputes.functions.expire(request_id))  # anyone
    assert w.events(dao.disputes, "DisputeExpired", receipt)[0]["requestId"] == request_id
    assert chain.balance(challenger.address) == 500 * JOY  # the bond back
    assert [w.coordinator.functions.openDisputes(n).call() for n in committee] == [0, 0, 0]
    assert dao.disputes.functions.disputeOf(request_id).call()[0] == 4  # Expired
    with reverts(f"DisputeResolver.NotOpen(requestId=0x{request_id.hex()})"):
        chain.as_timelock(dao.disputes.functions.resolve(request_id, True))


def test_a_dispute_must_come_within_the_window(dao: Dao) -> None:
    w = dao.world
    request_id, committee = certified_request(w)
    window = int(dao.disputes.functions.disputeWindow().call())
    certified_at, _ = dao.world.poi.functions.certified(request_id).call()
    dao.chain.advance(window + 1)
    with reverts(f"DisputeResolver.WindowClosed(closedAt={certified_at + window})"):
        w.tx(account(REQUESTER), dao.disputes.functions.dispute(request_id, committee[:2], "late"))
    unknown = keccak(b"never certified")
    with reverts(f"DisputeResolver.NotCertified(requestId=0x{unknown.hex()})"):
        w.tx(account(REQUESTER), dao.disputes.functions.dispute(unknown, committee[:2], "what"))


# ------------------------------------------------------- no admin key is left


def roles_of(contract: Contract) -> dict[str, bytes]:
    """Every role a contract declares: DEFAULT_ADMIN_ROLE and each ``*_ROLE`` constant."""
    abi: list[dict[str, Any]] = [dict(entry) for entry in contract.abi]
    names = [
        entry["name"]
        for entry in abi
        if entry.get("type") == "function"
        and entry["name"].endswith("_ROLE")
        and not entry["inputs"]
    ]
    return {name: bytes(getattr(contract.functions, name)().call()) for name in names}


def test_no_externally_owned_account_holds_any_role(chain: Chain) -> None:
    externally_owned = [dev_account(i).address for i in range(20)]  # deployer, nodes, users
    timelock, governor = chain.treasury, chain.deployment.addresses["JoyGovernor"]
    for name in ADMINISTERED:
        contract = chain.contract(name)
        roles = roles_of(contract)
        assert "DEFAULT_ADMIN_ROLE" in roles
        for role_name, role_id in roles.items():
            for holder in externally_owned:
                assert not contract.functions.hasRole(role_id, holder).call(), (
                    name,
                    role_name,
                    holder,
                )
        assert contract.functions.hasRole(roles["DEFAULT_ADMIN_ROLE"], timelock).call(), name
    timelock_roles = roles_of(chain.contract("JoyTimelock"))
    holds = chain.contract("JoyTimelock").functions.hasRole
    assert holds(timelock_roles["PROPOSER_ROLE"], governor).call()
    assert holds(timelock_roles["CANCELLER_ROLE"], governor).call()
    assert holds(timelock_roles["EXECUTOR_ROLE"], governor).call()
    assert not holds(timelock_roles["EXECUTOR_ROLE"], "0x" + "00" * 20).call()
    assert chain.deployment.treasury == timelock
    for name in ("NodeCoordinator", "ModelMarketplace"):
        assert chain.contract(name).functions.treasury().call() == timelock


def test_every_former_admin_function_reverts_for_the_deployer(dao: Dao) -> None:
    w, chain = dao.world, dao.chain
    deployer = chain.admin
    treasury = chain.treasury
    admin_calls: list[Any] = [
        w.coordinator.functions.setParameters(1, 3600, 0, treasury),
        w.marketplace.functions.setParameters(0, 0, 0, deployer.address),
        w.poi.functions.setParameters(0, 0),
        dao.disputes.functions.setParameters(3600, 1, 3600),
        dao.disputes.functions.resolve(b"\0" * 32, True),
    ]
    for name in ADMINISTERED:
        contract = chain.contract(name)
        admin_role = contract.functions.DEFAULT_ADMIN_ROLE().call()
        admin_calls.append(contract.functions.grantRole(admin_role, deployer.address))
        if name not in ("StakedJoy", "JoyTimelock"):  # the upgradeable ones
            admin_calls.append(contract.functions.updateGovernance(deployer.address))
            admin_calls.append(contract.functions.upgradeToAndCall(deployer.address, b""))
    for call in admin_calls:
        with reverts(unauthorized(deployer, "DEFAULT_ADMIN_ROLE")):
            w.tx(deployer, call)
    with reverts(unauthorized(deployer, "MINTER_ROLE")):
        w.tx(deployer, dao.staked.functions.mint(deployer.address, 1))
    only_timelock = f"TimelockUnauthorizedCaller(caller={deployer.address.lower()})"
    with reverts(f"JoyTimelock.{only_timelock}"):
        w.tx(deployer, dao.timelock.functions.updateDelay(3600))
    with reverts(unauthorized(deployer, "PROPOSER_ROLE")):
        w.tx(
            deployer,
            dao.timelock.functions.schedule(deployer.address, 0, b"", b"\0" * 32, b"\0" * 32, 3600),
        )
    only_governance = f"JoyGovernor.GovernorOnlyExecutor(account={deployer.address.lower()})"
    for call in (
        dao.governor.functions.setVotingPeriod(10),
        dao.governor.functions.updateQuorumNumerator(1),
        dao.governor.functions.setProposalGuardian(deployer.address),
        dao.governor.functions.relay(deployer.address, 0, b""),
    ):
        with reverts(only_governance):
            w.tx(deployer, call)


@pytest.mark.parametrize(
    ("target", "function", "args", "parameter"),
    [
        ("ModelMarketplace", "setParameters", (1001, 4000, 3000, "treasury"), "feeBps"),
        ("ModelMarketplace", "setParameters", (250, 6001, 4000, "treasury"), "split"),
        ("NodeCoordinator", "setParameters", (0, 3600, 1000, "treasury"), "minStake"),
        ("NodeCoordinator", "setParameters", (10**20, 59, 1000, "treasury"), "unbondingDelay"),
        ("DisputeResolver", "setParameters", (3600, 0, 3600), "bond"),
        ("DisputeResolver", "setParameters", (3600, 1, 91 * 86400), "resolutionPeriod"),
        ("JoyGovernor", "setVotingPeriod", (31 * 86400,), "votingPeriod"),
        ("JoyGovernor", "updateQuorumNumerator", (51,), "quorumPercent"),
        ("JoyGovernor", "setProposalThreshold", (10_000_001 * JOY,), "proposalThreshold"),
        ("JoyTimelock", "updateDelay", (9,), "timelockDelay"),
    ],
)
def test_an_out_of_bounds_parameter_passes_the_vote_and_reverts_at_execution(
    dao: Dao, target: str, function: str, args: tuple[Any, ...], parameter: str
) -> None:
    contract = dao.chain.contract(target)
    args = tuple(dao.chain.treasury if a == "treasury" else a for a in args)
    proposal = dao.pass_([(contract, function, args)], f"ruinous {parameter}")
    with reverts(f"OutOfBounds(parameter={parameter})"):
        dao.execute(proposal)


def test_every_runtime_fits_the_contract_size_limit(chain: Chain) -> None:
    sizes = {}
    for name, address in chain.deployment.addresses.items():
        sizes[name] = len(chain.w3.eth.get_code(Web3.to_checksum_address(address)))
        if name in UPGRADEABLE:
            implementation = implementation_of(chain.w3, address)
            sizes[f"{name} (implementation)"] = len(chain.w3.eth.get_code(implementation))
    assert len(sizes) == 19  # 12 deployed, 7 of them proxies with an implementation
    assert all(0 < size <= MAX_RUNTIME for size in sizes.values()), sizes


# ------------------------------------------------------------------ the guardian


def test_the_guardian_cancels_only_queued_proposals_and_the_dao_replaces_it(dao: Dao) -> None:
    w, governor = dao.world, dao.governor
    guardian = account(GUARDIAN)
    dao.fund(guardian, 0, delegate=False)
    with reverts(f"JoyGovernor.GovernorOnlyExecutor(account={guardian.address.lower()})"):
        w.tx(guardian, governor.functions.setProposalGuardian(guardian.address))
    dao.execute(dao.pass_([(governor, "setProposalGuardian", (guardian.address,))], "a council"))
    assert governor.functions.proposalGuardian().call() == guardian.address

    market = w.marketplace
    proposal, pid = dao.propose(
        [(market, "setParameters", (1000, 4000, 3000, dao.chain.treasury))], "fee 10 %"
    )
    not_yours = (
        f"JoyGovernor.GovernorUnableToCancel(proposalId={pid}, account={guardian.address.lower()})"
    )
    with reverts(not_yours):  # Pending: voters decide, not the council
        w.tx(guardian, governor.functions.cancel(*proposal.args))
    dao.open_voting()
    dao.vote(ALICE, pid)
    with reverts(not_yours):  # Active
        w.tx(guardian, governor.functions.cancel(*proposal.args))
    dao.close_voting(pid)
    with reverts(not_yours):  # Succeeded
        w.tx(guardian, governor.functions.cancel(*proposal.args))
    dao.queue(proposal)
    receipt = w.tx(guardian, governor.functions.cancel(*proposal.args))  # Queued: a captured vote
    assert w.events(governor, "ProposalCanceled", receipt)[0]["proposalId"] == pid
    assert dao.state(pid) == CANCELED
    dao.chain.advance(TIMELOCK_S)
    with reverts(
        f"JoyGovernor.GovernorUnexpectedProposalState(proposalId={pid}, current={CANCELED}, "
        f"expectedStates=0x{state_bits(QUEUED):064x})"
    ):
        dao.execute(proposal)
    assert market.functions.feeBps().call() == 250
    # The guardian holds no other power, and the DAO removes it.
    with reverts(unauthorized(guardian, "DEFAULT_ADMIN_ROLE")):
        w.tx(guardian, market.functions.setParameters(1000, 4000, 3000, dao.chain.treasury))
    dao.execute(dao.pass_([(governor, "setProposalGuardian", ("0x" + "00" * 20,))], "no council"))
    assert governor.functions.proposalGuardian().call() == "0x" + "00" * 20


# ---------------------------------------------------------------- stake votes


def test_staked_joy_votes_for_its_staker(dao: Dao) -> None:
    w = dao.world
    node = node_accounts(1)[0]
    votes = dao.governor.functions.getVotes
    w.join(node, 30_000 * JOY)
    dao.chain.advance(1)
    # The node never delegated its JOY: its votes are its stake, delegated on the first stake.
    assert dao.staked.functions.delegates(node.address).call() == node.address
    assert votes(node.address, w.now() - 1).call() == 30_000 * JOY
    w.tx(node, w.coordinator.functions.unstake(10_000 * JOY))
    dao.chain.advance(1)
    assert votes(node.address, w.now() - 1).call() == 20_000 * JOY
    with reverts("StakedJoy.NotTransferable()"):
        w.tx(node, dao.staked.functions.transfer(account(ALICE).address, 1))
    # Delegating stake votes moves them, as JOY's do.
    w.tx(node, dao.staked.functions.delegate(account(BOB).address))
    dao.chain.advance(1)
    assert votes(node.address, w.now() - 1).call() == 0
    assert votes(account(BOB).address, w.now() - 1).call() == 1000 * JOY + 20_000 * JOY


def test_governance_moves_to_a_new_timelock_only_through_the_old_one(dao: Dao) -> None:
    w, market = dao.world, dao.world.marketplace
    successor = account(STRANGER).address  # in real life, the timelock of a new governor
    admin_role = market.functions.DEFAULT_ADMIN_ROLE().call()
    with reverts(unauthorized(dao.chain.admin, "DEFAULT_ADMIN_ROLE")):
        w.tx(dao.chain.admin, market.functions.updateGovernance(successor))
    dao.execute(dao.pass_([(market, "updateGovernance", (successor,))], "a new governor"))
    assert market.functions.hasRole(admin_role, successor).call()
    assert not market.functions.hasRole(admin_role, dao.chain.treasury).call()


# ------------------------------------------------------------- joynode deploy


def test_joynode_deploy_leaves_the_nodes_account_no_role(tmp_path: Path) -> None:
    anvil = AnvilProcess()
    url = anvil.start()
    try:
        home = make_home(tmp_path / "node")
        home.set("chain", "mode", '"rpc"')
        home.set("chain", "rpc_url", f'"{url}"')
        node = home.key.address
        w3 = Web3(Web3.HTTPProvider(url))
        w3.provider.make_request(RPCEndpoint("anvil_setBalance"), [node, hex(10**20)])
        guardian = dev_account(GUARDIAN).address
        config = str(home.config_path)

        deployed = run_cli("deploy", "--config", config, "--guardian", guardian, timeout=120)
        assert deployed.returncode == 0, deployed.stderr
        deployment = Deployment.read(home.config.chain.deployment_file)
        assert json.loads(deployed.stdout)["treasury"] == deployment.addresses["JoyTimelock"]
        assert deployment.deployer == node
        governor = deployment.contract(w3, "JoyGovernor")
        assert governor.functions.proposalGuardian().call() == guardian
        assert governor.functions.votingPeriod().call() == VOTING_PERIOD_S  # the devnet's
        for name in ADMINISTERED:
            contract = deployment.contract(w3, name)
            for role_id in roles_of(contract).values():
                assert not contract.functions.hasRole(role_id, node).call(), name

        again = run_cli("deploy", "--config", config)
        assert again.returncode == 0
        assert "already deployed" in again.stdout
        wrong = run_cli("deploy", "--config", config, "--force", "--guardian", "nobody")
        assert wrong.returncode == 2
        assert wrong.stderr == "joynode: --guardian: not an address: nobody\n"
    finally:
        anvil.stop()


def test_a_real_network_gets_production_settings_and_refuses_the_devnets() -> None:
    anvil = AnvilProcess(chain_id=1337)
    try:
        chain = deploy_chain(anvil.start())
        governor = chain.contract("JoyGovernor")
        production = GovernanceParams.production()
        assert governor.functions.votingDelay().call() == production.voting_delay_s
        assert governor.functions.votingPeriod().call() == 7 * 86400
        assert governor.functions.proposalThreshold().call() == 1_000_000 * JOY
        assert chain.contract("JoyTimelock").functions.getMinDelay().call() == 2 * 86400
        assert chain.contract("NodeCoordinator").functions.unbondingDelay().call() == 7 * 86400
        # Off the devnet's chain id, the devnet's short periods are out of bounds.
        artifacts = load_artifacts()
        sender = chain.sender(chain.admin)
        with reverts("OutOfBounds(parameter=timelockDelay)"):
            sender.deploy(artifacts["JoyTimelock"], TIMELOCK_S, [], [], chain.admin.address)
        devnet = GovernanceParams.devnet()
        settings = (
            devnet.voting_delay_s,
            devnet.voting_period_s,
            0,
            4,
            devnet.late_quorum_extension_s,
            devnet.guardian,
        )
        token, staked, timelock = (
            chain.deployment.addresses[n] for n in ("JoyToken", "StakedJoy", "JoyTimelock")
        )
        with reverts("OutOfBounds(parameter=votingDelay)"):
            sender.deploy(artifacts["JoyGovernor"], token, staked, timelock, settings)
    finally:
        anvil.stop()
