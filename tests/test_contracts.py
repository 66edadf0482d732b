"""JoyNet's contracts on a real anvil chain: payments, rewards, certificates, slashing.

Every test starts from the freshly deployed and funded chain of
``tests/chain_fixtures.py`` (an EVM snapshot reverted after each test). Dev
accounts 2..13 act as nodes, the others as model owner, requester, certificate
submitter, reporter and outsider; royalty recipients are fresh keys holding no
JOY, so their balances are exactly what they were paid.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import pytest
from eth_abi.abi import encode as abi_encode
from eth_account.signers.local import LocalAccount
from eth_utils.crypto import keccak
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from web3.contract import Contract
from web3.exceptions import ContractCustomError
from web3.logs import DISCARD
from web3.types import TxReceipt

from joynode.chain.committee import Candidate, select_committee
from joynode.chain.deploy import JOY
from joynode.chain.sender import TransactionFailed
from joynode.signatures import Eip712Domain, Permit, sign, sign_permit
from tests.chain_fixtures import Chain, anvil_url, chain, deployed, dev_account, node_key_of

__all__ = ["anvil_url", "chain", "deployed"]  # fixtures used by name below

PRICE = 1000 * JOY
MIN_STAKE = 100 * JOY  # DeployParams' default, as the fixture deploys
UNBONDING_S = 3600  # the fixture's unbonding delay
MODEL_CID = "bafy-test-model"
OTHER_CID = "bafy-other-model"
OUTPUT = keccak(b"the output")
ZERO_ADDRESS = "0x" + "00" * 20
ZERO_HASH = b"\0" * 32
MAX_NODES = 12
OWNER, REQUESTER, SUBMITTER, REPORTER, STAKER, OUTSIDER = 14, 15, 16, 17, 18, 19
ROYALTY_A, ROYALTY_B, STRANGER = 40, 41, 42  # not funded by anvil or the fixture


@functools.cache
def account(index: int) -> LocalAccount:
    return dev_account(index)


def node_accounts(count: int) -> list[LocalAccount]:
    assert count <= MAX_NODES
    return [account(2 + i) for i in range(count)]


@functools.cache
def by_address() -> dict[str, LocalAccount]:
    return {account(i).address: account(i) for i in range(50)}


def role(name: str) -> bytes:
    return keccak(text=name)


def reverts(reason: str) -> pytest.RaisesExc[TransactionFailed]:
    """Expect a transaction to revert with exactly this decoded reason."""
    return pytest.raises(TransactionFailed, match=f"^{re.escape(reason)}$")


def unauthorized(who: LocalAccount, role_name: str) -> str:
    role_id = ZERO_HASH if role_name == "DEFAULT_ADMIN_ROLE" else role(role_name)
    return (
        f"AccessControlUnauthorizedAccount(account={who.address.lower()}, "
        f"neededRole=0x{role_id.hex()})"
    )


def exact(value: Fraction) -> int:
    """A JOY amount as wei, which must be a whole number."""
    wei = value * JOY
    assert wei.denominator == 1, value
    return int(wei)


@dataclass(frozen=True)
class Request:
    request_id: bytes
    model: bytes
    committee: list[str]
    deadline: int


@dataclass
class World:
    chain: Chain
    token: Contract
    coordinator: Contract
    marketplace: Contract
    poi: Contract
    pou: Contract

    @classmethod
    def of(cls, chain: Chain) -> World:
        return cls(
            chain,
            chain.contract("JoyToken"),
            chain.contract("NodeCoordinator"),
            chain.contract("ModelMarketplace"),
            chain.contract("ProofOfInference"),
            chain.contract("ProofOfUse"),
        )

    @property
    def domain(self) -> Eip712Domain:
        return Eip712Domain(self.chain.w3.eth.chain_id, self.poi.address)

    def tx(self, sender: LocalAccount, call: Any) -> TxReceipt:
        # A fresh sender each time: its nonce cache must not outlive a snapshot revert.
        return self.chain.sender(sender).transact(call)

    def now(self) -> int:
        return int(self.chain.w3.eth.get_block("latest")["timestamp"])

    def events(self, contract: Contract, name: str, receipt: TxReceipt) -> list[dict[str, Any]]:
        event = getattr(contract.events, name)()
        return [dict(e["args"]) for e in event.process_receipt(receipt, errors=DISCARD)]

    # ---- nodes

    def join(self, node: LocalAccount, stake: int, cids: Sequence[str] = (MODEL_CID,)) -> TxReceipt:
        """Approve, stake and register ``node`` serving ``cids``."""
        self.tx(node, self.token.functions.approve(self.coordinator.address, stake))
        self.tx(node, self.coordinator.functions.stake(stake))
        models = [self.model_id(cid) for cid in cids]
        peer = f"16Uiu2-{node.address}"
        return self.tx(
            node, self.coordinator.functions.register(peer, ["/ip4/127.0.0.1/tcp/1"], models, 4)
        )

    def node(self, address: str) -> dict[str, Any]:
        fields = ("stake", "unbonding", "release_at", "reputation", "capacity", "registered")
        values = self.coordinator.functions.nodeInfo(address).call()
        return dict(zip(fields, values[:6], strict=True))

    def reputation(self, address: str) -> int:
        return int(self.node(address)["reputation"])

    def earned(self, address: str) -> int:
        return int(self.coordinator.functions.earned(address).call())

    def serving(self, cid: str = MODEL_CID) -> list[str]:
        return list(self.coordinator.functions.nodesServing(self.model_id(cid)).call())

    # ---- models and requests

    def model_id(self, cid: str) -> bytes:
        return keccak(text=cid)

    def add_model(
        self,
        cid: str = MODEL_CID,
        *,
        price: int = PRICE,
        committee_size: int = 3,
        royalties: Sequence[tuple[str, int]] = (),
    ) -> bytes:
        self.tx(
            account(OWNER),
            self.marketplace.functions.registerModel(
                cid,
                price,
                committee_size,
                0,  # Kind.Llm
                [recipient for recipient, _ in royalties],
                [bps for _, bps in royalties],
                ZERO_HASH,
                ZERO_ADDRESS,
            ),
        )
        return self.model_id(cid)

    def request(
        self,
        model: bytes,
        *,
        requester: LocalAccount | None = None,
        price: int = PRICE,
        deadline_s: int = 3600,
        input_hash: bytes = ZERO_HASH,
    ) -> Request:
        requester = requester or account(REQUESTER)
        self.tx(requester, self.token.functions.approve(self.marketplace.address, price))
        deadline = self.now() + deadline_s
        receipt = self.tx(
            requester,
            self.marketplace.functions.requestInference(model, input_hash, price, deadline),
        )
        (event,) = self.events(self.marketplace, "InferenceRequested", receipt)
        return Request(event["requestId"], model, self.draw(event["requestId"]), deadline)

    def draw(self, request_id: bytes) -> list[str]:
        """Draw a request's committee (anyone may, in a later block); the committee."""
        receipt = self.tx(account(STAKER), self.marketplace.functions.drawCommittee(request_id))
        (drawn,) = self.events(self.marketplace, "CommitteeDrawn", receipt)
        return list(drawn["committee"])

    def pending(
        self,
        stakes: Sequence[int],
        committee_size: int = 3,
        royalties: Sequence[tuple[str, int]] = (),
    ) -> Request:
        """Nodes with ``stakes`` serving a new model, and one request for it."""
        for node, amount in zip(node_accounts(len(stakes)), stakes, strict=True):
            self.join(node, amount)
        model = self.add_model(committee_size=committee_size, royalties=royalties)
        return self.request(model)

    def status(self, request_id: bytes) -> int:
        return int(self.marketplace.functions.requestInfo(request_id).call()[5])

    # ---- certificates

    def vote(
        self,
        signer: str | LocalAccount,
        request_id: bytes,
        output: bytes = OUTPUT,
        domain: Eip712Domain | None = None,
    ) -> bytes:
        who = by_address()[signer] if isinstance(signer, str) else signer
        digest = (domain or self.domain).result_digest(request_id, output)
        return sign(node_key_of(who), digest)

    def certify(
        self,
        request_id: bytes,
        signers: Sequence[str],
        signatures: Sequence[bytes] | None = None,
        output: bytes = OUTPUT,
    ) -> TxReceipt:
        if signatures is None:
            signatures = [self.vote(s, request_id, output) for s in signers]
        return self.tx(
            account(SUBMITTER),
            self.poi.functions.submitCertificate(
                request_id, output, list(signers), list(signatures)
            ),
        )

    def commit(self, node: LocalAccount, request_id: bytes, commitment: bytes) -> bytes:
        return sign(node_key_of(node), self.domain.commit_digest(request_id, commitment))


@pytest.fixture(autouse=True, scope="module")
def _quiet_anvil(deployed: Chain) -> None:
    """Stop anvil logging every RPC call: chain_fixtures never reads its output
    after start, and a full stdout pipe would block anvil mid-test."""
    deployed.w3.provider.make_request("anvil_setLoggingEnabled", [False])  # type: ignore[arg-type]  # web3 types the method as an enum


@contextmanager
def snapshot(chain: Chain) -> Iterator[None]:
    """Undo everything done inside the block (one hypothesis example)."""
    snap = chain.w3.provider.make_request("evm_snapshot", [])  # type: ignore[arg-type]  # web3 types the method as an enum
    try:
        yield
    finally:
        chain.w3.provider.make_request("evm_revert", [snap["result"]])  # type: ignore[arg-type]  # as above


# ---------------------------------------------------------------- 1. fee split


def test_settlement_splits_price_exactly(chain: Chain) -> None:
    w = World.of(chain)
    stakes = [1000 * JOY, 2000 * JOY, 1000 * JOY]
    for node, amount in zip(node_accounts(3), stakes, strict=True):
        w.join(node, amount)
    royalty_a, royalty_b = account(ROYALTY_A).address, account(ROYALTY_B).address
    model = w.add_model(royalties=[(royalty_a, 1500), (royalty_b, 250)])
    owner, requester, treasury = account(OWNER), account(REQUESTER), chain.treasury
    watched = [owner.address, royalty_a, royalty_b, treasury, w.coordinator.address]
    before = {a: chain.balance(a) for a in watched}
    requester_before = chain.balance(requester.address)
    market_before = chain.balance(w.marketplace.address)

    req = w.request(model)

    # The price is escrowed at request time.
    assert chain.balance(requester.address) == requester_before - PRICE
    assert chain.balance(w.marketplace.address) == market_before + PRICE
    assert {a: chain.balance(a) for a in watched} == before
    assert len(req.committee) == 3

    signers = req.committee[:2]
    receipt = w.certify(req.request_id, signers)

    delta = {a: chain.balance(a) - before[a] for a in watched}
    # fee 25 JOY: 10 signers, 7.5 stakers, 7.5 treasury; 975 split by royalties and owner
    assert (
        delta[royalty_a] == exact(Fraction(975) * Fraction(1500, 10_000)) == 146_250 * JOY // 1000
    )
    assert delta[royalty_b] == exact(Fraction(975) * Fraction(250, 10_000)) == 24_375 * JOY // 1000
    assert delta[owner.address] == 975 * JOY - delta[royalty_a] - delta[royalty_b]
    assert delta[owner.address] == 804_375 * JOY // 1000
    assert delta[treasury] == 7_500 * JOY // 1000
    assert delta[w.coordinator.address] == 17_500 * JOY // 1000  # signers' 10 + stakers' 7.5
    assert sum(delta.values()) == PRICE
    assert chain.balance(w.marketplace.address) == market_before
    (settled,) = w.events(w.marketplace, "InferenceSettled", receipt)
    assert settled["fee"] == 25 * JOY
    assert settled["toOwner"] == delta[owner.address]
    (distributed,) = w.events(w.coordinator, "RewardsDistributed", receipt)
    assert (distributed["toSigners"], distributed["toStakers"]) == (10 * JOY, 7_500 * JOY // 1000)

    total = sum(stakes)
    stake_of = dict(zip([n.address for n in node_accounts(3)], stakes, strict=True))
    for node in node_accounts(3):
        share = Fraction(15, 2) * Fraction(stake_of[node.address], total)
        signer_share = Fraction(5) if node.address in signers else Fraction(0)
        expected = exact(share + signer_share)
        assert w.earned(node.address) == expected
        balance = chain.balance(node.address)
        claim = w.tx(node, w.coordinator.functions.claimRewards())
        assert chain.balance(node.address) - balance == expected
        (claimed,) = w.events(w.coordinator, "RewardsClaimed", claim)
        assert claimed["amount"] == expected
        assert w.earned(node.address) == 0
    # Only the stake is left in the coordinator.
    assert chain.balance(w.coordinator.address) == int(w.coordinator.functions.totalStaked().call())


def test_signer_share_remainder_goes_to_the_treasury(chain: Chain) -> None:
    w = World.of(chain)
    req = w.pending([1000 * JOY] * 3)
    treasury_before = chain.balance(chain.treasury)
    w.certify(req.request_id, req.committee)  # 3 signers: 10 JOY does not divide by 3
    each = 10 * JOY // 3
    for address in req.committee:
        assert w.earned(address) == each + 7_500 * JOY // 1000 // 3
    dust = 10 * JOY - 3 * each
    assert dust == 1
    assert chain.balance(chain.treasury) - treasury_before == 7_500 * JOY // 1000 + dust


def test_odd_price_is_paid_out_to_the_last_wei(chain: Chain) -> None:
    """Rounding never creates or loses JOY: every part is its exact share rounded
    down, the treasury and the owner absorb the remainders."""
    w = World.of(chain)
    price = PRICE + 7
    for node in node_accounts(3):
        w.join(node, 1000 * JOY)
    royalty_a, royalty_b = account(ROYALTY_A).address, account(ROYALTY_B).address
    model = w.add_model(price=price, royalties=[(royalty_a, 1501), (royalty_b, 333)])
    watched = [account(OWNER).address, royalty_a, royalty_b, chain.treasury]
    watched.append(w.coordinator.address)
    before = {a: chain.balance(a) for a in watched}
    req = w.request(model, price=price)
    w.certify(req.request_id, req.committee)  # 3 signers
    delta = {a: chain.balance(a) - before[a] for a in watched}
    assert sum(delta.values()) == price
    fee = Fraction(price * 250, 10_000)
    exact_shares = {
        royalty_a: (price - fee) * Fraction(1501, 10_000),
        royalty_b: (price - fee) * Fraction(333, 10_000),
        w.coordinator.address: fee * Fraction(7, 10),  # signers' 40 % and stakers' 30 %
    }
    for address, share in exact_shares.items():
        assert share - 2 < delta[address] <= share, address
    earned = sum(w.earned(a) for a in req.committee)
    assert delta[w.coordinator.address] - 3 <= earned <= delta[w.coordinator.address]


# ------------------------------------------------------- 2. staking rewards


def test_staking_rewards_are_pro_rata_to_active_stake(chain: Chain) -> None:
    w = World.of(chain)
    a, b, c = node_accounts(3)
    d = account(STAKER)  # stakes without running a node
    w.join(a, 1000 * JOY)  # the only node serving the model: every committee is [a]
    w.join(b, 3000 * JOY, cids=[OTHER_CID])
    w.tx(d, w.token.functions.approve(w.coordinator.address, 1000 * JOY))
    w.tx(d, w.coordinator.functions.stake(1000 * JOY))
    model = w.add_model(committee_size=1)
    expected: dict[str, Fraction] = {x.address: Fraction(0) for x in (a, b, c, d)}

    def settle_one(active: dict[str, int]) -> None:
        req = w.request(model)
        assert req.committee == [a.address]
        w.certify(req.request_id, req.committee)
        expected[a.address] += 10  # the signer's share
        total = sum(active.values())
        assert int(w.coordinator.functions.totalStaked().call()) == total * JOY
        for address, amount in active.items():
            expected[address] += Fraction(15, 2) * Fraction(amount, total)
        for address, value in expected.items():
            assert w.earned(address) == exact(value), address

    settle_one({a.address: 1000, b.address: 3000, d.address: 1000})
    # c joins later; d leaves completely (its stake unbonds and earns nothing more).
    w.join(c, 2000 * JOY, cids=[OTHER_CID])
    w.tx(d, w.coordinator.functions.unstake(1000 * JOY))
    settle_one({a.address: 1000, b.address: 3000, c.address: 2000})
    # b claims in between, then unstakes part of its stake.
    balance = chain.balance(b.address)
    w.tx(b, w.coordinator.functions.claimRewards())
    assert chain.balance(b.address) - balance == exact(expected[b.address])
    expected[b.address] = Fraction(0)
    w.tx(b, w.coordinator.functions.unstake(1000 * JOY))
    settle_one({a.address: 1000, b.address: 2000, c.address: 2000})

    assert {k: exact(v) for k, v in expected.items()} == {
        a.address: exact(Fraction(30) + Fraction(3) / 2 + Fraction(5) / 4 + Fraction(3) / 2),
        b.address: 3 * JOY,
        c.address: exact(Fraction(5) / 2 + Fraction(3)),
        d.address: exact(Fraction(3) / 2),
    }
    for staker in (a, b, c, d):
        earned = w.earned(staker.address)
        balance = chain.balance(staker.address)
        w.tx(staker, w.coordinator.functions.claimRewards())
        assert chain.balance(staker.address) - balance == earned == exact(expected[staker.address])
        assert w.earned(staker.address) == 0
        balance = chain.balance(staker.address)
        w.tx(staker, w.coordinator.functions.claimRewards())  # nothing left to claim
        assert chain.balance(staker.address) == balance
    # Every reward divided exactly: the coordinator holds stakes and unbonding stakes only.
    held = sum(w.node(x.address)["stake"] + w.node(x.address)["unbonding"] for x in (a, b, c, d))
    assert chain.balance(w.coordinator.address) == held == 7000 * JOY


# --------------------------------------------------------- 3. certificates


def test_certificate_accepted_updates_reputation_and_usage(chain: Chain) -> None:
    w = World.of(chain)
    req = w.pending([1000 * JOY] * 5, committee_size=5)
    assert len(req.committee) == 5
    signers = list(reversed(req.committee[2:]))  # any order of committee members
    receipt = w.certify(req.request_id, signers)

    assert w.status(req.request_id) == 2  # Settled
    assert w.poi.functions.verifiedOutput(req.request_id).call() == OUTPUT
    (verified,) = w.events(w.poi, "InferenceVerified", receipt)
    assert verified["requestId"] == req.request_id
    assert verified["outputHash"] == OUTPUT
    assert list(verified["signers"]) == signers
    agree = int(w.poi.functions.agreeReward().call())
    miss = int(w.poi.functions.missPenalty().call())
    assert (agree, miss) == (10, 20)
    for address in req.committee:
        change = agree if address in signers else -miss
        assert w.reputation(address) == 1000 + change
    changes = w.events(w.coordinator, "ReputationChanged", receipt)
    assert len(changes) == 5

    requester = account(REQUESTER).address
    (usage,) = w.events(w.pou, "UsageRecorded", receipt)
    assert usage == {"requestId": req.request_id, "model": req.model, "user": requester, "units": 1}
    model, user, units, timestamp = w.pou.functions.usageOf(req.request_id).call()
    block = chain.w3.eth.get_block(receipt["blockNumber"])
    assert (model, user, units, timestamp) == (req.model, requester, 1, block["timestamp"])

    def counters() -> tuple[int, ...]:
        f = w.pou.functions
        return (
            f.unitsByModel(req.model).call(),
            f.unitsByUser(requester).call(),
            f.requestsByModel(req.model).call(),
            f.requestsByUser(requester).call(),
            f.totalRecords().call(),
        )

    assert counters() == (1, 1, 1, 1, 1)
    # Recorded once: the certificate cannot be replayed, nor the record repeated.
    with reverts(f"NotPending(requestId=0x{req.request_id.hex()})"):
        w.certify(req.request_id, signers)
    recorder = account(OUTSIDER)
    chain.as_timelock(w.pou.functions.grantRole(role("RECORDER_ROLE"), recorder.address))
    with reverts(f"ProofOfUse.AlreadyRecorded(requestId=0x{req.request_id.hex()})"):
        w.tx(recorder, w.pou.functions.record(req.model, requester, 1, req.request_id))
    assert counters() == (1, 1, 1, 1, 1)
    assert all(w.reputation(a) == 1000 + (agree if a in signers else -miss) for a in req.committee)


def test_two_of_three_is_a_majority(chain: Chain) -> None:
    w = World.of(chain)
    req = w.pending([1000 * JOY] * 3)
    w.certify(req.request_id, req.committee[1:])
    assert w.status(req.request_id) == 2
    assert [w.reputation(a) for a in req.committee] == [980, 1010, 1010]


CERTIFICATE_REJECTIONS = [
    "not-in-committee",
    "outsider-not-a-node",
    "one-of-three",
    "two-of-four",
    "duplicate-signer",
    "other-output",
    "signed-by-someone-else",
    "short-signature",
    "replay",
    "expired",
    "other-chain-id",
    "other-contract",
    "length-mismatch",
]


@pytest.mark.parametrize("case", CERTIFICATE_REJECTIONS)
def test_certificate_rejected(chain: Chain, case: str) -> None:
    w = World.of(chain)
    committee_size = 4 if case == "two-of-four" else 3
    req = w.pending([1000 * JOY] * 5, committee_size=committee_size)
    rid, committee = req.request_id, req.committee
    assert len(committee) == committee_size
    c0, c1 = committee[0], committee[1]
    outsider_node = next(n.address for n in node_accounts(5) if n.address not in committee)
    valid = [w.vote(c0, rid), w.vote(c1, rid)]
    signers: list[str] = [c0, c1]
    signatures = valid
    chain_id = chain.w3.eth.chain_id

    if case == "not-in-committee":
        signers, signatures = [c0, outsider_node], [valid[0], w.vote(outsider_node, rid)]
        reason = f"ProofOfInference.NotInCommittee(signer={outsider_node.lower()})"
    elif case == "outsider-not-a-node":
        stranger = account(OUTSIDER)
        signers, signatures = [stranger.address, c0], [w.vote(stranger, rid), valid[0]]
        reason = f"ProofOfInference.NotInCommittee(signer={stranger.address.lower()})"
    elif case == "one-of-three":
        signers, signatures = [c0], valid[:1]
        reason = "ProofOfInference.NoMajority(signers=1, committee=3)"
    elif case == "two-of-four":
        reason = "ProofOfInference.NoMajority(signers=2, committee=4)"
    elif case == "duplicate-signer":
        signers, signatures = [c0, c0], [valid[0], valid[0]]
        reason = f"ProofOfInference.DuplicateSigner(signer={c0.lower()})"
    elif case == "other-output":
        signatures = [valid[0], w.vote(c1, rid, output=keccak(b"another output"))]
        reason = f"ProofOfInference.BadSignature(signer={c1.lower()})"
    elif case == "signed-by-someone-else":
        signatures = [valid[0], w.vote(account(STRANGER), rid)]
        reason = f"ProofOfInference.BadSignature(signer={c1.lower()})"
    elif case == "short-signature":
        signatures = [valid[0], valid[1][:64]]
        reason = f"ProofOfInference.BadSignature(signer={c1.lower()})"
    elif case == "replay":
        w.certify(rid, signers, signatures)
        reason = f"NotPending(requestId=0x{rid.hex()})"
    elif case == "expired":
        chain.advance(3601)
        reason = f"ProofOfInference.Expired(deadline={req.deadline})"
    elif case == "other-chain-id":
        domain = Eip712Domain(chain_id + 1, w.poi.address)
        signatures = [w.vote(c0, rid, domain=domain), w.vote(c1, rid, domain=domain)]
        reason = f"ProofOfInference.BadSignature(signer={c0.lower()})"
    elif case == "other-contract":
        domain = Eip712Domain(chain_id, w.marketplace.address)
        signatures = [w.vote(c0, rid, domain=domain), w.vote(c1, rid, domain=domain)]
        reason = f"ProofOfInference.BadSignature(signer={c0.lower()})"
    elif case == "length-mismatch":
        signatures = valid[:1]
        reason = "ProofOfInference.LengthMismatch()"
    else:  # pragma: no cover
        raise AssertionError(case)

    reputations = {a: w.reputation(a) for a in committee}
    escrow = chain.balance(w.marketplace.address)
    records = w.pou.functions.totalRecords().call()
    with reverts(reason):
        w.certify(rid, signers, signatures)
    # A rejected certificate changes nothing.
    assert {a: w.reputation(a) for a in committee} == reputations
    assert chain.balance(w.marketplace.address) == escrow
    assert w.pou.functions.totalRecords().call() == records
    if case in ("replay", "expired"):
        return
    assert w.status(rid) == 1  # still Pending: a valid certificate is accepted afterwards
    w.certify(rid, committee[: len(committee) // 2 + 1])
    assert w.status(rid) == 2


# ----------------------------------------------------------- 4. equivocation


def test_equivocation_slashes_the_whole_stake(chain: Chain) -> None:
    w = World.of(chain)
    nodes = node_accounts(4)
    cheat = nodes[0]
    w.join(cheat, 1200 * JOY)
    for node in nodes[1:]:
        w.join(node, 1000 * JOY)
    w.tx(cheat, w.coordinator.functions.unstake(200 * JOY))  # 1000 active + 200 unbonding
    model = w.add_model(committee_size=4)
    req = w.request(model)
    assert cheat.address in req.committee
    rid = req.request_id
    commit_a, commit_b = keccak(b"commitment a"), keccak(b"commitment b")
    sig_a, sig_b = w.commit(cheat, rid, commit_a), w.commit(cheat, rid, commit_b)
    reporter, treasury = account(REPORTER), chain.treasury

    def report(a: bytes, sa: bytes, b: bytes, sb: bytes) -> TxReceipt:
        call = w.poi.functions.reportEquivocation(cheat.address, rid, a, sa, b, sb)
        return w.tx(reporter, call)

    # Invalid evidence first: none of it slashes anything.
    with reverts("ProofOfInference.SameCommitment()"):
        report(commit_a, sig_a, commit_a, sig_a)
    forged = w.commit(account(STRANGER), rid, commit_b)
    bad = f"ProofOfInference.BadSignature(signer={cheat.address.lower()})"
    with reverts(bad):
        report(commit_a, sig_a, commit_b, forged)
    with reverts(bad):  # a result vote is no commit (typed data keeps them apart)
        report(commit_a, sig_a, commit_b, w.vote(cheat, rid, output=commit_b))
    with reverts(bad):  # a commit for another request
        report(commit_a, sig_a, commit_b, w.commit(cheat, keccak(b"other"), commit_b))
    assert w.node(cheat.address)["stake"] == 1000 * JOY

    before = {a: chain.balance(a) for a in (reporter.address, treasury, w.coordinator.address)}
    total_staked = int(w.coordinator.functions.totalStaked().call())
    receipt = report(commit_a, sig_a, commit_b, sig_b)

    to_reporter = 1200 * JOY * 1000 // 10_000
    assert chain.balance(reporter.address) - before[reporter.address] == to_reporter == 120 * JOY
    assert chain.balance(treasury) - before[treasury] == 1080 * JOY
    assert before[w.coordinator.address] - chain.balance(w.coordinator.address) == 1200 * JOY
    assert int(w.coordinator.functions.totalStaked().call()) == total_staked - 1000 * JOY
    (slashed,) = w.events(w.coordinator, "Slashed", receipt)
    assert slashed == {
        "node": cheat.address,
        "reporter": reporter.address,
        "amount": 1200 * JOY,
        "toReporter": to_reporter,
    }
    assert len(w.events(w.coordinator, "Deregistered", receipt)) == 1
    assert len(w.events(w.poi, "EquivocationReported", receipt)) == 1
    info = w.node(cheat.address)
    assert (info["stake"], info["unbonding"], info["reputation"], info["registered"]) == (
        0,
        0,
        0,
        False,
    )
    assert w.poi.functions.equivocationReported(cheat.address, rid).call() is True
    assert w.coordinator.functions.isActive(cheat.address).call() is False
    assert cheat.address not in w.serving()
    # Reported once only, with the same or other evidence.
    already = (
        f"ProofOfInference.AlreadyReported(node={cheat.address.lower()}, requestId=0x{rid.hex()})"
    )
    with reverts(already):
        report(commit_a, sig_a, commit_b, sig_b)
    commit_c = keccak(b"commitment c")
    with reverts(already):
        report(commit_a, sig_a, commit_c, w.commit(cheat, rid, commit_c))

    # Never selected again, whatever the request: with three nodes left, a model
    # that wants four cannot be requested at all (no smaller committee certifies).
    with reverts(f"ModelMarketplace.NoCommittee(model=0x{model.hex()})"):
        w.request(model)
    for i in range(8):
        rid_i = keccak(b"request" + bytes([i]))
        selected = w.coordinator.functions.selectCommittee(model, rid_i, 16).call()
        assert cheat.address not in selected
    # The request it was drawn for still settles through the honest majority; the
    # slashed node's reputation stays at zero.
    honest = [a for a in req.committee if a != cheat.address]
    w.certify(rid, honest)
    assert w.reputation(cheat.address) == 0
    assert w.status(rid) == 2
    chain.advance(UNBONDING_S + 1)
    with reverts("NodeCoordinator.NothingToWithdraw()"):  # the unbonding part went too
        w.tx(cheat, w.coordinator.functions.withdraw())


def test_registering_again_does_not_restore_reputation(chain: Chain) -> None:
    """Reputation changes only through certificates: a slashed node, or one whose
    reputation fell to zero, that stakes and registers again stays at zero."""
    w = World.of(chain)
    cheat, sloppy, honest = node_accounts(3)
    for node in (cheat, sloppy, honest):
        w.join(node, 1000 * JOY)
    model = w.add_model(committee_size=3)
    rid, a, b = keccak(b"any request"), keccak(b"a"), keccak(b"b")
    evidence = (a, w.commit(cheat, rid, a), b, w.commit(cheat, rid, b))
    w.tx(account(REPORTER), w.poi.functions.reportEquivocation(cheat.address, rid, *evidence))
    adjuster, coordinator = account(OUTSIDER), w.coordinator.functions
    chain.as_timelock(coordinator.grantRole(role("REPUTATION_ROLE"), adjuster.address))
    w.tx(adjuster, coordinator.adjustReputation(sloppy.address, -1000))  # as 50 missed votes would
    w.tx(sloppy, coordinator.unstake(1000 * JOY))  # leaves (deregistered) ...
    assert w.node(sloppy.address)["registered"] is False

    w.join(cheat, 1000 * JOY)  # ... and both come back with fresh stake
    w.join(sloppy, 1000 * JOY)
    for node in (cheat, sloppy):
        assert w.node(node.address)["registered"] is True
        assert w.reputation(node.address) == 0
    for i in range(8):
        request_id = keccak(b"request" + bytes([i]))
        assert coordinator.selectCommittee(model, request_id, 16).call() == [honest.address]
    with reverts(f"ModelMarketplace.NoCommittee(model=0x{model.hex()})"):  # 1 eligible < 3
        w.request(model)


# ---------------------------------------------------------------- 5. unbonding


def test_a_transaction_that_runs_out_of_gas_says_so(chain: Chain) -> None:
    w = World.of(chain)
    node = account(2)
    w.tx(node, w.token.functions.approve(w.coordinator.address, 300 * JOY))
    # gas=1 leaves only the sender's headroom (50,000): a stake needs more.
    with pytest.raises(TransactionFailed, match=r"^transaction 0x[0-9a-f]{64} ran out of gas"):
        chain.sender(node).transact(w.coordinator.functions.stake(300 * JOY), gas=1)
    assert w.node(node.address)["stake"] == 0


def test_unbonding_delay_and_deregistration(chain: Chain) -> None:
    w = World.of(chain)
    node = account(2)
    w.join(node, 300 * JOY)
    with reverts("OutOfBounds(parameter=amount)"):
        w.tx(node, w.coordinator.functions.unstake(0))
    with reverts("OutOfBounds(parameter=amount)"):
        w.tx(node, w.coordinator.functions.unstake(301 * JOY))
    with reverts("NodeCoordinator.NothingToWithdraw()"):
        w.tx(node, w.coordinator.functions.withdraw())

    receipt = w.tx(node, w.coordinator.functions.unstake(100 * JOY))
    (started,) = w.events(w.coordinator, "UnbondingStarted", receipt)
    release_at = chain.w3.eth.get_block(receipt["blockNumber"])["timestamp"] + UNBONDING_S
    assert started["releaseAt"] == release_at
    info = w.node(node.address)
    assert (info["stake"], info["unbonding"], info["release_at"]) == (
        200 * JOY,
        100 * JOY,
        release_at,
    )
    assert info["registered"] is True
    assert node.address in w.serving()  # still above the minimum: still serving

    chain.advance(UNBONDING_S - 600)
    with reverts(f"NodeCoordinator.StillUnbonding(releaseAt={release_at})"):
        w.tx(node, w.coordinator.functions.withdraw())
    chain.advance(600)
    balance = chain.balance(node.address)
    receipt = w.tx(node, w.coordinator.functions.withdraw())
    assert chain.balance(node.address) - balance == 100 * JOY
    (withdrawn,) = w.events(w.coordinator, "Withdrawn", receipt)
    assert withdrawn["amount"] == 100 * JOY
    with reverts("NodeCoordinator.NothingToWithdraw()"):
        w.tx(node, w.coordinator.functions.withdraw())

    # Falling below the minimum stake deregisters the node.
    receipt = w.tx(node, w.coordinator.functions.unstake(150 * JOY))
    assert len(w.events(w.coordinator, "Deregistered", receipt)) == 1
    info = w.node(node.address)
    assert (info["stake"], info["unbonding"], info["registered"]) == (50 * JOY, 150 * JOY, False)
    assert w.coordinator.functions.isActive(node.address).call() is False
    assert node.address not in w.serving()
    with reverts(f"NodeCoordinator.StakeTooLow(stake={50 * JOY}, minimum={MIN_STAKE})"):
        w.join(node, 0)
    chain.advance(UNBONDING_S)
    balance = chain.balance(node.address)
    w.tx(node, w.coordinator.functions.withdraw())
    assert chain.balance(node.address) - balance == 150 * JOY


# ------------------------------------------------------------------ 6. refunds


def test_refund_only_after_deadline_and_only_once(chain: Chain) -> None:
    w = World.of(chain)
    requester = account(REQUESTER)
    before = chain.balance(requester.address)
    req = w.pending([1000 * JOY] * 3)
    assert chain.balance(requester.address) == before - PRICE
    refund = w.marketplace.functions.refund(req.request_id)
    with reverts(f"ModelMarketplace.DeadlineNotReached(deadline={req.deadline})"):
        w.tx(account(OUTSIDER), refund)

    chain.advance(3601)
    receipt = w.tx(account(OUTSIDER), refund)  # anyone may trigger it; the requester is paid
    assert chain.balance(requester.address) == before
    (refunded,) = w.events(w.marketplace, "InferenceRefunded", receipt)
    assert refunded == {"requestId": req.request_id, "amount": PRICE}
    assert w.status(req.request_id) == 3  # Refunded
    not_pending = f"NotPending(requestId=0x{req.request_id.hex()})"
    with reverts(not_pending):
        w.tx(requester, refund)
    with reverts(not_pending):
        w.certify(req.request_id, req.committee)
    assert chain.balance(requester.address) == before


def test_no_refund_after_settlement(chain: Chain) -> None:
    w = World.of(chain)
    req = w.pending([1000 * JOY] * 3)
    w.certify(req.request_id, req.committee[:2])
    chain.advance(3601)
    with reverts(f"NotPending(requestId=0x{req.request_id.hex()})"):
        w.tx(account(REQUESTER), w.marketplace.functions.refund(req.request_id))


def test_request_validation(chain: Chain) -> None:
    w = World.of(chain)
    requester = account(REQUESTER)
    model = w.add_model()
    deadline = w.now() + 3600
    market = w.marketplace.functions
    w.tx(requester, w.token.functions.approve(w.marketplace.address, PRICE))
    with reverts(f"ModelMarketplace.NoCommittee(model=0x{model.hex()})"):
        w.tx(requester, market.requestInference(model, ZERO_HASH, PRICE, deadline))
    w.join(account(2), 1000 * JOY)
    with reverts(f"ModelMarketplace.PriceAboveMax(price={PRICE}, maxPrice={PRICE - 1})"):
        w.tx(requester, market.requestInference(model, ZERO_HASH, PRICE - 1, deadline))
    with reverts("ModelMarketplace.DeadlinePassed()"):
        w.tx(requester, market.requestInference(model, ZERO_HASH, PRICE, w.now() - 1))
    unknown = w.model_id("bafy-unknown")
    with reverts(f"ModelMarketplace.UnknownModel(model=0x{unknown.hex()})"):
        w.tx(requester, market.requestInference(unknown, ZERO_HASH, PRICE, deadline))
    w.tx(account(OWNER), market.updateModel(model, PRICE, False))
    with reverts(f"ModelMarketplace.UnknownModel(model=0x{model.hex()})"):
        w.tx(requester, market.requestInference(model, ZERO_HASH, PRICE, deadline))


# ------------------------------------------------------- 7. access control


def test_parameters_need_governance(chain: Chain) -> None:
    w = World.of(chain)
    intruder, treasury = account(OUTSIDER), chain.treasury
    calls = [
        w.coordinator.functions.setParameters(MIN_STAKE, UNBONDING_S, 1000, intruder.address),
        w.marketplace.functions.setParameters(1000, 10_000, 0, intruder.address),
        w.poi.functions.setParameters(1000, 0),
    ]
    for call in calls:
        with reverts(unauthorized(intruder, "DEFAULT_ADMIN_ROLE")):
            w.tx(intruder, call)
    assert w.coordinator.functions.treasury().call() == treasury
    assert w.marketplace.functions.feeBps().call() == 250


@pytest.mark.parametrize(
    ("contract", "call", "reason"),
    [
        ("coordinator", (0, UNBONDING_S, 1000, "treasury"), "minStake"),
        ("coordinator", (MIN_STAKE, 30 * 86400 + 1, 1000, "treasury"), "unbondingDelay"),
        ("coordinator", (MIN_STAKE, 59, 1000, "treasury"), "unbondingDelay"),
        ("coordinator", (MIN_STAKE, UNBONDING_S, 5001, "treasury"), "reporterShareBps"),
        ("coordinator", (MIN_STAKE, UNBONDING_S, 1000, ZERO_ADDRESS), "treasury"),
        ("marketplace", (1001, 4000, 3000, "treasury"), "feeBps"),
        ("marketplace", (250, 6000, 4001, "treasury"), "split"),
        ("marketplace", (250, 4000, 3000, ZERO_ADDRESS), "treasury"),
        ("poi", (-1, 20), "agreeReward"),
        ("poi", (1001, 20), "agreeReward"),
        ("poi", (10, -1), "missPenalty"),
        ("poi", (10, 1001), "missPenalty"),
    ],
)
def test_parameters_out_of_bounds(
    chain: Chain, contract: str, call: tuple[Any, ...], reason: str
) -> None:
    w = World.of(chain)
    target: Contract = getattr(w, contract)
    args = [chain.treasury if a == "treasury" else a for a in call]
    with reverts(f"OutOfBounds(parameter={reason})"):
        chain.as_timelock(target.functions.setParameters(*args))


def test_parameters_at_their_bounds_are_accepted(chain: Chain) -> None:
    w = World.of(chain)
    treasury = chain.treasury
    chain.as_timelock(w.coordinator.functions.setParameters(1, 30 * 86400, 5000, treasury))
    chain.as_timelock(w.marketplace.functions.setParameters(1000, 10_000, 0, treasury))
    chain.as_timelock(w.poi.functions.setParameters(1000, 1000))
    assert w.coordinator.functions.minStake().call() == 1
    assert w.coordinator.functions.unbondingDelay().call() == 30 * 86400
    assert w.coordinator.functions.reporterShareBps().call() == 5000
    assert w.marketplace.functions.feeBps().call() == 1000
    assert w.poi.functions.agreeReward().call() == 1000


def test_changed_parameters_apply_to_the_next_settlement(chain: Chain) -> None:
    w = World.of(chain)
    new_treasury = account(STRANGER).address
    receipt = chain.as_timelock(
        w.marketplace.functions.setParameters(500, 5000, 2000, new_treasury)
    )
    (changed,) = w.events(w.marketplace, "ParametersChanged", receipt)
    assert changed == {
        "feeBps": 500,
        "signersBps": 5000,
        "stakersBps": 2000,
        "treasury": new_treasury,
    }
    chain.as_timelock(w.poi.functions.setParameters(7, 3))
    chain.as_timelock(w.coordinator.functions.setParameters(MIN_STAKE, 60, 2500, new_treasury))
    assert w.coordinator.functions.unbondingDelay().call() == 60
    req = w.pending([1000 * JOY] * 4)
    owner = account(OWNER).address
    owner_before = chain.balance(owner)
    w.certify(req.request_id, req.committee[:2])

    # fee 5 % = 50 JOY: 25 to signers, 10 to stakers, 15 to the new treasury
    assert chain.balance(owner) - owner_before == 950 * JOY
    assert chain.balance(new_treasury) == 15 * JOY
    for address in req.committee:
        signer = address in req.committee[:2]
        assert w.earned(address) == (12_500 if signer else 0) * JOY // 1000 + 10 * JOY // 4
        assert w.reputation(address) == (1007 if signer else 997)

    # The new reporter share and treasury apply to the next slash.
    cheat, rid = by_address()[req.committee[0]], req.request_id
    a, b = keccak(b"a"), keccak(b"b")
    evidence = (a, w.commit(cheat, rid, a), b, w.commit(cheat, rid, b))
    reporter_before = chain.balance(account(REPORTER).address)
    unclaimed = w.earned(cheat.address)  # 12.5 as a signer + 2.5 as a staker
    assert unclaimed == 15 * JOY
    w.tx(account(REPORTER), w.poi.functions.reportEquivocation(cheat.address, rid, *evidence))
    assert chain.balance(account(REPORTER).address) - reporter_before == 250 * JOY
    # The treasury gets the rest of the stake and the cheat's unclaimed rewards.
    assert chain.balance(new_treasury) == 15 * JOY + 750 * JOY + unclaimed
    assert w.earned(cheat.address) == 0


def test_internal_calls_need_their_roles(chain: Chain) -> None:
    w = World.of(chain)
    req = w.pending([1000 * JOY] * 3)
    node = req.committee[0]
    coordinator, market = w.coordinator.functions, w.marketplace.functions
    calls: list[tuple[Any, str]] = [
        (coordinator.adjustReputation(node, 500), "REPUTATION_ROLE"),
        (coordinator.slash(node, chain.admin.address), "SLASHER_ROLE"),
        (coordinator.distribute([node], 0, 0), "DISTRIBUTOR_ROLE"),
        (market.settle(req.request_id, [node], 1), "SETTLER_ROLE"),
        (w.pou.functions.record(req.model, node, 1, req.request_id), "RECORDER_ROLE"),
    ]
    # Neither an outsider nor the deployer (which renounced every role)
    for caller in (account(OUTSIDER), chain.admin):
        for call, role_name in calls:
            with reverts(unauthorized(caller, role_name)):
                w.tx(caller, call)
    for grant in (coordinator.grantRole, market.grantRole, w.pou.functions.grantRole):
        with reverts(unauthorized(account(OUTSIDER), "DEFAULT_ADMIN_ROLE")):
            w.tx(account(OUTSIDER), grant(role("SETTLER_ROLE"), account(OUTSIDER).address))
    assert w.reputation(node) == 1000
    assert w.status(req.request_id) == 1
    assert w.node(node)["stake"] == 1000 * JOY

    # A role holder can: governance grants the reputation role.
    holder = account(OUTSIDER)
    chain.as_timelock(coordinator.grantRole(role("REPUTATION_ROLE"), holder.address))
    w.tx(holder, coordinator.adjustReputation(node, 500))
    assert w.reputation(node) == 1500
    w.tx(holder, coordinator.adjustReputation(node, 20_000))
    assert w.reputation(node) == 10_000  # capped at MAX_REPUTATION
    w.tx(holder, coordinator.adjustReputation(node, -20_000))
    assert w.reputation(node) == 0


# ------------------------------------------------------------------ 8. permit


def permit_signature(
    w: World,
    owner: LocalAccount,
    value: int,
    deadline: int,
    signer: LocalAccount | None = None,
    spender: str | None = None,
) -> tuple[int, bytes, bytes]:
    """An EIP-2612 permit for ``spender`` (the marketplace) to spend ``value`` of ``owner``'s
    JOY."""
    nonce = int(w.token.functions.nonces(owner.address).call())
    permit = Permit(
        w.chain.w3.eth.chain_id,
        w.token.address,
        owner.address,
        spender or w.marketplace.address,
        value,
        nonce,
        deadline,
    )
    return sign_permit(signer or owner, permit)


def test_request_with_permit(chain: Chain) -> None:
    w = World.of(chain)
    for node in node_accounts(3):
        w.join(node, 1000 * JOY)
    model = w.add_model()
    requester = account(REQUESTER)
    allowance = w.token.functions.allowance(requester.address, w.marketplace.address)
    assert allowance.call() == 0
    before = chain.balance(requester.address)
    deadline = w.now() + 3600
    max_price = PRICE + 5 * JOY

    def request(signature: tuple[int, bytes, bytes], permit_deadline: int = deadline) -> Any:
        call = w.marketplace.functions.requestInferenceWithPermit(
            model, ZERO_HASH, max_price, deadline, permit_deadline, *signature
        )
        return w.tx(requester, call)

    # A permit signed by someone else, or expired, gives no allowance, so the escrow fails.
    def no_allowance(allowed: int) -> str:
        return (
            f"ERC20InsufficientAllowance(spender={w.marketplace.address.lower()}, "
            f"allowance={allowed}, needed={PRICE})"
        )

    stranger = account(STRANGER)
    with reverts(no_allowance(0)):
        request(permit_signature(w, requester, max_price, deadline, signer=stranger))
    expired = w.now() - 1
    with reverts(no_allowance(0)):
        request(permit_signature(w, requester, max_price, expired), permit_deadline=expired)

    # Someone front-runs the permit itself: the request still goes through.
    signature = permit_signature(w, requester, max_price, deadline)
    w.tx(
        chain.admin,
        w.token.functions.permit(
            requester.address, w.marketplace.address, max_price, deadline, *signature
        ),
    )
    receipt = request(signature)
    (event,) = w.events(w.marketplace, "InferenceRequested", receipt)
    assert event["requester"] == requester.address
    assert event["price"] == PRICE
    committee = w.draw(event["requestId"])
    assert len(committee) == 3
    assert chain.balance(requester.address) == before - PRICE
    assert w.token.functions.nonces(requester.address).call() == 1
    assert allowance.call() == max_price - PRICE
    with reverts(no_allowance(max_price - PRICE)):  # the used permit adds nothing
        request(signature)
    # The request settles like any other.
    w.certify(event["requestId"], committee[:2])
    assert w.status(event["requestId"]) == 2


# ---------------------------------------------------------------- 9. committee

NODE_DRAW = st.tuples(
    st.integers(MIN_STAKE, 4000 * JOY),  # stake
    st.one_of(st.just(-1000), st.just(0), st.integers(-999, 9000)),  # reputation change
    st.sampled_from([True, True, True, False]),  # serves the model (mostly)
)


@pytest.fixture
def committee_world(chain: Chain) -> World:
    """Node accounts with allowances, and the deployer's key allowed to change reputation."""
    w = World.of(chain)
    for node in node_accounts(MAX_NODES):
        w.tx(node, w.token.functions.approve(w.coordinator.address, 10**30))
    w.tx(account(REQUESTER), w.token.functions.approve(w.marketplace.address, 10**30))
    grant = w.coordinator.functions.grantRole(role("REPUTATION_ROLE"), chain.admin.address)
    chain.as_timelock(grant)
    return w


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    draws=st.lists(NODE_DRAW, min_size=1, max_size=MAX_NODES),
    min_stake=st.sampled_from([MIN_STAKE, 500 * JOY, 2000 * JOY]),
    queries=st.lists(
        st.tuples(st.binary(min_size=32, max_size=32), st.integers(1, 5)), min_size=1, max_size=4
    ),
    committee_size=st.integers(1, 5),
    input_hash=st.binary(min_size=32, max_size=32),
)
def test_committee_matches_off_chain_selection(
    committee_world: World,
    draws: list[tuple[int, int, bool]],
    min_stake: int,
    queries: list[tuple[bytes, int]],
    committee_size: int,
    input_hash: bytes,
) -> None:
    w = committee_world
    admin, coordinator = w.chain.admin, w.coordinator.functions
    model = w.model_id(MODEL_CID)
    with snapshot(w.chain):
        for node, (stake, change, serves) in zip(node_accounts(len(draws)), draws, strict=True):
            w.tx(node, coordinator.stake(stake))
            models = [model] if serves else [w.model_id(OTHER_CID)]
            w.tx(node, coordinator.register("peer", [], models, 1))
            if change:
                w.tx(admin, coordinator.adjustReputation(node.address, change))
        if min_stake != MIN_STAKE:  # leaves the smaller stakes registered but inactive
            treasury = w.chain.treasury
            w.chain.as_timelock(coordinator.setParameters(min_stake, UNBONDING_S, 1000, treasury))

        candidates = []
        for address in coordinator.nodesServing(model).call():
            stake, _, _, reputation, *_ = coordinator.nodeInfo(address).call()
            candidates.append(Candidate(address, stake, reputation))
        assert len(candidates) == sum(serves for _, _, serves in draws)
        for request_id, k in queries:
            expected = select_committee(candidates, request_id, k, min_stake)
            assert coordinator.selectCommittee(model, request_id, k).call() == expected

        # The committee the marketplace stores with a real request is the same one.
        w.add_model(committee_size=committee_size)
        nonce = w.marketplace.functions.requestNonces(account(REQUESTER).address).call()
        deadline = w.now() + 3600
        call = w.marketplace.functions.requestInference(model, input_hash, PRICE, deadline)
        eligible = len(select_committee(candidates, ZERO_HASH, 16, min_stake))
        if eligible < committee_size:  # too few eligible nodes for the committee asked
            with reverts(f"ModelMarketplace.NoCommittee(model=0x{model.hex()})"):
                w.tx(account(REQUESTER), call)
            return
        (event,) = w.events(w.marketplace, "InferenceRequested", w.tx(account(REQUESTER), call))
        assert w.marketplace.functions.requestNonces(account(REQUESTER).address).call() == nonce + 1
        receipt = w.tx(account(STAKER), w.marketplace.functions.drawCommittee(event["requestId"]))
        (drawn,) = w.events(w.marketplace, "CommitteeDrawn", receipt)
        expected = select_committee(candidates, drawn["seed"], committee_size, min_stake)
        assert list(drawn["committee"]) == expected


def test_a_models_owner_sets_its_verification_policy_within_bounds(chain: Chain) -> None:
    w = World.of(chain)
    model = w.add_model()
    market = w.marketplace
    assert list(market.functions.verificationOf(model).call()) == [0, 0, 0, 0]  # replicate
    receipt = w.tx(account(OWNER), market.functions.setVerification(model, (1, 500, 200, 5000)))
    assert list(market.functions.verificationOf(model).call()) == [1, 500, 200, 5000]
    (changed,) = market.events.VerificationChanged().process_receipt(receipt, errors=DISCARD)
    assert changed.args.marginMilli == 500
    assert changed.args.sampledOutsideBps == 5000
    with reverts(f"ModelMarketplace.NotModelOwner(model=0x{model.hex()})"):
        w.tx(account(REQUESTER), market.functions.setVerification(model, (0, 0, 0, 0)))
    for policy in (
        (0, 500, 0, 0),  # replicate takes no tolerance
        (1, 10_001, 0, 0),  # margin past 10 nats
        (1, 500, 2001, 0),  # more than 20 % of greedy positions outside
        (1, 500, 0, 7001),  # more than 70 % of sampled positions outside
    ):
        with reverts("ModelMarketplace.BadVerification()"):
            w.tx(account(OWNER), market.functions.setVerification(model, policy))
    w.tx(account(OWNER), market.functions.setVerification(model, (0, 0, 0, 0)))
    assert list(market.functions.verificationOf(model).call()) == [0, 0, 0, 0]


def test_a_requester_cannot_pick_its_committee_by_grinding_request_ids(chain: Chain) -> None:
    """The committee is drawn from the hash of the block that recorded the request and the
    request's sequence number, in a later block: the requester's free inputs (input hash,
    nonce, hence the request id) never enter the draw."""
    w = World.of(chain)
    nodes = node_accounts(8)
    for node in nodes:
        w.join(node, 1000 * JOY)
    model = w.add_model(committee_size=3)
    coordinator = w.coordinator.functions
    candidates = []
    for address in coordinator.nodesServing(model).call():
        stake, _, _, reputation, *_ = coordinator.nodeInfo(address).call()
        candidates.append(Candidate(address, stake, reputation))
    colluders = sorted(n.address for n in nodes[:3])
    # Under a draw seeded by the request id, the requester would search its inputs offline
    # until the id picks its own nodes (1 in 56 here)...
    requester = account(REQUESTER).address
    nonce = w.marketplace.functions.requestNonces(requester).call()
    chain_id = w.chain.w3.eth.chain_id
    ground = None
    for attempt in range(5000):
        input_hash = attempt.to_bytes(32, "big")
        request_id = keccak(
            abi_encode(
                ["uint256", "address", "address", "uint256", "bytes32", "bytes32"],
                [chain_id, w.marketplace.address, requester, nonce, model, input_hash],
            )
        )
        if sorted(select_committee(candidates, request_id, 3, MIN_STAKE)) == colluders:
            ground = (input_hash, request_id)
            break
    assert ground is not None
    input_hash, request_id = ground
    # ...and that id is indeed what the request gets.
    w.tx(account(REQUESTER), w.token.functions.approve(w.marketplace.address, PRICE))
    call = w.marketplace.functions.requestInference(model, input_hash, PRICE, w.now() + 3600)
    receipt = w.tx(account(REQUESTER), call)
    (event,) = w.events(w.marketplace, "InferenceRequested", receipt)
    assert event["requestId"] == request_id
    info = w.marketplace.functions.requestInfo(request_id).call()
    assert info[6] == []  # no committee yet: nobody can work on it before the draw
    # Nothing to draw from within the recording block: the seed does not exist yet.
    recorded = receipt["blockNumber"]
    too_early = keccak(text="DrawTooEarly(uint64)")[:4].hex()
    with pytest.raises(ContractCustomError, match=too_early):
        w.marketplace.functions.drawCommittee(request_id).call(block_identifier=recorded)
    drawn_receipt = w.tx(account(STAKER), w.marketplace.functions.drawCommittee(request_id))
    (drawn,) = w.events(w.marketplace, "CommitteeDrawn", drawn_receipt)
    anchor = w.chain.w3.eth.get_block(recorded)["hash"]
    sequence = w.marketplace.functions.requestCount().call() - 1
    assert drawn["seed"] == keccak(abi_encode(["bytes32", "uint64"], [bytes(anchor), sequence]))
    assert list(drawn["committee"]) == select_committee(candidates, drawn["seed"], 3, MIN_STAKE)
    assert list(w.marketplace.functions.requestInfo(request_id).call()[6]) == drawn["committee"]
    with reverts(f"ModelMarketplace.CommitteeAlreadyDrawn(requestId=0x{request_id.hex()})"):
        w.tx(account(REQUESTER), w.marketplace.functions.drawCommittee(request_id))
