"""Signing with the node key and recovering who signed.

Signatures are recoverable secp256k1 signatures (65 bytes, r || s || v with v
in {27, 28}) over a keccak-256 digest, the form Ethereum contracts check with
``ecrecover``. Every digest is domain-separated, so a signature for one
purpose can never be replayed as another: gossip uses a tag and length-prefixed
parts (``digest``), votes and commits use EIP-712 typed data bound to the
ProofOfInference contract and the chain id (``Eip712Domain``).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

from eth_abi.abi import encode as abi_encode
from eth_account.signers.local import LocalAccount
from eth_keys.datatypes import PrivateKey, PublicKey, Signature
from eth_keys.exceptions import BadSignature
from eth_utils.crypto import keccak
from eth_utils.exceptions import ValidationError

from joynode.keys import NodeKey

SIGNATURE_BYTES = 65
_HALF_ORDER = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0


class SignatureError(Exception):
    """A signature that does not recover to any key."""


def digest(domain: bytes, *parts: bytes) -> bytes:
    """keccak256 over a domain tag and length-prefixed parts (unambiguous framing)."""
    return keccak(domain + b"".join(len(p).to_bytes(4, "big") + p for p in parts))


def sign(key: NodeKey, message_digest: bytes) -> bytes:
    raw = bytes(PrivateKey(key.secret).sign_msg_hash(message_digest).to_bytes())
    return raw[:64] + bytes([raw[64] + 27])


def recover_address(message_digest: bytes, signature: bytes) -> str:
    """The checksummed address that produced ``signature`` over ``message_digest``."""
    if len(signature) != SIGNATURE_BYTES or signature[64] not in (27, 28):
        raise SignatureError("not a 65-byte signature with v in {27, 28}")
    if int.from_bytes(signature[32:64], "big") > _HALF_ORDER:
        # As OpenZeppelin's ECDSA: the high-s twin of a signature is refused, so a
        # signature has one form (our replay cache keys on its bytes).
        raise SignatureError("signature s is in the upper half of the curve order")
    try:
        recovered = Signature(
            signature[:64] + bytes([signature[64] - 27])
        ).recover_public_key_from_msg_hash(message_digest)
    except (BadSignature, ValidationError, ValueError) as exc:
        raise SignatureError(f"unrecoverable signature: {exc}") from None
    return str(recovered.to_checksum_address())


def address_of_peer(peer_id: bytes) -> str | None:
    """The Ethereum address of a peer whose libp2p id embeds a secp256k1 key.

    Peer ids of small keys are identity multihashes of the public key, so the
    address follows from the id alone. Other key types give ``None``: such a
    peer cannot be a JoyNet node.
    """
    from libp2p.crypto.secp256k1 import Secp256k1PublicKey
    from libp2p.peer.id import ID

    public_key = ID(peer_id).extract_public_key()
    if not isinstance(public_key, Secp256k1PublicKey):
        return None
    return str(PublicKey.from_compressed_bytes(public_key.to_bytes()).to_checksum_address())


_DOMAIN_TYPEHASH = keccak(
    b"EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
)
RESULT_TYPEHASH = keccak(b"Result(bytes32 requestId,bytes32 outputHash)")
COMMIT_TYPEHASH = keccak(b"Commit(bytes32 requestId,bytes32 commitment)")
# A chain RPC provider's answers (the SovereignRPC contract's domain): any answer, as
# evidence for a DAO dispute; a block's number and hash, which the contract checks itself.
RPC_ANSWER_TYPEHASH = keccak(b"RpcAnswer(uint64 chainId,bytes32 requestHash,bytes32 answerHash)")
SOVEREIGN_RPC_DOMAIN_NAME = "JoyNet SovereignRPC"
BLOCK_CLAIM_TYPEHASH = keccak(b"BlockClaim(uint64 chainId,uint256 number,bytes32 blockHash)")


@dataclass(frozen=True)
class Eip712Domain:
    """The EIP-712 domain of the ProofOfInference contract on one chain."""

    chain_id: int
    verifying_contract: str
    name: str = "JoyNet"
    version: str = "1"

    @functools.cached_property
    def separator(self) -> bytes:
        # Cached: every vote digest needs it, and it never changes for a domain.
        return keccak(
            abi_encode(
                ["bytes32", "bytes32", "bytes32", "uint256", "address"],
                [
                    _DOMAIN_TYPEHASH,
                    keccak(self.name.encode()),
                    keccak(self.version.encode()),
                    self.chain_id,
                    self.verifying_contract,
                ],
            )
        )

    def _typed(self, struct_hash: bytes) -> bytes:
        return keccak(b"\x19\x01" + self.separator + struct_hash)

    def result_digest(self, request_id: bytes, output_hash: bytes) -> bytes:
        """What a committee member signs to vote for ``output_hash``."""
        return self._typed(
            keccak(
                abi_encode(
                    ["bytes32", "bytes32", "bytes32"], [RESULT_TYPEHASH, request_id, output_hash]
                )
            )
        )

    def commit_digest(self, request_id: bytes, commitment: bytes) -> bytes:
        """What a committee member signs to commit (before revealing) its output."""
        return self._typed(
            keccak(
                abi_encode(
                    ["bytes32", "bytes32", "bytes32"], [COMMIT_TYPEHASH, request_id, commitment]
                )
            )
        )

    def rpc_answer_digest(self, chain_id: int, request_hash: bytes, answer_hash: bytes) -> bytes:
        """What a chain RPC provider signs for each answer it gives a peer."""
        return self._typed(
            keccak(
                abi_encode(
                    ["bytes32", "uint64", "bytes32", "bytes32"],
                    [RPC_ANSWER_TYPEHASH, chain_id, request_hash, answer_hash],
                )
            )
        )

    def block_claim_digest(self, chain_id: int, number: int, block_hash: bytes) -> bytes:
        """What a chain RPC provider signs for a block it serves: slashable if wrong."""
        return self._typed(
            keccak(
                abi_encode(
                    ["bytes32", "uint64", "uint256", "bytes32"],
                    [BLOCK_CLAIM_TYPEHASH, chain_id, number, block_hash],
                )
            )
        )


# Jobs off any chain (chain.mode = off) are signed in this domain: chain id 0,
# no contract. Such signatures can never be replayed against a real deployment.
OFFCHAIN_DOMAIN = Eip712Domain(0, "0x" + "00" * 20)


@dataclass(frozen=True)
class Permit:
    """An EIP-2612 permit: ``owner`` lets ``spender`` move ``value`` until ``deadline``."""

    chain_id: int
    token: str
    owner: str
    spender: str
    value: int
    nonce: int
    deadline: int


PERMIT_DOMAIN_NAME = "JoyNet"  # JoyToken's EIP-712 name (ERC20Permit("JoyNet"))


def sign_permit(signer: LocalAccount, permit: Permit) -> tuple[int, bytes, bytes]:
    """(v, r, s) for ``JoyToken.permit`` / ``requestInferenceWithPermit``."""
    signed = signer.sign_typed_data(
        domain_data={
            "name": PERMIT_DOMAIN_NAME,
            "version": "1",
            "chainId": permit.chain_id,
            "verifyingContract": permit.token,
        },
        message_types={
            "Permit": [
                {"name": "owner", "type": "address"},
                {"name": "spender", "type": "address"},
                {"name": "value", "type": "uint256"},
                {"name": "nonce", "type": "uint256"},
                {"name": "deadline", "type": "uint256"},
            ]
        },
        message_data={
            "owner": permit.owner,
            "spender": permit.spender,
            "value": permit.value,
            "nonce": permit.nonce,
            "deadline": permit.deadline,
        },
    )
    return int(signed.v), int(signed.r).to_bytes(32, "big"), int(signed.s).to_bytes(32, "big")


PREPAID_DOMAIN_NAME = "JoyNet Prepaid"  # PrepaidInference's EIP-712 name

_PREPAID_REQUEST_TYPE = [
    {"name": "client", "type": "address"},
    {"name": "model", "type": "bytes32"},
    {"name": "inputHash", "type": "bytes32"},
    {"name": "maxPrice", "type": "uint256"},
    {"name": "nonce", "type": "uint256"},
    {"name": "deadline", "type": "uint64"},
    {"name": "committee", "type": "address[]"},
]


@dataclass(frozen=True)
class PrepaidRequest:
    """A request a client pays for from its prepaid balance (``PrepaidInference``), signed
    off-chain: no transaction. Its id is its EIP-712 digest (``prepaid_request_id``)."""

    chain_id: int
    contract: str  # the PrepaidInference proxy
    client: str
    model: bytes  # keccak256 of the model id (``messages.model_key``)
    input_hash: bytes
    max_price: int  # wei of JOY
    nonce: int  # any unused number: each settles once per client
    deadline: int  # unix seconds: it cannot settle later
    committee: tuple[str, ...]

    def typed_data(self) -> dict[str, object]:
        """The full EIP-712 message: what eth-account's ``sign_typed_data(full_message=...)``
        and viem's ``signTypedData`` take."""
        return _prepaid_typed_data(
            self.chain_id,
            self.contract,
            "InferenceRequest",
            _PREPAID_REQUEST_TYPE,
            {
                "client": self.client,
                "model": self.model,
                "inputHash": self.input_hash,
                "maxPrice": self.max_price,
                "nonce": self.nonce,
                "deadline": self.deadline,
                "committee": list(self.committee),
            },
        )

    def as_call_argument(self) -> tuple[object, ...]:
        """The ``InferenceRequest`` struct as a contract call takes it."""
        return (
            self.client,
            self.model,
            self.input_hash,
            self.max_price,
            self.nonce,
            self.deadline,
            list(self.committee),
        )


def prepaid_request_id(request: PrepaidRequest) -> bytes:
    """A prepaid request's id: the EIP-712 digest its client signs."""
    from eth_account.messages import encode_typed_data

    signable = encode_typed_data(full_message=request.typed_data())
    return keccak(b"\x19" + signable.version + signable.header + signable.body)


def sign_prepaid_request(signer: LocalAccount, request: PrepaidRequest) -> bytes:
    """The client's 65-byte signature of ``request`` (r || s || v), for any client with an
    Ethereum key: ``eth_account.Account.from_key(...)``; viem signs the same typed data."""
    signed = signer.sign_typed_data(full_message=request.typed_data())
    return bytes(signed.signature)


_SPENDER_TYPE = [
    {"name": "client", "type": "address"},
    {"name": "spender", "type": "address"},
    {"name": "cap", "type": "uint256"},
    {"name": "expiry", "type": "uint64"},
    {"name": "nonce", "type": "uint64"},
]


@dataclass(frozen=True)
class SpenderApproval:
    """A client's approval of one node to sign its prepaid requests (``approveSpender``):
    at most ``cap`` wei of JOY, until ``expiry``; a higher ``nonce`` replaces it."""

    chain_id: int
    contract: str  # the PrepaidInference proxy
    client: str
    spender: str
    cap: int
    expiry: int  # unix seconds
    nonce: int

    def typed_data(self) -> dict[str, object]:
        """The full EIP-712 message, for eth-account's ``sign_typed_data`` or a wallet's
        ``eth_signTypedData_v4``."""
        return _prepaid_typed_data(
            self.chain_id,
            self.contract,
            "Spender",
            _SPENDER_TYPE,
            {
                "client": self.client,
                "spender": self.spender,
                "cap": self.cap,
                "expiry": self.expiry,
                "nonce": self.nonce,
            },
        )


def _prepaid_typed_data(
    chain_id: int,
    contract: str,
    primary: str,
    fields: list[dict[str, str]],
    message: dict[str, object],
) -> dict[str, object]:
    """A full EIP-712 message in the domain of the ``PrepaidInference`` at ``contract``."""
    return {
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "version", "type": "string"},
                {"name": "chainId", "type": "uint256"},
                {"name": "verifyingContract", "type": "address"},
            ],
            primary: fields,
        },
        "primaryType": primary,
        "domain": {
            "name": PREPAID_DOMAIN_NAME,
            "version": "1",
            "chainId": chain_id,
            "verifyingContract": contract,
        },
        "message": message,
    }


RESULTS_TYPEHASH = keccak(b"Results(bytes32 chain)")


def results_chain(results: Iterable[tuple[bytes, bytes]]) -> bytes:
    """(requestId, outputHash) pairs folded in order, as ``PrepaidInference`` folds the
    results a member's voucher covers: ``chain = keccak256(chain || id || output)``."""
    chain = bytes(32)
    for request_id, output_hash in results:
        chain = keccak(chain + request_id + output_hash)
    return chain


def voucher_digest(chain_id: int, contract: str, chain: bytes) -> bytes:
    """What a member signs to vouch for a batch's results it certified: EIP-712
    ``Results(chain)`` in the domain of the ``PrepaidInference`` at ``contract``."""
    domain = Eip712Domain(chain_id, contract, name=PREPAID_DOMAIN_NAME)
    return domain._typed(keccak(abi_encode(["bytes32", "bytes32"], [RESULTS_TYPEHASH, chain])))
