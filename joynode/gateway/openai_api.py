"""The OpenAI-compatible API on the http actor (issue 19, in progress).

Today: ``GET /v1/models`` behind the API keys of ``gateway.apikeys``
(``Authorization: Bearer jn-...``), each key held to its rate per minute (a
token bucket in memory, a minute's worth of burst) and its token quota, and
OpenAI-shaped errors (``{"error": {"message", "type", "param", "code"}}``,
with OpenAI's status codes: 401 for a missing or wrong key, 429 for a rate or
a quota, 404 for an unknown route under ``/v1``, 400 for a bad request), so
the official clients raise their usual exceptions. The completions
endpoints come next, on the same auth.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from functools import partial

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from joynode.gateway import apikeys
from joynode.gateway.apikeys import ApiKey
from joynode.ratelimit import TokenBucket
from joynode.state import StateStore

OWNER = "joynet"
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    429: "requests",
}


class OpenAIError(Exception):
    """An error answered as OpenAI answers it."""

    def __init__(self, status: int, message: str, code: str | None, kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.kind = kind or ERROR_TYPES.get(status, "api_error")

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.kind, "param": None, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


class KeyCheck:
    """The FastAPI dependency that admits a request's API key, or raises ``OpenAIError``."""

    def __init__(self, state: StateStore, clock: Callable[[], float] = time.monotonic) -> None:
        self._state = state
        self._clock = clock
        self._buckets: dict[str, tuple[int, TokenBucket]] = {}

    async def __call__(self, request: Request) -> ApiKey:
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise OpenAIError(
                401,
                "You didn't provide an API key: send it as 'Authorization: Bearer jn-...'.",
                "invalid_api_key",
            )
        key = await self._state.read(partial(apikeys.authenticate, presented=presented.strip()))
        if key is None:
            raise OpenAIError(401, "Incorrect API key provided.", "invalid_api_key")
        if not self._bucket(key).take(self._clock()):
            raise OpenAIError(
                429,
                f"Rate limit reached for API key {key.id}: {key.rate_per_minute} requests "
                "per minute.",
                "rate_limit_exceeded",
            )
        if key.over_quota:
            raise OpenAIError(
                429,
                f"API key {key.id} has used its quota of {key.quota_tokens} tokens.",
                "insufficient_quota",
                "insufficient_quota",
            )
        return key

    def _bucket(self, key: ApiKey) -> TokenBucket:
        """The key's bucket (a new one when its rate changed)."""
        held = self._buckets.get(key.id)
        if held is None or held[0] != key.rate_per_minute:
            bucket = TokenBucket(key.rate_per_minute / 60.0, key.rate_per_minute, self._clock())
            held = self._buckets[key.id] = (key.rate_per_minute, bucket)
        return held[1]


def openai_api(state: StateStore, served: Callable[[], Mapping[str, str]]) -> APIRouter:
    """The ``/v1`` routes. ``served``: the models this node serves, name -> id (CID)."""
    router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])
    key_check = KeyCheck(state)

    @router.get("/models", summary="The models this node serves (OpenAI's model list)")
    async def models(_: ApiKey = Depends(key_check)) -> JSONResponse:  # noqa: B008 (FastAPI)
        data = [
            {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": OWNER,
                "joynet": {"model_id": model_id},
            }
            for name, model_id in sorted(served().items())
        ]
        return JSONResponse({"object": "list", "data": data})

    return router


def install_error_handlers(app: FastAPI) -> None:
    """OpenAI-shaped errors for ``OpenAIError`` and for whatever fails under ``/v1``."""

    async def openai_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, OpenAIError)
        return exc.response()

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if not request.url.path.startswith("/v1/"):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)
        code = "unknown_url" if exc.status_code == 404 else None
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return OpenAIError(exc.status_code, message, code).response()

    async def invalid_request(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        where = "; ".join(
            ".".join(str(p) for p in e.get("loc", ())) + ": " + str(e.get("msg", ""))
            for e in exc.errors()
        )
        return OpenAIError(400, f"Invalid request: {where}", None).response()

    app.add_exception_handler(OpenAIError, openai_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
