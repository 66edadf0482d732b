"""The control socket against a node running in this trio run (real websockets)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
)

from joynode.control import jsonrpc
from joynode.control.client import ControlClient, open_control_websocket
from joynode.control.jsonrpc import RpcError
from joynode.control.methods import ControlMethod, NoParams
from joynode.node import Node
from tests.factories import NodeHome, running_node


@asynccontextmanager
async def raw(node: Node, token: str | None = None) -> AsyncIterator[WebSocketConnection]:
    assert node.control.url is not None
    async with open_control_websocket(node.control.url, token) as ws:
        yield ws


async def exchange(ws: WebSocketConnection, frame: str | bytes) -> Any:
    await ws.send_message(frame)
    return json.loads(await ws.get_message())


def request(method: str, request_id: int = 1, **extra: Any) -> str:
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, **extra})


async def test_status_with_bearer_header(home: NodeHome) -> None:
    async with (
        running_node(home) as node,
        ControlClient.connect(node.control.url or "", home.token.value) as client,
    ):
        status = await client.call("node.status")
    assert status["address"] == home.key.address
    assert status["peer_id"] == home.key.peer_id
    assert status["boot"] == 1
    assert {name: a["state"] for name, a in status["actors"].items()} == {
        "state": "ready",
        "p2p": "ready",
        "storage": "ready",
        "inference": "ready",
        "consensus": "ready",
        "prover": "ready",
        "zk": "ready",
        "http": "ready",
        "control": "ready",
    }


async def test_auth_call_then_methods(home: NodeHome) -> None:
    async with running_node(home) as node, raw(node) as ws:
        denied = await exchange(ws, request("node.status"))
        assert denied["error"]["code"] == jsonrpc.UNAUTHORIZED
        # Unauthenticated callers cannot even learn which methods exist.
        hidden = await exchange(ws, request("no.such.method"))
        assert hidden["error"]["code"] == jsonrpc.UNAUTHORIZED
        ok = await exchange(ws, request("auth", params={"token": home.token.value}))
        assert ok["result"] == {"authenticated": True}
        status = await exchange(ws, request("node.status", 2))
        assert status["id"] == 2
        assert status["result"]["address"] == home.key.address


async def test_bad_bearer_header_is_rejected_at_handshake(home: NodeHome) -> None:
    async with running_node(home) as node:
        with pytest.raises(ConnectionRejected) as info:
            async with raw(node, token="x" * 64):
                pass
        assert info.value.status_code == 401


async def test_repeated_failed_auth_closes_the_connection(home: NodeHome) -> None:
    async with running_node(home) as node, raw(node) as ws:
        for attempt in range(3):
            reply = await exchange(ws, request("auth", attempt, params={"token": "guess"}))
            assert reply["error"]["code"] == jsonrpc.UNAUTHORIZED
        with pytest.raises(ConnectionClosed) as info:
            await ws.get_message()
        assert info.value.reason is not None
        assert info.value.reason.code == 1008


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{not json", jsonrpc.PARSE_ERROR),
        ("[]", jsonrpc.INVALID_REQUEST),
        ('{"jsonrpc":"2.0","id":1}', jsonrpc.INVALID_REQUEST),
        (request("node.nope"), jsonrpc.METHOD_NOT_FOUND),
        (request("node.status", params={"unexpected": 1}), jsonrpc.INVALID_PARAMS),
        (request("node.status", params=[1]), jsonrpc.INVALID_PARAMS),
        (b"\x00binary", jsonrpc.PARSE_ERROR),
    ],
)
async def test_bad_requests_get_the_proper_error(
    home: NodeHome, frame: str | bytes, code: int
) -> None:
    async with running_node(home) as node, raw(node, home.token.value) as ws:
        reply = await exchange(ws, frame)
        assert reply["error"]["code"] == code
        # The same connection keeps working.
        assert "result" in await exchange(ws, request("node.status"))


async def test_batch_answers_each_entry(home: NodeHome) -> None:
    batch = json.dumps(
        [
            {"jsonrpc": "2.0", "id": 1, "method": "node.status"},
            {"jsonrpc": "2.0", "method": "node.status"},  # notification: no answer
            {"jsonrpc": "2.0", "id": 3, "method": "nope"},
            7,
        ]
    )
    async with running_node(home) as node, raw(node, home.token.value) as ws:
        replies = await exchange(ws, batch)
    assert [r.get("id") for r in replies] == [1, 3, None]
    assert "result" in replies[0]
    assert replies[1]["error"]["code"] == jsonrpc.METHOD_NOT_FOUND
    assert replies[2]["error"]["code"] == jsonrpc.INVALID_REQUEST


async def test_oversized_frames(home: NodeHome) -> None:
    home.set("control", "max_frame_bytes", "4096")
    async with running_node(home) as node:
        async with raw(node, home.token.value) as ws:
            reply = await exchange(ws, request("node.status", params={"pad": "x" * 5000}))
            assert reply["error"]["code"] == jsonrpc.INVALID_REQUEST
            assert "exceeds the cap of 4096" in reply["error"]["message"]
            assert "result" in await exchange(ws, request("node.status"))
        async with raw(node, home.token.value) as ws:
            # Past four times the cap the websocket layer refuses to buffer it.
            await ws.send_message("x" * 20_000)
            with pytest.raises(ConnectionClosed) as info:
                await ws.get_message()
            assert info.value.reason is not None
            assert info.value.reason.code == 1009
        async with ControlClient.connect(node.control.url or "", home.token.value) as client:
            assert (await client.call("node.status"))["address"] == home.key.address


async def test_handler_bug_is_an_internal_error_and_is_contained(home: NodeHome) -> None:
    async with running_node(home) as node:

        async def broken(_: NoParams, __: object) -> None:
            raise ZeroDivisionError("bug")

        async def unserializable(_: NoParams, __: object) -> object:
            return object()

        node.control.methods.add(
            ControlMethod("test.broken", NoParams, broken, "raises"),
            ControlMethod("test.unserializable", NoParams, unserializable, "bad result"),
        )
        async with ControlClient.connect(node.control.url or "", home.token.value) as client:
            for method in ("test.broken", "test.unserializable"):
                with pytest.raises(RpcError) as info:
                    await client.call(method)
                assert info.value.code == jsonrpc.INTERNAL_ERROR
            assert (await client.call("node.status"))["actors"]["control"]["state"] == "ready"


async def test_notifications_and_concurrent_calls(home: NodeHome) -> None:
    async with running_node(home) as node:

        async def chatty(_: NoParams, session: Any) -> str:
            for i in range(3):
                await session.notify("test.progress", {"step": i})
            return "done"

        node.control.methods.add(ControlMethod("test.chatty", NoParams, chatty, "notifies"))
        async with ControlClient.connect(node.control.url or "", home.token.value) as client:
            results: dict[int, Any] = {}

            async def call(index: int, method: str) -> None:
                results[index] = await client.call(method)

            async with trio.open_nursery() as nursery:
                for index, method in enumerate(("test.chatty", "node.status", "test.chatty")):
                    nursery.start_soon(call, index, method)
            assert results[0] == results[2] == "done"
            assert results[1]["address"] == home.key.address
            steps = [client.notifications.receive_nowait()["params"]["step"] for _ in range(6)]
        assert sorted(steps) == [0, 0, 1, 1, 2, 2]


async def test_connection_limit(home: NodeHome) -> None:
    home.set("control", "max_connections", "1")
    async with running_node(home) as node, raw(node, home.token.value):
        with pytest.raises(ConnectionRejected) as info:
            async with raw(node, home.token.value):
                pass
        assert info.value.status_code == 503


async def test_shutdown_answers_then_stops(home: NodeHome) -> None:
    node = Node(home.config, home.key, home.token)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            async with ControlClient.connect(node.control.url or "", home.token.value) as client:
                assert await client.call("node.shutdown") == {"stopping": True}
    assert home.endpoints() is None
