"""Verified inference at network scale: prefill against replicate, and messages per job.

Three measurements, each against a baseline run in the same process:

1. ``compute`` (SmolLM2-135M, float32, greedy, ``--max-tokens`` new tokens with
   EOS ignored): k nodes in this trio process, each on its OWN vLLM engine, so
   each member's inference is its own engine-core process, whose CPU seconds
   (``/proc/PID/stat`` utime + stime) are read before and after each job. For
   each job: the executor's CPU seconds (``prefill``: the first-ranked member;
   ``replicate``: every member generates, the mean of them) and the other
   members' sum: "verification compute" is their ratio. Time to certificate at
   node 0 against the same request served by node 0 alone (``local``), one
   after the other. Jobs are unpaid: decided as soon as a strict majority
   agrees (a verifier still checking then stops).
2. ``processes`` (tiny model): k ``joynode run`` processes on 127.0.0.1, one
   engine each; jobs submitted through node A's control socket (``infer.submit``
   then ``job.wait``) against ``infer.local`` through the same socket: the
   consensus overhead with one node per process, per mode.
3. ``messages`` (tiny model, one shared engine): N nodes in this process,
   committees of k = 3 under ``prefill``; per job, the consensus messages sent
   by every node (``joynode_consensus_messages_sent``: one per direct recipient,
   one per gossip publish) and what every node received (direct requests served
   plus job gossip delivered). Growing with k and not with N is the point.

Run from the repository root (it prepares the models under .joynode/models)::

    .venv/bin/python -m bench.verification                 # all three
    .venv/bin/python -m bench.verification --quick         # fewer jobs, k = 3 only
    .venv/bin/python -m bench.verification --only messages
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import logging
import os
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

from bench.consensus import percentile
from joynode.consensus.control import SubmitParams
from joynode.control.client import ControlClient
from joynode.inference.engine import EngineSpec, VllmEngine
from joynode.inference.models import prepare
from joynode.messages import SamplingSpec
from joynode.node import Node
from tests.factories import (
    NodeHome,
    NodeProcess,
    fast_p2p,
    make_home,
    running_node,
    sees_all_serving,
    wait_for,
)

MODELS = Path(".joynode/models")
MODEL = "model"
PROMPTS = (
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "Explain photosynthesis in one sentence.",
    "List three prime numbers:",
    "Once upon a time,",
    "The history of Rome began",
    "Why is the sky blue?",
)
MODES = ("replicate", "prefill")
TICKS = os.sysconf("SC_CLK_TCK")


def p50(values: Sequence[float]) -> float:
    return percentile(sorted(values), 0.5)


def p95(values: Sequence[float]) -> float:
    return percentile(sorted(values), 0.95)


# ---- nodes


def home_for(
    path: Path, model: Path, mode: str, bootstrap: list[str] | None, max_model_len: int
) -> NodeHome:
    with contextlib.redirect_stdout(io.StringIO()):  # `joynode init`'s report
        home = fast_p2p(make_home(path), bootstrap=bootstrap)
    # Heartbeats every 2 s, not the tests' 0.5 s: sixteen nodes on one trio thread and two
    # cores otherwise lag into bursts that their peers' gossip rate limits refuse.
    home.set("p2p", "heartbeat_interval_s", "2.0")
    home.set("p2p", "peer_timeout_s", "8.0")
    entry = f'name = "{MODEL}", path = "{model}", verification = "{mode}", margin_nats = 0.5'
    home.set("inference", "models", f"[{{{entry}}}]")
    home.set("inference", "max_model_len", str(max_model_len))
    home.set("inference", "max_num_seqs", "8")
    home.set("inference", "kv_cache_gib", "1")
    home.set("consensus", "commit_timeout_s", "60")
    home.set("consensus", "reveal_timeout_s", "10")
    return home


@asynccontextmanager
async def cluster(
    root: Path, model: Path, mode: str, engines: Sequence[VllmEngine], max_model_len: int
) -> AsyncIterator[list[Node]]:
    """One in-process node per engine, star-bootstrapped from node 0, all serving."""
    async with AsyncExitStack() as stack:
        nodes: list[Node] = []
        for i, engine in enumerate(engines):
            bootstrap = nodes[0].p2p.listen_addrs() if nodes else None
            home = home_for(
                root / f"{mode}{len(engines)}-{i}", model, mode, bootstrap, max_model_len
            )
            nodes.append(await stack.enter_async_context(running_node(home, {MODEL: engine})))
        for node in nodes:
            await wait_for(
                partial(sees_all_serving, node, nodes, MODEL), 180, "all peers up, serving"
            )
        yield nodes


def engine_core_pids() -> set[int]:
    """This process's vLLM engine-core children."""
    found = set()
    for child in Path(f"/proc/{os.getpid()}/task").glob("*/children"):
        for pid in child.read_text().split():
            with contextlib.suppress(OSError):
                if b"EngineCore" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.add(int(pid))
    return found


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


async def start_engine(path: Path, max_model_len: int) -> tuple[VllmEngine, int]:
    """A float32 engine of ``path`` and the pid of its engine core."""
    before = engine_core_pids()
    engine = VllmEngine(EngineSpec(path, "float32", "auto", 8, max_model_len, 1.0))
    await engine.start()
    (pid,) = engine_core_pids() - before
    return engine, pid


# ---- 1. compute


@dataclass
class ComputeResult:
    mode: str
    k: int
    local_ms: list[float] = field(default_factory=list)
    job_ms: list[float] = field(default_factory=list)
    executor_cpu: list[float] = field(default_factory=list)
    verifier_cpu: list[float] = field(default_factory=list)  # all verifiers of a job, summed
    failed: str = ""  # why the run stopped early (a job that did not certify)


async def bench_compute(
    model: Path, sizes: Sequence[int], jobs: int, max_tokens: int
) -> list[ComputeResult]:
    results = []
    max_model_len = 512
    engines = [await start_engine(model, max_model_len) for _ in range(max(sizes))]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for k in sizes:
                for mode in MODES:
                    used = engines[:k]
                    async with cluster(
                        Path(tmp), model, mode, [e for e, _ in used], max_model_len
                    ) as nodes:
                        results.append(
                            await compute_run(
                                nodes, [pid for _, pid in used], mode, jobs, max_tokens
                            )
                        )
    finally:
        for engine, _ in engines:
            await engine.stop()
    return results


async def compute_run(
    nodes: list[Node], pids: list[int], mode: str, jobs: int, max_tokens: int
) -> ComputeResult:
    k = len(nodes)
    result = ComputeResult(mode, k)
    by_address = {n.consensus.address: pid for n, pid in zip(nodes, pids, strict=True)}
    sampling = SamplingSpec(max_tokens=max_tokens, ignore_eos=True)
    nonces = itertools.count(1)
    for i, prompt in zip(range(jobs + 1), itertools.cycle(PROMPTS), strict=False):
        began = time.perf_counter()
        await nodes[0].inference_client.complete(MODEL, prompt, None, sampling)
        local_ms = 1000 * (time.perf_counter() - began)
        before = {pid: cpu_seconds(pid) for pid in pids}
        params = SubmitParams(
            model=MODEL,
            prompt=prompt,
            max_tokens=max_tokens,
            ignore_eos=True,
            committee_size=k,
            nonce=next(nonces),
        )
        began = time.perf_counter()
        job = await nodes[0].consensus.submit(params)
        with trio.fail_after(120):
            await job.done.wait()
        job_ms = 1000 * (time.perf_counter() - began)
        if job.status != "certified":
            result.failed = f"job {i + 1} {job.status}: {job.reason[:160]}"
            return result
        await trio.sleep(1.0)  # let the members still working on it stop
        spent = {a: cpu_seconds(p) - before[p] for a, p in by_address.items()}
        if i == 0:
            continue  # warm-up
        result.local_ms.append(local_ms)
        result.job_ms.append(job_ms)
        committee = list(job.tally.committee)
        if mode == "prefill":
            executor = spent[committee[0]]
            others = sum(spent[a] for a in committee[1:])
        else:
            executor = statistics.mean(spent[a] for a in committee)
            others = sum(spent[a] for a in committee) - executor
        result.executor_cpu.append(executor)
        result.verifier_cpu.append(others)
    return result


def report_compute(results: Sequence[ComputeResult], max_tokens: int) -> None:
    print(f"\n1. compute: SmolLM2-135M fp32, greedy, {max_tokens} tokens, one engine per node")
    print(
        "| mode | k | local p50 ms | job p50 ms | p95 | over local p50 | executor CPU s | "
        "verifiers' CPU s | verification compute |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if not r.job_ms:
            print(f"| {r.mode} | {r.k} | no job certified: {r.failed} |")
            continue
        executor, others = sum(r.executor_cpu), sum(r.verifier_cpu)
        print(
            f"| {r.mode} | {r.k} | {p50(r.local_ms):.0f} | {p50(r.job_ms):.0f} | "
            f"{p95(r.job_ms):.0f} | {p50(r.job_ms) - p50(r.local_ms):+.0f} | "
            f"{executor / len(r.executor_cpu):.2f} | {others / len(r.verifier_cpu):.2f} | "
            f"{100 * others / executor:.0f} % |"
        )


# ---- 2. processes


@dataclass
class ProcessResult:
    mode: str
    k: int
    local_ms: list[float] = field(default_factory=list)
    job_ms: list[float] = field(default_factory=list)


async def bench_processes(
    model: Path, sizes: Sequence[int], jobs: int, max_tokens: int
) -> list[ProcessResult]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in sizes:
            for mode in MODES:
                results.append(
                    await process_run(Path(tmp) / f"{mode}{k}", model, mode, k, jobs, max_tokens)
                )
    return results


async def process_run(
    root: Path, model: Path, mode: str, k: int, jobs: int, max_tokens: int
) -> ProcessResult:
    result = ProcessResult(mode, k)
    homes: list[NodeHome] = []
    processes: list[NodeProcess] = []
    try:
        for i in range(k):
            bootstrap = homes[0].endpoints().p2p_addrs if homes else None  # type: ignore[union-attr]
            home = home_for(root / f"n{i}", model, mode, bootstrap, 256)
            home.set("inference", "kv_cache_gib", "0.25")
            homes.append(home)
            processes.append(NodeProcess(home))
            await trio.to_thread.run_sync(processes[-1].wait_ready, 180)
        endpoints = homes[0].endpoints()
        assert endpoints is not None
        async with ControlClient.connect(endpoints.control_url, homes[0].token.value) as client:

            async def all_up() -> bool:
                peers = await client.call("peers.list")
                return sum(1 for p in peers if p["state"] == "up" and p["models"]) >= k - 1

            await wait_for(all_up, 60, "node A sees every other node up")
            request = {"model": MODEL, "max_tokens": max_tokens, "ignore_eos": True}
            for i, prompt in zip(range(jobs + 1), itertools.cycle(PROMPTS), strict=False):
                began = time.perf_counter()
                await client.call("infer.local", {**request, "prompt": prompt})
                local_ms = 1000 * (time.perf_counter() - began)
                began = time.perf_counter()
                submitted = await client.call(
                    "infer.submit",
                    {**request, "prompt": prompt, "committee_size": k, "nonce": i + 1},
                )
                done = await client.call(
                    "job.wait", {"request_id": submitted["request_id"], "timeout_s": 60}
                )
                job_ms = 1000 * (time.perf_counter() - began)
                if done["status"] != "certified":
                    raise RuntimeError(f"{mode} k={k}: {done['status']}: {done['reason']}")
                if i:
                    result.local_ms.append(local_ms)
                    result.job_ms.append(job_ms)
    finally:
        for process in processes:
            process.kill()
    return result


def report_processes(results: Sequence[ProcessResult], max_tokens: int) -> None:
    print(
        f"\n2. one node per process: tiny model, {max_tokens} tokens, "
        "through node A's control socket"
    )
    print("| mode | k | infer.local p50 ms | job p50 ms | p95 | overhead p50 ms | ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        local, job = p50(r.local_ms), p50(r.job_ms)
        print(
            f"| {r.mode} | {r.k} | {local:.0f} | {job:.0f} | {p95(r.job_ms):.0f} | "
            f"{job - local:+.0f} | {job / local:.2f} |"
        )


# ---- 3. messages


@dataclass
class MessageResult:
    n: int
    jobs: int
    sent: float  # per job, all nodes
    gossip_publishes: float
    received: float  # per job, all nodes: direct requests served + job gossip delivered


def counter_sum(node: Node, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (a suffix for topic)."""
    total = 0.0
    for metric in node.registry.collect():
        for sample in metric.samples:
            if sample.name != name:
                continue
            if all(
                sample.labels.get(key, "").endswith(value)
                if key == "topic"
                else sample.labels.get(key) == value
                for key, value in labels.items()
            ):
                total += sample.value
    return total


def traffic(nodes: Sequence[Node]) -> tuple[float, float, float]:
    """(sent, gossip publishes, received) by all ``nodes`` so far."""
    sent = gossip = received = 0.0
    for n in nodes:
        sent += counter_sum(n, "joynode_consensus_messages_sent_total")
        gossip += counter_sum(n, "joynode_consensus_messages_sent_total", route="gossip")
        received += counter_sum(n, "joynode_p2p_requests_total", direction="in")
        for topic in ("/jobs", "/votes"):
            received += counter_sum(n, "joynode_p2p_gossip_received_total", topic=topic)
    return sent, gossip, received


async def bench_messages(model: Path, counts: Sequence[int], jobs: int) -> list[MessageResult]:
    results = []
    engine = VllmEngine(EngineSpec(model, "float32", "auto", 64, 256, 1.0))
    await engine.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for n in counts:
                async with cluster(Path(tmp), model, "prefill", [engine] * n, 256) as nodes:
                    before = traffic(nodes)
                    for i in range(jobs):
                        params = SubmitParams(
                            model=MODEL,
                            prompt=PROMPTS[i % len(PROMPTS)],
                            max_tokens=8,
                            ignore_eos=True,
                            committee_size=3,
                            nonce=i + 1,
                        )
                        job = await nodes[0].consensus.submit(params)
                        with trio.fail_after(60):
                            await job.done.wait()
                        assert job.status == "certified", job.reason
                    await trio.sleep(2.0)  # the last votes land
                    after = traffic(nodes)
                    sent, gossip, received = (
                        (b - a) / jobs for a, b in zip(before, after, strict=True)
                    )
                    results.append(MessageResult(n, jobs, sent, gossip, received))
    finally:
        await engine.stop()
    return results


def report_messages(results: Sequence[MessageResult]) -> None:
    print("\n3. messages per job, k = 3, prefill, tiny model (all nodes together)")
    print("| N | jobs | sent | of them gossip publishes | received (direct + job gossip) |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r.n} | {r.jobs} | {r.sent:.1f} | {r.gossip_publishes:.1f} | {r.received:.1f} |")


# ---- main


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="k = 3 only, fewer jobs")
    parser.add_argument("--only", choices=("compute", "processes", "messages"))
    parser.add_argument("--jobs", type=int, help="jobs per run (compute 8, processes 20)")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sizes = [3] if args.quick else [3, 5]
    smollm2, tiny = (MODELS / "smollm2").resolve(), (MODELS / "tiny").resolve()
    for name, path in (("smollm2", smollm2), ("tiny", tiny)):
        if not (path / "config.json").is_file():
            prepare(name, path)
    print(f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    began = time.perf_counter()
    if args.only in (None, "compute"):
        jobs = args.jobs or (4 if args.quick else 8)
        report_compute(
            trio.run(bench_compute, smollm2, sizes, jobs, args.max_tokens), args.max_tokens
        )
    if args.only in (None, "processes"):
        jobs = args.jobs or (8 if args.quick else 20)
        report_processes(trio.run(bench_processes, tiny, sizes, jobs, 16), 16)
    if args.only in (None, "messages"):
        counts = [4, 8] if args.quick else [4, 8, 16]
        report_messages(trio.run(bench_messages, tiny, counts, 5))
    print(f"took {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
