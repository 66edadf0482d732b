"""The wallet routes of the gateway: Sign-In with Ethereum, and the spender approval.

A wallet signs in (``/v1/joynet/auth/...``, EIP-4361, ``gateway.wallets``) and
gets a session token that the OpenAI routes take as a bearer token. To be served,
it approves this node once as the spender of its prepaid balance, capped and
expiring (``/v1/joynet/spender``: EIP-712 ``Spender``, which the node brings
on-chain, paying the gas); this node then signs each of the wallet's requests
for it, and the committee's members check the approval and the balance before
running one. The cap is the most this node can ever spend of the wallet's JOY.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pydantic
from fastapi import APIRouter, Depends, Request
from starlette.responses import JSONResponse

from joynode.abc import SpenderApprovals
from joynode.chain.rpc import ChainUnreachable
from joynode.chain.sender import TransactionFailed
from joynode.control.jsonrpc import RpcError
from joynode.gateway.access import ClientCheck, WalletCheck
from joynode.gateway.errors import OpenAIError
from joynode.gateway.wallets import NONCE_TTL_S, SignInError, WalletSession, WalletSignIn

STATEMENT = "Sign in to this JoyNet gateway."
UINT128 = 2**128 - 1
T = TypeVar("T")


class SignIn(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    message: str = pydantic.Field(max_length=4096, description="the EIP-4361 message signed")
    signature: str = pydantic.Field(
        pattern=r"^0x[0-9a-fA-F]{130}$", description="its personal_sign signature"
    )


class SpenderTerms(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    cap: int = pydantic.Field(gt=0, le=UINT128, description="most wei of JOY to spend")
    expiry: int = pydantic.Field(gt=0, le=2**63 - 1, description="unix seconds")


class SignedSpender(SpenderTerms):
    nonce: int = pydantic.Field(gt=0, le=2**64 - 1)
    signature: str = pydantic.Field(pattern=r"^0x[0-9a-fA-F]{130}$")


def wallet_api(
    wallets: WalletSignIn,
    clients: ClientCheck,
    spenders: SpenderApprovals | None,
    public_host: str | None,
) -> APIRouter:
    """The ``/v1/joynet`` wallet routes. ``public_host``: the domain wallets sign in to
    (None: the request's Host header)."""
    router = APIRouter(prefix="/v1/joynet", tags=["Wallets"])
    wallet_check = WalletCheck(clients)

    def host_of(request: Request) -> str:
        return public_host or request.headers.get("host", "")

    @router.get("/auth/nonce", summary="A nonce, and the fields of the message to sign")
    async def nonce(request: Request) -> JSONResponse:
        try:
            fresh = wallets.nonce()
        except SignInError as exc:
            raise OpenAIError(503, str(exc), "busy") from None
        host = host_of(request)
        return JSONResponse(
            {
                "nonce": fresh,
                "domain": host,
                "uri": f"{request.url.scheme}://{host}",
                "version": "1",
                "chain_id": wallets.chain_id(),
                "statement": STATEMENT,
                "expires_in": NONCE_TTL_S,
                "spender": spenders.address if spenders is not None else None,
            }
        )

    @router.post("/auth/sign-in", summary="Trade a signed EIP-4361 message for a session token")
    async def sign_in(body: SignIn, request: Request) -> JSONResponse:
        try:
            token, session = wallets.sign_in(body.message, body.signature, host_of(request))
        except SignInError as exc:
            raise OpenAIError(401, f"sign-in refused: {exc}", "invalid_signature") from None
        return JSONResponse(
            {
                "access_token": token,
                "token_type": "bearer",
                "address": session.address,
                "expires_at": int(session.expires_at),
                "expires_in": max(0, int(session.expires_at - time.time())),
            }
        )

    @router.post("/auth/sign-out", summary="End this session (its token stops working)")
    async def sign_out(session: WalletSession = Depends(wallet_check)) -> JSONResponse:  # noqa: B008
        wallets.sign_out(session)
        return JSONResponse({"signed_out": True})

    def approvals() -> SpenderApprovals:
        if spenders is None:
            raise OpenAIError(503, "this node has no prepaid contract", "prepaid_unavailable")
        return spenders

    async def on_chain(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``fn(*args)``, a chain that cannot answer now being a 503."""
        try:
            return await fn(*args)
        except (ChainUnreachable, RpcError) as exc:
            raise OpenAIError(503, f"the chain cannot answer: {exc}", "chain_unavailable") from None

    @router.get("/spender", summary="What this wallet lets this node spend")
    async def spender(session: WalletSession = Depends(wallet_check)) -> JSONResponse:  # noqa: B008
        found = approvals()
        return JSONResponse(
            {"spender": found.address, **await on_chain(found.spending, session.address)}
        )

    @router.post("/spender/typed-data", summary="The EIP-712 approval for the wallet to sign")
    async def typed_data(
        terms: SpenderTerms,
        session: WalletSession = Depends(wallet_check),  # noqa: B008
    ) -> JSONResponse:
        found = approvals()
        approval = await on_chain(found.spender_approval, session.address, terms.cap, terms.expiry)
        return JSONResponse(approval.typed_data())

    @router.post("/spender", summary="Bring the wallet's signed approval on-chain")
    async def approve(
        signed: SignedSpender,
        session: WalletSession = Depends(wallet_check),  # noqa: B008
    ) -> JSONResponse:
        found = approvals()
        quoted = await on_chain(found.spender_approval, session.address, signed.cap, signed.expiry)
        approval = dataclasses.replace(quoted, nonce=signed.nonce)  # the nonce the wallet signed
        try:
            tx = await on_chain(
                found.approve_spender, approval, bytes.fromhex(signed.signature[2:])
            )
        except TransactionFailed as exc:
            raise OpenAIError(400, f"the approval was refused: {exc}", "approval_refused") from None
        return JSONResponse(
            {"tx": tx, "spender": found.address, **await on_chain(found.spending, session.address)}
        )

    return router
