"""Feeless inference on a real anvil chain: prepaid balances, signed requests, batches.

Clients deposit into ``PrepaidInference`` once, sign each request off-chain
(``joynode.signatures.sign_prepaid_request``), and nodes settle many of them
in one ``settleBatch``. Every amount is checked to the wei against the fee
split computed here; every refusal by its reason. Dev accounts 2-4 are the
nodes, 15, 17 and 19 the clients, 14 the model owner.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from typing import Any

from eth_account.signers.local import LocalAccount
from web3.types import TxReceipt

from joynode.chain.deploy import JOY
from joynode.prepaid.redemption import Redemption, pack_batch, results_by_member
from joynode.signatures import (
    PrepaidRequest,
    SpenderApproval,
    prepaid_request_id,
    results_chain,
    sign,
    sign_prepaid_request,
    voucher_digest,
)
from tests.chain_fixtures import Chain, anvil_url, chain, deployed, node_key_of
from tests.test_contracts import (
    OUTPUT,
    OWNER,
    ROYALTY_A,
    ROYALTY_B,
    STAKER,
    World,
    _quiet_anvil,
    account,
    node_accounts,
    permit_signature,
    reverts,
)

__all__ = ["_quiet_anvil", "anvil_url", "chain", "deployed"]  # fixtures used by name

PRICE = 40 * JOY + 7  # odd wei, so every split rounds
CLIENTS = (15, 17, 19)  # (test_contracts' requester, reporter, outsider: 100,000 JOY each)
STAKES = (1000 * JOY, 2000 * JOY, 1500 * JOY)
ROYALTIES = ((ROYALTY_A, 1500), (ROYALTY_B, 250))
PRECISION = 10**18

# What settleBatch refuses, by its Refusal enum.
BAD_CLIENT_SIGNATURE, ALREADY_SETTLED, EXPIRED, MODEL_NOT_SERVABLE, PRICE_ABOVE_MAX = 1, 2, 3, 4, 5
WRONG_COMMITTEE, NO_MAJORITY, BAD_SIGNATURE, INSUFFICIENT_BALANCE = 6, 7, 8, 9
OVER_SPENDER_CAP = 10


@dataclass
class Prepaid:
    """The world of test_contracts, with the prepaid contract and a model served by three
    staked nodes."""

    w: World
    contract: Any
    model: bytes
    nodes: list[LocalAccount]

    @classmethod
    def of(cls, chain: Chain) -> Prepaid:
        w = World.of(chain)
        nodes = node_accounts(3)
        for node, stake in zip(nodes, STAKES, strict=True):
            w.join(node, stake)
        royalties = [(account(index).address, bps) for index, bps in ROYALTIES]
        model = w.add_model(price=PRICE, royalties=royalties)
        return cls(w, chain.contract("PrepaidInference"), model, nodes)

    def fund(self, client: LocalAccount, amount: int) -> None:
        self.w.tx(client, self.w.token.functions.approve(self.contract.address, amount))
        self.w.tx(client, self.contract.functions.deposit(amount))

    def request(
        self, client: LocalAccount, nonce: int, *, max_price: int = PRICE, deadline_s: int = 3600
    ) -> PrepaidRequest:
        return PrepaidRequest(
            chain_id=self.w.chain.w3.eth.chain_id,
            contract=self.contract.address,
            client=client.address,
            model=self.model,
            input_hash=nonce.to_bytes(32, "big"),
            max_price=max_price,
            nonce=nonce,
            deadline=self.w.now() + deadline_s,
            committee=tuple(n.address for n in self.nodes),
        )

    def redemption(
        self,
        request: PrepaidRequest,
        client: LocalAccount,
        signers: tuple[int, ...] = (0, 1, 2),
        client_signature: bytes | None = None,
    ) -> Redemption:
        """The request, its client's signature, and a certificate by the members at
        ``signers`` (committee positions)."""
        request_id = prepaid_request_id(request)
        digest = self.w.domain.result_digest(request_id, OUTPUT)
        by: dict[str, LocalAccount] = {n.address: n for n in self.nodes}
        signatures = [sign(node_key_of(by[request.committee[i]]), digest) for i in signers]
        return Redemption(
            request,
            client_signature or sign_prepaid_request(client, request),
            OUTPUT,
            sum(1 << i for i in signers),
            b"".join(signatures),
        )

    def settle(
        self, redemptions: list[Redemption], vouchers: dict[str, bytes] | None = None
    ) -> TxReceipt:
        return self.settle_packed(pack_batch(redemptions, vouchers))

    def settle_packed(self, batch: bytes) -> TxReceipt:
        return self.w.tx(account(STAKER), self.contract.functions.settleBatch(batch))

    def vouchers(
        self, redemptions: list[Redemption], signer: LocalAccount | None = None
    ) -> dict[str, bytes]:
        """Every member's voucher for what it signed in ``redemptions`` (each signed by
        ``signer`` instead, if given: a forgery)."""
        ids = [prepaid_request_id(r.request) for r in redemptions]
        vouched = results_by_member(ids, redemptions)
        chain_id = self.w.chain.w3.eth.chain_id
        vouchers = {}
        for node in self.nodes:
            chain = results_chain(vouched.get(node.address.lower(), []))
            digest = voucher_digest(chain_id, self.contract.address, chain)
            vouchers[node.address.lower()] = sign(node_key_of(signer or node), digest)
        return vouchers

    def account_of(self, client: LocalAccount) -> tuple[int, int, int, int]:
        balance, withdrawing, at, available = self.contract.functions.accountOf(
            client.address
        ).call()
        return int(balance), int(withdrawing), int(at), int(available)

    def refusals(self, receipt: TxReceipt) -> list[int]:
        return [e["reason"] for e in self.w.events(self.contract, "SettlementRefused", receipt)]

    def settled(self, receipt: TxReceipt) -> list[bytes]:
        return [
            rid for e in self.w.events(self.contract, "Settled", receipt) for rid in e["requestIds"]
        ]


def test_a_hundred_signed_requests_from_three_clients_settle_in_batches_to_the_wei(
    chain: Chain,
) -> None:
    p = Prepaid.of(chain)
    w = p.w
    clients = [account(i) for i in CLIENTS]
    deposits = [60 * PRICE, 40 * PRICE, 35 * PRICE]  # 34, 33 and 33 requests
    for client, amount in zip(clients, deposits, strict=True):
        p.fund(client, amount)
    owner, treasury = account(OWNER).address, chain.treasury
    royalty = [account(index).address for index, _ in ROYALTIES]
    nodes = [n.address for n in p.nodes]
    before_treasury = chain.balance(treasury)
    before_reputation = {a: w.reputation(a) for a in nodes}
    agree, miss = (
        int(w.poi.functions.agreeReward().call()),
        int(w.poi.functions.missPenalty().call()),
    )

    # 100 requests, nonces not in order, some certified by two members of three.
    rng = random.Random(7)
    plan = [(clients[i % 3], 1000 + rng.randrange(1 << 40)) for i in range(100)]
    signer_sets = [(0, 1, 2), (0, 1), (1, 2), (0, 2)]
    redemptions = []
    expected_signers: list[tuple[int, ...]] = []
    for index, (client, nonce) in enumerate(plan):
        signers = signer_sets[index % 4]
        expected_signers.append(signers)
        redemptions.append(p.redemption(p.request(client, nonce), client, signers))
    batches = [redemptions[:1], redemptions[1:17], redemptions[17:81], redemptions[81:]]
    total_staked = int(w.coordinator.functions.totalStaked().call())
    earned_before = {a: w.earned(a) for a in nodes}
    stakers_expected: dict[str, int] = defaultdict(int)
    treasury_expected = 0
    for index, batch in enumerate(batches):
        # The larger batches carry each member's voucher instead of its signatures.
        receipt = p.settle(batch, p.vouchers(batch) if index >= 2 else None)
        assert p.refusals(receipt) == []
        assert len(p.settled(receipt)) == len(batch)
        # The stakers' share goes once per batch, per-token rounding to the treasury.
        to_stakers = sum(share(PRICE)["stakers"] for _ in batch)
        increment = to_stakers * PRECISION // total_staked
        treasury_expected += to_stakers - increment * total_staked // PRECISION
        for address, stake in zip(nodes, STAKES, strict=True):
            stakers_expected[address] += stake * increment  # (divided once, as earned() does)

    s = share(PRICE)
    counts = Counter(client.address for client, _ in plan)
    for client, amount in zip(clients, deposits, strict=True):
        left = amount - counts[client.address] * PRICE
        assert p.account_of(client) == (left, 0, 0, left)
    claim = {a: int(p.contract.functions.claimable(a).call()) for a in [owner, *royalty, *nodes]}
    assert claim[owner] == 100 * s["owner"]
    assert [claim[a] for a in royalty] == [100 * r for r in s["royalties"]]
    signed = Counter(nodes[i] for signers in expected_signers for i in signers)
    for signers in expected_signers:
        treasury_expected += s["signers"] - (s["signers"] // len(signers)) * len(signers)
    treasury_expected += 100 * s["treasury"]
    for node in nodes:
        each = sum(
            s["signers"] // len(signers)
            for signers in expected_signers
            if nodes.index(node) in signers
        )
        assert claim[node] == each
        assert w.earned(node) - earned_before[node] == stakers_expected[node] // PRECISION
        unsigned = 100 - signed[node]
        assert w.reputation(node) == min(
            10_000, before_reputation[node] + agree * signed[node] - miss * unsigned
        )
    assert chain.balance(treasury) - before_treasury == treasury_expected
    # Every wei the clients paid is claimable, the stakers', or the treasury's.
    signer_dust = sum(s["signers"] - s["signers"] // len(g) * len(g) for g in expected_signers)
    assert sum(claim.values()) + 100 * (s["stakers"] + s["treasury"]) + signer_dust == 100 * PRICE
    # Usage, in aggregate per client.
    for client in clients:
        assert w.pou.functions.requestsByUser(client.address).call() == counts[client.address]
    assert w.pou.functions.requestsByModel(p.model).call() == 100
    # Payees claim what they were credited.
    before = chain.balance(owner)
    w.tx(account(OWNER), p.contract.functions.claim())
    assert chain.balance(owner) - before == claim[owner]
    with reverts("PrepaidInference.NothingToClaim()"):
        w.tx(account(OWNER), p.contract.functions.claim())


def share(price: int) -> dict[str, Any]:
    """The split of one request's price, as FeeSplit computes it (2.5 %: 40/30/30)."""
    fee = price * 250 // 10_000
    signers = fee * 4000 // 10_000
    stakers = fee * 3000 // 10_000
    owner_portion = price - fee
    royalties = [owner_portion * bps // 10_000 for _, bps in ROYALTIES]
    return {
        "signers": signers,
        "stakers": stakers,
        "treasury": fee - signers - stakers,
        "royalties": royalties,
        "owner": owner_portion - sum(royalties),
    }


def test_replays_overspending_and_bad_certificates_are_refused_and_charge_nothing(
    chain: Chain,
) -> None:
    p = Prepaid.of(chain)
    client, other = account(CLIENTS[0]), account(CLIENTS[1])
    p.fund(client, 2 * PRICE)
    nonces = itertools.count(1)
    first = p.redemption(p.request(client, next(nonces)), client)
    receipt = p.settle([first, first])  # the same request twice in one batch
    assert p.refusals(receipt) == [ALREADY_SETTLED]
    assert p.refusals(p.settle([first])) == [ALREADY_SETTLED]  # and in a later one
    assert p.account_of(client)[0] == PRICE

    def refused(redemption: Redemption) -> int:
        (reason,) = p.refusals(p.settle([redemption]))
        return reason

    request = p.request(client, next(nonces))
    assert refused(p.redemption(request, client, client_signature=b"\x01" * 65)) == (
        BAD_CLIENT_SIGNATURE
    )
    assert refused(p.redemption(request, other)) == BAD_CLIENT_SIGNATURE  # signed by another
    assert refused(p.redemption(request, client, signers=(0,))) == NO_MAJORITY
    forged = p.redemption(request, client, signers=(0, 1))
    swapped = forged.signatures[65:] + forged.signatures[:65]  # out of committee order
    assert refused(replace(forged, signatures=swapped)) == BAD_SIGNATURE
    # Vouchers: signed by another key, or naming a 4th member, they certify nothing.
    redemption = p.redemption(request, client)
    (reason,) = p.refusals(p.settle([redemption], p.vouchers([redemption], signer=other)))
    assert reason == NO_MAJORITY
    packed = bytearray(pack_batch([redemption], p.vouchers([redemption])))
    vouched_by = 2 + 20 * 4 + 2 + 32 + 2 + 3 * 67 + 2 + 208  # after the header, 3 vouchers
    assert packed[vouched_by : vouched_by + 2] == b"\x00\x07"
    packed[vouched_by : vouched_by + 2] = b"\x00\x0f"
    (reason,) = p.refusals(p.settle_packed(bytes(packed)))
    assert reason == WRONG_COMMITTEE
    cheap = p.request(client, next(nonces), max_price=PRICE - 1)
    assert refused(p.redemption(cheap, client)) == PRICE_ABOVE_MAX
    late = p.request(client, next(nonces), deadline_s=-1)
    assert refused(p.redemption(late, client)) == EXPIRED
    stranger = replace(request, committee=(*request.committee[:2], other.address))
    assert refused(p.redemption(stranger, client, signers=(0, 1))) == WRONG_COMMITTEE
    twice = replace(request, committee=(request.committee[0],) * 3)
    assert refused(p.redemption(twice, client, signers=(0, 1))) == WRONG_COMMITTEE
    assert p.account_of(client)[0] == PRICE  # nothing of that was charged
    # One more request is covered; the next is not: refused, nothing charged.
    covered, over = p.request(client, next(nonces)), p.request(client, next(nonces))
    receipt = p.settle([p.redemption(covered, client), p.redemption(over, client)])
    assert p.settled(receipt) == [prepaid_request_id(covered)]
    assert p.refusals(receipt) == [INSUFFICIENT_BALANCE]
    assert p.account_of(client)[0] == 0


def test_a_spender_the_client_approved_signs_for_it_within_its_cap_until_revoked(
    chain: Chain,
) -> None:
    """A gateway node signs requests for a wallet that approved it once: they settle from
    the wallet's balance up to the cap, and not after the wallet revokes it."""
    p = Prepaid.of(chain)
    client, gateway, other = account(CLIENTS[0]), account(CLIENTS[2]), account(CLIENTS[1])
    p.fund(client, 5 * PRICE)
    nonces = itertools.count(1)

    def by_gateway(nonce: int) -> Redemption:
        request = p.request(client, nonce)
        return p.redemption(
            request, client, client_signature=sign_prepaid_request(gateway, request)
        )

    # Not approved yet: the gateway's signature is not the client's.
    assert p.refusals(p.settle([by_gateway(next(nonces))])) == [BAD_CLIENT_SIGNATURE]

    def approval(**changes: Any) -> SpenderApproval:
        fields = {
            "chain_id": chain.w3.eth.chain_id,
            "contract": p.contract.address,
            "client": client.address,
            "spender": gateway.address,
            "cap": 2 * PRICE,
            "expiry": p.w.now() + 3600,
            "nonce": 1,
            **changes,
        }
        return SpenderApproval(**fields)

    def approve(a: SpenderApproval, signer: LocalAccount = client) -> TxReceipt:
        signature = signer.sign_typed_data(full_message=a.typed_data()).signature
        call = p.contract.functions.approveSpender(
            a.client, a.spender, a.cap, a.expiry, a.nonce, bytes(signature)
        )
        return p.w.tx(account(STAKER), call)  # anyone may bring it

    with reverts("PrepaidInference.BadSpenderApproval()"):
        approve(approval(), signer=other)
    with reverts("PrepaidInference.BadSpenderApproval()"):
        approve(approval(spender=client.address))
    with reverts("OutOfBounds(parameter=cap)"):
        approve(approval(cap=0))
    with reverts("OutOfBounds(parameter=expiry)"):
        approve(approval(expiry=p.w.now() + 31 * 86400))
    approve(approval())
    with reverts("PrepaidInference.StaleSpenderApproval(nonce=1)"):
        approve(approval(cap=100 * PRICE))  # an old approval cannot come back
    assert p.contract.functions.spenderOf(client.address, gateway.address).call()[:2] == [
        2 * PRICE,
        0,
    ]

    # Three in one batch: two fit the cap, the third does not.
    batch = [by_gateway(next(nonces)) for _ in range(3)]
    receipt = p.settle(batch)
    assert p.settled(receipt) == [prepaid_request_id(r.request) for r in batch[:2]]
    assert p.refusals(receipt) == [OVER_SPENDER_CAP]
    assert p.account_of(client)[0] == 3 * PRICE
    assert p.contract.functions.spenderOf(client.address, gateway.address).call()[1] == 2 * PRICE

    # A new approval (higher nonce) restarts the count; a revoked one signs nothing.
    approve(approval(nonce=2))
    assert p.settled(p.settle([by_gateway(next(nonces))]))
    p.w.tx(client, p.contract.functions.revokeSpender(gateway.address))
    assert p.refusals(p.settle([by_gateway(next(nonces))])) == [BAD_CLIENT_SIGNATURE]
    own = p.redemption(p.request(client, next(nonces)), client)  # the client's own still settle
    assert p.settled(p.settle([own])) == [prepaid_request_id(own.request)]
    assert p.account_of(client)[0] == PRICE


def test_a_batch_that_does_not_decode_reverts_whole_and_settles_nothing(chain: Chain) -> None:
    p = Prepaid.of(chain)
    client = account(CLIENTS[0])
    p.fund(client, PRICE)
    request = p.request(client, 1)
    # The contract's id of a request is the digest the client signed.
    assert p.contract.functions.requestId(request.as_call_argument()).call() == (
        prepaid_request_id(request)
    )
    packed = pack_batch([p.redemption(request, client)])
    items_at = 2 + 20 * 4 + 2 + 32 + 2 + 2  # 4 addresses (the client, 3 members), 1 model
    bad_index = packed[:items_at] + b"\x00\x04" + packed[items_at + 2 :]  # address 4 of 4
    no_items = packed[: items_at - 2] + b"\x00\x00"
    for bad in (packed[:-1], packed + b"\x00", bad_index, no_items, b"\x00"):
        with reverts("OutOfBounds(parameter=batch)"):
            p.w.tx(account(STAKER), p.contract.functions.settleBatch(bad))
    assert p.account_of(client)[0] == PRICE
    assert len(p.settled(p.settle([p.redemption(request, client)]))) == 1


def test_a_deposit_with_a_permit_needs_no_approval_and_survives_a_front_run_permit(
    chain: Chain,
) -> None:
    p = Prepaid.of(chain)
    client, other = account(CLIENTS[0]), account(CLIENTS[1])
    joy = p.w.token.functions
    assert joy.allowance(client.address, p.contract.address).call() == 0
    deadline = p.w.now() + 600

    def deposit(amount: int, permit: tuple[int, bytes, bytes]) -> TxReceipt:
        call = p.contract.functions.depositWithPermit(amount, deadline, *permit)
        return p.w.tx(client, call)

    before = int(joy.balanceOf(client.address).call())
    permit = permit_signature(p.w, client, PRICE, deadline, spender=p.contract.address)
    receipt = deposit(PRICE, permit)  # one transaction, no approve before it
    (deposited,) = p.w.events(p.contract, "Deposited", receipt)
    assert (deposited["amount"], deposited["balance"]) == (PRICE, PRICE)
    assert int(joy.balanceOf(client.address).call()) == before - PRICE
    # Someone submits the client's next permit first: the deposit still goes through.
    permit = permit_signature(p.w, client, 2 * PRICE, deadline, spender=p.contract.address)
    p.w.tx(other, joy.permit(client.address, p.contract.address, 2 * PRICE, deadline, *permit))
    deposit(2 * PRICE, permit)
    assert p.account_of(client)[0] == 3 * PRICE
    # A permit signed by another key moves nothing.
    forged = permit_signature(
        p.w, client, PRICE, deadline, signer=other, spender=p.contract.address
    )
    with reverts(
        f"ERC20InsufficientAllowance(spender={p.contract.address.lower()}, allowance=0, "
        f"needed={PRICE})"
    ):
        deposit(PRICE, forged)
    assert p.account_of(client)[0] == 3 * PRICE


def test_a_client_who_starts_withdrawing_still_pays_for_what_it_signed_before(
    chain: Chain,
) -> None:
    p = Prepaid.of(chain)
    client = account(CLIENTS[2])
    p.fund(client, 3 * PRICE)
    signed_before = [p.redemption(p.request(client, n, deadline_s=60), client) for n in (1, 2)]
    receipt = p.w.tx(client, p.contract.functions.startWithdrawal(3 * PRICE))
    (started,) = p.w.events(p.contract, "WithdrawalStarted", receipt)
    assert started["amount"] == 3 * PRICE
    balance, withdrawing, _, available = p.account_of(client)
    assert (balance, withdrawing, available) == (3 * PRICE, 3 * PRICE, 0)  # no new spending
    with reverts(f"PrepaidInference.StillWithdrawing(withdrawableAt={started['withdrawableAt']})"):
        p.w.tx(client, p.contract.functions.withdraw())
    # Within the delay the nodes settle what the client signed before it started.
    assert len(p.settled(p.settle(signed_before))) == 2
    chain.advance(11)  # the devnet's delay is 10 s
    before = chain.balance(client.address)
    p.w.tx(client, p.contract.functions.withdraw())
    assert chain.balance(client.address) - before == PRICE  # what was left, not 3 x PRICE
    assert p.account_of(client) == (0, 0, started["withdrawableAt"], 0)
    with reverts("PrepaidInference.NoWithdrawalStarted()"):
        p.w.tx(client, p.contract.functions.withdraw())


def test_the_withdrawal_delay_is_bounded_and_only_governance_sets_it(chain: Chain) -> None:
    p = Prepaid.of(chain)
    with reverts(
        "AccessControlUnauthorizedAccount(account="
        f"{account(STAKER).address.lower()}, neededRole=0x{'00' * 32})"
    ):
        p.w.tx(account(STAKER), p.contract.functions.setParameters(3600))
    for too_short_or_long in (5, 31 * 24 * 3600):
        with reverts("OutOfBounds(parameter=withdrawalDelay)"):
            chain.as_timelock(p.contract.functions.setParameters(too_short_or_long))
    chain.as_timelock(p.contract.functions.setParameters(3600))
    assert p.contract.functions.withdrawalDelay().call() == 3600
