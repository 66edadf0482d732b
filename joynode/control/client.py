"""A control-socket client, used by ``joynode ctl``, the tests and tools."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from joynode.control import jsonrpc
from joynode.control.jsonrpc import RpcError


class ControlClient:
    """Calls methods and receives notifications over one connection.

    Responses are matched to calls by id, so several calls may be in flight at
    once; notifications (e.g. streamed tokens) arrive on ``notifications``.
    """

    def __init__(self, ws: WebSocketConnection) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, trio.MemorySendChannel[dict[str, Any]]] = {}
        self._notify_send, self.notifications = trio.open_memory_channel[dict[str, Any]](256)

    @classmethod
    @asynccontextmanager
    async def connect(cls, url: str, token: str | None = None) -> AsyncIterator[ControlClient]:
        headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
        try:
            async with open_websocket_url(url, extra_headers=headers) as ws:
                client = cls(ws)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(client._read_loop)
                    try:
                        yield client
                    finally:
                        nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The reader task's nursery wraps the caller's own exception (an
            # RpcError, say); hand it back unwrapped when it is the only one.
            leaf = _only_leaf(group)
            if leaf is None:
                raise
            raise leaf from None

    async def _read_loop(self) -> None:
        try:
            while True:
                message = json.loads(await self._ws.get_message())
                for item in message if isinstance(message, list) else [message]:
                    waiter = self._waiting.pop(item.get("id"), None) if "id" in item else None
                    if waiter is not None:
                        waiter.send_nowait(item)
                    elif "method" in item:
                        self._notify_send.send_nowait(item)
        except ConnectionClosed:
            pass
        finally:
            for waiter in self._waiting.values():
                waiter.close()
            self._notify_send.close()

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


def _only_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        else:
            leaves.append(exc)
    return leaves[0] if len(leaves) == 1 else None
