"""``gov.*`` control methods: the node's account in the JoyNet DAO.

Not an actor (nothing runs between calls): the methods read the proposals the
chain watcher mirrors (``joynode.governance.mirror``) and send transactions
through the chain actor (``GovernanceChain``), one at a time with its nonces.
Votes are JOY votes plus stJOY votes: a node's stake votes by itself (stJOY
delegates to its holder at the first stake), JOY it holds votes once delegated
(``gov.delegate``). Every revert comes back explained in words with what the
mirror knows (``proposal is Pending, voting opens at ...``), as a
``GOVERNANCE_ERROR``.
"""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from web3 import Web3
from web3.logs import DISCARD

from joynode.abc import GovernanceChain
from joynode.chain.artifacts import load_artifacts
from joynode.chain.deploy import Deployment
from joynode.chain.sender import TransactionFailed
from joynode.control.jsonrpc import INVALID_PARAMS, RpcError
from joynode.control.methods import ControlMethod, ControlSession, NoParams
from joynode.governance.actions import (
    MAX_ACTIONS,
    ActionCodec,
    ActionSpec,
    ProposalError,
    ProposalSpec,
    read_proposal_file,
)
from joynode.governance.display import joy, when
from joynode.governance.mirror import (
    GOVERNOR,
    SUPPORT,
    Proposal,
    ProposalState,
    Vote,
    chain_now,
    find_proposals,
    list_proposals,
    votes_of,
)
from joynode.state import StateStore

GOVERNANCE_ERROR = -32080  # JSON-RPC application error: the governor or timelock refused
DUE_GAS = 3_000_000  # a gas limit (only what is used is paid) when the estimate was too early
TIMELOCK_STATES = ("Unset", "Waiting", "Ready", "Done")  # TimelockController.OperationState


def _address(value: str) -> str:
    if not Web3.is_address(value):
        raise ValueError(f"not an Ethereum address: {value!r}")
    return str(Web3.to_checksum_address(value))


Address = Annotated[str, pydantic.AfterValidator(_address)]
Reference = Annotated[
    str,
    pydantic.Field(
        pattern=r"^[0-9]{4,78}$",
        description="a proposal id (decimal), or the first digits of one this node has mirrored",
    ),
]


class DelegateParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    to: Address | None = pydantic.Field(None, description="the delegatee (default: this node)")


class ProposeParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    file: str | None = pydantic.Field(None, description="an absolute path to a proposal TOML file")
    description: str | None = pydantic.Field(None, min_length=1, max_length=20_000)
    actions: list[ActionSpec] | None = pydantic.Field(None, min_length=1, max_length=MAX_ACTIONS)

    @pydantic.model_validator(mode="after")
    def _file_or_content(self) -> ProposeParams:
        if (self.file is None) == (self.description is None and self.actions is None):
            raise ValueError("give either file or description and actions")
        if self.file is not None and not Path(self.file).is_absolute():
            raise ValueError("file: must be an absolute path")
        if self.file is None and (self.description is None or self.actions is None):
            raise ValueError("a proposal needs both description and actions")
        return self

    def spec(self) -> ProposalSpec:
        if self.file is not None:
            return read_proposal_file(Path(self.file))
        return ProposalSpec(description=self.description or "", actions=self.actions or [])


class ListParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    limit: int = pydantic.Field(50, ge=1, le=1000)


class ProposalParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    proposal: Reference


class VoteParams(ProposalParams):
    support: Literal["for", "against", "abstain"]
    reason: str = pydantic.Field("", max_length=2000)


def deployment_with(chain: GovernanceChain, name: str) -> Deployment:
    """The chain actor's deployment, if it is connected and has contract ``name``."""
    deployment = chain.deployment
    if deployment is None:
        raise RpcError(GOVERNANCE_ERROR, "the chain is not connected yet")
    if name not in deployment.addresses:
        raise RpcError(GOVERNANCE_ERROR, f"this deployment has no {name}")
    return deployment


class GovernanceService:
    """The ``gov.*`` methods of one node (its account, its mirror of the governor)."""

    def __init__(self, state: StateStore, chain: GovernanceChain) -> None:
        self._state = state
        self._chain = chain
        self._codec: tuple[Deployment, ActionCodec] | None = None

    # ---- what the chain and the mirror say

    def _deployment(self) -> Deployment:
        return deployment_with(self._chain, GOVERNOR)

    def _contract(self, name: str) -> Any:
        return self._deployment().contract(self._chain.w3, name)

    def codec(self) -> ActionCodec:
        deployment = self._deployment()
        if self._codec is None or self._codec[0] is not deployment:
            artifacts = load_artifacts().contracts
            abis = {n: artifacts[n].abi for n in deployment.addresses if n in artifacts}
            self._codec = (deployment, ActionCodec(deployment.addresses, abis))
        return self._codec[1]

    async def _find(self, reference: str) -> tuple[list[Proposal], float]:
        def read(conn: sqlite3.Connection) -> tuple[list[Proposal], float]:
            return find_proposals(conn, reference), chain_now(conn)

        return await self._state.read(read)

    async def _mirrored(self, reference: str) -> tuple[Proposal, float]:
        found, now = await self._find(reference)
        if len(found) > 1:
            ids = ", ".join(str(p.proposal_id) for p in found)
            raise RpcError(GOVERNANCE_ERROR, f"{reference} matches several proposals: {ids}")
        if not found:
            raise RpcError(
                GOVERNANCE_ERROR,
                f"no proposal {reference} in this node's mirror of the governor (one proposed "
                "just now shows up once the watcher has seen its block)",
            )
        return found[0], now

    async def _proposal_id(self, reference: str) -> tuple[int, Proposal | None, float]:
        """A proposal by reference; one not mirrored (yet) by its whole id, for the governor
        to judge."""
        found, now = await self._find(reference)
        if len(found) == 1:
            return found[0].proposal_id, found[0], now
        if not found and len(reference) >= 20:
            return int(reference), None, now
        proposal, now = await self._mirrored(reference)  # several, or none: raises
        return proposal.proposal_id, proposal, now

    async def _send(self, call: Any, proposal: Proposal | None, now: float) -> Any:
        try:
            return await self._chain.transact(call)
        except TransactionFailed as exc:
            failure = exc
        if failure.revert is not None and failure.revert.name == "TimelockUnexpectedOperationState":
            proposal = await self._with_live_eta(proposal)  # the mirror may lag a queue
        if due_by_now(failure, proposal, now):
            # Estimated against a latest block older than now (a chain that mines only on
            # demand): the transaction itself lands in a block of now.
            try:
                return await self._chain.transact(call, gas=DUE_GAS)
            except TransactionFailed as exc:
                failure = exc
        raise RpcError(GOVERNANCE_ERROR, explain(failure, proposal, now))

    async def _with_live_eta(self, proposal: Proposal | None) -> Proposal | None:
        if proposal is None:
            return None
        eta_of = self._contract(GOVERNOR).functions.proposalEta(proposal.proposal_id).call
        views = replace(proposal.views, eta=int(await self._chain.call(eta_of)))
        return replace(proposal, views=views)

    # ---- the methods

    async def status(self) -> dict[str, Any]:
        deployment = self._deployment()
        me = self._chain.address
        governor, timelock = self._contract(GOVERNOR), self._contract("JoyTimelock")
        joy_token, staked = self._contract("JoyToken"), self._contract("StakedJoy")

        def read() -> dict[str, Any]:
            g = governor.functions
            return {
                "governor": deployment.addresses[GOVERNOR],
                "timelock": deployment.addresses["JoyTimelock"],
                "account": me,
                "settings": {
                    "voting_delay_s": int(g.votingDelay().call()),
                    "voting_period_s": int(g.votingPeriod().call()),
                    "proposal_threshold": str(g.proposalThreshold().call()),
                    "quorum_percent": int(g.quorumNumerator().call()),
                    "late_quorum_extension_s": int(g.lateQuorumVoteExtension().call()),
                    "timelock_delay_s": int(timelock.functions.getMinDelay().call()),
                    "guardian": str(g.proposalGuardian().call()),
                },
                "balances": {
                    "joy": str(joy_token.functions.balanceOf(me).call()),
                    "staked": str(staked.functions.balanceOf(me).call()),
                },
                "delegates": {
                    "joy": str(joy_token.functions.delegates(me).call()),
                    "staked": str(staked.functions.delegates(me).call()),
                },
                "votes": _votes(joy_token, staked, me),
            }

        status = await self._chain.call(read)

        def count(conn: sqlite3.Connection) -> dict[str, int]:
            now = chain_now(conn)
            return dict(Counter(p.state(now).label for p in list_proposals(conn, 10_000)))

        return {**status, "proposals": await self._state.read(count)}

    async def delegate(self, to: str | None) -> dict[str, Any]:
        me = self._chain.address
        delegatee = to or me
        joy_token, staked = self._contract("JoyToken"), self._contract("StakedJoy")
        txs = []
        for token in (joy_token, staked):
            current = str(await self._chain.call(token.functions.delegates(me).call))
            if current.lower() != delegatee.lower():
                receipt = await self._send(token.functions.delegate(delegatee), None, time.time())
                txs.append(receipt["transactionHash"].to_0x_hex())
        votes = await self._chain.call(_votes, joy_token, staked, delegatee)
        return {"account": me, "delegatee": delegatee, "txs": txs, "votes": votes}

    async def propose(self, spec: ProposalSpec) -> dict[str, Any]:
        codec = self.codec()
        try:
            actions = codec.encode(spec)
        except ProposalError as exc:
            raise RpcError(INVALID_PARAMS, str(exc)) from None
        governor = self._contract(GOVERNOR)
        receipt = await self._send(
            governor.functions.propose(
                [a.target for a in actions],
                [a.value for a in actions],
                [a.calldata for a in actions],
                spec.description,
            ),
            None,
            time.time(),
        )
        created = governor.events.ProposalCreated().process_receipt(receipt, errors=DISCARD)[0]
        args = created["args"]
        return {
            "proposal_id": str(args["proposalId"]),
            "tx": receipt["transactionHash"].to_0x_hex(),
            "voting_starts": int(args["voteStart"]) + 1,
            "voting_ends": int(args["voteEnd"]),
            "actions": [codec.describe(a.target, a.value, a.calldata) for a in actions],
        }

    async def proposals(self, limit: int) -> list[dict[str, Any]]:
        def read(conn: sqlite3.Connection) -> tuple[list[Proposal], float]:
            return list_proposals(conn, limit), chain_now(conn)

        proposals, now = await self._state.read(read)
        return [_summary(p, now) for p in proposals]

    async def show(self, reference: str) -> dict[str, Any]:
        proposal, now = await self._mirrored(reference)
        votes = await self._state.read(lambda c: votes_of(c, proposal.proposal_id))
        codec = self.codec()
        return {
            **_summary(proposal, now),
            "description": proposal.description,
            "actions": [
                codec.describe(t, v, c)
                for t, v, c in zip(
                    proposal.targets, proposal.amounts, proposal.calldatas, strict=False
                )
            ],
            "voters": [_vote(v) for v in votes],
            "block": proposal.block,
            "tx": proposal.tx_hash,
            "now": int(now),
        }

    async def vote(self, params: VoteParams) -> dict[str, Any]:
        proposal_id, proposal, now = await self._proposal_id(params.proposal)
        governor = self._contract(GOVERNOR)
        support = SUPPORT.index(params.support)
        call = (
            governor.functions.castVoteWithReason(proposal_id, support, params.reason)
            if params.reason
            else governor.functions.castVote(proposal_id, support)
        )
        receipt = await self._send(call, proposal, now)
        cast = governor.events.VoteCast().process_receipt(receipt, errors=DISCARD)[0]["args"]
        result: dict[str, Any] = {
            "proposal_id": str(proposal_id),
            "support": params.support,
            "weight": str(cast["weight"]),
            "tx": receipt["transactionHash"].to_0x_hex(),
        }
        if int(cast["weight"]) == 0:
            result["note"] = (
                "this vote weighs nothing: votes count as delegated before the proposal's "
                "snapshot (gov.delegate, then vote on the next proposal)"
            )
        return result

    async def _act(self, reference: str, action: str) -> tuple[dict[str, Any], Any, Any]:
        """Call the governor's ``action`` (queue, execute, cancel) on a mirrored proposal:
        the result to return, the receipt and the governor."""
        proposal, now = await self._mirrored(reference)
        governor = self._contract(GOVERNOR)
        call = getattr(governor.functions, action)(*_operation(proposal))
        receipt = await self._send(call, proposal, now)
        result = {
            "proposal_id": str(proposal.proposal_id),
            "tx": receipt["transactionHash"].to_0x_hex(),
        }
        return result, receipt, governor

    async def queue(self, reference: str) -> dict[str, Any]:
        result, receipt, governor = await self._act(reference, "queue")
        queued = governor.events.ProposalQueued().process_receipt(receipt, errors=DISCARD)[0]
        return {**result, "eta": int(queued["args"]["etaSeconds"])}

    async def execute(self, reference: str) -> dict[str, Any]:
        return (await self._act(reference, "execute"))[0]

    async def cancel(self, reference: str) -> dict[str, Any]:
        return (await self._act(reference, "cancel"))[0]

    def control_methods(self) -> list[ControlMethod]:
        async def gov_status(_: NoParams, __: ControlSession) -> dict[str, Any]:
            return await self.status()

        async def gov_delegate(params: DelegateParams, _: ControlSession) -> dict[str, Any]:
            return await self.delegate(params.to)

        async def gov_propose(params: ProposeParams, _: ControlSession) -> dict[str, Any]:
            try:
                spec = params.spec()
            except ProposalError as exc:
                raise RpcError(INVALID_PARAMS, str(exc)) from None
            return await self.propose(spec)

        async def gov_list(params: ListParams, _: ControlSession) -> list[dict[str, Any]]:
            return await self.proposals(params.limit)

        async def gov_show(params: ProposalParams, _: ControlSession) -> dict[str, Any]:
            return await self.show(params.proposal)

        async def gov_vote(params: VoteParams, _: ControlSession) -> dict[str, Any]:
            return await self.vote(params)

        async def gov_queue(params: ProposalParams, _: ControlSession) -> dict[str, Any]:
            return await self.queue(params.proposal)

        async def gov_execute(params: ProposalParams, _: ControlSession) -> dict[str, Any]:
            return await self.execute(params.proposal)

        async def gov_cancel(params: ProposalParams, _: ControlSession) -> dict[str, Any]:
            return await self.cancel(params.proposal)

        return [
            ControlMethod(
                "gov.status",
                NoParams,
                gov_status,
                "The governor, timelock and settings; this node's votes and delegates.",
            ),
            ControlMethod(
                "gov.delegate",
                DelegateParams,
                gov_delegate,
                "Delegate this node's JOY and stJOY votes (default: to itself).",
            ),
            ControlMethod(
                "gov.propose",
                ProposeParams,
                gov_propose,
                "Propose actions (a TOML file, or description and actions).",
            ),
            ControlMethod(
                "gov.list", ListParams, gov_list, "The newest proposals, from the mirror."
            ),
            ControlMethod(
                "gov.show",
                ProposalParams,
                gov_show,
                "One proposal: state, votes, actions in words.",
            ),
            ControlMethod(
                "gov.vote", VoteParams, gov_vote, "Vote for, against or abstain, with a reason."
            ),
            ControlMethod(
                "gov.queue", ProposalParams, gov_queue, "Queue a passed proposal in the timelock."
            ),
            ControlMethod(
                "gov.execute",
                ProposalParams,
                gov_execute,
                "Execute a queued proposal after its delay.",
            ),
            ControlMethod(
                "gov.cancel",
                ProposalParams,
                gov_cancel,
                "Cancel a proposal (its proposer while Pending, the guardian while Queued).",
            ),
        ]


def _votes(joy_token: Any, staked: Any, account: str) -> dict[str, str]:
    """An account's current votes: delegated JOY, delegated stJOY, and their sum."""
    from_joy = int(joy_token.functions.getVotes(account).call())
    from_stake = int(staked.functions.getVotes(account).call())
    return {"joy": str(from_joy), "staked": str(from_stake), "total": str(from_joy + from_stake)}


def _operation(proposal: Proposal) -> tuple[list[str], list[int], list[bytes], bytes]:
    """What queue, execute and cancel take to name a proposal."""
    return proposal.targets, proposal.amounts, proposal.calldatas, proposal.description_hash


def _summary(proposal: Proposal, now: float) -> dict[str, Any]:
    views = proposal.views
    return {
        "proposal_id": str(proposal.proposal_id),
        "title": proposal.title,
        "state": proposal.state(now).label,
        "proposer": proposal.proposer,
        "votes": {
            "for": str(views.for_),
            "against": str(views.against),
            "abstain": str(views.abstain),
        },
        "quorum": str(views.quorum),
        "quorum_reached": proposal.quorum_reached(),
        "voting_starts": views.snapshot + 1,
        "deadline": views.deadline,
        "eta": views.eta or None,
    }


def _vote(vote: Vote) -> dict[str, Any]:
    return {
        "voter": vote.voter,
        "support": SUPPORT[vote.support] if 0 <= vote.support < len(SUPPORT) else str(vote.support),
        "weight": str(vote.weight),
        "reason": vote.reason,
        "tx": vote.tx_hash,
    }


def due_by_now(exc: TransactionFailed, proposal: Proposal | None, now: float) -> bool:
    """Whether ``exc`` is a refusal for being early that the chain's time ``now`` has lifted:
    a proposal's voting opened or closed, or its timelock delay passed."""
    revert = exc.revert
    if revert is None or proposal is None:
        return False
    if revert.name == "GovernorUnexpectedProposalState":
        predicted = proposal.state(now)
        expected = int.from_bytes(revert.args["expectedStates"], "big")
        return predicted != int(revert.args["current"]) and bool(expected >> predicted & 1)
    if revert.name == "TimelockUnexpectedOperationState":
        return 0 < proposal.views.eta <= now
    return False


def explain(exc: TransactionFailed, proposal: Proposal | None, now: float) -> str:
    """A revert of the governor, the timelock or the dispute resolver in words, with what
    the mirror knows."""
    revert = exc.revert
    if revert is None:
        return f"transaction failed: {exc}"
    args = revert.args
    if revert.name == "GovernorUnexpectedProposalState":
        current = ProposalState(int(args["current"]))
        bits = int.from_bytes(args["expectedStates"], "big")
        if not bits:  # propose: that id must not exist yet
            return (
                f"the same proposal (same actions and description) exists already, "
                f"{args['proposalId']}: it is {current.label}"
            )
        expected = " or ".join(s.label for s in ProposalState if bits >> s & 1)
        context = _state_context(current, proposal, now)
        return f"proposal is {current.label}{context} (this needs it {expected})"
    if revert.name == "GovernorAlreadyCastVote":
        voter = Web3.to_checksum_address(args["voter"])
        return f"{voter} has already voted on this proposal; a vote cannot be changed"
    if revert.name == "GovernorInsufficientProposerVotes":
        return (
            f"{Web3.to_checksum_address(args['proposer'])} has {joy(int(args['votes']))} of votes, "
            "below the proposal "
            f"threshold of {joy(int(args['threshold']))}: votes count from the block after "
            "they are delegated (gov.delegate)"
        )
    if revert.name == "TimelockUnexpectedOperationState":
        if proposal is not None and not proposal.views.eta:
            return "the proposal is not queued in the timelock yet: queue it first (gov.queue)"
        if proposal is not None and now < proposal.views.eta:
            due = when(proposal.views.eta, now)
            return f"the timelock's delay has not passed: executable from {due}"
        bits = int.from_bytes(args["expectedStates"], "big")
        expected = " or ".join(n for i, n in enumerate(TIMELOCK_STATES) if bits >> i & 1)
        return f"the timelock operation is not {expected} (queued, not yet due, or done already)"
    if revert.name == "GovernorNonexistentProposal":
        return f"no proposal {args['proposalId']} on this chain"
    if revert.name == "GovernorUnableToCancel":
        now_is = f"; it is {proposal.state(now).label}" if proposal is not None else ""
        return (
            "only the proposer can cancel, while the proposal is Pending "
            f"(and the guardian, while it is Queued){now_is}"
        )
    if revert.name == "WindowClosed":
        return f"the dispute window closed at {when(int(args['closedAt']), now)}"
    if revert.name == "AlreadyDisputed":
        return "this certificate is disputed already: the DAO resolves that dispute"
    if revert.name == "NotCertified":
        return "this request has no committee certificate on this chain"
    if revert.name == "ERC20InsufficientBalance":
        return (
            f"the dispute bond is {joy(int(args['needed']))} and this account holds "
            f"{joy(int(args['balance']))}"
        )
    return f"transaction failed: {exc}"


def _state_context(state: ProposalState, proposal: Proposal | None, now: float) -> str:
    if proposal is None:
        return ""
    views = proposal.views
    if state is ProposalState.PENDING:
        return f", voting opens at {when(views.snapshot + 1, now)}"
    if state is ProposalState.ACTIVE:
        return f", voting ends at {when(views.deadline, now)}"
    if state is ProposalState.DEFEATED:
        return (
            f": it did not pass (for {joy(views.for_)}, against {joy(views.against)}, "
            f"abstain {joy(views.abstain)}; quorum {joy(views.quorum)})"
        )
    if state is ProposalState.SUCCEEDED:
        return ": it passed and waits to be queued (gov.queue)"
    if state is ProposalState.QUEUED and views.eta:
        return f", executable from {when(views.eta, now)}"
    return ""
