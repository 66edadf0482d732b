"""Control methods: a name, a params schema and an async handler.

Actors contribute their methods to one ``MethodTable`` that node.py builds, so
the control server knows nothing about what the methods do. Params are
validated by a pydantic model before the handler runs; a handler reports
expected failures by raising ``RpcError``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import pydantic

from joynode.control.jsonrpc import INVALID_PARAMS, RpcError


def describe_errors(exc: pydantic.ValidationError) -> str:
    """Every validation error as ``where: what``, joined by "; "."""
    return "; ".join(
        ".".join(str(p) for p in err["loc"]) + ": " + err["msg"] if err["loc"] else err["msg"]
        for err in exc.errors()
    )


class NoParams(pydantic.BaseModel):
    """Params of a method that takes none; any key given is an error."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


class ControlSession(Protocol):
    """What a handler may do with the connection that called it."""

    async def notify(self, method: str, params: Any) -> None:
        """Send a JSON-RPC notification to this client (e.g. streamed progress)."""


@dataclass(frozen=True)
class Reply:
    """A result plus an action to run once the result has been sent to the caller."""

    result: Any
    then: Callable[[], Awaitable[None]]


Handler = Callable[[Any, ControlSession], Awaitable[Any]]


@dataclass(frozen=True)
class ControlMethod:
    name: str
    params: type[pydantic.BaseModel]
    handler: Handler
    summary: str

    def bind_params(self, raw: dict[str, Any] | list[Any] | None) -> pydantic.BaseModel:
        if isinstance(raw, list):
            if raw:
                raise RpcError(INVALID_PARAMS, f"{self.name} takes named params (an object)")
            raw = None
        try:
            return self.params.model_validate(raw or {})
        except pydantic.ValidationError as exc:
            raise RpcError(INVALID_PARAMS, f"invalid params: {describe_errors(exc)}") from None


class MethodTable:
    def __init__(self, methods: Iterable[ControlMethod] = ()) -> None:
        self._methods: dict[str, ControlMethod] = {}
        self.add(*methods)

    def add(self, *methods: ControlMethod) -> None:
        for method in methods:
            if method.name in self._methods:
                raise ValueError(f"control method {method.name!r} registered twice")
            self._methods[method.name] = method

    def get(self, name: str) -> ControlMethod | None:
        return self._methods.get(name)

    def names(self) -> list[str]:
        return sorted(self._methods)
