"""``gov.dispute``: dispute a committee certificate, for the DAO to resolve.

The signers come from the certificate's ``InferenceVerified`` event as the
chain watcher recorded it (SQLite: no log query over the chain's history). The
node's account disputes for free when it was the request's requester (a node
pays for the jobs it submits from that account); otherwise it posts the bond,
approved first. The DAO decides by a proposal calling
``DisputeResolver.resolve(requestId, upheld)`` (docs/operator.md shows one).
"""

from __future__ import annotations

import json
import sqlite3
import time
from functools import partial
from typing import Any

import pydantic

from joynode.abc import GovernanceChain
from joynode.chain.sender import TransactionFailed
from joynode.control.jsonrpc import RpcError
from joynode.control.methods import ControlMethod, ControlSession
from joynode.governance.service import GOVERNANCE_ERROR, deployment_with, explain
from joynode.state import StateStore

DISPUTE_STATUS = ("none", "open", "upheld", "rejected")  # DisputeResolver.Status


class DisputeParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    request_id: str = pydantic.Field(
        pattern=r"^0x[0-9a-fA-F]{64}$", description="the paid request whose certificate is wrong"
    )
    reason: str = pydantic.Field(min_length=1, max_length=2000, description="why, for voters")


def certificate_signers(conn: sqlite3.Connection, request_id: str) -> list[str] | None:
    """The signers of ``request_id``'s certificate as the watcher recorded it; None if unseen."""
    row = conn.execute(
        "SELECT args FROM chain_events WHERE contract = 'ProofOfInference'"
        " AND name = 'InferenceVerified' AND json_extract(args, '$.requestId') = ?"
        " ORDER BY block DESC LIMIT 1",
        (request_id.lower(),),
    ).fetchone()
    return None if row is None else [str(s) for s in json.loads(row[0])["signers"]]


class Disputes:
    """The node's account opening disputes over certificates."""

    def __init__(self, state: StateStore, chain: GovernanceChain) -> None:
        self._state = state
        self._chain = chain

    def _contract(self, name: str) -> Any:
        return deployment_with(self._chain, name).contract(self._chain.w3, name)

    async def dispute(self, request_id: str, reason: str) -> dict[str, Any]:
        disputes = self._contract("DisputeResolver")
        market, token = self._contract("ModelMarketplace"), self._contract("JoyToken")
        signers = await self._state.read(partial(certificate_signers, request_id=request_id))
        if signers is None:
            raise RpcError(
                GOVERNANCE_ERROR,
                f"no certificate for {request_id} in this node's record of the chain (a "
                "certificate landed just now shows up once the watcher has seen its block)",
            )
        me = self._chain.address
        key = bytes.fromhex(request_id[2:])

        def terms() -> tuple[str, int, int]:
            requester = str(market.functions.requestInfo(key).call()[1])
            bond = int(disputes.functions.bond().call())
            allowance = int(token.functions.allowance(me, disputes.address).call())
            return requester, bond, allowance

        requester, bond, allowance = await self._chain.call(terms)
        posted = 0 if requester.lower() == me.lower() else bond
        try:
            if posted and allowance < posted:
                await self._chain.transact(token.functions.approve(disputes.address, posted))
            receipt = await self._chain.transact(disputes.functions.dispute(key, signers, reason))
        except TransactionFailed as exc:
            raise RpcError(GOVERNANCE_ERROR, explain(exc, None, time.time())) from None
        return {
            "request_id": request_id,
            "signers": signers,
            "bond": str(posted),
            "status": DISPUTE_STATUS[1],
            "tx": receipt["transactionHash"].to_0x_hex(),
        }

    def control_methods(self) -> list[ControlMethod]:
        async def gov_dispute(params: DisputeParams, _: ControlSession) -> dict[str, Any]:
            return await self.dispute(params.request_id.lower(), params.reason)

        return [
            ControlMethod(
                "gov.dispute",
                DisputeParams,
                gov_dispute,
                "Dispute a request's certificate (free for its requester, else a bond).",
            )
        ]
