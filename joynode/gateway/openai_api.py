"""The OpenAI-compatible API on the http actor: models, completions, chat, certificates.

Every route is behind a bearer token (``gateway.access``): an API key of
``gateway.apikeys`` (``jn-...``), held to its rate and token quota, or a
signed-in wallet's session (``gateway.wallets``), whose answers its own
prepaid balance pays for; errors are OpenAI's (``gateway.errors``). Answers
come from ``gateway.answers``: a committee's certified job by default, or this
node alone (``"joynet": {"verification": "local"}``), and carry their
certificate in the ``joynet`` field and in ``X-JoyNet-*`` headers.

Streams are server-sent events ending in ``data: [DONE]``. A ``local`` stream
sends tokens as the engine makes them; a ``committee`` stream sends the
output once it is certified (members vote on the whole output, so nothing
before that is verified). Each chunk's ``joynet`` field has its token ids,
the usage so far and ``chain``: keccak256(previous chain, keccak256(text),
token ids as 4-byte words), starting from 32 zero bytes; the last event
before ``[DONE]`` is the certificate, with the final ``chain``, so a client
sees that the certificate covers exactly what it was streamed. A client that
goes away, streaming or not, aborts the job: the local engine stops, a
committee's members are told to stop (``JobCancel``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import aclosing
from functools import partial
from typing import Any, TypeVar

import trio
from eth_utils.crypto import keccak
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from joynode.exceptiongroups import leaves
from joynode.gateway import apikeys
from joynode.gateway.access import Client, ClientCheck
from joynode.gateway.answers import Answer, Answerer, last_answer
from joynode.gateway.apikeys import ApiKey
from joynode.gateway.errors import OpenAIError
from joynode.gateway.forwarding import LocalForwarder
from joynode.gateway.requests import (
    Ask,
    BadRequest,
    ChatCompletionRequest,
    CompletionRequest,
    ask_of,
)
from joynode.gateway.wallets import WalletSession
from joynode.messages import TokenDelta
from joynode.state import StateStore

OWNER = "joynet"
PING_S = 15.0  # an SSE comment this often keeps proxies from closing a quiet stream
T = TypeVar("T")


def openai_api(
    state: StateStore,
    models: Callable[[], Mapping[str, str]],
    answerer: Answerer,
    clients: ClientCheck,
    forwarder: LocalForwarder,
) -> APIRouter:
    """The ``/v1`` routes. ``models``: what the network serves that this node knows of,
    name (or id) -> id (CID); ``forwarder``: where ``local`` requests this node cannot
    answer go."""
    router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])
    runner = Runner(answerer, forwarder)

    @router.get("/models", summary="The models this node and its peers serve")
    async def list_models(_: Client = Depends(clients)) -> JSONResponse:  # noqa: B008
        data = [
            {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": OWNER,
                "joynet": {"model_id": model_id},
            }
            for name, model_id in sorted(models().items())
        ]
        return JSONResponse({"object": "list", "data": data})

    @router.post("/chat/completions", summary="A chat answer, certified")
    async def chat(
        body: ChatCompletionRequest,
        request: Request,
        client: Client = Depends(clients),  # noqa: B008
    ) -> Response:
        return await _answer(runner, state, client, request, body)

    @router.post("/completions", summary="A text completion, certified")
    async def completions(
        body: CompletionRequest,
        request: Request,
        client: Client = Depends(clients),  # noqa: B008
    ) -> Response:
        return await _answer(runner, state, client, request, body)

    @router.get(
        "/joynet/certificates/{request_id}",
        summary="A job's certificate (and status), by request id",
    )
    async def certificate(request_id: str, _: Client = Depends(clients)) -> JSONResponse:  # noqa: B008
        try:
            raw = bytes.fromhex(request_id.removeprefix("0x"))
        except ValueError:
            raw = b""
        if len(raw) != 32:
            raise OpenAIError(400, "a request id is 32 bytes of 0x-hex", None, param="request_id")
        found = await answerer.certificate(raw)
        if found is None:
            raise OpenAIError(404, f"no job {request_id} on this node", "not_found")
        return JSONResponse(found)

    return router


class Runner:
    """Where an ``Ask`` runs: a committee, this node's engine, or a peer's."""

    def __init__(self, answerer: Answerer, forwarder: LocalForwarder) -> None:
        self.answerer = answerer
        self.forwarder = forwarder

    def events(
        self, ask: Ask, model_id: str, pay_for: str | None
    ) -> AsyncIterator[TokenDelta | Answer]:
        if ask.verification == "committee":
            return self.answerer.committee(ask, model_id, stream=ask.stream, pay_for=pay_for)
        if self.forwarder.forwards(model_id):
            return self.forwarder.local(ask, model_id)
        return self.answerer.local(ask, model_id)


async def _answer(
    runner: Runner,
    state: StateStore,
    client: Client,
    request: Request,
    body: ChatCompletionRequest | CompletionRequest,
) -> Response:
    try:
        ask = ask_of(body)
    except BadRequest as exc:
        raise OpenAIError(400, exc.message, exc.code, param=exc.param) from None
    pay_for = client.address if isinstance(client, WalletSession) else None
    if pay_for is not None and ask.verification == "local":
        raise OpenAIError(
            400,
            "a signed-in wallet pays for committee answers only: 'local' answers settle nothing",
            "unsupported_parameter",
            param="joynet",
        )
    model_id = runner.answerer.model_id_of(ask.model)
    if model_id is None:
        raise OpenAIError(
            404,
            f"The model '{ask.model}' does not exist or no node serves it.",
            "model_not_found",
            param="model",
        )
    record = partial(_record_use, state, client)
    if ask.stream:
        return _stream(runner, ask, model_id, record, pay_for)
    events = runner.events(ask, model_id, pay_for)
    answer = await _unless_gone(request, last_answer, events)
    await record(answer.prompt_tokens + len(answer.token_ids))
    shown = _Shape(ask, answer.request_id)
    domain = runner.answerer.domain()
    body_json = shown.whole(answer, answer.extension(domain, ask.sampling.seed))
    return JSONResponse(body_json, headers=_headers(answer))


async def _unless_gone(request: Request, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """``fn(*args)``, cancelled if the client disconnects first (the job is then called off
    by whoever runs it)."""
    done: list[T] = []

    async def watch(cancel_scope: trio.CancelScope) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        cancel_scope.cancel()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, nursery.cancel_scope)
            done.append(await fn(*args))
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        errors = leaves(group)
        if len(errors) == 1:
            raise errors[0] from None  # (an OpenAIError for its handler, not a group)
        raise
    if not done:
        raise OpenAIError(499, "the client closed the request", "client_closed")
    return done[0]


async def _record_use(state: StateStore, client: Client, tokens: int) -> None:
    """Count an API key's tokens against its quota (a wallet pays instead)."""
    if isinstance(client, ApiKey):
        await state.write(partial(apikeys.record_use, key_id=client.id, tokens=tokens))


def _headers(answer: Answer) -> dict[str, str]:
    certificate = answer.certificate
    return {
        "X-JoyNet-Request-Id": "0x" + answer.request_id.hex(),
        "X-JoyNet-Verification": answer.verification,
        "X-JoyNet-Output-Hash": str(certificate["output_hash"]),
        "X-JoyNet-Signers": ",".join(certificate["signers"]),
        "X-JoyNet-Signatures": ",".join(certificate["signatures"]),
        "X-JoyNet-Settlement": answer.settlement,
    }


def stream_link(previous: bytes, text: str, token_ids: tuple[int, ...] | list[int]) -> bytes:
    """The next ``chain`` of a stream: keccak256(previous, keccak256(text), token words)."""
    words = b"".join(t.to_bytes(4, "big") for t in token_ids)
    return bytes(keccak(previous + bytes(keccak(text.encode())) + words))


class _Shape:
    """OpenAI's response and chunk objects, for chat or text completions."""

    def __init__(self, ask: Ask, request_id: bytes) -> None:
        self.ask = ask
        self.id = ("chatcmpl-" if ask.chat else "cmpl-") + request_id.hex()[:24]
        self.created = int(time.time())

    def _base(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.ask.model}

    def whole(self, answer: Answer, extension: dict[str, Any]) -> dict[str, Any]:
        choice: dict[str, Any] = {
            "index": 0,
            "finish_reason": answer.finish_reason,
            "logprobs": None,
        }
        if self.ask.chat:
            choice["message"] = {"role": "assistant", "content": answer.text}
        else:
            choice["text"] = answer.text
        return {
            **self._base("chat.completion" if self.ask.chat else "text_completion"),
            "choices": [choice],
            "usage": usage(answer.prompt_tokens, len(answer.token_ids)),
            "joynet": extension,
        }

    def chunk(
        self, text: str, finish_reason: str | None, joynet: dict[str, Any] | None
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
        if self.ask.chat:
            # (a token chunk may have no text yet: a character split across tokens)
            choice["delta"] = {"role": "assistant", "content": text} if joynet else {}
        else:
            choice["text"] = text
        body = {
            **self._base("chat.completion.chunk" if self.ask.chat else "text_completion"),
            "choices": [choice],
            "joynet": joynet,
        }
        if self.ask.include_usage:
            body["usage"] = None
        return body

    def last(self, answer: Answer, extension: dict[str, Any]) -> dict[str, Any]:
        """The event before ``[DONE]``: no choices, the usage, and the certificate."""
        body = {
            **self._base("chat.completion.chunk" if self.ask.chat else "text_completion"),
            "choices": [],
            "joynet": extension,
        }
        if self.ask.include_usage:
            body["usage"] = usage(answer.prompt_tokens, len(answer.token_ids))
        return body


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _stream(
    runner: Runner,
    ask: Ask,
    model_id: str,
    record: Callable[[int], Awaitable[None]],
    pay_for: str | None,
) -> EventSourceResponse:
    shape = _Shape(ask, os.urandom(12))  # (the request id comes with the certificate)

    async def events() -> AsyncIterator[dict[str, str]]:
        chain = bytes(32)
        sent = 0
        source = runner.events(ask, model_id, pay_for)
        try:
            async with aclosing(source):  # type: ignore[type-var]
                async for event in source:
                    if isinstance(event, TokenDelta):
                        chain = stream_link(chain, event.text, event.token_ids)
                        sent += len(event.token_ids)
                        joynet = {
                            "token_ids": list(event.token_ids),
                            "chain": "0x" + chain.hex(),
                            "usage": {"completion_tokens": sent},
                        }
                        yield {"data": json.dumps(shape.chunk(event.text, None, joynet))}
                        continue
                    answer = event
                    await record(answer.prompt_tokens + len(answer.token_ids))
                    yield {"data": json.dumps(shape.chunk("", answer.finish_reason, None))}
                    extension = answer.extension(runner.answerer.domain(), ask.sampling.seed)
                    extension["chain"] = "0x" + chain.hex()
                    yield {"data": json.dumps(shape.last(answer, extension))}
        except OpenAIError as exc:
            yield {"data": json.dumps(exc.body())}  # headers are gone: the error is an event
        yield {"data": "[DONE]"}

    headers = {"X-JoyNet-Verification": ask.verification}
    return EventSourceResponse(events(), ping=int(PING_S), headers=headers)


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
