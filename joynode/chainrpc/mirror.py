"""The SovereignRPC contract's clients and providers in SQLite, kept by the chain watcher.

``RpcMirror`` is one of the watcher's mirrors (``joynode.chain.watcher.Mirror``). For
every client a poll's plan or credit events touched it re-reads ``planUntil`` and
``creditOf`` (``rpc_plans``); for every provider and chain a provider event touched,
``providerOf`` and ``isActive`` (``rpc_providers``). Rows are re-read, not derived from
the events, so a retracted event (a reorg) leaves the rows as the chain now has them.
Addresses are kept in lower case.
The ``/rpc`` gateway authorizes wallet clients from ``rpc_plans`` alone: no chain call
per request.
"""

from __future__ import annotations

import sqlite3

from joynode.chain.deploy import Deployment
from joynode.chain.rpc import RpcLink
from joynode.chain.watcher import MirrorWrite
from joynode.messages import ChainEvent

CONTRACT = "EnhancedSovereignRPC"
CLIENT_EVENTS = frozenset(
    {
        "PlanSubscribed",
        "CreditDeposited",
        "CreditWithdrawalStarted",
        "CreditWithdrawn",
        "CreditDebited",
    }
)
PROVIDER_EVENTS = frozenset(
    {
        "ProviderRegistered",
        "ProviderUpdated",
        "ProviderUnbonding",
        "ProviderWithdrawn",
        "ProviderSlashed",
    }
)

PlanRow = tuple[str, int, str, str, int]
ProviderRow = tuple[str, int, str, str, int, str, int, int]


class RpcMirror:
    def __init__(self, link: RpcLink, deployment: Deployment) -> None:
        self._link = link
        self._contract = deployment.contract(link.w3, CONTRACT)

    async def read(self, events: list[ChainEvent]) -> MirrorWrite:
        mine = [e for e in events if e.contract == CONTRACT]
        clients = {str(e.args["client"]) for e in mine if e.name in CLIENT_EVENTS}
        providers = {
            (str(e.args["provider"]), int(str(e.args["chainId"])))
            for e in mine
            if e.name in PROVIDER_EVENTS
        }
        if not clients and not providers:
            return lambda conn: None
        block = max(e.block for e in mine)
        plans, listed = await self._link.call(self._read, clients, providers, block)

        def write(conn: sqlite3.Connection) -> None:
            conn.executemany("INSERT OR REPLACE INTO rpc_plans VALUES (?, ?, ?, ?, ?)", plans)
            conn.executemany(
                "INSERT OR REPLACE INTO rpc_providers VALUES (?, ?, ?, ?, ?, ?, ?, ?)", listed
            )

        return write

    def _read(
        self, clients: set[str], providers: set[tuple[str, int]], block: int
    ) -> tuple[list[PlanRow], list[ProviderRow]]:
        fns = self._contract.functions
        plans: list[PlanRow] = []
        for client in clients:
            until = int(fns.planUntil(client).call())
            balance, _, _, available = fns.creditOf(client).call()
            plans.append((client.lower(), until, str(balance), str(available), block))
        listed: list[ProviderRow] = []
        for provider, chain_id in providers:
            deposit, endpoint, _, unbonding_until, served, slashes = fns.providerOf(
                provider, chain_id
            ).call()
            active = bool(fns.isActive(provider, chain_id).call())
            listed.append(
                (
                    provider.lower(),
                    chain_id,
                    str(deposit),
                    str(endpoint),
                    int(unbonding_until),
                    str(served),
                    int(slashes),
                    int(active),
                )
            )
        return plans, listed
