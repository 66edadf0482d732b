"""Paying for ``/rpc``: which wallets may call (a plan on the SovereignRPC contract), and
the calls served to them, reported to the contract in batches.

A signed-in wallet calls only with an unexpired subscription or credit that is not
withdrawing, as the contract's mirror (``rpc_plans``, ``chainrpc.mirror``) has them: a
SQLite read, never a chain call, per request. An API key is the operator's own grant
and always calls (its usage is the operator's to bill). Calls served to wallets are
counted in memory, added to ``rpc_usage`` every few seconds (so a restart loses at most
those seconds), and every ``rpc.report_interval_s`` reported with ``reportUsage`` for
each chain this node is an active provider of, in batches within the contract's bounds;
what a report covered leaves ``rpc_usage`` once its transaction has landed (a node
killed in between reports those calls again: the contract cannot tell).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Any

import trio

from joynode.abc import GovernanceChain
from joynode.chain.rpc import ChainUnreachable
from joynode.chain.sender import TransactionFailed
from joynode.chainrpc.mirror import CONTRACT
from joynode.config import RpcSection
from joynode.gateway.access import Client
from joynode.gateway.apikeys import ApiKey
from joynode.gateway.errors import OpenAIError
from joynode.state import StateStore

log = logging.getLogger(__name__)

FLUSH_S = 5.0
MAX_REPORT_ENTRIES = 256  # the contract's bound on a report's clients


class RpcPlans:
    def __init__(
        self,
        settings: RpcSection,
        state: StateStore,
        chain: GovernanceChain | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._state = state
        self._chain = chain
        self._clock = clock
        self._served: Counter[tuple[str, int]] = Counter()  # (wallet, chain id) -> calls
        self.reported_calls = 0
        self.reports = 0

    async def admit(self, client: Client) -> None:
        """``OpenAIError`` 402 for a wallet without a plan (when ``rpc.wallets_need_plan``)."""
        if isinstance(client, ApiKey) or not self._settings.wallets_need_plan:
            return
        wallet = client.address.lower()
        row = await self._state.read(
            lambda c: c.execute(
                "SELECT plan_until, available FROM rpc_plans WHERE client = ?", (wallet,)
            ).fetchone()
        )
        if row is not None and (int(row[0]) > self._clock() or int(row[1]) > 0):
            return
        where = ""
        if self._chain is not None and self._chain.deployment is not None:
            where = f" at {self._chain.deployment.addresses[CONTRACT]}"
        raise OpenAIError(
            402,
            f"wallet {client.address} has no plan for the chain RPC: subscribe, or deposit "
            f"credit, on the {CONTRACT} contract{where}",
            "insufficient_quota",
        )

    def served(self, client: Client, chain_id: int, calls: int) -> None:
        """``calls`` answered for ``client`` on ``chain_id`` (counted for wallets only)."""
        if not isinstance(client, ApiKey) and calls > 0:
            self._served[(client.address.lower(), chain_id)] += calls

    async def run(self) -> None:
        """Flush the counts every few seconds and report every ``rpc.report_interval_s``,
        until cancelled (a last flush then)."""
        next_report = trio.current_time() + self._settings.report_interval_s
        try:
            while True:
                await trio.sleep(FLUSH_S)
                await self.flush()
                if trio.current_time() >= next_report:
                    await self.report()
                    next_report = trio.current_time() + self._settings.report_interval_s
        finally:
            with trio.CancelScope(shield=True):
                await self.flush()

    async def flush(self) -> None:
        served, self._served = self._served, Counter()
        if not served:
            return

        def add(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO rpc_usage VALUES (?, ?, ?) ON CONFLICT (client, chain_id) "
                "DO UPDATE SET calls = calls + excluded.calls",
                [(wallet, chain_id, calls) for (wallet, chain_id), calls in served.items()],
            )

        await self._state.write(add)

    async def report(self) -> None:
        """Report what ``rpc_usage`` holds, for each chain this node is an active provider
        of; a report that fails stays for the next time."""
        chain = self._chain
        if chain is None or chain.deployment is None:
            return
        me = chain.address.lower()
        rows = await self._state.read(
            lambda c: c.execute(
                "SELECT u.chain_id, u.client, u.calls FROM rpc_usage u JOIN rpc_providers p "
                "ON p.chain_id = u.chain_id AND p.provider = ? AND p.active = 1 "
                "ORDER BY u.chain_id, u.client",
                (me,),
            ).fetchall()
        )
        if not rows:
            return
        contract = chain.deployment.contract(chain.w3, CONTRACT)
        try:
            most = max(1, int(await chain.call(contract.functions.maxCallsPerReport().call)))
        except ChainUnreachable:
            return
        for chain_id, batch in _batches(rows, most):
            clients = [chain.w3.to_checksum_address(client) for client, _ in batch]
            calls = [count for _, count in batch]
            try:
                await chain.transact(contract.functions.reportUsage(chain_id, clients, calls))
            except (ChainUnreachable, TransactionFailed) as exc:
                log.warning("rpc: usage of chain %d not reported yet: %s", chain_id, exc)
                return
            await self._state.write(partial(_reported, chain_id=chain_id, batch=batch))
            self.reports += 1
            self.reported_calls += sum(calls)
            log.info(
                "rpc: reported %d calls of %d clients on chain %d", sum(calls), len(batch), chain_id
            )

    async def providers(self, chain_id: int) -> list[dict[str, Any]]:
        """A chain's providers as the mirror has them, the largest deposit first."""
        rows = await self._state.read(
            lambda c: c.execute(
                "SELECT provider, deposit, endpoint, unbonding_until, served_calls, slashes, "
                "active FROM rpc_providers WHERE chain_id = ?",
                (chain_id,),
            ).fetchall()
        )
        found = [
            {
                "provider": r[0],
                "deposit": r[1],
                "endpoint": r[2],
                "unbonding_until": r[3] or None,
                "served_calls": r[4],
                "slashes": r[5],
                "active": bool(r[6]),
            }
            for r in rows
        ]
        return sorted(found, key=lambda p: -int(p["deposit"]))

    async def plan_of(self, client: str) -> dict[str, Any]:
        """A client's plan and credit as the mirror has them, and whether it may call."""
        row = await self._state.read(
            lambda c: c.execute(
                "SELECT plan_until, credit, available, block FROM rpc_plans WHERE client = ?",
                (client.lower(),),
            ).fetchone()
        )
        until, credit, available, block = row if row is not None else (0, "0", "0", None)
        return {
            "client": client,
            "plan_until": until or None,
            "credit": credit,
            "available_credit": available,
            "authorized": int(until) > self._clock() or int(available) > 0,
            "as_of_block": block,
        }

    def statistics(self) -> dict[str, int]:
        return {
            "reports": self.reports,
            "reported_calls": self.reported_calls,
            "unflushed_calls": sum(self._served.values()),
        }


def _batches(
    rows: list[tuple[int, str, int]], most_calls: int
) -> list[tuple[int, list[tuple[str, int]]]]:
    """Reports of one chain each, within the contract's bounds on entries and calls; a
    client's calls over the bound are split across reports."""
    out: list[tuple[int, list[tuple[str, int]]]] = []
    for chain_id, client, calls in rows:
        while calls > 0:
            if not out or out[-1][0] != chain_id:
                out.append((chain_id, []))
            batch = out[-1][1]
            room = most_calls - sum(count for _, count in batch)
            if room <= 0 or len(batch) >= MAX_REPORT_ENTRIES:
                out.append((chain_id, []))
                continue
            take = min(calls, room)
            batch.append((client, take))
            calls -= take
    return out


def _reported(conn: sqlite3.Connection, chain_id: int, batch: list[tuple[str, int]]) -> None:
    for client, calls in batch:
        conn.execute(
            "UPDATE rpc_usage SET calls = calls - ? WHERE client = ? AND chain_id = ?",
            (calls, client, chain_id),
        )
    conn.execute("DELETE FROM rpc_usage WHERE calls <= 0")
