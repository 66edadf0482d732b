"""Prepaid jobs: signed requests settled in batches, against unpaid and paid jobs, one run.

The cluster is bench/settlement.py's: k = 3 real nodes in this one trio process on
127.0.0.1, sharing one vLLM engine (the tiny test model), staked and registered on
one local anvil (automine), the model priced at 100 JOY with committees of 3. A
client that is no node (dev account 5) deposits once into ``PrepaidInference``.
The nodes' settlers never flush on their own here (``prepaid.batch_size`` 256,
``max_age_s`` and ``takeover_s`` 3600): each batch is sent by node 0, a member of
every committee, with ``PrepaidService.settle_now(take_over=True)``, as
``prepaid.settle {"take_over": true}`` does (the requests' first-ranked
members are spread over the three nodes).

Measured, sequentially, greedy, ``--max-tokens`` new tokens, EOS ignored:

- unpaid: node 0's ``submit`` until certified there (the latency baseline);
- paid: node 0's ``submit`` with ``paid=True`` (approve, requestInference and
  drawCommittee inside it) until certified; its gas: those three transactions
  and the member's ``submitCertificate``;
- prepaid, at batch sizes 1, 16 and 64: the client gets a quote
  (``quote_prepaid``, timed apart), signs it with eth-account, and node 0's
  ``submit`` runs it until certified; then the batch is settled: the
  ``settleBatch`` transaction's time and gas, divided by the batch size.

Run from the repository root::

    .venv/bin/python -m bench.prepaid            # 10 unpaid, 10 paid; batches 1, 16, 64
    .venv/bin/python -m bench.prepaid --quick    # 3 and 3; batches 1 and 16
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import trio
from eth_account.signers.local import LocalAccount

from bench.consensus import MODEL, MODEL_DIR, p50
from bench.settlement import (
    FIRST_NODE_ACCOUNT,
    POLL_INTERVAL_S,
    TAKEOVER_S,
    Cluster,
    Jobs,
    Settings,
    anvil_chain,
    chain_snapshot,
    paid_cluster,
)
from joynode.chain.anvil import dev_account
from joynode.chain.deploy import JOY
from joynode.inference.engine import EngineSpec, VllmEngine
from joynode.inference.models import prepare
from joynode.node import Node
from tests.chain_fixtures import Chain
from tests.test_consensus_chain import PRICE
from tests.test_prepaid_nodes import deposit, signed_job

K = 3
JOB_TIMEOUT_S = 30.0
WARMUP = 2
MAX_NUM_SEQS, MAX_MODEL_LEN = 16, 256


@dataclass
class BatchResult:
    size: int
    quote_ms: list[float]
    certified_ms: list[float]  # submit of the signed request -> certified at node 0
    settle_ms: float  # the settleBatch transaction, sent -> receipt
    gas: int  # its gasUsed


@dataclass
class Result:
    unpaid_ms: list[float]
    paid_ms: list[float]
    paid_gas: list[int]  # per job: every transaction of it
    batches: list[BatchResult]


async def prepaid_job(
    node: Node, client: LocalAccount, prompt: str, max_tokens: int
) -> tuple[float, float]:
    """(quote ms, submit -> certified ms) of one prepaid job of ``client`` through node 0."""
    began = time.perf_counter()
    params = await signed_job(node, client, model=MODEL, prompt=prompt, max_tokens=max_tokens)
    quoted = time.perf_counter()
    job = await node.consensus.submit(params)
    with trio.fail_after(JOB_TIMEOUT_S):
        await job.done.wait()
    if job.status != "certified":
        raise RuntimeError(f"prepaid job {job.request_id.hex()[:12]} {job.status}: {job.reason}")
    return 1000 * (quoted - began), 1000 * (time.perf_counter() - quoted)


async def settle(cluster: Cluster, size: int) -> tuple[float, int]:
    """Settle the batch at node 0, a member of every committee: (ms, gas). Its requests'
    first-ranked members are spread over the three nodes, so node 0 takes over the others'."""
    first = len(cluster.calls)
    assert cluster.nodes[0].prepaid is not None
    sent = await cluster.nodes[0].prepaid.settle_now(take_over=True)
    batches = [c for c in cluster.calls[first:] if c.name == "settleBatch" and c.ok]
    if sent != size or len(batches) != 1:
        raise RuntimeError(f"{sent} requests in {len(batches)} batches, wanted {size} in one")
    stats = [n.prepaid.statistics() for n in cluster.nodes if n.prepaid is not None]
    if sum(s.requests_refused for s in stats):
        raise RuntimeError(f"refused in settlement: {stats}")
    return batches[0].ms, batches[0].gas


async def bench(settings: Settings, sizes: list[int]) -> Result:
    client = dev_account(FIRST_NODE_ACCOUNT + K)  # funded by anvil_chain, no node's
    with anvil_chain(K + 1) as chain, chain_snapshot(chain):
        engine = VllmEngine(
            EngineSpec(settings.model_path, "float32", "auto", MAX_NUM_SEQS, MAX_MODEL_LEN, 1.0)
        )
        await engine.start()
        try:
            return await _run(engine, chain, client, settings, sizes)
        finally:
            await engine.stop()


async def _run(
    engine: VllmEngine, chain: Chain, client: LocalAccount, settings: Settings, sizes: list[int]
) -> Result:
    jobs_needed = sum(sizes) + 2 * WARMUP + 4
    await trio.to_thread.run_sync(deposit, chain, client, jobs_needed * PRICE)
    never = [
        ("prepaid", "batch_size", "256"),
        ("prepaid", "max_age_s", "3600"),
        ("prepaid", "takeover_s", "3600"),
        ("prepaid", "request_ttl_s", "10000"),
    ]
    with tempfile.TemporaryDirectory(prefix="joynode-bench-prepaid-") as tmp:
        async with paid_cluster(Path(tmp), settings, engine, chain, K, never) as cluster:
            jobs = Jobs(cluster, settings.max_tokens)
            node = cluster.nodes[0]
            for _ in range(WARMUP):
                await jobs.unpaid()
                await jobs.paid()
                await prepaid_job(node, client, jobs.unpaid_requests.prompt, settings.max_tokens)
            await settle(cluster, WARMUP)
            unpaid, paid, paid_gas = [], [], []
            for i in range(settings.jobs):
                jobs.next_prompt()
                kinds = (jobs.unpaid, jobs.paid) if i % 2 == 0 else (jobs.paid, jobs.unpaid)
                for kind in kinds:
                    trace = await kind()
                    if kind == jobs.unpaid:
                        unpaid.append(trace.job.done_ms)  # type: ignore[union-attr]
                    else:
                        paid.append(trace.certified_ms)  # type: ignore[union-attr]
                        paid_gas.append(sum(trace.gas.values()))  # type: ignore[union-attr]
            batches = []
            for size in sizes:
                quote, certified = [], []
                for _ in range(size):
                    jobs.next_prompt()
                    prompt = jobs.unpaid_requests.prompt
                    q, c = await prepaid_job(node, client, prompt, settings.max_tokens)
                    quote.append(q)
                    certified.append(c)
                ms, gas = await settle(cluster, size)
                batches.append(BatchResult(size, quote, certified, ms, gas))
                print(
                    f"batch {size}: certified p50 {p50(certified):.1f} ms; settleBatch "
                    f"{ms:.0f} ms, {gas // size:,} gas per job",
                    flush=True,
                )
            # Let the members' takeover timers see the batches settled before the cluster stops.
            await trio.sleep(TAKEOVER_S)
    return Result(unpaid, paid, paid_gas, batches)


def report(result: Result) -> None:
    unpaid = p50(result.unpaid_ms)
    paid = p50(result.paid_ms)
    paid_gas = p50([float(g) for g in result.paid_gas])
    print()
    print(f"{'':<22}{'certified p50 ms':>18}{'vs unpaid':>11}{'gas per job':>13}{'vs paid':>9}")
    print(f"{'unpaid':<22}{unpaid:>18.1f}{1.0:>10.2f}x{'0':>13}{'':>9}")
    print(
        f"{'paid (escrow)':<22}{paid:>18.1f}{paid / unpaid:>10.2f}x{paid_gas:>13,.0f}{1.0:>8.2f}x"
    )
    for b in result.batches:
        certified = p50(b.certified_ms)
        per_job = b.gas / b.size
        print(
            f"{f'prepaid, batch {b.size}':<22}{certified:>18.1f}{certified / unpaid:>10.2f}x"
            f"{per_job:>13,.0f}{per_job / paid_gas:>8.3f}x"
        )
    quotes = [q for b in result.batches for q in b.quote_ms]
    settle = ", ".join(f"batch {b.size}: {b.settle_ms:.0f} ms" for b in result.batches)
    print(f"\nquote (committee drawn, typed data signed) p50 {p50(quotes):.1f} ms")
    print(f"settleBatch transaction, sent to receipt: {settle}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 of each; batches 1 and 16")
    parser.add_argument("--jobs", type=int, help="unpaid and paid jobs each (10)")
    parser.add_argument("--sizes", type=int, nargs="+", help="prepaid batch sizes (1 16 64)")
    parser.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args()
    settings = Settings(
        sizes=[K],
        jobs=args.jobs if args.jobs is not None else 3 if args.quick else 10,
        max_tokens=args.max_tokens,
        takeover_s=TAKEOVER_S,
        poll_interval_s=POLL_INTERVAL_S,
        model_path=MODEL_DIR.resolve(),
    )
    sizes = args.sizes or ([1, 16] if args.quick else [1, 16, 64])
    logging.basicConfig(level=logging.WARNING)
    if not (MODEL_DIR / "config.json").is_file():
        prepare("tiny", MODEL_DIR)
    print(
        f"model {MODEL}, fp32, greedy, {settings.max_tokens} new tokens, k = {K}, one shared "
        f"vLLM engine; anvil (automine), price {PRICE // JOY} JOY; {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.2f}"
    )
    began = time.perf_counter()
    result = trio.run(bench, settings, sizes)
    report(result)
    print(f"took {time.perf_counter() - began:.0f} s, load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
