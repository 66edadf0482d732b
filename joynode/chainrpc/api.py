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
from typing import Any

import trio
from fastapi import APIRouter, Depends, Request, WebSocket
from starlette.responses import JSONResponse, Response
from starlette.websockets import WebSocketDisconnect
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from joynode.chainrpc.proxy import PARSE_ERROR, ChainProxy
from joynode.chainrpc.service import ChainRpcService
from joynode.gateway.access import Client, ClientCheck
from joynode.gateway.errors import OpenAIError

log = logging.getLogger(__name__)

MAX_BODY = 4 * 1024 * 1024
SUBSCRIPTIONS = ("eth_subscribe", "eth_unsubscribe")


def rpc_api(service: ChainRpcService, clients: ClientCheck) -> APIRouter:
    router = APIRouter(prefix="/rpc", tags=["Chain RPC"])

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
        _: Client = Depends(clients),  # noqa: B008
    ) -> Response:
        proxy = proxy_of(chain_id)
        body = await request.body()
        if len(body) > MAX_BODY:
            raise OpenAIError(413, f"a request over {MAX_BODY} bytes", None)
        try:
            payload = json.loads(body)
        except ValueError:
            return JSONResponse(_parse_error())
        reply = await proxy.handle(payload)
        if reply is None:
            return Response(status_code=204)
        return JSONResponse(reply)

    @router.websocket("/{chain_id}")
    async def socket(websocket: WebSocket, chain_id: int) -> None:
        token = websocket.query_params.get("token")
        authorization = websocket.headers.get("authorization") or f"Bearer {token or ''}"
        try:
            await clients.admit(authorization)
            proxy = proxy_of(chain_id)
        except OpenAIError as exc:
            await websocket.close(code=1008, reason=exc.message[:120])
            return
        await websocket.accept()
        await _relay(websocket, proxy)

    return router


async def _relay(websocket: WebSocket, proxy: ChainProxy) -> None:
    """Calls through the proxy; subscriptions through one upstream websocket, opened at
    the first ``eth_subscribe``."""
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
                if isinstance(payload, dict) and payload.get("method") in SUBSCRIPTIONS:
                    if not upstream_socket:
                        connection = await _open_upstream(nursery, proxy)
                        if connection is None:
                            await websocket.send_text(json.dumps(_no_socket(payload)))
                            continue
                        upstream_socket.append(connection)
                        nursery.start_soon(from_upstream, connection)
                    await upstream_socket[0].send_message(text)
                    continue
                reply = await proxy.handle(payload)
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


def _parse_error() -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": None, "error": {"code": PARSE_ERROR, "message": "not JSON"}}


def _no_socket(payload: dict[str, Any]) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": payload.get("id"),
        "error": {"code": -32011, "message": "no upstream websocket for subscriptions"},
    }
