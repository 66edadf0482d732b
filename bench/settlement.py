"""Settlement: paid verified-inference jobs settled on a real local anvil chain.

One anvil (the binary ``joynode.chain.anvil`` runs, automining every transaction
into its own block) with the contracts deployed by ``deploy_all`` serves the
whole run; each committee size k runs on a snapshot of it (``evm_snapshot``
after deployment and funding, reverted afterwards, as tests/chain_fixtures.py
does). For each k (1, 3, 5), k real nodes run in this one trio process on
127.0.0.1 (``bench.consensus.node_home``: ``fast_p2p`` intervals, commit and
reveal timeouts 10 s and 5 s, never reached), all serving the tiny test model
through ONE shared vLLM engine, as tests/test_consensus_chain.py sets them up:
anvil dev accounts as node keys, each staked (``stake``) and registered
on-chain (``node.chain.register()``), ``chain.mode = "rpc"``,
``chain.poll_interval_s`` 0.1 s, ``consensus.takeover_s`` 2 s (only used if
the first-ranked member fails to land the certificate, which never happens
here), and the model registered in the marketplace with ``committeeSize = k``
(``register_model``), so every node is a member of every job.

Node 0 submits every job; requests are greedy, ``--max-tokens`` new tokens with
EOS ignored, a distinct nonce each. Sequentially, alternating which goes first:

- unpaid (the baseline, same process, same nodes, same chain watchers running):
  ``submit`` with ``committee_size = k``, until certified at node 0;
- paid: ``submit`` with ``paid=True``. ``submit`` itself sends node 0's
  ``JoyToken.approve``, ``ModelMarketplace.requestInference`` and
  ``drawCommittee`` and waits for their receipts before the offer goes out.
  Then "certified" (node 0's ``done``, status checked), and "settled": node
  0's ``Job.settled()`` with payment status ``settled`` (from its own receipt
  if it landed the certificate, else from the watcher's
  ``InferenceVerified``), and when every node has seen it.

Where a paid job's time goes: every node's ``ChainService.transact`` and
``request_info`` are wrapped to time each transaction (gas from its receipt)
and each on-chain read, and every node's web3 gets a middleware that counts
(and times) the JSON-RPC requests it makes, by method, watcher polls included.
"all reveals" is when node 0's tally holds every member's reveal (the member
that lands the certificate waits for them); the certificate transaction is
``ProofOfInference.submitCertificate`` from the first-ranked agreeing member.
Gas is the receipts' ``gasUsed`` (approve, requestInference and drawCommittee
paid by node 0, submitCertificate by the member). CPU: the trio thread that runs every node
(``time.thread_time``) and the whole process (``time.process_time``: also the
worker threads that make the web3 calls); the vLLM engine core is another
process, not counted.

All nodes, the engine and anvil share this machine's cores. Run from the
repository root (it prepares the tiny model into .joynode/models/tiny if
missing; anvil comes from ``make install``)::

    .venv/bin/python -m bench.settlement            # full run: k = 1, 3, 5, 20 of each per k
    .venv/bin/python -m bench.settlement --quick    # smoke run: k = 1 and 3, 3 of each
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import logging
import math
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any

import trio
from web3 import Web3
from web3.middleware import Web3Middleware
from web3.types import MakeRequestFn, RPCEndpoint, RPCResponse

from bench import consensus
from bench.consensus import (
    MAX_MODEL_LEN,
    MAX_NUM_SEQS,
    MODEL,
    MODEL_DIR,
    JobTrace,
    Requests,
    idle_busy,
    mean,
    node_home,
    p50,
    p99,
)
from joynode.chain.anvil import anvil_command, dev_account, listening_url
from joynode.chain.artifacts import load_artifacts
from joynode.chain.deploy import JOY, DeployParams, deploy_all
from joynode.chain.sender import RevertDecoder, TransactionSender
from joynode.chain.service import ChainService
from joynode.consensus.control import SubmitParams
from joynode.consensus.job import Job
from joynode.inference.engine import EngineSpec, VllmEngine
from joynode.inference.models import prepare
from joynode.keys import NodeKey
from joynode.messages import OnchainRequest
from joynode.node import Node
from tests.chain_fixtures import Chain
from tests.factories import running_node, sees_all_serving, wait_for
from tests.test_consensus_chain import PRICE, register_model, stake

FIRST_NODE_ACCOUNT = 2  # dev accounts 0 (admin) and 1 (treasury) come first
ANVIL_ACCOUNTS = 20  # tests.test_consensus_chain's model owner and royalty are 10 and 11
FUNDING = 100_000 * JOY  # each node account: its stake and every job it pays for
COMMIT_TIMEOUT_S = consensus.COMMIT_TIMEOUT_S
SETTLE_TIMEOUT_S = 60.0  # the request's on-chain deadline: commit + reveal + this
TAKEOVER_S = 2.0
POLL_INTERVAL_S = 0.1
READY_TIMEOUT_S = 30.0
JOB_TIMEOUT_S = 30.0
WARMUP = 2  # of each: gossip meshes, batch shapes, the payer's and signers' first storage writes
IDLE_S = 3.0
PAID_NONCES = 1_000_000_000  # unpaid jobs count their nonces from 1 (bench.consensus.Requests)


# ---- measuring the chain link


class RpcLog:
    """JSON-RPC requests one node's web3 made (any thread): count and seconds by method."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()
        self.seconds: collections.defaultdict[str, float] = collections.defaultdict(float)

    def add(self, method: str, seconds: float) -> None:
        with self._lock:
            self.counts[method] += 1
            self.seconds[method] += seconds

    def snapshot(self) -> collections.Counter[str]:
        with self._lock:
            return collections.Counter(self.counts)

    def total_seconds(self) -> float:
        with self._lock:
            return sum(self.seconds.values())

    def middleware(self) -> type[Web3Middleware]:
        log = self

        class CountRequests(Web3Middleware):
            def wrap_make_request(self, make_request: MakeRequestFn) -> MakeRequestFn:
                def counted(method: RPCEndpoint, params: Any) -> RPCResponse:
                    began = time.perf_counter()
                    try:
                        return make_request(method, params)
                    finally:
                        log.add(str(method), time.perf_counter() - began)

                return counted

        return CountRequests


@dataclass(frozen=True)
class ChainCall:
    """One ``transact`` (by contract function name) or ``request_info`` of a node's chain link."""

    node: int
    name: str
    began: float  # perf_counter
    ended: float
    request_id: bytes | None = None  # requestInfo and submitCertificate only
    gas: int = 0  # a transaction's gasUsed
    ok: bool = True

    @property
    def ms(self) -> float:
        return 1000 * (self.ended - self.began)


def instrument(index: int, chain: ChainService, calls: list[ChainCall]) -> None:
    """Time every transaction and on-chain read of ``chain``, into ``calls``."""
    transact, request_info = chain.transact, chain.request_info

    async def timed_transact(call: Any, *args: Any, **kwargs: Any) -> Any:
        name = str(getattr(call, "fn_name", "?"))
        call_args = getattr(call, "args", ())
        request_id = bytes(call_args[0]) if name == "submitCertificate" and call_args else None
        began = time.perf_counter()
        try:
            receipt = await transact(call, *args, **kwargs)
        except Exception:
            calls.append(ChainCall(index, name, began, time.perf_counter(), request_id, ok=False))
            raise
        used = int(receipt["gasUsed"])
        calls.append(ChainCall(index, name, began, time.perf_counter(), request_id, used))
        return receipt

    async def timed_request_info(request_id: bytes) -> OnchainRequest | None:
        began = time.perf_counter()
        try:
            return await request_info(request_id)
        finally:
            calls.append(ChainCall(index, "requestInfo", began, time.perf_counter(), request_id))

    # (instance attributes: the actor's own calls, e.g. request_inference's, go through them)
    setattr(chain, "transact", timed_transact)  # noqa: B010
    setattr(chain, "request_info", timed_request_info)  # noqa: B010


# ---- the chain


def _drain(stream: IO[bytes]) -> None:
    while stream.read(65536):
        pass


@contextlib.contextmanager
def anvil_chain(max_nodes: int) -> Iterator[Chain]:
    """A fresh anvil with JoyNet deployed; the node accounts funded with JOY."""
    process = subprocess.Popen(
        anvil_command(accounts=ANVIL_ACCOUNTS), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert process.stdout is not None
    drain: threading.Thread | None = None
    try:
        seen, url, deadline = b"", None, time.monotonic() + 20
        while url is None and time.monotonic() < deadline:
            chunk = process.stdout.read1(4096)  # type: ignore[attr-defined]
            if not chunk:
                break
            seen += chunk
            url = listening_url(seen)
        if url is None:
            raise RuntimeError(f"anvil did not start: {seen.decode(errors='replace')[-2000:]}")
        # anvil logs every call; keep reading so it never blocks on a full pipe.
        drain = threading.Thread(target=_drain, args=(process.stdout,), daemon=True)
        drain.start()
        w3 = Web3(Web3.HTTPProvider(url))
        admin = dev_account(0)
        decoder = RevertDecoder(load_artifacts().contracts.values())
        sender = TransactionSender(w3, admin, decoder)
        deployment = deploy_all(sender, DeployParams.for_chain(int(w3.eth.chain_id)))
        chain = Chain(w3, url, deployment, admin, deployment.treasury, decoder)
        token = chain.contract("JoyToken")
        for i in range(max_nodes):
            account = dev_account(FIRST_NODE_ACCOUNT + i)
            sender.transact(token.functions.transfer(account.address, FUNDING))
        yield chain
    finally:
        process.terminate()
        process.wait(10)
        if drain is not None:
            drain.join(5)
        process.stdout.close()


@contextlib.contextmanager
def chain_snapshot(chain: Chain) -> Iterator[None]:
    """Revert the chain to what it is now on exit (and its clock to the wall clock)."""
    provider: Any = chain.w3.provider
    snapshot = provider.make_request("evm_snapshot", [])
    try:
        yield
    finally:
        provider.make_request("evm_revert", [snapshot["result"]])
        provider.make_request("anvil_setTime", [int(time.time())])


# ---- the cluster


@dataclass
class Cluster:
    nodes: list[Node]
    rpc: list[RpcLog]  # by node
    calls: list[ChainCall] = field(default_factory=list)  # every node's, in order

    def rpc_total(self) -> int:
        return sum(sum(log.snapshot().values()) for log in self.rpc)


def chain_of(node: Node) -> ChainService:
    assert node.chain is not None
    return node.chain


async def mirrors(node: Node, count: int) -> bool:
    return len(await chain_of(node).registry_candidates()) == count


@asynccontextmanager
async def paid_cluster(
    root: Path,
    settings: Settings,
    engine: VllmEngine,
    chain: Chain,
    k: int,
    extra: Sequence[tuple[str, str, str]] = (),
) -> AsyncIterator[Cluster]:
    """k staked, registered nodes serving the tiny model, priced with committee size k;
    ``extra``: more config, as (section, key, TOML value)."""
    deployment_file = root / "deployment.json"
    chain.deployment.write(deployment_file)
    home_settings = consensus.Settings(
        sizes=[k],
        requests=settings.jobs,
        concurrency=1,
        jobs=settings.jobs,
        max_tokens=settings.max_tokens,
        model_path=settings.model_path,
        heartbeat_interval_s=None,
    )
    async with AsyncExitStack() as stack:
        nodes: list[Node] = []
        for i in range(k):
            account = dev_account(FIRST_NODE_ACCOUNT + i)
            await trio.to_thread.run_sync(stake, chain, account)
            bootstrap = nodes[0].p2p.listen_addrs() if nodes else None
            home = node_home(root / f"n{i}", home_settings, bootstrap)
            NodeKey(bytes(account.key)).save(home.config.node.key_file, force=True)
            home.set("chain", "mode", '"rpc"')
            home.set("chain", "rpc_url", f'"{chain.url}"')
            home.set("chain", "deployment_file", f'"{deployment_file}"')
            home.set("chain", "poll_interval_s", str(settings.poll_interval_s))
            home.set("consensus", "settle_timeout_s", str(SETTLE_TIMEOUT_S))
            home.set("consensus", "takeover_s", str(settings.takeover_s))
            for section, key, value in extra:
                home.set(section, key, value)
            nodes.append(await stack.enter_async_context(running_node(home, {MODEL: engine})))
        for node in nodes:
            await chain_of(node).register()
        cid = nodes[0].inference.model_id(MODEL)
        assert cid is not None
        await trio.to_thread.run_sync(register_model, chain, cid, k)
        for node in nodes:
            await wait_for(
                partial(sees_all_serving, node, nodes, MODEL),
                READY_TIMEOUT_S,
                "all peers up, serving",
            )
            await wait_for(partial(mirrors, node, k), READY_TIMEOUT_S, "the registry mirrored")
        cluster = Cluster(nodes, [RpcLog() for _ in nodes])
        for i, (node, log) in enumerate(zip(nodes, cluster.rpc, strict=True)):
            link = chain_of(node)
            assert link.w3 is not None
            link.w3.middleware_onion.add(log.middleware(), name="bench_rpc_log")
            instrument(i, link, cluster.calls)
        yield cluster


# ---- one job of each kind


@dataclass
class UnpaidTrace:
    job: JobTrace
    process_cpu_ms: float
    rpc: int  # JSON-RPC requests of all nodes during the job (watcher polls)


@dataclass
class PaidTrace:
    """One paid job as node 0 saw it, in ms from just before ``submit``."""

    submit_ms: float = math.nan  # submit() returned: paid on-chain, offer published
    approve_ms: float = math.nan  # node 0's approve transaction, inside submit
    request_ms: float = math.nan  # node 0's requestInference transaction, inside submit
    draw_ms: float = math.nan  # node 0's drawCommittee transaction, inside submit
    info_ms: float = math.nan  # node 0's requestInfo read(s), inside submit
    offer_spread_ms: float = math.nan  # last member's Job.created_at minus node 0's
    certified_ms: float = math.nan  # certified at node 0
    reveals_ms: float = math.nan  # every member's reveal in node 0's tally
    cert_tx_began_ms: float = math.nan  # submitCertificate sent (the landing member)
    cert_tx_ended_ms: float = math.nan  # its receipt
    settled_ms: float = math.nan  # node 0: payment settled
    settled_all_ms: float = math.nan  # every node: payment settled
    landed_by_node0: bool = False
    lander_rank: int = -1  # the landing member's rank in the certificate's signers
    node0_signers: int = 0  # signers of node 0's certificate (its Job, job.get)
    landed_signers: int = 0  # signers of the certificate that landed on-chain
    gas: dict[str, int] = field(default_factory=dict)  # by function: approve, ...
    transactions: int = 0
    reads: int = 0  # requestInfo reads of this request, all nodes, until settled everywhere
    cpu_ms: float = math.nan  # trio thread, submit -> settled everywhere
    process_cpu_ms: float = math.nan
    submit_rpc: collections.Counter[str] = field(default_factory=collections.Counter)  # node 0's
    submit_rpc_ms: float = math.nan  # node 0's JSON-RPC requests' wall time, summed
    rpc: int = 0  # JSON-RPC requests of all nodes, submit -> settled everywhere


async def watch_reveals(job: Job, began: float, trace: PaidTrace) -> None:
    while len(job.tally.reveals) < len(job.tally.committee):
        await job.changed.wait()
    trace.reveals_ms = 1000 * (time.perf_counter() - began)


async def settled_at(node: Node, request_id: bytes) -> float:
    """When ``node``'s copy of the job is settled (perf_counter); fails unless paid out."""
    # (a member that has committed, as all have once node 0 certifies, has it already)
    await wait_for(lambda: request_id in node.consensus.jobs, JOB_TIMEOUT_S, "the job")
    job = node.consensus.jobs[request_id]
    while not job.settled():
        await job.changed.wait()
    payment = job.payment
    if job.status != "certified" or payment is None or payment.status != "settled":
        raise RuntimeError(f"job {request_id.hex()[:12]} {job.status}: {job.reason}; {payment}")
    return time.perf_counter()


class Jobs:
    def __init__(self, cluster: Cluster, max_tokens: int) -> None:
        self.cluster = cluster
        self.nodes = cluster.nodes
        self.node = cluster.nodes[0]
        self.k = len(cluster.nodes)
        self.max_tokens = max_tokens
        self.unpaid_requests = Requests(cluster.nodes, max_tokens)
        self._paid_nonces = itertools.count(PAID_NONCES)

    def next_prompt(self) -> None:
        self.unpaid_requests.next_prompt()

    async def unpaid(self) -> UnpaidTrace:
        trace = JobTrace()
        rpc, cpu = self.cluster.rpc_total(), time.process_time()
        await self.unpaid_requests.job(trace)
        cpu = time.process_time() - cpu
        return UnpaidTrace(trace, 1000 * cpu, self.cluster.rpc_total() - rpc)

    async def paid(self) -> PaidTrace:
        params = SubmitParams(
            model=MODEL,
            prompt=self.unpaid_requests.prompt,
            max_tokens=self.max_tokens,
            ignore_eos=True,
            nonce=next(self._paid_nonces),
            paid=True,
        )
        trace = PaidTrace()
        calls = self.cluster.calls
        first_call = len(calls)
        rpc_node0, rpc = self.cluster.rpc[0].snapshot(), self.cluster.rpc_total()
        rpc_node0_s = self.cluster.rpc[0].total_seconds()
        began, cpu, process_cpu = time.perf_counter(), time.thread_time(), time.process_time()
        job = await self.node.consensus.submit(params)
        submitted = time.perf_counter()
        trace.submit_rpc = self.cluster.rpc[0].snapshot() - rpc_node0
        trace.submit_rpc_ms = 1000 * (self.cluster.rpc[0].total_seconds() - rpc_node0_s)
        request_id = job.request_id
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_reveals, job, began, trace)
            with trio.fail_after(JOB_TIMEOUT_S):
                await job.done.wait()
            certified = time.perf_counter()
            if job.status != "certified":
                raise RuntimeError(f"paid job {request_id.hex()[:12]} {job.status}: {job.reason}")
            if len(job.tally.committee) != self.k:
                raise RuntimeError(f"committee of {len(job.tally.committee)}, wanted {self.k}")
            settled: dict[int, float] = {}

            async def one(index: int, node: Node) -> None:
                settled[index] = await settled_at(node, request_id)

            with trio.fail_after(SETTLE_TIMEOUT_S):
                async with trio.open_nursery() as each:
                    for index, node in enumerate(self.nodes):
                        each.start_soon(one, index, node)
            settled_node0, settled_all = settled[0], max(settled.values())
            nursery.cancel_scope.cancel()
        trace.cpu_ms = 1000 * (time.thread_time() - cpu)
        trace.process_cpu_ms = 1000 * (time.process_time() - process_cpu)
        trace.rpc = self.cluster.rpc_total() - rpc

        def landed() -> list[ChainCall]:
            return [
                c
                for c in calls[first_call:]
                if c.name == "submitCertificate" and c.request_id == request_id and c.ok
            ]

        # A watcher can report InferenceVerified before the lander's own receipt is back.
        await wait_for(lambda: bool(landed()), JOB_TIMEOUT_S, "the certificate's receipt")

        def ms(at: float) -> float:
            return 1000 * (at - began)

        trace.submit_ms, trace.certified_ms = ms(submitted), ms(certified)
        trace.offer_spread_ms = 1000 * max(
            (n.consensus.jobs[request_id].created_at - job.created_at for n in self.nodes[1:]),
            default=0.0,
        )
        trace.settled_ms, trace.settled_all_ms = ms(settled_node0), ms(settled_all)
        window = calls[first_call:]
        mine = [c for c in window if c.request_id in (None, request_id)]
        in_submit = [c for c in mine if c.node == 0 and c.ended <= submitted]
        trace.approve_ms = sum(c.ms for c in in_submit if c.name == "approve")
        trace.request_ms = sum(c.ms for c in in_submit if c.name == "requestInference")
        trace.draw_ms = sum(c.ms for c in in_submit if c.name == "drawCommittee")
        trace.info_ms = sum(c.ms for c in in_submit if c.name == "requestInfo")
        transactions = [c for c in mine if c.name != "requestInfo"]
        trace.transactions = len(transactions)
        trace.reads = sum(1 for c in mine if c.name == "requestInfo")
        for c in transactions:
            trace.gas[c.name] = trace.gas.get(c.name, 0) + c.gas
        certificates = landed()
        if len(certificates) != 1:
            raise RuntimeError(f"paid job {request_id.hex()[:12]}: {len(certificates)} landed")
        tx = certificates[0]
        trace.cert_tx_began_ms, trace.cert_tx_ended_ms = ms(tx.began), ms(tx.ended)
        trace.landed_by_node0 = tx.node == 0
        # (rank among the signers the lander submitted: every member's, as all agree here;
        # node 0's own certificate may hold only the majority it certified with)
        lander = self.nodes[tx.node].consensus
        certificate = lander.jobs[request_id].certificate
        assert certificate is not None
        trace.lander_rank = list(certificate.signers).index(lander.address)
        trace.landed_signers = len(certificate.signers)
        assert job.certificate is not None
        trace.node0_signers = len(job.certificate.signers)
        return trace


# ---- one committee size


@dataclass(frozen=True)
class Settings:
    sizes: list[int]
    jobs: int
    max_tokens: int
    takeover_s: float
    poll_interval_s: float
    model_path: Path


@dataclass
class SizeResult:
    k: int
    unpaid: list[UnpaidTrace]
    paid: list[PaidTrace]
    idle_rpc_per_s: float  # JSON-RPC requests per second of the idle cluster (watcher polls)
    idle_busy: float  # share of the trio thread the idle cluster uses


async def bench_size(engine: VllmEngine, chain: Chain, k: int, settings: Settings) -> SizeResult:
    with (
        chain_snapshot(chain),
        tempfile.TemporaryDirectory(prefix=f"joynode-bench-settlement-{k}-") as tmp,
    ):
        async with paid_cluster(Path(tmp), settings, engine, chain, k) as cluster:
            jobs = Jobs(cluster, settings.max_tokens)
            for _ in range(WARMUP):
                await jobs.unpaid()
                await jobs.paid()

            rpc, began = cluster.rpc_total(), time.perf_counter()
            idle = await idle_busy(IDLE_S)
            idle_rpc = (cluster.rpc_total() - rpc) / (time.perf_counter() - began)

            unpaid: list[UnpaidTrace] = []
            paid: list[PaidTrace] = []
            for i in range(settings.jobs):
                jobs.next_prompt()
                if i % 2 == 0:
                    unpaid.append(await jobs.unpaid())
                    paid.append(await jobs.paid())
                else:
                    paid.append(await jobs.paid())
                    unpaid.append(await jobs.unpaid())
            # Let the last job's takeover timers run out before the cluster stops.
            await trio.sleep(settings.takeover_s * (k - 1) + 0.5)

    result = SizeResult(k, unpaid, paid, idle_rpc, idle)
    u = [t.job.done_ms for t in unpaid]
    print(
        f"k={k}: unpaid certified p50 {p50(u):.1f} ms; paid: submit {p50(submit_ms(result)):.1f}"
        f" ms, certified {p50([t.certified_ms for t in paid]):.1f} ms, settled "
        f"{p50([t.settled_ms for t in paid]):.1f} ms",
        flush=True,
    )
    return result


def submit_ms(result: SizeResult) -> list[float]:
    return [t.submit_ms for t in result.paid]


async def bench(settings: Settings) -> list[SizeResult]:
    with anvil_chain(max(settings.sizes)) as chain:
        engine = VllmEngine(
            EngineSpec(settings.model_path, "float32", "auto", MAX_NUM_SEQS, MAX_MODEL_LEN, 1.0)
        )
        await engine.start()
        try:
            return [await bench_size(engine, chain, k, settings) for k in settings.sizes]
        finally:
            await engine.stop()


# ---- report


def _row(values: Sequence[float]) -> str:
    return f"{p50(values):>8.1f} {p99(values):>8.1f}"


def report(results: Sequence[SizeResult], settings: Settings) -> None:
    print()
    print(
        f"sequential, {settings.jobs} of each per k (alternating), ms from submit at node 0 "
        "(p50, p99); deltas and ratios of p50s against the unpaid job"
    )
    print(
        f"{'k':>2} {'unpaid p50':>10} {'p99':>8} {'paid cert p50':>13} {'p99':>8} "
        f"{'vs unpaid':>9} {'ratio':>6} {'settled p50':>11} {'p99':>8} {'vs unpaid':>9} "
        f"{'ratio':>6} {'cert->settled p50':>17} {'p99':>8}"
    )
    for r in results:
        unpaid = [t.job.done_ms for t in r.unpaid]
        certified = [t.certified_ms for t in r.paid]
        settled = [t.settled_ms for t in r.paid]
        gap = [t.settled_ms - t.certified_ms for t in r.paid]
        u, c, s = p50(unpaid), p50(certified), p50(settled)
        print(
            f"{r.k:>2} {u:>10.1f} {p99(unpaid):>8.1f} {c:>13.1f} {p99(certified):>8.1f} "
            f"{c - u:>+9.1f} {c / u:>5.2f}x {s:>11.1f} {p99(settled):>8.1f} {s - u:>+9.1f} "
            f"{s / u:>5.2f}x {p50(gap):>17.1f} {p99(gap):>8.1f}"
        )

    print()
    print(
        "submit() alone (p50, p99 ms): unpaid, paid; inside the paid one, node 0's approve, "
        "requestInference and drawCommittee transactions (each until its receipt) and "
        "requestInfo reads"
    )
    print(
        f"{'k':>2} {'unpaid':>8} {'p99':>8} {'paid':>8} {'p99':>8} {'approve':>8} {'p99':>8} "
        f"{'request':>8} {'p99':>8} {'draw':>8} {'p99':>8} {'read':>8} {'p99':>8} "
        f"{'other':>8} {'p99':>8}"
    )
    for r in results:
        p = r.paid
        other = [t.submit_ms - t.approve_ms - t.request_ms - t.draw_ms - t.info_ms for t in p]
        print(
            f"{r.k:>2} {_row([t.job.submitted_ms for t in r.unpaid])} "
            f"{_row([t.submit_ms for t in p])} {_row([t.approve_ms for t in p])} "
            f"{_row([t.request_ms for t in p])} {_row([t.draw_ms for t in p])} "
            f"{_row([t.info_ms for t in p])} {_row(other)}"
        )

    print()
    print(
        "a paid job from submit() returning to settled (p50 ms): the offer's spread to the "
        "last member (members' Job.created_at against node 0's; unpaid for comparison); "
        "submit() returned -> certified at node 0; -> every reveal at node 0; the landing "
        "member's submitCertificate: sent (after the reveals and its requestInfo check) and "
        "its receipt; -> node 0 sees it settled; -> every node has"
    )
    print(
        f"{'k':>2} {'spread unpaid':>13} {'paid':>6} {'submit->cert':>12} {'cert->reveals':>13} "
        f"{'cert->tx sent':>13} {'tx':>6} {'tx->node 0':>10} {'tx->all':>8} {'landed by':>18}"
    )
    for r in results:
        p = r.paid
        by_node0 = sum(t.landed_by_node0 for t in p)
        ranks = collections.Counter(t.lander_rank for t in p)
        print(
            f"{r.k:>2} {p50([t.job.offer_spread_ms for t in r.unpaid]):>13.1f} "
            f"{p50([t.offer_spread_ms for t in p]):>6.1f} "
            f"{p50([t.certified_ms - t.submit_ms for t in p]):>12.1f} "
            f"{p50([t.reveals_ms - t.certified_ms for t in p]):>13.1f} "
            f"{p50([t.cert_tx_began_ms - t.certified_ms for t in p]):>13.1f} "
            f"{p50([t.cert_tx_ended_ms - t.cert_tx_began_ms for t in p]):>6.1f} "
            f"{p50([t.settled_ms - t.cert_tx_ended_ms for t in p]):>10.1f} "
            f"{p50([t.settled_all_ms - t.cert_tx_ended_ms for t in p]):>8.1f} "
            f"{f'node 0 in {by_node0}/{len(p)}':>18}; by rank: "
            + ", ".join(f"{rank}: {n}" for rank, n in sorted(ranks.items()))
        )

    print()
    print(
        "per paid job: transactions and their gas (receipts' gasUsed, mean), requestInfo reads "
        "of it (all nodes); JSON-RPC requests (all nodes' web3, watcher polls included) per job "
        "and per second idle; CPU per job (trio thread; whole process), unpaid and paid"
    )
    print(
        f"{'k':>2} {'txs':>4} {'approve':>8} {'request':>8} {'draw':>8} {'certificate':>11} "
        f"{'total gas':>10} "
        f"{'reads':>5} {'RPC unpaid':>10} {'RPC paid':>8} {'RPC/s idle':>10} "
        f"{'CPU unpaid':>10} {'paid':>6} {'proc unpaid':>11} {'paid':>6} {'idle':>6}"
    )
    for r in results:
        p = r.paid

        def gas(name: str, p: list[PaidTrace] = p) -> float:
            return mean([t.gas.get(name, 0) for t in p])

        total_gas = mean([sum(t.gas.values()) for t in p])
        print(
            f"{r.k:>2} {mean([t.transactions for t in p]):>4.1f} {gas('approve'):>8,.0f} "
            f"{gas('requestInference'):>8,.0f} {gas('drawCommittee'):>8,.0f} "
            f"{gas('submitCertificate'):>11,.0f} "
            f"{total_gas:>10,.0f} {mean([t.reads for t in p]):>5.1f} "
            f"{p50([t.rpc for t in r.unpaid]):>10.0f} {p50([t.rpc for t in p]):>8.0f} "
            f"{r.idle_rpc_per_s:>10.1f} {p50([t.job.cpu_ms for t in r.unpaid]):>10.1f} "
            f"{p50([t.cpu_ms for t in p]):>6.1f} "
            f"{p50([t.process_cpu_ms for t in r.unpaid]):>11.1f} "
            f"{p50([t.process_cpu_ms for t in p]):>6.1f} {100 * r.idle_busy:>5.1f}%"
        )

    print()
    print(
        "node 0's JSON-RPC requests during a paid submit() (its watcher's polls included), "
        "mean per job by method, and their wall time summed (p50):"
    )
    for r in results:
        total: collections.Counter[str] = collections.Counter()
        for t in r.paid:
            total.update(t.submit_rpc)
        n = len(r.paid)
        methods = ", ".join(f"{m} {c / n:.1f}" for m, c in total.most_common())
        rpc_ms = p50([t.submit_rpc_ms for t in r.paid])
        print(f"  k={r.k}: {sum(total.values()) / n:.1f} in all, {rpc_ms:.1f} ms: {methods}")

    print()
    print("certificate signers: node 0's own (its Job) against the one that landed on-chain")
    for r in results:
        pairs = collections.Counter((t.node0_signers, t.landed_signers) for t in r.paid)
        shown = ", ".join(f"{a} vs {b}: {n} jobs" for (a, b), n in sorted(pairs.items()))
        print(f"  k={r.k}: {shown}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="defaults: k = 1 and 3, 3 of each")
    parser.add_argument("--sizes", type=int, nargs="+", help="committee sizes (1 3 5)")
    parser.add_argument("--jobs", type=int, help="sequential jobs of each kind per k (20)")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument(
        "--takeover", type=float, default=TAKEOVER_S, help="consensus.takeover_s (2)"
    )
    parser.add_argument(
        "--poll-interval", type=float, default=POLL_INTERVAL_S, help="chain.poll_interval_s (0.1)"
    )
    args = parser.parse_args()
    settings = Settings(
        sizes=args.sizes or ([1, 3] if args.quick else [1, 3, 5]),
        jobs=args.jobs if args.jobs is not None else 3 if args.quick else 20,
        max_tokens=args.max_tokens,
        takeover_s=args.takeover,
        poll_interval_s=args.poll_interval,
        model_path=MODEL_DIR.resolve(),
    )
    logging.basicConfig(level=logging.WARNING)
    if not (MODEL_DIR / "config.json").is_file():
        prepare("tiny", MODEL_DIR)
    load = os.getloadavg()
    print(
        f"model {MODEL} ({MODEL_DIR}), fp32, greedy, {settings.max_tokens} new tokens, one "
        f"shared vLLM engine; anvil (automine), price {PRICE // JOY} JOY, takeover "
        f"{settings.takeover_s} s, chain poll every {settings.poll_interval_s} s; "
        f"{os.cpu_count()} CPUs, load {load[0]:.2f}"
    )
    began = time.perf_counter()
    results = trio.run(bench, settings)
    report(results, settings)
    print(f"took {time.perf_counter() - began:.0f} s, load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
