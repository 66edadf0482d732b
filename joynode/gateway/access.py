"""Who may use the gateway: API keys (``gateway.apikeys``) and signed-in wallets.

A bearer token is an API key (``jn-...``: the operator's clients, each with its
rate and token quota) or a wallet's session JWT (``gateway.wallets``: anyone who
signed in with Ethereum, paying from its own prepaid balance, held to
``http.wallet_rate_per_minute``). Each client's rate is a token bucket in memory
with a minute's worth of burst.

A key found good is remembered for ``KEY_MEMORY_S`` (by the SHA-256 of what was
presented, never the key itself), so a busy client costs no database read per call;
a revocation or a used-up quota takes effect within that time.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from functools import partial

from fastapi import Request

from joynode.gateway import apikeys
from joynode.gateway.apikeys import ApiKey
from joynode.gateway.errors import OpenAIError
from joynode.gateway.wallets import SignInError, WalletSession, WalletSignIn
from joynode.ratelimit import TokenBucket
from joynode.state import StateStore

Client = ApiKey | WalletSession
KEY_MEMORY_S = 2.0
MAX_REMEMBERED = 10_000


class ClientCheck:
    """The FastAPI dependency that admits a request's bearer token, or raises
    ``OpenAIError`` (401 unknown, 429 over its rate or quota)."""

    def __init__(
        self,
        state: StateStore,
        wallets: WalletSignIn | None,
        wallet_rate_per_minute: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._state = state
        self._wallets = wallets
        self._wallet_rate = wallet_rate_per_minute
        self._clock = clock
        self._buckets: dict[str, tuple[int, TokenBucket]] = {}
        self._remembered: dict[bytes, tuple[float, ApiKey]] = {}  # digest -> (until, key)

    async def __call__(self, request: Request) -> Client:
        return await self.admit(request.headers.get("authorization", ""))

    async def admit(self, authorization: str) -> Client:
        """The client an ``Authorization`` header's value names."""
        presented = bearer_token(authorization)
        if presented.startswith(apikeys.PREFIX + "-"):
            return await self._api_key(presented)
        return self._wallet(presented)

    async def _api_key(self, presented: str) -> ApiKey:
        digest = hashlib.sha256(presented.encode()).digest()
        now = self._clock()
        held = self._remembered.get(digest)
        if held is None or held[0] <= now:
            found = await self._state.read(partial(apikeys.authenticate, presented=presented))
            if found is None:
                raise OpenAIError(401, "Incorrect API key provided.", "invalid_api_key")
            if len(self._remembered) >= MAX_REMEMBERED:
                self._remembered.clear()
            held = self._remembered[digest] = (now + KEY_MEMORY_S, found)
        key = held[1]
        self._take(key.id, key.rate_per_minute, f"API key {key.id}")
        if key.over_quota:
            raise OpenAIError(
                429,
                f"API key {key.id} has used its quota of {key.quota_tokens} tokens.",
                "insufficient_quota",
                "insufficient_quota",
            )
        return key

    def _wallet(self, presented: str) -> WalletSession:
        if self._wallets is None:
            raise OpenAIError(401, "Incorrect API key provided.", "invalid_api_key")
        try:
            session = self._wallets.session(presented)
        except SignInError as exc:
            raise OpenAIError(401, str(exc), "invalid_api_key") from None
        self._take(session.address.lower(), self._wallet_rate, f"wallet {session.address}")
        return session

    def _take(self, client: str, rate_per_minute: int, who: str) -> None:
        """One request off ``client``'s bucket (a new bucket when its rate changed)."""
        held = self._buckets.get(client)
        now = self._clock()
        if held is None or held[0] != rate_per_minute:
            bucket = TokenBucket(rate_per_minute / 60.0, rate_per_minute, now)
            held = self._buckets[client] = (rate_per_minute, bucket)
        if not held[1].take(now):
            raise OpenAIError(
                429,
                f"Rate limit reached for {who}: {rate_per_minute} requests per minute.",
                "rate_limit_exceeded",
            )


class WalletCheck:
    """The dependency of the wallet routes: a signed-in wallet (an API key is refused)."""

    def __init__(self, clients: ClientCheck) -> None:
        self._clients = clients

    async def __call__(self, request: Request) -> WalletSession:
        client = await self._clients(request)
        if not isinstance(client, WalletSession):
            raise OpenAIError(
                403, "this route is for signed-in wallets, not API keys", "wallet_required"
            )
        return client


def bearer_token(authorization: str) -> str:
    scheme, _, presented = authorization.partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise OpenAIError(
            401,
            "You didn't provide an API key: send it as 'Authorization: Bearer jn-...' "
            "(or a wallet's session token, from /v1/joynet/auth/sign-in).",
            "invalid_api_key",
        )
    return presented.strip()
