"""A chain's upstream RPC endpoints: health, circuit breakers, ranking, failover, hedging.

Each upstream keeps a latency average, its recent failures, how far its head lags
the best one, and a circuit breaker: ``breaker_failures`` failures in a row open it
(no calls); after ``breaker_cooldown_s`` it is half open: a success closes it, a
failure opens it again.
Calls go to the best ranked upstream (latency, failures, lag); one that fails
(transport, HTTP status, an answer that is not JSON-RPC, a throttle or internal
error) is followed by the next, up to ``max_attempts`` upstreams. A read not
answered within ``hedge_after_s`` is also sent to the next upstream, and the first
answer wins. JSON-RPC errors such as a revert are answers, not failures.
"""

from __future__ import annotations

import enum
import itertools
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio

from joynode.chainrpc.integrity import Forged
from joynode.config import RpcSection

log = logging.getLogger(__name__)

RETRY_CODES = frozenset({-32005, -32603})  # limit exceeded, internal error: ask another
LATENCY_ALPHA = 0.2  # weight of the newest call in the latency average
UNKNOWN_LATENCY_S = 0.2
LAG_PENALTY_S = 0.05  # a block behind the best head counts as this much latency
_ids = itertools.count(1)


def redacted(url: str) -> str:
    """``scheme://host[:port]`` of ``url``: providers put API keys in paths and queries."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


class UpstreamFailure(Exception):
    """An upstream gave no usable answer."""


Verify = Callable[["Upstream", dict[str, Any]], Awaitable[None]]


class Circuit(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class UpstreamStatistics:
    url: str
    circuit: str
    latency_ms: float | None
    calls: int
    failures: int
    head: int | None
    excluded: str | None


class Upstream:
    """One endpoint and what the gateway knows of its health."""

    def __init__(
        self, url: str, settings: RpcSection, clock: Callable[[], float] = trio.current_time
    ) -> None:
        self.url = url
        self.label = redacted(url)  # for logs, metrics and clients: no path, no key in it
        self._settings = settings
        self._clock = clock
        self.latency_s: float | None = None
        self.failures_in_a_row = 0
        self.recent_failures = 0.0  # decays by half with each success
        self.calls = 0
        self.failures = 0
        self.circuit = Circuit.CLOSED
        self._opened_at = 0.0
        self.head: int | None = None
        self.excluded: str | None = None  # why it was caught answering wrong

    def available(self) -> bool:
        """Whether a call may go to it now: its circuit is closed, or half open (cooled
        down: the next call is a trial, whose failure opens it again)."""
        if self.excluded is not None:
            return False
        if self.circuit is Circuit.OPEN:
            if self._clock() - self._opened_at < self._settings.breaker_cooldown_s:
                return False
            self.circuit = Circuit.HALF_OPEN
        return True

    def succeeded(self, latency_s: float) -> None:
        self.calls += 1
        self.failures_in_a_row = 0
        self.recent_failures /= 2
        self.circuit = Circuit.CLOSED
        if self.latency_s is None:
            self.latency_s = latency_s
        else:
            self.latency_s += LATENCY_ALPHA * (latency_s - self.latency_s)

    def failed(self) -> None:
        self.calls += 1
        self.failures += 1
        self.failures_in_a_row += 1
        self.recent_failures += 1
        if (
            self.circuit is Circuit.HALF_OPEN
            or self.failures_in_a_row >= self._settings.breaker_failures
        ):
            self.circuit = Circuit.OPEN
            self._opened_at = self._clock()

    def exclude(self, why: str) -> None:
        """Caught answering wrong: no more calls, until the node restarts."""
        if self.excluded is None:
            self.excluded = why
            log.error("rpc: %s excluded: %s", self.label, why)

    def score(self, best_head: int | None) -> float:
        """Lower is better: expected latency, inflated by failures and lag."""
        latency = UNKNOWN_LATENCY_S if self.latency_s is None else self.latency_s
        lag = 0 if best_head is None or self.head is None else max(0, best_head - self.head)
        return latency * (1 + self.recent_failures) + LAG_PENALTY_S * lag

    def statistics(self) -> UpstreamStatistics:
        return UpstreamStatistics(
            self.label,
            self.circuit.value,
            None if self.latency_s is None else round(self.latency_s * 1000, 2),
            self.calls,
            self.failures,
            self.head,
            self.excluded,
        )


class UpstreamPool:
    """A chain's upstreams, ranked; ``call`` sends one JSON-RPC request to the best."""

    def __init__(
        self,
        urls: list[str],
        settings: RpcSection,
        client: httpx.AsyncClient,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.upstreams = [Upstream(url, settings, clock) for url in urls]
        self._settings = settings
        self._client = client

    @property
    def best_head(self) -> int | None:
        heads = [u.head for u in self.upstreams if u.head is not None and u.excluded is None]
        return max(heads) if heads else None

    def ranked(self) -> list[Upstream]:
        """Upstreams a call may go to now, best first."""
        best = self.best_head
        return sorted((u for u in self.upstreams if u.available()), key=lambda u: u.score(best))

    async def call(
        self,
        method: str,
        params: Any,
        *,
        hedge: bool = False,
        first: bool = False,
        verify: Verify | None = None,
    ) -> dict[str, Any]:
        """The response object (``result`` or ``error``) for ``method(params)``.
        ``first``: the first available upstream in configured order (filters live there).
        ``verify(upstream, answer)``: raises ``Forged`` for an answer that upstream
        forged; it is then excluded, and the next one asked.
        Raises ``UpstreamFailure`` when every attempt failed."""
        if first:
            candidates = [u for u in self.upstreams if u.available()][:1]
        else:
            candidates = self.ranked()[: self._settings.max_attempts]
        if not candidates:
            raise UpstreamFailure("no upstream is available (every circuit is open)")
        failures: list[str] = []
        pending = list(candidates)
        while pending:
            tried = pending[:2] if hedge and self._settings.hedge_after_s > 0 else pending[:1]
            pending = pending[len(tried) :]
            try:
                return await self._race(tried, method, params, failures, verify)
            except UpstreamFailure:
                continue
        raise UpstreamFailure("; ".join(failures))

    async def _race(
        self,
        upstreams: list[Upstream],
        method: str,
        params: Any,
        failures: list[str],
        verify: Verify | None,
    ) -> dict[str, Any]:
        """The first answer of ``upstreams``: the first at once, the next after
        ``hedge_after_s`` (or as soon as the first fails)."""
        won: list[dict[str, Any]] = []
        async with trio.open_nursery() as nursery:
            for index, upstream in enumerate(upstreams):
                finished = trio.Event()
                attempt = partial(self._attempt, upstream, method, params, verify)
                nursery.start_soon(attempt, won, failures, finished, nursery)
                if index + 1 < len(upstreams):
                    with trio.move_on_after(self._settings.hedge_after_s):
                        await finished.wait()
        if not won:
            raise UpstreamFailure("every attempt failed")
        return won[0]

    async def _attempt(
        self,
        upstream: Upstream,
        method: str,
        params: Any,
        verify: Verify | None,
        won: list[dict[str, Any]],
        failures: list[str],
        finished: trio.Event,
        race: trio.Nursery,
    ) -> None:
        try:
            answer = await self.send(upstream, method, params)
            if verify is not None:
                await verify(upstream, answer)
            won.append(answer)
            finished.set()
            race.cancel_scope.cancel()  # the others' answers are not needed
        except UpstreamFailure as exc:
            failures.append(f"{upstream.label}: {exc}")
            finished.set()
        except Forged as exc:
            upstream.exclude(str(exc))
            failures.append(f"{upstream.label}: excluded: {exc}")
            finished.set()

    async def send(self, upstream: Upstream, method: str, params: Any) -> dict[str, Any]:
        """One call to one upstream, its health updated."""
        (answer,) = await self.send_batch(upstream, [(method, params)])
        return answer

    async def send_batch(
        self, upstream: Upstream, calls: list[tuple[str, Any]]
    ) -> list[dict[str, Any]]:
        """Calls to one upstream in one round trip (a JSON-RPC batch when several), their
        answers in order, its health updated."""
        requests: list[dict[str, Any]] = []
        for method, params in calls:
            request: dict[str, Any] = {"jsonrpc": "2.0", "id": next(_ids), "method": method}
            if params is not None:
                request["params"] = params
            requests.append(request)
        started = trio.current_time()
        try:
            with trio.fail_after(self._settings.request_timeout_s):
                payload = requests[0] if len(requests) == 1 else requests
                reply = await self._client.post(upstream.url, json=payload)
        except (trio.TooSlowError, httpx.HTTPError) as exc:
            upstream.failed()
            raise UpstreamFailure(str(exc) or type(exc).__name__) from None
        try:
            answers = _responses_of(reply, [r["id"] for r in requests])
        except UpstreamFailure:
            upstream.failed()
            raise
        upstream.succeeded(trio.current_time() - started)
        return answers


def _responses_of(reply: httpx.Response, ids: list[int]) -> list[dict[str, Any]]:
    if reply.status_code == 429 or reply.status_code >= 500:
        raise UpstreamFailure(f"HTTP {reply.status_code}")
    try:
        decoded = json.loads(reply.content)
    except ValueError:
        raise UpstreamFailure(f"HTTP {reply.status_code}, not JSON") from None
    items = decoded if isinstance(decoded, list) else [decoded]
    by_id = {a.get("id"): a for a in items if isinstance(a, dict)}
    if len(ids) == 1 and len(items) == 1 and isinstance(items[0], dict):
        by_id = {ids[0]: items[0]}  # (one answer: whatever id it echoes)
    if any(i not in by_id for i in ids):
        raise UpstreamFailure("not a JSON-RPC response to each call")
    return [_response_of(by_id[i]) for i in ids]


def _response_of(answer: Any) -> dict[str, Any]:
    if not isinstance(answer, dict) or ("result" not in answer and "error" not in answer):
        raise UpstreamFailure("not a JSON-RPC response")
    error = answer.get("error")
    if isinstance(error, dict) and error.get("code") in RETRY_CODES:
        raise UpstreamFailure(f"error {error.get('code')}: {str(error.get('message'))[:200]}")
    return {k: answer[k] for k in ("result", "error") if k in answer}
