"""The ``zk`` actor: paid inference of zk models, settled by a proof instead of a committee.

A zk model is a quantized network with a circuit (``mlp_inference.zok``),
registered in the marketplace with its weights commitment and verifier. A
request for one carries only the Poseidon hash of its input on-chain, so the
input itself travels over gossip (``ZkJob`` on ``joynet/2/zk``). A node that
serves the model (``[[zk.models]]``: a name and a weights file) takes the job
once its watcher has mirrored the request, checks it (pending, this model, the
input hashing to the request's input hash, the model registered with these
weights), proves the inference with the ``prover`` actor and lands the proof
with ``ProofOfInference.submitZkResult``, which pays it as the only signer.

``zk.infer`` is the requester's side: it pays for a request (or takes one a
wallet paid for), proves it here if this node serves the model or else
gossips the job until someone settles it, and returns the proven logits; a
request nobody settles by its deadline is refunded. Jobs are in SQLite
(``zk_jobs``), so a restarted node finishes those it was proving.

While the chain's RPC is unreachable, new zk requests are refused with that
reason; a proof already made is submitted again every ``CHAIN_RETRY_S`` until
its deadline, and one whose transaction landed while its receipt was lost is
recorded as settled from the chain's ``ZkInferenceVerified``.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import pydantic
import trio
from prometheus_client import CollectorRegistry, Counter

from joynode import wire
from joynode.abc import GossipPublisher, ZkMarketChain
from joynode.chain.deploy import JOY
from joynode.chain.rpc import ChainUnreachable
from joynode.chain.sender import TransactionFailed
from joynode.chain.service import ZK_MODEL_NAME
from joynode.config import SettingError, ZkSection
from joynode.control.jsonrpc import INVALID_PARAMS, RpcError
from joynode.control.methods import ControlMethod, ControlSession
from joynode.messages import ChainEvent, OnchainRequest, RequestStatus, model_key
from joynode.p2p.gossip import ZK_JOBS, VerifiedGossip
from joynode.state import StateStore
from joynode.zk import circuits
from joynode.zk.mlp import IN, QuantizedMlp, WeightsFileError, commitments, input_hash, load_weights
from joynode.zk.prover import ProofFailure, ProofResult, ProverClient
from joynode.zk.zokrates import ZokratesError, ZokratesWorker

log = logging.getLogger(__name__)

T = TypeVar("T")

ZK_ERROR = -32060  # JSON-RPC application error: the zk request failed
HELD_JOBS = 64  # jobs taken and not finished; more gossip is dropped until some finish
MIRROR_WAIT_S = 30.0  # how long a job waits for the watcher to mirror its request
REGOSSIP_S = 5.0  # how often a requester repeats its job while nobody has settled it
MIN_LEFT_S = 10.0  # a request with less time than this to its deadline is not proven
REFUND_ATTEMPTS = 30  # one a second, while the chain's clock has not reached the deadline
CHAIN_RETRY_S = 2.0  # after the RPC failed, before trying a proof's settlement again
RECENT_JOBS = 100


@dataclass(frozen=True)
class ServedZkModel:
    name: str
    model: QuantizedMlp
    commitment: int


Int8 = Annotated[int, pydantic.Field(ge=-128, le=127)]


class InferParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    model: str = pydantic.Field(pattern=ZK_MODEL_NAME, description="the zk model's name")
    input: list[Int8] = pydantic.Field(min_length=IN, max_length=IN)
    max_price_joy: int | None = pydantic.Field(None, ge=0, le=10**12)
    request_id: str | None = pydantic.Field(
        None, pattern=r"^0x[0-9a-fA-F]{64}$", description="a request a wallet already paid for"
    )
    timeout_s: float = pydantic.Field(120.0, ge=MIN_LEFT_S * 2, le=3600)


class JobsParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    limit: int = pydantic.Field(20, ge=1, le=RECENT_JOBS)


class ZkInferenceService:
    name = "zk"

    def __init__(
        self,
        settings: ZkSection,
        state: StateStore,
        registry: CollectorRegistry,
        prover: ProverClient,
        p2p: GossipPublisher,
        zk_jobs_receive: trio.MemoryReceiveChannel[VerifiedGossip],
        chain: ZkMarketChain | None = None,
        chain_events_receive: trio.MemoryReceiveChannel[ChainEvent] | None = None,
    ) -> None:
        self._settings = settings
        self._state = state
        self._prover = prover
        self._p2p = p2p
        self._jobs = zk_jobs_receive
        self._chain = chain
        self._chain_events = chain_events_receive
        self._request_changed: dict[bytes, trio.Event] = {}  # set when a request's event arrives
        self._served: dict[str, ServedZkModel] = {}
        self._held: set[bytes] = set()  # request ids being served now
        self._worker: ZokratesWorker | None = None  # witness only: input hashes, commitments
        self._worker_lock = trio.Lock()
        self._nursery: trio.Nursery | None = None
        self._m_jobs = Counter(
            "joynode_zk_jobs",
            "zk jobs taken from gossip, by outcome",
            ["outcome"],
            registry=registry,
        )

    def served_models(self) -> list[str]:
        return sorted(self._served)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self._load_models()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self._chain_events is not None:
                    nursery.start_soon(self._follow_chain, self._chain_events)
                for request_id, model, x in await self._state.read(_load_unfinished):
                    self._take(request_id, model, x)
                task_status.started()
                async for gossip in self._jobs:
                    assert isinstance(gossip.message, wire.ZkJob)
                    job = gossip.message
                    self._take(job.request_id, job.model, tuple(job.input))
        finally:
            if self._worker is not None:
                await self._worker.aclose()

    async def _load_models(self) -> None:
        """Read each weights file and check its commitment with the circuit; errors stop the node"""
        if not self._settings.models:
            return
        if unbuilt := [c.name for c in circuits.ALL if not c.built()]:
            raise SettingError(
                "zk.models",
                f"needs the circuits ({', '.join(unbuilt)}): run `joynode circuits build`",
            )
        for index, entry in enumerate(self._settings.models):
            key = f"zk.models[{index}].weights"
            try:
                model, claimed = load_weights(entry.weights)
            except WeightsFileError as exc:
                raise SettingError(key, f"zk model {entry.name}: {exc}") from None
            commitment = (await self._witness(commitments, model, [0] * IN))[0]
            if commitment != claimed:
                raise SettingError(
                    key,
                    f"zk model {entry.name}: {entry.weights} claims commitment 0x{claimed:064x} "
                    f"but its weights commit to 0x{commitment:064x}",
                )
            self._served[entry.name] = ServedZkModel(entry.name, model, commitment)
            log.info("serving zk model %s (weights commitment 0x%064x)", entry.name, commitment)

    async def _follow_chain(self, events: trio.MemoryReceiveChannel[ChainEvent]) -> None:
        async for event in events:
            if "requestId" in event.args:
                request_id = bytes.fromhex(str(event.args["requestId"])[2:])
                if (changed := self._request_changed.pop(request_id, None)) is not None:
                    changed.set()

    def _changes_of(self, request_id: bytes) -> trio.Event:
        """Set when the watcher next applies an event of this request (take it before reading)."""
        return self._request_changed.setdefault(request_id, trio.Event())

    def _forget_changes_of(self, request_id: bytes) -> None:
        changed = self._request_changed.get(request_id)
        if changed is not None and not changed.is_set():
            del self._request_changed[request_id]

    async def _witness(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run a witness-only computation on this actor's worker (not the prover's: no queue)."""
        async with self._worker_lock:
            if self._worker is None:
                worker = ZokratesWorker()
                await worker.start()
                self._worker = worker
            try:
                return await fn(self._worker, *args)
            except ZokratesError:
                worker, self._worker = self._worker, None
                await worker.aclose()
                raise

    # ---- proving paid requests

    def _take(self, request_id: bytes, model: str, x: tuple[int, ...]) -> None:
        if self._chain is None or model not in self._served or request_id in self._held:
            return
        if len(self._held) >= HELD_JOBS:
            self._m_jobs.labels("busy").inc()
            log.warning("zk job 0x%s dropped: %d jobs in hand", request_id.hex()[:12], HELD_JOBS)
            return
        assert self._nursery is not None
        self._held.add(request_id)
        self._nursery.start_soon(self._serve, request_id, self._served[model], x)

    async def _serve(self, request_id: bytes, served: ServedZkModel, x: tuple[int, ...]) -> None:
        try:
            outcome, detail, tx = await self._prove_and_settle(request_id, served, x)
        except Exception as exc:  # web3, transports: the RPC failed
            outcome, detail, tx = "failed", f"chain unreachable: {exc}", None
        finally:
            self._held.discard(request_id)
        self._m_jobs.labels(outcome).inc()
        level = logging.INFO if outcome == "settled" else logging.WARNING
        log.log(level, "zk job 0x%s %s: %s", request_id.hex()[:12], outcome, detail)
        if outcome != "ignored":
            await self._record(request_id, served.name, x, outcome, detail, tx=tx)
        else:  # no record for gossip not taken, but a job proving before a restart ends here
            await self._state.write(
                lambda conn: conn.execute(
                    "UPDATE zk_jobs SET status = ?, detail = ?, updated_at = ? "
                    "WHERE request_id = ? AND status = 'proving'",
                    (outcome, detail, time.time(), _hex(request_id)),
                )
            )

    async def _prove_and_settle(
        self, request_id: bytes, served: ServedZkModel, x: tuple[int, ...]
    ) -> tuple[str, str, str | None]:
        chain = self._chain_link()
        info = await self._mirrored(request_id)
        if info is None:
            return "ignored", "no such request on-chain", None
        if info.status is not RequestStatus.PENDING:
            if (tx := await self._settled_by_me(info)) is not None:
                return "settled", "before this node restarted", tx
            return "ignored", f"request is {info.status.name.lower()}", None
        if info.model != model_key(served.name):
            return "refused", "the request is for another model", None
        if info.seconds_left < MIN_LEFT_S:
            return "refused", f"{info.seconds_left:.0f} s to its deadline is too little", None
        registered = await chain.zk_model(served.name)
        if registered is None or registered.weights_commitment != served.commitment:
            return "refused", f"{served.name} is not registered with these weights", None
        if await self._witness(input_hash, x) != int.from_bytes(info.input_hash, "big"):
            return "refused", "the input is not the one the request was paid for", None
        await self._record(request_id, served.name, x, "proving", "")
        outcome = await self._prover.prove(served.model, x)
        if isinstance(outcome, ProofFailure):
            return "failed", outcome.message, None
        return await self._settle(request_id, outcome, trio.current_time() + info.seconds_left)

    async def _settle(
        self, request_id: bytes, proven: ProofResult, deadline: float
    ) -> tuple[str, str, str | None]:
        """Land the proof with ``submitZkResult``; through an RPC outage, again until the
        request's deadline (trio clock)."""
        chain = self._chain_link()
        done = f"logits {list(proven.proven.logits)}, proof {proven.proof_id}"
        while True:
            try:
                fresh = await chain.request_info(request_id)
                if fresh is not None and fresh.status is not RequestStatus.PENDING:
                    if (tx := await self._settled_by_me(fresh)) is not None:
                        return "settled", done, tx  # it landed, but its receipt was lost
                    return "ignored", f"{fresh.status.name.lower()} meanwhile", None
                if fresh is None:
                    return "ignored", "no such request on-chain", None
                tx = await chain.submit_zk_result(request_id, proven.proven)
            except TransactionFailed as exc:
                return "failed", f"submitZkResult: {exc}", None
            except ChainUnreachable as exc:
                if trio.current_time() + CHAIN_RETRY_S >= deadline:
                    return "failed", f"not settled by its deadline: {exc.message}", None
                await trio.sleep(CHAIN_RETRY_S)
                continue
            return "settled", done, tx

    async def _settled_by_me(self, info: OnchainRequest) -> str | None:
        """The transaction that settled ``info`` if this node's proof did, else None."""
        if info.status is not RequestStatus.SETTLED:
            return None
        settlement = await self._chain_link().zk_settlement(info.request_id)
        if settlement is None or settlement.prover != self._chain_link().address:
            return None
        return settlement.tx

    async def _mirrored(self, request_id: bytes) -> OnchainRequest | None:
        """The request as the watcher mirrors it, waiting a little for a request just made."""
        try:
            with trio.move_on_after(MIRROR_WAIT_S):
                while True:
                    changed = self._changes_of(request_id)
                    if (info := await self._chain_link().mirrored_request(request_id)) is not None:
                        return info
                    await changed.wait()
            return None
        finally:
            self._forget_changes_of(request_id)

    # ---- requesting

    async def infer(self, params: InferParams, session: ControlSession) -> dict[str, Any]:
        chain = self._chain_link()
        registered = await chain.zk_model(params.model)
        if registered is None or not registered.active:
            raise RpcError(INVALID_PARAMS, f"{params.model} is not an active zk model")
        x = tuple(params.input)
        try:
            digest = await self._witness(input_hash, x)
        except ZokratesError as exc:
            raise RpcError(ZK_ERROR, f"cannot hash the input: {exc}") from None
        info = await self._request(params, digest)
        request_id = info.request_id
        await session.notify("zk.progress", {"request_id": _hex(request_id), "status": "paid"})
        if params.model in self._served:
            self._take(request_id, params.model, x)
        status = await self._settled_or_expired(
            request_id, info, wire.ZkJob(request_id, params.model, list(x))
        )
        if status is RequestStatus.PENDING:
            tx = await self._refund(request_id)
            raise RpcError(ZK_ERROR, f"no prover settled {_hex(request_id)}; refunded ({tx})")
        settlement = await chain.zk_settlement(request_id)
        if status is not RequestStatus.SETTLED or settlement is None:
            raise RpcError(ZK_ERROR, f"{_hex(request_id)} ended {status.name.lower()}")
        return {
            "request_id": _hex(request_id),
            "status": "settled",
            "logits": list(settlement.logits),
            "prover": settlement.prover,
            "tx": settlement.tx,
            "price": info.price,
        }

    async def _request(self, params: InferParams, digest: int) -> OnchainRequest:
        """The paid request: paid now from this node's account, or the wallet's one checked."""
        chain = self._chain_link()
        if params.request_id is None:
            max_price = None if params.max_price_joy is None else params.max_price_joy * JOY
            try:
                return await chain.request_inference(
                    params.model, digest.to_bytes(32, "big"), max_price, params.timeout_s
                )
            except TransactionFailed as exc:
                raise RpcError(ZK_ERROR, f"the marketplace refused the request: {exc}") from None
        request_id = bytes.fromhex(params.request_id[2:])
        info = await chain.request_info(request_id)
        if info is None or info.status is not RequestStatus.PENDING:
            raise RpcError(ZK_ERROR, f"{params.request_id} is not a pending request")
        if info.model != model_key(params.model):
            raise RpcError(ZK_ERROR, f"{params.request_id} is for another model")
        if info.input_hash != digest.to_bytes(32, "big"):
            raise RpcError(ZK_ERROR, f"this input is not the one {params.request_id} was paid for")
        return info

    async def _settled_or_expired(
        self, request_id: bytes, info: OnchainRequest, job: wire.ZkJob
    ) -> RequestStatus:
        """Wait for the request to leave pending, or its deadline; gossip the job meanwhile
        unless this node proves it."""
        deadline = trio.current_time() + info.seconds_left
        next_gossip = trio.current_time()
        try:
            while True:
                changed = self._changes_of(request_id)
                mirrored = await self._chain_link().mirrored_request(request_id)
                status = RequestStatus.PENDING if mirrored is None else mirrored.status
                if status is not RequestStatus.PENDING or trio.current_time() > deadline:
                    return status
                if job.model not in self._served and trio.current_time() >= next_gossip:
                    await self._p2p.publish(ZK_JOBS, job)
                    next_gossip = trio.current_time() + REGOSSIP_S
                wake = deadline if job.model in self._served else min(next_gossip, deadline)
                with trio.move_on_at(wake + 0.01):
                    await changed.wait()
        finally:
            self._forget_changes_of(request_id)

    async def _refund(self, request_id: bytes) -> str:
        """Take the escrow back; the chain's clock may lag ours past the deadline for a while."""
        for attempt in range(REFUND_ATTEMPTS):
            try:
                return await self._chain_link().refund(request_id)
            except TransactionFailed as exc:
                if "DeadlineNotReached" not in str(exc) or attempt == REFUND_ATTEMPTS - 1:
                    raise RpcError(ZK_ERROR, f"refund of {_hex(request_id)}: {exc}") from None
            except ChainUnreachable as exc:
                if attempt == REFUND_ATTEMPTS - 1:
                    raise RpcError(
                        exc.code, f"refund of {_hex(request_id)} not sent: {exc.message}"
                    ) from None
            await trio.sleep(1.0)
        raise AssertionError("unreachable")

    def _chain_link(self) -> ZkMarketChain:
        if self._chain is None:
            raise RpcError(INVALID_PARAMS, "zk requests need a chain (chain.mode local or rpc)")
        return self._chain

    async def _record(
        self,
        request_id: bytes,
        model: str,
        x: tuple[int, ...],
        status: str,
        detail: str,
        tx: str | None = None,
    ) -> None:
        row = (_hex(request_id), model, json.dumps(list(x)), status, detail, tx, time.time())
        await self._state.write(
            lambda conn: conn.execute(
                "INSERT INTO zk_jobs (request_id, model, input, status, detail, tx, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (request_id) DO UPDATE SET "
                "status = excluded.status, detail = excluded.detail, tx = excluded.tx, "
                "updated_at = excluded.updated_at",
                row,
            )
        )

    # ---- control

    def control_methods(self) -> list[ControlMethod]:
        async def jobs(params: JobsParams, _: ControlSession) -> dict[str, Any]:
            rows = await self._state.read(lambda conn: _recent(conn, params.limit))
            return {"served": self.served_models(), "jobs": rows}

        return [
            ControlMethod(
                "zk.infer",
                InferParams,
                self.infer,
                "Pay for an inference of a zk model (or relay a paid request_id) and wait for "
                "the proven logits; refunded if nobody settles it in time.",
            ),
            ControlMethod(
                "zk.jobs", JobsParams, jobs, "The zk models served here and the latest zk jobs."
            ),
        ]


def _hex(request_id: bytes) -> str:
    return "0x" + request_id.hex()


def _load_unfinished(conn: sqlite3.Connection) -> list[tuple[bytes, str, tuple[int, ...]]]:
    rows = conn.execute(
        "SELECT request_id, model, input FROM zk_jobs WHERE status = 'proving'"
    ).fetchall()
    return [(bytes.fromhex(rid[2:]), model, tuple(json.loads(x))) for rid, model, x in rows]


def _recent(conn: sqlite3.Connection, limit: int) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT request_id, model, input, status, detail, tx, updated_at FROM zk_jobs "
        "ORDER BY updated_at DESC LIMIT ?",
        (limit,),
    ).fetchall()
    keys = ("request_id", "model", "input", "status", "detail", "tx", "updated_at")
    return [{**dict(zip(keys, row, strict=True)), "input": json.loads(row[2])} for row in rows]
