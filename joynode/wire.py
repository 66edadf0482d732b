"""The wire format: typed messages in a versioned msgpack envelope.

Everything a peer sends is decoded here and nowhere else. Decoding is strict:
wrong types, missing fields, values past their caps and frames past the size
cap all raise ``WireError`` with a reason, and nothing else is ever raised, so
a hostile peer can cost us a rejected frame but never a crashed actor.
Unknown fields are ignored, so newer peers may add fields without a version
bump; removing or retyping a field needs a new ``WIRE_VERSION``.
"""

from __future__ import annotations

from typing import Annotated, Final, TypeAlias

import msgspec

WIRE_VERSION: Final = 1
MAX_FRAME_BYTES: Final = 1 << 20

# Field caps shared by the message types.
ShortStr = Annotated[str, msgspec.Meta(max_length=256)]
ModelId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
U32 = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]
UInt = Annotated[int, msgspec.Meta(ge=0)]  # msgpack ints stop at 2**64 - 1


class WireError(Exception):
    """A frame that is not a valid message; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Message(msgspec.Struct, frozen=True, tag_field="type", forbid_unknown_fields=False):
    """Base of every message type; the ``type`` tag is the class's ``tag``."""


class Ping(Message, tag="ping", frozen=True):
    """Liveness probe over the request/response protocol."""

    nonce: UInt


class Pong(Message, tag="pong", frozen=True):
    """Answer to ``Ping`` with the same nonce."""

    nonce: UInt


class Heartbeat(Message, tag="heartbeat", frozen=True):
    """A node's periodic status, gossiped so peers can pick healthy committees."""

    seq: UInt
    version: ShortStr
    protocol: UInt
    addrs: Annotated[list[ShortStr], msgspec.Meta(max_length=16)]
    models: Annotated[list[ModelId], msgspec.Meta(max_length=64)]
    queue_depth: UInt
    capacity: UInt
    # The build its engines compare bit-exactly with (GPU, vLLM, torch, dtype), when they
    # run batch-invariant (``inference.batch_invariant``); None: tolerant checks only.
    build: ShortStr | None = None
    # The chain ids its ``/rpc`` gateway serves ([rpc] chains): peers fail over to it.
    chains: Annotated[list[U32], msgspec.Meta(max_length=32)] = msgspec.field(default_factory=list)


class Gossip(Message, tag="gossip", frozen=True):
    """A signed gossip payload: ``body`` is an encoded frame of another message.

    The signature (by the origin's node key) covers the network, the topic, the
    send time and the exact body bytes, so a message cannot move to another
    JoyNet network or topic, be re-dated, or be re-signed by a forwarder.
    ``network`` came with gossip protocol 2 (topics ``joynet/2/...``); protocol
    1 nodes gossip on other topics, so the two never mix.
    """

    network: ShortStr
    topic: ShortStr
    sent_ms: UInt
    body: Annotated[bytes, msgspec.Meta(max_length=MAX_FRAME_BYTES)]
    signature: Annotated[bytes, msgspec.Meta(min_length=65, max_length=65)]


class ErrorReply(Message, tag="error", frozen=True):
    """A request that the responder refused, with a machine code and a reason."""

    code: U32
    reason: Annotated[str, msgspec.Meta(max_length=1024)]


Bytes32 = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
Signature = Annotated[bytes, msgspec.Meta(min_length=65, max_length=65)]
Address = Annotated[str, msgspec.Meta(pattern=r"^0x[0-9a-fA-F]{40}$")]
MAX_COMMITTEE = 16
MAX_PROMPT_CHARS = 1 << 16
MAX_OUTPUT_TOKENS = 1 << 14
StopSequences: TypeAlias = Annotated[
    list[Annotated[str, msgspec.Meta(min_length=1, max_length=64)]], msgspec.Meta(max_length=4)
]


class ChatTurn(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    role: Annotated[str, msgspec.Meta(pattern=r"^(system|user|assistant)$")]
    content: Annotated[str, msgspec.Meta(max_length=MAX_PROMPT_CHARS)]


class Verification(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """How a job's committee checks its output: the model's registered policy.

    ``replicate``: every member generates and members vote on exact outputs.
    ``prefill``: the first-ranked member generates; the others teacher-force
    its output through their own model and endorse it when at most
    ``outside_bps`` of its positions (``sampled_outside_bps`` for sampled
    jobs) fall more than ``margin_milli`` / 1000 nats below their own top-1
    (``consensus.verification``).
    """

    mode: Annotated[str, msgspec.Meta(pattern="^(replicate|prefill)$")]
    margin_milli: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 0
    outside_bps: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 0
    sampled_outside_bps: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 0

    @classmethod
    def of(
        cls, mode: str, margin_nats: float, max_outside: float, max_outside_sampled: float
    ) -> Verification:
        """A policy from its config form (nats, fractions); replicate has no tolerance."""
        if mode == "replicate":
            return cls("replicate")
        return cls(
            mode,
            round(margin_nats * 1000),
            round(max_outside * 10_000),
            round(max_outside_sampled * 10_000),
        )

    def describe(self) -> str:
        if self.mode == "replicate":
            return "replicate"
        return (
            f"prefill (margin {self.margin_milli / 1000} nats; outside it at most "
            f"{self.outside_bps} bps greedy, {self.sampled_outside_bps} bps sampled)"
        )


REPLICATE: Final = Verification("replicate")  # what an offer without a policy asks for


class BlockRef(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """A chain block by number and hash: what an unpaid job's committee is drawn from."""

    number: UInt
    hash: Bytes32


class PrepaidTicket(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """What makes an offer prepaid: its client's signed ``InferenceRequest``
    (``joynode.signatures.PrepaidRequest``), less what the offer itself says (model,
    input hash, committee). Amounts and nonces are uint256, big-endian, as msgpack
    integers stop at 2**64 - 1."""

    chain_id: UInt
    contract: Address  # the PrepaidInference proxy
    client: Address
    max_price: Bytes32
    nonce: Bytes32
    deadline: UInt  # unix seconds: the request cannot settle later
    signature: Signature  # the client's, over the request's EIP-712 digest


# What is asked of a model, the same in a committee's offer and a forwarded local ask.
Prompt = Annotated[str, msgspec.Meta(max_length=MAX_PROMPT_CHARS)]
Turns = Annotated[list[ChatTurn], msgspec.Meta(max_length=64)]
MaxTokens = Annotated[int, msgspec.Meta(ge=1, le=MAX_OUTPUT_TOKENS)]
Temperature = Annotated[float, msgspec.Meta(ge=0, le=2)]
TopP = Annotated[float, msgspec.Meta(gt=0, le=1)]
TopK = Annotated[int, msgspec.Meta(ge=-1, le=1 << 20)]


class JobOffer(Message, tag="job_offer", frozen=True):
    """A verified-inference job for a committee, gossiped by the node that took it.

    Unpaid (``paid`` false): ``request_id`` must equal
    ``consensus.jobs.request_id_of`` over the other fields, committee and
    deadlines included, so a job cannot be passed off under another id; with a
    chain, ``committee_block`` is the recent block its committee was drawn from
    (``consensus.committee``). Paid: ``request_id`` is the
    marketplace's, and the chain's record of it must match the offer (input
    hash ``consensus.jobs.input_hash_of``, model, requester, committee), so any
    node may relay it and ``nonce`` is unused. Prepaid (``prepaid`` set): the
    client signed the request (``consensus.jobs.prepaid_request_of``), whose
    EIP-712 digest is ``request_id``; ``requester`` is the node relaying it,
    and the committee is drawn as for an unpaid job of the client.
    """

    request_id: Bytes32
    model: ModelId
    prompt: Prompt | None
    messages: Turns | None
    max_tokens: MaxTokens
    temperature: Temperature
    top_p: TopP
    top_k: TopK
    seed: UInt | None
    ignore_eos: bool
    requester: Address
    nonce: UInt
    committee: Annotated[list[Address], msgspec.Meta(min_length=1, max_length=MAX_COMMITTEE)]
    commit_deadline_ms: UInt
    reveal_deadline_ms: UInt
    paid: bool = False
    verification: Verification | None = None  # None: replicate
    committee_block: BlockRef | None = None  # unpaid and prepaid jobs on a chain
    prepaid: PrepaidTicket | None = None
    # Stop sequences (``SamplingSpec.stop``): part of the request, so of its id and input hash.
    stop: StopSequences | None = None
    # The requester wants the executor's tokens as they come (``JobTokens``): how the
    # output is delivered, not what it is, so not part of the id.
    stream: bool = False


class VoteCommit(Message, tag="vote_commit", frozen=True):
    """A member's sealed vote: ``commitment`` binds (request id, output hash, salt).

    ``signature`` is the member's EIP-712 ``Commit(requestId, commitment)``
    signature, the evidence ``ProofOfInference.reportEquivocation`` takes.
    """

    request_id: Bytes32
    commitment: Bytes32
    signature: Signature


class VoteReveal(Message, tag="vote_reveal", frozen=True):
    """A member opening its commit: the output and the salt, and its signed result.

    ``signature`` is the member's EIP-712 ``Result(requestId, outputHash)``
    signature, which goes into the certificate.
    """

    request_id: Bytes32
    token_ids: Annotated[list[U32], msgspec.Meta(max_length=MAX_OUTPUT_TOKENS)]
    text: Annotated[str, msgspec.Meta(max_length=MAX_OUTPUT_TOKENS * 64)]
    salt: Bytes32
    signature: Signature
    # The prompt's length in this member's tokenizer (for usage counts; not signed).
    prompt_tokens: U32 | None = None


class ClaimRefusal(Message, tag="claim_refusal", frozen=True):
    """A verifier refusing an output another member claimed for a ``prefill`` job, and why.

    The gossip envelope's signature says who refused; the claim is named by
    its member and output hash. Followers show refusals in the job's reason
    and take them out of the claimant's peer score.
    """

    request_id: Bytes32
    claimant: Address
    output_hash: Bytes32
    reason: ShortStr


class JobTokens(Message, tag="job_tokens", frozen=True):
    """The executor's output as it generates it, for a requester that asked (``stream``).

    Sent by the committee's first member straight to the requester, in order
    (``seq`` counts from 0), never gossiped. Not verified: the certificate
    that follows says what the committee agreed on, and the requester checks
    what it passed on against it.
    """

    request_id: Bytes32
    seq: UInt
    token_ids: Annotated[list[U32], msgspec.Meta(max_length=MAX_OUTPUT_TOKENS)]
    text: Annotated[str, msgspec.Meta(max_length=MAX_OUTPUT_TOKENS * 64)]


class RunRefusal(Message, tag="run_refusal", frozen=True):
    """A member that cannot run a job as it is asked (its engine refuses the request: a
    prompt too long for the model, a chat request to a model without a chat template).

    ``code`` is the engine's reason (``FailureCode``). Followers fail the job as
    soon as too few members are left to make a majority, instead of at the reveal
    deadline, and a gateway answers its client with the reason.
    """

    request_id: Bytes32
    code: Annotated[str, msgspec.Meta(max_length=32)]
    reason: ShortStr


class JobCancel(Message, tag="job_cancel", frozen=True):
    """The requester calling off a job it no longer wants (its client went away).

    Members take it from the job's requester only (the stream's peer or the
    gossip signer), stop their inference, and fail the job with ``reason``.
    """

    request_id: Bytes32
    reason: ShortStr


class Received(Message, tag="received", frozen=True):
    """The answer to a job message sent straight to a committee member: it was taken in
    (whether it counted is the receiver's business, as with gossip)."""


class JobVotesRequest(Message, tag="job_votes_request", frozen=True):
    """Asks a committee member for the votes it holds on a job (after a restart)."""

    request_id: Bytes32


class JobVotesReply(Message, tag="job_votes_reply", frozen=True):
    """The commits and reveals a node holds on a job; each vote carries its own signature."""

    commits: Annotated[list[VoteCommit], msgspec.Meta(max_length=MAX_COMMITTEE * 2)]
    reveals: Annotated[list[VoteReveal], msgspec.Meta(max_length=MAX_COMMITTEE)]


class CertifiedResult(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    request_id: Bytes32
    output_hash: Bytes32


MAX_VOUCHED = 256  # PrepaidInference.MAX_BATCH


class VoucherRequest(Message, tag="voucher_request", frozen=True):
    """Asks a committee member for its voucher over prepaid results it certified: one
    signature for a whole batch, instead of one per request (``PrepaidInference``'s
    ``Results(chain)``, the results folded in this order)."""

    results: Annotated[list[CertifiedResult], msgspec.Meta(min_length=1, max_length=MAX_VOUCHED)]


class Voucher(Message, tag="voucher", frozen=True):
    """The member's signature of the results asked for, in its prepaid contract's domain."""

    signature: Signature


class ZkJob(Message, tag="zk_job", frozen=True):
    """The input of a paid request for a zk model, for the nodes that prove that model.

    The chain holds only the input's Poseidon hash (the circuit's); a prover
    checks the input against it, so anyone may relay the job.
    """

    request_id: Bytes32
    model: ModelId
    input: Annotated[
        list[Annotated[int, msgspec.Meta(ge=-128, le=127)]],
        msgspec.Meta(min_length=16, max_length=16),
    ]


class LocalAsk(Message, tag="local_ask", frozen=True):
    """A gateway's ``local`` request for a model it does not serve (or while it is full):
    the peer answers alone, as it would its own client (``/joynet/rpc``)."""

    model: ModelId
    prompt: Prompt | None
    messages: Turns | None
    max_tokens: MaxTokens
    temperature: Temperature
    top_p: TopP
    top_k: TopK
    seed: UInt | None
    stop: StopSequences | None = None


class LocalAnswer(Message, tag="local_answer", frozen=True):
    """The peer's answer: its EIP-712 ``Result(request_id, keccak256(token ids))``
    signature, as a committee of one."""

    request_id: Bytes32
    text: Annotated[str, msgspec.Meta(max_length=MAX_PROMPT_CHARS)]
    token_ids: Annotated[list[UInt], msgspec.Meta(max_length=MAX_OUTPUT_TOKENS)]
    prompt_tokens: UInt
    finish_reason: Annotated[str, msgspec.Meta(pattern=r"^(stop|length)$")]
    signature: Signature


class LocalRefusal(Message, tag="local_refusal", frozen=True):
    """The peer did not answer a ``LocalAsk``: the HTTP status and OpenAI error code the
    gateway answers its client with (a bad request), or tries another peer (a full or
    failed engine)."""

    status: Annotated[int, msgspec.Meta(ge=400, le=599)]
    code: Annotated[str, msgspec.Meta(max_length=64)] | None
    reason: ShortStr


class ChainCall(Message, tag="chain_call", frozen=True):
    """A chain JSON-RPC call a gateway's own upstreams could not answer, for a peer that
    serves the chain to answer (``/joynet/rpc``; ``chainrpc/peers.py``)."""

    chain_id: U32
    method: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    params: Annotated[bytes, msgspec.Meta(max_length=64 << 10)]  # JSON


class ChainAnswer(Message, tag="chain_answer", frozen=True):
    """The peer's answer (JSON: ``{"result": ...}`` or ``{"error": ...}``) and its
    EIP-712 signatures: ``RpcAnswer`` over the call and the answer, and for a block,
    ``BlockClaim`` over its number and hash, which the SovereignRPC contract slashes
    on when the hash is wrong."""

    answer: Annotated[bytes, msgspec.Meta(max_length=MAX_FRAME_BYTES - 1024)]
    signature: Signature
    block_signature: Signature | None = None


AnyMessage: TypeAlias = (
    Ping
    | Pong
    | Heartbeat
    | Gossip
    | ErrorReply
    | JobOffer
    | VoteCommit
    | VoteReveal
    | ClaimRefusal
    | JobCancel
    | JobTokens
    | RunRefusal
    | Received
    | JobVotesRequest
    | JobVotesReply
    | ZkJob
    | VoucherRequest
    | Voucher
    | LocalAsk
    | LocalAnswer
    | LocalRefusal
    | ChainCall
    | ChainAnswer
)
MESSAGE_TYPES: Final[tuple[type[Message], ...]] = (
    Ping,
    Pong,
    Heartbeat,
    Gossip,
    ErrorReply,
    JobOffer,
    VoteCommit,
    VoteReveal,
    ClaimRefusal,
    JobCancel,
    JobTokens,
    RunRefusal,
    Received,
    JobVotesRequest,
    JobVotesReply,
    ZkJob,
    VoucherRequest,
    Voucher,
    LocalAsk,
    LocalAnswer,
    LocalRefusal,
    ChainCall,
    ChainAnswer,
)


class _Envelope(msgspec.Struct, frozen=True):
    v: int
    msg: msgspec.Raw


class _Outgoing(msgspec.Struct, frozen=True):
    v: int
    msg: Message


_envelope_decoder = msgspec.msgpack.Decoder(_Envelope)
_message_decoder = msgspec.msgpack.Decoder(AnyMessage)
_encoder = msgspec.msgpack.Encoder()
# msgspec reports invalid UTF-8 in a str field as UnicodeDecodeError, not DecodeError.
_DECODE_ERRORS = (msgspec.DecodeError, UnicodeDecodeError)


def encode(message: Message) -> bytes:
    """Encode ``message`` in the current envelope; refuse frames past the cap."""
    frame = _encoder.encode(_Outgoing(WIRE_VERSION, message))
    if len(frame) > MAX_FRAME_BYTES:
        raise WireError(f"frame of {len(frame)} bytes exceeds cap of {MAX_FRAME_BYTES}")
    return frame


def decode(frame: bytes, max_bytes: int = MAX_FRAME_BYTES) -> AnyMessage:
    """Decode one frame; raise ``WireError`` (only) for anything invalid."""
    if len(frame) > max_bytes:
        raise WireError(f"frame of {len(frame)} bytes exceeds cap of {max_bytes}")
    try:
        envelope = _envelope_decoder.decode(frame)
    except _DECODE_ERRORS as exc:
        raise WireError(f"bad envelope: {exc}") from None
    if envelope.v != WIRE_VERSION:
        raise WireError(f"unsupported wire version {envelope.v} (speaking {WIRE_VERSION})")
    try:
        message: AnyMessage = _message_decoder.decode(envelope.msg)
    except _DECODE_ERRORS as exc:
        raise WireError(f"bad message: {exc}") from None
    return message
