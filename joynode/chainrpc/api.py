"""``/rpc/{chain_id}`` on the http actor: JSON-RPC over HTTP, and over a websocket with
subscriptions.

Clients authenticate as on the OpenAI gateway (an API key or a wallet's session
token, ``gateway.access``), as ``Authorization: Bearer ...`` or, for websocket clients
that cannot set headers, ``?token=...``. Over a websocket, ``eth_subscribe`` and
``eth_unsubscribe`` go to a websocket of the chain's best upstream, whose
notifications come back as they are; every other call goes through the proxy, as over
HTTP. If that upstream's websocket closes, the client's closes too (code 1011): a
client reconnects and subscribes again, as it would to any node.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import trio
from fastapi import APIRouter, Depends, Request, WebSocket
from starlette.responses import JSONResponse, Response
from starlette.websockets import WebSocketDisconnect
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from joynode.chainrpc.proxy import PARSE_ERROR, ChainProxy
from joynode.chainrpc.service import ChainRpcService
from joynode.gateway.access import Client, ClientCheck
from joynode.gateway.apikeys import ApiKey
from joynode.gateway.errors import OpenAIError
from joynode.ratelimit import TokenBucket

log = logging.getLogger(__name__)

MAX_BODY = 4 * 1024 * 1024
SUBSCRIPTIONS = ("eth_subscribe", "eth_unsubscribe")


class CallLimit:
    """Each client's calls per minute (``rpc.rate_per_minute``; a batch costs its size),
    apart from its requests to the OpenAI routes."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._per_minute = per_minute
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    def take(self, client: Client, calls: int) -> bool:
        who = client.id if isinstance(client, ApiKey) else client.address.lower()
        now = self._clock()
        bucket = self._buckets.get(who)
        if bucket is None:
            bucket = self._buckets[who] = TokenBucket(self._per_minute / 60, self._per_minute, now)
        return bucket.take(now, calls)


def rpc_api(service: ChainRpcService, clients: ClientCheck, per_minute: int) -> APIRouter:
    router = APIRouter(prefix="/rpc", tags=["Chain RPC"])
    limit = CallLimit(per_minute)

    def within_rate(client: Client, payload: Any) -> None:
        calls = len(payload) if isinstance(payload, list) else 1
        if not limit.take(client, max(calls, 1)):
            raise OpenAIError(
                429, f"over {per_minute} calls per minute on the chain RPC", "rate_limit_exceeded"
            )

    def proxy_of(chain_id: int) -> ChainProxy:
        proxy = service.proxy(chain_id)
        if proxy is None:
            served = ", ".join(str(c) for c in service.chain_ids) or "none"
            raise OpenAIError(404, f"chain {chain_id} is not served here (served: {served})", None)
        return proxy

    @router.post("/{chain_id}", summary="A JSON-RPC call or batch on one chain")
    async def call(
        chain_id: int,
        request: Request,
        client: Client = Depends(clients),  # noqa: B008
    ) -> Response:
        proxy = proxy_of(chain_id)
        body = await request.body()
        if len(body) > MAX_BODY:
            raise OpenAIError(413, f"a request over {MAX_BODY} bytes", None)
        try:
            payload = json.loads(body)
        except ValueError:
            return JSONResponse(_parse_error())
        within_rate(client, payload)
        await service.plans.admit(client)
        reply = await proxy.handle(payload)
        service.plans.served(client, chain_id, _answered(reply))
        if reply is None:
            return Response(status_code=204)
        return JSONResponse(reply)

    @router.websocket("/{chain_id}")
    async def socket(websocket: WebSocket, chain_id: int) -> None:
        token = websocket.query_params.get("token")
        authorization = websocket.headers.get("authorization") or f"Bearer {token or ''}"
        try:
            client = await clients.admit(authorization)
            proxy = proxy_of(chain_id)
            await service.plans.admit(client)
        except OpenAIError as exc:
            await websocket.close(code=1008, reason=exc.message[:120])
            return
        await websocket.accept()
        await _relay(
            websocket,
            proxy,
            partial(limit.take, client),
            partial(service.plans.served, client, chain_id),
        )

    return router


async def _relay(
    websocket: WebSocket,
    proxy: ChainProxy,
    take: Callable[[int], bool],
    served: Callable[[int], None],
) -> None:
    """Calls through the proxy; subscriptions through one upstream websocket, opened at
    the first ``eth_subscribe``. ``served(n)``: n calls answered (for usage reports)."""
    upstream_socket: list[Any] = []

    async def from_upstream(connection: Any) -> None:
        try:
            while True:
                await websocket.send_text(await connection.get_message())
        except ConnectionClosed:
            await websocket.close(code=1011, reason="the upstream's websocket closed")

    async with trio.open_nursery() as nursery:
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                text = message.get("text") or (message.get("bytes") or b"").decode(
                    "utf-8", "replace"
                )
                try:
                    payload = json.loads(text)
                except ValueError:
                    await websocket.send_text(json.dumps(_parse_error()))
                    continue
                if not take(len(payload) if isinstance(payload, list) else 1):
                    await websocket.close(code=1008, reason="over the calls per minute")
                    break
                if isinstance(payload, dict) and payload.get("method") in SUBSCRIPTIONS:
                    if not upstream_socket:
                        connection = await _open_upstream(nursery, proxy)
                        if connection is None:
                            await websocket.send_text(json.dumps(_no_socket(payload)))
                            continue
                        upstream_socket.append(connection)
                        nursery.start_soon(from_upstream, connection)
                    await upstream_socket[0].send_message(text)
                    served(1)
                    continue
                reply = await proxy.handle(payload)
                served(_answered(reply))
                if reply is not None:
                    await websocket.send_text(json.dumps(reply))
        except (WebSocketDisconnect, ConnectionClosed):
            pass
        finally:
            nursery.cancel_scope.cancel()


async def _open_upstream(nursery: trio.Nursery, proxy: ChainProxy) -> Any:
    """A websocket to the best upstream that has one (ws:// for http://)."""
    for upstream in proxy.pool.ranked():
        url = "ws" + upstream.url.removeprefix("http")
        try:
            return await nursery.start(_hold_socket, url)
        except (HandshakeError, OSError, ConnectionClosed) as exc:
            log.info("rpc: no websocket at %s: %s", upstream.label, exc)
    return None


async def _hold_socket(url: str, *, task_status: trio.TaskStatus[Any]) -> None:
    async with open_websocket_url(url) as connection:
        task_status.started(connection)
        await trio.sleep_forever()


def _answered(reply: Any) -> int:
    """How many calls of a reply (one, a batch's, or None) have a result."""
    replies = reply if isinstance(reply, list) else [reply]
    return sum(1 for r in replies if isinstance(r, dict) and "result" in r)


def _parse_error() -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": None, "error": {"code": PARSE_ERROR, "message": "not JSON"}}


def _no_socket(payload: dict[str, Any]) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": payload.get("id"),
        "error": {"code": -32011, "message": "no upstream websocket for subscriptions"},
    }
