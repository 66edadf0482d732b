"""The node's side of the DAO on a real anvil: the watcher's mirror of proposals and votes
(exactly once, through a reorg), the ``gov.*`` control methods with time travel and
their explained reverts, proposal files and actions in words, and ``joynode gov``."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount
from eth_utils.crypto import keccak
from web3.logs import DISCARD

from joynode.chain.artifacts import load_artifacts
from joynode.chain.deploy import JOY
from joynode.chain.sender import Revert, TransactionFailed
from joynode.control.jsonrpc import INVALID_PARAMS, RpcError
from joynode.devnet.governance import DEV_ACCOUNTS, give_votes, governance_lines
from joynode.governance.actions import (
    ActionCodec,
    ProposalError,
    ProposalSpec,
    read_proposal_file,
)
from joynode.governance.display import joy, list_lines, show_lines, status_lines
from joynode.governance.disputes import certificate_signers
from joynode.governance.mirror import GovernanceMirror, ProposalState
from joynode.governance.service import GOVERNANCE_ERROR, explain
from joynode.keys import NodeKey
from tests.chain_fixtures import Chain, anvil_url, chain, deployed, dev_account
from tests.factories import NodeHome, run_cli, running_node, wait_for
from tests.test_chain import catch_up, rpc_home, watching
from tests.test_consensus_processes import call
from tests.test_contracts import REQUESTER, World, account

__all__ = ["anvil_url", "chain", "deployed"]

QUORUM = 40_000_000 * JOY  # 4 % of the 1e9 JOY supply
FEE_PROPOSAL: dict[str, Any] = {
    "description": "# Raise the marketplace fee to 5 %\n\nMore for the treasury.",
    "actions": [
        {
            "contract": "ModelMarketplace",
            "function": "setParameters(uint16,uint16,uint16,address)",
            "args": [500, 4000, 3000, "JoyTimelock"],
        }
    ],
}


def delegate_to_self(chain: Chain, account: LocalAccount) -> None:
    token = chain.contract("JoyToken")
    chain.sender(account).transact(token.functions.delegate(account.address))


def propose(chain: Chain, account: LocalAccount, fee_bps: int, description: str) -> int:
    """A fee-change proposal sent straight to the governor; its id."""
    market, governor = chain.contract("ModelMarketplace"), chain.contract("JoyGovernor")
    calldata = market.encode_abi(
        "setParameters", args=[fee_bps, 4000, 3000, chain.deployment.treasury]
    )
    receipt = chain.sender(account).transact(
        governor.functions.propose([market.address], [0], [calldata], description)
    )
    created = governor.events.ProposalCreated().process_receipt(receipt, errors=DISCARD)
    return int(created[0]["args"]["proposalId"])


def vote(chain: Chain, account: LocalAccount, proposal_id: int, support: int) -> None:
    governor = chain.contract("JoyGovernor")
    chain.sender(account).transact(
        governor.functions.castVoteWithReason(proposal_id, support, "because")
    )


def mirrored(db: Path) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    conn = sqlite3.connect(db)
    try:
        proposals = conn.execute(
            "SELECT proposal_id, votes_for, votes_against, quorum, state FROM gov_proposals "
            "ORDER BY block"
        ).fetchall()
        votes = conn.execute(
            "SELECT proposal_id, voter, support, weight, reason FROM gov_votes ORDER BY block"
        ).fetchall()
        return proposals, votes
    finally:
        conn.close()


async def test_mirror_keeps_proposals_and_votes_once_and_a_reorg_takes_them_back(
    chain: Chain, tmp_path: Path
) -> None:
    db = tmp_path / "state.db"
    admin, voter = chain.admin, dev_account(2)
    admin_votes = chain.balance(admin.address)
    delegate_to_self(chain, admin)
    delegate_to_self(chain, voter)
    first = propose(chain, admin, 500, "first")
    chain.advance_to(chain.contract("JoyGovernor").functions.proposalSnapshot(first).call() + 1)
    vote(chain, admin, first, 1)
    async with watching(chain, db, 5, mirrors=(GovernanceMirror,)) as (_, watcher):
        await catch_up(watcher, chain)
    # A second watcher on the same database (a restart) resumes: nothing twice.
    async with watching(chain, db, 5, mirrors=(GovernanceMirror,)) as (_, watcher):
        await catch_up(watcher, chain)
        assert mirrored(db) == (
            [(str(first), str(admin_votes), "0", str(QUORUM), int(ProposalState.ACTIVE))],
            [(str(first), admin.address, 1, str(admin_votes), "because")],
        )
        fork = chain.w3.provider.make_request("evm_snapshot", [])  # type: ignore[arg-type]
        vote(chain, voter, first, 0)
        second = propose(chain, voter, 600, "second")
        await catch_up(watcher, chain)
        proposals, votes = mirrored(db)
        assert [p[0] for p in proposals] == [str(first), str(second)]
        assert proposals[0][2] == str(100_000 * JOY)  # the voter's against
        assert [(v[1], v[2]) for v in votes] == [(admin.address, 1), (voter.address, 0)]
        # Those blocks vanish; on the new branch the voter abstains instead.
        chain.w3.provider.make_request("evm_revert", [fork["result"]])  # type: ignore[arg-type]
        vote(chain, voter, first, 2)
        retracted = await watcher.poll()  # the chain is shorter now: catch_up would wait
        retracted += await catch_up(watcher, chain)
        assert {e.name for e in retracted if e.removed} == {"VoteCast", "ProposalCreated"}
        proposals, votes = mirrored(db)
        assert [(p[0], p[2]) for p in proposals] == [(str(first), "0")]
        assert [(v[1], v[2]) for v in votes] == [(admin.address, 1), (voter.address, 2)]


def test_actions_in_words_whatever_the_calldata_holds(chain: Chain) -> None:
    codec = ActionCodec(
        chain.deployment.addresses,
        {n: load_artifacts()[n].abi for n in ("ModelMarketplace", "JoyToken")},
    )
    [action] = codec.encode(ProposalSpec.model_validate(FEE_PROPOSAL))
    timelock = chain.deployment.addresses["JoyTimelock"]
    assert codec.describe(action.target, action.value, action.calldata) == (
        "ModelMarketplace.setParameters(feeBps=500, signersBps=4000, stakersBps=3000, "
        f"treasury={timelock} (JoyTimelock))"
    )
    token = chain.deployment.addresses["JoyToken"]
    stranger = dev_account(9).address
    transfer = bytes(keccak(text="transfer(address,uint256)"))[:4]
    assert codec.describe(token, 0, transfer + b"\x01\x02") == (
        "JoyToken.transfer(undecodable arguments: 2 bytes)"
    )
    assert codec.describe(stranger, 0, b"\xde\xad\xbe\xef" + b"\0" * 32) == (
        f"{stranger}: call 0xdeadbeef with 32 bytes of arguments "
        "(not a function of JoyNet's contracts)"
    )
    assert codec.describe(stranger, 5, b"\x01") == (
        f"{stranger}: call 0x01 with 0 bytes of arguments (not a function of JoyNet's contracts), "
        "sending 5 wei"
    )
    assert codec.describe(stranger, 10**18, b"") == f"send {10**18} wei to {stranger}"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            "description = 'x'\n[[actions]]\ncontract = 'Nobody'\n",
            "actions[0].contract: no 'Nobody'",
        ),
        (
            "description = 'x'\n[[actions]]\ncontract = 'ModelMarketplace'\n"
            "function = 'setParameters(uint16)'\nargs = [1]\n",
            "ModelMarketplace has no setParameters(uint16); it has "
            "setParameters(uint16,uint16,uint16,address)",
        ),
        (
            "description = 'x'\n[[actions]]\ncontract = 'ModelMarketplace'\n"
            "function = 'setParameters(uint16,uint16,uint16,address)'\n"
            "args = [70000, 4000, 3000, 'JoyTimelock']\n",
            "actions[0].args[0]: 70000 is not a valid uint16",
        ),
        (
            "description = 'x'\n[[actions]]\ncontract = 'JoyToken'\n"
            "function = 'transfer(address,uint256)'\nargs = ['0x12', 1]\n",
            "actions[0].args[0]: not an address or a contract name: '0x12'",
        ),
        (
            "description = 'x'\n[[actions]]\ncontract = 'JoyToken'\n"
            "function = 'transfer(address,uint256)'\nargs = ['JoyTimelock']\n",
            "transfer(address,uint256) takes 2 arguments, got 1",
        ),
        ("description = 'x'\n", "actions: Field required"),
        ("description = 'x'\n[[actions]]\ncontract = 'JoyToken'\nfee = 1\n", "fee: Extra inputs"),
        ("description = \n", "not TOML"),
    ],
)
def test_a_bad_proposal_file_is_refused_with_where_and_why(
    chain: Chain, tmp_path: Path, text: str, error: str
) -> None:
    path = tmp_path / "proposal.toml"
    path.write_text(text)
    codec = ActionCodec(
        chain.deployment.addresses,
        {n: load_artifacts()[n].abi for n in ("ModelMarketplace", "JoyToken")},
    )
    with pytest.raises(ProposalError) as raised:
        codec.encode(read_proposal_file(path))
    assert error in str(raised.value)


def test_reverts_are_explained_in_words() -> None:
    def failed(name: str, **args: Any) -> TransactionFailed:
        return TransactionFailed(f"{name}(...)", Revert("JoyGovernor", name, args))

    assert explain(
        failed(
            "GovernorInsufficientProposerVotes",
            proposer=dev_account(3).address.lower(),
            votes=5 * JOY,
            threshold=JOY * 10**6,
        ),
        None,
        0,
    ) == (
        f"{dev_account(3).address} has 5 JOY of votes, below the proposal threshold of "
        "1,000,000 JOY: votes count from the block after they are delegated (gov.delegate)"
    )
    pending = 1 << ProposalState.ACTIVE
    assert (
        explain(
            failed(
                "GovernorUnexpectedProposalState",
                proposalId=1,
                current=int(ProposalState.EXECUTED),
                expectedStates=pending.to_bytes(32, "big"),
            ),
            None,
            0,
        )
        == "proposal is Executed (this needs it Active)"
    )
    assert explain(TransactionFailed("transaction refused: nonce too low"), None, 0) == (
        "transaction failed: transaction refused: nonce too low"
    )


async def gov_error(home: NodeHome, method: str, params: dict[str, Any]) -> RpcError:
    with pytest.raises(RpcError) as raised:
        await call(home, method, params)
    return raised.value


def set_interval(chain: Chain, seconds: int | None) -> None:
    """Blocks ``seconds`` apart whatever the wall clock does (None: back to the wall clock)."""
    if seconds is None:
        chain.w3.provider.make_request("anvil_removeBlockTimestampInterval", [])  # type: ignore[arg-type]
    else:
        chain.w3.provider.make_request("anvil_setBlockTimestampInterval", [seconds])  # type: ignore[arg-type]


async def state_of(home: NodeHome, proposal: str) -> str:
    return str((await call(home, "gov.show", {"proposal": proposal}))["state"])


async def test_gov_methods_take_a_fee_change_through_and_explain_each_refusal(
    chain: Chain, tmp_path: Path
) -> None:
    me = dev_account(5)
    home = rpc_home(tmp_path, chain)
    home.set("chain", "block_range", "1000")
    NodeKey(bytes(me.key)).save(home.config.node.key_file, force=True)
    delegate_to_self(chain, chain.admin)  # enough votes for the quorum
    admin_votes = chain.balance(chain.admin.address)
    market = chain.contract("ModelMarketplace")
    async with running_node(home):
        delegated = await call(home, "gov.delegate")
        assert len(delegated["txs"]) == 2  # JOY and stJOY
        assert delegated["votes"] == {
            "joy": str(100_000 * JOY),
            "staked": "0",
            "total": str(100_000 * JOY),
        }
        assert (await call(home, "gov.delegate"))["txs"] == []
        status = await call(home, "gov.status")
        assert status["settings"]["voting_period_s"] == 120
        assert status["settings"]["timelock_delay_s"] == 10
        assert "votes 100,000 JOY" in "\n".join(status_lines(status))

        set_interval(chain, 1)  # the vote's block is the snapshot's: still Pending
        try:
            proposed = await call(home, "gov.propose", FEE_PROPOSAL)
            proposal = proposed["proposal_id"]
            pending = await gov_error(home, "gov.vote", {"proposal": proposal, "support": "for"})
        finally:
            set_interval(chain, None)
        assert pending.code == GOVERNANCE_ERROR
        assert "proposal is Pending" in pending.message
        assert "(this needs it Active)" in pending.message
        assert proposed["actions"][0].startswith("ModelMarketplace.setParameters(feeBps=500,")
        twice = await gov_error(home, "gov.propose", FEE_PROPOSAL)
        assert twice.message.startswith(
            f"the same proposal (same actions and description) exists already, {proposal}"
        )

        chain.advance_to(proposed["voting_starts"])
        await wait_for(lambda: state_of_is(home, proposal[:8], "Active"), 10, "mirrored, Active")
        voted = await call(
            home, "gov.vote", {"proposal": proposal[:8], "support": "for", "reason": "fair"}
        )
        assert voted["weight"] == str(100_000 * JOY)
        again = await gov_error(home, "gov.vote", {"proposal": proposal, "support": "against"})
        assert (
            again.message
            == f"{me.address} has already voted on this proposal; a vote cannot be changed"
        )
        vote(chain, chain.admin, int(proposal), 1)
        early = await gov_error(home, "gov.queue", {"proposal": proposal})
        assert "proposal is Active, voting ends at" in early.message

        chain.advance_to(proposed["voting_ends"] + 1)
        await wait_for(lambda: state_of_is(home, proposal, "Succeeded"), 10, "Succeeded")
        unqueued = await gov_error(home, "gov.execute", {"proposal": proposal})
        assert unqueued.message == (
            "proposal is Succeeded: it passed and waits to be queued (gov.queue) "
            "(this needs it Queued)"
        )
        queued = await call(home, "gov.queue", {"proposal": proposal})
        assert queued["eta"] > 0
        too_soon = await gov_error(home, "gov.execute", {"proposal": proposal})
        assert "the timelock's delay has not passed: executable from" in too_soon.message

        chain.advance_to(queued["eta"])
        await call(home, "gov.execute", {"proposal": proposal})
        assert market.functions.feeBps().call() == 500
        await wait_for(lambda: state_of_is(home, proposal, "Executed"), 10, "Executed")
        shown = await call(home, "gov.show", {"proposal": proposal})
        assert shown["votes"] == {
            "for": str(100_000 * JOY + admin_votes),
            "against": "0",
            "abstain": "0",
        }
        assert shown["quorum"] == str(QUORUM)
        assert shown["quorum_reached"] is True
        assert shown["title"] == "Raise the marketplace fee to 5 %"
        assert [(v["voter"], v["support"], v["reason"]) for v in shown["voters"]] == [
            (me.address, "for", "fair"),
            (chain.admin.address, "for", "because"),
        ]
        text = "\n".join(show_lines(shown))
        assert "state     Executed" in text
        assert "1. ModelMarketplace.setParameters(feeBps=500" in text
        assert "Executed" in "\n".join(list_lines(await call(home, "gov.list")))
        done = await gov_error(home, "gov.cancel", {"proposal": proposal})
        assert done.message == (
            "only the proposer can cancel, while the proposal is Pending "
            "(and the guardian, while it is Queued); it is Executed"
        )


async def state_of_is(home: NodeHome, proposal: str, state: str) -> bool:
    try:
        return await state_of(home, proposal) == state
    except RpcError:  # not mirrored yet
        return False


async def test_bad_requests_and_strange_proposals_leave_the_node_serving(
    chain: Chain, tmp_path: Path
) -> None:
    home = rpc_home(tmp_path, chain)
    home.set("chain", "block_range", "1000")
    NodeKey(bytes(dev_account(6).key)).save(home.config.node.key_file, force=True)
    governor = chain.contract("JoyGovernor")
    stranger = dev_account(9).address
    token = chain.deployment.addresses["JoyToken"]
    description = "\x1b[31mred\x1b[0m 🎉 " + "x" * 5000
    receipt = chain.sender(dev_account(7)).transact(
        governor.functions.propose(
            [token, stranger], [0, 0], [b"\xa9\x05\x9c\xbb\x01", b"\x01\x02\x03"], description
        )
    )
    strange = str(
        governor.events.ProposalCreated().process_receipt(receipt, errors=DISCARD)[0]["args"][
            "proposalId"
        ]
    )
    bad_file = tmp_path / "bad.toml"
    bad_file.write_text("description = 'x'\n[[actions]]\ncontract = 'Nobody'\n")
    async with running_node(home):
        await wait_for(lambda: shows(home, strange), 10, "the strange proposal mirrored")
        shown = await call(home, "gov.show", {"proposal": strange})
        assert shown["actions"] == [
            "JoyToken.transfer(undecodable arguments: 1 bytes)",
            f"{stranger}: call 0x010203 with 0 bytes of arguments "
            "(not a function of JoyNet's contracts)",
        ]
        assert shown["description"] == description
        assert "\\x1b[31mred" in "\n".join(show_lines(shown))
        for params, expected in [
            ({"file": str(bad_file)}, "actions[0].contract: no 'Nobody'"),
            ({"file": str(tmp_path / "missing.toml")}, "No such file"),
            ({"file": "relative.toml"}, "file: must be an absolute path"),
            ({"description": "x"}, "a proposal needs both description and actions"),
            ({**FEE_PROPOSAL, "file": str(bad_file)}, "give either file or description"),
        ]:
            refused = await gov_error(home, "gov.propose", params)
            assert refused.code == INVALID_PARAMS
            assert expected in refused.message
        for method, params, expected in [
            ("gov.show", {"proposal": "12"}, "String should match pattern"),
            ("gov.show", {"proposal": "1234567"}, "no proposal 1234567 in this node's mirror"),
            ("gov.vote", {"proposal": strange, "support": "yes"}, "support"),
            ("gov.delegate", {"to": "0x12"}, "not an Ethereum address"),
        ]:
            assert expected in (await gov_error(home, method, params)).message
        assert (await call(home, "node.status"))["health"] == "ok"


async def shows(home: NodeHome, proposal: str) -> bool:
    try:
        await call(home, "gov.show", {"proposal": proposal})
    except RpcError:
        return False
    return True


async def test_a_zero_weight_vote_says_why(chain: Chain, tmp_path: Path) -> None:
    home = rpc_home(tmp_path, chain)
    home.set("chain", "block_range", "1000")
    NodeKey(bytes(dev_account(8).key)).save(home.config.node.key_file, force=True)
    proposal = propose(chain, chain.admin, 300, "small")
    chain.advance_to(chain.contract("JoyGovernor").functions.proposalSnapshot(proposal).call() + 1)
    async with running_node(home):
        voted = await call(home, "gov.vote", {"proposal": str(proposal), "support": "abstain"})
        assert voted["weight"] == "0"
        assert "votes count as delegated before the proposal's snapshot" in voted["note"]


def test_devnet_gives_the_dev_accounts_votes_and_says_where_governance_stands(
    chain: Chain,
) -> None:
    coordinator, token = chain.contract("NodeCoordinator"), chain.contract("JoyToken")
    node = dev_account(12)
    chain.sender(node).transact(token.functions.approve(coordinator.address, 1000 * JOY))
    chain.sender(node).transact(coordinator.functions.stake(1000 * JOY))
    delegated = give_votes(chain.w3, chain.deployment)
    assert [a.address for a in delegated] == [
        dev_account(i).address for i in range(DEV_ACCOUNTS) if chain.balance(dev_account(i).address)
    ]
    assert give_votes(chain.w3, chain.deployment) == []  # once
    admin_votes = chain.balance(chain.admin.address)
    lines = governance_lines(
        chain.w3,
        chain.deployment,
        [("dev account 0", chain.admin.address), ("node 0", node.address)],
    )
    assert lines == [
        f"governance: JoyGovernor {chain.deployment.addresses['JoyGovernor']}, JoyTimelock "
        f"{chain.deployment.treasury} (admin of every contract, and the treasury)",
        "  voting delay 1 s, period 120 s, quorum 4 % of JOY, proposal threshold 0 JOY, "
        "late-quorum extension 30 s, timelock delay 10 s",
        f"  votes: dev account 0 {joy(admin_votes)}; node 0 1,000 JOY (stake)",
    ]


def test_gov_propose_refuses_a_bad_file_in_one_line_before_calling_the_node(
    tmp_path: Path,
) -> None:
    path = tmp_path / "fee.toml"
    path.write_text("description = 'x'\n[[actions]]\ncontract = 'JoyToken'\nargs = [1]\n")
    done = run_cli("gov", "propose", str(path), "--config", str(tmp_path / "none.toml"))
    assert done.returncode == 2
    assert done.stderr == f"joynode: {path}: actions.0: Value error, args without a function\n"


async def test_gov_dispute_takes_the_signers_from_the_watched_certificate(
    chain: Chain, tmp_path: Path
) -> None:
    world = World.of(chain)
    requester = account(REQUESTER)
    req = world.pending([1000 * JOY] * 3)  # requested by dev account REQUESTER
    world.certify(req.request_id, req.committee[:2])
    other = world.request(req.model)
    world.certify(other.request_id, other.committee[:2])
    request_id, other_id = "0x" + req.request_id.hex(), "0x" + other.request_id.hex()
    home = rpc_home(tmp_path, chain)
    NodeKey(bytes(requester.key)).save(home.config.node.key_file, force=True)
    disputes = chain.contract("DisputeResolver")
    async with running_node(home) as node:
        # The node saw both certificates (its record of the chain), then disputes them.
        async def seen() -> bool:
            def read(conn: sqlite3.Connection) -> list[str] | None:
                return certificate_signers(conn, other_id)

            return await node.state.read(read) is not None

        await wait_for(seen, 30, "the certificates watched")
        opened = await call(home, "gov.dispute", {"request_id": request_id, "reason": "made up"})
        assert opened["signers"] == req.committee[:2]
        assert opened["bond"] == "0"  # its own request
        status, disputer, _, bond, reason, signers = disputes.functions.disputeOf(
            req.request_id
        ).call()
        assert (status, disputer, bond, reason) == (1, requester.address, 0, "made up")
        assert signers == req.committee[:2]

        refusals = {
            request_id: "this certificate is disputed already",
            "0x" + "ab" * 32: "no certificate for 0x" + "ab" * 32,
        }
        for rid, why in refusals.items():
            with pytest.raises(RpcError) as refused:
                await call(home, "gov.dispute", {"request_id": rid, "reason": "again"})
            assert refused.value.code == GOVERNANCE_ERROR
            assert why in refused.value.message
        with pytest.raises(RpcError) as bad:
            await call(home, "gov.dispute", {"request_id": "0x12", "reason": "short"})
        assert bad.value.code == INVALID_PARAMS
        chain.advance(int(disputes.functions.disputeWindow().call()) + 1)
        with pytest.raises(RpcError) as late:
            await call(home, "gov.dispute", {"request_id": other_id, "reason": "late"})
        assert late.value.message.startswith("the dispute window closed at ")
        assert (await call(home, "node.status", {}))["health"] != "stopping"
