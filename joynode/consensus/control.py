"""The consensus actor's control methods: infer.submit, prepaid.quote, job.get, job.wait,
jobs.list."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import pydantic
import trio

from joynode import wire
from joynode.consensus.jobs import prepaid_request_of
from joynode.control.jsonrpc import RpcError
from joynode.control.methods import ControlMethod, ControlSession
from joynode.messages import MAX_STOPS, ChatMessage, StopSequence

if TYPE_CHECKING:
    from joynode.consensus.service import ConsensusService

JOB_ERROR = -32040  # JSON-RPC application error: the job is unknown or failed


ADDRESS = r"^0x[0-9a-fA-F]{40}$"
UINT256 = 2**256 - 1
JS_SAFE_INT = 2**53 - 1  # Number.MAX_SAFE_INTEGER


class BlockParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    number: int = pydantic.Field(ge=0, le=2**63 - 1)
    hash: str = pydantic.Field(pattern=r"^0x[0-9a-fA-F]{64}$")


class SignedPrepaid(pydantic.BaseModel):
    """A prepaid request its client signed: what ``prepaid.quote`` returned to sign, and the
    signature (65 bytes, r || s || v, of its EIP-712 typed data)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    client: str = pydantic.Field(pattern=ADDRESS)
    max_price: int = pydantic.Field(ge=0, le=UINT256)
    nonce: int = pydantic.Field(ge=0, le=UINT256)
    deadline: int = pydantic.Field(ge=0, le=2**63 - 1)
    committee: list[str] = pydantic.Field(min_length=1, max_length=wire.MAX_COMMITTEE)
    committee_block: BlockParams
    signature: str = pydantic.Field(pattern=r"^0x[0-9a-fA-F]{130}$")

    @pydantic.field_validator("committee")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        for member in value:
            if re.fullmatch(ADDRESS, member) is None:
                raise ValueError(f"{member!r} is not an address")
        return value


class SpendFor(pydantic.BaseModel):
    """Pay from ``client``'s prepaid balance, this node signing the request as the spender
    the client approved (``approveSpender``; the gateway's signed-in wallets)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    client: str = pydantic.Field(pattern=ADDRESS)


class SubmitParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    model: str = pydantic.Field(min_length=1, max_length=128)
    prompt: str | None = pydantic.Field(None, max_length=wire.MAX_PROMPT_CHARS)
    messages: list[ChatMessage] | None = pydantic.Field(None, max_length=64)

    @pydantic.field_validator("messages")
    @classmethod
    def _turns_fit_the_wire(cls, value: list[ChatMessage] | None) -> list[ChatMessage] | None:
        for turn in value or []:
            if len(turn.content) > wire.MAX_PROMPT_CHARS:
                raise ValueError(f"a message is longer than {wire.MAX_PROMPT_CHARS} characters")
        return value

    max_tokens: int = pydantic.Field(64, ge=1, le=wire.MAX_OUTPUT_TOKENS)
    temperature: float = pydantic.Field(0.0, ge=0.0, le=2.0)
    top_p: float = pydantic.Field(1.0, gt=0.0, le=1.0)
    top_k: int = pydantic.Field(-1, ge=-1, le=1 << 20)
    seed: int | None = pydantic.Field(None, ge=0, le=2**63 - 1)
    ignore_eos: bool = False
    stop: tuple[StopSequence, ...] = pydantic.Field((), max_length=MAX_STOPS)
    stream: bool = pydantic.Field(
        False, description="the executor sends this node its tokens as it makes them"
    )
    committee_size: int | None = pydantic.Field(
        None, ge=1, le=wire.MAX_COMMITTEE, description="unpaid jobs (paid: the model's)"
    )
    nonce: int | None = pydantic.Field(
        None, ge=0, le=2**63 - 1, description="unpaid, prepaid: unused per requester"
    )
    paid: bool = pydantic.Field(False, description="pay through the marketplace from this node")
    max_price: int | None = pydantic.Field(
        None,
        ge=0,
        le=UINT256,
        description="paid, prepaid: most JOY base units to pay (default: the price)",
    )
    onchain_request_id: str | None = pydantic.Field(
        None,
        pattern=r"^0x[0-9a-fA-F]{64}$",
        description="relay a request someone already paid for; this prompt must match it",
    )

    prepaid: bool | SignedPrepaid | SpendFor = pydantic.Field(
        False,
        description="pay from a prepaid balance: true signs as this node's account (max_price "
        "and nonce apply); or a client's signed request (prepaid.quote); or {client}: this "
        "node signs for a client that approved it as its spender",
    )

    @pydantic.model_validator(mode="after")
    def _one_way_to_pay(self) -> SubmitParams:
        ways = [self.paid, self.onchain_request_id is not None, self.prepaid is not False]
        if sum(ways) > 1:
            raise ValueError("give one of paid, onchain_request_id and prepaid")
        return self


class QuoteParams(SubmitParams):
    """A prepaid request to sign: the job as for infer.submit, and its client."""

    client: str = pydantic.Field(pattern=ADDRESS, description="the account that signs and pays")
    deadline: int | None = pydantic.Field(
        None, ge=0, le=2**63 - 1, description="unix seconds (default: prepaid.request_ttl_s)"
    )


class JobParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    request_id: str = pydantic.Field(pattern=r"^0x[0-9a-fA-F]{64}$")
    timeout_s: float = pydantic.Field(300.0, gt=0, le=3600)


class ListParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    limit: int = pydantic.Field(50, ge=1, le=1000)


def consensus_methods(consensus: ConsensusService) -> list[ControlMethod]:
    async def infer_submit(params: SubmitParams, _: ControlSession) -> dict[str, Any]:
        job = await consensus.submit(params)
        return {
            "request_id": "0x" + job.request_id.hex(),
            "model": job.offer.model,
            "committee": list(job.tally.committee),
        }

    async def prepaid_quote(params: QuoteParams, _: ControlSession) -> dict[str, Any]:
        offer = await consensus.quote_prepaid(params)
        assert offer.prepaid is not None
        assert offer.committee_block is not None
        request = prepaid_request_of(offer)
        ticket, block = offer.prepaid, offer.committee_block
        return {
            "request_id": "0x" + offer.request_id.hex(),
            "typed_data": json_typed_data(request.typed_data()),
            "prepaid": {
                "client": ticket.client,
                "max_price": str(request.max_price),  # uint256: decimal strings, as in typed_data
                "nonce": str(request.nonce),
                "deadline": ticket.deadline,
                "committee": list(offer.committee),
                "committee_block": {"number": block.number, "hash": "0x" + block.hash.hex()},
            },
        }

    async def job_get(params: JobParams, _: ControlSession) -> dict[str, Any]:
        return await _job_json(consensus, params.request_id)

    async def job_wait(params: JobParams, session: ControlSession) -> dict[str, Any]:
        job = consensus.jobs.get(bytes.fromhex(params.request_id[2:]))
        if job is None:
            return await _job_json(consensus, params.request_id)  # long finished
        with trio.move_on_after(params.timeout_s):
            while not job.settled():
                changed = job.changed
                await session.notify("job.progress", job.progress())
                await changed.wait()
        return job.to_json()

    async def jobs_list(params: ListParams, _: ControlSession) -> list[dict[str, Any]]:
        newest = sorted(consensus.jobs.values(), key=lambda j: j.created_at, reverse=True)
        return [job.to_json() for job in newest[: params.limit]]

    return [
        ControlMethod(
            "infer.submit",
            SubmitParams,
            infer_submit,
            "Offer a verified inference to a committee; returns its request id.",
        ),
        ControlMethod(
            "prepaid.quote",
            QuoteParams,
            prepaid_quote,
            "A prepaid job for a client to sign (EIP-712 typed data), and what to submit "
            "with its signature (infer.submit prepaid).",
        ),
        ControlMethod("job.get", JobParams, job_get, "A job's state, votes and certificate."),
        ControlMethod(
            "job.wait", JobParams, job_wait, "Wait (up to timeout_s) for a job to finish."
        ),
        ControlMethod("jobs.list", ListParams, jobs_list, "The newest jobs this node follows."),
    ]


async def _job_json(consensus: ConsensusService, request_id: str) -> dict[str, Any]:
    """A job as JSON: from memory, or the stored outcome of an older one."""
    found = await consensus.job_json(bytes.fromhex(request_id[2:]))
    if found is None:
        raise RpcError(JOB_ERROR, f"no job {request_id} on this node")
    return found


def json_typed_data(typed: dict[str, Any]) -> dict[str, Any]:
    """EIP-712 typed data as JSON, as eth-account and viem take it: bytes as 0x-hex, and
    integers beyond JavaScript's safe range as decimal strings (JSON.parse would round
    them, and the client would sign another request)."""

    def plain(value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > JS_SAFE_INT:
            return str(value)
        if isinstance(value, bytes):
            return "0x" + value.hex()
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value

    return dict(plain(typed))
