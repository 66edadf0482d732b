"""The http actor over real TCP, against a node running in this trio run."""

from __future__ import annotations

import json
import re
from urllib.parse import urlsplit

import trio
import trio.testing
from starlette.responses import PlainTextResponse
from starlette.types import Message, Receive, Scope, Send

from joynode.http import _Bounded
from joynode.node import Node
from tests.factories import NodeHome, running_node


async def http_exchange(node: Node, raw_request: bytes) -> tuple[int, dict[str, str], bytes]:
    assert node.http.url is not None
    parts = urlsplit(node.http.url)
    assert parts.hostname is not None
    assert parts.port is not None
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    async with stream:
        await stream.send_all(raw_request)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)}
    return int(status_line.split()[1]), headers, body


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()


async def test_metrics_expose_node_and_actor_state(home: NodeHome) -> None:
    async with running_node(home) as node:
        status, headers, body = await http_exchange(node, get("/metrics"))
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    text = body.decode()
    assert 'joynode_actor_ready{actor="control"} 1.0' in text
    assert f'address="{home.key.address}"' in text
    assert "joynode_uptime_seconds" in text


async def test_healthz_reports_actors(home: NodeHome) -> None:
    async with running_node(home) as node:
        status, _, body = await http_exchange(node, get("/healthz"))
    assert status == 200
    health = json.loads(body)
    assert health["status"] == "ok"
    assert set(health["actors"]) == {
        "state",
        "p2p",
        "storage",
        "inference",
        "consensus",
        "prover",
        "zk",
        "http",
        "control",
    }


async def test_unknown_path_wrong_method_and_garbage(home: NodeHome) -> None:
    async with running_node(home) as node:
        assert (await http_exchange(node, get("/nope")))[0] == 404
        post = (
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        assert (await http_exchange(node, post))[0] == 405
        assert (await http_exchange(node, b"\x00\x01garbage\r\n\r\n"))[0] == 400
        status, _, body = await http_exchange(node, get("/metrics"))
    assert status == 200
    assert 'joynode_http_requests_total{code="404",path="other"} 1.0' in body.decode()


async def test_keep_alive_serves_several_requests(home: NodeHome) -> None:
    two = get("/healthz").replace(b"Connection: close\r\n", b"") + get("/healthz")
    async with running_node(home) as node:
        status, _, body = await http_exchange(node, two)
    assert status == 200
    assert len(re.findall(rb'"status":\s*"ok"', body)) == 2


async def test_dashboard_is_served_with_a_strict_policy_and_finds_the_control_socket(
    home: NodeHome,
) -> None:
    async with running_node(home) as node:
        status, headers, page = await http_exchange(node, get("/"))
        assert status == 200
        assert headers["content-type"].startswith("text/html")
        policy = headers["content-security-policy"]
        assert "script-src 'self'" in policy
        assert "default-src 'none'" in policy
        assert b'src="/dashboard/dashboard.js"' in page
        for path, kind in [
            ("/dashboard/dashboard.js", "javascript"),
            ("/dashboard/dashboard.css", "css"),
        ]:
            status, headers, body = await http_exchange(node, get(path))
            assert (status, kind in headers["content-type"]) == (200, True)
            assert body
        status, _, body = await http_exchange(node, get("/dashboard/endpoints.json"))
        endpoints = json.loads(body)
        assert endpoints["control_url"] == node.control.url
        assert (endpoints["address"], endpoints["peer_id"]) == (
            node.identity.address,
            node.identity.peer_id,
        )
        assert (await http_exchange(node, get("/dashboard/../state.db")))[0] == 404


async def test_openapi_schema_head_and_no_store(home: NodeHome) -> None:
    async with running_node(home) as node:
        status, headers, body = await http_exchange(node, get("/openapi.json"))
        assert status == 200
        schema = json.loads(body)
        assert {"/metrics", "/healthz", "/dashboard/endpoints.json"} <= set(schema["paths"])
        assert headers["cache-control"] == "no-store"
        head = get("/healthz").replace(b"GET", b"HEAD")
        status, headers, body = await http_exchange(node, head)
        assert (status, body) == (200, b"")
        assert "server" not in headers  # no version banner


async def test_requests_over_the_limit_get_503_and_the_others_finish() -> None:
    release = trio.Event()

    async def slow(scope: Scope, receive: Receive, send: Send) -> None:
        await release.wait()
        await PlainTextResponse("done")(scope, receive, send)

    app = _Bounded(slow, limit=1)
    sent: list[list[Message]] = [[], []]

    async def call(index: int) -> None:
        async def send(message: Message) -> None:
            sent[index].append(message)

        async def receive() -> Message:
            await trio.sleep_forever()
            raise AssertionError

        await app({"type": "http", "method": "GET", "path": "/", "headers": []}, receive, send)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call, 0)
        await trio.testing.wait_all_tasks_blocked()
        await call(1)  # the one slot is taken: refused at once
        release.set()
    assert [m["status"] for m in sent[1] if m["type"] == "http.response.start"] == [503]
    assert [m["status"] for m in sent[0] if m["type"] == "http.response.start"] == [200]
    assert (b"cache-control", b"no-store") in sent[0][0]["headers"]
