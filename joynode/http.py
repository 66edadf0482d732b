"""The ``http`` actor: Prometheus ``/metrics``, ``/healthz`` and the dashboard, over ASGI.

An ASGI app (FastAPI, on Starlette) served by hypercorn's trio worker in the
node's own trio run: HTTP/1.1 and h2c, keep-alive, read and keep-alive
timeouts, bounded request heads, and at most ``http.max_connections``
requests served at once (more get 503), so a slow or hostile client cannot
pin the node. It serves what monitoring needs and nothing that changes
state (that is the control socket's job, behind its token), and its OpenAPI
schema at ``/openapi.json``. The dashboard (``/``) is static files; the page
reads ``/dashboard/endpoints.json`` to find the control socket and talks to
it with the token the operator gives it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import partial
from importlib import resources
from typing import Any, cast

import trio
from fastapi import APIRouter, FastAPI
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from hypercorn.typing import ASGIFramework
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from joynode import __version__
from joynode.config import HttpSection, SettingError, split_host_port, url
from joynode.exceptiongroups import leaves
from joynode.gateway.openai_api import install_error_handlers

log = logging.getLogger(__name__)

# A connection with no request under way (none yet, a head still arriving, or between
# requests) is closed after this. Hypercorn's read_timeout is not used: it would also
# cut a request whose answer takes longer (a committee's job, a quiet stream).
KEEP_ALIVE_S = 10.0
MAX_REQUEST_HEAD_BYTES = 16 * 1024
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
DASHBOARD_HEADERS = {
    "content-security-policy": DASHBOARD_POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


def _dashboard_files() -> dict[str, tuple[bytes, str]]:
    """The dashboard's files (body, content type) by name, read once (they are part of
    the package)."""
    folder = resources.files("joynode.dashboard")
    return {
        name: (folder.joinpath(name).read_bytes(), kind) for name, kind in DASHBOARD_TYPES.items()
    }


class HttpServer:
    name = "http"

    def __init__(
        self,
        settings: HttpSection,
        registry: CollectorRegistry,
        health: Callable[[], tuple[str, dict[str, object]]],
        dashboard_endpoints: Callable[[], dict[str, object]],
        apis: Sequence[APIRouter] = (),
    ) -> None:
        """``health``: ok, degraded or unavailable, and the detail (``Supervisor.health``);
        ``dashboard_endpoints``: what the page needs to find the node (control URL, ids);
        ``apis``: more routes (the OpenAI-compatible ``/v1``, ``gateway.openai_api``, and
        the wallets', ``gateway.wallet_api``)."""
        self._apis = apis
        self._settings = settings
        self._registry = registry
        self._health = health
        self._dashboard_endpoints = dashboard_endpoints
        self._dashboard = _dashboard_files()
        self._requests = Counter(
            "joynode_http_requests_total",
            "HTTP requests by path and status",
            ["path", "code"],
            registry=registry,
        )
        self.app = _Bounded(_Counted(self._routes(), self._requests), settings.max_connections)
        self.url: str | None = None

    def _routes(self) -> FastAPI:
        app = FastAPI(
            title="joynode",
            version=__version__,
            docs_url=None,  # the interactive docs load scripts from a CDN
            redoc_url=None,
        )
        get = partial(_get, app)
        get("/metrics", self._metrics, "Prometheus metrics", response_class=PlainTextResponse)
        get("/healthz", self._healthz, "Whether every actor runs")
        get("/dashboard/endpoints.json", self._endpoints, "Where the dashboard finds the node")
        get("/", partial(self._file, "index.html"), None, response_class=Response)
        get("/dashboard/{name}", self._file, None, response_class=Response)
        for api in self._apis:
            app.include_router(api)
        install_error_handlers(app)
        return app

    def _metrics(self) -> Response:
        return Response(generate_latest(self._registry), media_type=CONTENT_TYPE_LATEST)

    def _healthz(self) -> JSONResponse:
        # Degraded is 200: the node runs and serves (a load balancer keeps it); the body
        # says what it cannot do. 503 only while an actor is not running.
        health, detail = self._health()
        status = 503 if health == "unavailable" else 200
        return JSONResponse({"status": health, **detail}, status_code=status)

    def _endpoints(self) -> JSONResponse:
        return JSONResponse(self._dashboard_endpoints())

    def _file(self, name: str) -> Response:
        if name not in self._dashboard:
            raise HTTPException(404)
        body, kind = self._dashboard[name]
        return Response(body, media_type=kind, headers=DASHBOARD_HEADERS)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        host, port = split_host_port(self._settings.listen)
        config = HypercornConfig()
        config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
        config.accesslog = None
        config.errorlog = log
        config.keep_alive_timeout = KEEP_ALIVE_S
        config.h11_max_incomplete_size = MAX_REQUEST_HEAD_BYTES
        config.graceful_timeout = 1.0
        config.include_server_header = False
        async with trio.open_nursery() as nursery:
            try:
                app = cast(ASGIFramework, self.app)
                binds = await nursery.start(partial(serve, app, config, mode="asgi"))
            except* OSError as failures:  # binding, inside hypercorn's nurseries
                bind_error = cast(OSError, leaves(failures)[0])
                listen = self._settings.listen
                raise SettingError.cannot_listen("http.listen", listen, bind_error) from None
            bound = int(binds[0].rsplit(":", 1)[1])
            self.url = url("http", host, bound)
            log.info("http listening on %s", self.url)
            task_status.started()


def _get(
    app: FastAPI, path: str, endpoint: Callable[..., Response], summary: str | None, **kw: Any
) -> None:
    """A GET route (in the OpenAPI schema when it has a summary) and its HEAD twin."""
    app.add_api_route(
        path, endpoint, methods=["GET"], summary=summary, include_in_schema=bool(summary), **kw
    )
    app.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False, **kw)


class _Counted:
    """Counts each response by the kind of path asked (not the path itself: a scanner
    must not grow the metric) and its status."""

    def __init__(self, app: ASGIApp, requests: Counter) -> None:
        self._app = app
        self._requests = requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        path = scope["path"]
        if path in ("/metrics", "/healthz", "/openapi.json"):
            kind = path
        elif path == "/" or path.startswith("/dashboard/"):
            kind = "dashboard"
        else:
            kind = "other"

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                self._requests.labels(kind, str(message["status"])).inc()
            await send(message)

        await self._app(scope, receive, counted)


class _Bounded:
    """At most ``limit`` HTTP requests served at once; the next ones get 503 at once.
    Every response is ``no-store``: what it says is the node's state now."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self._app = app
        self._slots = trio.Semaphore(limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            busy = PlainTextResponse("busy: too many requests at once\n", status_code=503)
            await busy(scope, receive, send)
            return

        async def no_store(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"cache-control", b"no-store")]
            await send(message)

        try:
            await self._app(scope, receive, no_store)
        finally:
            self._slots.release()
