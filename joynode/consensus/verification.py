"""Judging a claimed output by prefill: the tolerant check of ``prefill`` verification.

A verifier teacher-forces the executor's claimed tokens through its own
model (one prefill pass, ``InferenceClient.score``) and compares each token
with its own distribution at that position:

- greedy (temperature 0): the claimed token should be this model's top-1; it
  is *outside* when its logprob is more than ``margin`` nats below the top-1's
  (a logit margin: both come from the same softmax). Other dtypes and GPUs
  move logits by hundredths of a nat and flip near-ties, nothing more;
- seeded sampling (temperature T): the draw is made on logits / T, so the gap
  is judged after dividing by T, and a token past the ``top_k`` cut is
  outside whatever its gap.

The claim is accepted when at most ``outside_bps`` of its positions are
outside (``sampled_outside_bps`` for sampled jobs: an honest draw often
lands on a token well below the top-1, a different model's far more often;
this check is statistical, and a cheater who picks plausible tokens without
the seed passes it), and when its length is one the request allows: no
more than ``max_tokens``, nothing after an end-of-sequence token or a stop
sequence, and no early stop without one (a truncated output). Pure functions,
no I/O.

Why prompt logprobs and not TOPLOC's hidden-state proofs: vLLM returns the
logprobs of a prefill from its public API on every build (CPU included),
while hidden states are not exposed by vLLM 0.32's V1 engine; and a logprob
gap is what a sampling check needs anyway. Measured on SmolLM2-135M (see
docs/benchmarks.md): a bf16 verifier of a float32 executor finds every
greedy token within 0.25 nats of its own top-1, while a different model's
output puts most positions more than a nat below it. Sampled at T = 0.7,
honest outputs had up to 28 % of positions beyond 1 nat (tempered), other
weights at least 75 %.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from joynode import wire
from joynode.messages import ClaimScores, SamplingSpec


@dataclass(frozen=True)
class Verdict:
    """A verifier's judgement of one claim; ``reason`` says why it was refused."""

    accepted: bool
    reason: str
    positions: int
    outside: int
    worst_gap: float  # nats (tempered for sampled jobs)

    def describe(self) -> str:
        return (
            f"{self.outside} of {self.positions} positions beyond the margin "
            f"(worst {self.worst_gap:.2f} nats)"
        )


def length_problem(
    claimed: Sequence[int],
    sampling: SamplingSpec,
    eos: frozenset[int],
    stop_index: int | None = None,
) -> str:
    """Why ``claimed`` cannot be a whole output of this request ("" if it can).

    ``stop_index``: the first claimed token whose text completes one of the
    request's stop sequences (``ClaimScores.stop_index``); the output must end there.
    """
    if not claimed:
        return "the claimed output is empty"
    if len(claimed) > sampling.max_tokens:
        return f"the claimed output has {len(claimed)} tokens, over {sampling.max_tokens}"
    if sampling.ignore_eos:
        if len(claimed) < sampling.max_tokens:
            return f"the claimed output stops at {len(claimed)} of {sampling.max_tokens} tokens"
        return ""
    early_end = next((i for i, t in enumerate(claimed[:-1]) if t in eos), None)
    if early_end is not None:
        return f"the claimed output goes on after its end-of-sequence token at {early_end}"
    last = len(claimed) - 1
    if stop_index is not None and stop_index < last:
        return f"the claimed output goes on after its stop sequence at {stop_index}"
    if len(claimed) < sampling.max_tokens and claimed[-1] not in eos and stop_index != last:
        return (
            f"the claimed output stops at {len(claimed)} of {sampling.max_tokens} tokens "
            "without an end-of-sequence token (truncated)"
        )
    return ""


def gaps_below_top(scores: ClaimScores, temperature: float) -> list[float]:
    """How far below the verifier's top-1 each claimed token is, in nats (divided by the
    temperature for sampled jobs: the draw is made on logits / T)."""
    t = temperature if temperature > 0 else 1.0
    return [
        max(0.0, top - mine) / t
        for mine, top in zip(scores.token_logprobs, scores.top_logprobs, strict=True)
    ]


def judge(
    policy: wire.Verification,
    sampling: SamplingSpec,
    claimed: Sequence[int],
    scores: ClaimScores,
) -> Verdict:
    """Accept or refuse ``claimed`` given this verifier's ``scores`` of it."""
    n = len(claimed)
    problem = length_problem(claimed, sampling, scores.eos_token_ids, scores.stop_index)
    if problem:
        return Verdict(False, problem, n, 0, 0.0)
    margin = policy.margin_milli / 1000
    gaps = gaps_below_top(scores, sampling.temperature)
    cut = sampling.top_k if sampling.temperature > 0 and sampling.top_k > 0 else None
    outside = sum(
        1
        for gap, rank in zip(gaps, scores.ranks, strict=True)
        if gap > margin or (cut is not None and rank > cut)
    )
    bps = policy.sampled_outside_bps if sampling.temperature > 0 else policy.outside_bps
    allowed = math.floor(n * bps / 10_000)
    worst = max(gaps, default=0.0)
    verdict = Verdict(True, "", n, outside, worst)
    if outside > allowed:
        return Verdict(False, f"{verdict.describe()}; at most {allowed} allowed", n, outside, worst)
    return verdict
