"""Verified inference: latency and throughput of consensus jobs against local inference.

For each committee size k (1, 3, 5), k real nodes run in this one trio process on
127.0.0.1 (homes from ``tests.factories``, its ``fast_p2p`` intervals, star
bootstrap from node 0), all serving the tiny test model through ONE shared vLLM
engine, as tests/test_consensus.py does. Node 0 submits every job with
``committee_size = k``, so all k nodes (node 0 too) are members. A job's latency
runs from ``ConsensusService.submit`` to its ``done`` event on node 0 (certified
by a strict majority, status checked). Every request is greedy, ``--max-tokens``
new tokens with EOS ignored, with a distinct nonce; the commit and reveal
timeouts are short (10 s and 5 s) and never reached.

Baselines, measured on the same cluster in the same process, interleaved with
the jobs (one local, one "local x k", one job, and again):

- local: the same request served by node 0's ``InferenceClient.complete`` on the
  same engine, no consensus;
- local x k: k copies of that request at once, wall time until the last one
  finishes. The k members' inferences run on the one shared engine, which
  batches them, so this is the "slowest member's inference" of a job here.

Throughput: ``--concurrency`` jobs in flight until ``--jobs`` are certified,
against the same number of local requests in flight (the same requests served
without consensus), and against ``concurrency x k`` local requests in flight
(the same inference work: each job runs k inferences), reported per k
requests.

Where the time goes, per sequential job, at node 0: submit (until ``submit``
returns: the job row written, the offer published), the offer's gossip to the
last member (members' ``Job.created_at`` against node 0's, one clock), all k
commits counted at node 0, and from there to certified (reveals). Each node's
``joynode_consensus_phase_seconds`` histograms (inference, commit_wait) are
read before and after, averaged over all members. "CPU" is the CPU time of the
trio thread that runs every node (``time.thread_time``), per job, per "local x k"
round, and as a share of wall time while the cluster idles (heartbeats,
discovery); the vLLM engine core is another process, not counted.

The protocol alone: then every member's inference client is replaced by a stub
that returns the same output at once, and ``--requests`` more jobs run: what is
left is gossip, votes, signatures and SQLite. Jobs here are unpaid (chain
off); paid jobs settled on-chain are measured by ``bench.settlement``.

All nodes and the engine share this machine's cores (vLLM's CPU threads against
the one trio thread that runs every node). Run from the repository root (it
prepares the tiny model into .joynode/models/tiny if missing)::

    .venv/bin/python -m bench.consensus            # full run
    .venv/bin/python -m bench.consensus --quick    # smoke run: k = 1 and 3, fewer requests
    .venv/bin/python -m bench.consensus --heartbeat-interval 3   # nodes' default heartbeat
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import logging
import math
import os
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

from joynode.consensus.control import SubmitParams
from joynode.consensus.job import Job
from joynode.inference.engine import EngineSpec, VllmEngine
from joynode.inference.models import prepare
from joynode.messages import ChatMessage, InferenceResult, SamplingSpec
from joynode.node import Node
from tests.factories import NodeHome, fast_p2p, make_home, running_node, sees_all_serving, wait_for

MODEL_DIR = Path(".joynode/models/tiny")
MODEL = "tiny"
MAX_MODEL_LEN = 256
MAX_NUM_SEQS = 64  # the shared engine batches up to concurrency x k sequences
COMMIT_TIMEOUT_S = 10.0
REVEAL_TIMEOUT_S = 5.0
READY_TIMEOUT_S = 30.0
JOB_TIMEOUT_S = 30.0
WARMUP = 3
PROMPTS = (
    "The capital of France is",
    "Hello world, this is",
    "Once upon a time there was",
    "Python is a programming language",
    "The quick brown fox",
    "Numbers: 0 1 2 3",
    "Trio and asyncio are",
    "vLLM is a high-throughput",
)
PHASES = ("inference", "commit_wait")
IDLE_S = 3.0
FAST_HEARTBEAT_S = 0.5  # tests.factories.fast_p2p


# ---- measuring


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """Linear-interpolated percentile of already sorted values (NaN if empty)."""
    if not ordered:
        return math.nan
    rank = fraction * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def p50(values: Sequence[float]) -> float:
    return percentile(sorted(values), 0.50)


def p99(values: Sequence[float]) -> float:
    return percentile(sorted(values), 0.99)


def mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else math.nan


@dataclass
class JobTrace:
    """One job as node 0 saw it, in ms from just before ``submit``."""

    submitted_ms: float = math.nan  # submit() returned: job row written, offer published
    offer_spread_ms: float = math.nan  # last member's Job.created_at minus node 0's
    commits_ms: float = math.nan  # all k commits counted at node 0
    done_ms: float = math.nan  # certified at node 0
    cpu_ms: float = math.nan  # CPU time of the trio thread (every node) during the job


@dataclass
class PhaseSums:
    """Sum and count of each node's phase histograms, over all nodes."""

    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)

    @classmethod
    def read(cls, nodes: Sequence[Node]) -> PhaseSums:
        out = cls()
        for phase in PHASES:
            labels = {"phase": phase}
            out.sums[phase] = sum(
                n.registry.get_sample_value("joynode_consensus_phase_seconds_sum", labels) or 0.0
                for n in nodes
            )
            out.counts[phase] = sum(
                n.registry.get_sample_value("joynode_consensus_phase_seconds_count", labels) or 0.0
                for n in nodes
            )
        return out

    def mean_ms_since(self, before: PhaseSums, phase: str) -> float:
        count = self.counts[phase] - before.counts[phase]
        return 1000 * (self.sums[phase] - before.sums[phase]) / count if count else math.nan


@dataclass
class SizeResult:
    k: int
    local_ms: list[float]
    local_k_ms: list[float]
    consensus_ms: list[float]
    traces: list[JobTrace]
    phase_ms: dict[str, float]
    concurrency: int
    consensus_rate: float  # jobs/s
    consensus_loaded_ms: list[float]  # each job's latency during the throughput run
    local_rate: float  # requests/s, `concurrency` in flight
    local_work_rate: float  # requests/s, `concurrency x k` in flight
    loaded_phase_ms: dict[str, float]
    idle_busy: float  # share of the trio thread the idle cluster uses (heartbeats, discovery)
    local_k_cpu_ms: list[float]  # trio thread CPU per "local x k" round
    instant_ms: list[float]  # job latency with instant inference: the protocol alone
    instant_cpu_ms: list[float]


@dataclass(frozen=True)
class Settings:
    sizes: list[int]
    requests: int
    concurrency: int
    jobs: int
    max_tokens: int
    model_path: Path
    heartbeat_interval_s: float | None  # None: fast_p2p's


# ---- the cluster


def node_home(path: Path, settings: Settings, bootstrap: list[str] | None) -> NodeHome:
    with contextlib.redirect_stdout(io.StringIO()):  # `joynode init`'s report
        home = fast_p2p(make_home(path), bootstrap=bootstrap)
    if settings.heartbeat_interval_s is not None:
        interval = settings.heartbeat_interval_s
        home.set("p2p", "heartbeat_interval_s", str(interval))
        home.set("p2p", "peer_timeout_s", str(max(3.0, 5 * interval)))
    home.set("inference", "models", f'[{{name = "{MODEL}", path = "{settings.model_path}"}}]')
    home.set("inference", "max_model_len", str(MAX_MODEL_LEN))
    home.set("inference", "max_num_seqs", str(MAX_NUM_SEQS))
    home.set("consensus", "commit_timeout_s", str(COMMIT_TIMEOUT_S))
    home.set("consensus", "reveal_timeout_s", str(REVEAL_TIMEOUT_S))
    return home


@asynccontextmanager
async def cluster(
    root: Path, settings: Settings, engine: VllmEngine, count: int
) -> AsyncIterator[list[Node]]:
    async with AsyncExitStack() as stack:
        nodes: list[Node] = []
        for i in range(count):
            bootstrap = nodes[0].p2p.listen_addrs() if nodes else None
            home = node_home(root / f"n{i}", settings, bootstrap)
            nodes.append(await stack.enter_async_context(running_node(home, {MODEL: engine})))
        for node in nodes:
            await wait_for(
                partial(sees_all_serving, node, nodes, MODEL),
                READY_TIMEOUT_S,
                "all peers up, serving",
            )
        yield nodes


# ---- one request of each kind


class Requests:
    def __init__(self, nodes: Sequence[Node], max_tokens: int) -> None:
        self.nodes = nodes
        self.node = nodes[0]
        self.k = len(nodes)
        self.max_tokens = max_tokens
        self.sampling = SamplingSpec(max_tokens=max_tokens, ignore_eos=True)
        self._nonces = itertools.count(1)
        self._prompts = itertools.cycle(PROMPTS)
        self.prompt = next(self._prompts)

    def next_prompt(self) -> str:
        self.prompt = next(self._prompts)
        return self.prompt

    async def local(self) -> float:
        """One request through node 0's inference client; its latency in ms."""
        began = time.perf_counter()
        result = await self.node.inference_client.complete(MODEL, self.prompt, None, self.sampling)
        elapsed = 1000 * (time.perf_counter() - began)
        assert len(result.token_ids) == self.max_tokens, result
        return elapsed

    async def local_k(self, cpu_ms: list[float] | None = None) -> float:
        """k copies at once; ms until the last one finishes."""
        began, cpu = time.perf_counter(), time.thread_time()
        async with trio.open_nursery() as nursery:
            for _ in range(self.k):
                nursery.start_soon(self.local)
        if cpu_ms is not None:
            cpu_ms.append(1000 * (time.thread_time() - cpu))
        return 1000 * (time.perf_counter() - began)

    async def job(self, trace: JobTrace | None = None) -> float:
        """One consensus job from node 0, until certified there; its latency in ms."""
        params = SubmitParams(
            model=MODEL,
            prompt=self.prompt,
            max_tokens=self.max_tokens,
            ignore_eos=True,
            committee_size=self.k,
            nonce=next(self._nonces),
        )
        began, cpu = time.perf_counter(), time.thread_time()
        job = await self.node.consensus.submit(params)
        submitted = time.perf_counter()
        async with trio.open_nursery() as nursery:
            if trace is not None:
                nursery.start_soon(watch_commits, job, began, trace)
            with trio.fail_after(JOB_TIMEOUT_S):
                await job.done.wait()
            done, cpu = time.perf_counter(), time.thread_time() - cpu
            nursery.cancel_scope.cancel()
        if job.status != "certified":
            raise RuntimeError(f"job {job.request_id.hex()[:12]} {job.status}: {job.reason}")
        if len(job.tally.committee) != self.k:
            raise RuntimeError(f"committee of {len(job.tally.committee)}, wanted {self.k}")
        if trace is not None:
            trace.submitted_ms = 1000 * (submitted - began)
            trace.done_ms = 1000 * (done - began)
            trace.cpu_ms = 1000 * cpu
            trace.offer_spread_ms = 1000 * max(
                (
                    n.consensus.jobs[job.request_id].created_at - job.created_at
                    for n in self.nodes[1:]
                    if job.request_id in n.consensus.jobs
                ),
                default=0.0,
            )
        return 1000 * (done - began)


async def watch_commits(job: Job, began: float, trace: JobTrace) -> None:
    while True:
        changed = job.changed
        if len(job.tally.commits) == len(job.tally.committee) and math.isnan(trace.commits_ms):
            trace.commits_ms = 1000 * (time.perf_counter() - began)
            return
        await changed.wait()


class InstantInference:
    """Stands in for a member's inference client: the same output at once, no engine work."""

    def __init__(self, max_tokens: int) -> None:
        self._tokens = tuple(range(3, 3 + max_tokens))

    async def complete(
        self,
        model: str,
        prompt: str | None = None,
        messages: Sequence[ChatMessage] | None = None,
        sampling: SamplingSpec | None = None,
    ) -> InferenceResult:
        await trio.lowlevel.checkpoint()
        return InferenceResult(MODEL, "", self._tokens, "x" * len(self._tokens), "length", 1, 0, 0)


async def idle_busy(seconds: float) -> float:
    """Share of the trio thread's time spent running while the bench itself sleeps."""
    began, cpu = time.perf_counter(), time.thread_time()
    await trio.sleep(seconds)
    return (time.thread_time() - cpu) / (time.perf_counter() - began)


async def in_flight(count: int, total: int, one: Callable[[], Awaitable[float]]) -> list[float]:
    """Run ``total`` requests, ``count`` at a time; their latencies."""
    limiter = trio.CapacityLimiter(count)
    latencies: list[float] = []

    async def run() -> None:
        async with limiter:
            latencies.append(await one())

    async with trio.open_nursery() as nursery:
        for _ in range(total):
            nursery.start_soon(run)
    return latencies


async def rate(count: int, total: int, one: Callable[[], Awaitable[float]]) -> float:
    """Completed requests per second with ``count`` in flight."""
    began = time.perf_counter()
    await in_flight(count, total, one)
    return total / (time.perf_counter() - began)


# ---- one committee size


async def bench_size(engine: VllmEngine, k: int, settings: Settings) -> SizeResult:
    with tempfile.TemporaryDirectory(prefix=f"joynode-bench-consensus-{k}-") as tmp:
        async with cluster(Path(tmp), settings, engine, k) as nodes:
            requests = Requests(nodes, settings.max_tokens)
            for _ in range(WARMUP):  # gossip meshes, the engine's batch shapes
                await requests.local()
                await requests.local_k()
                await requests.job()

            idle = await idle_busy(IDLE_S)

            local, local_k, consensus, traces = [], [], [], []
            local_k_cpu: list[float] = []
            before = PhaseSums.read(nodes)
            for _ in range(settings.requests):
                requests.next_prompt()
                local.append(await requests.local())
                local_k.append(await requests.local_k(local_k_cpu))
                trace = JobTrace()
                consensus.append(await requests.job(trace))
                traces.append(trace)
            after = PhaseSums.read(nodes)
            phase_ms = {p: after.mean_ms_since(before, p) for p in PHASES}

            # The protocol alone: members "infer" instantly (gossip, votes, SQLite, signatures).
            honest = [node.consensus._inference for node in nodes]
            instant_inference = InstantInference(settings.max_tokens)
            for node in nodes:
                node.consensus._inference = instant_inference  # type: ignore[assignment]
            instant, instant_cpu = [], []
            await requests.job()
            for _ in range(settings.requests):
                trace = JobTrace()
                instant.append(await requests.job(trace))
                instant_cpu.append(trace.cpu_ms)
            for node, client in zip(nodes, honest, strict=True):
                node.consensus._inference = client

            c, total = settings.concurrency, settings.jobs
            local_rate = await rate(c, total, requests.local)
            local_work_rate = await rate(c * k, total * k, requests.local)
            before = PhaseSums.read(nodes)
            began = time.perf_counter()
            loaded = await in_flight(c, total, requests.job)
            consensus_rate = total / (time.perf_counter() - began)
            after = PhaseSums.read(nodes)
            loaded_phase_ms = {p: after.mean_ms_since(before, p) for p in PHASES}

            print(
                f"k={k}: consensus p50 {p50(consensus):.1f} ms, local {p50(local):.1f} ms, "
                f"local x{k} {p50(local_k):.1f} ms, instant inference {p50(instant):.1f} ms; "
                f"{consensus_rate:.1f} jobs/s",
                flush=True,
            )
            return SizeResult(
                k,
                local,
                local_k,
                consensus,
                traces,
                phase_ms,
                c,
                consensus_rate,
                loaded,
                local_rate,
                local_work_rate,
                loaded_phase_ms,
                idle,
                local_k_cpu,
                instant,
                instant_cpu,
            )


async def bench(settings: Settings) -> list[SizeResult]:
    engine = VllmEngine(
        EngineSpec(settings.model_path, "float32", "auto", MAX_NUM_SEQS, MAX_MODEL_LEN, 1.0)
    )
    await engine.start()
    try:
        return [await bench_size(engine, k, settings) for k in settings.sizes]
    finally:
        await engine.stop()


# ---- report


def report(results: Sequence[SizeResult], settings: Settings) -> None:
    print()
    print(
        f"sequential: {settings.requests} of each per k, latency in ms; overhead = consensus "
        "p50 - baseline p50"
    )
    print(
        f"{'k':>2} {'local p50':>9} {'p99':>7} {'local xk p50':>12} {'p99':>7} "
        f"{'consensus p50':>13} {'p99':>7} {'vs local':>9} {'ratio':>6} "
        f"{'vs local xk':>11} {'ratio':>6}"
    )
    for r in results:
        c50, l50, lk50 = p50(r.consensus_ms), p50(r.local_ms), p50(r.local_k_ms)
        print(
            f"{r.k:>2} {l50:>9.1f} {p99(r.local_ms):>7.1f} {lk50:>12.1f} "
            f"{p99(r.local_k_ms):>7.1f} {c50:>13.1f} {p99(r.consensus_ms):>7.1f} "
            f"{c50 - l50:>+9.1f} {c50 / l50:>5.2f}x {c50 - lk50:>+11.1f} {c50 / lk50:>5.2f}x"
        )

    print()
    print(
        "where a sequential job's time goes, ms from submit at node 0 (p50 over jobs; member "
        "phases: means over all members); CPU: the trio thread that runs every node, per job"
    )
    print(
        f"{'k':>2} {'submit':>7} {'offer->last':>11} {'all commits':>11} "
        f"{'commits->cert':>13} {'total':>7} {'inference':>10} {'commit_wait':>11} "
        f"{'CPU/job':>8} {'CPU/local xk':>12} {'idle CPU':>8}"
    )
    for r in results:
        t = r.traces
        print(
            f"{r.k:>2} {p50([x.submitted_ms for x in t]):>7.1f} "
            f"{p50([x.offer_spread_ms for x in t]):>11.1f} "
            f"{p50([x.commits_ms for x in t]):>11.1f} "
            f"{p50([x.done_ms - x.commits_ms for x in t]):>13.1f} "
            f"{p50([x.done_ms for x in t]):>7.1f} "
            f"{r.phase_ms['inference']:>10.1f} {r.phase_ms['commit_wait']:>11.1f} "
            f"{p50([x.cpu_ms for x in t]):>8.1f} {p50(r.local_k_cpu_ms):>12.1f} "
            f"{100 * r.idle_busy:>7.1f}%"
        )

    print()
    print(
        "the protocol alone: members' inference replaced by an instant stub (same output), "
        f"{settings.requests} sequential jobs"
    )
    print(f"{'k':>2} {'p50 ms':>7} {'p99 ms':>7} {'CPU/job ms':>10}")
    for r in results:
        print(
            f"{r.k:>2} {p50(r.instant_ms):>7.1f} {p99(r.instant_ms):>7.1f} "
            f"{p50(r.instant_cpu_ms):>10.1f}"
        )

    print()
    print(
        f"throughput: {settings.jobs} jobs, {settings.concurrency} in flight; local: the same "
        f"requests without consensus; local work: {settings.concurrency} x k in flight, "
        "per k requests"
    )
    print(
        f"{'k':>2} {'jobs/s':>7} {'local req/s':>11} {'ratio':>6} {'local work /s':>13} "
        f"{'ratio':>6} {'job p50':>8} {'job p99':>8} {'inference':>10} {'commit_wait':>11}"
    )
    for r in results:
        work = r.local_work_rate / r.k
        print(
            f"{r.k:>2} {r.consensus_rate:>7.2f} {r.local_rate:>11.2f} "
            f"{r.consensus_rate / r.local_rate:>5.2f}x {work:>13.2f} "
            f"{r.consensus_rate / work:>5.2f}x {p50(r.consensus_loaded_ms):>8.1f} "
            f"{p99(r.consensus_loaded_ms):>8.1f} {r.loaded_phase_ms['inference']:>10.1f} "
            f"{r.loaded_phase_ms['commit_wait']:>11.1f}"
        )
    print()
    print("including on-chain settlement: see bench.settlement (these jobs are unpaid)")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="defaults: k = 1 and 3, 8 requests, 4 in flight"
    )
    parser.add_argument("--sizes", type=int, nargs="+", help="committee sizes (1 3 5)")
    parser.add_argument("--requests", type=int, help="sequential requests per k (50)")
    parser.add_argument("--concurrency", type=int, help="jobs in flight (8)")
    parser.add_argument("--jobs", type=int, help="jobs per throughput run (48)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument(
        "--heartbeat-interval",
        type=float,
        help="p2p.heartbeat_interval_s (default: tests.factories.fast_p2p's 0.5 s)",
    )
    args = parser.parse_args()

    def given(value: int | None, quick: int, full: int) -> int:
        return value if value is not None else quick if args.quick else full

    settings = Settings(
        sizes=args.sizes or ([1, 3] if args.quick else [1, 3, 5]),
        requests=given(args.requests, 8, 50),
        concurrency=given(args.concurrency, 4, 8),
        jobs=given(args.jobs, 8, 48),
        max_tokens=args.max_tokens,
        model_path=MODEL_DIR.resolve(),
        heartbeat_interval_s=args.heartbeat_interval,
    )
    logging.basicConfig(level=logging.WARNING)
    if not (MODEL_DIR / "config.json").is_file():
        prepare("tiny", MODEL_DIR)
    load = os.getloadavg()
    print(
        f"model {MODEL} ({MODEL_DIR}), fp32, greedy, {settings.max_tokens} new tokens, one "
        f"shared vLLM engine; {os.cpu_count()} CPUs, load {load[0]:.2f}; heartbeat every "
        f"{settings.heartbeat_interval_s or FAST_HEARTBEAT_S} s"
    )
    began = time.perf_counter()
    results = trio.run(bench, settings)
    report(results, settings)
    print(f"took {time.perf_counter() - began:.0f} s, load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
