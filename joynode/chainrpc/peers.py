"""Failover across JoyNet peers: a call no upstream of this node answered goes to a peer
that serves the chain, and this node answers such calls for its peers.

Peers say in their heartbeats which chains their ``/rpc`` gateway serves. A peer's
answer comes signed with its node key in the SovereignRPC contract's EIP-712 domain:
``RpcAnswer(chainId, requestHash, answerHash)`` for every answer, and for a finalized
block also ``BlockClaim(chainId, number, blockHash)``, which the contract itself checks
against ``blockhash()`` and slashes the provider's deposit on. This node checks what it can
before passing an answer on: the signature is the peer's, and a block hashes to its
hash and is the one asked for. A peer that fails a check is penalized, its signed
answer kept as evidence (``rpc.status``), and the next peer asked. Answers from peers
are never cached: an account read cannot be proven without an upstream.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from eth_utils.crypto import keccak

from joynode import wire
from joynode.chainrpc import methods
from joynode.chainrpc.integrity import Forged
from joynode.chainrpc.proxy import BLOCK_METHODS, UPSTREAM_UNAVAILABLE
from joynode.chainrpc.upstreams import UpstreamFailure
from joynode.keys import NodeKey
from joynode.p2p.peers import PeerState
from joynode.p2p.rpc import RpcFailure
from joynode.p2p.scoring import Offence
from joynode.signatures import Eip712Domain, SignatureError, recover_address, sign

if TYPE_CHECKING:
    from joynode.abc import ChainRelayNetwork
    from joynode.chainrpc.proxy import Answer, ChainProxy, PeerCheck

log = logging.getLogger(__name__)

RELAY_TIMEOUT_S = 30.0
PEERS_TRIED = 2
EVIDENCE_KEPT = 100
NO_ANSWER = 503  # the peer's upstreams failed too
NOT_SERVED = 404
BAD_CALL = 400


def request_hash(chain_id: int, method: str, params: bytes) -> bytes:
    """What ``RpcAnswer.requestHash`` commits to: the chain, the method and the params
    exactly as sent."""
    return keccak(b"%d\x00%s\x00%s" % (chain_id, method.encode(), params))


def answer_digest(domain: Eip712Domain, call: wire.ChainCall, answer: bytes) -> bytes:
    """What a peer signs for ``answer`` (as sent) to ``call``: ``RpcAnswer``'s digest."""
    request = request_hash(call.chain_id, call.method, call.params)
    return domain.rpc_answer_digest(call.chain_id, request, keccak(answer))


@dataclass(frozen=True)
class Evidence:
    """A peer's signed answer that failed this node's check."""

    peer: str
    chain_id: int
    method: str
    params: str
    answer: str
    signature: str
    block_signature: str | None
    block: tuple[int, str] | None  # the claimed block's number and hash, for a block
    reason: str
    at: float


class ChainPeers:
    def __init__(
        self,
        network: ChainRelayNetwork,
        key: NodeKey,
        proxy_of: Callable[[int], ChainProxy | None],
        domain: Callable[[], Eip712Domain],
    ) -> None:
        """``proxy_of(chain_id)``: this node's front for a chain it serves;
        ``domain()``: the SovereignRPC contract's EIP-712 domain."""
        self._network = network
        self._key = key
        self._proxy_of = proxy_of
        self._domain = domain
        self.evidence: deque[Evidence] = deque(maxlen=EVIDENCE_KEPT)
        self.relayed = self.answered = 0

    def register(self) -> None:
        self._network.handle_requests(wire.ChainCall, self._answer, timeout_s=RELAY_TIMEOUT_S)

    def candidates(self, chain_id: int) -> list[str]:
        """The up peers that serve ``chain_id``, best scored first."""
        scorer = self._network.scorer
        serving = [
            r.peer_id
            for r in self._network.peers.records()
            if r.state == PeerState.UP and chain_id in r.chains
        ]
        return sorted(serving, key=scorer.score, reverse=True)

    async def relay(
        self, chain_id: int, method: str, params: Any, check: PeerCheck | None
    ) -> Answer:
        """A peer's answer to ``method(params)``; ``UpstreamFailure`` if none gave one
        that passed ``check`` (a block's hash and number)."""
        sent = json.dumps(params, separators=(",", ":")).encode()
        call = wire.ChainCall(chain_id, method, sent)
        failures: list[str] = []
        for peer in self.candidates(chain_id)[:PEERS_TRIED]:
            address = self._network.address_of(peer) or "?"
            try:
                reply = await self._network.request(peer, call, timeout_s=RELAY_TIMEOUT_S)
            except RpcFailure as exc:
                failures.append(f"{address}: {exc}")
                continue
            if isinstance(reply, wire.ErrorReply):
                failures.append(f"{address}: {reply.reason}")
                continue
            if not isinstance(reply, wire.ChainAnswer):
                failures.append(f"{address}: not an answer")
                continue
            try:
                answer = self._checked(call, reply, address)
                if check is not None and "result" in answer:
                    await check(answer)
            except Forged as exc:
                self._caught(peer, call, reply, str(exc))
                failures.append(f"{address}: {exc}")
                continue
            self.relayed += 1
            return answer
        raise UpstreamFailure(
            "; ".join(failures) if failures else f"no peer serving chain {chain_id} is up"
        )

    def _checked(
        self,
        call: wire.ChainCall,
        reply: wire.ChainAnswer,
        address: str,
    ) -> Answer:
        """The answer, once its signatures are the peer's (``Forged`` if not)."""
        domain = self._domain()
        try:
            answer = json.loads(reply.answer)
        except ValueError:
            raise Forged("an answer that is not JSON") from None
        if not isinstance(answer, dict) or not ("result" in answer or "error" in answer):
            raise Forged("an answer without a result or an error")
        digest = answer_digest(domain, call, reply.answer)
        if not _signed_by(address, digest, reply.signature):
            raise Forged("an answer it did not sign")
        block = answer.get("result")
        if call.method in BLOCK_METHODS and isinstance(block, dict) and "hash" in block:
            number = methods.quantity(block.get("number"))
            claimed = _bytes32(block["hash"])
            if number is None or claimed is None:
                raise Forged("a block without a number or a hash")
            claim = domain.block_claim_digest(call.chain_id, number, claimed)
            signature = reply.block_signature
            if signature is not None and not _signed_by(address, claim, signature):
                raise Forged("a block claim it did not sign")
        return answer

    def _caught(
        self, peer: str, call: wire.ChainCall, reply: wire.ChainAnswer, reason: str
    ) -> None:
        self._network.penalize(peer, Offence.WRONG_CHAIN_ANSWER)
        address = self._network.address_of(peer) or peer
        log.warning("rpc: peer %s gave a wrong answer to %s: %s", address, call.method, reason)
        self.evidence.append(
            Evidence(
                address,
                call.chain_id,
                call.method,
                call.params.decode(errors="replace"),
                reply.answer.decode(errors="replace"),
                "0x" + reply.signature.hex(),
                None if reply.block_signature is None else "0x" + reply.block_signature.hex(),
                _claimed_block(call.method, reply.answer),
                reason,
                time.time(),
            )
        )

    async def _answer(self, peer: str, request: wire.Message) -> wire.Message:
        """A peer's ``ChainCall``: answered from this node's own upstreams (never passed on
        to another peer), signed."""
        assert isinstance(request, wire.ChainCall)
        proxy = self._proxy_of(request.chain_id)
        if proxy is None:
            return wire.ErrorReply(NOT_SERVED, f"chain {request.chain_id} is not served here")
        try:
            params = json.loads(request.params)
        except ValueError:
            return wire.ErrorReply(BAD_CALL, "params are not JSON")
        if params is not None and not isinstance(params, list | dict):
            return wire.ErrorReply(BAD_CALL, "params must be an array or an object")
        answer = await proxy.call(request.method, params, relay=False)
        if answer.get("error", {}).get("code") == UPSTREAM_UNAVAILABLE:
            return wire.ErrorReply(NO_ANSWER, str(answer["error"].get("message", ""))[:256])
        self.answered += 1
        return self.signed(request, answer, -1 if proxy.finalized is None else proxy.finalized)

    def signed(self, call: wire.ChainCall, answer: Answer, final: int) -> wire.ChainAnswer:
        """``answer`` as this node gives it a peer: with its signatures. A block is claimed
        only at or below ``final``, the chain's finalized block: a reorg may replace a
        later one, and an honest claim about it would then be slashable."""
        domain = self._domain()
        body = json.dumps(answer, separators=(",", ":")).encode()
        digest = answer_digest(domain, call, body)
        block_signature = None
        block = answer.get("result")
        if (
            call.method in BLOCK_METHODS
            and isinstance(block, dict)
            and isinstance(block.get("hash"), str)
        ):
            number = methods.quantity(block.get("number"))
            claimed = _bytes32(block["hash"])
            if number is not None and claimed is not None and number <= final:
                claim = domain.block_claim_digest(call.chain_id, number, claimed)
                block_signature = sign(self._key, claim)
        return wire.ChainAnswer(body, sign(self._key, digest), block_signature)

    def statistics(self) -> dict[str, Any]:
        return {
            "relayed": self.relayed,
            "answered": self.answered,
            "evidence": [asdict(e) for e in self.evidence],
        }


def _signed_by(address: str, digest: bytes, signature: bytes) -> bool:
    try:
        return recover_address(digest, signature).lower() == address.lower()
    except SignatureError:
        return False


def _bytes32(text: object) -> bytes | None:
    """``0x`` and 64 hex digits as bytes; None for anything else."""
    if not isinstance(text, str) or len(text) != 66 or not text.startswith("0x"):
        return None
    try:
        return bytes.fromhex(text[2:])
    except ValueError:
        return None


def _claimed_block(method: str, answer: bytes) -> tuple[int, str] | None:
    """The number and hash of the block an answer to ``method`` claims, if it is one."""
    if method not in BLOCK_METHODS:
        return None
    try:
        block = json.loads(answer).get("result")
    except (ValueError, AttributeError):
        return None
    if not isinstance(block, dict):
        return None
    number = methods.quantity(block.get("number"))
    claimed = _bytes32(block.get("hash"))
    return None if number is None or claimed is None else (number, "0x" + claimed.hex())
