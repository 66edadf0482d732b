"""The chain RPC actor: a JSON-RPC front for each chain the operator lists in ``[rpc]``.

It owns one HTTP client (httpx, on trio), one answer cache for all chains, and per
chain an ``UpstreamPool`` and a ``ChainProxy`` whose head tracker runs in this actor's
nursery. The http actor routes ``/rpc/{chain_id}`` here (``chainrpc.api``). Calls no
upstream answers go to peers that serve the chain, and peers' such calls are answered
here, signed (``chainrpc.peers``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import httpx
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge

from joynode.chainrpc.cache import AnswerCache
from joynode.chainrpc.methods import FILTERS, READS
from joynode.chainrpc.peers import ChainPeers
from joynode.chainrpc.plans import RpcPlans
from joynode.chainrpc.proxy import ChainProxy
from joynode.chainrpc.upstreams import UpstreamPool
from joynode.config import RpcSection
from joynode.keys import NodeKey
from joynode.signatures import Eip712Domain

if TYPE_CHECKING:
    from joynode.abc import ChainRelayNetwork

log = logging.getLogger(__name__)

MAX_CONNECTIONS_PER_UPSTREAM = 32
KNOWN_METHODS = READS | FILTERS | {"eth_sendRawTransaction", "eth_chainId"}


class ChainRpcService:
    name = "rpc"

    def __init__(
        self,
        settings: RpcSection,
        registry: CollectorRegistry,
        network: ChainRelayNetwork,
        key: NodeKey,
        domain: Callable[[], Eip712Domain],
        plans: RpcPlans,
    ) -> None:
        """``domain()``: the SovereignRPC contract's EIP-712 domain, which answers to
        peers are signed in; ``plans``: who may call, and what is reported."""
        self._settings = settings
        self.plans = plans
        self.peers = ChainPeers(network, key, self.proxy, domain)
        self._cache = AnswerCache(int(settings.cache_mib * 1024 * 1024))
        self._proxies: dict[int, ChainProxy] = {}
        self._calls = Counter(
            "joynode_rpc_calls_total",
            "Chain RPC calls by chain, method (other: not a known one) and outcome "
            "(cached, shared, upstream, peer, failed)",
            ["chain", "method", "outcome"],
            registry=registry,
        )
        self._upstream_up = Gauge(
            "joynode_rpc_upstream_available",
            "1 while an upstream's circuit lets calls through and it is not excluded",
            ["chain", "upstream"],
            registry=registry,
        )
        self._head = Gauge(
            "joynode_rpc_head_block",
            "Each chain's best upstream head",
            ["chain"],
            registry=registry,
        )

    def proxy(self, chain_id: int) -> ChainProxy | None:
        """The chain's front, once the actor runs; None for a chain not served."""
        return self._proxies.get(chain_id)

    @property
    def chain_ids(self) -> list[int]:
        return [c.chain_id for c in self._settings.chains]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        limits = httpx.Limits(max_connections=MAX_CONNECTIONS_PER_UPSTREAM * 4)
        async with (
            # (each call has its own deadline: rpc.request_timeout_s)
            httpx.AsyncClient(limits=limits, timeout=None, trust_env=False) as client,  # noqa: S113
            trio.open_nursery() as nursery,
        ):
            self.peers.register()
            for chain in self._settings.chains:
                pool = UpstreamPool(list(chain.upstreams), self._settings, client)
                proxy = ChainProxy(
                    chain,
                    pool,
                    self._cache,
                    self._settings,
                    self._counter(chain.name),
                    self.peers,
                )
                await nursery.start(proxy.track_head)
                self._proxies[chain.chain_id] = proxy
                log.info(
                    "rpc: serving chain %d (%s) from %d upstream(s)",
                    chain.chain_id,
                    chain.name,
                    len(chain.upstreams),
                )
            nursery.start_soon(self._gauges)
            nursery.start_soon(self.plans.run)
            task_status.started()

    def _counter(self, chain: str) -> Any:
        def count(method: str, outcome: str) -> None:
            known = method if method in KNOWN_METHODS else "other"
            self._calls.labels(chain, known, outcome).inc()

        return count

    async def _gauges(self) -> None:
        while True:
            for proxy in self._proxies.values():
                name = proxy.chain.name
                if proxy.head is not None:
                    self._head.labels(name).set(proxy.head)
                for upstream in proxy.pool.upstreams:
                    up = upstream.excluded is None and upstream.circuit.value != "open"
                    self._upstream_up.labels(name, upstream.label).set(1 if up else 0)
            await trio.sleep(self._settings.head_poll_s)

    def statistics(self) -> dict[str, Any]:
        return {
            "cache": asdict(self._cache.statistics()),
            "peers": self.peers.statistics(),
            "usage": self.plans.statistics(),
            "chains": [
                {
                    **asdict(proxy.statistics()),
                    "name": proxy.chain.name,
                    "upstreams": [asdict(u.statistics()) for u in proxy.pool.upstreams],
                }
                for proxy in self._proxies.values()
            ],
        }
