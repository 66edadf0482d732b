"""The ``prover`` actor: zero-knowledge proofs on one warm ZoKrates worker.

Proof requests (``ProofRequest``, from the control socket's ``proof.generate``
or any actor) queue on ``requests_receive`` and run one at a time: the wasm
prover is single-threaded, and a second worker would only halve each proof's
share of the CPU. Each proof has ``zk.proof_timeout_s``; a request that times
out, or that ZoKrates refuses, gets a ``ProofFailure`` and the worker is
restarted if it stopped answering. Every proof made is stored in SQLite
(``proofs``) with its public values, and ``proof.get`` returns it later.
``proof.verify`` checks a proof against a circuit's verification key.

The circuits must be built (``joynode circuits build``, run by ``make``);
without them the actor still runs and says so to every request.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from dataclasses import dataclass
from typing import Annotated, Any

import pydantic
import trio
from prometheus_client import CollectorRegistry, Counter, Histogram

from joynode.config import ZkSection
from joynode.control.jsonrpc import INVALID_PARAMS, RpcError
from joynode.control.methods import ControlMethod, ControlSession
from joynode.state import StateStore
from joynode.zk import circuits
from joynode.zk.mlp import IN, WEIGHTS, MlpProof, QuantizedMlp, prove, verify
from joynode.zk.zokrates import ZokratesError, ZokratesWorker

log = logging.getLogger(__name__)

PROOF_ERROR = -32050  # JSON-RPC application error: the proof could not be made


@dataclass(frozen=True)
class ProofRequest:
    """Prove one inference of ``model`` on ``x``; the outcome goes to ``reply``."""

    model: QuantizedMlp
    x: tuple[int, ...]
    reply: trio.MemorySendChannel[ProofOutcome]


@dataclass(frozen=True)
class ProofResult:
    proof_id: int
    proven: MlpProof
    seconds: float


@dataclass(frozen=True)
class ProofFailure:
    message: str


ProofOutcome = ProofResult | ProofFailure

Int8 = Annotated[int, pydantic.Field(ge=-128, le=127)]


class GenerateParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    weights: list[Int8] = pydantic.Field(min_length=WEIGHTS, max_length=WEIGHTS)
    input: list[Int8] = pydantic.Field(min_length=IN, max_length=IN)


class VerifyParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    circuit: str = pydantic.Field(circuits.MLP_INFERENCE.name, max_length=64)
    proof: dict[str, Any]


class GetParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    proof_id: int = pydantic.Field(ge=1)


class ProverClient:
    """How other actors (and the control socket) ask the prover for a proof."""

    def __init__(self, requests_send: trio.MemorySendChannel[ProofRequest]) -> None:
        self._requests = requests_send

    async def prove(self, model: QuantizedMlp, x: tuple[int, ...]) -> ProofOutcome:
        reply_send, reply_receive = trio.open_memory_channel[ProofOutcome](1)
        try:
            self._requests.send_nowait(ProofRequest(model, x, reply_send))
        except trio.WouldBlock:
            return ProofFailure("the prover's queue is full; try again later")
        async with reply_receive:
            return await reply_receive.receive()


class ProverService:
    name = "prover"

    def __init__(
        self,
        settings: ZkSection,
        state: StateStore,
        registry: CollectorRegistry,
        requests_receive: trio.MemoryReceiveChannel[ProofRequest],
    ) -> None:
        self._settings = settings
        self._state = state
        self._requests = requests_receive
        self._worker: ZokratesWorker | None = None
        self._m_proofs = Counter(
            "joynode_zk_proofs", "Proofs by outcome", ["outcome"], registry=registry
        )
        self._m_seconds = Histogram(
            "joynode_zk_proof_seconds",
            "Time per proof (witness and Groth16 proof)",
            registry=registry,
            buckets=(0.5, 1, 2, 4, 8, 16, 32, 64, 128),
        )

    def missing(self) -> str | None:
        """Why proofs cannot be made here, or None."""
        unbuilt = [c.name for c in circuits.ALL if not c.built()]
        if unbuilt:
            return f"circuits not built ({', '.join(unbuilt)}): run `joynode circuits build`"
        return None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if (why := self.missing()) is not None:
            log.warning("zero-knowledge proofs are off: %s", why)
        try:
            task_status.started()
            async for request in self._requests:
                await request.reply.send(await self._prove(request))
        finally:
            if self._worker is not None:
                await self._worker.aclose()

    async def _prove(self, request: ProofRequest) -> ProofOutcome:
        if (why := self.missing()) is not None:
            return ProofFailure(why)
        began = time.monotonic()
        try:
            worker = await self._ready_worker()
            with trio.fail_after(self._settings.proof_timeout_s):
                proven = await prove(worker, request.model, request.x)
        except trio.TooSlowError:
            await self._drop_worker()  # it is busy with the abandoned proof
            self._m_proofs.labels("timeout").inc()
            return ProofFailure(f"no proof within {self._settings.proof_timeout_s:.0f} s")
        except (ZokratesError, OSError) as exc:
            await self._drop_worker()
            self._m_proofs.labels("failed").inc()
            return ProofFailure(f"ZoKrates: {exc}")
        seconds = time.monotonic() - began
        proof_id = await self._state.write(
            lambda conn: _save_proof(conn, circuits.MLP_INFERENCE.name, proven, seconds)
        )
        self._m_proofs.labels("ok").inc()
        self._m_seconds.observe(seconds)
        return ProofResult(proof_id, proven, seconds)

    async def _ready_worker(self) -> ZokratesWorker:
        if self._worker is None:
            worker = ZokratesWorker()
            await worker.start()
            self._worker = worker
        return self._worker

    async def _drop_worker(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            await worker.aclose()

    async def verify(self, circuit_name: str, proof: dict[str, Any]) -> bool:
        circuit = next((c for c in circuits.ALL if c.name == circuit_name), None)
        if circuit is None:
            raise RpcError(INVALID_PARAMS, f"no circuit {circuit_name!r}")
        if (why := self.missing()) is not None:
            raise RpcError(PROOF_ERROR, why)
        try:
            async with ZokratesWorker() as worker:  # the prover's may be mid-proof
                return await verify(worker, proof, circuit)
        except ZokratesError as exc:
            raise RpcError(INVALID_PARAMS, f"not a proof for {circuit_name}: {exc}") from None

    def control_methods(self, client: ProverClient) -> list[ControlMethod]:
        async def generate(params: GenerateParams, _: ControlSession) -> dict[str, Any]:
            outcome = await client.prove(QuantizedMlp(tuple(params.weights)), tuple(params.input))
            if isinstance(outcome, ProofFailure):
                raise RpcError(PROOF_ERROR, outcome.message)
            return _proof_json(outcome.proof_id, outcome.proven, outcome.seconds)

        async def check(params: VerifyParams, _: ControlSession) -> dict[str, Any]:
            return {"verified": await self.verify(params.circuit, params.proof)}

        async def get(params: GetParams, _: ControlSession) -> dict[str, Any]:
            row = await self._state.read(lambda conn: _load_proof(conn, params.proof_id))
            if row is None:
                raise RpcError(PROOF_ERROR, f"no proof {params.proof_id} on this node")
            return row

        return [
            ControlMethod(
                "proof.generate",
                GenerateParams,
                generate,
                "Prove one inference of an int8 16-16-4 MLP (weights, input); stored.",
            ),
            ControlMethod(
                "proof.verify", VerifyParams, check, "Check a proof against a circuit's key."
            ),
            ControlMethod("proof.get", GetParams, get, "A stored proof and its public values."),
        ]


def _proof_json(proof_id: int, proven: MlpProof, seconds: float) -> dict[str, Any]:
    return {
        "proof_id": proof_id,
        "circuit": circuits.MLP_INFERENCE.name,
        "weights_commitment": str(proven.weights_commitment),
        "input_hash": str(proven.input_hash),
        "logits": list(proven.logits),
        "public_inputs": [str(v) for v in proven.public_inputs],
        "proof": proven.proof,
        "seconds": round(seconds, 3),
    }


def _save_proof(conn: sqlite3.Connection, circuit: str, proven: MlpProof, seconds: float) -> int:
    public = {
        "weights_commitment": str(proven.weights_commitment),
        "input_hash": str(proven.input_hash),
        "logits": list(proven.logits),
    }
    cursor = conn.execute(
        "INSERT INTO proofs (circuit, public, proof, seconds, created_at) VALUES (?, ?, ?, ?, ?)",
        (circuit, json.dumps(public), json.dumps(proven.proof), seconds, time.time()),
    )
    assert cursor.lastrowid is not None
    return int(cursor.lastrowid)


def _load_proof(conn: sqlite3.Connection, proof_id: int) -> dict[str, Any] | None:
    row = conn.execute(
        "SELECT circuit, public, proof, seconds, created_at FROM proofs WHERE proof_id = ?",
        (proof_id,),
    ).fetchone()
    if row is None:
        return None
    circuit, public, proof, seconds, created_at = row
    return {
        "proof_id": proof_id,
        "circuit": circuit,
        **json.loads(public),
        "proof": json.loads(proof),
        "seconds": seconds,
        "created_at": created_at,
    }
