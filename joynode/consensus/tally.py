"""Votes of one job, and the certificate a strict majority of them makes.

Pure bookkeeping (no I/O): every node that follows a job feeds it the commits
and reveals it hears, and asks for the outcome. The rules are the contract's
(``ProofOfInference.submitCertificate`` / ``reportEquivocation``):

- only committee members vote, each signing with its node key (EIP-712);
- a commit binds ``keccak256(abi.encode(requestId, outputHash, salt))``;
- a reveal must open its member's commit and carry the member's signed
  ``Result(requestId, outputHash)``;
- a member with two different signed commits equivocates: its vote is void
  and the two signatures are evidence;
- a certificate needs a strict majority of the committee (signers * 2 >
  committee size) on one output hash.

``CertificateVerifier`` checks a certificate by the same rules, for anyone.
"""

from __future__ import annotations

import collections
from collections.abc import Collection
from dataclasses import dataclass, field

from eth_abi.abi import encode as abi_encode
from eth_utils.crypto import keccak

from joynode import wire
from joynode.messages import output_hash
from joynode.signatures import Eip712Domain, SignatureError, recover_address


class VoteRejected(Exception):
    """A vote that does not count; ``reason`` is a short metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def vote_commitment(request_id: bytes, result_hash: bytes, salt: bytes) -> bytes:
    return bytes(
        keccak(abi_encode(["bytes32", "bytes32", "bytes32"], [request_id, result_hash, salt]))
    )


@dataclass(frozen=True)
class Certificate:
    request_id: bytes
    model: str
    output_hash: bytes
    committee: tuple[str, ...]
    signers: tuple[str, ...]
    signatures: tuple[bytes, ...]

    def to_json(self) -> dict[str, object]:
        return {
            "request_id": "0x" + self.request_id.hex(),
            "model": self.model,
            "output_hash": "0x" + self.output_hash.hex(),
            "committee": list(self.committee),
            "signers": list(self.signers),
            "signatures": ["0x" + s.hex() for s in self.signatures],
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Certificate:
        def hexbytes(value: object) -> bytes:
            if not isinstance(value, str) or not value.startswith("0x"):
                raise ValueError(f"not 0x-hex: {value!r}")
            return bytes.fromhex(value[2:])

        def strings(value: object) -> tuple[str, ...]:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError("not a list of strings")
            return tuple(value)

        return cls(
            hexbytes(data["request_id"]),
            str(data["model"]),
            hexbytes(data["output_hash"]),
            strings(data["committee"]),
            strings(data["signers"]),
            tuple(hexbytes(s) for s in strings(data["signatures"])),
        )


class CertificateVerifier:
    """Checks a certificate as ``ProofOfInference.submitCertificate`` does."""

    def __init__(self, domain: Eip712Domain) -> None:
        self._domain = domain

    def verify(self, certificate: Certificate) -> None:
        """Raise ``VoteRejected`` if the certificate would not be accepted."""
        committee = [a.lower() for a in certificate.committee]
        if len(certificate.signers) != len(certificate.signatures):
            raise VoteRejected("length_mismatch", "signers and signatures differ in number")
        if len(certificate.signers) * 2 <= len(committee):
            raise VoteRejected(
                "no_majority",
                f"{len(certificate.signers)} signers of a committee of {len(committee)}",
            )
        digest = self._domain.result_digest(certificate.request_id, certificate.output_hash)
        seen: set[str] = set()
        for signer, signature in zip(certificate.signers, certificate.signatures, strict=True):
            if signer.lower() not in committee:
                raise VoteRejected("not_in_committee", signer)
            if signer.lower() in seen:
                raise VoteRejected("duplicate_signer", signer)
            seen.add(signer.lower())
            _require_signed(signer, digest, signature)


@dataclass(frozen=True)
class Equivocation:
    """Two different commits signed by one member for one request: slashing evidence."""

    member: str
    request_id: bytes
    commitment_a: bytes
    signature_a: bytes
    commitment_b: bytes
    signature_b: bytes


@dataclass(frozen=True)
class Reveal:
    member: str
    output_hash: bytes
    token_ids: tuple[int, ...]
    text: str
    salt: bytes
    signature: bytes
    prompt_tokens: int | None = None  # as the member reported it (unsigned)

    def to_wire(self, request_id: bytes) -> wire.VoteReveal:
        return wire.VoteReveal(
            request_id,
            list(self.token_ids),
            self.text,
            self.salt,
            self.signature,
            self.prompt_tokens,
        )


@dataclass
class JobTally:
    request_id: bytes
    model: str
    committee: tuple[str, ...]  # checksummed addresses, in the offer's order
    domain: Eip712Domain
    commits: dict[str, wire.VoteCommit] = field(default_factory=dict)
    reveals: dict[str, Reveal] = field(default_factory=dict)
    equivocations: dict[str, Equivocation] = field(default_factory=dict)

    def _member(self, signer: str) -> str:
        for member in self.committee:
            if member.lower() == signer.lower():
                return member
        raise VoteRejected("not_in_committee", signer)

    def add_commit(self, signer: str, commit: wire.VoteCommit) -> bool:
        """Count ``commit`` from ``signer`` (the gossip signer); False if already known."""
        member = self._member(signer)
        digest = self.domain.commit_digest(self.request_id, commit.commitment)
        _require_signed(member, digest, commit.signature)
        known = self.commits.get(member)
        if known is not None:
            if known.commitment == commit.commitment:
                return False
            if member not in self.equivocations:
                self.equivocations[member] = Equivocation(
                    member,
                    self.request_id,
                    known.commitment,
                    known.signature,
                    commit.commitment,
                    commit.signature,
                )
                self.reveals.pop(member, None)  # an equivocator's vote is void
            return True
        self.commits[member] = commit
        return True

    def add_reveal(self, signer: str, reveal: wire.VoteReveal) -> bool:
        member = self._member(signer)
        if member in self.equivocations:
            raise VoteRejected("equivocated", f"{member} signed two commits")
        commit = self.commits.get(member)
        if commit is None:
            raise VoteRejected("no_commit", f"{member} revealed before committing")
        result = output_hash(reveal.token_ids)
        if vote_commitment(self.request_id, result, reveal.salt) != commit.commitment:
            raise VoteRejected("bad_reveal", f"{member}'s reveal does not open its commit")
        _require_signed(
            member, self.domain.result_digest(self.request_id, result), reveal.signature
        )
        if member in self.reveals:
            return False
        self.reveals[member] = Reveal(
            member,
            result,
            tuple(reveal.token_ids),
            reveal.text,
            reveal.salt,
            reveal.signature,
            reveal.prompt_tokens,
        )
        return True

    def signer_of(self, vote: wire.VoteCommit | wire.VoteReveal) -> str:
        """Who signed a vote that came without a gossip envelope (from a votes reply)."""
        if isinstance(vote, wire.VoteCommit):
            digest = self.domain.commit_digest(self.request_id, vote.commitment)
        else:
            digest = self.domain.result_digest(self.request_id, output_hash(vote.token_ids))
        try:
            return recover_address(digest, vote.signature)
        except SignatureError as exc:
            raise VoteRejected("bad_signature", str(exc)) from None

    def votes(self) -> wire.JobVotesReply:
        """Every vote this tally counted (evidence of equivocation included)."""
        commits = list(self.commits.values())
        for evidence in self.equivocations.values():
            commits.append(
                wire.VoteCommit(self.request_id, evidence.commitment_b, evidence.signature_b)
            )
        reveals = [r.to_wire(self.request_id) for r in self.reveals.values()]
        return wire.JobVotesReply(commits, reveals)

    @property
    def quorum(self) -> int:
        """Votes an output needs: a strict majority of the committee."""
        return quorum_of(len(self.committee))

    def counts(self) -> collections.Counter[bytes]:
        return collections.Counter(r.output_hash for r in self.reveals.values())

    def majority(self) -> bytes | None:
        for result, count in self.counts().items():
            if count >= self.quorum:
                return result
        return None

    def certificate(self) -> Certificate | None:
        result = self.majority()
        if result is None:
            return None
        agreeing = [
            m for m in self.committee if m in self.reveals and self.reveals[m].output_hash == result
        ]
        return Certificate(
            self.request_id,
            self.model,
            result,
            self.committee,
            tuple(agreeing),
            tuple(self.reveals[m].signature for m in agreeing),
        )

    def dissenters(self) -> list[str]:
        """Members whose revealed output differs from the majority's."""
        result = self.majority()
        return [
            m for m, r in self.reveals.items() if result is not None and r.output_hash != result
        ]

    def majority_impossible(self, cannot_run: Collection[str] = ()) -> bool:
        """No output can reach the quorum any more, whatever the missing members reveal
        (``cannot_run``: members that said they cannot run the job, and will not)."""
        counts = self.counts()
        best = max(counts.values(), default=0)
        outstanding = sum(
            1
            for m in self.committee
            if m not in self.reveals and m not in self.equivocations and m not in cannot_run
        )
        return best + outstanding < self.quorum


def quorum_of(committee_size: int) -> int:
    """Signers a certificate needs: a strict majority of the committee."""
    return committee_size // 2 + 1


def _require_signed(member: str, digest: bytes, signature: bytes) -> None:
    try:
        recovered = recover_address(digest, signature)
    except SignatureError as exc:
        raise VoteRejected("bad_signature", f"{member}: {exc}") from None
    if recovered.lower() != member.lower():
        raise VoteRejected("bad_signature", f"{member}'s vote is signed by {recovered}")
