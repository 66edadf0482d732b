"""Consensus: the tally's rules (pure), and committees of real nodes on 127.0.0.1.

The nodes run in this process and share the session's tiny vLLM engine; each
runs its own inference, votes over gossip, and keeps its own tally.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
from eth_utils.crypto import keccak
from prometheus_client import CollectorRegistry, Counter

from joynode import wire
from joynode.consensus.control import JOB_ERROR, SubmitParams
from joynode.consensus.delivery import Delivery
from joynode.consensus.jobs import input_hash_of, request_id_of
from joynode.consensus.tally import (
    Certificate,
    CertificateVerifier,
    JobTally,
    VoteRejected,
    vote_commitment,
)
from joynode.control.client import ControlClient
from joynode.control.jsonrpc import INVALID_PARAMS, RpcError
from joynode.inference.engine import VllmEngine
from joynode.inference.service import InferenceClient
from joynode.keys import NodeKey
from joynode.messages import InferenceResult, SamplingSpec, output_hash
from joynode.node import Node
from joynode.p2p.gossip import JOBS, VOTES
from joynode.p2p.rpc import RpcFailure
from joynode.signatures import OFFCHAIN_DOMAIN, Eip712Domain, sign
from tests.factories import (
    LIBP2P_TEARDOWN_LEAK,
    NodeHome,
    close_leaked_sockets,
    fast_p2p,
    make_home,
    running_node,
    sees_all_serving,
    wait_for,
)
from tests.inference_fixtures import tiny_engine, tiny_model

__all__ = ["tiny_engine", "tiny_model"]

pytestmark = LIBP2P_TEARDOWN_LEAK

REQUEST = b"\x11" * 32
OTHER_DOMAIN = Eip712Domain(31337, "0x" + "22" * 20)


class Member:
    """A committee member's key, voting by hand."""

    def __init__(self, domain: Eip712Domain = OFFCHAIN_DOMAIN) -> None:
        self.key = NodeKey.generate()
        self.address = self.key.address
        self.domain = domain

    def commit(
        self, tokens: list[int], salt: bytes = b"\x01" * 32, request: bytes = REQUEST
    ) -> wire.VoteCommit:
        commitment = vote_commitment(request, output_hash(tokens), salt)
        return wire.VoteCommit(
            request, commitment, sign(self.key, self.domain.commit_digest(request, commitment))
        )

    def reveal(
        self, tokens: list[int], salt: bytes = b"\x01" * 32, request: bytes = REQUEST
    ) -> wire.VoteReveal:
        return wire.VoteReveal(
            request,
            tokens,
            "text",
            salt,
            sign(self.key, self.domain.result_digest(request, output_hash(tokens))),
        )


def tally_of(members: list[Member]) -> JobTally:
    return JobTally(REQUEST, "model", tuple(m.address for m in members), OFFCHAIN_DOMAIN)


def add(tally: JobTally, signer: str, vote: wire.VoteCommit | wire.VoteReveal) -> bool:
    if isinstance(vote, wire.VoteCommit):
        return tally.add_commit(signer, vote)
    return tally.add_reveal(signer, vote)


def test_a_majority_certifies_and_the_certificate_verifies() -> None:
    a, b, c = members = [Member() for _ in range(3)]
    tally = tally_of(members)
    for member, tokens in ((a, [1, 2]), (b, [1, 2]), (c, [9])):
        assert tally.add_commit(member.address, member.commit(tokens))
    assert tally.certificate() is None
    assert tally.add_reveal(a.address, a.reveal([1, 2]))
    assert tally.add_reveal(c.address, c.reveal([9]))
    assert tally.certificate() is None
    assert not tally.majority_impossible()
    # (had b said it cannot run the job, no output could reach 2 of 3 any more)
    assert tally.majority_impossible(cannot_run={b.address})
    assert tally.add_reveal(b.address, b.reveal([1, 2]))
    certificate = tally.certificate()
    assert certificate is not None
    assert certificate.signers == (a.address, b.address)
    assert certificate.output_hash == output_hash([1, 2])
    assert tally.dissenters() == [c.address]
    CertificateVerifier(OFFCHAIN_DOMAIN).verify(certificate)
    assert Certificate.from_json(certificate.to_json()) == certificate


def test_votes_that_break_the_rules_do_not_count() -> None:
    a, b, _ = members = [Member() for _ in range(3)]
    outsider = Member()
    tally = tally_of(members)
    cases: list[tuple[str, str, wire.VoteCommit | wire.VoteReveal]] = [
        ("not_in_committee", outsider.address, outsider.commit([1])),
        ("bad_signature", a.address, b.commit([1])),  # b's signature sent as a's vote
        ("bad_signature", a.address, Member(OTHER_DOMAIN).commit([1])),
        ("no_commit", a.address, a.reveal([1])),
    ]
    for reason, signer, vote in cases:
        with pytest.raises(VoteRejected) as caught:
            add(tally, signer, vote)
        assert caught.value.reason == reason
    tally.add_commit(a.address, a.commit([1]))
    with pytest.raises(VoteRejected, match="bad_reveal"):
        tally.add_reveal(a.address, a.reveal([2]))  # not what was committed
    with pytest.raises(VoteRejected, match="bad_reveal"):
        tally.add_reveal(a.address, a.reveal([1], salt=b"\x02" * 32))
    assert not tally.add_commit(a.address, a.commit([1]))  # a replay changes nothing
    assert tally.commits.keys() == {a.address}
    assert tally.reveals == {}


def test_two_commits_from_one_member_are_evidence_and_void_its_vote() -> None:
    a, b, c = members = [Member() for _ in range(3)]
    tally = tally_of(members)
    tally.add_commit(a.address, a.commit([1]))
    tally.add_reveal(a.address, a.reveal([1]))
    tally.add_commit(a.address, a.commit([2]))
    evidence = tally.equivocations[a.address]
    assert evidence.commitment_a != evidence.commitment_b
    assert a.address not in tally.reveals
    with pytest.raises(VoteRejected, match="equivocated"):
        tally.add_reveal(a.address, a.reveal([1]))
    # b and c alone can still make a majority of three.
    for member in (b, c):
        tally.add_commit(member.address, member.commit([5]))
        tally.add_reveal(member.address, member.reveal([5]))
    certificate = tally.certificate()
    assert certificate is not None
    assert certificate.signers == (b.address, c.address)


def test_the_verifier_applies_the_contracts_rules() -> None:
    a, b, _ = members = [Member() for _ in range(3)]
    tally = tally_of(members)
    for member in members:
        tally.add_commit(member.address, member.commit([7]))
        tally.add_reveal(member.address, member.reveal([7]))
    good = tally.certificate()
    assert good is not None
    verifier = CertificateVerifier(OFFCHAIN_DOMAIN)
    bad = {
        "no_majority": Certificate(
            REQUEST,
            "model",
            good.output_hash,
            good.committee,
            good.signers[:1],
            good.signatures[:1],
        ),
        "duplicate_signer": Certificate(
            REQUEST,
            "model",
            good.output_hash,
            good.committee,
            (a.address, a.address),
            (good.signatures[0],) * 2,
        ),
        "bad_signature": Certificate(
            REQUEST, "model", output_hash([8]), good.committee, good.signers, good.signatures
        ),
        "not_in_committee": Certificate(
            REQUEST,
            "model",
            good.output_hash,
            good.committee,
            (Member().address, b.address),
            good.signatures[:2],
        ),
        "length_mismatch": Certificate(
            REQUEST, "model", good.output_hash, good.committee, good.signers, good.signatures[:2]
        ),
    }
    for reason, certificate in bad.items():
        with pytest.raises(VoteRejected) as caught:
            verifier.verify(certificate)
        assert caught.value.reason == reason
    with pytest.raises(VoteRejected, match="bad_signature"):
        CertificateVerifier(OTHER_DOMAIN).verify(good)  # votes do not cross domains


def test_the_request_id_covers_every_field_but_the_id() -> None:
    base = wire.JobOffer(
        b"\0" * 32, "model", "prompt", None, 8, 0.0, 1.0, -1, None, False,
        "0x" + "ab" * 20, 1, ["0x" + "ab" * 20], 1, 2,
    )  # fmt: skip
    changed: list[dict[str, Any]] = [
        {"model": "other"},
        {"prompt": "other"},
        {"max_tokens": 9},
        {"temperature": 0.5, "seed": 1},
        {"top_p": 0.9},
        {"top_k": 3},
        {"ignore_eos": True},
        {"stop": ["\n"]},
        {"stop": ["\n", "."]},
        {"requester": "0x" + "cd" * 20},
        {"nonce": 2},
        # who runs it, drawn from which block, until when
        {"committee": ["0x" + "cd" * 20]},
        {"committee_block": wire.BlockRef(8, b"\1" * 32)},
        {"commit_deadline_ms": 2},
        {"reveal_deadline_ms": 3},
    ]
    ids = {request_id_of(msgspec.structs.replace(base, **change)) for change in changed}
    assert len(ids | {request_id_of(base)}) == len(changed) + 1
    # Stop sequences weigh in only when given: an offer without them keeps its old id.
    before_stops = ("model", "prompt", None, 8, 0.0, 1.0, -1, None, False)
    assert input_hash_of(base) == keccak(msgspec.msgpack.encode(before_stops))
    assert input_hash_of(base) != input_hash_of(msgspec.structs.replace(base, stop=["\n"]))
    # How the output is delivered is not what it is.
    assert request_id_of(base) == request_id_of(msgspec.structs.replace(base, stream=True))


# ---- real nodes


@asynccontextmanager
async def committee_of(
    tmp_path: Path, tiny_model: Path, engine: VllmEngine, count: int, commit_timeout_s: float = 20
) -> AsyncIterator[list[Node]]:
    async with AsyncExitStack() as stack:
        nodes: list[Node] = []
        for i in range(count):
            bootstrap = nodes[0].p2p.listen_addrs() if nodes else None
            home = consensus_home(tmp_path / f"n{i}", tiny_model, bootstrap, commit_timeout_s)
            nodes.append(await stack.enter_async_context(running_node(home, {"tiny": engine})))
        for node in nodes:
            await wait_for(
                partial(sees_all_serving, node, nodes, "tiny"), 15, "all peers up, serving"
            )
        yield nodes


def consensus_home(
    path: Path, tiny_model: Path, bootstrap: list[str] | None, commit_timeout_s: float = 20
) -> NodeHome:
    home = fast_p2p(make_home(path), bootstrap=bootstrap)
    home.set("inference", "models", f'[{{name = "tiny", path = "{tiny_model}"}}]')
    home.set("inference", "max_model_len", "256")
    home.set("consensus", "commit_timeout_s", str(commit_timeout_s))
    home.set("consensus", "reveal_timeout_s", "5")
    return home


async def wait_job(node: Node, request_id: bytes, within_s: float = 30) -> dict[str, object]:
    job = node.consensus.jobs[request_id]
    with trio.fail_after(within_s):
        await job.done.wait()
    return job.to_json()


PROMPT = {"model": "tiny", "prompt": "Hello world", "max_tokens": 8, "ignore_eos": True}


async def test_an_honest_committee_of_three_certifies_the_output(
    tmp_path: Path, tiny_model: Path, tiny_engine: VllmEngine
) -> None:
    async with committee_of(tmp_path, tiny_model, tiny_engine, 3) as nodes:
        a = nodes[0]
        job = await a.consensus.submit(SubmitParams(**PROMPT))
        assert sorted(job.tally.committee) == sorted(n.consensus.address for n in nodes)
        result = await wait_job(a, job.request_id)
        assert result["status"] == "certified", result["reason"]
        certificate = Certificate.from_json(result["certificate"])  # type: ignore[arg-type]
        CertificateVerifier(OFFCHAIN_DOMAIN).verify(certificate)
        # Decided as soon as a strict majority agrees (2 of 3); all were honest.
        assert len(certificate.signers) >= 2
        assert set(certificate.signers) <= set(certificate.committee)
        assert result["dissenters"] == []
        local = await a.inference_client.complete(
            "tiny", "Hello world", None, SamplingSpec(max_tokens=8, ignore_eos=True)
        )
        output = result["output"]
        assert isinstance(output, dict)
        assert output["token_ids"] == list(local.token_ids)
        assert output["text"] == local.text
        # Every member certified the same output on its own (each with the
        # first majority it heard, so the signer sets may differ).
        for node in nodes[1:]:
            member = await wait_job(node, job.request_id)
            theirs = Certificate.from_json(member["certificate"])  # type: ignore[arg-type]
            CertificateVerifier(OFFCHAIN_DOMAIN).verify(theirs)
            assert theirs.output_hash == certificate.output_hash


class WrongWeights:
    """An inference client whose outputs differ: a node serving other weights under the id."""

    def __init__(self, honest: InferenceClient) -> None:
        self._honest = honest

    async def complete(self, *args: Any, **kwargs: Any) -> InferenceResult:
        result = await self._honest.complete(*args, **kwargs)
        return dataclasses.replace(result, token_ids=(*result.token_ids[:-1], 0), text="wrong")


async def test_a_member_with_other_weights_is_outvoted(
    tmp_path: Path, tiny_model: Path, tiny_engine: VllmEngine
) -> None:
    async with committee_of(tmp_path, tiny_model, tiny_engine, 3) as nodes:
        liar = nodes[2]
        liar.consensus._inference = WrongWeights(liar.inference_client)  # type: ignore[assignment]
        job = await nodes[0].consensus.submit(SubmitParams(**PROMPT))
        result = await wait_job(nodes[0], job.request_id)
        assert result["status"] == "certified"
        output = result["output"]
        assert isinstance(output, dict)
        assert output["text"] != "wrong"
        certificate = Certificate.from_json(result["certificate"])  # type: ignore[arg-type]
        assert liar.consensus.address not in certificate.signers
        # The liar's reveal, if it came before the decision, marks it a dissenter.
        await wait_for(
            lambda: liar.consensus.jobs[job.request_id].finished(), 10, "the liar's tally ends"
        )
        assert liar.consensus.jobs[job.request_id].certificate is not None
        assert liar.consensus.jobs[job.request_id].tally.dissenters() in (
            [],
            [liar.consensus.address],
        )


async def test_a_missing_member_is_outvoted_by_time_and_two_missing_fail_the_job(
    tmp_path: Path, tiny_model: Path, tiny_engine: VllmEngine
) -> None:
    async with committee_of(tmp_path, tiny_model, tiny_engine, 3, commit_timeout_s=4) as nodes:
        a, b, c = nodes
        # Committee chosen while all are up; then C goes away.
        job = await a.consensus.submit(SubmitParams(**PROMPT, nonce=1))
        assert len(job.tally.committee) == 3
        result = await wait_job(a, job.request_id)
        assert result["status"] == "certified"

        await c.request_shutdown("test: a member dies")
        offer = await a.consensus.submit(SubmitParams(**PROMPT, nonce=2))
        if c.consensus.address in offer.tally.committee:
            result = await wait_job(a, offer.request_id)
            assert result["status"] == "certified"  # 2 of 3 are a majority

        await b.request_shutdown("test: a second member dies")
        lonely = a.consensus.jobs[
            (await a.consensus.submit(SubmitParams(**PROMPT, nonce=3, committee_size=3))).request_id
        ]
        # A still believes B and C are up (their heartbeats have not timed out yet), or
        # picks only itself: either way the job ends, with its reason.
        result = await wait_job(a, lonely.request_id, within_s=40)
        if len(lonely.tally.committee) == 1:
            assert result["status"] == "certified"
        else:
            assert result["status"] == "failed"
            assert "no majority" in str(result["reason"])
            assert "no reveal from" in str(result["reason"])


class Slow:
    """An inference client that takes its time, to keep a job open."""

    def __init__(self, honest: InferenceClient, seconds: float) -> None:
        self._honest = honest
        self._seconds = seconds

    async def complete(self, *args: Any, **kwargs: Any) -> InferenceResult:
        await trio.sleep(self._seconds)
        return await self._honest.complete(*args, **kwargs)


async def test_votes_from_outside_the_committee_are_rejected(
    tmp_path: Path, tiny_model: Path, tiny_engine: VllmEngine
) -> None:
    async with committee_of(tmp_path, tiny_model, tiny_engine, 4) as nodes:
        a = nodes[0]
        for node in nodes:
            node.consensus._inference = Slow(node.inference_client, 2.0)  # type: ignore[assignment]
        job = await a.consensus.submit(SubmitParams(**PROMPT, committee_size=3))
        outsider = next(n for n in nodes if n.consensus.address not in job.tally.committee)
        forged = Member()
        forged.key = outsider.p2p._key  # the outsider signs with its own node key
        forged.address = outsider.consensus.address
        await outsider.p2p.publish(VOTES, forged.commit([1, 2, 3], request=job.request_id))
        members = [n for n in nodes if n.consensus.address in job.tally.committee]
        for member in members:
            await wait_for(
                partial(lambda n: _rejected(n, "not_in_committee") == 1.0, member),
                10,
                "every member refuses the outsider's vote",
            )
        assert not job.finished()
        result = await wait_job(a, job.request_id)
        assert result["status"] == "certified"
        assert outsider.consensus.address not in result["commits"]  # type: ignore[operator]


async def test_a_member_restarted_mid_job_reveals_what_it_committed(
    tmp_path: Path, tiny_model: Path, tiny_engine: VllmEngine
) -> None:
    engines = {"tiny": tiny_engine}
    async with running_node(consensus_home(tmp_path / "a", tiny_model, None), engines) as a:
        bootstrap = a.p2p.listen_addrs()
        b_home = consensus_home(tmp_path / "b", tiny_model, bootstrap)
        async with running_node(
            consensus_home(tmp_path / "c", tiny_model, bootstrap), engines
        ) as c:
            c.consensus._inference = Slow(c.inference_client, 4.0)  # type: ignore[assignment]
            async with running_node(b_home, engines) as b:
                for node in (a, b, c):
                    await wait_for(partial(sees_all_serving, node, [a, b, c], "tiny"), 15, "all up")
                job = await a.consensus.submit(SubmitParams(**PROMPT))
                request_id = job.request_id
                await wait_for(
                    lambda: (
                        request_id in b.consensus.jobs
                        and b.consensus.jobs[request_id].my_vote is not None
                    ),
                    10,
                    "B has committed",
                )
                b_vote = b.consensus.jobs[request_id].my_vote
                assert b_vote is not None
                assert not b_vote.revealed
            # B is down before C has even committed; it comes back.
            close_leaked_sockets()
            async with running_node(b_home, engines) as b_again:
                restored = b_again.consensus.jobs[request_id]
                assert restored.my_vote is not None
                assert restored.my_vote.commitment == b_vote.commitment
                result = await wait_job(a, request_id)
                assert result["status"] == "certified"
                await wait_for(restored.finished, 20, "B finishes the job too")
                assert restored.status == "certified", restored.reason
                assert restored.my_vote.revealed
                # B revealed exactly what it had committed: no equivocation anywhere.
                assert a.consensus.jobs[request_id].tally.equivocations == {}
                assert restored.tally.equivocations == {}


async def test_jobs_through_the_control_socket(
    tmp_path: Path, tiny_model: Path, tiny_engine: VllmEngine
) -> None:
    async with committee_of(tmp_path, tiny_model, tiny_engine, 3) as nodes:
        a = nodes[0]
        notes: list[dict[str, Any]] = []
        token = a.config.control.token_file.read_text().strip()
        async with ControlClient.connect(
            a.control.url or "", token, on_notification=notes.append
        ) as client:
            submitted = await client.call("infer.submit", PROMPT)
            assert len(submitted["committee"]) == 3
            assert submitted["model"] == a.inference.model_id("tiny")
            done = await client.call("job.wait", {"request_id": submitted["request_id"]})
            assert done["status"] == "certified"
            assert done["output"]["token_ids"]
            assert notes[0]["method"] == "job.progress"
            assert notes[0]["params"]["request_id"] == submitted["request_id"]
            assert await client.call("job.get", {"request_id": submitted["request_id"]}) == done
            listed = await client.call("jobs.list", {"limit": 5})
            assert [j["request_id"] for j in listed] == [submitted["request_id"]]

            bad: list[tuple[dict[str, Any], int, str]] = [
                (
                    {**PROMPT, "messages": [{"role": "user", "content": "x"}]},
                    INVALID_PARAMS,
                    "either",
                ),
                ({**PROMPT, "model": "QmNobodyServesThis"}, JOB_ERROR, "no healthy node"),
                ({**PROMPT, "temperature": 1.0}, INVALID_PARAMS, "seed"),
                ({**PROMPT, "committee_size": 99}, INVALID_PARAMS, "committee_size"),
            ]
            for params, code, message in bad:
                with pytest.raises(RpcError) as caught:
                    await client.call("infer.submit", params)
                assert caught.value.code == code, caught.value.message
                assert message in caught.value.message
            with pytest.raises(RpcError) as unknown:
                await client.call("job.get", {"request_id": "0x" + "00" * 32})
            assert unknown.value.code == JOB_ERROR
            # Nothing broke: another job goes through.
            again = await client.call("infer.submit", {**PROMPT, "nonce": 7})
            done = await client.call("job.wait", {"request_id": again["request_id"]})
            assert done["status"] == "certified"


async def test_a_malformed_offer_from_a_peer_is_dropped_and_members_keep_running(
    tmp_path: Path, tiny_model: Path, tiny_engine: VllmEngine
) -> None:
    async with committee_of(tmp_path, tiny_model, tiny_engine, 3) as nodes:
        a, b, c = nodes
        now_ms = time.time_ns() // 1_000_000
        draft = wire.JobOffer(
            b"\0" * 32, a.inference.model_id("tiny") or "", "x", None, 4,
            1.0, 1.0, -1, None,  # sampling without a seed: no two members would agree
            False, a.consensus.address, 1,
            [n.consensus.address for n in nodes], now_ms + 5000, now_ms + 9000,
        )  # fmt: skip
        offer = msgspec.structs.replace(draft, request_id=request_id_of(draft))
        forged_id = msgspec.structs.replace(offer, request_id=b"\x01" * 32)
        await a.p2p.publish(JOBS, offer)
        await a.p2p.publish(JOBS, forged_id)
        for node in (b, c):
            await wait_for(partial(_dropped_both, node), 5, "both offers dropped")
            assert node.consensus.jobs == {}
            assert node.supervisor.snapshot()["consensus"]["state"] == "ready"
        job = await a.consensus.submit(SubmitParams(**PROMPT))
        assert (await wait_job(a, job.request_id))["status"] == "certified"


def _dropped_both(node: Node) -> bool:
    return _rejected(node, "bad_offer") == 1.0 and _rejected(node, "bad_request_id") == 1.0


def _rejected(node: Node, reason: str) -> float | None:
    return node.registry.get_sample_value(
        "joynode_consensus_rejected_votes_total", {"reason": reason}
    )


async def test_a_replayed_offer_is_never_run_twice_even_after_a_restart(
    tmp_path: Path, tiny_model: Path, tiny_engine: VllmEngine
) -> None:
    engines = {"tiny": tiny_engine}
    async with running_node(consensus_home(tmp_path / "a", tiny_model, None), engines) as a:
        b_home = consensus_home(tmp_path / "b", tiny_model, a.p2p.listen_addrs())
        async with running_node(b_home, engines) as b:
            for node in (a, b):
                await wait_for(partial(sees_all_serving, node, [a, b], "tiny"), 15, "both up")
            job = await a.consensus.submit(SubmitParams(**PROMPT, committee_size=2))
            assert (await wait_job(a, job.request_id))["status"] == "certified"
            await wait_for(b.consensus.jobs[job.request_id].finished, 10, "B done")
        close_leaked_sockets()
        async with running_node(b_home, engines) as b_again:
            # The same signed offer once more (gossip's replay cache did not survive
            # the restart): handed to the actor as gossip would hand it.
            await b_again.consensus._on_offer(job.offer, a.consensus.address)
            assert job.request_id not in b_again.consensus.jobs
            assert a.consensus.jobs[job.request_id].tally.equivocations == {}
            # The finished job is still there to look at.
            token = b_home.token.value
            async with ControlClient.connect(b_again.control.url or "", token) as client:
                stored = await client.call("job.get", {"request_id": "0x" + job.request_id.hex()})
            assert stored["status"] == "certified"


# ---- delivery to the committee (in memory, no sockets)


class FakeNetwork:
    """Peers by name: some answer at once, ``slow`` ones take a while, ``gone`` ones fail."""

    def __init__(self, slow: set[str], gone: set[str]) -> None:
        self.slow, self.gone = slow, gone
        self.received: dict[str, list[wire.Message]] = {}
        self.published: list[wire.Message] = []

    async def request(
        self, peer_id: str, message: wire.Message, *, timeout_s: float | None = None
    ) -> wire.AnyMessage:
        if peer_id in self.gone:
            raise RpcFailure(f"no answer from {peer_id}")
        if peer_id in self.slow:
            await trio.sleep(1.0)
        self.received.setdefault(peer_id, []).append(message)
        return wire.Received()

    async def publish(self, topic: object, message: wire.Message) -> None:
        self.published.append(message)


async def test_delivery_keeps_order_per_follower_and_gossips_once_for_the_unreachable(
    autojump_clock: trio.abc.Clock,
) -> None:
    network = FakeNetwork(slow={"slow"}, gone={"gone"})
    sent = Counter("sent", "", ["kind", "route"], registry=CollectorRegistry())
    delivery = Delivery(network, lambda address: address, sent)
    member = Member()
    commit, reveal = member.commit([1, 2]), member.reveal([1, 2])
    async with trio.open_nursery() as nursery:
        await nursery.start(delivery.run)
        began = trio.current_time()
        delivery.send(["fast", "slow", "gone"], VOTES, commit)
        delivery.send(["fast", "slow", "gone"], VOTES, reveal)
        assert trio.current_time() == began  # sending never waits for anyone
        await trio.sleep(0.1)
        assert network.received["fast"] == [commit, reveal]  # not held up by the slow one
        await trio.sleep(5)
        assert network.received["slow"] == [commit, reveal]  # in order, the reveal after
        # The unreachable follower's messages went by gossip, each once.
        assert network.published == [commit, reveal]
        delivery.send(["gone"], VOTES, commit)  # again: already gossiped, not twice
        await trio.sleep(1)
        assert network.published == [commit, reveal]
        nursery.cancel_scope.cancel()
    assert sent.labels("VoteCommit", "direct")._value.get() == 2
    assert sent.labels("VoteCommit", "gossip")._value.get() == 1
