"""The ``control`` actor: JSON-RPC 2.0 over a websocket, for the node's operator.

Authentication is a bearer token, sent in the ``Authorization`` header of the
websocket handshake or with an ``auth`` call as the first request; it is
compared in constant time. Until a connection is authenticated it gets an
``unauthorized`` error for every call and learns nothing else, not even which
methods exist.

Each connection is served on its own: a malformed or oversized frame gets the
matching JSON-RPC error, a handler bug gets an internal error and a log line,
and neither affects other clients or the node.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import pydantic
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

from joynode.config import ControlSection, SettingError, split_host_port, url
from joynode.control import jsonrpc
from joynode.control.jsonrpc import RpcError
from joynode.control.methods import MethodTable, Reply
from joynode.secret_files import ControlToken

log = logging.getLogger(__name__)

MAX_AUTH_FAILURES = 3
# Frames up to this multiple of the configured cap are read and answered with
# a JSON-RPC error; larger ones make the websocket layer close the connection
# with code 1009 (message too big) without buffering them.
HARD_CAP_FACTOR = 4
POLICY_VIOLATION = 1008
# Before authentication only a small auth call makes sense; big frames are refused unread.
UNAUTHENTICATED_FRAME_BYTES = 4096
UNAUTHORIZED_MESSAGE = "unauthorized: send 'Authorization: Bearer <token>' or call auth first"


class AuthParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    token: str = pydantic.Field(max_length=1024)


@dataclass(frozen=True)
class ControlStatistics:
    connections: int
    requests: int


class ControlServer:
    name = "control"

    def __init__(
        self,
        settings: ControlSection,
        token: ControlToken,
        methods: MethodTable,
        registry: CollectorRegistry,
    ) -> None:
        self.settings = settings
        self.methods = methods
        self._token = token
        self._connections = 0
        self._requests_served = 0
        self.url: str | None = None
        self._m_connections = Gauge(
            "joynode_control_connections", "Open control connections", registry=registry
        )
        self._m_requests = Counter(
            "joynode_control_requests_total",
            "Control requests by method and outcome",
            ["method", "outcome"],
            registry=registry,
        )
        self._m_auth_failures = Counter(
            "joynode_control_auth_failures_total",
            "Rejected control credentials",
            registry=registry,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        host, port = split_host_port(self.settings.listen)
        async with trio.open_nursery() as nursery:
            try:
                server = await nursery.start(
                    lambda task_status: serve_websocket(
                        self._accept,
                        host,
                        port,
                        None,
                        handler_nursery=nursery,
                        max_message_size=self.settings.max_frame_bytes * HARD_CAP_FACTOR,
                        connect_timeout=10,
                        disconnect_timeout=2,
                        task_status=task_status,
                    )
                )
            except OSError as exc:
                raise SettingError.cannot_listen(
                    "control.listen", self.settings.listen, exc
                ) from None
            self.url = url("ws", host, server.port)
            log.info("control listening on %s", self.url)
            task_status.started()

    def statistics(self) -> ControlStatistics:
        return ControlStatistics(self._connections, self._requests_served)

    async def _accept(self, request: WebSocketRequest) -> None:
        # A client may vanish at any point of the handshake or the session; that
        # ends its connection and nothing else.
        with contextlib.suppress(ConnectionClosed):
            await self._handshake(request)

    async def _handshake(self, request: WebSocketRequest) -> None:
        if self._connections >= self.settings.max_connections:
            await request.reject(503, body=b"too many control connections")
            return
        authorization = dict(request.headers).get(b"authorization")
        authenticated = False
        if authorization is not None:
            scheme, _, credential = authorization.decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not self._token.matches(credential.strip()):
                self._m_auth_failures.inc()
                await request.reject(401, body=b"bad bearer token")
                return
            authenticated = True
        ws = await request.accept()
        self._connections += 1
        self._m_connections.inc()
        try:
            try:
                await _Connection(self, ws, authenticated).serve()
            except* ConnectionClosed:
                pass
        except Exception:
            # A bug in serving one client must not take down the node.
            log.exception("control connection failed; closing it")
            await ws.aclose(1011, "internal error")
        finally:
            self._connections -= 1
            self._m_connections.dec()

    # Called by connections.

    def check_token(self, params: Any) -> bool:
        try:
            bound = AuthParams.model_validate(params if isinstance(params, dict) else {})
        except pydantic.ValidationError:
            ok = False
        else:
            ok = self._token.matches(bound.token)
        if not ok:
            self._m_auth_failures.inc()
        return ok

    def count(self, method: str, outcome: str) -> None:
        label = method if self.methods.get(method) is not None or method == "auth" else "unknown"
        self._m_requests.labels(label, outcome).inc()
        self._requests_served += 1


class _Connection:
    """One client's session: reads frames in order, runs calls concurrently."""

    def __init__(self, server: ControlServer, ws: WebSocketConnection, authenticated: bool) -> None:
        self._server = server
        self._ws = ws
        self._authenticated = authenticated
        self._auth_failures = 0
        self._inflight = trio.Semaphore(server.settings.max_inflight_per_connection)

    async def notify(self, method: str, params: Any) -> None:
        await self._send(jsonrpc.notification(method, params))

    async def _send(self, message: Any) -> None:
        await self._ws.send_message(jsonrpc.dumps(message))

    async def serve(self) -> None:
        cap = self._server.settings.max_frame_bytes
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    frame = await self._ws.get_message()
                except ConnectionClosed:
                    # The client is gone: nobody is left to read what its calls return.
                    nursery.cancel_scope.cancel()
                    return
                size = len(frame) if isinstance(frame, bytes) else len(frame.encode())
                if not self._authenticated and size > UNAUTHENTICATED_FRAME_BYTES:
                    await self._send_error(
                        None,
                        jsonrpc.INVALID_REQUEST,
                        "authenticate first (frames before auth are capped "
                        f"at {UNAUTHENTICATED_FRAME_BYTES} bytes)",
                    )
                    continue
                if size > cap:
                    await self._send_error(
                        None,
                        jsonrpc.INVALID_REQUEST,
                        f"frame of {size} bytes exceeds the cap of {cap}",
                    )
                    continue
                if isinstance(frame, bytes):
                    await self._send_error(
                        None, jsonrpc.PARSE_ERROR, "binary frames are not supported; send JSON text"
                    )
                    continue
                parsed, is_batch = jsonrpc.parse_frame(frame)
                if not self._authenticated:
                    await self._serve_unauthenticated(parsed, is_batch)
                    continue
                if self._inflight.value == 0:
                    await self._send_busy(parsed, is_batch)
                    continue
                await self._inflight.acquire()
                nursery.start_soon(self._run_frame, parsed, is_batch)

    async def _send_error(self, request_id: jsonrpc.JsonId, code: int, message: str) -> None:
        await self._send(jsonrpc.error_response(request_id, RpcError(code, message)))

    async def _send_busy(self, parsed: list[jsonrpc.Parsed], is_batch: bool) -> None:
        busy = RpcError(jsonrpc.BUSY, "too many requests in flight on this connection")
        responses = [
            jsonrpc.error_response(item.id, busy)
            for item in parsed
            if isinstance(item, jsonrpc.Invalid) or not item.is_notification
        ]
        if responses:
            await self._send(responses if is_batch else responses[0])

    async def _serve_unauthenticated(self, parsed: list[jsonrpc.Parsed], is_batch: bool) -> None:
        """Only ``auth`` is served, inline, so calls after it see the new state."""
        responses = []
        for item in parsed:
            if isinstance(item, jsonrpc.Invalid):
                responses.append(jsonrpc.error_response(item.id, item.error))
            elif item.method == "auth" and self._server.check_token(item.params):
                self._authenticated = True
                self._server.count("auth", "ok")
                if not item.is_notification:
                    responses.append(jsonrpc.result_response(item.id, {"authenticated": True}))
            else:
                self._server.count(item.method, "unauthorized")
                if not item.is_notification:
                    error = RpcError(jsonrpc.UNAUTHORIZED, UNAUTHORIZED_MESSAGE)
                    responses.append(jsonrpc.error_response(item.id, error))
                if item.method == "auth":
                    self._auth_failures += 1
                    if self._auth_failures >= MAX_AUTH_FAILURES:
                        break  # the rest of a batch gets no more guesses
        if responses:
            await self._send(responses if is_batch else responses[0])
        if self._auth_failures >= MAX_AUTH_FAILURES:
            await self._ws.aclose(POLICY_VIOLATION, "too many failed auth attempts")

    async def _run_frame(self, parsed: list[jsonrpc.Parsed], is_batch: bool) -> None:
        try:
            results = [await self._call(item) for item in parsed]
            responses = [response for response, _ in results if response is not None]
            if responses:
                await self._send(responses if is_batch else responses[0])
            for _, then in results:
                if then is not None:
                    await then.then()
        except ConnectionClosed:
            pass
        finally:
            self._inflight.release()

    async def _call(self, item: jsonrpc.Parsed) -> tuple[dict[str, Any] | None, Reply | None]:
        if isinstance(item, jsonrpc.Invalid):
            self._server.count("", "invalid_request")
            return jsonrpc.error_response(item.id, item.error), None
        reply: Reply | None = None
        try:
            if item.method == "auth":
                result: Any = {"authenticated": True}
            else:
                method = self._server.methods.get(item.method)
                if method is None:
                    raise RpcError(jsonrpc.METHOD_NOT_FOUND, f"method not found: {item.method}")
                result = await method.handler(method.bind_params(item.params), self)
                if isinstance(result, Reply):
                    reply, result = result, result.result
                jsonrpc.dumps(result)  # a result that cannot be sent is the handler's bug
        except ConnectionClosed:
            raise
        except RpcError as exc:
            self._server.count(item.method, f"error_{-exc.code}")
            response = jsonrpc.error_response(item.id, exc)
        except Exception:
            log.exception("control method %s failed", item.method)
            self._server.count(item.method, "internal_error")
            response = jsonrpc.error_response(
                item.id, RpcError(jsonrpc.INTERNAL_ERROR, "internal error (see the node's log)")
            )
        else:
            self._server.count(item.method, "ok")
            response = jsonrpc.result_response(item.id, result)
        return (None if item.is_notification else response), reply
