"""The chain RPC gateway on a real node, for two anvil chains, used by web3.py as its RPC
URL: every answer equals anvil's own, through an upstream killed mid-run, and
subscriptions arrive over its websocket.

Chain A (31337) has two upstreams: a TCP forwarder in front of anvil (killed halfway)
and anvil itself; chain B (31338) has one.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, cast

import httpx
import trio
from eth_typing import HexStr
from hexbytes import HexBytes
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from web3 import AsyncWeb3, Web3
from web3.providers import WebSocketProvider
from web3.types import RPCEndpoint, TxParams

from joynode.chain.anvil import running_anvil
from joynode.chainrpc.integrity import header_hash
from joynode.gateway import apikeys
from joynode.node import Node
from tests.factories import LIBP2P_TEARDOWN_LEAK, make_home, running_node, wait_for

pytestmark = LIBP2P_TEARDOWN_LEAK

TOPIC = "ee" * 32
# A contract that logs its calldata under one topic: runtime
# CALLDATASIZE 0 0 CALLDATACOPY PUSH32 topic CALLDATASIZE 0 LOG1 STOP, and the init code
# that returns it.
RUNTIME = "3660006000377f" + TOPIC + "366000a100"
EMITTER = "60" + f"{len(RUNTIME) // 2:02x}" + "80600b6000396000f3" + RUNTIME


async def _pump(source: trio.SocketStream, sink: trio.SocketStream) -> None:
    try:
        while data := await source.receive_some(65536):
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


@asynccontextmanager
async def forwarder(target: str) -> AsyncIterator[tuple[str, trio.CancelScope]]:
    """A TCP forwarder to ``target`` (host:port): its URL, and a scope that kills it."""
    host, _, port = target.rpartition(":")

    async def handle(client: trio.SocketStream) -> None:
        async with (
            client,
            await trio.open_tcp_stream(host, int(port)) as upstream,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(_pump, client, upstream)
            nursery.start_soon(_pump, upstream, client)

    async def serve(*, task_status: trio.TaskStatus[tuple[int, trio.CancelScope]]) -> None:
        with trio.CancelScope() as scope:  # cancelling it kills the forwarder, not the test
            async with trio.open_nursery() as nursery:
                listeners = await nursery.start(trio.serve_tcp, handle, 0)
                task_status.started((listeners[0].socket.getsockname()[1], scope))

    async with trio.open_nursery() as nursery:
        listen_port, scope = await nursery.start(serve)
        yield f"http://127.0.0.1:{listen_port}", scope
        nursery.cancel_scope.cancel()


def workload(gateway: Web3, direct: Web3, transfers: int) -> list[str]:
    """What a dapp does: a deploy, transfers, contract calls that log; the hashes."""
    sender, receiver = list(direct.eth.accounts)[:2]
    hashes = []

    def send(tx: dict[str, Any]) -> HexBytes:
        return gateway.eth.send_transaction(cast(TxParams, {"from": sender, **tx}))

    deploy = send({"data": "0x" + EMITTER})
    contract = gateway.eth.wait_for_transaction_receipt(deploy)["contractAddress"]
    hashes.append(deploy.to_0x_hex())
    for i in range(transfers):
        sent = send({"to": receiver, "value": 10**15 + i})
        logged = send({"to": contract, "data": "0x" + f"{i:064x}"})
        for tx in (sent, logged):
            assert gateway.eth.wait_for_transaction_receipt(tx)["status"] == 1
            hashes.append(tx.to_0x_hex())
    return hashes


def same_answers(gateway: Web3, direct: Web3, hashes: list[str]) -> None:
    """Every block, transaction, receipt, log and balance, through the gateway and not."""
    head = direct.eth.block_number
    assert gateway.eth.block_number == head
    for number in range(head + 1):
        assert gateway.eth.get_block(number, True) == direct.eth.get_block(number, True)
    for tx in hashes:
        assert gateway.eth.get_transaction(HexStr(tx)) == direct.eth.get_transaction(HexStr(tx))
        receipt = direct.eth.get_transaction_receipt(HexStr(tx))
        assert gateway.eth.get_transaction_receipt(HexStr(tx)) == receipt
    query = {"fromBlock": 0, "toBlock": head, "topics": ["0x" + TOPIC]}
    logs = direct.eth.get_logs(query)  # type: ignore[arg-type]
    assert logs
    assert gateway.eth.get_logs(query) == logs  # type: ignore[arg-type]
    for account in direct.eth.accounts[:3]:
        assert gateway.eth.get_balance(account) == direct.eth.get_balance(account)
        assert gateway.eth.get_balance(account, 1) == direct.eth.get_balance(account, 1)


def rpc_status(node: Node) -> dict[str, Any]:
    return node.rpc.statistics()


async def test_web3_gets_anvils_answers_on_two_chains_through_an_upstream_killed_midway(
    tmp_path: Path,
) -> None:
    async with (
        running_anvil(chain_id=31337) as anvil_a,
        running_anvil(chain_id=31338) as anvil_b,
        forwarder(anvil_a.url.removeprefix("http://")) as (forwarded, kill),
    ):
        home = make_home(tmp_path / "n")
        chains = (
            f'[{{chain_id = 31337, name = "a", upstreams = ["{forwarded}", "{anvil_a.url}"]}}, '
            f'{{chain_id = 31338, name = "b", upstreams = ["{anvil_b.url}"]}}]'
        )
        home.set("rpc", "chains", chains)
        home.set("rpc", "head_poll_s", "0.2")
        async with running_node(home) as node:
            key, _ = await node.state.write(lambda c: apikeys.create(c, "dapp", 100_000, None))
            headers = {"authorization": f"Bearer {key}"}
            auth = {"headers": headers}
            assert node.http.url is not None
            gateway_a = Web3(Web3.HTTPProvider(node.http.url + "/rpc/31337", request_kwargs=auth))
            gateway_b = Web3(Web3.HTTPProvider(node.http.url + "/rpc/31338", request_kwargs=auth))
            direct_a, direct_b = (
                Web3(Web3.HTTPProvider(anvil_a.url)),
                Web3(Web3.HTTPProvider(anvil_b.url)),
            )
            assert await trio.to_thread.run_sync(lambda: gateway_a.eth.chain_id) == 31337
            assert await trio.to_thread.run_sync(lambda: gateway_b.eth.chain_id) == 31338

            hashes = await trio.to_thread.run_sync(workload, gateway_a, direct_a, 3)
            used = rpc_status(node)["chains"][0]["upstreams"]
            assert used[0]["calls"] > 0  # the forwarder served its share
            kill.cancel()  # the first upstream dies mid-run
            hashes += await trio.to_thread.run_sync(workload, gateway_a, direct_a, 3)
            hashes_b = await trio.to_thread.run_sync(workload, gateway_b, direct_b, 2)

            # 70 blocks more: the early ones become final (anvil: 64 deep), so kept.
            mine = partial(direct_a.provider.make_request, RPCEndpoint("anvil_mine"), ["0x46"])
            await trio.to_thread.run_sync(mine)
            await trio.sleep(0.5)  # a head poll
            for _ in range(2):
                await trio.to_thread.run_sync(same_answers, gateway_a, direct_a, hashes)
            await trio.to_thread.run_sync(same_answers, gateway_b, direct_b, hashes_b)

            status = rpc_status(node)
            a = status["chains"][0]
            assert a["failed"] == 0  # no client call failed, upstream killed or not
            assert (a["finalized"] or 0) > 0
            assert a["cached"] > 0  # final blocks and receipts, the second time
            killed = a["upstreams"][0]
            assert killed["failures"] > 0
            assert killed["url"] == forwarded  # (named without a path or a key)

            # Unauthorized, unknown chain, not JSON: clear errors, the node serves on.
            url = node.http.url + "/rpc/31337"
            call = {"jsonrpc": "2.0", "id": 1, "method": "eth_blockNumber"}
            async with httpx.AsyncClient() as client:
                assert (await client.post(url, json=call)).status_code == 401
                other = await client.post(node.http.url + "/rpc/5", json=call, headers=headers)
                assert other.status_code == 404
                assert "31337, 31338" in other.json()["error"]["message"]
                garbage = await client.post(url, content=b"{", headers=headers)
                assert garbage.json()["error"]["code"] == -32700
                batch = await client.post(url, json=[call, {**call, "id": 2}], headers=headers)
                assert [r["id"] for r in batch.json()] == [1, 2]

            # Subscriptions over the gateway's websocket (web3.py's own provider).
            ws_url = node.http.url.replace("http", "ws") + f"/rpc/31337?token={key}"
            heads = await trio.to_thread.run_sync(subscribed_heads, ws_url, anvil_a.url)
            assert heads == sorted(heads)
            assert len(heads) == 2


def subscribed_heads(ws_url: str, anvil: str) -> list[int]:
    """Two ``newHeads`` notifications through the gateway, for blocks mined directly."""

    async def run() -> list[int]:
        async with AsyncWeb3(WebSocketProvider(ws_url)) as w3:
            assert await w3.eth.chain_id == 31337  # a call through the proxy, same socket
            await w3.eth.subscribe("newHeads")
            direct = Web3(Web3.HTTPProvider(anvil))
            heads: list[int] = []
            direct.provider.make_request("evm_mine", [])  # type: ignore[arg-type]
            async for message in w3.socket.process_subscriptions():
                heads.append(int(message["result"]["number"]))
                if len(heads) == 2:
                    return heads
                direct.provider.make_request("evm_mine", [])  # type: ignore[arg-type]
        raise AssertionError("the subscription ended")

    return asyncio.run(asyncio.wait_for(run(), 30))


class Liar:
    """An upstream in front of anvil that lies: ``lie(method, params, result)`` rewrites a
    result (or returns it as it is); each answer after ``delay_s``."""

    def __init__(self, anvil: str, lie: Callable[[str, Any, Any], Any], delay_s: float) -> None:
        self.anvil, self.lie, self.delay_s = anvil, lie, delay_s
        self.app = Starlette(routes=[Route("/", self.forward, methods=["POST"])])

    async def forward(self, request: Request) -> JSONResponse:
        await trio.sleep(self.delay_s)
        body = json.loads(await request.body())
        async with httpx.AsyncClient() as client:
            reply = (await client.post(self.anvil, json=body)).json()
        calls = body if isinstance(body, list) else [body]
        answers = reply if isinstance(reply, list) else [reply]
        for call, answer in zip(calls, answers, strict=True):
            if "result" in answer:
                answer["result"] = self.lie(call["method"], call.get("params"), answer["result"])
        return JSONResponse(answers if isinstance(body, list) else answers[0])


@asynccontextmanager
async def serving(app: Any) -> AsyncIterator[str]:
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, app, config, mode="asgi"))
        yield "http://" + binds[0].removeprefix("http://")
        nursery.cancel_scope.cancel()


def honest(method: str, params: Any, result: Any) -> Any:
    return result


def rich(method: str, params: Any, result: Any) -> Any:
    """Claims one more ether than anyone has."""
    if method == "eth_getBalance":
        return hex(int(result, 16) + 10**18)
    return result


def time_traveller(method: str, params: Any, result: Any) -> Any:
    """Moves blocks a day on, keeping their hash."""
    if method == "eth_getBlockByNumber" and isinstance(result, dict):
        return {**result, "timestamp": hex(int(result["timestamp"], 16) + 86_400)}
    return result


async def test_an_upstream_lying_about_a_balance_or_a_block_is_caught_and_excluded(
    tmp_path: Path,
) -> None:
    async with running_anvil(chain_id=31337) as anvil:
        direct = Web3(Web3.HTTPProvider(anvil.url))
        sender = direct.eth.accounts[0]
        for lie, ask in (
            (rich, lambda w3: w3.eth.get_balance(sender, 1)),
            (time_traveller, lambda w3: w3.eth.get_block(1)),
        ):
            # The liar answers at once, the honest upstream slowly: the liar ranks first.
            async with (
                serving(Liar(anvil.url, lie, 0).app) as lying,
                serving(Liar(anvil.url, honest, 0.2).app) as slow,
            ):
                home = make_home(tmp_path / lie.__name__)
                upstreams = f'["{lying}", "{slow}"]'
                chains = f'[{{chain_id = 31337, name = "a", upstreams = {upstreams}}}]'
                home.set("rpc", "chains", chains)
                home.set("rpc", "hedge_after_s", "0")
                async with running_node(home) as node:
                    key, _ = await node.state.write(lambda c: apikeys.create(c, "d", 10_000, None))
                    assert node.http.url is not None
                    gateway = Web3(
                        Web3.HTTPProvider(
                            node.http.url + "/rpc/31337",
                            request_kwargs={"headers": {"authorization": f"Bearer {key}"}},
                        )
                    )
                    await trio.to_thread.run_sync(
                        lambda: direct.eth.send_transaction(
                            cast(TxParams, {"from": sender, "to": sender, "value": 1})
                        )
                    )
                    # The true answer, from the honest upstream, each time.
                    for _ in range(3):
                        got = await trio.to_thread.run_sync(ask, gateway)
                        assert got == await trio.to_thread.run_sync(ask, direct)
                    upstreams = node.rpc.statistics()["chains"][0]["upstreams"]
                    assert upstreams[0]["excluded"], upstreams  # the liar
                    assert upstreams[1]["excluded"] is None
                    assert node.rpc.statistics()["chains"][0]["failed"] == 0


VIEM_CLIENT = Path(__file__).with_name("viem_rpc_client.mjs")


async def test_viem_gets_the_chains_own_answers_through_the_gateway_on_two_chains(
    tmp_path: Path,
) -> None:
    async with running_anvil(chain_id=31337) as anvil_a, running_anvil(chain_id=31338) as anvil_b:
        home = make_home(tmp_path / "n")
        chains = (
            f'[{{chain_id = 31337, name = "a", upstreams = ["{anvil_a.url}"]}}, '
            f'{{chain_id = 31338, name = "b", upstreams = ["{anvil_b.url}"]}}]'
        )
        home.set("rpc", "chains", chains)
        async with running_node(home) as node:
            key, _ = await node.state.write(lambda c: apikeys.create(c, "viem", 100_000, None))
            assert node.http.url is not None
            for chain_id, anvil in ((31337, anvil_a), (31338, anvil_b)):
                stdin = json.dumps(
                    {
                        "gateway": f"{node.http.url}/rpc/{chain_id}",
                        "direct": anvil.url,
                        "token": key,
                        "emitter": "0x" + EMITTER,
                    }
                )
                done = await trio.run_process(
                    ["node", str(VIEM_CLIENT)],
                    stdin=stdin.encode(),
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                    cwd=VIEM_CLIENT.parent.parent,
                )
                assert done.returncode == 0, done.stderr.decode()[-2000:]
                outcome = json.loads(done.stdout)
                assert outcome["chainId"] == chain_id
                assert len(outcome["hashes"]) == 7
                assert outcome["mismatches"] == []
            assert all(c["failed"] == 0 for c in node.rpc.statistics()["chains"])


def rehashed(method: str, params: Any, result: Any) -> Any:
    """Moves blocks a day on and hashes them again: each block is consistent in itself,
    only not the chain's."""
    if method == "eth_getBlockByNumber" and isinstance(result, dict):
        moved = {**result, "timestamp": hex(int(result["timestamp"], 16) + 86_400)}
        return {**moved, "hash": "0x" + header_hash(moved).hex()}
    return result


async def test_a_consistent_forged_block_is_outvoted_by_the_majority_head(
    tmp_path: Path,
) -> None:
    """Two honest upstreams and a fast liar whose blocks hash right: the canonical window
    (the head two of three agree on, chained down by parent hash) catches the liar."""
    async with running_anvil(chain_id=31337) as anvil:
        direct = Web3(Web3.HTTPProvider(anvil.url))
        sender = direct.eth.accounts[0]
        for _ in range(6):
            direct.eth.send_transaction(cast(TxParams, {"from": sender, "to": sender, "value": 1}))
        async with (
            serving(Liar(anvil.url, rehashed, 0).app) as lying,
            serving(Liar(anvil.url, honest, 0.2).app) as slow,
            serving(Liar(anvil.url, honest, 0.2).app) as slower,
        ):
            home = make_home(tmp_path / "node")
            upstreams = f'["{lying}", "{slow}", "{slower}"]'
            entry = f'chain_id = 31337, name = "a", upstreams = {upstreams}, finality_depth = 2'
            home.set("rpc", "chains", f"[{{{entry}}}]")
            home.set("rpc", "hedge_after_s", "0")
            home.set("rpc", "head_poll_s", "0.2")
            async with running_node(home) as node:
                key, _ = await node.state.write(lambda c: apikeys.create(c, "d", 10_000, None))
                assert node.http.url is not None
                gateway = Web3(
                    Web3.HTTPProvider(
                        node.http.url + "/rpc/31337",
                        request_kwargs={"headers": {"authorization": f"Bearer {key}"}},
                    )
                )
                proxy = node.rpc.proxy(31337)
                assert proxy is not None
                await wait_for(lambda: proxy.window.hash_at(2) is not None, 15, "the window")
                for number in (4, 3, 2, 1):  # final: under the head by two
                    got = await trio.to_thread.run_sync(gateway.eth.get_block, number)
                    assert got == direct.eth.get_block(number)
                upstreams = node.rpc.statistics()["chains"][0]["upstreams"]
                assert "most upstreams chain to" in upstreams[0]["excluded"], upstreams
                assert [u["excluded"] for u in upstreams[1:]] == [None, None]
