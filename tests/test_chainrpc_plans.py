"""SovereignRPC with its contract, on real nodes and a real anvil chain: a wallet calls
``/rpc`` only with a plan, the calls it made are reported in a batch and paid to the
provider, and a peer's signed wrong block is slashed on the chain it lied about."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import trio
from eth_account.signers.local import LocalAccount

from joynode import wire
from joynode.chain.deploy import JOY
from joynode.chainrpc.peers import ChainPeers
from joynode.chainrpc.proxy import UPSTREAM_UNAVAILABLE, Answer
from joynode.control.client import ControlClient
from joynode.gateway import apikeys
from joynode.keys import NodeKey
from joynode.node import Node
from tests.chain_fixtures import Chain, anvil_url, chain, deployed, dev_account, refused_port
from tests.factories import (
    LIBP2P_TEARDOWN_LEAK,
    NodeHome,
    fast_p2p,
    make_home,
    running_node,
    wait_for,
)
from tests.test_gateway_wallets import sign_in

__all__ = ["anvil_url", "chain", "deployed"]  # fixtures used by name below

pytestmark = LIBP2P_TEARDOWN_LEAK

CONTRACT = "EnhancedSovereignRPC"
PROVIDER, LIAR, GATEWAY, WALLET = 10, 11, 12, 19  # dev accounts the fixture gave JOY
CALL_REWARD = JOY // 2000  # DeployParams' devnet value: 0.0005 JOY a call


def provider_home(
    tmp_path: Path, chain: Chain, account: LocalAccount, upstream: str, bootstrap: list[str]
) -> NodeHome:
    """A node on ``chain`` whose key is ``account``, serving chain 31337 at ``/rpc``."""
    home = fast_p2p(make_home(tmp_path / account.address), bootstrap=bootstrap)
    NodeKey(bytes(account.key)).save(home.config.node.key_file, force=True)
    deployment = tmp_path / "deployment.json"
    chain.deployment.write(deployment)
    home.set("chain", "mode", '"rpc"')
    home.set("chain", "rpc_url", f'"{chain.url}"')
    home.set("chain", "deployment_file", f'"{deployment}"')
    home.set("chain", "poll_interval_s", "0.1")
    entry = f'{{chain_id = 31337, name = "a", upstreams = ["{upstream}"], finality_depth = 1}}'
    home.set("rpc", "chains", f"[{entry}]")
    home.set("rpc", "max_attempts", "1")
    return home


@asynccontextmanager
async def control(node: Node) -> AsyncIterator[ControlClient]:
    assert node.control.url is not None
    token = node.config.control.token_file.read_text().strip()
    async with ControlClient.connect(node.control.url, token) as client:
        yield client


async def rpc_call(node: Node, token: str, method: str, params: list[Any]) -> httpx.Response:
    assert node.http.url is not None
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.post(
            f"{node.http.url}/rpc/31337",
            json={"jsonrpc": "2.0", "id": 1, "method": method, "params": params},
            headers={"authorization": f"Bearer {token}"},
        )


def subscribe(chain: Chain, wallet: LocalAccount, days: int) -> None:
    rpc = chain.contract(CONTRACT)
    sender = chain.sender(wallet)
    price = int(rpc.functions.pricePerDay().call()) * days
    sender.transact(chain.contract("JoyToken").functions.approve(rpc.address, price))
    sender.transact(rpc.functions.subscribe(days))


async def test_a_wallet_calls_with_a_plan_and_its_calls_are_reported_and_paid(
    tmp_path: Path, chain: Chain
) -> None:
    provider, wallet = dev_account(PROVIDER), dev_account(WALLET)
    home = provider_home(tmp_path, chain, provider, chain.url, [])
    async with running_node(home) as node, control(node) as ctl:
        registered = await ctl.call("rpc.register", {"chain_id": 31337, "deposit_joy": 100})
        assert len(registered["txs"]) == 2
        await wait_for(
            lambda: _active(ctl, provider.address), 15, "the provider mirrored as active"
        )
        assert node.http.url is not None
        async with httpx.AsyncClient(base_url=node.http.url, timeout=30) as client:
            token = await sign_in(client, wallet)

        # No plan: 402 before any upstream is asked.
        refused = await rpc_call(node, token, "eth_blockNumber", [])
        assert refused.status_code == 402, refused.text
        assert refused.json()["error"]["code"] == "insufficient_quota"
        assert CONTRACT in refused.json()["error"]["message"]

        await trio.to_thread.run_sync(subscribe, chain, wallet, 1)
        await wait_for(lambda: _authorized(ctl, wallet.address), 15, "the plan mirrored")
        for _ in range(5):
            answered = await rpc_call(node, token, "eth_blockNumber", [])
            assert answered.status_code == 200
            assert int(answered.json()["result"], 16) == chain.w3.eth.block_number
        # The operator's own API keys call without a plan, and are not reported.
        key, _ = await node.state.write(lambda c: apikeys.create(c, "ops", 600, None))
        assert (await rpc_call(node, key, "eth_chainId", [])).json()["result"] == "0x7a69"

        rpc = chain.contract(CONTRACT)
        use = chain.contract("ProofOfUse")
        usage_key = rpc.functions.usageKey(31337).call()
        before = int(use.functions.unitsByModel(usage_key).call())
        await node.rpc.plans.flush()
        await node.rpc.plans.report()
        assert node.rpc.statistics()["usage"] == {
            "reports": 1,
            "reported_calls": 5,
            "unflushed_calls": 0,
        }
        assert int(use.functions.unitsByModel(usage_key).call()) == before + 5
        assert int(rpc.functions.earnings(provider.address).call()) == 5 * CALL_REWARD
        await node.rpc.plans.report()  # nothing left to report: no second transaction
        assert node.rpc.statistics()["usage"]["reports"] == 1

        balance = chain.balance(provider.address)
        claimed = await ctl.call("rpc.claim")
        assert claimed["claimed"] == str(5 * CALL_REWARD)
        assert chain.balance(provider.address) == balance + 5 * CALL_REWARD
        (listed,) = await ctl.call("rpc.providers", {"chain_id": 31337})
        assert listed["provider"] == provider.address.lower()
        assert listed["deposit"] == str(100 * JOY)


async def _active(ctl: ControlClient, address: str) -> bool:
    listed = await ctl.call("rpc.providers", {"chain_id": 31337})
    return any(p["provider"] == address.lower() and p["active"] for p in listed)


async def _authorized(ctl: ControlClient, address: str) -> bool:
    return bool((await ctl.call("rpc.plan", {"client": address}))["authorized"])


def naming_another_hash(
    signed: Callable[[wire.ChainCall, Answer, int], wire.ChainAnswer],
) -> Callable[[wire.ChainCall, Answer, int], wire.ChainAnswer]:
    """A node that signs blocks under a hash they do not have."""

    def lie(call: wire.ChainCall, answer: Answer, final: int) -> wire.ChainAnswer:
        block = answer.get("result")
        if isinstance(block, dict) and "hash" in block:
            answer = {"result": {**block, "hash": "0x" + "ab" * 32}}
        return signed(call, answer, final)

    return lie


async def test_a_peer_signing_a_wrong_block_is_slashed_on_the_chain_it_lied_about(
    tmp_path: Path, chain: Chain
) -> None:
    liar_account, gateway_account = dev_account(LIAR), dev_account(GATEWAY)
    async with AsyncExitStack() as stack:
        liar = await stack.enter_async_context(
            running_node(provider_home(tmp_path, chain, liar_account, chain.url, []))
        )
        peers: ChainPeers = liar.rpc.peers
        peers.signed = naming_another_hash(peers.signed)  # type: ignore[method-assign,assignment]
        liar_ctl = await stack.enter_async_context(control(liar))
        await liar_ctl.call("rpc.register", {"chain_id": 31337, "deposit_joy": 100})
        dead = stack.enter_context(refused_port())
        addrs = [str(a) for a in liar.p2p.listen_addrs()]
        gateway = await stack.enter_async_context(
            running_node(
                provider_home(tmp_path, chain, gateway_account, f"http://127.0.0.1:{dead}", addrs)
            )
        )
        await wait_for(
            lambda: any(31337 in r.chains for r in gateway.p2p.peers.records()),
            30,
            "the liar heard",
        )
        key, _ = await gateway.state.write(lambda c: apikeys.create(c, "ops", 600, None))
        number = chain.w3.eth.block_number - 2
        liar_front = liar.rpc.proxy(31337)
        assert liar_front is not None
        await wait_for(
            lambda: (liar_front.finalized or 0) >= number, 15, "the block final for the liar"
        )
        lied = await rpc_call(gateway, key, "eth_getBlockByNumber", [hex(number), False])
        assert lied.json()["error"]["code"] == UPSTREAM_UNAVAILABLE

        rpc = chain.contract(CONTRACT)
        deposit = int(rpc.functions.providerOf(liar_account.address, 31337).call()[0])
        bounty_before = chain.balance(gateway_account.address)
        async with control(gateway) as ctl:
            status = await ctl.call("rpc.status")
            (evidence,) = status["peers"]["evidence"]
            assert evidence["block"][0] == number
            slashed = await ctl.call("rpc.slash", {"evidence": 0})
            assert slashed["provider"] == liar_account.address
            again = None
            try:
                await ctl.call("rpc.slash", {"evidence": 0})
            except Exception as exc:  # the contract's ClaimUsed, said plainly
                again = str(exc)
            assert again is not None
            assert "ClaimUsed" in again
        deposit_after, _, _, _, _, slashes = rpc.functions.providerOf(
            liar_account.address, 31337
        ).call()
        taken = deposit // 10  # slashBps 1000
        assert (int(deposit_after), int(slashes)) == (deposit - taken, 1)
        assert chain.balance(gateway_account.address) == bounty_before + taken // 2
