"""Prefill verification: the judging rules, and real SmolLM2 engines in other dtypes.

The engine tests answer a set of prompts with a float32 executor and check
its outputs with bfloat16 verifiers (one prefill pass each): every honest
answer passes the tolerant check, while exact replication across the two
dtypes disagrees on some of the same prompts. Outputs of other weights,
truncated and padded outputs are refused.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from joynode import wire
from joynode.chain.committee import Candidate, chainless_seed, select_committee
from joynode.config import ModelEntry
from joynode.consensus.calibration import serving
from joynode.consensus.control import SubmitParams
from joynode.consensus.prefill import exact
from joynode.consensus.tally import Certificate, CertificateVerifier
from joynode.consensus.verification import judge, length_problem
from joynode.inference.engine import VllmEngine
from joynode.inference.service import InferenceClient, first_stop
from joynode.messages import ClaimScores, SamplingSpec
from joynode.node import Node
from joynode.signatures import OFFCHAIN_DOMAIN
from tests.factories import (
    LIBP2P_TEARDOWN_LEAK,
    NodeHome,
    fast_p2p,
    make_home,
    run_cli,
    running_node,
    sees_all_serving,
    wait_for,
)
from tests.inference_fixtures import (
    SMOLLM2_MAX_MODEL_LEN,
    smollm2_engines,
    smollm2_model,
    tiny_model,
)

__all__ = ["smollm2_engines", "smollm2_model", "tiny_model"]

pytestmark = LIBP2P_TEARDOWN_LEAK

PREFILL = wire.Verification.of("prefill", 1.0, 0.02, 0.5)
EOS = frozenset({2})


def scores(gaps: list[float], ranks: list[int] | None = None) -> ClaimScores:
    """Scores whose claimed tokens sit ``gaps`` nats below the verifier's top-1."""
    return ClaimScores(
        model="m",
        token_logprobs=tuple(-1.0 - g for g in gaps),
        top_logprobs=tuple(-1.0 for _ in gaps),
        ranks=tuple(ranks or [1 if g == 0 else 2 for g in gaps]),
        eos_token_ids=EOS,
        prompt_tokens=3,
        total_s=0.0,
    )


GREEDY_8 = SamplingSpec(max_tokens=8, ignore_eos=True)


def test_greedy_claims_pass_within_the_margin_and_the_allowed_fraction() -> None:
    claimed = [5] * 8
    assert judge(PREFILL, GREEDY_8, claimed, scores([0.0] * 8)).accepted
    assert judge(PREFILL, GREEDY_8, claimed, scores([0.9, 0.3, 0, 0, 0, 0, 0, 0.99])).accepted
    refused = judge(PREFILL, GREEDY_8, claimed, scores([0, 0, 1.5, 0, 0, 0, 0, 0]))
    assert not refused.accepted  # 2 % of 8 positions is 0 allowed
    assert "1 of 8 positions beyond the margin" in refused.reason
    lenient = wire.Verification.of("prefill", 1.0, 0.25, 0.5)  # 2 of 8 allowed
    assert judge(lenient, GREEDY_8, claimed, scores([0, 0, 5.0, 0, 0, 0, 9.0, 0])).accepted
    assert not judge(lenient, GREEDY_8, claimed, scores([0, 3, 5.0, 0, 0, 0, 9.0, 0])).accepted


def test_the_same_build_is_held_to_its_own_top_1_other_builds_to_the_tolerance() -> None:
    claimed = [5] * 8
    near_tie = scores([0, 0, 0, 0.01, 0, 0, 0, 0])  # one token a hundredth of a nat off
    assert judge(PREFILL, GREEDY_8, claimed, near_tie).accepted
    refused = judge(exact(PREFILL), GREEDY_8, claimed, near_tie)
    assert not refused.accepted
    assert "1 of 8 positions beyond the margin" in refused.reason
    assert judge(exact(PREFILL), GREEDY_8, claimed, scores([0.0] * 8)).accepted
    # Sampled jobs keep the registered tolerance.
    assert exact(PREFILL).sampled_outside_bps == PREFILL.sampled_outside_bps


def test_sampled_claims_are_judged_on_the_tempered_gap_and_the_top_k_cut() -> None:
    sampled = SamplingSpec(max_tokens=4, temperature=2.0, seed=1, ignore_eos=True)
    # 1.8 nats raw is 0.9 at temperature 2: inside a 1-nat margin; half may be outside.
    assert judge(PREFILL, sampled, [5] * 4, scores([1.8, 1.9, 0, 0])).accepted
    assert judge(PREFILL, sampled, [5] * 4, scores([2.2, 9.0, 0, 0])).accepted
    assert not judge(PREFILL, sampled, [5] * 4, scores([2.2, 9.0, 2.1, 0])).accepted
    top_2 = SamplingSpec(max_tokens=4, temperature=2.0, top_k=2, seed=1, ignore_eos=True)
    past_the_cut = scores([0.1, 0.1, 0.1, 0], ranks=[3, 3, 3, 1])
    assert not judge(PREFILL, top_2, [5] * 4, past_the_cut).accepted


def test_outputs_of_the_wrong_length_are_refused_whatever_their_tokens() -> None:
    stop = SamplingSpec(max_tokens=6)
    assert length_problem([5, 6, 2], stop, EOS) == ""  # ended by EOS
    assert length_problem([5] * 6, stop, EOS) == ""  # ran to max_tokens
    assert "truncated" in length_problem([5, 6, 7], stop, EOS)
    assert "after its end-of-sequence" in length_problem([5, 2, 7], stop, EOS)
    assert "over 6" in length_problem([5] * 7, stop, EOS)
    assert "empty" in length_problem([], stop, EOS)
    assert "stops at 5 of 8" in length_problem([5] * 5, GREEDY_8, EOS)
    verdict = judge(PREFILL, stop, [5, 6, 7], scores([0, 0, 0]))
    assert not verdict.accepted
    assert "truncated" in verdict.reason


def test_an_output_ends_at_its_first_stop_sequence_and_not_elsewhere() -> None:
    spec = SamplingSpec(max_tokens=6, stop=("\n\n",))
    assert length_problem([5, 6, 7], spec, EOS, stop_index=2) == ""  # the stop completed at 2
    assert "after its stop sequence at 1" in length_problem([5, 6, 7], spec, EOS, stop_index=1)
    assert "truncated" in length_problem([5, 6, 7], spec, EOS, stop_index=None)
    assert length_problem([5, 6, 2], spec, EOS, stop_index=None) == ""  # EOS still ends it


class Letters:
    """A tokenizer whose token i is the letter chr(i) (``first_stop`` only decodes)."""

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return "".join(chr(i) for i in ids)


def test_the_first_token_completing_a_stop_sequence_is_found() -> None:
    tokens = [ord(c) for c in "ab. cd. ef"]
    assert first_stop(Letters(), tokens, [". c"]) == 4
    assert first_stop(Letters(), tokens, ["zz", "d."]) == 6
    assert first_stop(Letters(), tokens, ["."]) == 2
    assert first_stop(Letters(), tokens, ["nowhere"]) is None
    assert first_stop(Letters(), [], ["."]) is None


def test_policies_travel_as_integers_and_replicate_needs_no_tolerance() -> None:
    assert wire.Verification("prefill", 1000, 200, 5000) == PREFILL
    assert wire.Verification.of("replicate", 5.0, 0.5, 0.5) == wire.REPLICATE
    assert "margin 1.0 nats" in PREFILL.describe()


# ---- real engines

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "Explain photosynthesis in one sentence.",
    "List three prime numbers:",
    "Once upon a time,",
    "What is 17 times 23?",
    "Why is the sky blue?",
]
GREEDY_32 = SamplingSpec(max_tokens=32)


async def outputs(client: InferenceClient, sampling: SamplingSpec) -> list[tuple[int, ...]]:
    found: list[tuple[int, ...]] = []
    for prompt in PROMPTS:
        found.append((await client.complete("model", prompt, None, sampling)).token_ids)
    return found


@pytest.mark.slow
async def test_a_bf16_verifier_certifies_every_f32_answer_that_replication_would_not(
    smollm2_model: Path, smollm2_engines: dict[str, VllmEngine]
) -> None:
    async with (
        serving(smollm2_model, smollm2_engines["f32"]) as executor,
        serving(smollm2_model, smollm2_engines["bf16"]) as verifier,
    ):
        claimed = await outputs(executor, GREEDY_32)
        replicated = await outputs(verifier, GREEDY_32)
        verdicts = []
        for prompt, tokens in zip(PROMPTS, claimed, strict=True):
            scored = await verifier.score("model", prompt, None, tokens)
            verdicts.append(judge(PREFILL, GREEDY_32, tokens, scored))
    assert all(v.accepted for v in verdicts), [v.reason for v in verdicts]
    # The same answers, regenerated in bfloat16: some differ in a token or more.
    differing = [p for p, a, b in zip(PROMPTS, claimed, replicated, strict=True) if a != b]
    assert differing, "float32 and bfloat16 agreed exactly on every prompt"
    assert max(v.worst_gap for v in verdicts) < PREFILL.margin_milli / 1000


@pytest.mark.slow
async def test_other_weights_truncated_and_padded_outputs_are_refused(
    smollm2_model: Path, smollm2_engines: dict[str, VllmEngine]
) -> None:
    async with (
        serving(smollm2_model, smollm2_engines["other"]) as liar,
        serving(smollm2_model, smollm2_engines["f32"]) as honest,
        serving(smollm2_model, smollm2_engines["bf16"]) as verifier,
    ):
        lies = await outputs(liar, GREEDY_32)
        truths = await outputs(honest, GREEDY_32)
        for prompt, tokens, truth in zip(PROMPTS, lies, truths, strict=True):
            for checker in (verifier, honest):
                scored = await checker.score("model", prompt, None, tokens)
                verdict = judge(PREFILL, GREEDY_32, tokens, scored)
                assert not verdict.accepted, (prompt, verdict)
            cut = truth[: len(truth) // 2]
            padded = (*truth, *truth[:4]) if len(truth) == 32 else (*truth, 17, 42)
            for forged in (cut, padded):
                scored = await verifier.score("model", prompt, None, forged)
                assert not judge(PREFILL, GREEDY_32, forged, scored).accepted, (prompt, forged)


@pytest.mark.slow
async def test_seeded_sampling_is_verified_and_other_weights_sampling_is_not(
    smollm2_model: Path, smollm2_engines: dict[str, VllmEngine]
) -> None:
    sampled = SamplingSpec(max_tokens=32, temperature=0.7, seed=11)
    async with (
        serving(smollm2_model, smollm2_engines["other"]) as liar,
        serving(smollm2_model, smollm2_engines["f32"]) as executor,
        serving(smollm2_model, smollm2_engines["bf16"]) as verifier,
    ):
        honest = await outputs(executor, sampled)
        lies = await outputs(liar, sampled)
        for prompt, tokens, lie in zip(PROMPTS, honest, lies, strict=True):
            scored = await verifier.score("model", prompt, None, tokens)
            verdict = judge(PREFILL, sampled, tokens, scored)
            assert verdict.accepted, (prompt, verdict)
            scored = await verifier.score("model", prompt, None, lie)
            assert not judge(PREFILL, sampled, lie, scored).accepted, prompt


# ---- committees of real nodes on 127.0.0.1 (in this process), serving SmolLM2


def prefill_home(path: Path, model: Path, bootstrap: list[str] | None, mode: str) -> NodeHome:
    home = fast_p2p(make_home(path), bootstrap=bootstrap)
    home.set(
        "inference", "models", f'[{{name = "model", path = "{model}", verification = "{mode}"}}]'
    )
    home.set("inference", "max_model_len", str(SMOLLM2_MAX_MODEL_LEN))
    home.set("consensus", "commit_timeout_s", "60")
    home.set("consensus", "reveal_timeout_s", "10")
    return home


@asynccontextmanager
async def smollm2_committee(
    tmp_path: Path, model: Path, engines: list[VllmEngine], mode: str
) -> AsyncIterator[list[Node]]:
    """One node per engine (the first bootstraps the rest), all up and serving."""
    async with AsyncExitStack() as stack:
        nodes: list[Node] = []
        for i, engine in enumerate(engines):
            bootstrap = nodes[0].p2p.listen_addrs() if nodes else None
            home = prefill_home(tmp_path / f"{mode}{i}", model, bootstrap, mode)
            nodes.append(await stack.enter_async_context(running_node(home, {"model": engine})))
        for node in nodes:
            await wait_for(
                partial(sees_all_serving, node, nodes, "model"), 20, "all peers up, serving"
            )
        yield nodes


def nonce_ranking_first(requester: Node, first: Node, nodes: list[Node]) -> int:
    """A nonce whose (unpaid) committee ranks ``first`` first, as ``submit`` will draw it."""
    candidates = [Candidate(n.consensus.address, 1, 1) for n in nodes]
    for nonce in range(1000):
        seed = chainless_seed(requester.consensus.address, nonce)
        drawn = select_committee(candidates, seed, len(nodes), 0)
        if drawn[0] == first.consensus.address:
            return nonce
    raise AssertionError("no nonce ranks that node first")


async def run_job(node: Node, prompt: str, nonce: int) -> dict[str, Any]:
    params = SubmitParams(model="model", prompt=prompt, max_tokens=32, nonce=nonce)
    job = await node.consensus.submit(params)
    with trio.fail_after(90):
        await job.done.wait()
    # Let the remaining reveals (after the deciding majority) come in.
    with trio.move_on_after(10):
        while len(job.tally.reveals) < len(job.tally.committee):
            await job.changed.wait()
    return job.to_json()


@pytest.mark.slow
async def test_a_prefill_committee_certifies_what_a_replicate_one_splits_on(
    tmp_path: Path, smollm2_model: Path, smollm2_engines: dict[str, VllmEngine]
) -> None:
    """Float32 executor, bfloat16 verifiers: under replicate the float32 member is outvoted
    on one of the prompts; under prefill all three sign every answer up to that one."""
    engines = [smollm2_engines["f32"], smollm2_engines["bf16"], smollm2_engines["bf16"]]
    asked: list[str] = []
    async with smollm2_committee(tmp_path, smollm2_model, engines, "replicate") as nodes:
        f32 = nodes[0]
        for prompt in PROMPTS:
            asked.append(prompt)
            result = await run_job(f32, prompt, nonce_ranking_first(f32, f32, nodes))
            assert result["status"] == "certified", result["reason"]
            if f32.consensus.address in result["dissenters"]:
                break
        else:
            raise AssertionError("replication agreed across dtypes on every prompt")
    async with smollm2_committee(tmp_path, smollm2_model, engines, "prefill") as nodes:
        f32 = nodes[0]
        for prompt in asked:
            result = await run_job(f32, prompt, nonce_ranking_first(f32, f32, nodes))
            assert result["status"] == "certified", result["reason"]
            assert result["verification"] == "prefill"
            assert result["committee"][0] == f32.consensus.address  # the executor
            # Decided by the executor and the first verifier to endorse it (an unpaid job
            # takes no votes once decided); nobody refused or dissented.
            assert f32.consensus.address in result["reveals"]
            assert len(result["reveals"]) >= 2
            assert result["dissenters"] == []
            assert result["refusals"] == []
            certificate = Certificate.from_json(result["certificate"])
            CertificateVerifier(OFFCHAIN_DOMAIN).verify(certificate)

        # Verifiers spent a prefill pass on each job, never a generation.
        def count(node: Node, phase: str) -> float:
            found = node.registry.get_sample_value(
                "joynode_consensus_phase_seconds_count", {"phase": phase}
            )
            return found or 0.0

        assert count(f32, "inference") == len(asked)
        assert count(f32, "verification") == 0
        assert all(count(n, "inference") == 0 for n in nodes[1:])
        assert sum(count(n, "verification") for n in nodes[1:]) >= len(asked)


@pytest.mark.slow
async def test_a_lying_executor_is_refused_and_the_next_member_executes(
    tmp_path: Path, smollm2_model: Path, smollm2_engines: dict[str, VllmEngine]
) -> None:
    engines = [smollm2_engines["f32"], smollm2_engines["bf16"], smollm2_engines["other"]]
    async with smollm2_committee(tmp_path, smollm2_model, engines, "prefill") as nodes:
        requester, _, liar = nodes
        prompt = PROMPTS[0]
        result = await run_job(requester, prompt, nonce_ranking_first(requester, liar, nodes))
        assert result["status"] == "certified", result["reason"]
        certificate = Certificate.from_json(result["certificate"])
        assert liar.consensus.address not in certificate.signers
        assert len(certificate.signers) == 2
        refused_by = {
            r["verifier"] for r in result["refusals"] if r["claimant"] == liar.consensus.address
        }
        assert refused_by == {n.consensus.address for n in nodes if n is not liar}
        output = result["output"]
        assert "Paris" in output["text"]
        # Each honest node took the refusal out of the liar's peer score.
        for honest in nodes[:2]:
            assert honest.p2p.scorer.score(liar.p2p.peer_id) < 0


@pytest.mark.slow
def test_calibrate_measures_two_dtypes_and_prints_a_policy(tiny_model: Path) -> None:
    done = run_cli("verify", "calibrate", str(tiny_model), "--max-tokens", "8", timeout=300)
    assert done.returncode == 0, done.stderr
    report, _, toml = done.stdout.partition("\n# for the model's")
    measured = json.loads(report)
    assert measured["executor"] == "float32"
    assert measured["verifier"] == "bfloat16"
    assert measured["prompts"] == 16
    assert 0 < measured["positions"] <= 16 * 8
    assert measured["margin_nats"] >= max(0.5, measured["greedy_worst_gap"])
    entry = tomllib.loads(toml.partition("\n")[2])
    assert entry["verification"] == "prefill"
    assert entry["margin_nats"] == measured["margin_nats"]
    # The policy it prints is one a node accepts.
    ModelEntry(name="tiny", path=tiny_model, **entry)


def test_calibrate_refuses_what_is_not_a_model_in_one_line(tmp_path: Path) -> None:
    done = run_cli("verify", "calibrate", str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.startswith("joynode: ")
    assert "Traceback" not in done.stderr
    bad = run_cli("verify", "calibrate", str(tmp_path), "--max-tokens", "0")
    assert bad.returncode == 2
    assert "--max-tokens" in bad.stderr
