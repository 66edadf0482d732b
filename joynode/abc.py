"""The interfaces the node is built from, in one place."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import trio

if TYPE_CHECKING:
    from web3 import Web3

    from joynode import wire
    from joynode.chain.committee import Candidate
    from joynode.chain.deploy import Deployment
    from joynode.consensus.tally import Certificate, Equivocation
    from joynode.messages import (
        ChatMessage,
        ClaimScores,
        InferenceResult,
        OnchainRequest,
        PrepaidRefusal,
        PrepaidTerms,
        SamplingSpec,
        TokenDelta,
        ZkModelInfo,
        ZkSettlement,
    )
    from joynode.p2p.gossip import Topic
    from joynode.p2p.peers import PeerTable
    from joynode.p2p.scoring import Offence, PeerScorer
    from joynode.signatures import PrepaidRequest, SpenderApproval
    from joynode.zk.mlp import MlpProof

T = TypeVar("T")


class Actor(Protocol):
    """A long-running service of the node.

    ``run`` calls ``task_status.started()`` once the actor can do its job (its
    sockets listen, its database is open) and then runs until cancelled. An
    exception out of ``run`` means the actor is broken and stops the node.
    """

    @property
    def name(self) -> str: ...

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None: ...


class NetStream(Protocol):
    """The part of a libp2p stream the node's protocols use."""

    async def read(self, n: int | None = None) -> bytes: ...

    async def write(self, data: bytes) -> None: ...

    async def close(self) -> None: ...

    def get_protocol(self) -> str: ...


StreamHandler = Callable[[Any], Awaitable[None]]


class ContentNetwork(Protocol):
    """What the storage actor needs of the p2p actor (``P2PService`` provides it)."""

    peer_id: str

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None: ...

    async def open_stream(self, peer_id: str, protocols: Sequence[str]) -> NetStream: ...

    def connected_peers(self) -> list[str]: ...

    async def provide(self, key: bytes) -> bool: ...

    async def find_providers(self, key: bytes, count: int) -> list[tuple[str, list[str]]]: ...

    async def connect(self, addr: str) -> str: ...

    def penalize(self, peer: str, offence: Offence) -> None: ...

    def is_banned(self, peer: str) -> bool: ...


class ModelUnavailable(Exception):
    """A model given by CID that this node cannot have whole and intact; the message says why.

    ``setting`` names the config key at fault when there is one (a block store
    too small for the model: ``storage.quota_gib``); None when the network or
    the disk is to blame (no peer has it, the local copy is damaged and no
    peer has the missing blocks).
    """

    def __init__(self, message: str, setting: str | None = None) -> None:
        super().__init__(message)
        self.setting = setting


ModelFetcher = Callable[[str], Awaitable[Path]]
"""The local folder of the model with this CID, verified against it; raises ``ModelUnavailable``."""


class InferenceRunner(Protocol):
    """What consensus needs of the inference actor (``InferenceClient`` provides it).

    Both raise ``joynode.inference.service.InferenceFailed`` when the request
    is refused or fails.
    """

    async def complete(
        self,
        model: str,
        prompt: str | None = None,
        messages: Sequence[ChatMessage] | None = None,
        sampling: SamplingSpec | None = None,
        on_tokens: Callable[[TokenDelta], None] | None = None,
    ) -> InferenceResult: ...

    async def score(
        self,
        model: str,
        prompt: str | None,
        messages: Sequence[ChatMessage] | None,
        claimed: Sequence[int],
        stop: Sequence[str] = (),
    ) -> ClaimScores: ...


class CommitteeChain(Protocol):
    """What drawing and checking unpaid committees needs of the chain actor: the mirrored
    registry and recent blocks (``ChainService`` provides it)."""

    async def registry_candidates(self) -> dict[str, Candidate]: ...

    async def committee_candidates(self, block: wire.BlockRef) -> dict[str, Candidate]: ...

    async def seed_block(self) -> wire.BlockRef | None: ...

    async def recent_block_hash(self, number: int) -> bytes | None: ...


class SettlementChain(CommitteeChain, Protocol):
    """What the consensus actor needs of the chain actor (``ChainService`` provides it).

    Transactions raise ``joynode.chain.sender.TransactionFailed`` with the
    contract's reason when they revert; calls raise
    ``joynode.chain.rpc.ChainUnreachable`` while the RPC is down.
    """

    async def request_info(self, request_id: bytes) -> OnchainRequest | None: ...

    async def mirrored_request(self, request_id: bytes) -> OnchainRequest | None: ...

    async def request_inference(
        self, model_id: str, input_hash: bytes, max_price: int | None, seconds: float
    ) -> OnchainRequest: ...

    async def draw_committee(self, request_id: bytes) -> str: ...

    async def submit_certificate(self, certificate: Certificate) -> str: ...

    async def landed_signatures(self, tx_hash: str) -> dict[str, bytes] | None: ...

    async def report_equivocation(self, evidence: Equivocation) -> str | None: ...

    async def refund(self, request_id: bytes) -> str: ...


class SpenderApprovals(Protocol):
    """What the gateway's wallet routes need of the prepaid actor (``PrepaidService``):
    a wallet's approval of this node as the spender of its prepaid balance."""

    @property
    def address(self) -> str: ...

    async def spender_approval(self, client: str, cap: int, expiry: int) -> SpenderApproval: ...

    async def approve_spender(self, approval: SpenderApproval, signature: bytes) -> str: ...

    async def spending(self, client: str) -> dict[str, Any]: ...


class PrepaidPayments(Protocol):
    """What the consensus actor needs of the prepaid actor (``PrepaidService`` provides it):
    whether a client's signed request is covered, and what became of the jobs it admitted.

    ``refusal`` records a request it does not refuse as pending against its
    client's balance (again for the same request: no change), so that two
    requests cannot spend the same JOY; ``certified`` queues it for settlement
    and ``released`` frees what it held. All three are idempotent. ``terms``
    raises ``joynode.chain.rpc.ChainUnreachable`` while the RPC is down.
    """

    async def terms(self, model_id: str) -> PrepaidTerms: ...

    async def refusal(
        self, request: PrepaidRequest, signature: bytes, settle_by: float
    ) -> PrepaidRefusal | None: ...

    async def certified(
        self, request: PrepaidRequest, signature: bytes, certificate: Certificate
    ) -> None: ...

    async def released(self, request_id: bytes) -> None: ...


RequestHandler = Callable[[str, "wire.Message"], Awaitable["wire.Message"]]


class JobTransport(Protocol):
    """Carrying a job's messages: one ``/joynet/rpc`` request to a peer, or gossip."""

    async def publish(self, topic: Topic, message: wire.Message) -> None: ...

    async def request(self, peer_id: str, message: wire.Message) -> wire.AnyMessage: ...


class PeerRequests(Protocol):
    """Asking the node of an address, and answering peers, over ``/joynet/rpc``
    (``P2PService`` provides it): what the prepaid actor needs for vouchers."""

    @property
    def peers(self) -> PeerTable: ...

    def handle_requests(
        self, kind: type[wire.Message], handler: RequestHandler, *, timeout_s: float | None = None
    ) -> None: ...

    async def request(
        self, peer_id: str, message: wire.Message, *, timeout_s: float | None = None
    ) -> wire.AnyMessage: ...


class ChainRelayNetwork(PeerRequests, Protocol):
    """What chain RPC failover across peers needs of the p2p actor (``P2PService``
    provides it): requests both ways, peer scores, and who a peer is."""

    @property
    def scorer(self) -> PeerScorer: ...

    def penalize(self, peer: str, offence: Offence) -> None: ...

    def address_of(self, peer: str) -> str | None: ...


class JobNetwork(JobTransport, Protocol):
    """What the consensus actor needs of the p2p actor (``P2PService`` provides it): the
    peer table, gossip, ``/joynet/rpc`` requests both ways, and peer scores."""

    @property
    def peers(self) -> PeerTable: ...

    def handle_requests(self, kind: type[wire.Message], handler: RequestHandler) -> None: ...

    def penalize(self, peer: str, offence: Offence) -> None: ...

    def address_of(self, peer: str) -> str | None: ...


class GossipPublisher(Protocol):
    """Publishing signed gossip (``P2PService`` provides it)."""

    async def publish(self, topic: Topic, message: wire.Message) -> None: ...


class ZkMarketChain(Protocol):
    """What the zk actor needs of the chain actor (``ChainService`` provides it).

    Calls raise ``joynode.chain.rpc.ChainUnreachable`` while the RPC is down.
    """

    @property
    def address(self) -> str:
        """This node's account on the chain."""
        ...

    async def request_info(self, request_id: bytes) -> OnchainRequest | None: ...

    async def mirrored_request(self, request_id: bytes) -> OnchainRequest | None: ...

    async def request_inference(
        self, model_id: str, input_hash: bytes, max_price: int | None, seconds: float
    ) -> OnchainRequest: ...

    async def zk_model(self, model_id: str) -> ZkModelInfo | None: ...

    async def submit_zk_result(self, request_id: bytes, proven: MlpProof) -> str: ...

    async def zk_settlement(self, request_id: bytes) -> ZkSettlement | None: ...

    async def refund(self, request_id: bytes) -> str: ...


class GovernanceChain(Protocol):
    """What the governance methods need of the chain actor (``ChainService`` provides it).

    ``deployment`` is None until the actor has read it. ``call`` runs a blocking
    web3 read; both it and ``transact`` raise ``joynode.chain.rpc.ChainUnreachable``
    while the RPC is down, and ``transact`` raises
    ``joynode.chain.sender.TransactionFailed`` (with the decoded ``revert``) when
    the transaction reverts.
    """

    @property
    def address(self) -> str:
        """This node's account on the chain."""
        ...

    @property
    def deployment(self) -> Deployment | None: ...

    @property
    def w3(self) -> Web3: ...

    async def call(self, fn: Callable[..., T], *args: Any) -> T: ...

    async def transact(self, call: Any, gas: int | None = None) -> Any: ...
