"""Paid jobs: committees of real nodes on 127.0.0.1 settling on a real anvil chain.

The nodes run in this process (sharing the session's tiny vLLM engine), use
dev accounts as node keys, stake and register on the session's deployment,
and serve a model registered in the marketplace. Each test runs on a chain
snapshot (see ``chain_fixtures``).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
from eth_account.signers.local import LocalAccount
from web3.logs import DISCARD

from joynode import wire
from joynode.chain.committee import SEED_EPOCH_BLOCKS, select_committee, unpaid_seed
from joynode.chain.deploy import JOY
from joynode.chain.rpc import CHAIN_UNREACHABLE
from joynode.consensus.control import JOB_ERROR, SubmitParams
from joynode.consensus.jobs import input_hash_of, request_id_of, sampling_of
from joynode.consensus.tally import Certificate, CertificateVerifier, vote_commitment
from joynode.control.jsonrpc import RpcError
from joynode.inference.engine import VllmEngine
from joynode.keys import NodeKey
from joynode.messages import RequestStatus, model_key, output_hash
from joynode.node import Node
from joynode.p2p.gossip import JOBS, VOTES
from joynode.signatures import sign
from tests.chain_fixtures import Chain, anvil_url, chain, deployed, dev_account, rpc_proxy
from tests.factories import LIBP2P_TEARDOWN_LEAK, running_node, sees_all_serving, wait_for
from tests.inference_fixtures import tiny_engine, tiny_model
from tests.test_consensus import (
    PROMPT,
    Slow,
    WrongWeights,
    _rejected,
    consensus_home,
    wait_job,
)

__all__ = ["anvil_url", "chain", "deployed", "tiny_engine", "tiny_model"]

pytestmark = LIBP2P_TEARDOWN_LEAK

PRICE = 100 * JOY
STAKE = 1000 * JOY
OWNER, ROYALTY, CLIENT = dev_account(10), dev_account(11), dev_account(12)
FIRST_NODE_ACCOUNT = 2


def stake(chain: Chain, account: LocalAccount) -> None:
    sender = chain.sender(account)
    coordinator = chain.contract("NodeCoordinator")
    sender.transact(chain.contract("JoyToken").functions.approve(coordinator.address, STAKE))
    sender.transact(coordinator.functions.stake(STAKE))


def register_model(chain: Chain, cid: str, committee_size: int) -> None:
    market = chain.contract("ModelMarketplace")
    chain.sender(OWNER).transact(
        market.functions.registerModel(
            cid, PRICE, committee_size, 0, [ROYALTY.address], [1000], b"\0" * 32, "0x" + "00" * 20
        )
    )


def node_info(chain: Chain, address: str) -> tuple[int, int]:
    """(stake, reputation) on-chain."""
    info = chain.contract("NodeCoordinator").functions.nodeInfo(address).call()
    return int(info[0]), int(info[3])


@asynccontextmanager
async def paid_committee(
    tmp_path: Path,
    tiny_model: Path,
    engine: VllmEngine,
    chain: Chain,
    count: int = 3,
    *,
    commit_timeout_s: float = 20,
    settle_timeout_s: float = 30,
    committee_size: int = 3,
    rpc_url: str | None = None,
    settings: Sequence[tuple[str, str, str]] = (),
) -> AsyncIterator[tuple[list[Node], str]]:
    """``count`` staked, registered nodes serving the tiny model, priced in the marketplace;
    their RPC is ``rpc_url`` (default: the chain's own); ``settings``: more config, as
    (section, key, TOML value)."""
    deployment_file = tmp_path / "deployment.json"
    chain.deployment.write(deployment_file)
    async with AsyncExitStack() as stack:
        nodes: list[Node] = []
        for i in range(count):
            account = dev_account(FIRST_NODE_ACCOUNT + i)
            await trio.to_thread.run_sync(stake, chain, account)
            bootstrap = nodes[0].p2p.listen_addrs() if nodes else None
            home = consensus_home(tmp_path / f"n{i}", tiny_model, bootstrap, commit_timeout_s)
            NodeKey(bytes(account.key)).save(home.config.node.key_file, force=True)
            home.set("chain", "mode", '"rpc"')
            home.set("chain", "rpc_url", f'"{rpc_url or chain.url}"')
            home.set("chain", "deployment_file", f'"{deployment_file}"')
            home.set("chain", "poll_interval_s", "0.1")
            home.set("chain", "retry_max_s", "1.0")
            home.set("consensus", "settle_timeout_s", str(settle_timeout_s))
            home.set("consensus", "takeover_s", "1.0")
            for section, key, value in settings:
                home.set(section, key, value)
            nodes.append(await stack.enter_async_context(running_node(home, {"tiny": engine})))
        for node in nodes:
            assert node.chain is not None
            await node.chain.register()
        cid = nodes[0].inference.model_id("tiny")
        assert cid is not None
        await trio.to_thread.run_sync(register_model, chain, cid, committee_size)
        for node in nodes:
            await wait_for(
                partial(sees_all_serving, node, nodes, "tiny"), 15, "all peers up, serving"
            )
            await wait_for(partial(_mirrors, node, count), 15, "the registry mirrored")
        yield nodes, cid


async def _mirrors(node: Node, count: int) -> bool:
    assert node.chain is not None
    return len(await node.chain.registry_candidates()) == count


async def settled(node: Node, request_id: bytes, within_s: float = 60) -> dict[str, Any]:
    job = node.consensus.jobs[request_id]
    with trio.fail_after(within_s):
        while not job.settled():
            await job.changed.wait()
    return job.to_json()


def paid(**extra: Any) -> SubmitParams:
    return SubmitParams(**PROMPT, paid=True, **extra)


async def test_an_honest_paid_committee_lands_its_certificate_and_the_fee_is_split(
    tmp_path: Path, tiny_model: Path, tiny_engine: VllmEngine, chain: Chain
) -> None:
    async with paid_committee(tmp_path, tiny_model, tiny_engine, chain) as (nodes, _):
        a = nodes[0]
        addresses = [n.consensus.address for n in nodes]
        treasury = chain.contract("ModelMarketplace").functions.treasury().call()
        watched = (a.consensus.address, OWNER.address, ROYALTY.address, treasury)
        before = {x: chain.balance(x) for x in watched}
        job = await a.consensus.submit(paid())
        assert job.offer.paid
        assert sorted(job.tally.committee) == sorted(addresses)  # the marketplace's committee
        result = await settled(a, job.request_id)
        assert result["status"] == "certified", result["reason"]
        payment = result["payment"]
        assert payment["status"] == "settled", payment
        assert payment["tx"].startswith("0x")

        certificate = Certificate.from_json(result["certificate"])
        CertificateVerifier(chain.deployment.eip712_domain()).verify(certificate)
        proof = chain.contract("ProofOfInference")
        assert proof.functions.verifiedOutput(job.request_id).call() == certificate.output_hash
        market = chain.contract("ModelMarketplace")
        assert market.functions.requestInfo(job.request_id).call()[5] == 2  # Settled
        # The output is what the engine gives for the prompt.
        output = result["output"]
        local = await a.inference_client.complete(
            "tiny", "Hello world", None, sampling_of(job.offer)
        )
        assert output["token_ids"] == list(local.token_ids)

        # Payment: 2.5 % fee (40 % signers, 30 % stakers, 30 % treasury); of the rest
        # 10 % royalty, 90 % owner. The payer paid the price.
        fee = PRICE * 250 // 10_000
        owner_portion = PRICE - fee
        royalty = owner_portion * 1000 // 10_000
        assert chain.balance(a.consensus.address) == before[a.consensus.address] - PRICE
        assert chain.balance(ROYALTY.address) == before[ROYALTY.address] + royalty
        assert chain.balance(OWNER.address) == before[OWNER.address] + owner_portion - royalty
        treasury_share = fee - fee * 4000 // 10_000 - fee * 3000 // 10_000
        # (the coordinator sends the reward index's rounding dust to the treasury)
        assert 0 <= chain.balance(treasury) - before[treasury] - treasury_share <= 10
        coordinator = chain.contract("NodeCoordinator")
        rewards = sum(coordinator.functions.earned(x).call() for x in addresses)
        assert abs(rewards - (fee - treasury_share)) <= 10  # rounding of the reward index
        # Every member agreed and signed: each gains reputation.
        assert set(certificate.signers) == set(addresses)
        for address in addresses:
            assert node_info(chain, address) == (STAKE, 1010)
        assert (
            chain.contract("ProofOfUse").functions.requestsByUser(a.consensus.address).call() == 1
        )

        # Every member saw the settlement (from the chain's event, or its own receipt).
        for node in nodes[1:]:
            theirs = await settled(node, job.request_id)
            assert theirs["payment"]["status"] == "settled"
            assert theirs["payment"]["tx"] == payment["tx"]


async def test_a_wrong_weights_member_is_outvoted_and_loses_reputation_on_chain(
    tmp_path: Path, tiny_model: Path, tiny_engine: VllmEngine, chain: Chain
) -> None:
    async with paid_committee(tmp_path, tiny_model, tiny_engine, chain) as (nodes, _):
        liar = nodes[2]
        liar.consensus._inference = WrongWeights(liar.inference_client)  # type: ignore[assignment]
        job = await nodes[0].consensus.submit(paid())
        result = await settled(nodes[0], job.request_id)
        assert result["status"] == "certified"
        assert result["payment"]["status"] == "settled"
        assert result["output"]["text"] != "wrong"
        honest = [n.consensus.address for n in nodes[:2]]
        assert sorted(result["certificate"]["signers"]) == sorted(honest)
        assert node_info(chain, liar.consensus.address) == (STAKE, 1000 - 20)
        for address in honest:
            assert node_info(chain, address) == (STAKE, 1010)


async def test_an_equivocating_member_is_slashed_on_evidence(
    tmp_path: Path, tiny_model: Path, tiny_engine: VllmEngine, chain: Chain
) -> None:
    async with paid_committee(tmp_path, tiny_model, tiny_engine, chain) as (nodes, _):
        cheat = nodes[2]
        cheat.consensus._inference = Slow(cheat.inference_client, 1.0)  # type: ignore[assignment]
        job = await nodes[0].consensus.submit(paid())
        request_id = job.request_id
        await wait_for(
            lambda: (
                request_id in cheat.consensus.jobs
                and cheat.consensus.address in cheat.consensus.jobs[request_id].tally.commits
            ),
            20,
            "the cheat has committed",
        )
        # It signs a second, different commit for the same request.
        domain = chain.deployment.eip712_domain()
        other = vote_commitment(request_id, output_hash([1, 2, 3]), b"\x07" * 32)
        second = wire.VoteCommit(
            request_id, other, sign(cheat.p2p._key, domain.commit_digest(request_id, other))
        )
        await cheat.p2p.publish(VOTES, second)

        proof = chain.contract("ProofOfInference")
        address = cheat.consensus.address
        await wait_for(
            lambda: proof.functions.equivocationReported(address, request_id).call(),
            20,
            "an honest member reported the equivocation",
        )
        assert node_info(chain, address) == (0, 0)  # the whole stake, and its reputation
        # The other two still certify and settle; the cheat's vote is void for them.
        result = await settled(nodes[0], request_id)
        assert result["status"] == "certified"
        assert address in result["equivocators"]
        assert address not in nodes[0].consensus.jobs[request_id].tally.reveals
        assert result["payment"]["status"] == "settled"


class Idle:
    """A chain link that never lands a certificate (a member that went quiet)."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    async def submit_certificate(self, certificate: Certificate) -> str:
        await trio.sleep_forever()
        raise AssertionError("unreachable")


async def test_the_next_ranked_member_takes_over_when_the_first_does_not_submit(
    tmp_path: Path, tiny_model: Path, tiny_engine: VllmEngine, chain: Chain
) -> None:
    async with paid_committee(tmp_path, tiny_model, tiny_engine, chain) as (nodes, _):
        job = await nodes[0].consensus.submit(paid())
        first = job.tally.committee[0]  # rank order: all are honest, so it submits first
        idle = next(n for n in nodes if n.consensus.address == first)
        settlement = idle.consensus._settlement  # the room that lands certificates
        assert settlement is not None
        settlement._chain = Idle(settlement._chain)
        result = await settled(nodes[0], job.request_id)
        assert result["payment"]["status"] == "settled"
        receipt = chain.w3.eth.get_transaction_receipt(result["payment"]["tx"])
        assert receipt["from"] == job.tally.committee[1]


async def test_a_request_paid_by_a_wallet_is_relayed_and_forged_paid_offers_are_dropped(
    tmp_path: Path, tiny_model: Path, tiny_engine: VllmEngine, chain: Chain
) -> None:
    async with paid_committee(tmp_path, tiny_model, tiny_engine, chain) as (nodes, cid):
        a = nodes[0]
        # A client wallet pays on-chain for the input hash of its request...
        market = chain.contract("ModelMarketplace")
        now_ms = int(time.time() * 1000)
        offer = wire.JobOffer(
            b"\0" * 32, cid, "Hello world", None, 8, 0.0, 1.0, -1, None, True,
            CLIENT.address, 0, [a.consensus.address], now_ms + 10_000, now_ms + 15_000, True,
        )  # fmt: skip
        client = chain.sender(CLIENT)
        client.transact(chain.contract("JoyToken").functions.approve(market.address, PRICE))
        deadline = chain.w3.eth.get_block("latest")["timestamp"] + 120
        receipt = client.transact(
            market.functions.requestInference(model_key(cid), input_hash_of(offer), PRICE, deadline)
        )
        request_id = bytes(
            market.events.InferenceRequested().process_receipt(receipt, errors=DISCARD)[0]["args"][
                "requestId"
            ]
        )
        client.transact(market.functions.drawCommittee(request_id))  # in a later block
        hex_id = "0x" + request_id.hex()

        # ...a forged prompt under its id is refused, by the relay and by the members...
        with pytest.raises(RpcError) as caught:
            await a.consensus.submit(
                SubmitParams(**{**PROMPT, "prompt": "Goodbye"}, onchain_request_id=hex_id)
            )
        assert caught.value.code == JOB_ERROR
        assert "another model or input" in caught.value.message
        committee = list(market.functions.requestInfo(request_id).call()[6])
        forged = msgspec.structs.replace(
            offer, request_id=request_id, prompt="Goodbye", committee=committee
        )
        unknown = msgspec.structs.replace(forged, request_id=b"\x42" * 32, prompt="Hello world")
        await a.p2p.publish(JOBS, forged)
        await a.p2p.publish(JOBS, unknown)
        for node in nodes[1:]:
            await wait_for(
                partial(lambda n: _rejected(n, "not_as_paid") == 1.0, node), 10, "forgery refused"
            )
            # An offer for a request the chain has not shown is held, not run, and costs
            # no RPC; it would be taken up if its CommitteeDrawn came.
            await wait_for(
                partial(lambda n: n.consensus.statistics().offers_parked == 1, node),
                10,
                "unknown held",
            )
            assert request_id not in node.consensus.jobs
            assert b"\x42" * 32 not in node.consensus.jobs

        # ...and the true prompt, relayed by a node, runs and settles; the wallet pays.
        job = await a.consensus.submit(SubmitParams(**PROMPT, onchain_request_id=hex_id))
        assert job.offer.requester == CLIENT.address
        result = await settled(a, request_id)
        assert result["status"] == "certified"
        assert result["payment"]["status"] == "settled"
        assert market.functions.requestInfo(request_id).call()[5] == 2


async def test_a_paid_job_without_a_majority_fails_and_its_escrow_is_refunded(
    tmp_path: Path, tiny_model: Path, tiny_engine: VllmEngine, chain: Chain
) -> None:
    async with paid_committee(
        tmp_path, tiny_model, tiny_engine, chain, commit_timeout_s=4, settle_timeout_s=12
    ) as (nodes, _):
        a = nodes[0]
        for node in nodes[1:]:  # two of three miss the commit deadline
            node.consensus._inference = Slow(node.inference_client, 30.0)  # type: ignore[assignment]
        payer = a.consensus.address
        before = chain.balance(payer)
        job = await a.consensus.submit(paid())
        assert chain.balance(payer) == before - PRICE
        result = await settled(a, job.request_id, within_s=60)
        assert result["status"] == "failed"
        assert "no majority" in result["reason"]
        # The escrow comes back once the request's deadline has passed.
        assert result["payment"]["status"] == "escrowed"
        with trio.fail_after(40):
            while (payment := a.consensus.jobs[job.request_id].payment) is not None and (
                payment.status == "escrowed"
            ):
                await a.consensus.jobs[job.request_id].changed.wait()
        assert payment is not None
        assert payment.status == "refunded", payment
        assert chain.balance(payer) == before
        assert (
            chain.contract("ModelMarketplace").functions.requestInfo(job.request_id).call()[5] == 3
        )  # Refunded


@pytest.mark.parametrize("members_answer", [True, False], ids=["members", "transaction"])
async def test_a_member_that_missed_the_votes_takes_the_certificate_the_chain_verified(
    tmp_path: Path, tiny_model: Path, tiny_engine: VllmEngine, chain: Chain, members_answer: bool
) -> None:
    """Found by the chaos suite: a member cut off while the others voted failed the job at
    its deadline though the chain had settled it, so its database disagreed with the chain.
    It takes the certificate from the members' reveals or, when it cannot reach them (a
    second chaos finding), from the transaction that landed it."""
    async with paid_committee(
        tmp_path, tiny_model, tiny_engine, chain, commit_timeout_s=4, settle_timeout_s=30
    ) as (nodes, _):
        a, c = nodes[0], nodes[2]
        c.consensus._inference = Slow(c.inference_client, 30.0)  # type: ignore[assignment]

        async def deaf(*_: object) -> None:
            return None  # C hears no vote gossip (cut off, or down while they were sent)

        c.consensus._on_vote = deaf  # type: ignore[method-assign,assignment]
        if not members_answer:
            assert c.consensus._settlement is not None
            c.consensus._settlement._ask_for_votes = deaf
        job = await a.consensus.submit(paid())
        result = await settled(a, job.request_id)
        assert result["status"] == "certified", result["reason"]
        assert result["payment"]["status"] == "settled"
        assert len(result["certificate"]["signers"]) == 2  # A and B

        theirs = c.consensus.jobs[job.request_id]
        # C fails the job at its reveal deadline (it heard no reveal), then the chain's
        # InferenceVerified overrules it.
        await wait_for(lambda: theirs.status == "certified", 40, "C takes the chain's verdict")
        assert theirs.reason.startswith("certified on-chain; this node had it "), theirs.reason
        # The certificate as it landed, whichever way C learned it.
        assert theirs.certificate is not None
        certificate = result["certificate"]
        assert theirs.certificate.to_json()["output_hash"] == certificate["output_hash"]
        assert sorted(theirs.certificate.signers) == sorted(certificate["signers"])
        mine = ["0x" + s.hex() for s in theirs.certificate.signatures]
        assert sorted(mine) == sorted(certificate["signatures"])
        await wait_for(
            lambda: theirs.payment is not None and theirs.payment.status == "settled",
            30,
            "C sees the settlement",
        )
        assert theirs.to_json()["output"]["output_hash"] == certificate["output_hash"]


async def test_paid_submissions_the_marketplace_refuses_get_its_reason(
    tmp_path: Path, tiny_model: Path, tiny_engine: VllmEngine, chain: Chain
) -> None:
    async with paid_committee(tmp_path, tiny_model, tiny_engine, chain) as (nodes, _):
        a = nodes[0]
        with pytest.raises(RpcError) as caught:
            await a.consensus.submit(paid(max_price=PRICE - 1))
        assert caught.value.code == JOB_ERROR
        assert "PriceAboveMax" in caught.value.message
        with pytest.raises(RpcError) as caught:
            await a.consensus.submit(
                SubmitParams(**{**PROMPT, "model": "QmUnregistered"}, paid=True)
            )
        assert "UnknownModel" in caught.value.message
        # Nothing was escrowed, nothing is pending, and a good one still goes through.
        assert not [j for j in a.consensus.jobs.values() if not j.finished()]
        job = await a.consensus.submit(paid())
        assert (await settled(a, job.request_id))["payment"]["status"] == "settled"


async def test_a_committee_without_its_rpc_runs_unpaid_jobs_and_settles_when_it_returns(
    tmp_path: Path, tiny_model: Path, tiny_engine: VllmEngine, chain: Chain
) -> None:
    async with (
        rpc_proxy(chain.url) as rpc,
        paid_committee(tmp_path, tiny_model, tiny_engine, chain, rpc_url=rpc.url) as (nodes, _),
    ):
        a = nodes[0]
        job = await a.consensus.submit(paid())
        await wait_for(
            lambda: all(job.request_id in n.consensus.jobs for n in nodes), 30, "members took it"
        )
        await rpc.cut()  # the chain goes on; the nodes cannot reach it

        # The committee certifies off-chain; the certificate waits for the chain.
        assert (await wait_job(a, job.request_id))["status"] == "certified"
        for node in nodes:
            await wait_for(partial(_chain_is, node, "degraded"), 30, "the outage noticed")
        market = chain.contract("ModelMarketplace")
        assert market.functions.requestInfo(job.request_id).call()[5] == RequestStatus.PENDING
        payments = [n.consensus.jobs[job.request_id].to_json()["payment"] for n in nodes]
        assert {p["status"] for p in payments} == {"escrowed"}
        # Paid work is refused with the reason; unpaid work runs on the mirrored registry.
        with pytest.raises(RpcError) as refused:
            await a.consensus.submit(paid())
        assert refused.value.code == CHAIN_UNREACHABLE
        assert "unreachable" in refused.value.message
        unpaid = await a.consensus.submit(SubmitParams(**PROMPT))
        assert (await wait_job(a, unpaid.request_id))["status"] == "certified"

        await rpc.restore()
        result = await settled(a, job.request_id)
        assert result["payment"]["status"] == "settled", result["payment"]
        assert market.functions.requestInfo(job.request_id).call()[5] == RequestStatus.SETTLED
        for node in nodes:
            assert (await settled(node, job.request_id))["payment"]["status"] == "settled"
            await wait_for(partial(_chain_is, node, "ready"), 30, "recovered")


def _chain_is(node: Node, state: str) -> bool:
    return node.supervisor.snapshot()["chain"]["state"] == state


async def test_an_unpaid_committee_comes_from_a_recent_block_and_members_refuse_a_chosen_one(
    tmp_path: Path, tiny_model: Path, tiny_engine: VllmEngine, chain: Chain
) -> None:
    async with paid_committee(tmp_path, tiny_model, tiny_engine, chain) as (nodes, _):
        a = nodes[0]
        assert a.chain is not None
        by_address = {n.consensus.address: n for n in nodes}
        job = await a.consensus.submit(SubmitParams(**PROMPT, committee_size=2))
        block = job.offer.committee_block
        assert block is not None
        assert block.number % SEED_EPOCH_BLOCKS == 0
        assert chain.w3.eth.get_block(block.number)["hash"] == block.hash
        candidates = await a.chain.registry_candidates()
        ranking = select_committee(
            candidates.values(), unpaid_seed(block.hash, a.consensus.address), 3, 0
        )
        assert job.offer.committee == ranking[:2]  # all three are up and serving
        assert (await wait_job(a, job.request_id))["status"] == "certified"

        # Committees rank the registry as it was at their block: stake added since shows
        # in the mirror, not in the weights of a draw from an earlier block.
        head = chain.w3.eth.get_block("latest")
        earlier_block = wire.BlockRef(int(head["number"]), bytes(head["hash"]))
        address = a.consensus.address
        await trio.to_thread.run_sync(stake, chain, dev_account(FIRST_NODE_ACCOUNT))

        async def mirrored_stake() -> int:
            assert a.chain is not None
            return (await a.chain.registry_candidates())[address].stake

        await wait_for(lambda: _equals(mirrored_stake(), 2 * STAKE), 30, "the stake mirrored")
        at_block = await a.chain.committee_candidates(earlier_block)
        assert at_block[address].stake == STAKE
        assert set(at_block) == set(await a.chain.registry_candidates())

        # The requester lists the committee it would like: the two members drop it.
        now_ms = time.time_ns() // 1_000_000
        chosen = msgspec.structs.replace(
            job.offer,
            nonce=job.offer.nonce + 1,
            committee=ranking[1:],  # skips the first-ranked node, which is up
            commit_deadline_ms=now_ms + 15_000,
            reveal_deadline_ms=now_ms + 20_000,
        )
        chosen = msgspec.structs.replace(chosen, request_id=request_id_of(chosen))
        members = [by_address[address] for address in ranking[1:] if address != a.consensus.address]
        before = [_rejected(m, "committee_skips_live_node") or 0.0 for m in members]
        await a.p2p.publish(JOBS, chosen)
        for member, count in zip(members, before, strict=True):
            try:
                await wait_for(
                    partial(_dropped, member, "committee_skips_live_node", count + 1),
                    10,
                    "the offer dropped",
                )
            except AssertionError:  # say what the member did instead
                raise AssertionError(
                    f"not dropped for skipping a live node: rejections {_rejections(member)}, "
                    f"taken: {chosen.request_id in member.consensus.jobs}, up and serving: "
                    f"{[(r.address, r.state.value, r.models) for r in member.p2p.peers.records()]}"
                ) from None
            assert chosen.request_id not in member.consensus.jobs


async def _equals(value: Awaitable[Any], expected: Any) -> bool:
    return bool(await value == expected)


def _dropped(node: Node, reason: str, times: float) -> bool:
    return (_rejected(node, reason) or 0.0) >= times


def _rejections(node: Node) -> dict[str, float]:
    return {
        sample.labels["reason"]: sample.value
        for family in node.registry.collect()
        if family.name == "joynode_consensus_rejected_votes"
        for sample in family.samples
        if sample.name.endswith("_total")
    }
