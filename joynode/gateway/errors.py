"""Errors as OpenAI answers them: ``{"error": {"message", "type", "param", "code"}}``.

The status codes are OpenAI's (400 a bad request, 401 a missing or wrong key,
404 an unknown model or route, 429 a rate or a quota, 503 no capacity or no
certified answer; JoyNet adds 402 for a wallet that has not approved this node as
its spender, and 403 for a wallet route called with an API key), so the official
clients raise their usual exceptions.
"""

from __future__ import annotations

from starlette.responses import JSONResponse

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    402: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    429: "requests",
}


class OpenAIError(Exception):
    """An error answered as OpenAI answers it."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None,
        kind: str | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.kind = kind or ERROR_TYPES.get(status, "server_error")

    def body(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)
