"""The ``prepaid`` actor: admits clients' signed requests and settles them in batches.

Admitting (``refusal``, for the consensus actor): a member runs a prepaid
request only if its client's balance covers it. It reads, in one round trip,
the model's terms (``ModelMarketplace.payoutOf``), the client's account
(``PrepaidInference.accountOf``: what is not withdrawing) and whether the
nonce settled, and subtracts what the client owes for the requests this node
has seen and not yet settled (``ledger.owed``), less those the chain shows
settled at that same block (the watcher may lag it: counting them twice
refused clients who could pay). One client's requests are judged one at a
time, so two cannot spend the same JOY.

Settling: each certified request this node followed is queued in SQLite. The
first-ranked member of its committee settles it under the flush policy of
``[prepaid]``: once ``batch_size`` wait, once the oldest has waited
``max_age_s``, or at once when a deadline is close; not while gas costs more
than ``max_gas_price_gwei``. The member ranked i-th after it settles it
i x ``takeover_s`` later if it has not settled by then (the watcher's
``Settled`` clears it first). The rank is in the signed request, so
every node agrees who goes first, whatever certificate it assembled.
``settleBatch`` checks each request alone, so a bad one is refused with its
reason and the rest settle.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar, cast

import trio
from prometheus_client import CollectorRegistry, Counter
from web3.logs import DISCARD

from joynode import wire
from joynode.abc import GovernanceChain, PeerRequests
from joynode.chain.deploy import Deployment
from joynode.chain.rpc import ChainUnreachable
from joynode.chain.sender import TransactionFailed
from joynode.config import PrepaidSection
from joynode.consensus.tally import Certificate
from joynode.control.jsonrpc import INVALID_PARAMS, RpcError
from joynode.keys import NodeKey
from joynode.messages import ChainEvent, PrepaidRefusal, PrepaidTerms, model_key
from joynode.p2p.rpc import RpcFailure
from joynode.prepaid import ledger
from joynode.prepaid.redemption import (
    MAX_BATCH,
    Redemption,
    pack_batch,
    results_by_member,
)
from joynode.signatures import (
    PrepaidRequest,
    SignatureError,
    SpenderApproval,
    prepaid_request_id,
    recover_address,
    results_chain,
    sign,
    voucher_digest,
)
from joynode.state import StateStore

log = logging.getLogger(__name__)
T = TypeVar("T")

CONTRACT = "PrepaidInference"
MAX_OWED_CHECKED = 256  # owed requests asked the chain about per admission (the rest count)
DEADLINE_MARGIN_S = 120  # a request this close to its deadline is settled at once, gas or not
FLUSH_POLL_S = 1.0
VOUCHER_TIMEOUT_S = 3.0  # a member's voucher, asked when a batch is sent
VOUCHER_WAIT_S = 2.0  # a member asked to vouch for results it is still certifying
MIN_VOUCHED = 2  # in fewer requests of a batch, a member's own signatures cost no more
MAX_ATTEMPTS = 5  # batches that reverted whole with a request in them; then it is given up
# PrepaidInference.Refusal, by value
REFUSALS = (
    "none",
    "bad_client_signature",
    "already_settled",
    "expired",
    "model_not_servable",
    "price_above_max",
    "wrong_committee",
    "no_majority",
    "bad_signature",
    "insufficient_balance",
    "over_spender_cap",
)


class PrepaidUnavailable(RpcError):
    """This node's chain has no ``PrepaidInference`` (or is not connected yet)."""

    def __init__(self, message: str) -> None:
        super().__init__(INVALID_PARAMS, message)


@dataclasses.dataclass(frozen=True)
class PrepaidStatistics:
    """What the settler has done since the node started (``PrepaidService.statistics``)."""

    batches_sent: int
    batches_failed: int
    requests_settled: int  # by this node's batches
    requests_refused: int  # by this node's batches, with their reasons in the ledger


class PrepaidService:
    """Judges prepaid requests against balances; settles certified ones in batches."""

    name = "prepaid"

    def __init__(
        self,
        settings: PrepaidSection,
        key: NodeKey,
        state: StateStore,
        chain: GovernanceChain,
        network: PeerRequests,
        registry: CollectorRegistry,
        events_receive: trio.MemoryReceiveChannel[ChainEvent],
    ) -> None:
        self._settings = settings
        self._key = key
        self._state = state
        self._chain = chain
        self._network = network
        self._events = events_receive
        self._client_locks: defaultdict[str, trio.Lock] = defaultdict(trio.Lock)
        self._contracts: dict[str, Any] = {}
        self._contracts_for: Deployment | None = None
        self._wake = trio.Event()
        self._stats = PrepaidStatistics(0, 0, 0, 0)
        self._m_requests = Counter(
            "joynode_prepaid_requests",
            "Prepaid requests by what this node's batches did with them (settled, refused) "
            "and those others settled first (elsewhere)",
            ["outcome"],
            registry=registry,
        )
        self._m_batches = Counter(
            "joynode_prepaid_batches",
            "settleBatch transactions sent, by result",
            ["result"],
            registry=registry,
        )
        self._m_vouchers = Counter(
            "joynode_prepaid_vouchers",
            "Members' vouchers for this node's batches: signed here (own), received, "
            "missing (no answer, refused or invalid: their signatures went instead)",
            ["outcome"],
            registry=registry,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._network.handle_requests(wire.VoucherRequest, self._answer_voucher)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._settle_loop)
            nursery.start_soon(self._read_events)
            task_status.started()

    def statistics(self) -> PrepaidStatistics:
        return self._stats

    @property
    def address(self) -> str:
        """This node's account: the client of the requests it signs, a settler."""
        return self._chain.address

    async def transact(self, call: Any) -> Any:
        return await self._chain.transact(call)

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """A read of the ledger (``joynode.prepaid.ledger``)."""
        return await self._state.read(fn)

    # ---- what the chain says

    def contract(self, name: str = CONTRACT) -> Any:
        deployment = self._chain.deployment
        if deployment is None:
            raise PrepaidUnavailable("the chain is not connected yet")
        if name not in deployment.addresses:
            raise PrepaidUnavailable(f"this node's deployment has no {name}")
        if self._contracts_for is not deployment:
            self._contracts_for, self._contracts = deployment, {}
        if name not in self._contracts:  # building one from its ABI costs milliseconds
            self._contracts[name] = deployment.contract(self._chain.w3, name)
        return self._contracts[name]

    def _chain_id(self) -> int:
        deployment = self._chain.deployment
        if deployment is None:
            raise PrepaidUnavailable("the chain is not connected yet")
        return deployment.chain_id  # the chain actor checked it is the RPC's

    async def terms(self, model_id: str) -> PrepaidTerms:
        prepaid, market = self.contract(), self.contract("ModelMarketplace")

        def read() -> PrepaidTerms:
            _, price, size, servable, _, _ = market.functions.payoutOf(model_key(model_id)).call()
            return PrepaidTerms(
                chain_id=self._chain_id(),
                contract=prepaid.address,
                price=int(price),
                committee_size=int(size),
                servable=bool(servable),
                default_deadline=int(time.time() + self._settings.request_ttl_s),
            )

        return await self._chain.call(read)

    async def account(self, client: str) -> dict[str, Any]:
        """A client's balance as the contract has it, and what this node sees it owe."""
        prepaid = self.contract()

        def read() -> tuple[Any, ...]:
            account = prepaid.functions.accountOf(client).call()
            return (*account, prepaid.functions.claimable(client).call())

        balance, withdrawing, withdrawable_at, available, claimable = await self._chain.call(read)
        pending = await self._state.read(lambda c: ledger.pending_for(c, client, time.time()))
        return {
            "client": client,
            "balance": str(balance),
            "withdrawing": str(withdrawing),
            "withdrawable_at": int(withdrawable_at),
            "available": str(available),
            "pending": str(pending),
            "spendable": str(max(0, int(available) - pending)),
            "claimable": str(claimable),
        }

    # ---- spenders (a client lets this node sign for it: the gateway's signed-in wallets)

    async def spender_approval(self, client: str, cap: int, expiry: int) -> SpenderApproval:
        """The approval of this node that ``client`` would sign (the next nonce)."""
        prepaid = self.contract()
        _, _, _, nonce = await self._chain.call(
            prepaid.functions.spenderOf(client, self.address).call
        )
        return SpenderApproval(
            self._chain_id(), prepaid.address, client, self.address, cap, expiry, int(nonce) + 1
        )

    async def approve_spender(self, approval: SpenderApproval, signature: bytes) -> str:
        """Bring ``approval``, signed by its client, on-chain; the transaction hash. Raises
        ``TransactionFailed`` with the contract's reason (bad signature, stale, bounds)."""
        call = self.contract().functions.approveSpender(
            approval.client,
            approval.spender,
            approval.cap,
            approval.expiry,
            approval.nonce,
            signature,
        )
        receipt = await self.transact(call)
        return str(receipt["transactionHash"].to_0x_hex())

    async def spending(self, client: str) -> dict[str, Any]:
        """What ``client`` let this node spend: cap, spent, expiry (0: none or revoked)."""
        prepaid = self.contract()
        cap, spent, expiry, nonce = await self._chain.call(
            prepaid.functions.spenderOf(client, self.address).call
        )
        return {"cap": str(cap), "spent": str(spent), "expiry": int(expiry), "nonce": int(nonce)}

    # ---- admitting (the consensus actor asks)

    async def refusal(
        self, request: PrepaidRequest, signature: bytes, settle_by: float
    ) -> PrepaidRefusal | None:
        """Why this node will not run ``request`` (None: it is now pending against its client).

        ``settle_by``: when the job will be decided; the request's deadline must
        leave room after it to settle (``takeover_s``, ``max_age_s`` and a margin).
        """
        try:
            prepaid = self.contract()
        except PrepaidUnavailable as exc:
            return PrepaidRefusal("prepaid_unavailable", str(exc))
        if request.contract.lower() != prepaid.address.lower():
            return PrepaidRefusal(
                "wrong_prepaid_contract",
                f"the request names contract {request.contract}; this network's is "
                f"{prepaid.address}",
            )
        request_id = prepaid_request_id(request)
        s = self._settings
        settle_until = settle_by + s.takeover_s + s.max_age_s + DEADLINE_MARGIN_S
        if request.deadline < settle_until:
            return PrepaidRefusal(
                "expires_too_soon",
                f"its deadline {request.deadline} leaves no time to settle it "
                f"(at least {int(settle_until)} needed)",
            )
        try:
            signer = recover_address(request_id, signature)
        except SignatureError:
            signer = ""
        if not signer:
            return PrepaidRefusal("bad_client_signature", "the signature does not recover")
        # Signed by the client itself, or by a node it approved as its spender.
        spender = None if signer.lower() == request.client.lower() else signer
        async with self._client_locks[request.client.lower()]:
            if await self._state.read(lambda c: ledger.known(c, request_id)):
                return None  # admitted already (the relay and a member are the same node)
            return await self._judge(request, request_id, prepaid, spender, settle_until)

    async def _judge(
        self,
        request: PrepaidRequest,
        request_id: bytes,
        prepaid: Any,
        spender: str | None,
        settle_until: float,
    ) -> PrepaidRefusal | None:
        market = self.contract("ModelMarketplace")

        if request.chain_id != self._chain_id():
            return PrepaidRefusal("wrong_prepaid_contract", f"chain {request.chain_id} is not ours")

        def seen(conn: sqlite3.Connection) -> tuple[bool, list[tuple[int, int]]]:
            taken = ledger.nonce_taken(conn, request.client, request.nonce, request_id)
            return taken, ledger.owed(conn, request.client, time.time())

        taken, owed = await self._state.read(seen)

        def read(checked: list[tuple[int, int]]) -> tuple[int, int, bool, int, bool, int]:
            """(price, committee size, servable, available, nonce used, what of ``checked``
            settled): one round trip, all as of one block."""
            with self._chain.w3.batch_requests() as batch:
                batch.add(market.functions.payoutOf(request.model))
                batch.add(prepaid.functions.accountOf(request.client))
                batch.add(prepaid.functions.isSettled(request.client, request.nonce))
                for nonce, _ in checked:
                    batch.add(prepaid.functions.isSettled(request.client, nonce))
                payout, account, used, *settled = cast(list[Any], batch.execute())
            _, price, size, servable, _, _ = payout
            gone = sum(p for (_, p), done in zip(checked, settled, strict=True) if done)
            return int(price), int(size), bool(servable), int(account[3]), bool(used), gone

        cap = spent = 0
        if spender is not None:
            spending = await self._chain.call(
                prepaid.functions.spenderOf(request.client, spender).call
            )
            cap, spent, expiry, _ = (int(v) for v in spending)
            if expiry < settle_until:
                return PrepaidRefusal(
                    "bad_client_signature",
                    f"signed by {spender}, which {request.client} has not approved as its "
                    f"spender until {int(settle_until)} (approveSpender)",
                )
        price, size, servable, available, used, _ = await self._chain.call(read, [])
        pending = sum(owed_price for _, owed_price in owed)
        if price > available - pending and owed:
            # The balance is the latest block's; the watcher may not have applied the batches
            # that debited it yet, so some of what this node counts as owed may be paid:
            # ask, as of one block, before refusing a client who can pay.
            checked = owed[:MAX_OWED_CHECKED]
            price, size, servable, available, used, gone = await self._chain.call(read, checked)
            pending -= gone
        if not servable:
            return PrepaidRefusal("model_not_servable", "the model is not registered and active")
        if len(request.committee) != size:
            return PrepaidRefusal(
                "wrong_committee_size",
                f"the model's committees have {size} members, not {len(request.committee)}",
            )
        if price > request.max_price:
            return PrepaidRefusal(
                "price_above_max",
                f"the model costs {price} wei of JOY, more than the request's {request.max_price}",
            )
        if used or taken:
            return PrepaidRefusal(
                "nonce_used", f"nonce {request.nonce} of {request.client} is already used"
            )
        if price > available - pending:
            return PrepaidRefusal(
                "insufficient_balance",
                f"{request.client} has {available} wei of JOY available, {pending} of it "
                f"owed for pending requests: not enough for {price}",
            )
        # (What the client owes for pending requests counts against the cap too, whoever
        # signed them: the cap is never passed, if sometimes reached early.)
        if spender is not None and price > cap - spent - pending:
            return PrepaidRefusal(
                "over_spender_cap",
                f"{request.client} let {spender} spend {cap} wei of JOY; {spent} is spent and "
                f"{pending} owed for pending requests: not enough for {price}",
            )
        await self._state.write(lambda c: ledger.record_pending(c, request_id, request, price))
        return None

    async def certified(
        self, request: PrepaidRequest, signature: bytes, certificate: Certificate
    ) -> None:
        """Queue a certified request: at once if this node ranks first in its committee,
        else ``takeover_s`` later per rank below the first (a relay outside the
        committee comes last)."""
        committee = [a.lower() for a in request.committee]
        signed = zip(certificate.signers, certificate.signatures, strict=True)
        by_member = {signer.lower(): sig for signer, sig in signed}
        signed_by = sum(1 << i for i, member in enumerate(committee) if member in by_member)
        signatures = b"".join(by_member[m] for m in committee if m in by_member)
        redemption = Redemption(request, signature, certificate.output_hash, signed_by, signatures)
        me = self._chain.address.lower()
        rank = committee.index(me) if me in committee else len(committee)
        settle_after = 0.0 if rank == 0 else time.time() + rank * self._settings.takeover_s
        request_id = certificate.request_id
        await self._state.write(
            lambda c: ledger.record_certified(
                c, request_id, redemption, request.max_price, settle_after
            )
        )
        self._wake.set()

    async def released(self, request_id: bytes) -> None:
        await self._state.write(lambda c: ledger.release(c, request_id))

    # ---- settling

    async def _settle_loop(self) -> None:
        await self._resume()
        while True:
            with trio.move_on_after(FLUSH_POLL_S):
                await self._wake.wait()
            self._wake = trio.Event()
            try:
                await self._flush()
            except (ChainUnreachable, PrepaidUnavailable) as exc:
                log.debug("prepaid: not settling now: %s", exc)

    async def _resume(self) -> None:
        """A batch was being sent when the node stopped: what settled is marked, the rest
        waits again. Retried until the chain answers."""
        while True:
            try:
                stuck = await self._state.read(ledger.sending)
                if stuck:
                    settled = await self._settled_on_chain([r for _, r in stuck])
                    await self._state.write(partial(ledger.resumed, stuck=stuck, settled=settled))
                    log.info(
                        "prepaid: resumed a batch cut short: %d settled, %d to send again",
                        len(settled),
                        len(stuck) - len(settled),
                    )
                return
            except (ChainUnreachable, PrepaidUnavailable) as exc:
                log.debug("prepaid: cannot resume yet: %s", exc)
                await trio.sleep(FLUSH_POLL_S)

    async def _settled_on_chain(self, redemptions: list[Redemption]) -> set[int]:
        """Which of these requests settled already (by index)."""
        prepaid = self.contract()

        def read() -> set[int]:
            return {
                i
                for i, r in enumerate(redemptions)
                if prepaid.functions.isSettled(r.request.client, r.request.nonce).call()
            }

        return await self._chain.call(read)

    async def settle_now(self, *, take_over: bool = False) -> int:
        """Send what is due now in one batch, whatever its size, age or the gas price (an
        operator's ``prepaid.settle``); how many requests it held. ``take_over``: also
        the requests whose first-ranked member has not settled them yet (this node pays their
        gas; one that signer settles first is refused as already settled)."""
        return await self._flush(force=True, take_over=take_over)

    async def _flush(self, *, force: bool = False, take_over: bool = False) -> int:
        now = time.time()
        until = math.inf if take_over else now
        items = await self._state.read(lambda c: ledger.due(c, now, MAX_BATCH, until=until))
        if not items:
            return 0
        s = self._settings
        mine = [i for i in items if i.first_ranked]
        urgent = force or any(i.deadline - now < DEADLINE_MARGIN_S for i in items)
        ready = (
            urgent
            or len(mine) < len(items)  # some waited takeover_s for their first-ranked member
            or len(mine) >= s.batch_size
            or now - mine[0].certified_at >= s.max_age_s
        )
        if not ready:
            return 0
        if s.max_gas_price_gwei > 0 and not urgent:
            gas_price = await self._chain.call(lambda: self._chain.w3.eth.gas_price)
            if gas_price > s.max_gas_price_gwei * 1e9:
                log.debug("prepaid: holding %d requests: gas at %d wei", len(items), gas_price)
                return 0
        taken_over = [i for i in items if not i.first_ranked]
        if taken_over:
            settled = await self._settled_on_chain([i.redemption for i in taken_over])
            for index in settled:
                rid = taken_over[index].request_id
                await self._state.write(partial(ledger.settled_elsewhere, request_id=rid, tx=""))
                self._m_requests.labels("elsewhere").inc()
            gone = {taken_over[i].request_id for i in settled}
            items = [i for i in items if i.request_id not in gone]
        if items:
            await self._send([i.request_id for i in items], [i.redemption for i in items])
        return len(items)

    async def _send(self, request_ids: list[bytes], redemptions: list[Redemption]) -> None:
        """One ``settleBatch``; each request's outcome from its events."""
        prepaid = self.contract()
        await self._state.write(lambda c: ledger.mark_sending(c, request_ids))
        vouchers = await self._vouchers(request_ids, redemptions)
        try:
            call = prepaid.functions.settleBatch(pack_batch(redemptions, vouchers))
            receipt = await self._chain.transact(call)
        except (TransactionFailed, ChainUnreachable, ValueError) as exc:
            self._m_batches.labels("failed").inc()
            self._stats = dataclasses.replace(
                self._stats, batches_failed=self._stats.batches_failed + 1
            )
            log.warning("prepaid: a batch of %d did not settle: %s", len(request_ids), exc)
            retry = partial(
                ledger.retry_later, request_ids=request_ids, why=str(exc), max_attempts=MAX_ATTEMPTS
            )
            await self._state.write(retry)
            return
        tx = receipt["transactionHash"].to_0x_hex()
        outcomes: dict[bytes, tuple[ledger.State, str]] = {}
        for event in prepaid.events.Settled().process_receipt(receipt, errors=DISCARD):
            for rid in event["args"]["requestIds"]:
                outcomes[bytes(rid)] = ("settled", "")
        for event in prepaid.events.SettlementRefused().process_receipt(receipt, errors=DISCARD):
            reason = REFUSALS[int(event["args"]["reason"])]
            state: ledger.State = "settled" if reason == "already_settled" else "refused"
            outcomes[bytes(event["args"]["requestId"])] = (state, reason)

        def record(conn: sqlite3.Connection) -> None:
            for rid in request_ids:
                state, reason = outcomes.get(rid, ("refused", "no event for it"))
                ledger.mark_outcome(conn, rid, state, tx, reason)

        await self._state.write(record)
        settled = sum(1 for s, r in outcomes.values() if s == "settled" and not r)
        refused = sum(1 for s, _ in outcomes.values() if s == "refused")
        self._m_batches.labels("ok").inc()
        self._m_requests.labels("settled").inc(settled)
        self._m_requests.labels("refused").inc(refused)
        self._m_requests.labels("elsewhere").inc(len(outcomes) - settled - refused)
        self._stats = dataclasses.replace(
            self._stats,
            batches_sent=self._stats.batches_sent + 1,
            requests_settled=self._stats.requests_settled + settled,
            requests_refused=self._stats.requests_refused + refused,
        )
        log.info(
            "prepaid: settled %d of %d requests in %s (gas %d, %d vouchers)%s",
            settled,
            len(request_ids),
            tx,
            receipt["gasUsed"],
            len(vouchers),
            f"; {refused} refused" if refused else "",
        )

    # ---- vouchers: one signature per member and batch

    async def _vouchers(
        self, request_ids: list[bytes], redemptions: list[Redemption]
    ) -> dict[str, bytes]:
        """The voucher of each member that signed at least ``MIN_VOUCHED`` requests of the
        batch (this node's own signed here, the others' asked for at once); a member
        that does not give one in ``VOUCHER_TIMEOUT_S`` is paid through its signatures."""
        chain_id, contract = self._chain_id(), self.contract().address
        me = self._key.address.lower()
        vouchers: dict[str, bytes] = {}

        async def ask(member: str, results: list[tuple[bytes, bytes]]) -> None:
            digest = voucher_digest(chain_id, contract, results_chain(results))
            if member == me:
                vouchers[member] = sign(self._key, digest)
                self._m_vouchers.labels("own").inc()
                return
            peer = self._network.peers.up_peer_of(member)
            request = wire.VoucherRequest([wire.CertifiedResult(r, o) for r, o in results])
            reply: wire.AnyMessage | None = None
            if peer is not None:
                with trio.move_on_after(VOUCHER_TIMEOUT_S):
                    try:
                        reply = await self._network.request(peer, request)
                    except RpcFailure as exc:
                        log.debug("prepaid: no voucher from %s: %s", member, exc)
            if isinstance(reply, wire.Voucher) and _signed_by(digest, reply.signature, member):
                vouchers[member] = reply.signature
                self._m_vouchers.labels("received").inc()
            else:
                self._m_vouchers.labels("missing").inc()

        async with trio.open_nursery() as nursery:
            for member, results in sorted(results_by_member(request_ids, redemptions).items()):
                if len(results) >= MIN_VOUCHED:
                    nursery.start_soon(ask, member, results)
        return vouchers

    async def _answer_voucher(self, peer: str, request: wire.Message) -> wire.Message:
        """Vouch for results this node certified itself, and only those."""
        assert isinstance(request, wire.VoucherRequest)
        results = [(r.request_id, r.output_hash) for r in request.results]
        try:
            chain_id, contract = self._chain_id(), self.contract().address
        except PrepaidUnavailable as exc:
            return wire.ErrorReply(503, str(exc))
        check = partial(ledger.not_certified_by, member=self._key.address, results=results)
        doubt = await self._state.read(check)
        # The settler may ask before this node has finished certifying the batch's last
        # requests: a moment's wait for them, then refused.
        with trio.move_on_after(VOUCHER_WAIT_S):
            while doubt is not None:
                await trio.sleep(0.1)
                doubt = await self._state.read(check)
        if doubt is not None:
            log.debug("prepaid: no voucher for %s: %s", peer, doubt)
            return wire.ErrorReply(403, doubt)
        return wire.Voucher(
            sign(self._key, voucher_digest(chain_id, contract, results_chain(results)))
        )

    async def _read_events(self) -> None:
        """Requests other nodes' batches settled: no longer owed nor to settle here."""
        async for event in self._events:
            if event.removed or event.contract != CONTRACT or event.name != "Settled":
                continue
            ids = [bytes.fromhex(str(rid)[2:]) for rid in cast(list[str], event.args["requestIds"])]

            def settled(conn: sqlite3.Connection, ids: list[bytes], tx: str) -> None:
                for rid in ids:
                    ledger.settled_elsewhere(conn, rid, tx)

            await self._state.write(partial(settled, ids=ids, tx=event.tx_hash))


def _signed_by(digest: bytes, signature: bytes, member: str) -> bool:
    try:
        return recover_address(digest, signature).lower() == member
    except SignatureError:
        return False
