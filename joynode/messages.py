"""Typed messages that actors exchange over in-process memory channels.

Messages that cross the network live in ``joynode.wire``; these never leave the
process, so they may carry trio objects (a request carries its reply channel).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal, TypeAlias

import pydantic
import trio
from eth_utils.crypto import keccak

MAX_STOPS = 4  # as OpenAI's API allows
StopSequence: TypeAlias = Annotated[str, pydantic.StringConstraints(min_length=1, max_length=64)]


@dataclass(frozen=True)
class ShutdownRequest:
    """Ask the node to stop cleanly (sent by the control socket's ``node.shutdown``)."""

    reason: str


@dataclass(frozen=True)
class ServingStatus:
    """What this node serves and how busy it is, as its heartbeat tells peers."""

    models: tuple[str, ...]
    queue_depth: int
    capacity: int
    build: str | None = None  # what exact comparison needs to match (``VllmEngine.build``)
    chains: tuple[int, ...] = ()  # the chain ids its /rpc gateway serves


class SamplingSpec(pydantic.BaseModel):
    """How to decode. Greedy (temperature 0) or seeded sampling is deterministic."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = pydantic.Field(64, ge=1)
    temperature: float = pydantic.Field(0.0, ge=0.0, le=2.0)
    top_p: float = pydantic.Field(1.0, gt=0.0, le=1.0)
    top_k: int = pydantic.Field(-1, ge=-1, le=100_000, description="-1: no top-k cut")
    seed: int | None = pydantic.Field(None, ge=0, le=2**63 - 1)
    ignore_eos: bool = False
    # Stop sequences: the output ends just before the first one it would contain
    # (vLLM's ``stop``). Token ids include the token that completed it; the text does not.
    stop: tuple[StopSequence, ...] = pydantic.Field((), max_length=MAX_STOPS)

    @pydantic.model_validator(mode="after")
    def _sampling_is_seeded(self) -> SamplingSpec:
        if self.temperature > 0 and self.seed is None:
            raise ValueError("sampling (temperature > 0) needs a seed, so that peers can agree")
        return self


class ChatMessage(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    role: Literal["system", "user", "assistant"]
    content: str = pydantic.Field(max_length=1 << 20)


@dataclass(frozen=True)
class InferenceRequest:
    """Run ``prompt`` (plain text) or ``messages`` (through the chat template) on ``model``.

    Events go to ``reply``: ``TokenDelta``s, then one ``InferenceResult`` or one
    ``InferenceFailure``. Closing the receiving end cancels the request.
    """

    model: str
    prompt: str | None
    messages: tuple[ChatMessage, ...] | None
    sampling: SamplingSpec
    reply: trio.MemorySendChannel[InferenceEvent]
    # Set: score these claimed output tokens (one prefill pass) instead of generating.
    teacher_forced: tuple[int, ...] | None = None


@dataclass(frozen=True)
class TokenDelta:
    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class InferenceResult:
    model: str
    model_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str
    prompt_tokens: int
    first_token_s: float
    total_s: float

    @property
    def output_hash(self) -> bytes:
        """What consensus votes on: keccak256 of the token ids, each a 4-byte big-endian word."""
        return output_hash(self.token_ids)


@dataclass(frozen=True)
class ClaimScores:
    """This node's own view of a claimed output, teacher-forced on the claimed prefix.

    For each claimed token: its log-probability, the log-probability of this
    model's top-1 token at that position (raw logits, before any sampling
    transform), and that token's rank (1: it is the top-1). ``eos_token_ids``:
    the tokens that end this model's output. ``stop_index``: for a request with
    stop sequences, the first claimed token whose text completes one (None: none
    does), decoded by this node's tokenizer.
    """

    model: str
    token_logprobs: tuple[float, ...]
    top_logprobs: tuple[float, ...]
    ranks: tuple[int, ...]
    eos_token_ids: frozenset[int]
    prompt_tokens: int
    total_s: float
    stop_index: int | None = None


class FailureCode(enum.Enum):
    UNKNOWN_MODEL = "unknown_model"
    INVALID_REQUEST = "invalid_request"
    PROMPT_TOO_LONG = "prompt_too_long"
    BUSY = "busy"
    ENGINE_ERROR = "engine_error"


@dataclass(frozen=True)
class InferenceFailure:
    code: FailureCode
    message: str


InferenceEvent: TypeAlias = TokenDelta | InferenceResult | ClaimScores | InferenceFailure


class InferenceFailed(Exception):
    """What ``InferenceClient`` raises for a request the inference actor could not serve."""

    def __init__(self, failure: InferenceFailure) -> None:
        super().__init__(f"{failure.code.value}: {failure.message}")
        self.failure = failure


def output_hash(token_ids: Sequence[int]) -> bytes:
    return keccak(b"".join(token.to_bytes(4, "big") for token in token_ids))


@dataclass(frozen=True)
class ChainEvent:
    """A contract event the watcher applied (or retracted, when a reorg removed its block)."""

    contract: str
    name: str
    block: int
    block_hash: str
    tx_hash: str
    log_index: int
    args: dict[str, object]
    removed: bool = False


class RequestStatus(enum.IntEnum):
    """``ModelMarketplace.Status`` of a paid request."""

    NONE = 0
    PENDING = 1
    SETTLED = 2
    REFUNDED = 3


@dataclass(frozen=True)
class ZkModelInfo:
    """A zk model's registration in the marketplace: what its proofs must show."""

    weights_commitment: int
    verifier: str
    active: bool


@dataclass(frozen=True)
class ZkSettlement:
    """How a zk request was settled: the prover, the proven logits and the transaction."""

    prover: str
    logits: tuple[int, ...]  # signed
    tx: str


def model_key(model_id: str) -> bytes:
    """The bytes32 a model id (CID) has on-chain: keccak256 of the id string."""
    return bytes(keccak(text=model_id))


@dataclass(frozen=True)
class OnchainRequest:
    """A paid request as ``ModelMarketplace.requestInfo`` shows it, read at one moment.

    ``seconds_left`` is the time to its deadline by the chain's clock (the
    later of the head block's timestamp and this machine's), which is what
    the contract checks; a node turns it into its own clock's deadline.
    """

    request_id: bytes
    model: bytes  # keccak256 of the model id (CID)
    requester: str
    input_hash: bytes
    price: int
    deadline: int  # chain time, seconds
    status: RequestStatus
    committee: tuple[str, ...]  # checksummed, in the contract's rank order
    seconds_left: float


@dataclass(frozen=True)
class PrepaidTerms:
    """What a prepaid request for a model must name and cover now (``PrepaidInference``)."""

    chain_id: int
    contract: str  # the PrepaidInference proxy
    price: int  # wei of JOY, the model's price now
    committee_size: int  # the model's registered committee size
    servable: bool
    default_deadline: int  # unix seconds: for requests that do not name one


@dataclass(frozen=True)
class PrepaidRefusal:
    """Why a node will not run a prepaid request: ``reason`` a metric label, ``detail`` for
    the client (it reaches it before any inference runs)."""

    reason: str
    detail: str
