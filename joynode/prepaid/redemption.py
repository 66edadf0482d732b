"""What a settler redeems: a prepaid request with its client's signature and its
committee's certificate, and the packed batch ``PrepaidInference.settleBatch`` takes.

The batch is packed rather than ABI-encoded (the layout is in the contract, above
``settleBatch``): addresses and models are written once per batch and named by index,
and nothing is padded. At 64 requests that halves the calldata and spares the
contract the ABI decoding of nested dynamic structs, most of what a request cost
beyond its four signature checks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from eth_utils.address import to_canonical_address

from joynode.signatures import PrepaidRequest

MAX_BATCH = 256  # PrepaidInference.MAX_BATCH
MAX_TABLE = 0xFFFF  # addresses or models in one batch (u16 indexes)


@dataclass(frozen=True)
class Redemption:
    """A request, its client's signature and its committee's certificate: what
    ``PrepaidInference.settleBatch`` redeems (``pack_batch``)."""

    request: PrepaidRequest
    client_signature: bytes
    output_hash: bytes
    signed_by: int  # bit i: committee[i] signed
    signatures: bytes  # 65 bytes per signer, in committee order

    def to_json(self) -> str:
        r = self.request
        return json.dumps(
            {
                "chain_id": r.chain_id,
                "contract": r.contract,
                "client": r.client,
                "model": r.model.hex(),
                "input_hash": r.input_hash.hex(),
                "max_price": str(r.max_price),
                "nonce": str(r.nonce),
                "deadline": r.deadline,
                "committee": list(r.committee),
                "client_signature": self.client_signature.hex(),
                "output_hash": self.output_hash.hex(),
                "signed_by": self.signed_by,
                "signatures": self.signatures.hex(),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Redemption:
        d = json.loads(text)
        request = PrepaidRequest(
            chain_id=d["chain_id"],
            contract=d["contract"],
            client=d["client"],
            model=bytes.fromhex(d["model"]),
            input_hash=bytes.fromhex(d["input_hash"]),
            max_price=int(d["max_price"]),
            nonce=int(d["nonce"]),
            deadline=d["deadline"],
            committee=tuple(d["committee"]),
        )
        return cls(
            request,
            bytes.fromhex(d["client_signature"]),
            bytes.fromhex(d["output_hash"]),
            d["signed_by"],
            bytes.fromhex(d["signatures"]),
        )


def signers_of(redemption: Redemption) -> dict[str, bytes]:
    """The members whose signature the certificate holds (lowercase), with it."""
    committee = redemption.request.committee
    positions = [m for m in range(len(committee)) if redemption.signed_by >> m & 1]
    sigs = redemption.signatures
    return {committee[m].lower(): sigs[65 * i : 65 * i + 65] for i, m in enumerate(positions)}


def results_by_member(
    request_ids: Sequence[bytes], redemptions: Sequence[Redemption]
) -> dict[str, list[tuple[bytes, bytes]]]:
    """What each member's voucher for this batch covers, by member (lowercase): the
    (request id, output hash) of every request it signed, in batch order (as
    ``pack_batch`` marks them)."""
    by_member: dict[str, list[tuple[bytes, bytes]]] = {}
    for rid, r in zip(request_ids, redemptions, strict=True):
        for member in signers_of(r):
            by_member.setdefault(member, []).append((rid, r.output_hash))
    return by_member


def pack_batch(
    redemptions: Sequence[Redemption], vouchers: Mapping[str, bytes] | None = None
) -> bytes:
    """``redemptions`` as one ``settleBatch`` argument. ``vouchers``: by member address
    (lowercase), its signature over its ``results_by_member`` (``signatures.voucher_digest``);
    such a member's per-request signatures are left out. Raises ``ValueError`` for what
    the layout cannot hold (a committee over 16 members, over 65,535 distinct
    addresses or models, a signature not of 65 bytes)."""
    vouchers = vouchers or {}
    addresses: dict[bytes, int] = {}
    models: dict[bytes, int] = {}

    def index(table: dict[bytes, int], key: bytes) -> bytes:
        if key not in table:
            if len(table) == MAX_TABLE:
                raise ValueError("too many distinct addresses or models for one batch")
            table[key] = len(table)
        return table[key].to_bytes(2, "big")

    items = []
    for r in redemptions:
        q = r.request
        if len(q.committee) > 16 or r.signed_by >= 1 << len(q.committee):
            raise ValueError("a committee of over 16 members, or signers outside it")
        if len(r.client_signature) != 65 or len(r.signatures) != 65 * r.signed_by.bit_count():
            raise ValueError("signatures are 65 bytes each, one per signer")
        signed = signers_of(r)
        signed_by = vouched_by = 0
        signatures = []
        for m, member in enumerate(a.lower() for a in q.committee):
            if member in signed and member in vouchers:
                vouched_by |= 1 << m
            elif member in signed:
                signed_by |= 1 << m
                signatures.append(signed[member])
        items.append(
            b"".join(
                (
                    index(addresses, to_canonical_address(q.client)),
                    index(models, q.model),
                    q.input_hash,
                    q.max_price.to_bytes(32, "big"),
                    q.nonce.to_bytes(32, "big"),
                    q.deadline.to_bytes(8, "big"),
                    r.output_hash,
                    r.client_signature,
                    len(q.committee).to_bytes(1, "big"),
                    signed_by.to_bytes(2, "big"),
                    vouched_by.to_bytes(2, "big"),
                    *(index(addresses, to_canonical_address(m)) for m in q.committee),
                    *signatures,
                )
            )
        )
    if not items or len(items) > MAX_BATCH:
        raise ValueError(f"a batch holds 1 to {MAX_BATCH} requests")
    packed_vouchers = [
        index(addresses, to_canonical_address(member)) + signature
        for member, signature in vouchers.items()
    ]
    return b"".join(
        (
            len(addresses).to_bytes(2, "big"),
            *addresses,
            len(models).to_bytes(2, "big"),
            *models,
            len(packed_vouchers).to_bytes(2, "big"),
            *packed_vouchers,
            len(items).to_bytes(2, "big"),
            *items,
        )
    )
