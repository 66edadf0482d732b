"""``rpc.status``: each served chain's head, finalized block, upstreams and cache."""

from __future__ import annotations

from typing import Any

from joynode.chainrpc.service import ChainRpcService
from joynode.control.methods import ControlMethod, ControlSession, NoParams


def rpc_methods(service: ChainRpcService) -> list[ControlMethod]:
    async def status(_: NoParams, __: ControlSession) -> dict[str, Any]:
        return service.statistics()

    return [
        ControlMethod(
            "rpc.status",
            NoParams,
            status,
            "The chain RPC gateway: per chain its head, finalized block, calls (cached, "
            "shared, failed) and upstreams (circuit, latency, head, exclusion); the cache.",
        )
    ]
