"""The prepaid actor's control methods: ``balance.*`` (this node's account, or any client's)
and ``prepaid.settlements``."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import pydantic

from joynode.chain.deploy import JOY
from joynode.chain.sender import TransactionFailed
from joynode.chain.service import AmountParams
from joynode.control.jsonrpc import INVALID_PARAMS, RpcError
from joynode.control.methods import ControlMethod, ControlSession, NoParams
from joynode.prepaid import ledger

if TYPE_CHECKING:
    from joynode.prepaid.service import PrepaidService


class BalanceParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    client: str | None = pydantic.Field(
        None, pattern=r"^0x[0-9a-fA-F]{40}$", description="default: this node's account"
    )


class SettleParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    take_over: bool = pydantic.Field(
        False,
        description="also the requests members ranked above this node have not settled yet "
        "(this node pays their gas): for a first-ranked member known to be down",
    )


class SettlementsParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    limit: int = pydantic.Field(50, ge=1, le=1000)


def prepaid_methods(prepaid: PrepaidService) -> list[ControlMethod]:
    async def transact(name: str, *args: Any) -> dict[str, Any]:
        contract = prepaid.contract()
        return {"tx": await _sent(prepaid.transact(getattr(contract.functions, name)(*args)))}

    async def balance_get(params: BalanceParams, _: ControlSession) -> dict[str, Any]:
        return await prepaid.account(params.client or prepaid.address)

    async def balance_deposit(params: AmountParams, _: ControlSession) -> dict[str, Any]:
        contract, token = prepaid.contract(), prepaid.contract("JoyToken")
        amount = params.amount_joy * JOY
        await _sent(prepaid.transact(token.functions.approve(contract.address, amount)))
        result = await transact("deposit", amount)
        return {**result, **await prepaid.account(prepaid.address)}

    async def balance_withdraw(params: AmountParams, _: ControlSession) -> dict[str, Any]:
        result = await transact("startWithdrawal", params.amount_joy * JOY)
        return {**result, **await prepaid.account(prepaid.address)}

    async def balance_complete(_: NoParams, __: ControlSession) -> dict[str, Any]:
        result = await transact("withdraw")
        return {**result, **await prepaid.account(prepaid.address)}

    async def balance_claim(_: NoParams, __: ControlSession) -> dict[str, Any]:
        claimable = (await prepaid.account(prepaid.address))["claimable"]
        return {**await transact("claim"), "claimed": claimable}

    async def settlements(params: SettlementsParams, _: ControlSession) -> dict[str, Any]:
        counts = await prepaid.read(ledger.counts)
        recent = await prepaid.read(lambda c: ledger.recent(c, params.limit))
        stats = prepaid.statistics()
        return {"by_state": counts, "statistics": vars(stats), "requests": recent}

    async def settle(params: SettleParams, _: ControlSession) -> dict[str, Any]:
        sent = await prepaid.settle_now(take_over=params.take_over)
        return {"requests": sent, **vars(prepaid.statistics())}

    return [
        ControlMethod(
            "prepaid.settle",
            SettleParams,
            settle,
            "Settle what is due now in one batch, whatever its size, age or the gas price "
            "(take_over: and what members ranked above it hold).",
        ),
        ControlMethod(
            "balance.get",
            BalanceParams,
            balance_get,
            "A prepaid balance: all of it, withdrawing (and when), available on-chain, "
            "pending in requests this node saw, spendable, claimable.",
        ),
        ControlMethod(
            "balance.deposit",
            AmountParams,
            balance_deposit,
            "Deposit amount_joy of this node's JOY into its prepaid balance.",
        ),
        ControlMethod(
            "balance.withdraw",
            AmountParams,
            balance_withdraw,
            "Start withdrawing amount_joy of this node's prepaid balance (after the delay: "
            "balance.complete_withdrawal).",
        ),
        ControlMethod(
            "balance.complete_withdrawal",
            NoParams,
            balance_complete,
            "Take out what finished withdrawing.",
        ),
        ControlMethod(
            "balance.claim",
            NoParams,
            balance_claim,
            "Claim what prepaid settlements credited to this node (signer shares, model "
            "owner's and royalties).",
        ),
        ControlMethod(
            "prepaid.settlements",
            SettlementsParams,
            settlements,
            "The prepaid requests this node saw, by state, and the newest with their "
            "settlement transaction or refusal.",
        ),
    ]


async def _sent(receipt: Awaitable[Any]) -> str:
    """The transaction's hash; a revert as the control error with the contract's reason."""
    try:
        return str((await receipt)["transactionHash"].to_0x_hex())
    except TransactionFailed as exc:
        raise RpcError(INVALID_PARAMS, f"transaction failed: {exc}") from None
