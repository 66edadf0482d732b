"""SovereignRPC's contract (``EnhancedSovereignRPC``) on a real anvil chain.

Providers register per served chain with a deposit, unbond and withdraw; clients
subscribe or deposit credit; providers report usage in batches and claim what it
earned; wrong signed block claims and DAO disputes slash deposits. Every amount is
checked to the wei against the split computed here, every refusal by its reason.
Dev accounts 2-4 are providers, 15 and 17 clients, 16 the slasher, 19 an outsider;
42 is a key with no JOY and no registration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from eth_abi.abi import encode as abi_encode
from eth_account.signers.local import LocalAccount
from eth_utils.crypto import keccak
from web3.contract import Contract
from web3.types import RPCEndpoint, TxReceipt

from joynode.chain.deploy import DAY, JOY, DeployParams
from joynode.signatures import recover_address
from tests.chain_fixtures import Chain, anvil_url, chain, deployed
from tests.test_contracts import (
    World,
    _quiet_anvil,
    account,
    permit_signature,
    reverts,
    role,
    unauthorized,
)

__all__ = ["_quiet_anvil", "anvil_url", "chain", "deployed"]  # fixtures used by name

NAME = "EnhancedSovereignRPC"
DEVNET = DeployParams.for_chain(31337)  # what the fixture deployed with
MIN_DEPOSIT = 100 * JOY
PRICE_PER_DAY = JOY
PRICE_PER_CALL = JOY // 1000
CALL_REWARD = JOY // 2000
FEE_BPS, SLASH_BPS, BOUNTY_BPS = 250, 1000, 5000
UNBONDING_S = 3600  # the devnet's
CREDIT_DELAY_S = 10  # the devnet's
ETHEREUM, GNOSIS = 1, 100  # served chains the contract cannot see
PROVIDERS = (2, 3, 4)
CLIENT, OTHER_CLIENT, SLASHER, OUTSIDER, STRANGER = 15, 17, 16, 19, 42
ZERO_ADDRESS = "0x" + "00" * 20
BLOCK_CLAIM = [
    {"name": "chainId", "type": "uint64"},
    {"name": "number", "type": "uint256"},
    {"name": "blockHash", "type": "bytes32"},
]


def fee(amount: int) -> int:
    return amount * FEE_BPS // 10_000


@dataclass
class Rpc:
    """test_contracts' world with the SovereignRPC contract."""

    w: World
    contract: Contract

    @classmethod
    def of(cls, chain: Chain) -> Rpc:
        return cls(World.of(chain), chain.contract(NAME))

    @property
    def chain(self) -> Chain:
        return self.w.chain

    @property
    def here(self) -> int:
        """The chain id this contract lives on (the devnet's)."""
        return int(self.chain.w3.eth.chain_id)

    def tx(self, who: LocalAccount, call: Any) -> TxReceipt:
        return self.w.tx(who, call)

    def event(self, name: str, receipt: TxReceipt) -> dict[str, Any]:
        (event,) = self.w.events(self.contract, name, receipt)
        return event

    def approve(self, who: LocalAccount, amount: int) -> None:
        self.tx(who, self.w.token.functions.approve(self.contract.address, amount))

    def register(
        self,
        who: LocalAccount,
        chain_id: int | None = None,
        deposit: int = MIN_DEPOSIT,
        endpoint: str = "https://rpc.example/eth",
    ) -> TxReceipt:
        self.approve(who, deposit)
        call = self.contract.functions.register(
            self.here if chain_id is None else chain_id, deposit, endpoint
        )
        return self.tx(who, call)

    def provider(self, who: LocalAccount, chain_id: int | None = None) -> dict[str, Any]:
        fields = ("deposit", "endpoint", "registered_at", "unbonding_until", "served", "slashes")
        values = self.contract.functions.providerOf(
            who.address, self.here if chain_id is None else chain_id
        ).call()
        return dict(zip(fields, values, strict=True))

    def active(self, chain_id: int | None = None) -> set[str]:
        chain_id = self.here if chain_id is None else chain_id
        return set(self.contract.functions.activeProviders(chain_id).call())

    def is_active(self, who: LocalAccount, chain_id: int | None = None) -> bool:
        chain_id = self.here if chain_id is None else chain_id
        return bool(self.contract.functions.isActive(who.address, chain_id).call())

    def subscribe(self, who: LocalAccount, days: int) -> TxReceipt:
        self.approve(who, days * PRICE_PER_DAY)
        return self.tx(who, self.contract.functions.subscribe(days))

    def deposit_credit(self, who: LocalAccount, amount: int) -> TxReceipt:
        self.approve(who, amount)
        return self.tx(who, self.contract.functions.depositCredit(amount))

    def credit(self, who: LocalAccount) -> int:
        return int(self.contract.functions.creditOf(who.address).call()[0])

    def authorized(self, who: LocalAccount) -> bool:
        return bool(self.contract.functions.isAuthorized(who.address).call())

    def report(
        self,
        provider: LocalAccount,
        usage: list[tuple[LocalAccount, int]],
        chain_id: int | None = None,
    ) -> TxReceipt:
        call = self.contract.functions.reportUsage(
            self.here if chain_id is None else chain_id,
            [client.address for client, _ in usage],
            [calls for _, calls in usage],
        )
        return self.tx(provider, call)

    def earnings(self, who: LocalAccount) -> int:
        return int(self.contract.functions.earnings(who.address).call())

    def pool(self) -> int:
        return int(self.contract.functions.rewardPool().call())

    def sign_claim(
        self, signer: LocalAccount, number: int, block_hash: bytes, chain_id: int | None = None
    ) -> bytes:
        """A ``BlockClaim`` in the contract's EIP-712 domain, signed with eth_account."""
        signed = signer.sign_typed_data(
            domain_data={
                "name": "JoyNet SovereignRPC",
                "version": "1",
                "chainId": self.here,
                "verifyingContract": self.contract.address,
            },
            message_types={"BlockClaim": BLOCK_CLAIM},
            message_data={
                "chainId": self.here if chain_id is None else chain_id,
                "number": number,
                "blockHash": block_hash,
            },
        )
        return bytes(signed.signature)

    def slash(
        self, provider: LocalAccount, number: int, block_hash: bytes, signature: bytes
    ) -> TxReceipt:
        call = self.contract.functions.slashWrongBlock(
            provider.address, number, block_hash, signature
        )
        return self.tx(account(SLASHER), call)

    def recent_block(self) -> tuple[int, bytes]:
        """A mined block (its hash is known to the contract) and its real hash."""
        self.chain.w3.provider.make_request(RPCEndpoint("evm_mine"), [])
        number = int(self.chain.w3.eth.block_number) - 1
        return number, bytes(self.chain.w3.eth.get_block(number)["hash"])

    def parameters(self, **changes: Any) -> tuple[Any, ...]:
        """The devnet's parameters (``Parameters``' field order), with ``changes``."""
        values = dict(
            zip(PARAMETER_FIELDS, DEVNET.rpc_parameters(self.chain.treasury), strict=True)
        )
        values.update(changes)
        return tuple(values.values())


PARAMETER_FIELDS = (
    "minDeposit",
    "unbondingDelay",
    "creditWithdrawalDelay",
    "pricePerDay",
    "pricePerCall",
    "callReward",
    "maxCallsPerReport",
    "feeBps",
    "slashBps",
    "bountyBps",
    "treasury",
)
WRONG_HASH = keccak(b"not that block")


def usage_key(chain_id: int) -> bytes:
    return keccak(abi_encode(["string", "uint64"], ["rpc", chain_id]))


# ------------------------------------------------------------------- deployment


def test_deployed_behind_a_proxy_with_the_devnet_parameters_and_no_admin_key(
    chain: Chain,
) -> None:
    r = Rpc.of(chain)
    on_chain = dict(zip(PARAMETER_FIELDS, r.contract.functions.parameters().call(), strict=True))
    assert on_chain == {
        "minDeposit": MIN_DEPOSIT,
        "unbondingDelay": UNBONDING_S,
        "creditWithdrawalDelay": CREDIT_DELAY_S,
        "pricePerDay": PRICE_PER_DAY,
        "pricePerCall": PRICE_PER_CALL,
        "callReward": CALL_REWARD,
        "maxCallsPerReport": 100_000,
        "feeBps": FEE_BPS,
        "slashBps": SLASH_BPS,
        "bountyBps": BOUNTY_BPS,
        "treasury": chain.treasury,
    }
    pou = r.w.pou.functions
    assert pou.hasRole(role("RECORDER_ROLE"), r.contract.address).call()
    admin = r.contract.functions.DEFAULT_ADMIN_ROLE().call()
    assert r.contract.functions.hasRole(admin, chain.treasury).call()
    assert not r.contract.functions.hasRole(admin, chain.admin.address).call()
    assert r.contract.functions.usageKey(ETHEREUM).call() == usage_key(ETHEREUM)


# -------------------------------------------------------------------- providers


def test_register_takes_the_deposit_and_lists_an_active_provider(chain: Chain) -> None:
    r = Rpc.of(chain)
    provider = account(PROVIDERS[0])
    before = chain.balance(provider.address)
    receipt = r.register(provider, ETHEREUM, 150 * JOY, "https://eth.example")
    assert chain.balance(provider.address) == before - 150 * JOY
    assert chain.balance(r.contract.address) == 150 * JOY
    event = r.event("ProviderRegistered", receipt)
    assert event == {
        "provider": provider.address,
        "chainId": ETHEREUM,
        "deposit": 150 * JOY,
        "endpoint": "https://eth.example",
    }
    info = r.provider(provider, ETHEREUM)
    assert info["deposit"] == 150 * JOY
    assert info["endpoint"] == "https://eth.example"
    assert info["registered_at"] == r.w.now()
    assert (info["unbonding_until"], info["served"], info["slashes"]) == (0, 0, 0)
    assert r.is_active(provider, ETHEREUM)
    assert r.active(ETHEREUM) == {provider.address}
    assert r.active(GNOSIS) == set()  # registered per chain
    assert not r.is_active(provider, GNOSIS)


@pytest.mark.parametrize(
    ("chain_id", "deposit", "endpoint", "reason"),
    [
        (
            ETHEREUM,
            MIN_DEPOSIT - 1,
            "https://x",
            f"{NAME}.DepositTooLow(deposit={MIN_DEPOSIT - 1}, minimum={MIN_DEPOSIT})",
        ),
        (0, MIN_DEPOSIT, "https://x", "OutOfBounds(parameter=chainId)"),
        (ETHEREUM, MIN_DEPOSIT, "", "OutOfBounds(parameter=endpoint)"),
        (ETHEREUM, MIN_DEPOSIT, "x" * 257, "OutOfBounds(parameter=endpoint)"),
    ],
    ids=["below the minimum", "chain id 0", "no endpoint", "endpoint too long"],
)
def test_register_refuses_a_deposit_below_the_minimum_and_bad_fields(
    chain: Chain, chain_id: int, deposit: int, endpoint: str, reason: str
) -> None:
    r = Rpc.of(chain)
    provider = account(PROVIDERS[0])
    before = chain.balance(provider.address)
    with reverts(reason):
        r.register(provider, chain_id, deposit, endpoint)
    assert chain.balance(provider.address) == before
    assert not r.is_active(provider, chain_id)


def test_a_provider_registers_once_per_chain(chain: Chain) -> None:
    r = Rpc.of(chain)
    provider = account(PROVIDERS[0])
    r.register(provider, ETHEREUM)
    with reverts(f"{NAME}.AlreadyRegistered(provider={provider.address.lower()}, chainId=1)"):
        r.register(provider, ETHEREUM)
    r.register(provider, GNOSIS)  # another chain is another registration
    assert r.is_active(provider, GNOSIS)


def test_add_deposit_and_update_endpoint_are_mirrored_by_provider_updated(chain: Chain) -> None:
    r = Rpc.of(chain)
    provider = account(PROVIDERS[0])
    r.register(provider, ETHEREUM)
    r.approve(provider, 20 * JOY)
    added = r.tx(provider, r.contract.functions.addDeposit(ETHEREUM, 20 * JOY))
    assert r.event("ProviderUpdated", added)["deposit"] == 120 * JOY
    moved = r.tx(provider, r.contract.functions.updateEndpoint(ETHEREUM, "wss://new.example"))
    assert r.event("ProviderUpdated", moved) == {
        "provider": provider.address,
        "chainId": ETHEREUM,
        "deposit": 120 * JOY,
        "endpoint": "wss://new.example",
    }
    assert r.provider(provider, ETHEREUM)["endpoint"] == "wss://new.example"
    with reverts(f"{NAME}.NotProvider(provider={provider.address.lower()}, chainId=100)"):
        r.tx(provider, r.contract.functions.updateEndpoint(GNOSIS, "wss://new.example"))


def test_unbonding_deactivates_at_once_and_withdraw_waits_for_the_delay(chain: Chain) -> None:
    r = Rpc.of(chain)
    provider, other = account(PROVIDERS[0]), account(PROVIDERS[1])
    r.register(provider, ETHEREUM, 130 * JOY)
    r.register(other, ETHEREUM)
    with reverts(f"{NAME}.NotUnbonding()"):
        r.tx(provider, r.contract.functions.withdraw(ETHEREUM))
    receipt = r.tx(provider, r.contract.functions.beginUnbonding(ETHEREUM))
    until = r.w.now() + UNBONDING_S
    assert r.event("ProviderUnbonding", receipt) == {
        "provider": provider.address,
        "chainId": ETHEREUM,
        "unbondingUntil": until,
    }
    assert not r.is_active(provider, ETHEREUM)
    assert r.active(ETHEREUM) == {other.address}
    assert r.provider(provider, ETHEREUM)["deposit"] == 130 * JOY  # still held
    with reverts(f"{NAME}.ProviderIsUnbonding(unbondingUntil={until})"):
        r.tx(provider, r.contract.functions.addDeposit(ETHEREUM, JOY))
    with reverts(f"{NAME}.UnbondingNotOver(unbondingUntil={until})"):
        r.tx(provider, r.contract.functions.withdraw(ETHEREUM))
    chain.advance_to(until - 2)
    with reverts(f"{NAME}.UnbondingNotOver(unbondingUntil={until})"):
        r.tx(provider, r.contract.functions.withdraw(ETHEREUM))
    chain.advance_to(until)
    before = chain.balance(provider.address)
    withdrawn = r.tx(provider, r.contract.functions.withdraw(ETHEREUM))
    assert r.event("ProviderWithdrawn", withdrawn)["amount"] == 130 * JOY
    assert chain.balance(provider.address) == before + 130 * JOY
    info = r.provider(provider, ETHEREUM)
    assert (info["deposit"], info["registered_at"], info["unbonding_until"]) == (0, 0, 0)
    assert r.active(ETHEREUM) == {other.address}
    r.register(provider, ETHEREUM)  # may come back
    assert r.active(ETHEREUM) == {provider.address, other.address}


def test_an_unbonding_provider_is_still_slashable(chain: Chain) -> None:
    r = Rpc.of(chain)
    provider = account(PROVIDERS[0])
    r.register(provider)  # on this chain
    r.register(provider, ETHEREUM)
    number, _ = r.recent_block()
    signature = r.sign_claim(provider, number, WRONG_HASH)
    r.tx(provider, r.contract.functions.beginUnbonding(r.here))
    r.tx(provider, r.contract.functions.beginUnbonding(ETHEREUM))
    r.slash(provider, number, WRONG_HASH, signature)
    assert r.provider(provider)["deposit"] == 90 * JOY
    chain.as_timelock(
        r.contract.functions.slashByGovernance(provider.address, ETHEREUM, 40 * JOY, WRONG_HASH)
    )
    assert r.provider(provider, ETHEREUM)["deposit"] == 60 * JOY
    chain.advance(UNBONDING_S)
    before = chain.balance(provider.address)
    r.tx(provider, r.contract.functions.withdraw(r.here))
    r.tx(provider, r.contract.functions.withdraw(ETHEREUM))
    assert chain.balance(provider.address) == before + 90 * JOY + 60 * JOY


# ---------------------------------------------------------------- client plans


def test_subscribe_pays_the_fee_to_the_treasury_and_the_rest_to_the_reward_pool(
    chain: Chain,
) -> None:
    r = Rpc.of(chain)
    client = account(CLIENT)
    before, treasury = chain.balance(client.address), chain.balance(chain.treasury)
    receipt = r.subscribe(client, 30)
    until = r.w.now() + 30 * DAY
    assert r.event("PlanSubscribed", receipt) == {"client": client.address, "until": until}
    assert r.contract.functions.planUntil(client.address).call() == until
    assert chain.balance(client.address) == before - 30 * JOY
    assert chain.balance(chain.treasury) - treasury == fee(30 * JOY) == 750 * JOY // 1000
    assert r.pool() == 30 * JOY - fee(30 * JOY) == chain.balance(r.contract.address)
    # Subscribing again extends the plan from its end, not from now.
    chain.advance(DAY)
    r.subscribe(client, 2)
    assert r.contract.functions.planUntil(client.address).call() == until + 2 * DAY
    assert r.pool() == 32 * JOY - fee(30 * JOY) - fee(2 * JOY)
    for days in (0, 367):
        with reverts("OutOfBounds(parameter=days)"):
            r.subscribe(client, days)


def test_credit_is_taken_whole_and_the_fee_only_when_a_report_debits_it(chain: Chain) -> None:
    r = Rpc.of(chain)
    client, provider = account(CLIENT), account(PROVIDERS[0])
    r.register(provider, ETHEREUM)
    treasury = chain.balance(chain.treasury)
    amount = 5 * JOY + 3  # odd wei, so the fee rounds
    deposited = r.deposit_credit(client, amount)
    assert r.event("CreditDeposited", deposited) == {
        "client": client.address,
        "amount": amount,
        "credit": amount,
    }
    assert chain.balance(chain.treasury) == treasury  # no fee yet
    assert r.credit(client) == amount
    calls = 1234
    cost = calls * PRICE_PER_CALL
    receipt = r.report(provider, [(client, calls)], ETHEREUM)
    assert r.event("CreditDebited", receipt) == {
        "client": client.address,
        "provider": provider.address,
        "calls": calls,
        "amount": cost,
        "credit": amount - cost,
    }
    assert chain.balance(chain.treasury) - treasury == fee(cost)
    assert r.earnings(provider) == cost - fee(cost)
    assert r.credit(client) == amount - cost
    with reverts("OutOfBounds(parameter=amount)"):
        r.tx(client, r.contract.functions.depositCredit(0))


def test_is_authorized_by_an_unexpired_plan_or_credit(chain: Chain) -> None:
    r = Rpc.of(chain)
    subscriber, payer = account(CLIENT), account(OTHER_CLIENT)
    assert not r.authorized(subscriber)
    r.subscribe(subscriber, 1)
    until = int(r.contract.functions.planUntil(subscriber.address).call())
    assert r.authorized(subscriber)
    chain.advance_to(until - 1)
    assert r.authorized(subscriber)
    chain.advance_to(until)
    assert not r.authorized(subscriber)  # expired at its end
    assert not r.authorized(payer)
    r.deposit_credit(payer, 1)
    assert r.authorized(payer)
    # Credit that is withdrawing authorizes nothing.
    r.tx(payer, r.contract.functions.beginCreditWithdrawal(1))
    assert not r.authorized(payer)


def test_credit_withdrawal_waits_and_leaves_what_reports_did_not_take(chain: Chain) -> None:
    r = Rpc.of(chain)
    client, provider = account(CLIENT), account(PROVIDERS[0])
    r.register(provider, ETHEREUM)
    r.deposit_credit(client, JOY)
    with reverts(f"{NAME}.NoCreditWithdrawal()"):
        r.tx(client, r.contract.functions.withdrawCredit())
    with reverts("OutOfBounds(parameter=amount)"):
        r.tx(client, r.contract.functions.beginCreditWithdrawal(JOY + 1))
    started = r.event(
        "CreditWithdrawalStarted", r.tx(client, r.contract.functions.beginCreditWithdrawal(JOY))
    )
    assert started["withdrawableAt"] == r.w.now() + CREDIT_DELAY_S
    credit = list(r.contract.functions.creditOf(client.address).call())
    assert credit == [JOY, JOY, started["withdrawableAt"], 0]  # nothing available
    with reverts(f"{NAME}.CreditLocked(withdrawableAt={started['withdrawableAt']})"):
        r.tx(client, r.contract.functions.withdrawCredit())
    # Calls served before the withdrawal are still reported and paid within the delay.
    r.report(provider, [(client, 300)], ETHEREUM)
    chain.advance_to(started["withdrawableAt"])
    before = chain.balance(client.address)
    receipt = r.tx(client, r.contract.functions.withdrawCredit())
    left = JOY - 300 * PRICE_PER_CALL
    assert r.event("CreditWithdrawn", receipt) == {
        "client": client.address,
        "amount": left,
        "credit": 0,
    }
    assert chain.balance(client.address) == before + left
    assert r.credit(client) == 0


def test_subscribe_and_deposit_credit_with_a_permit(chain: Chain) -> None:
    r = Rpc.of(chain)
    client = account(CLIENT)
    allowance = r.w.token.functions.allowance(client.address, r.contract.address)
    assert allowance.call() == 0
    deadline = r.w.now() + 600
    permit = permit_signature(r.w, client, 3 * JOY, deadline, spender=r.contract.address)
    r.tx(client, r.contract.functions.subscribeWithPermit(3, deadline, *permit))
    assert r.contract.functions.planUntil(client.address).call() == r.w.now() + 3 * DAY
    permit = permit_signature(r.w, client, 7 * JOY, deadline, spender=r.contract.address)
    r.tx(client, r.contract.functions.depositCreditWithPermit(7 * JOY, deadline, *permit))
    assert r.credit(client) == 7 * JOY
    assert allowance.call() == 0
    forged = permit_signature(
        r.w, client, JOY, deadline, signer=account(OUTSIDER), spender=r.contract.address
    )
    with reverts(
        f"ERC20InsufficientAllowance(spender={r.contract.address.lower()}, allowance=0, "
        f"needed={JOY})"
    ):
        r.tx(client, r.contract.functions.depositCreditWithPermit(JOY, deadline, *forged))


# ----------------------------------------------------------------------- usage


def test_a_batched_report_debits_credit_pays_providers_and_records_usage(chain: Chain) -> None:
    r = Rpc.of(chain)
    provider = account(PROVIDERS[0])
    rich, poor, subscriber, nobody = (account(i) for i in (CLIENT, OTHER_CLIENT, 18, OUTSIDER))
    r.register(provider, ETHEREUM)
    r.deposit_credit(rich, 10 * JOY)
    r.deposit_credit(poor, PRICE_PER_CALL * 5 + 7)  # five calls and some wei
    r.subscribe(subscriber, 10)
    pool, treasury = r.pool(), chain.balance(chain.treasury)
    usage = [(rich, 2000), (poor, 9), (subscriber, 4000), (nobody, 50), (rich, 0)]

    receipt = r.report(provider, usage, ETHEREUM)

    debits = r.w.events(r.contract, "CreditDebited", receipt)
    assert [(d["client"], d["calls"], d["amount"], d["credit"]) for d in debits] == [
        (rich.address, 2000, 2 * JOY, 8 * JOY),
        (poor.address, 9, PRICE_PER_CALL * 5 + 7, 0),  # all it had, not nine calls' worth
    ]
    debited = 2 * JOY + PRICE_PER_CALL * 5 + 7
    rewarded = 4000 * CALL_REWARD
    assert r.event("UsageReported", receipt) == {
        "provider": provider.address,
        "chainId": ETHEREUM,
        "calls": 2000 + 9 + 4000,  # the unauthorized client's 50 count for nothing
        "debited": debited,
        "rewarded": rewarded,
    }
    assert chain.balance(chain.treasury) - treasury == fee(debited)
    assert r.earnings(provider) == debited - fee(debited) + rewarded
    assert r.pool() == pool - rewarded
    assert r.provider(provider, ETHEREUM)["served"] == 6009
    pou, key = r.w.pou.functions, usage_key(ETHEREUM)
    assert pou.unitsByModel(key).call() == 6009
    assert pou.requestsByModel(key).call() == 3  # one per recorded entry
    assert pou.unitsByUser(rich.address).call() == 2000
    assert pou.unitsByUser(poor.address).call() == 9
    assert pou.unitsByUser(subscriber.address).call() == 4000
    assert pou.unitsByUser(nobody.address).call() == 0
    # Earnings are pulled, once.
    before = chain.balance(provider.address)
    claimed = r.event("EarningsClaimed", r.tx(provider, r.contract.functions.claim()))
    assert claimed == {"provider": provider.address, "amount": debited - fee(debited) + rewarded}
    assert chain.balance(provider.address) == before + claimed["amount"]
    with reverts(f"{NAME}.NoEarnings()"):
        r.tx(provider, r.contract.functions.claim())


def test_subscription_calls_are_rewarded_only_from_that_subscribers_budget(
    chain: Chain,
) -> None:
    """A report draws on the budgets of the clients it names, each no more than what that
    client paid less the fee: a provider reporting its own subscription's calls gets its
    own money back at most, never what another subscriber paid."""
    r = Rpc.of(chain)
    provider, subscriber = account(PROVIDERS[0]), account(CLIENT)
    r.register(provider, ETHEREUM)
    r.subscribe(subscriber, 1)
    budget = JOY - fee(JOY)
    assert r.pool() == budget
    assert r.contract.functions.rewardBudget(subscriber.address).call() == budget
    r.subscribe(provider, 1)  # the provider's own plan
    calls = budget // CALL_REWARD + 100  # more calls than its budget pays for
    receipt = r.report(provider, [(provider, calls)], ETHEREUM)
    assert r.event("UsageReported", receipt)["rewarded"] == budget
    assert r.earnings(provider) == budget  # its own payment, less the fee
    assert r.pool() == budget  # the other subscriber's budget untouched
    assert r.contract.functions.rewardBudget(subscriber.address).call() == budget
    receipt = r.report(provider, [(provider, 10)], ETHEREUM)
    assert r.event("UsageReported", receipt)["rewarded"] == 0
    receipt = r.report(provider, [(subscriber, 10)], ETHEREUM)
    assert r.event("UsageReported", receipt)["rewarded"] == 10 * CALL_REWARD
    assert r.pool() == budget - 10 * CALL_REWARD
    assert r.provider(provider, ETHEREUM)["served"] == calls + 20


def test_usage_is_refused_from_a_non_provider_or_an_inactive_one(chain: Chain) -> None:
    r = Rpc.of(chain)
    client = account(CLIENT)
    outsider, elsewhere, unbonding, slashed = (account(i) for i in (OUTSIDER, *PROVIDERS))
    r.deposit_credit(client, JOY)
    r.register(elsewhere, GNOSIS)  # serves another chain
    r.register(unbonding, ETHEREUM)
    r.tx(unbonding, r.contract.functions.beginUnbonding(ETHEREUM))
    r.register(slashed, ETHEREUM)
    chain.as_timelock(
        r.contract.functions.slashByGovernance(slashed.address, ETHEREUM, 1, WRONG_HASH)
    )
    assert r.provider(slashed, ETHEREUM)["deposit"] == MIN_DEPOSIT - 1
    for who in (outsider, elsewhere, unbonding, slashed):
        with reverts(f"{NAME}.NotActiveProvider(provider={who.address.lower()}, chainId=1)"):
            r.report(who, [(client, 1)], ETHEREUM)
    assert r.credit(client) == JOY
    # Topping the deposit up makes the slashed provider active again.
    r.approve(slashed, 1)
    r.tx(slashed, r.contract.functions.addDeposit(ETHEREUM, 1))
    r.report(slashed, [(client, 1)], ETHEREUM)
    assert r.credit(client) == JOY - PRICE_PER_CALL


def test_a_report_is_bounded_in_entries_and_calls(chain: Chain) -> None:
    r = Rpc.of(chain)
    provider, client = account(PROVIDERS[0]), account(CLIENT)
    r.register(provider, ETHEREUM)
    r.deposit_credit(client, 1000 * JOY)
    report = r.contract.functions.reportUsage
    for call in (
        report(ETHEREUM, [], []),
        report(ETHEREUM, [client.address], [1, 2]),
        report(ETHEREUM, [client.address] * 257, [1] * 257),
    ):
        with reverts("OutOfBounds(parameter=clients)"):
            r.tx(provider, call)
    with reverts("OutOfBounds(parameter=calls)"):  # 100,001 calls in one report
        r.report(provider, [(client, 60_000), (client, 40_001)], ETHEREUM)
    r.report(provider, [(client, 60_000), (client, 40_000)], ETHEREUM)  # at the cap
    assert r.credit(client) == 1000 * JOY - 100_000 * PRICE_PER_CALL


# -------------------------------------------------------------------- slashing


def test_a_signed_wrong_block_claim_slashes_once_with_a_bounty(chain: Chain) -> None:
    r = Rpc.of(chain)
    provider, slasher = account(PROVIDERS[0]), account(SLASHER)
    r.register(provider)  # serves this chain
    number, _ = r.recent_block()
    signature = r.sign_claim(provider, number, WRONG_HASH)
    digest = bytes(r.contract.functions.blockClaimDigest(number, WRONG_HASH).call())
    before = {a: chain.balance(a) for a in (slasher.address, chain.treasury)}

    receipt = r.slash(provider, number, WRONG_HASH, signature)

    slashed = MIN_DEPOSIT * SLASH_BPS // 10_000  # 10 JOY
    bounty = slashed * BOUNTY_BPS // 10_000  # 5 JOY
    assert chain.balance(slasher.address) - before[slasher.address] == bounty == 5 * JOY
    assert chain.balance(chain.treasury) - before[chain.treasury] == slashed - bounty
    assert r.event("ProviderSlashed", receipt) == {
        "provider": provider.address,
        "chainId": r.here,
        "slasher": slasher.address,
        "amount": slashed,
        "bounty": bounty,
        "deposit": MIN_DEPOSIT - slashed,
        "evidence": digest,
    }
    info = r.provider(provider)
    assert (info["deposit"], info["slashes"]) == (MIN_DEPOSIT - slashed, 1)
    # Below the minimum deposit: inactive.
    assert not r.is_active(provider)
    assert r.active() == set()
    assert r.contract.functions.isClaimUsed(provider.address, number, WRONG_HASH).call()
    with reverts(f"{NAME}.ClaimUsed(digest=0x{digest.hex()})"):
        r.slash(provider, number, WRONG_HASH, signature)
    assert r.provider(provider)["deposit"] == MIN_DEPOSIT - slashed


def test_a_correct_claim_is_refused(chain: Chain) -> None:
    r = Rpc.of(chain)
    provider = account(PROVIDERS[0])
    r.register(provider)
    number, real = r.recent_block()
    with reverts(f"{NAME}.CorrectClaim(number={number}, blockHash=0x{real.hex()})"):
        r.slash(provider, number, real, r.sign_claim(provider, number, real))
    assert r.provider(provider)["deposit"] == MIN_DEPOSIT


def test_a_claim_signed_by_anyone_but_the_named_provider_is_refused(chain: Chain) -> None:
    r = Rpc.of(chain)
    provider, stranger = account(PROVIDERS[0]), account(STRANGER)
    r.register(provider)
    number, _ = r.recent_block()
    forged = r.sign_claim(stranger, number, WRONG_HASH)
    with reverts(f"{NAME}.WrongSigner(signer={stranger.address.lower()})"):
        r.slash(provider, number, WRONG_HASH, forged)
    # The provider's claim about another chain id does not sign this chain's claim.
    elsewhere = r.sign_claim(provider, number, WRONG_HASH, chain_id=ETHEREUM)
    digest = bytes(r.contract.functions.blockClaimDigest(number, WRONG_HASH).call())
    someone = recover_address(digest, elsewhere).lower()
    assert someone != provider.address.lower()
    with reverts(f"{NAME}.WrongSigner(signer={someone})"):
        r.slash(provider, number, WRONG_HASH, elsewhere)
    # A signer that is no provider here has no deposit to take.
    with reverts(f"{NAME}.NotProvider(provider={stranger.address.lower()}, chainId={r.here})"):
        r.slash(stranger, number, WRONG_HASH, forged)
    assert r.provider(provider)["deposit"] == MIN_DEPOSIT


def test_a_claim_about_a_block_older_than_256_or_not_mined_is_refused(chain: Chain) -> None:
    r = Rpc.of(chain)
    provider = account(PROVIDERS[0])
    r.register(provider)
    number, _ = r.recent_block()
    signature = r.sign_claim(provider, number, WRONG_HASH)
    chain.w3.provider.make_request(RPCEndpoint("anvil_mine"), [hex(257)])
    with reverts(f"{NAME}.BlockNotVerifiable(number={number})"):
        r.slash(provider, number, WRONG_HASH, signature)
    future = int(chain.w3.eth.block_number) + 5
    with reverts(f"{NAME}.BlockNotVerifiable(number={future})"):
        r.slash(provider, future, WRONG_HASH, r.sign_claim(provider, future, WRONG_HASH))
    assert r.provider(provider)["deposit"] == MIN_DEPOSIT


def test_slash_by_governance_only_through_the_timelock(chain: Chain) -> None:
    r = Rpc.of(chain)
    provider, outsider = account(PROVIDERS[0]), account(OUTSIDER)
    r.register(provider, ETHEREUM, 200 * JOY)
    evidence = keccak(b"ipfs://the dispute's evidence")
    call = r.contract.functions.slashByGovernance(provider.address, ETHEREUM, 30 * JOY, evidence)
    with reverts(unauthorized(outsider, "DEFAULT_ADMIN_ROLE")):
        r.tx(outsider, call)
    with reverts(unauthorized(provider, "DEFAULT_ADMIN_ROLE")):
        r.tx(provider, call)
    treasury = chain.balance(chain.treasury)
    receipt = chain.as_timelock(call)
    assert r.event("ProviderSlashed", receipt) == {
        "provider": provider.address,
        "chainId": ETHEREUM,
        "slasher": chain.treasury,
        "amount": 30 * JOY,
        "bounty": 0,
        "deposit": 170 * JOY,
        "evidence": evidence,
    }
    assert chain.balance(chain.treasury) - treasury == 30 * JOY
    assert r.provider(provider, ETHEREUM)["slashes"] == 1
    assert r.is_active(provider, ETHEREUM)  # 170 JOY is still above the minimum
    # More than is left takes what is left.
    everything = r.contract.functions.slashByGovernance(
        provider.address, ETHEREUM, 1000 * JOY, evidence
    )
    assert r.event("ProviderSlashed", chain.as_timelock(everything))["amount"] == 170 * JOY
    assert not r.is_active(provider, ETHEREUM)
    nobody = r.contract.functions.slashByGovernance(outsider.address, ETHEREUM, JOY, evidence)
    with reverts(f"{NAME}.NotProvider(provider={outsider.address.lower()}, chainId=1)"):
        chain.as_timelock(nobody)


# ------------------------------------------------------------------ parameters


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"minDeposit": 0}, "minDeposit"),
        ({"minDeposit": 1_000_000 * JOY + 1}, "minDeposit"),
        ({"unbondingDelay": 59}, "unbondingDelay"),  # the devnet's floor is a minute
        ({"unbondingDelay": 30 * DAY + 1}, "unbondingDelay"),
        ({"creditWithdrawalDelay": 9}, "creditWithdrawalDelay"),  # the devnet's floor: 10 s
        ({"creditWithdrawalDelay": 7 * DAY + 1}, "creditWithdrawalDelay"),
        ({"pricePerDay": 0}, "pricePerDay"),
        ({"pricePerDay": 10_000 * JOY + 1}, "pricePerDay"),
        ({"pricePerCall": 0, "callReward": 0}, "pricePerCall"),
        ({"pricePerCall": JOY + 1}, "pricePerCall"),
        ({"callReward": PRICE_PER_CALL + 1}, "callReward"),
        ({"maxCallsPerReport": 0}, "maxCallsPerReport"),
        ({"maxCallsPerReport": 1_000_001}, "maxCallsPerReport"),
        ({"feeBps": 1001}, "feeBps"),
        ({"slashBps": 0}, "slashBps"),
        ({"slashBps": 5001}, "slashBps"),
        ({"bountyBps": 5001}, "bountyBps"),
        ({"treasury": ZERO_ADDRESS}, "treasury"),
    ],
)
def test_every_parameter_is_bounded(chain: Chain, changes: dict[str, Any], reason: str) -> None:
    r = Rpc.of(chain)
    with reverts(f"OutOfBounds(parameter={reason})"):
        chain.as_timelock(r.contract.functions.setParameters(r.parameters(**changes)))


def test_parameters_need_governance(chain: Chain) -> None:
    r = Rpc.of(chain)
    call = r.contract.functions.setParameters(r.parameters(feeBps=0))
    for who in (account(OUTSIDER), chain.admin):  # the deployer kept no role
        with reverts(unauthorized(who, "DEFAULT_ADMIN_ROLE")):
            r.tx(who, call)
    assert r.contract.functions.feeBps().call() == FEE_BPS


def test_parameters_at_their_bounds_are_accepted_and_mirrored(chain: Chain) -> None:
    r = Rpc.of(chain)
    edges = {
        "minDeposit": 1_000_000 * JOY,
        "unbondingDelay": 30 * DAY,
        "creditWithdrawalDelay": 7 * DAY,
        "pricePerDay": 10_000 * JOY,
        "pricePerCall": JOY,
        "callReward": JOY,
        "maxCallsPerReport": 1_000_000,
        "feeBps": 1000,
        "slashBps": 5000,
        "bountyBps": 5000,
        "treasury": account(OUTSIDER).address,
    }
    receipt = chain.as_timelock(r.contract.functions.setParameters(r.parameters(**edges)))
    assert r.event("ParametersChanged", receipt) == edges
    on_chain = r.contract.functions.parameters().call()
    assert dict(zip(PARAMETER_FIELDS, on_chain, strict=True)) == edges
    low = {"minDeposit": 1, "unbondingDelay": 60, "creditWithdrawalDelay": 10, "feeBps": 0}
    low |= {"pricePerDay": 1, "pricePerCall": 1, "callReward": 0, "maxCallsPerReport": 1}
    low |= {"slashBps": 1, "bountyBps": 0}
    chain.as_timelock(r.contract.functions.setParameters(r.parameters(**low)))
    assert r.contract.functions.minDeposit().call() == 1
