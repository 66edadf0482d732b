"""A control-socket client, used by ``joynode ctl``, the tests and tools."""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream

from joynode.control import jsonrpc
from joynode.control.jsonrpc import RpcError
from joynode.exceptiongroups import leaves

MAX_RESPONSE_BYTES = 64 << 20


@asynccontextmanager
async def open_control_websocket(
    url: str, token: str | None = None
) -> AsyncIterator[WebSocketConnection]:
    """A websocket to a control socket, authenticated by header when a token is given.

    We open and close the TCP stream ourselves: trio-websocket 0.12.2's
    ``open_websocket_url`` never closes the client's socket when the server
    closes first (it waits for a TCP close it then ignores), which leaks it.
    A single exception from inside is re-raised as itself, not as a group.
    """
    parts = urlsplit(url)
    if parts.scheme != "ws" or parts.hostname is None or parts.port is None:
        raise ValueError(f"not a ws://host:port control URL: {url!r}")
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    try:
        async with trio.open_nursery() as nursery:
            ws = await wrap_client_stream(
                nursery,
                stream,
                parts.hostname,
                "/",
                extra_headers=headers,
                max_message_size=MAX_RESPONSE_BYTES,
            )
            try:
                yield ws
            finally:
                with trio.move_on_after(2, shield=True):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        found = leaves(group)
        if len(found) != 1:
            raise
        raise found[0] from None
    finally:
        await stream.aclose()


class ControlClient:
    """Calls methods and receives notifications over one connection.

    Responses are matched to calls by id, so several calls may be in flight at
    once. Notifications (e.g. streamed tokens) go to ``on_notification`` if
    given, else to the ``notifications`` channel (past 256 unread, newer ones
    are dropped rather than stall the connection).
    """

    def __init__(
        self,
        ws: WebSocketConnection,
        on_notification: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self._ws = ws
        self._on_notification = on_notification
        self._ids = itertools.count(1)
        self._waiting: dict[int, trio.MemorySendChannel[dict[str, Any]]] = {}
        self._notify_send, self.notifications = trio.open_memory_channel[dict[str, Any]](256)

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        url: str,
        token: str | None = None,
        on_notification: Callable[[dict[str, Any]], None] | None = None,
    ) -> AsyncIterator[ControlClient]:
        async with open_control_websocket(url, token) as ws, trio.open_nursery() as nursery:
            client = cls(ws, on_notification)
            nursery.start_soon(client._read_loop)
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()

    async def _read_loop(self) -> None:
        try:
            while True:
                message = json.loads(await self._ws.get_message())
                for item in message if isinstance(message, list) else [message]:
                    waiter = self._waiting.pop(item.get("id"), None) if "id" in item else None
                    if waiter is not None:
                        waiter.send_nowait(item)
                    elif "method" in item:
                        self._notify(item)
        except ConnectionClosed:
            pass
        finally:
            for waiter in self._waiting.values():
                waiter.close()
            self._notify_send.close()

    def _notify(self, item: dict[str, Any]) -> None:
        if self._on_notification is not None:
            self._on_notification(item)
            return
        with contextlib.suppress(trio.WouldBlock):
            self._notify_send.send_nowait(item)

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """Call ``method``; return its result or raise ``RpcError``."""
        request_id = next(self._ids)
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        self._waiting[request_id] = send
        request: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            request["params"] = params
        await self._ws.send_message(jsonrpc.dumps(request))
        try:
            response = await receive.receive()
        except trio.EndOfChannel:
            raise ConnectionClosed(self._ws.closed) from None
        if "error" in response:
            error = response["error"]
            raise RpcError(error.get("code", 0), error.get("message", ""), error.get("data"))
        return response.get("result")
