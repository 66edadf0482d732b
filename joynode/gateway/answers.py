"""Answering an ``Ask``: by a committee (a verified job), or by this node alone.

``committee`` (the default): the request becomes an unpaid job of this node's
consensus actor, drawn, run and voted on by the nodes that serve the model
(this gateway need not serve it: that is the routing), and the answer is the
certified output. A job that fails (its executor died, no majority) is
submitted once more, under a new nonce and so a new committee draw, before
the client hears a 503 with the reason.

``local``: this node's own engine runs it (404 if it does not serve the
model), and the node signs the result alone: a certificate of a committee of
one, in the same EIP-712 ``Result`` form, kept in SQLite (``local_answers``)
so it can be fetched later.

Either way the answer carries a certificate any client checks offline:
recover each signature over ``Result(requestId, outputHash)`` in the domain
given, and compare ``outputHash`` with keccak256 of the token ids as 4-byte
big-endian words (docs/openai.md shows the few lines it takes).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, aclosing
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
import trio
from eth_utils.crypto import keccak

from joynode.consensus.control import JOB_ERROR, SpendFor, SubmitParams
from joynode.consensus.job import Job
from joynode.consensus.tally import quorum_of
from joynode.control.jsonrpc import RpcError
from joynode.gateway.errors import OpenAIError
from joynode.gateway.requests import Ask
from joynode.keys import NodeKey
from joynode.messages import (
    ChatMessage,
    FailureCode,
    InferenceEvent,
    InferenceFailure,
    InferenceResult,
    SamplingSpec,
    TokenDelta,
    output_hash,
)
from joynode.signatures import Eip712Domain, sign
from joynode.state import StateStore

log = logging.getLogger(__name__)

RETRIES = 1  # a failed committee job is submitted again this many times
# A prepaid refusal (``PrepaidRefusal.reason``), as the node or a member said it
_PAYMENT_REFUSED = re.compile(r"\b(insufficient_balance|over_spender_cap|bad_client_signature)\b")
_PAYMENT_STATUS = {
    "insufficient_balance": (429, "insufficient_quota"),  # as OpenAI says "add credit"
    "over_spender_cap": (429, "insufficient_quota"),
    "bad_client_signature": (402, "spender_not_approved"),
}
_canonical = msgspec.msgpack.Encoder()
_FAILURE_STATUS = {
    FailureCode.UNKNOWN_MODEL: (404, "model_not_found"),
    FailureCode.INVALID_REQUEST: (400, None),
    FailureCode.PROMPT_TOO_LONG: (400, "context_length_exceeded"),
    FailureCode.BUSY: (503, "overloaded"),
    FailureCode.ENGINE_ERROR: (503, "engine_error"),
}


class VerifiedJobs(Protocol):
    """What the gateway needs of the consensus actor (``ConsensusService``)."""

    async def submit(self, params: SubmitParams) -> Job: ...

    async def cancel(self, request_id: bytes, reason: str) -> bool: ...

    async def job_json(self, request_id: bytes) -> dict[str, Any] | None: ...


class LocalEngine(Protocol):
    """What the gateway needs of the inference actor (``InferenceClient``)."""

    def stream(
        self,
        model: str,
        prompt: str | None,
        messages: Sequence[ChatMessage] | None,
        sampling: SamplingSpec,
    ) -> AbstractAsyncContextManager[trio.MemoryReceiveChannel[InferenceEvent]]: ...


@dataclass(frozen=True)
class Answer:
    """A certified output and what the client is told of it."""

    request_id: bytes
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    finish_reason: str  # "stop" or "length", as OpenAI names them
    verification: str
    certificate: dict[str, Any]  # ``Certificate.to_json``'s shape
    settlement: str  # "unpaid", or a paid job's escrow status

    def extension(self, domain: Eip712Domain, seed: int | None) -> dict[str, Any]:
        """The ``joynet`` field of a response: all a client needs to check the answer."""
        return {
            "request_id": "0x" + self.request_id.hex(),
            "verification": self.verification,
            "status": "certified",
            "settlement": self.settlement,
            "seed": seed,
            "token_ids": list(self.token_ids),
            "certificate": self.certificate,
            "quorum": quorum_of(len(self.certificate["committee"])),
            "domain": domain_json(domain),
        }


class Answerer:
    """Runs asks by committee or locally, and finds certificates again."""

    def __init__(
        self,
        jobs: VerifiedJobs,
        engine: LocalEngine,
        key: NodeKey,
        state: StateStore,
        domain: Callable[[], Eip712Domain],
        model_id_of: Callable[[str], str | None],
    ) -> None:
        """``model_id_of(name_or_id)``: the id (CID) of a model this node or a peer serves."""
        self._jobs = jobs
        self._engine = engine
        self._key = key
        self._state = state
        self.domain = domain
        self.model_id_of = model_id_of

    # ---- committee

    async def committee(
        self, ask: Ask, model_id: str, *, stream: bool = False, pay_for: str | None = None
    ) -> AsyncIterator[TokenDelta | Answer]:
        """The committee's certified answer; with ``stream``, first the executor's tokens
        as it makes them (passed on unverified, then checked against the certificate).
        ``pay_for``: a wallet that approved this node as its spender pays, from its
        prepaid balance (else the job is unpaid).

        A job that fails before any token was passed on is submitted again (a new
        nonce: a new draw). A client going away (this generator cancelled or closed)
        calls the job off on every member.
        """
        reasons: list[str] = []
        for _ in range(1 + RETRIES):
            job = await self._submit(ask, model_id, stream, pay_for)
            passed = 0  # chunks of job.streamed passed on
            try:
                while True:
                    changed = job.changed
                    while passed < len(job.streamed):
                        token_ids, text = job.streamed[passed]
                        passed += 1
                        yield TokenDelta(text, token_ids)
                    if job.done.is_set():
                        break
                    await changed.wait()
            finally:
                if not job.done.is_set():
                    with trio.CancelScope(shield=True):
                        await self._jobs.cancel(job.request_id, "the client went away")
            if job.status == "certified":
                answer = self._answer_of(job, ask)
                rest = _rest_of(answer, job.streamed[:passed])
                if rest is None:
                    raise OpenAIError(
                        502,
                        "the executor streamed an output that was not the certified one; "
                        f"the certificate is at /v1/joynet/certificates/0x{job.request_id.hex()}",
                        "stream_not_certified",
                    )
                if rest.token_ids or rest.text:
                    yield rest
                yield answer
                return
            log.info("gateway: job 0x%s failed: %s", job.request_id.hex()[:12], job.reason)
            if job.cannot_run:  # the request itself: asking again would fail the same way
                codes = [code for code, _ in job.cannot_run.values()]
                status, code = _status_of(max(set(codes), key=codes.count))
                raise OpenAIError(status, job.reason, code)
            if passed:
                raise OpenAIError(
                    503, f"the job failed after its stream began: {job.reason}", "job_failed"
                )
            reasons.append(job.reason)
        raise OpenAIError(
            503,
            "no committee certified an answer: " + "; then ".join(reasons),
            "verification_failed",
        )

    async def _submit(self, ask: Ask, model_id: str, stream: bool, pay_for: str | None) -> Job:
        s = ask.sampling
        params = SubmitParams(
            model=model_id,
            prompt=ask.prompt,
            messages=list(ask.messages) if ask.messages is not None else None,
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            seed=s.seed,
            stop=s.stop,
            stream=stream,
            committee_size=ask.committee_size,
            prepaid=False if pay_for is None else SpendFor(client=pay_for),
        )
        try:
            return await self._jobs.submit(params)
        except RpcError as exc:
            if exc.code != JOB_ERROR:
                raise OpenAIError(400, exc.message, None) from None
            refused = _PAYMENT_REFUSED.search(exc.message)
            if refused is not None:  # the wallet's balance or approval, not the network
                status, code = _PAYMENT_STATUS.get(refused[1], (402, refused[1]))
                raise OpenAIError(status, exc.message, code) from None
            raise OpenAIError(503, exc.message, "no_committee") from None

    def _answer_of(self, job: Job, ask: Ask) -> Answer:
        shown = job.to_json()
        output = shown["output"]
        if output["token_ids"] is None:  # certified on-chain while this node was cut off
            raise OpenAIError(503, "the committee's answer never reached this node", None)
        token_ids = tuple(output["token_ids"])
        payment = shown["payment"]
        settlement = payment["status"] if payment else "unpaid"
        if shown["prepaid"] is not None:
            settlement = "prepaid"  # settled in a batch later (prepaid.settlements)
        return Answer(
            request_id=job.request_id,
            text=output["text"],
            token_ids=token_ids,
            prompt_tokens=output["prompt_tokens"] or 0,
            finish_reason="length" if len(token_ids) >= ask.sampling.max_tokens else "stop",
            verification="committee",
            certificate=shown["certificate"],
            settlement=settlement,
        )

    # ---- local

    def _local_request_id(self, ask: Ask, model_id: str) -> bytes:
        """A new local request's id: keccak256 over what was asked, of whom, and a nonce."""
        turns = [(m.role, m.content) for m in ask.messages] if ask.messages is not None else None
        fields = (
            "joynet-local",
            self._key.address.lower(),
            model_id,
            ask.prompt,
            turns,
            ask.sampling.model_dump(mode="json"),
            int.from_bytes(os.urandom(8), "big"),
        )
        return bytes(keccak(_canonical.encode(fields)))

    async def local(self, ask: Ask, model_id: str) -> AsyncIterator[TokenDelta | Answer]:
        """This node's engine's tokens as they come, then the answer it signed alone.
        Leaving early (the client went away) aborts the request inside vLLM."""
        request_id = self._local_request_id(ask, model_id)
        async with self._engine.stream(model_id, ask.prompt, ask.messages, ask.sampling) as events:
            async for event in events:
                if isinstance(event, TokenDelta):
                    yield event
                elif isinstance(event, InferenceResult):
                    yield await self._signed(request_id, event)
                    return
                elif isinstance(event, InferenceFailure):
                    status, code = _FAILURE_STATUS[event.code]
                    raise OpenAIError(status, event.message, code)
        raise OpenAIError(503, "the engine ended the request without a result", "engine_error")

    async def _signed(self, request_id: bytes, result: InferenceResult) -> Answer:
        digest = output_hash(result.token_ids)
        signature = sign(self._key, self.domain().result_digest(request_id, digest))
        certificate = {
            "request_id": "0x" + request_id.hex(),
            "model": result.model_id,
            "output_hash": "0x" + digest.hex(),
            "committee": [self._key.address],
            "signers": [self._key.address],
            "signatures": ["0x" + signature.hex()],
        }
        answer = Answer(
            request_id=request_id,
            text=result.text,
            token_ids=result.token_ids,
            prompt_tokens=result.prompt_tokens,
            finish_reason="length" if result.finish_reason == "length" else "stop",
            verification="local",
            certificate=certificate,
            settlement="unpaid",
        )
        await self.keep(answer, result.model_id)
        return answer

    async def keep(self, answer: Answer, model_id: str) -> None:
        """Keep a ``local`` answer (this node's, or a peer's it passed on) for
        ``/v1/joynet/certificates``."""
        stored = json.dumps(
            {
                "certificate": answer.certificate,
                "text": answer.text,
                "token_ids": list(answer.token_ids),
            }
        )

        def save(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR IGNORE INTO local_answers (request_id, model, certificate, created_at) "
                "VALUES (?, ?, ?, ?)",
                (answer.request_id, model_id, stored, time.time()),
            )

        await self._state.write(save)

    # ---- later

    async def certificate(self, request_id: bytes) -> dict[str, Any] | None:
        """What ``GET /v1/joynet/certificates/{id}`` shows: a committee job (pending,
        certified or failed) or a local answer; None if this node knows neither."""
        domain = domain_json(self.domain())
        job = await self._jobs.job_json(request_id)
        if job is not None:
            payment = job.get("payment")
            output = job.get("output") or {}
            return {
                "request_id": job["request_id"],
                "verification": "committee",
                "status": job["status"],
                "reason": job["reason"],
                "model": job["model"],
                "settlement": payment["status"] if payment else "unpaid",
                "token_ids": output.get("token_ids"),
                "text": output.get("text"),
                "certificate": job["certificate"],
                "quorum": quorum_of(len(job["committee"])),
                "domain": domain,
            }

        def read(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                "SELECT certificate FROM local_answers WHERE request_id = ?", (request_id,)
            ).fetchone()
            return row[0] if row is not None else None

        stored = await self._state.read(read)
        if stored is None:
            return None
        local = json.loads(stored)
        return {
            "request_id": "0x" + request_id.hex(),
            "verification": "local",
            "status": "certified",
            "reason": "",
            "model": local["certificate"]["model"],
            "settlement": "unpaid",
            "token_ids": local["token_ids"],
            "text": local["text"],
            "certificate": local["certificate"],
            "quorum": 1,
            "domain": domain,
        }


def _status_of(code: str) -> tuple[int, str | None]:
    """The HTTP status and OpenAI code for a member's ``RunRefusal`` code (a peer's word)."""
    try:
        return _FAILURE_STATUS[FailureCode(code)]
    except ValueError:
        return 400, None


async def last_answer(events: AsyncIterator[TokenDelta | Answer]) -> Answer:
    """The answer at the end of ``events`` (``committee`` or ``local``), tokens skipped."""
    async with aclosing(events):  # type: ignore[type-var]
        async for event in events:
            if isinstance(event, Answer):
                return event
    raise OpenAIError(503, "the request ended without an answer", "engine_error")


def _rest_of(answer: Answer, streamed: list[tuple[tuple[int, ...], str]]) -> TokenDelta | None:
    """What the client still needs after ``streamed`` to have the certified output (None:
    what it was streamed is not a beginning of it). Empty when it has it all."""
    token_ids = tuple(t for ids, _ in streamed for t in ids)
    text = "".join(piece for _, piece in streamed)
    n = len(token_ids)
    if answer.token_ids[:n] != token_ids or not answer.text.startswith(text):
        return None
    return TokenDelta(answer.text[len(text) :], answer.token_ids[n:])


def domain_json(domain: Eip712Domain) -> dict[str, Any]:
    return {
        "name": domain.name,
        "version": domain.version,
        "chainId": domain.chain_id,
        "verifyingContract": domain.verifying_contract,
    }
