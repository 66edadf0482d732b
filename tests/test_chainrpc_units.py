"""The chain RPC gateway's parts alone, upstreams faked with httpx's MockTransport (no
sockets): what is kept and for how long, failover, circuit breakers, hedging, shared
calls, eth_getLogs splitting, and requests that are not JSON-RPC."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
import trio

from joynode.chainrpc.api import CallLimit
from joynode.chainrpc.cache import AnswerCache
from joynode.chainrpc.canonical import CanonicalWindow
from joynode.chainrpc.integrity import Forged, check_block, header_hash
from joynode.chainrpc.methods import Keep, rule_of
from joynode.chainrpc.proxy import INVALID_REQUEST, UPSTREAM_UNAVAILABLE, ChainProxy
from joynode.chainrpc.upstreams import (
    Circuit,
    Upstream,
    UpstreamFailure,
    UpstreamPool,
    redacted,
)
from joynode.config import RpcChainEntry, RpcSection
from joynode.gateway.wallets import WalletSession

HASH = "0x" + "ab" * 32
Handler = Callable[[dict[str, Any]], Awaitable[Any]]


@pytest.mark.parametrize(
    ("method", "params", "keep", "block"),
    [
        ("eth_chainId", [], Keep.FOREVER, None),
        ("eth_getBlockByHash", [HASH, False], Keep.BY_HASH, None),
        ("eth_getBlockByNumber", ["0x10", True], Keep.IF_FINAL, 16),
        ("eth_getBlockByNumber", ["latest", True], Keep.NEVER, None),
        ("eth_getBlockByNumber", ["finalized", True], Keep.NEVER, None),
        ("eth_getBlockByNumber", ["earliest", False], Keep.IF_FINAL, 0),
        ("eth_getBalance", ["0x" + "11" * 20, "0x5"], Keep.IF_FINAL, 5),
        ("eth_getBalance", ["0x" + "11" * 20], Keep.NEVER, None),
        ("eth_getBalance", ["0x" + "11" * 20, "pending"], Keep.NEVER, None),
        ("eth_call", [{"to": "0x" + "11" * 20}, {"blockHash": HASH}], Keep.BY_HASH, None),
        ("eth_call", [{"to": "0x" + "11" * 20}, {"blockNumber": "0x7"}], Keep.IF_FINAL, 7),
        ("eth_getStorageAt", ["0x" + "11" * 20, "0x0", "0x3"], Keep.IF_FINAL, 3),
        ("eth_getTransactionReceipt", [HASH], Keep.RESULT_FINAL, None),
        ("eth_getLogs", [{"fromBlock": "0x1", "toBlock": "0x9"}], Keep.IF_FINAL, 9),
        ("eth_getLogs", [{"fromBlock": "0x1"}], Keep.NEVER, None),  # toBlock: latest
        ("eth_getLogs", [{"blockHash": HASH}], Keep.BY_HASH, None),
        ("eth_sendRawTransaction", ["0x00"], Keep.NEVER, None),
        ("eth_blockNumber", [], Keep.NEVER, None),
        ("eth_getBlockByNumber", ["0x010", True], Keep.NEVER, None),  # not a quantity
    ],
)
def test_only_what_cannot_change_is_kept(
    method: str, params: list[Any], keep: Keep, block: int | None
) -> None:
    rule = rule_of(method, params)
    assert (rule.keep, rule.block) == (keep, block)


def test_upstreams_are_named_without_their_keys() -> None:
    assert redacted("https://mainnet.example.io/v3/SECRET?key=x") == "https://mainnet.example.io"
    assert redacted("http://user:pw@127.0.0.1:8545/") == "http://127.0.0.1:8545"


class Upstreams:
    """Fake upstreams by host: each answers with its handler (or raises), counted."""

    def __init__(self, **handlers: Handler) -> None:
        self.handlers = handlers
        self.calls: Counter[str] = Counter()
        self.methods: list[tuple[str, str, Any]] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        decoded = json.loads(request.content)
        self.calls[host] += 1
        answers = []
        for body in decoded if isinstance(decoded, list) else [decoded]:
            self.methods.append((host, body["method"], body.get("params")))
            result = await self.handlers[host](body)
            if isinstance(result, httpx.Response):
                return result
            answers.append({"jsonrpc": "2.0", "id": body["id"], "result": result})
        return httpx.Response(200, json=answers if isinstance(decoded, list) else answers[0])


def settings(**changes: Any) -> RpcSection:
    return RpcSection(**{"hedge_after_s": 0, "breaker_cooldown_s": 5, **changes})


def answering(value: Any, delay_s: float = 0.0) -> Handler:
    async def handler(_: dict[str, Any]) -> Any:
        await trio.sleep(delay_s)
        return value

    return handler


def down(_: dict[str, Any]) -> Awaitable[Any]:
    raise httpx.ConnectError("connection refused")


async def test_a_failing_upstream_is_passed_over_and_ranked_behind_the_healthy_one() -> None:
    fake = Upstreams(a=down, b=answering("0x1"))
    async with httpx.AsyncClient(transport=httpx.MockTransport(fake)) as client:
        pool = UpstreamPool(["http://a", "http://b"], settings(), client)
        for _ in range(4):
            assert await pool.call("eth_blockNumber", []) == {"result": "0x1"}
        assert fake.calls == {"a": 1, "b": 4}  # once failed, a ranks behind b
        assert [u.label for u in pool.ranked()] == ["http://b", "http://a"]


def test_failures_in_a_row_open_the_circuit_until_a_trial_after_the_cooldown() -> None:
    now = [0.0]
    upstream = Upstream("http://a", settings(breaker_failures=3), lambda: now[0])
    upstream.failed()
    upstream.succeeded(0.01)  # a success in between: not in a row
    for _ in range(3):
        assert upstream.available()
        upstream.failed()
    assert upstream.circuit is Circuit.OPEN
    assert not upstream.available()
    now[0] += 5
    assert upstream.available()  # cooled down: half open, a trial may go
    assert upstream.statistics().circuit == "half_open"
    upstream.failed()  # the trial failed: open again, for another cooldown
    assert not upstream.available()
    now[0] += 5
    assert upstream.available()
    upstream.succeeded(0.01)
    assert upstream.statistics().circuit == "closed"


async def test_every_upstream_down_is_a_clear_failure_within_the_attempts() -> None:
    fake = Upstreams(a=down, b=down, c=down, d=down)
    async with httpx.AsyncClient(transport=httpx.MockTransport(fake)) as client:
        pool = UpstreamPool([f"http://{h}" for h in "abcd"], settings(max_attempts=3), client)
        with pytest.raises(UpstreamFailure, match="connection refused"):
            await pool.call("eth_blockNumber", [])
        assert sum(fake.calls.values()) == 3  # the retry budget


async def test_a_slow_read_is_hedged_and_the_first_answer_wins() -> None:
    fake = Upstreams(a=answering("slow", 5.0), b=answering("fast"))
    async with httpx.AsyncClient(transport=httpx.MockTransport(fake)) as client:
        pool = UpstreamPool(["http://a", "http://b"], settings(hedge_after_s=0.05), client)
        with trio.fail_after(2):
            assert await pool.call("eth_getBalance", ["0x0"], hedge=True) == {"result": "fast"}
        writes = UpstreamPool(["http://a", "http://b"], settings(hedge_after_s=0.05), client)
        with trio.fail_after(10):  # a write is never hedged: it waits for the first
            assert await writes.call("eth_sendRawTransaction", ["0x00"]) == {"result": "slow"}


async def test_throttled_and_broken_answers_fail_over_but_a_revert_is_an_answer() -> None:
    async def throttled(body: dict[str, Any]) -> Any:
        return httpx.Response(429, text="slow down")

    async def reverted(body: dict[str, Any]) -> Any:
        error = {"code": 3, "message": "execution reverted"}
        return httpx.Response(200, json={"jsonrpc": "2.0", "id": body["id"], "error": error})

    async def garbage(body: dict[str, Any]) -> Any:
        return httpx.Response(200, text="<html>")

    fake = Upstreams(a=throttled, b=garbage, c=reverted)
    async with httpx.AsyncClient(transport=httpx.MockTransport(fake)) as client:
        pool = UpstreamPool([f"http://{h}" for h in "abc"], settings(), client)
        answer = await pool.call("eth_call", [{}])
        assert answer == {"error": {"code": 3, "message": "execution reverted"}}
        assert fake.calls == {"a": 1, "b": 1, "c": 1}


def block(number: int, parent: str = HASH, extra: str = "0x") -> dict[str, Any]:
    """A block header that hashes to its hash."""
    fields: dict[str, Any] = {
        "parentHash": parent,
        "sha3Uncles": HASH,
        "miner": "0x" + "00" * 20,
        "stateRoot": HASH,
        "transactionsRoot": HASH,
        "receiptsRoot": HASH,
        "logsBloom": "0x" + "00" * 256,
        "difficulty": "0x0",
        "number": hex(number),
        "gasLimit": "0x1c9c380",
        "gasUsed": "0x0",
        "timestamp": hex(1_700_000_000 + number),
        "extraData": extra,
        "mixHash": HASH,
        "nonce": "0x0000000000000000",
    }
    return {**fields, "hash": "0x" + header_hash(fields).hex()}


def test_a_block_is_checked_against_its_hash() -> None:
    good = block(5)
    check_block(good)
    check_block(None)  # not found: nothing claimed
    for forged in (
        {**good, "timestamp": "0x1"},  # altered, the hash kept
        {**good, "hash": HASH},  # a hash of nothing
        {**good, "number": "five"},
    ):
        with pytest.raises(Forged):
            check_block(forged)


def chain_proxy(client: httpx.AsyncClient, **changes: Any) -> ChainProxy:
    chain = RpcChainEntry(chain_id=7, name="test", upstreams=["http://a"])
    rpc = settings(**changes)
    return ChainProxy(chain, UpstreamPool(["http://a"], rpc, client), AnswerCache(1 << 20), rpc)


async def test_final_answers_are_kept_and_others_asked_each_time() -> None:
    async def node(body: dict[str, Any]) -> Any:
        method, params = body["method"], body.get("params") or []
        if method == "eth_blockNumber":
            return "0x64"  # head 100
        if method == "eth_getBlockByNumber" and params[0] == "finalized":
            return block(80)
        if method == "eth_getTransactionReceipt":
            return {"blockNumber": "0x60" if params[0] == HASH else "0x10"}
        if method == "eth_getBlockByHash":
            return None  # (the canonical window's walk stops at once)
        return block(int(params[0], 16) if params[0] != "latest" else 100)

    fake = Upstreams(a=node)
    async with httpx.AsyncClient(transport=httpx.MockTransport(fake)) as client:
        proxy = chain_proxy(client)
        await proxy.read_head()
        assert (proxy.head, proxy.finalized) == (100, 80)
        before = fake.calls["a"]
        asked = [
            ("eth_getBlockByNumber", ["0x10", False]),  # final: kept
            ("eth_getBlockByNumber", ["0x60", False]),  # not final yet
            ("eth_getBlockByNumber", ["latest", False]),
            ("eth_getTransactionReceipt", [HASH]),  # in block 0x60: not final
            ("eth_getTransactionReceipt", ["0x" + "cd" * 32]),  # in block 0x10: kept
        ]
        for _ in range(3):
            for method, params in asked:
                await proxy.call(method, params)
        assert fake.calls["a"] - before == 2 + 3 * 3  # two kept after their first call
        assert await proxy.call("eth_chainId", []) == {"result": "0x7"}  # never asked
        assert proxy.statistics().cached == 4


async def test_the_same_read_in_flight_is_asked_once() -> None:
    fake = Upstreams(a=answering("0x5", 0.2))
    async with httpx.AsyncClient(transport=httpx.MockTransport(fake)) as client:
        proxy = chain_proxy(client)
        answers: list[Any] = []

        async def ask() -> None:
            answers.append(await proxy.call("eth_getBalance", ["0x" + "11" * 20, "latest"]))

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(ask)
        assert answers == [{"result": "0x5"}] * 10
        assert fake.calls["a"] == 1
        assert proxy.statistics().shared == 9


async def test_a_long_logs_range_is_split_and_put_back_in_order() -> None:
    async def logs(body: dict[str, Any]) -> Any:
        query = body["params"][0]
        return [{"blockNumber": query["fromBlock"]}, {"blockNumber": query["toBlock"]}]

    fake = Upstreams(a=logs)
    async with httpx.AsyncClient(transport=httpx.MockTransport(fake)) as client:
        proxy = chain_proxy(client, max_logs_range=2000)
        query = {"fromBlock": "0x0", "toBlock": hex(4999), "address": "0x" + "11" * 20}
        answer = await proxy.call("eth_getLogs", [query])
        blocks = [int(entry["blockNumber"], 16) for entry in answer["result"]]
        assert blocks == [0, 1999, 2000, 3999, 4000, 4999]
        ranges = sorted((p[0]["fromBlock"], p[0]["toBlock"]) for _, _, p in fake.methods)
        assert ranges == [("0x0", "0x7cf"), ("0x7d0", "0xf9f"), ("0xfa0", "0x1387")]


async def test_requests_that_are_not_json_rpc_get_its_errors_and_batches_keep_order() -> None:
    async def echo(body: dict[str, Any]) -> Any:
        return body["params"][0]

    fake = Upstreams(a=echo)
    async with httpx.AsyncClient(transport=httpx.MockTransport(fake)) as client:
        proxy = chain_proxy(client)
        bad: Any
        for bad in ({"method": "eth_call"}, [], 5, {"jsonrpc": "2.0", "method": ""}):
            reply = await proxy.handle(bad)
            assert reply["error"]["code"] == INVALID_REQUEST, bad
        batch = [
            {"jsonrpc": "2.0", "id": i, "method": "eth_getCode", "params": [f"0x{i}"]}
            for i in range(5)
        ]
        notification = {"jsonrpc": "2.0", "method": "eth_getCode", "params": ["0x9"]}
        replies: Any = await proxy.handle([*batch, notification, {"bad": 1}])
        assert [r["result"] for r in replies[:5]] == [f"0x{i}" for i in range(5)]
        assert replies[5]["error"]["code"] == INVALID_REQUEST
        assert len(replies) == 6  # no reply to the notification
        assert await proxy.handle(notification) is None


async def test_with_every_upstream_down_a_client_gets_a_json_rpc_error() -> None:
    fake = Upstreams(a=down)
    async with httpx.AsyncClient(transport=httpx.MockTransport(fake)) as client:
        proxy = chain_proxy(client)
        reply: Any = await proxy.handle({"jsonrpc": "2.0", "id": 1, "method": "eth_blockNumber"})
        assert reply["error"]["code"] == UPSTREAM_UNAVAILABLE
        assert "connection refused" in reply["error"]["message"]
        assert "http://a" in reply["error"]["message"]


def test_each_client_has_its_own_calls_per_minute_and_a_batch_costs_its_size() -> None:
    now = [0.0]
    limit = CallLimit(60, lambda: now[0])
    alice = WalletSession("0x" + "aa" * 20, "t1", 1e12)
    bob = WalletSession("0x" + "bb" * 20, "t2", 1e12)
    assert limit.take(alice, 50)
    assert not limit.take(alice, 11)  # 50 of 60 used
    assert limit.take(bob, 60)  # another client's bucket
    now[0] += 10  # ten seconds: ten more calls
    assert limit.take(alice, 20)
    assert not limit.take(alice, 1)


async def test_a_chain_whose_headers_hash_another_way_keeps_its_upstreams() -> None:
    async def other_format(body: dict[str, Any]) -> Any:
        if body["method"] == "eth_chainId":
            return "0x7"
        return {"number": "0x5", "hash": HASH}  # not an Ethereum header's hash

    async def ethereum(body: dict[str, Any]) -> Any:
        return "0x7" if body["method"] == "eth_chainId" else block(5)

    for handlers, checks, excluded in (
        ({"a": other_format, "b": other_format}, False, [None, None]),
        ({"a": other_format, "b": ethereum}, True, ["its latest block", None]),
    ):
        fake = Upstreams(**handlers)
        async with httpx.AsyncClient(transport=httpx.MockTransport(fake)) as client:
            chain = RpcChainEntry(chain_id=7, name="t", upstreams=["http://a", "http://b"])
            pool = UpstreamPool(["http://a", "http://b"], settings(), client)
            proxy = ChainProxy(chain, pool, AnswerCache(1 << 20), settings())
            await proxy._check_chain_ids()
            assert proxy.check_headers is checks
            reasons = [u.excluded for u in pool.upstreams]
            assert [r if r is None else r[:16] for r in reasons] == excluded
            answer = await proxy.call("eth_getBlockByNumber", ["0x5", False])
            assert "result" in answer


def chain_of(length: int, extra: str = "0x", base: list[dict[str, Any]] | None = None) -> list[Any]:
    """Blocks 0..length-1, each naming the one before as its parent; from ``base``'s
    blocks where given (a fork from the end of ``base``)."""
    blocks = list(base or [])
    while len(blocks) < length:
        parent = blocks[-1]["hash"] if blocks else HASH
        blocks.append(block(len(blocks), parent, extra))
    return blocks


async def test_the_canonical_window_follows_the_majority_head_and_reorgs() -> None:
    honest = chain_of(40)
    forged = chain_of(40, extra="0x66", base=honest[:30])  # a fork from block 30
    by_hash = {b["hash"]: b for b in honest + forged}
    asked: list[str] = []

    async def fetch(block_hash: str) -> dict[str, Any] | None:
        asked.append(block_hash)
        return by_hash.get(block_hash)

    window = CanonicalWindow(depth=16, fetches_per_poll=8)
    # Two of three upstreams agree on block 39: the forger's 39 is outvoted.
    await window.follow([honest[39], forged[39], honest[39]], fetch)
    assert window.head == 39
    assert window.hash_at(39) == honest[39]["hash"]
    assert window.hash_at(31) == honest[31]["hash"]  # eight parents fetched in a poll
    assert window.hash_at(30) is None
    await window.follow([honest[39]] * 2, fetch)  # the next poll extends the window
    assert window.hash_at(24) == honest[24]["hash"]
    assert window.hash_at(23) is None  # (16 deep)
    window.check(honest[35])
    with pytest.raises(Forged, match="not the block most upstreams chain to"):
        window.check(forged[35])
    window.check(block(10))  # below the window: its own hash is all there is

    # A new head one block on costs no fetch; a reorg to the fork replaces what it forked.
    longer = chain_of(41, base=honest)
    asked.clear()
    by_hash[longer[40]["hash"]] = longer[40]
    await window.follow([longer[40]] * 3, fetch)
    assert (asked, window.hash_at(40)) == ([], longer[40]["hash"])
    fork = chain_of(42, extra="0x66", base=forged)
    for b in fork:
        by_hash[b["hash"]] = b
    await window.follow([fork[41]] * 3, fetch)
    assert window.reorgs == 8  # 40 down to 33, within one poll's eight fetches
    assert window.hash_at(35) == fork[35]["hash"]
    assert window.hash_at(32) is None  # deeper than a poll: dropped, not left stale
    await window.follow([fork[41]] * 3, fetch)
    assert window.hash_at(30) == fork[30]["hash"]
    assert window.hash_at(29) == honest[29]["hash"]  # below the fork: the same block

    # A parent that is not the block asked for is caught.
    by_hash[fork[41]["parentHash"]] = honest[39]
    with pytest.raises(Forged, match="asked for block"):
        await CanonicalWindow(depth=16).follow([fork[41]], fetch)
