"""JSON-RPC 2.0 framing: parse requests, build responses, name the error codes.

Pure functions, no I/O: the server feeds frames in and sends what comes out.
Parsing never raises; every malformed input becomes the error response the
specification asks for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

JsonId: TypeAlias = str | int | float | None

PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602
INTERNAL_ERROR: Final = -32603
# Implementation-defined server errors (-32000 to -32099).
UNAUTHORIZED: Final = -32001
BUSY: Final = -32002


class RpcError(Exception):
    """An error a method handler reports to the caller as a JSON-RPC error object."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def to_json(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


@dataclass(frozen=True)
class Request:
    method: str
    params: dict[str, Any] | list[Any] | None
    id: JsonId
    is_notification: bool


@dataclass(frozen=True)
class Invalid:
    """A batch entry or frame that is not a request; answered with ``error``."""

    id: JsonId
    error: RpcError


Parsed: TypeAlias = Request | Invalid


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


MAX_NESTING = 64


def _nesting_exceeds(text: str, limit: int) -> bool:
    """Whether JSON ``text`` nests arrays/objects deeper than ``limit``.

    The C JSON parser recurses per level; a frame of a million ``[`` can
    overflow the C stack before Python's recursion limit trips, so depth is
    checked first. Counting brackets (C speed) skips the scan for normal frames.
    """
    if text.count("[") + text.count("{") <= limit:
        return False
    depth, in_string, escaped = 0, False, False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


def parse_frame(text: str) -> tuple[list[Parsed], bool]:
    """Parse one text frame into its requests; the flag says whether it was a batch."""
    if _nesting_exceeds(text, MAX_NESTING):
        error = RpcError(PARSE_ERROR, f"parse error: nested deeper than {MAX_NESTING} levels")
        return [Invalid(None, error)], False
    try:
        document = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and over-long integer literals.
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        return [Invalid(None, RpcError(PARSE_ERROR, f"parse error: {reason}"))], False
    if isinstance(document, list):
        if not document:
            return [Invalid(None, RpcError(INVALID_REQUEST, "empty batch"))], False
        return [_parse_request(item) for item in document], True
    return [_parse_request(document)], False


def _valid_id(value: object) -> bool:
    return value is None or (isinstance(value, str | int | float) and not isinstance(value, bool))


def _parse_request(item: object) -> Parsed:
    if not isinstance(item, dict):
        return Invalid(None, RpcError(INVALID_REQUEST, "request must be a JSON object"))
    request_id = item.get("id")
    if not _valid_id(request_id):
        return Invalid(None, RpcError(INVALID_REQUEST, "id must be a string, number or null"))
    if item.get("jsonrpc") != "2.0":
        return Invalid(request_id, RpcError(INVALID_REQUEST, 'jsonrpc must be "2.0"'))
    method = item.get("method")
    if not isinstance(method, str) or not method:
        return Invalid(request_id, RpcError(INVALID_REQUEST, "method must be a non-empty string"))
    params = item.get("params")
    if params is not None and not isinstance(params, dict | list):
        return Invalid(request_id, RpcError(INVALID_REQUEST, "params must be an object or array"))
    return Request(method, params, request_id, is_notification="id" not in item)


def result_response(request_id: JsonId, result: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "result": result}


def error_response(request_id: JsonId, error: RpcError) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": error.to_json()}


def notification(method: str, params: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "method": method, "params": params}


def dumps(message: Any) -> str:
    return json.dumps(message, separators=(",", ":"), allow_nan=False)
