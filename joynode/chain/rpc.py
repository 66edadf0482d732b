"""The chain actor's one way to its RPC: bounded calls in threads, and whether the RPC answers.

web3's HTTP provider blocks, so every call runs in a worker thread. Three
things keep an outage cheap and a stop prompt:

- each HTTP request gives up after ``RPC_TIMEOUT_S`` (web3's own retries are
  off: the chain actor retries, with backoff);
- a cancelled call abandons its thread (which ends by itself at that timeout,
  its result dropped), so stopping the node never waits on a hung RPC;
- once a call finds the RPC unreachable, every call fails at once with
  ``ChainUnreachable`` (a JSON-RPC error with the reason) until the watcher's
  ``probe`` reaches it again, so callers get a clear answer, not a long wait.

Each change between reachable and unreachable is reported once (``on_change``,
which the node wires to the supervisor's degraded state) and shows in the
``joynode_chain_reachable`` gauge; every failed call counts in
``joynode_chain_rpc_failures_total``.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import requests
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge
from web3 import Web3
from web3.exceptions import (
    BadResponseFormat,
    ProviderConnectionError,
    RequestTimedOut,
    TooManyRequests,
)

from joynode.control.jsonrpc import RpcError

T = TypeVar("T")

RPC_TIMEOUT_S = 10.0  # one HTTP request to the RPC, connect and read each
CHAIN_UNREACHABLE = -32070  # JSON-RPC application error: the chain's RPC does not answer
# What a call raises when the RPC is down, hung, or not a JSON-RPC endpoint;
# reverts and errors the RPC answers with are answers, not outages.
UNREACHABLE_ERRORS = (
    OSError,  # requests' ConnectionError, Timeout and HTTPError among them
    json.JSONDecodeError,
    BadResponseFormat,
    ProviderConnectionError,
    RequestTimedOut,
    TooManyRequests,
)


class ChainUnreachable(RpcError):
    """The chain's RPC does not answer; the message says which and why. Try again later."""

    def __init__(self, message: str) -> None:
        super().__init__(CHAIN_UNREACHABLE, message)


def public_url(url: str) -> str:
    """``url`` without its path, query or credentials: RPC providers put API keys there."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port is not None else ""
    return f"{parts.scheme}://{host}{port}"


def describe(exc: BaseException, timeout_s: float = RPC_TIMEOUT_S) -> str:
    """A short reason for a failed RPC call ("connection refused"), not urllib3's essay."""
    if isinstance(exc, requests.Timeout | TimeoutError | RequestTimedOut):
        return f"no answer within {timeout_s:g} s"
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return f"HTTP {exc.response.status_code} {exc.response.reason}".strip()
    if isinstance(exc, json.JSONDecodeError | BadResponseFormat):
        return "it answers, but not as a JSON-RPC endpoint"
    # requests wraps urllib3, which wraps the socket's error: say the socket's.
    socket_errors = [
        e
        for e in _causes(exc)
        if isinstance(e, OSError) and not isinstance(e, requests.RequestException)
    ]
    if socket_errors:
        text = socket_errors[-1].strerror or str(socket_errors[-1])
        return text[:1].lower() + text[1:200]
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps (causes, contexts, urllib3's reasons, exceptions in args),
    outermost first."""
    found: list[BaseException] = []
    todo = [exc]
    while todo and len(found) < 16:
        current = todo.pop(0)
        if any(current is seen for seen in found):
            continue
        found.append(current)
        inner = (current.__cause__, current.__context__, getattr(current, "reason", None))
        todo += [e for e in (*inner, *current.args) if isinstance(e, BaseException)]
    return found


class Backoff:
    """Waits between attempts: from ``first_s``, doubling up to ``cap_s``, each jittered down
    by up to a quarter so that nodes that lost the same RPC do not retry in step."""

    def __init__(self, first_s: float, cap_s: float) -> None:
        self._first = first_s
        self._cap = max(cap_s, first_s)
        self._next = first_s

    def reset(self) -> None:
        self._next = self._first

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self._cap)
        return delay * random.uniform(0.75, 1.0)  # noqa: S311 (spreading load, not secrecy)


class RpcLink:
    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        on_change: Callable[[str | None], None] = lambda _: None,
        *,
        timeout_s: float = RPC_TIMEOUT_S,
    ) -> None:
        """``on_change``: called with the reason when the RPC becomes unreachable, None when it
        answers again."""
        self._on_change = on_change
        self._timeout = timeout_s
        self._w3: Web3 | None = None
        self.url = ""
        self.reachable: bool | None = None  # None until the first call ends
        self.last_error: str | None = None
        self.changed_at = time.time()
        self._m_reachable = Gauge(
            "joynode_chain_reachable",
            "1 while the chain's RPC answers, 0 while it does not (or before it was reached)",
            registry=registry,
        )
        self._m_failures = Counter(
            "joynode_chain_rpc_failures_total",
            "Calls to the chain's RPC that found it unreachable",
            registry=registry,
        )

    def open(self, url: str) -> None:
        self._w3 = Web3(
            Web3.HTTPProvider(
                url, request_kwargs={"timeout": self._timeout}, exception_retry_configuration=None
            )
        )
        self.url = public_url(url)

    @property
    def w3(self) -> Web3:
        if self._w3 is None:
            raise RuntimeError("RpcLink.open was not called")
        return self._w3

    def problem(self) -> str:
        """Why the RPC is unreachable, as operators and callers are told."""
        return f"chain RPC {self.url} unreachable: {self.last_error}"

    async def call(
        self, fn: Callable[..., T], *args: Any, limiter: trio.CapacityLimiter | None = None
    ) -> T:
        """``fn(*args)`` in a worker thread; ``ChainUnreachable`` at once while the RPC is down."""
        if self.reachable is False:
            raise ChainUnreachable(self.problem())
        return await self._run(fn, *args, limiter=limiter)

    async def probe(self) -> int:
        """The chain id, asked even while the RPC is marked unreachable (the way back up)."""
        return await self._run(lambda: int(self.w3.eth.chain_id))

    async def _run(
        self, fn: Callable[..., T], *args: Any, limiter: trio.CapacityLimiter | None = None
    ) -> T:
        try:
            result = await trio.to_thread.run_sync(
                fn, *args, abandon_on_cancel=True, limiter=limiter
            )
        except UNREACHABLE_ERRORS as exc:
            self.lost(describe(exc, self._timeout))
            raise ChainUnreachable(self.problem()) from None
        self._answered()
        return result

    def lost(self, reason: str) -> None:
        """Mark the RPC unreachable for ``reason`` (also for an RPC that answers only errors)."""
        self._m_failures.inc()
        self.last_error = reason
        if self.reachable is not False:
            self.reachable = False
            self.changed_at = time.time()
            self._m_reachable.set(0)
            self._on_change(self.problem())

    def _answered(self) -> None:
        if self.reachable is not True:
            self.reachable = True
            self.changed_at = time.time()
            self._m_reachable.set(1)
            self._on_change(None)
