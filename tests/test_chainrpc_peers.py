"""Chain RPC failover across JoyNet peers, on three real nodes and an anvil chain.

The gateway's only upstream refuses connections, so every call goes to the peers that
advertise chain 31337 in their heartbeats. The first of them lies: it moves blocks a day
on (keeping their hash) and signs what it sends. The gateway refuses the block, keeps the
signed claim as evidence and penalizes the liar; once an honest peer joins, web3.py sees
anvil's own answers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import httpx
import trio
from web3 import Web3
from web3.types import TxParams

from joynode import wire
from joynode.chain.anvil import running_anvil
from joynode.chainrpc.proxy import UPSTREAM_UNAVAILABLE, Answer
from joynode.gateway import apikeys
from joynode.node import Node
from joynode.signatures import OFFCHAIN_DOMAIN, SOVEREIGN_RPC_DOMAIN_NAME, recover_address
from tests.chain_fixtures import refused_port
from tests.factories import LIBP2P_TEARDOWN_LEAK, fast_p2p, make_home, running_node, wait_for

pytestmark = LIBP2P_TEARDOWN_LEAK

# Nodes off any chain sign chain RPC answers in this domain (``Node._rpc_domain``).
DOMAIN = replace(OFFCHAIN_DOMAIN, name=SOVEREIGN_RPC_DOMAIN_NAME)


def serving_chain(tmp_path: Path, name: str, upstream: str, bootstrap: list[str]) -> Any:
    home = fast_p2p(make_home(tmp_path / name), bootstrap=bootstrap)
    # (anvil's "finalized" trails by 64 blocks: one block under the head will do here)
    chains = f'[{{chain_id = 31337, name = "a", upstreams = ["{upstream}"], finality_depth = 1}}]'
    home.set("rpc", "chains", chains)
    home.set("rpc", "max_attempts", "1")
    return home


def moving_blocks_on(
    signed: Callable[[wire.ChainCall, Answer, int], wire.ChainAnswer],
) -> Callable[[wire.ChainCall, Answer, int], wire.ChainAnswer]:
    """A node that signs blocks a day later than they are, hash unchanged."""

    def lie(call: wire.ChainCall, answer: Answer, final: int) -> wire.ChainAnswer:
        block = answer.get("result")
        if isinstance(block, dict) and "timestamp" in block:
            answer = {"result": {**block, "timestamp": hex(int(block["timestamp"], 16) + 86_400)}}
        return signed(call, answer, final)

    return lie


def serving_peers(node: Node) -> int:
    return sum(1 for r in node.p2p.peers.records() if 31337 in r.chains)


async def test_a_gateway_without_upstreams_gets_checked_answers_from_peers(
    tmp_path: Path,
) -> None:
    async with AsyncExitStack() as stack:
        anvil = await stack.enter_async_context(running_anvil(chain_id=31337))
        direct = Web3(Web3.HTTPProvider(anvil.url))
        account = direct.eth.accounts[0]
        for _ in range(3):  # block 1 final under block 3
            await trio.to_thread.run_sync(
                lambda: direct.eth.send_transaction(
                    cast(TxParams, {"from": account, "to": account, "value": 1})
                )
            )
        liar = await stack.enter_async_context(
            running_node(serving_chain(tmp_path, "liar", anvil.url, []))
        )
        liar.rpc.peers.signed = moving_blocks_on(liar.rpc.peers.signed)  # type: ignore[method-assign,assignment]
        dead = stack.enter_context(refused_port())
        gateway = await stack.enter_async_context(
            running_node(
                serving_chain(tmp_path, "gateway", f"http://127.0.0.1:{dead}", addrs_of(liar))
            )
        )
        await wait_for(lambda: serving_peers(gateway) == 1, 30, "the liar heard")
        key, _ = await gateway.state.write(lambda c: apikeys.create(c, "d", 10_000, None))
        assert gateway.http.url is not None
        url = gateway.http.url + "/rpc/31337"
        headers = {"authorization": f"Bearer {key}"}

        # 1. Only the liar serves the chain: its block is refused, never passed on.
        call = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "eth_getBlockByNumber",
            "params": ["0x1", False],
        }
        async with httpx.AsyncClient(timeout=30) as client:
            refused = (await client.post(url, json=call, headers=headers)).json()
        assert refused["error"]["code"] == UPSTREAM_UNAVAILABLE
        assert "its hash is not its header's" in refused["error"]["message"], refused
        (caught,) = gateway.rpc.statistics()["peers"]["evidence"]
        liar_address = liar.p2p.address_of(liar.p2p.peer_id)
        assert caught["peer"] == liar_address
        # The evidence holds the liar's signed claim: the true hash of a false header.
        block = direct.eth.get_block(1)
        claimed = json.loads(caught["answer"])["result"]["hash"]
        assert claimed == block["hash"].to_0x_hex()
        claim = DOMAIN.block_claim_digest(31337, 1, bytes.fromhex(claimed[2:]))
        assert recover_address(claim, bytes.fromhex(caught["block_signature"][2:])) == (
            liar_address
        )

        # 2. An honest peer joins: every answer is anvil's own, the liar asked no more.
        honest = await stack.enter_async_context(
            running_node(serving_chain(tmp_path, "honest", anvil.url, addrs_of(gateway)))
        )
        await wait_for(lambda: serving_peers(gateway) == 2, 30, "the honest peer heard")
        through = Web3(Web3.HTTPProvider(url, request_kwargs={"headers": headers}))

        def ask(w3: Web3) -> list[Any]:
            return [w3.eth.get_block(1), w3.eth.get_balance(account, 1), w3.eth.block_number]

        for _ in range(3):
            assert await trio.to_thread.run_sync(ask, through) == await trio.to_thread.run_sync(
                ask, direct
            )
        assert gateway.p2p.scorer.score(liar.p2p.peer_id) < 0
        assert honest.rpc.statistics()["peers"]["answered"] == 9
        assert liar.rpc.statistics()["peers"]["answered"] == 1
        chain = gateway.rpc.statistics()["chains"][0]
        assert (chain["from_peers"], chain["failed"]) == (9, 1)


def addrs_of(node: Node) -> list[str]:
    return [str(a) for a in node.p2p.listen_addrs()]
