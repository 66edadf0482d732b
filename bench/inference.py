"""Generation throughput: the node's inference actor against vLLM and transformers.

One run, one model (SmolLM2-135M-Instruct, fp32, greedy, 64 new tokens per
request with EOS ignored so every request does the same work), three paths:

- actor: ``InferenceService`` with its own engine, requests submitted through
  ``InferenceClient`` from trio, ``c`` at once (vLLM batches them);
- vLLM: ``vllm.LLM.generate`` on the same ``c`` prompts in one call, the
  engine's own offline batch API (the baseline the actor should match);
- transformers: ``model.generate`` one request after another (what a node
  without vLLM would do); its tokens/s does not depend on ``c``.

Paths run one after the other, each with the machine to itself. Figures are
generated tokens per second of wall time, best of ``--repeats``; ratios are
actor/vLLM (goal: within 5 %) and actor/transformers. Run from the repository
root (it prepares the model into .joynode/models/smollm2 if missing)::

    .venv/bin/python -m bench.inference
    .venv/bin/python -m bench.inference --quick     # concurrency 1 and 8, one repeat
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import trio
from prometheus_client import CollectorRegistry

from joynode.config import InferenceSection, ModelEntry
from joynode.inference.engine import configure_environment
from joynode.inference.models import prepare
from joynode.inference.service import InferenceClient, InferenceService
from joynode.messages import InferenceRequest, SamplingSpec

MODEL_DIR = Path(".joynode/models/smollm2")
NEW_TOKENS = 64
PROMPTS = (
    "The capital of France is",
    "Write a short poem about the sea.",
    "Explain what a hash function is.",
    "List three uses of copper.",
    "Once upon a time, in a small village,",
    "The best way to learn programming is",
    "Describe the water cycle in simple words.",
    "Why is the sky blue?",
)


def prompts(count: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] + f" ({i})" for i in range(count)]


def best_rate(repeats: int, run: Callable[[], int]) -> float:
    """Best tokens/s over ``repeats`` runs of ``run`` (which returns tokens generated)."""
    rates = []
    for _ in range(repeats):
        began = time.perf_counter()
        tokens = run()
        rates.append(tokens / (time.perf_counter() - began))
    return max(rates)


def settings(max_num_seqs: int) -> InferenceSection:
    return InferenceSection(
        models=[ModelEntry(name="smollm2", path=MODEL_DIR.resolve())],
        max_num_seqs=max_num_seqs,
        max_model_len=512,
    )


def bench_actor(levels: Sequence[int], repeats: int) -> dict[int, float]:
    sampling = SamplingSpec(max_tokens=NEW_TOKENS, ignore_eos=True)

    async def main() -> dict[int, float]:
        send, receive = trio.open_memory_channel[InferenceRequest](64)
        service = InferenceService(settings(max(levels)), CollectorRegistry(), receive)
        client = InferenceClient(send)
        rates: dict[int, float] = {}
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)

            async def batch(count: int) -> int:
                produced = 0

                async def one(prompt: str) -> None:
                    nonlocal produced
                    result = await client.complete("smollm2", prompt, sampling=sampling)
                    produced += len(result.token_ids)

                async with trio.open_nursery() as requests:
                    for prompt in prompts(count):
                        requests.start_soon(one, prompt)
                return produced

            await batch(2)  # warm-up
            for level in levels:
                best = 0.0
                for _ in range(repeats):
                    began = trio.current_time()
                    tokens = await batch(level)
                    best = max(best, tokens / (trio.current_time() - began))
                rates[level] = best
            nursery.cancel_scope.cancel()
        return rates

    return trio.run(main)


def bench_vllm(levels: Sequence[int], repeats: int) -> dict[int, float]:
    configure_environment(1.0)
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(MODEL_DIR.resolve()),
        dtype="float32",
        max_num_seqs=max(levels),
        max_model_len=512,
        enforce_eager=True,
        seed=0,
        disable_log_stats=True,
    )
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    tokenizer = llm.get_tokenizer()

    def run(count: int) -> int:
        inputs: list[Any] = [{"prompt_token_ids": tokenizer.encode(p)} for p in prompts(count)]
        outputs = llm.generate(inputs, params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outputs)

    run(2)  # warm-up
    return {level: best_rate(repeats, partial(run, level)) for level in levels}


def bench_transformers(repeats: int, requests: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()

    def run() -> int:
        produced = 0
        for prompt in prompts(requests):
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                out = model.generate(
                    ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
                )
            produced += out.shape[1] - ids.shape[1]
        return produced

    return best_rate(repeats, run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="concurrency 1 and 8, one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    levels = [1, 8] if args.quick else [1, 8, 32]
    repeats = 1 if args.quick else args.repeats
    logging.basicConfig(level=logging.WARNING)
    if not (MODEL_DIR / "config.json").is_file():
        prepare("smollm2", MODEL_DIR)

    print(
        f"model {MODEL_DIR}, fp32, greedy, {NEW_TOKENS} new tokens per request, best of {repeats}"
    )
    actor = bench_actor(levels, repeats)
    vllm = bench_vllm(levels, repeats)
    hf = bench_transformers(repeats, requests=2 if args.quick else 4)

    print()
    print(
        f"{'concurrent':>10} {'actor tok/s':>12} {'vLLM tok/s':>11} {'actor/vLLM':>11} "
        f"{'HF tok/s':>9} {'actor/HF':>9}"
    )
    for level in levels:
        print(
            f"{level:>10} {actor[level]:>12.1f} {vllm[level]:>11.1f} "
            f"{actor[level] / vllm[level]:>11.3f} {hf:>9.1f} {actor[level] / hf:>9.1f}"
        )


if __name__ == "__main__":
    main()
