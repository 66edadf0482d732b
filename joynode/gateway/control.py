"""``apikeys.*`` control methods: make, list and revoke the gateway's API keys. The key
itself is in ``apikeys.create``'s answer only, never in a list, a log or the database."""

from __future__ import annotations

from typing import Any

import pydantic

from joynode.control.jsonrpc import INVALID_PARAMS, RpcError
from joynode.control.methods import ControlMethod, ControlSession
from joynode.gateway import apikeys
from joynode.state import StateStore


class CreateParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    name: str = pydantic.Field(min_length=1, max_length=apikeys.MAX_NAME)
    rate_per_minute: int = pydantic.Field(60, ge=1, le=100_000, description="requests a minute")
    quota_tokens: int | None = pydantic.Field(
        None, ge=1, le=10**15, description="tokens (prompt and completion) in all; none: no quota"
    )


class ListParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    revoked: bool = pydantic.Field(False, description="list revoked keys too")


class RevokeParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    id: str = pydantic.Field(pattern=r"^[0-9a-f]{12}$")


def apikey_methods(state: StateStore) -> list[ControlMethod]:
    async def create(params: CreateParams, _: ControlSession) -> dict[str, Any]:
        try:
            key, record = await state.write(
                lambda c: apikeys.create(
                    c, params.name, params.rate_per_minute, params.quota_tokens
                )
            )
        except ValueError as exc:
            raise RpcError(INVALID_PARAMS, str(exc)) from None
        return {"key": key, **record.to_json()}

    async def listed(params: ListParams, _: ControlSession) -> dict[str, Any]:
        keys = await state.read(lambda c: apikeys.listed(c, revoked=params.revoked))
        return {"keys": [k.to_json() for k in keys]}

    async def revoke(params: RevokeParams, _: ControlSession) -> dict[str, Any]:
        record = await state.write(lambda c: apikeys.revoke(c, params.id))
        if record is None:
            raise RpcError(INVALID_PARAMS, f"no API key {params.id}")
        return record.to_json()

    return [
        ControlMethod(
            "apikeys.create",
            CreateParams,
            create,
            "A new API key for the HTTP gateway (shown this once; stored hashed).",
        ),
        ControlMethod("apikeys.list", ListParams, listed, "API keys, without their secrets."),
        ControlMethod("apikeys.revoke", RevokeParams, revoke, "Revoke an API key by its id."),
    ]
