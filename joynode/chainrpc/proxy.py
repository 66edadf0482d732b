"""One chain's JSON-RPC front: requests checked, answered from the cache, shared while in
flight, split (``eth_getLogs``), or sent to the chain's upstreams.

The proxy answers ``eth_chainId`` itself (its configured id: an upstream on another
chain is excluded when the head tracker first asks it), and keeps an answer only
under ``methods.rule_of``'s rules, judged against the chain's finalized block.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from joynode.chainrpc import methods
from joynode.chainrpc.cache import AnswerCache
from joynode.chainrpc.canonical import CanonicalWindow
from joynode.chainrpc.integrity import Forged, check_account_read, check_block, proven_account
from joynode.chainrpc.methods import Keep
from joynode.chainrpc.upstreams import Upstream, UpstreamFailure, UpstreamPool, Verify
from joynode.config import RpcChainEntry, RpcSection

if TYPE_CHECKING:
    from joynode.chainrpc.peers import ChainPeers

log = logging.getLogger(__name__)

MAX_BATCH = 100
MAX_METHOD = 64
LOGS_CONCURRENCY = 4
# JSON-RPC 2.0 error codes
PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INTERNAL_ERROR = -32700, -32600, -32601, -32603
UPSTREAM_UNAVAILABLE = -32011  # (server range: no upstream answered)

Answer = dict[str, Any]  # a response's "result" or "error", without "jsonrpc" and "id"
PeerCheck = Callable[[Answer], Awaitable[None]]  # raises Forged: a peer's answer is wrong
BLOCK_METHODS = frozenset({"eth_getBlockByHash", "eth_getBlockByNumber"})
_ACCOUNT_READS = frozenset(
    {"eth_getBalance", "eth_getTransactionCount", "eth_getCode", "eth_getStorageAt"}
)


@dataclass
class ProxyStatistics:
    chain_id: int
    head: int | None
    finalized: int | None
    calls: int
    cached: int
    shared: int
    failed: int
    from_peers: int


class _Shared:
    """A call in flight that others asking the same wait for."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.answer: Answer | None = None


class ChainProxy:
    def __init__(
        self,
        chain: RpcChainEntry,
        pool: UpstreamPool,
        cache: AnswerCache,
        settings: RpcSection,
        count: Callable[[str, str], None] = lambda method, outcome: None,
        peers: ChainPeers | None = None,
    ) -> None:
        """``count(method, outcome)``: a metric for each call (cached, shared, upstream,
        peer, failed); ``peers``: asked when no upstream answers."""
        self.chain = chain
        self._peers = peers
        self.pool = pool
        self._cache = cache
        self._settings = settings
        self._count = count
        self.head: int | None = None
        self.finalized: int | None = None
        self.check_headers = True  # off for a chain whose headers hash another way
        self.window = CanonicalWindow()
        self._inflight: dict[str, _Shared] = {}
        self._stats = ProxyStatistics(chain.chain_id, None, None, 0, 0, 0, 0, 0)

    def statistics(self) -> ProxyStatistics:
        self._stats.head, self._stats.finalized = self.head, self.finalized
        return self._stats

    # ---- requests as clients send them

    async def handle(self, payload: Any) -> Any:
        """The response to a JSON-RPC request or batch (None: only notifications)."""
        if isinstance(payload, list):
            if not payload:
                return _error(None, INVALID_REQUEST, "an empty batch")
            if len(payload) > MAX_BATCH:
                return _error(None, INVALID_REQUEST, f"a batch over {MAX_BATCH} calls")
            replies: list[Any] = [None] * len(payload)

            async def one(index: int, item: Any) -> None:
                replies[index] = await self._item(item)

            async with trio.open_nursery() as nursery:
                for index, item in enumerate(payload):
                    nursery.start_soon(one, index, item)
            answered = [r for r in replies if r is not None]
            return answered or None
        return await self._item(payload)

    async def _item(self, item: Any) -> dict[str, Any] | None:
        if not isinstance(item, dict) or item.get("jsonrpc") != "2.0":
            return _error(None, INVALID_REQUEST, "not a JSON-RPC 2.0 request")
        request_id = item.get("id")
        method, params = item.get("method"), item.get("params")
        if not isinstance(method, str) or not 0 < len(method) <= MAX_METHOD:
            return _error(request_id, INVALID_REQUEST, "no method, or a method name too long")
        if params is not None and not isinstance(params, list | dict):
            return _error(request_id, INVALID_REQUEST, "params must be an array or an object")
        if not (request_id is None or isinstance(request_id, str | int)):
            return _error(request_id, INVALID_REQUEST, "id must be a string or a number")
        answer = await self.call(method, params)
        if "id" not in item:
            return None  # a notification: no reply
        return {"jsonrpc": "2.0", "id": request_id, **answer}

    # ---- one call

    async def call(self, method: str, params: Any, *, relay: bool = True) -> Answer:
        """The answer to ``method(params)`` on this chain; with ``relay``, from a peer
        that serves it when no upstream answers (a peer's own call is never relayed)."""
        self._stats.calls += 1
        if method == "eth_chainId":
            return {"result": hex(self.chain.chain_id)}
        if method.startswith(("eth_subscribe", "eth_unsubscribe")):
            return {"error": {"code": METHOD_NOT_FOUND, "message": f"{method}: use a websocket"}}
        key = f"{self.chain.chain_id}:{method}:{_canonical(params)}"
        rule = methods.rule_of(method, params)
        if rule.keep is not Keep.NEVER:
            cached = self._cache.get(key)
            if cached is not None:
                self._stats.cached += 1
                self._count(method, "cached")
                return {"result": json.loads(cached)}
        if method not in methods.READS:
            return await self._upstream(method, params, key, rule, relay)
        if not relay:
            key += ":not-relayed"  # (never waits on a call that may wait on a peer)
        shared = self._inflight.get(key)
        if shared is not None:
            await shared.done.wait()
            if shared.answer is not None:
                self._stats.shared += 1
                self._count(method, "shared")
                return shared.answer
            return await self.call(method, params, relay=relay)  # its caller went: again
        shared = self._inflight[key] = _Shared()
        try:
            shared.answer = await self._upstream(method, params, key, rule, relay)
            return shared.answer
        finally:
            del self._inflight[key]
            shared.done.set()

    async def _upstream(
        self, method: str, params: Any, key: str, rule: methods.Rule, relay: bool
    ) -> Answer:
        if method == "eth_getLogs" and isinstance(params, list) and params:
            split = await self._split_logs(params)
            if split is not None:
                return split
        try:
            answer = await self.pool.call(
                method,
                params,
                hedge=method in methods.READS,
                first=method in methods.FILTERS,
                verify=self._verifier(method, params, rule),
            )
        except UpstreamFailure as exc:
            if relay and self._peers is not None:
                return await self._from_peers(method, params, f"no upstream: {exc}")
            self._stats.failed += 1
            self._count(method, "failed")
            return {"error": {"code": UPSTREAM_UNAVAILABLE, "message": f"no upstream: {exc}"}}
        self._count(method, "upstream")
        if "result" in answer and self._keepable(rule, answer["result"]):
            self._cache.put(key, json.dumps(answer["result"], separators=(",", ":")).encode())
        return answer

    async def _from_peers(self, method: str, params: Any, why: str) -> Answer:
        """A peer's answer, checked as far as it can be without an upstream; not cached."""
        assert self._peers is not None
        check = None
        if method in BLOCK_METHODS and self.check_headers:
            check = partial(self._check_canonical_block, params, None)
        try:
            answer = await self._peers.relay(self.chain.chain_id, method, params, check)
        except UpstreamFailure as exc:
            self._stats.failed += 1
            self._count(method, "failed")
            return {"error": {"code": UPSTREAM_UNAVAILABLE, "message": f"{why}; peers: {exc}"}}
        self._stats.from_peers += 1
        self._count(method, "peer")
        return answer

    def _verifier(self, method: str, params: Any, rule: methods.Rule) -> Verify | None:
        """How an upstream's answer to ``method(params)`` is checked (None: it is not)."""
        if method in BLOCK_METHODS:
            if not self.check_headers or (isinstance(params, list) and "pending" in params):
                return None  # (a pending block has no hash yet)
            return partial(self._check_canonical_block, params)
        anchored = rule.keep in (Keep.BY_HASH, Keep.IF_FINAL)
        if self._settings.verify_state and method in _ACCOUNT_READS and anchored:
            return partial(self._check_state, method, params)
        return None

    async def _check_canonical_block(
        self, params: Any, upstream: Upstream | None, answer: Answer
    ) -> None:
        """A block must hash to its hash, be the one asked for, and, once final, be the
        block the majority's head chains to (``CanonicalWindow``)."""
        await _check_block_answer(params, upstream, answer)
        block = answer.get("result")
        number = methods.quantity(block.get("number")) if isinstance(block, dict) else None
        final = self.finalized
        if number is not None and final is not None and number <= final:
            self.window.check(block)

    async def _check_state(
        self, method: str, params: list[Any], upstream: Upstream, answer: Answer
    ) -> None:
        """Raise ``Forged`` unless the account read in ``answer`` is what the state trie
        of its block holds, by the same upstream's proof and header."""
        if "result" not in answer:
            return  # an error: nothing claimed
        address, at = params[0], params[-1]
        keys = [params[1]] if method == "eth_getStorageAt" else []
        by_hash = at.get("blockHash") if isinstance(at, dict) else None
        if isinstance(at, str) and len(at) == 66:
            by_hash = at
        if by_hash is not None:
            header_call = ("eth_getBlockByHash", [by_hash, False])
        else:
            number = at.get("blockNumber") if isinstance(at, dict) else at
            header_call = ("eth_getBlockByNumber", [number, False])
        proof, header = await self.pool.send_batch(
            upstream, [("eth_getProof", [address, keys, at]), header_call]
        )
        if "result" not in proof or not isinstance(header.get("result"), dict):
            raise UpstreamFailure("it cannot prove state (eth_getProof)")  # ask another
        if self.check_headers:
            await self._check_canonical_block(header_call[1], upstream, header)
        state_root = bytes.fromhex(str(header["result"]["stateRoot"])[2:])
        try:
            account_proof = proof["result"]["accountProof"]
        except (TypeError, KeyError):
            raise Forged("a proof without an account proof") from None
        account = proven_account(state_root, address, account_proof)
        check_account_read(method, answer["result"], account, proof["result"], keys)

    def _keepable(self, rule: methods.Rule, result: Any) -> bool:
        if result is None or rule.keep is Keep.NEVER:
            return False
        if rule.keep in (Keep.FOREVER, Keep.BY_HASH):
            return True
        final = self.finalized
        if final is None:
            return False
        if rule.keep is Keep.IF_FINAL:
            return rule.block is not None and rule.block <= final
        block = methods.result_block(result)
        return block is not None and block <= final

    async def _split_logs(self, params: list[Any]) -> Answer | None:
        """An ``eth_getLogs`` over more than ``max_logs_range`` blocks, as several calls
        in order (each kept on its own once final); None if it needs no split."""
        query = params[0]
        if not isinstance(query, dict) or "blockHash" in query:
            return None
        low, high = methods.logs_range(query)
        size = self._settings.max_logs_range
        if low is None or high is None or high - low + 1 <= size:
            return None
        ranges = [(start, min(start + size - 1, high)) for start in range(low, high + 1, size)]
        parts: list[Answer | None] = [None] * len(ranges)
        limit = trio.CapacityLimiter(LOGS_CONCURRENCY)

        async def part(index: int, start: int, end: int) -> None:
            async with limit:
                chunk = {**query, "fromBlock": hex(start), "toBlock": hex(end)}
                parts[index] = await self.call("eth_getLogs", [chunk, *params[1:]])

        async with trio.open_nursery() as nursery:
            for index, (start, end) in enumerate(ranges):
                nursery.start_soon(part, index, start, end)
        logs: list[Any] = []
        for answer in parts:
            assert answer is not None
            if "error" in answer:
                return answer
            logs.extend(answer["result"] or [])
        return {"result": logs}

    # ---- the head

    async def track_head(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Read every upstream's head (its lag, and whether it serves this chain at all),
        and the finalized block, every ``head_poll_s``."""
        await self._check_chain_ids()
        task_status.started()
        while True:
            await self.read_head()
            await trio.sleep(self._settings.head_poll_s)

    async def _check_chain_ids(self) -> None:
        """Exclude an upstream on another chain; and learn whether this chain's headers
        are in a form this node can hash (a chain whose every upstream's latest block
        hashes wrong has another header format: its block checks are turned off, rather
        than every upstream excluded)."""
        hashed: dict[Upstream, bool] = {}

        async def check(upstream: Upstream) -> None:
            try:
                chain_id, latest = await self.pool.send_batch(
                    upstream, [("eth_chainId", []), ("eth_getBlockByNumber", ["latest", False])]
                )
            except UpstreamFailure as exc:
                log.warning("rpc %s: %s did not answer: %s", self.chain.name, upstream.label, exc)
                return
            found = methods.quantity(chain_id.get("result"))
            if found != self.chain.chain_id:
                upstream.exclude(f"it serves chain {found}, not {self.chain.chain_id}")
                return
            try:
                check_block(latest.get("result"))
                hashed[upstream] = True
            except Forged:
                hashed[upstream] = False

        await _each(check, self.pool.upstreams)
        if hashed and not any(hashed.values()):
            self.check_headers = False
            log.warning(
                "rpc %s: its blocks do not hash as Ethereum headers do: block checks are off",
                self.chain.name,
            )
        for upstream, right in hashed.items():
            if not right and self.check_headers:
                upstream.exclude("its latest block does not hash to its hash")

    async def _block_by_hash(self, block_hash: str) -> dict[str, Any] | None:
        """A header by hash from the best upstream that has it (checked to be it; one
        that is not is excluded and the next asked); None if none has it."""
        try:
            answer = await self.pool.call(
                "eth_getBlockByHash",
                [block_hash, False],
                hedge=True,
                verify=partial(_check_block_answer, [block_hash, False]),
            )
        except UpstreamFailure:
            return None
        block = answer.get("result")
        return block if isinstance(block, dict) else None

    async def read_head(self) -> None:
        """Each available upstream's latest block: its head and lag, and its vote for the
        canonical window's head (a latest block that does not hash right excludes it)."""
        latest: list[dict[str, Any]] = []

        async def head_of(upstream: Any) -> None:
            if not upstream.available():
                return
            try:
                answer = await self.pool.send(upstream, "eth_getBlockByNumber", ["latest", False])
            except UpstreamFailure:
                return
            block = answer.get("result")
            if not isinstance(block, dict):
                return
            number = methods.quantity(block.get("number"))
            if number is None:
                return
            if self.check_headers:
                try:
                    check_block(block)
                except Forged as exc:
                    upstream.exclude(str(exc))
                    return
                latest.append(block)
            upstream.head = number

        await _each(head_of, self.pool.upstreams)
        self.head = self.pool.best_head
        if latest:
            try:
                await self.window.follow(latest, self._block_by_hash)
            except Forged as exc:  # (what pool.call's check did not already exclude)
                log.warning("rpc %s: canonical window: %s", self.chain.name, exc)
        if self.head is None:
            return
        depth = self.chain.finality_depth
        if depth:
            self.finalized = self.head - depth if self.head >= depth else None
            return
        try:
            answer = await self.pool.call("eth_getBlockByNumber", ["finalized", False])
        except UpstreamFailure:
            return
        block = answer.get("result")
        number = methods.quantity(block.get("number")) if isinstance(block, dict) else None
        if number is not None and number <= self.head:
            # (never back: a finalized block stays final)
            self.finalized = max(number, self.finalized or 0)


async def _each(fn: Callable[[Any], Awaitable[None]], items: list[Any]) -> None:
    async with trio.open_nursery() as nursery:
        for item in items:
            nursery.start_soon(fn, item)


def _canonical(params: Any) -> str:
    return json.dumps(params, sort_keys=True, separators=(",", ":"))


def _error(request_id: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}


async def _check_block_answer(params: Any, upstream: Upstream | None, answer: Answer) -> None:
    """A block must hash to its hash, and be the one asked for (by hash or number)."""
    block = answer.get("result")
    check_block(block)
    if not isinstance(block, dict) or not isinstance(params, list) or not params:
        return
    asked = params[0]
    sent = str(block.get("hash")).lower()
    if isinstance(asked, str) and len(asked) == 66:  # by hash
        if sent != asked.lower():
            raise Forged(f"asked for block {asked}, sent {sent}")
        return
    number = methods.quantity(asked)
    if number is not None and methods.quantity(block.get("number")) != number:
        raise Forged(f"asked for block {number}, sent {block.get('number')}")
