"""``rpc.*`` on the control socket: the gateway's state, and this node as a SovereignRPC
provider (register with a deposit, leave, claim earnings, slash a peer on evidence)."""

from __future__ import annotations

from typing import Any

import pydantic

from joynode.abc import GovernanceChain
from joynode.chain.deploy import JOY, Deployment
from joynode.chain.sender import TransactionFailed
from joynode.chainrpc.mirror import CONTRACT
from joynode.chainrpc.service import ChainRpcService
from joynode.control.jsonrpc import INVALID_PARAMS, RpcError
from joynode.control.methods import ControlMethod, ControlSession, NoParams

RPC_ERROR = -32075  # JSON-RPC application error: a SovereignRPC transaction failed


class _Params(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


class RegisterParams(_Params):
    chain_id: int = pydantic.Field(ge=1, le=2**64 - 1)
    deposit_joy: int = pydantic.Field(100, ge=1, le=10**12)
    endpoint: str = pydantic.Field("", max_length=256)


class ChainParams(_Params):
    chain_id: int = pydantic.Field(ge=1, le=2**64 - 1)


class PlanParams(_Params):
    client: str = pydantic.Field(pattern=r"^0x[0-9a-fA-F]{40}$")


class SlashParams(_Params):
    evidence: int = pydantic.Field(0, ge=0, description="Index in rpc.status's peers.evidence.")


def rpc_methods(service: ChainRpcService, chain: GovernanceChain | None) -> list[ControlMethod]:
    def on_chain() -> tuple[GovernanceChain, Deployment, Any]:
        """The chain, its deployment and the contract; an error without them."""
        if chain is None or chain.deployment is None:
            raise RpcError(RPC_ERROR, "no chain: SovereignRPC needs chain.mode local or rpc")
        return chain, chain.deployment, chain.deployment.contract(chain.w3, CONTRACT)

    async def send(call: Any) -> str:
        live = on_chain()[0]
        try:
            receipt = await live.transact(call)
        except TransactionFailed as exc:
            raise RpcError(RPC_ERROR, str(exc)) from None
        return str(receipt["transactionHash"].to_0x_hex())

    async def status(_: NoParams, __: ControlSession) -> dict[str, Any]:
        return service.statistics()

    async def register(params: RegisterParams, _: ControlSession) -> dict[str, Any]:
        """Approve the deposit and register (or add to the deposit of one registered)."""
        live, deployment, rpc = on_chain()
        token = deployment.contract(live.w3, "JoyToken")
        amount = params.deposit_joy * JOY
        current = await live.call(rpc.functions.providerOf(live.address, params.chain_id).call)
        txs = [await send(token.functions.approve(rpc.address, amount))]
        if int(current[2]) == 0:  # registeredAt
            endpoint = params.endpoint or f"joynet:{live.address}"
            txs.append(await send(rpc.functions.register(params.chain_id, amount, endpoint)))
        else:
            txs.append(await send(rpc.functions.addDeposit(params.chain_id, amount)))
        return {"provider": live.address, "chain_id": params.chain_id, "txs": txs}

    async def unbond(params: ChainParams, _: ControlSession) -> dict[str, Any]:
        rpc = on_chain()[2]
        return {"tx": await send(rpc.functions.beginUnbonding(params.chain_id))}

    async def withdraw(params: ChainParams, _: ControlSession) -> dict[str, Any]:
        rpc = on_chain()[2]
        return {"tx": await send(rpc.functions.withdraw(params.chain_id))}

    async def claim(_: NoParams, __: ControlSession) -> dict[str, Any]:
        live, _deployment, rpc = on_chain()
        earned = int(await live.call(rpc.functions.earnings(live.address).call))
        if earned == 0:
            return {"claimed": "0", "tx": None}
        return {"claimed": str(earned), "tx": await send(rpc.functions.claim())}

    async def providers(params: ChainParams, __: ControlSession) -> list[dict[str, Any]]:
        return await service.plans.providers(params.chain_id)

    async def plan(params: PlanParams, _: ControlSession) -> dict[str, Any]:
        return await service.plans.plan_of(params.client)

    async def slash(params: SlashParams, _: ControlSession) -> dict[str, Any]:
        """Bring a peer's signed wrong block claim (kept as evidence) to the contract."""
        live, deployment, rpc = on_chain()
        evidence = service.peers.evidence
        if params.evidence >= len(evidence):
            raise RpcError(INVALID_PARAMS, f"no evidence {params.evidence} ({len(evidence)} kept)")
        found = evidence[params.evidence]
        if found.block_signature is None or found.block is None:
            raise RpcError(INVALID_PARAMS, "that evidence holds no signed block claim")
        if found.chain_id != deployment.chain_id:
            raise RpcError(
                INVALID_PARAMS,
                f"a claim about chain {found.chain_id}: the contract sees only chain "
                f"{deployment.chain_id}'s blocks (take it to the DAO: gov.propose "
                "slashByGovernance)",
            )
        number, claimed = found.block
        block = await live.call(live.w3.eth.get_block, number)
        if block["hash"].to_0x_hex() == claimed:
            raise RpcError(
                INVALID_PARAMS,
                f"block {number}'s hash is the one claimed: the lie is in its contents, which "
                "the contract cannot see (evidence for the DAO: slashByGovernance)",
            )
        call = rpc.functions.slashWrongBlock(
            live.w3.to_checksum_address(found.peer),
            number,
            bytes.fromhex(claimed[2:]),
            bytes.fromhex(found.block_signature[2:]),
        )
        return {"provider": found.peer, "block": number, "tx": await send(call)}

    return [
        ControlMethod(
            "rpc.status",
            NoParams,
            status,
            "The chain RPC gateway: per chain its head, finalized block, calls (cached, "
            "shared, peer, failed) and upstreams (circuit, latency, head, exclusion); the "
            "cache; failover to peers and the evidence against them; usage reported.",
        ),
        ControlMethod(
            "rpc.register",
            RegisterParams,
            register,
            f"Serve a chain as a {CONTRACT} provider: approve and deposit JOY (again: add).",
        ),
        ControlMethod("rpc.unbond", ChainParams, unbond, "Stop serving a chain; unbonding."),
        ControlMethod("rpc.withdraw", ChainParams, withdraw, "Take the deposit back after it."),
        ControlMethod("rpc.claim", NoParams, claim, "Claim what usage reports earned."),
        ControlMethod("rpc.providers", ChainParams, providers, "A chain's providers, as mirrored."),
        ControlMethod("rpc.plan", PlanParams, plan, "A client's plan and credit, as mirrored."),
        ControlMethod(
            "rpc.slash",
            SlashParams,
            slash,
            "Slash a peer whose signed block claim was wrong (evidence from rpc.status).",
        ),
    ]
