"""The ``http`` actor: Prometheus ``/metrics``, ``/healthz`` and the dashboard over HTTP/1.1.

A small h11 server on trio: GET only, keep-alive, bounded connections and
timeouts, so a slow or hostile scraper cannot pin the node. It serves what
monitoring needs and nothing that changes state (that is the control socket's
job, behind its token). The dashboard (``/``) is static files; the page reads
``/dashboard/endpoints.json`` to find the control socket and talks to it
with the token the operator gives it.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from importlib import resources

import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from joynode.config import HttpSection, SettingError, split_host_port, url

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 10.0
MAX_REQUEST_BYTES = 16 * 1024
DASHBOARD_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
# The page loads only its own files and talks only to its own origin and the control socket.
DASHBOARD_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' ws: wss:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...] = ()


def _dashboard_files() -> dict[str, Response]:
    """The dashboard's files by path, read once (they are part of the package)."""
    folder = resources.files("joynode.dashboard")
    headers = (
        ("content-security-policy", DASHBOARD_POLICY),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
    )
    files = {
        f"/dashboard/{name}": Response(200, folder.joinpath(name).read_bytes(), kind, headers)
        for name, kind in DASHBOARD_TYPES.items()
    }
    files["/"] = files["/dashboard/index.html"]
    return files


class HttpServer:
    name = "http"

    def __init__(
        self,
        settings: HttpSection,
        registry: CollectorRegistry,
        health: Callable[[], tuple[str, dict[str, object]]],
        dashboard_endpoints: Callable[[], dict[str, object]],
    ) -> None:
        """``health``: ok, degraded or unavailable, and the detail (``Supervisor.health``);
        ``dashboard_endpoints``: what the page needs to find the node (control URL, ids)."""
        self._settings = settings
        self._registry = registry
        self._health = health
        self._dashboard_endpoints = dashboard_endpoints
        self._dashboard = _dashboard_files()
        self._connections = trio.Semaphore(settings.max_connections)
        self._requests = Counter(
            "joynode_http_requests_total",
            "HTTP requests by path and status",
            ["path", "code"],
            registry=registry,
        )
        self.url: str | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        host, port = split_host_port(self._settings.listen)
        async with trio.open_nursery() as nursery:
            try:
                listeners = await nursery.start(
                    partial(trio.serve_tcp, self._serve_connection, port, host=host)
                )
            except OSError as exc:
                listen = self._settings.listen
                raise SettingError.cannot_listen("http.listen", listen, exc) from None
            bound = listeners[0].socket.getsockname()
            self.url = url("http", host, bound[1])
            log.info("http listening on %s", self.url)
            task_status.started()

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        if self._connections.value == 0:
            await stream.aclose()
            return
        async with self._connections, stream:
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
            try:
                while True:
                    request = await self._next_request(conn, stream)
                    if request is None:
                        return
                    response = self._route(request)
                    with trio.fail_after(READ_TIMEOUT_S):  # a client that never reads
                        await self._send(conn, stream, response)
                    if conn.our_state is h11.MUST_CLOSE:
                        return
                    conn.start_next_cycle()
            except h11.RemoteProtocolError as exc:
                await self._send_bad_request(conn, stream, exc.error_status_hint)
            except (
                h11.LocalProtocolError,
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                trio.TooSlowError,
            ):
                return

    async def _next_request(
        self, conn: h11.Connection, stream: trio.SocketStream
    ) -> h11.Request | None:
        request: h11.Request | None = None
        with trio.fail_after(READ_TIMEOUT_S):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(4096)
                    conn.receive_data(data)
                    if not data and conn.their_state is h11.IDLE:
                        return None
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.EndOfMessage):
                    return request
                elif isinstance(event, h11.ConnectionClosed):
                    return None

    def _route(self, request: h11.Request) -> Response:
        path = request.target.decode("ascii", "replace").split("?", 1)[0]
        if request.method not in (b"GET", b"HEAD"):
            response = Response(405, b"method not allowed\n", "text/plain")
        elif path == "/metrics":
            response = Response(200, generate_latest(self._registry), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            # Degraded is 200: the node runs and serves (a load balancer keeps it); the
            # body says what it cannot do. 503 only while an actor is not running.
            health, detail = self._health()
            body = json.dumps({"status": health, **detail}).encode()
            response = Response(503 if health == "unavailable" else 200, body, "application/json")
        elif path in self._dashboard:
            response = self._dashboard[path]
        elif path == "/dashboard/endpoints.json":
            body = json.dumps(self._dashboard_endpoints()).encode()
            response = Response(200, body, "application/json")
        else:
            response = Response(404, b"not found\n", "text/plain")
        if path in ("/metrics", "/healthz"):
            known = path
        elif path in self._dashboard or path == "/dashboard/endpoints.json":
            known = "dashboard"
        else:
            known = "other"
        self._requests.labels(known, str(response.status)).inc()
        if request.method == b"HEAD":
            return Response(response.status, b"", response.content_type, response.headers)
        return response

    async def _send_bad_request(
        self, conn: h11.Connection, stream: trio.SocketStream, status: int
    ) -> None:
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        with trio.move_on_after(READ_TIMEOUT_S):
            with contextlib.suppress(
                h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError
            ):
                await self._send(conn, stream, Response(status, b"bad request\n", "text/plain"))

    async def _send(self, conn: h11.Connection, stream: trio.SocketStream, r: Response) -> None:
        headers = [
            ("content-type", r.content_type),
            ("content-length", str(len(r.body))),
            ("cache-control", "no-store"),
            *r.headers,
        ]
        await stream.send_all(conn.send(h11.Response(status_code=r.status, headers=headers)) or b"")
        await stream.send_all(conn.send(h11.Data(data=r.body)) or b"")
        await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
