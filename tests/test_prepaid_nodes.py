"""Prepaid jobs on real nodes: a client that is not a node signs requests; committees of
three in-process nodes (sharing the session's tiny vLLM engine) check its balance before
running them, and settle the certified ones in batches on a real anvil chain.

The client is dev account 15; it gets a quote from a node (``prepaid.quote``'s typed
data, as JSON), signs it with eth-account, and submits the signed request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from eth_account.signers.local import LocalAccount
from prometheus_client import CollectorRegistry

from joynode import wire
from joynode.config import PrepaidSection
from joynode.consensus.control import QuoteParams, SignedPrepaid, SubmitParams, json_typed_data
from joynode.consensus.jobs import prepaid_request_of
from joynode.control.jsonrpc import RpcError
from joynode.inference.engine import VllmEngine
from joynode.keys import NodeKey
from joynode.messages import ChainEvent
from joynode.node import Node
from joynode.p2p.rpc import RpcFailure
from joynode.prepaid import ledger
from joynode.prepaid.service import PrepaidService
from joynode.signatures import (
    prepaid_request_id,
    recover_address,
    results_chain,
    voucher_digest,
)
from tests.chain_fixtures import Chain, anvil_url, chain, deployed, dev_account
from tests.factories import LIBP2P_TEARDOWN_LEAK, NoPeers, wait_for
from tests.inference_fixtures import tiny_engine, tiny_model
from tests.test_consensus import PROMPT
from tests.test_consensus_chain import PRICE, paid_committee

__all__ = ["anvil_url", "chain", "deployed", "tiny_engine", "tiny_model"]

pytestmark = LIBP2P_TEARDOWN_LEAK

CLIENT = dev_account(15)


def deposit(chain: Chain, client: LocalAccount, amount: int) -> None:
    prepaid = chain.contract("PrepaidInference")
    sender = chain.sender(client)
    sender.transact(chain.contract("JoyToken").functions.approve(prepaid.address, amount))
    sender.transact(prepaid.functions.deposit(amount))


def balance_of(chain: Chain, client: LocalAccount) -> int:
    return int(chain.contract("PrepaidInference").functions.accountOf(client.address).call()[0])


async def signed_job(node: Node, client: LocalAccount, **job: Any) -> SubmitParams:
    """What a client does: get a quote, sign its typed data, submit the same job with it."""
    params = {**PROMPT, **job}
    offer = await node.consensus.quote_prepaid(QuoteParams(**params, client=client.address))
    request = prepaid_request_of(offer)
    signature = client.sign_typed_data(full_message=json_typed_data(request.typed_data()))
    assert offer.committee_block is not None
    signed = SignedPrepaid(
        client=client.address,
        max_price=request.max_price,
        nonce=request.nonce,
        deadline=request.deadline,
        committee=list(offer.committee),
        committee_block={
            "number": offer.committee_block.number,
            "hash": "0x" + offer.committee_block.hash.hex(),
        },
        signature="0x" + bytes(signature.signature).hex(),
    )
    return SubmitParams(**params, prepaid=signed)


async def certified(node: Node, request_id: bytes, within_s: float = 60) -> dict[str, Any]:
    job = node.consensus.jobs[request_id]
    with trio.fail_after(within_s):
        await job.done.wait()
    result = job.to_json()
    assert result["status"] == "certified", result["reason"]
    return result


async def states(node: Node) -> dict[str, int]:
    assert node.prepaid is not None
    return await node.prepaid.read(ledger.counts)


@asynccontextmanager
async def prepaid_committee(
    tmp_path: Path,
    tiny_model: Path,
    engine: VllmEngine,
    chain: Chain,
    settings: Sequence[tuple[str, str]] = (),
) -> AsyncIterator[list[Node]]:
    async with paid_committee(
        tmp_path, tiny_model, engine, chain, settings=[("prepaid", k, v) for k, v in settings]
    ) as (nodes, _):
        yield nodes


async def test_a_client_that_is_no_node_pays_from_its_balance_and_batches_settle(
    tmp_path: Path, tiny_model: Path, tiny_engine: VllmEngine, chain: Chain
) -> None:
    await trio.to_thread.run_sync(deposit, chain, CLIENT, 10 * PRICE)
    settings = [("batch_size", "4"), ("max_age_s", "2.0")]
    async with prepaid_committee(tmp_path, tiny_model, tiny_engine, chain, settings) as nodes:
        a, b = nodes[0], nodes[1]
        jobs = []
        for i in range(6):
            relay = (a, b)[i % 2]  # any node relays
            params = await signed_job(relay, CLIENT, prompt=f"Hello {i}")
            jobs.append((relay, await relay.consensus.submit(params)))
        for relay, job in jobs:
            result = await certified(relay, job.request_id)
            assert result["prepaid"]["client"] == CLIENT.address
        prepaid = chain.contract("PrepaidInference")
        nonces = [prepaid_request_of(job.offer).nonce for _, job in jobs]

        async def all_settled() -> bool:
            def read() -> bool:
                return all(prepaid.functions.isSettled(CLIENT.address, n).call() for n in nonces)

            return await trio.to_thread.run_sync(read)

        await wait_for(all_settled, 60, "every request settled")
        assert balance_of(chain, CLIENT) == 4 * PRICE  # each debited once, at the price
        # In batches: fewer settleBatch transactions than requests.
        txs = set()
        for node in nodes:
            assert node.prepaid is not None
            for row in await node.prepaid.read(lambda c: ledger.recent(c, 100)):
                if row["state"] == "settled" and row["tx"]:
                    txs.add(row["tx"])
        assert 1 <= len(txs) < 6
        # Members vouched for their results once per batch rather than per request.
        vouchers = {
            outcome: sum(
                n.registry.get_sample_value("joynode_prepaid_vouchers_total", {"outcome": outcome})
                or 0
                for n in nodes
            )
            for outcome in ("own", "received", "missing")
        }
        assert vouchers["own"] >= 1, vouchers
        assert vouchers["received"] >= 1, vouchers
        assert vouchers["missing"] == 0, vouchers

        # A member vouches for what it certified, and for nothing else.
        relay, job = jobs[0]
        output = bytes.fromhex(certified_output(await certified(relay, job.request_id)))
        member = next(n for n in nodes if n is not relay)
        digest = voucher_digest(
            chain.w3.eth.chain_id, prepaid.address, results_chain([(job.request_id, output)])
        )
        asked = wire.VoucherRequest([wire.CertifiedResult(job.request_id, output)])
        reply = await relay.p2p.request(member.p2p.peer_id, asked)
        assert isinstance(reply, wire.Voucher)
        assert recover_address(digest, reply.signature) == member.consensus.address
        for request_id, output_hash, why in (
            (job.request_id, bytes(32), "was certified with another output"),
            (bytes(32), output, "is not certified here"),
        ):
            asked = wire.VoucherRequest([wire.CertifiedResult(request_id, output_hash)])
            with pytest.raises(RpcFailure, match=f"403 request 0x[0-9a-f]{{64}} {why}"):
                await relay.p2p.request(member.p2p.peer_id, asked)
        # Every member's ledger ends with nothing owed.
        for node in nodes:
            await wait_for(partial(_owes_nothing, node), 30, "members see every request settled")
        # The signers were credited (the split to the wei is tests/test_prepaid.py's).
        claimable = sum(int(prepaid.functions.claimable(n.consensus.address).call()) for n in nodes)
        assert claimable > 0


async def _owes_nothing(node: Node) -> bool:
    counts = await states(node)
    return not any(counts.get(s, 0) for s in ledger.OWING)


async def test_over_spending_and_replays_are_refused_before_any_inference_runs(
    tmp_path: Path, tiny_model: Path, tiny_engine: VllmEngine, chain: Chain
) -> None:
    await trio.to_thread.run_sync(deposit, chain, CLIENT, PRICE + PRICE // 2)
    # Nobody settles during this test: the first request stays owed.
    settings = [("batch_size", "256"), ("max_age_s", "600"), ("takeover_s", "600")]
    async with prepaid_committee(tmp_path, tiny_model, tiny_engine, chain, settings) as nodes:
        a, b = nodes[0], nodes[1]
        first_params = await signed_job(a, CLIENT, prompt="one")
        first = await a.consensus.submit(first_params)
        await certified(a, first.request_id)

        # The balance covers one: a second is refused, by every node, before it runs.
        second = await signed_job(b, CLIENT, prompt="two")
        with pytest.raises(RpcError, match="insufficient_balance") as refused:
            await b.consensus.submit(second)
        assert "owed for pending requests" in refused.value.message
        for node in nodes:
            assert not any(j.offer.prompt == "two" for j in node.consensus.jobs.values())

        # The same signed request again, through any node: never a second job.
        with pytest.raises(RpcError, match="already submitted"):
            await b.consensus.submit(first_params)
        # The same nonce in another request: refused as used.
        nonce = prepaid_request_of(first.offer).nonce
        reused = await signed_job(a, CLIENT, prompt="three", nonce=nonce)
        with pytest.raises(RpcError, match="nonce_used"):
            await a.consensus.submit(reused)

        # A signature that is not the client's is refused by the relay at once.
        forged = await signed_job(a, dev_account(16), prompt="four")
        assert isinstance(forged.prepaid, SignedPrepaid)
        stolen = forged.model_copy(
            update={"prepaid": forged.prepaid.model_copy(update={"client": CLIENT.address})}
        )
        with pytest.raises(RpcError, match="signature is not"):
            await a.consensus.submit(stolen)

        # Another member settles the first request only when told to take over from the
        # committee's first-ranked member (prepaid.settle {"take_over": true}), who then
        # sees it settled.
        first_ranked = prepaid_request_of(first.offer).committee[0].lower()
        by_address = {n.consensus.address.lower(): n for n in nodes}
        other = next(n for address, n in by_address.items() if address != first_ranked)
        assert other.prepaid is not None
        assert await other.prepaid.settle_now() == 0  # its turn comes after takeover_s
        assert await other.prepaid.settle_now(take_over=True) == 1
        assert balance_of(chain, CLIENT) == PRICE // 2
        await wait_for(
            lambda: _count(by_address[first_ranked], "settled", 1), 30, "seen settled elsewhere"
        )


class KilledMidBatch(Exception):
    """The settler's process dying (in a test: its actor raising) during a batch."""


class DiesDuringBatch:
    """The node's chain, for a settler that dies while sending a batch: after the
    transaction reaches the chain (``after_send``), or before."""

    def __init__(self, chain: Any, *, after_send: bool) -> None:
        self._chain = chain
        self._after_send = after_send

    def __getattr__(self, name: str) -> Any:
        return getattr(self._chain, name)

    async def transact(self, call: Any, gas: int | None = None) -> Any:
        if self._after_send:
            await self._chain.transact(call, gas)
        raise KilledMidBatch


@pytest.mark.parametrize("after_send", [True, False])
async def test_a_settler_killed_mid_batch_resumes_and_settles_nothing_twice(
    tmp_path: Path, tiny_model: Path, tiny_engine: VllmEngine, chain: Chain, after_send: bool
) -> None:
    await trio.to_thread.run_sync(deposit, chain, CLIENT, 10 * PRICE)
    # The nodes' own settlers hold everything; a second settler over the first-ranked's
    # ledger does the work, and dies in the middle of it.
    settings = [("batch_size", "256"), ("max_age_s", "600"), ("takeover_s", "600")]
    async with prepaid_committee(tmp_path, tiny_model, tiny_engine, chain, settings) as nodes:
        a = nodes[0]
        jobs = [
            await a.consensus.submit(await signed_job(a, CLIENT, prompt=f"Hi {i}"))
            for i in range(3)
        ]
        results = [await certified(a, job.request_id) for job in jobs]
        first = results[0]["certificate"]["committee"][0]  # the same committee for all three
        settler = next(n for n in nodes if n.consensus.address == first)
        assert settler.chain is not None
        await wait_for(
            lambda: _count(settler, "certified", 3), 30, "the first-ranked member queued all three"
        )
        settler_settings = PrepaidSection(batch_size=1, max_age_s=600, takeover_s=600)
        _, no_events = trio.open_memory_channel[ChainEvent](0)
        key = NodeKey.load(settler.config.node.key_file)
        dying = PrepaidService(
            settler_settings,
            key,
            settler.state,
            DiesDuringBatch(settler.chain, after_send=after_send),
            NoPeers(),
            CollectorRegistry(),
            no_events,
        )
        killed = False
        try:
            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    await nursery.start(dying.run)
                    await trio.sleep_forever()
        except* KilledMidBatch:
            killed = True
        assert killed
        # Cut short while sending: unless the transaction landed and the node's own watcher
        # has already seen its requests settled.
        counts = await states(settler)
        if after_send:
            assert counts.get("sending", 0) + counts.get("settled", 0) == 3, counts
        else:
            assert counts.get("sending", 0) == 3, counts

        # Restarted: it asks the chain what landed, and sends only the rest.
        restarted = PrepaidService(
            settler_settings,
            key,
            settler.state,
            settler.chain,
            NoPeers(),
            CollectorRegistry(),
            no_events,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(restarted.run)
            await wait_for(lambda: _count(settler, "settled", 3), 60, "all three settled")
            nursery.cancel_scope.cancel()
        assert restarted.statistics().batches_sent == (0 if after_send else 1)
        assert balance_of(chain, CLIENT) == 7 * PRICE  # each paid once
        prepaid = chain.contract("PrepaidInference")
        logs = prepaid.events.Settled().get_logs(from_block=0)
        ids = [bytes(rid) for e in logs for rid in e["args"]["requestIds"]]
        for job in jobs:
            assert ids.count(prepaid_request_id(prepaid_request_of(job.offer))) == 1


async def _count(node: Node, state: str, n: int) -> bool:
    return (await states(node)).get(state, 0) == n


def certified_output(result: dict[str, Any]) -> str:
    """The output hash a job's certificate signs (hex, no 0x)."""
    return str(result["certificate"]["output_hash"]).removeprefix("0x")
