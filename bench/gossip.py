"""Gossip delivery and stream RPC round trips of joynode's p2p layer, against bare py-libp2p.

Gossip: N nodes (3, 6, 10) run in this one trio process on 127.0.0.1, each a real
``P2PService`` with its own key, state database and metrics registry, joined by
star bootstrap from node 0 and DHT discovery. Publishers take turns (message k
comes from node k mod N) and publish ``Heartbeat`` messages at fixed target
rates; every other node must receive each one. A delivery's latency is the time
from just before ``publish`` to the moment the verified message comes out of the
receiving node's gossip channel (one process, one clock). Of the N - 1
deliveries expected per message, those not in within the drain period are
"late" if they turn up before the network goes idle again, and "lost" if never.
Each round also reports the process's CPU time per message (publisher,
receivers and forwarders together, idle background subtracted): unlike
latency, it does not jump when the one core saturates.

Baseline: the same topology (all-to-all connections), topic, router settings
and payload size on bare ``libp2p_compat.running_stack`` hosts publishing raw
bytes: no joynode envelope signing, validation, rate limits or peer table. The
joynode/baseline ratios are the cost of joynode's signed, validated gossip.

RPC: sequential ``P2PService.request(peer, Ping(n))`` round trips between two
nodes, against a raw libp2p stream echo of the same frame (new stream, write,
read, close) between two bare hosts.

All nodes share this process's one core: at N = 10 the high rates measure that
core's saturation as much as the network. Run from the repository root::

    .venv/bin/python -m bench.gossip            # full run (about 2-3 minutes on 2 cores)
    .venv/bin/python -m bench.gossip --quick    # smoke run: N=3, few messages
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import trio
from libp2p.abc import INetStream, ISubscriptionAPI
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from prometheus_client import CollectorRegistry

from joynode import __version__, wire
from joynode.config import P2PSection
from joynode.keys import NodeKey
from joynode.messages import ServingStatus
from joynode.p2p import libp2p_compat, rpc
from joynode.p2p.gossip import GOSSIP_PROTOCOL, HEARTBEAT, GossipSigner, VerifiedGossip
from joynode.p2p.service import P2PService
from joynode.state import StateStore

LISTEN = "/ip4/127.0.0.1/tcp/0"
MAX_MESSAGE_BYTES = 256 * 1024
MESH_DEGREE_LOW = 4  # libp2p_compat._make_router
UNLIMITED = 1_000_000  # joynode's per-peer rate limits, out of the way of bench traffic
BENCH_VERSION = "bench"  # tells bench heartbeats from the nodes' own
ECHO_PROTOCOL = TProtocol("/joynode-bench/echo/1.0.0")
READY_TIMEOUT_S = 60.0
SETTLE_S = 1.0
ROUND_MAX_S = 5.0  # a round publishes at most rate x this many messages
IDLE_CPU = 0.10  # below this share of a core over IDLE_WINDOW_S, the network is idle
IDLE_WINDOW_S = 0.5
IDLE_MEASURE_S = 2.0  # the idle share measured once per cluster, subtracted from rounds
IDLE_MEASURE_MAX_S = 10.0  # or over two node heartbeats, when they come this often
IDLE_MAX_S = 60.0
RPC_WARMUP = 20


# ---- measuring


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """Linear-interpolated percentile of already sorted values (NaN if empty)."""
    if not ordered:
        return math.nan
    rank = fraction * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


class SubscriptionDrops(logging.Handler):
    """Counts messages py-libp2p drops because a subscription's queue (32) is full."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("fail to deliver message to subscription"):
            self.count += 1

    def install(self) -> None:
        pubsub_log = logging.getLogger("libp2p.pubsub.pubsub")
        pubsub_log.setLevel(logging.WARNING)
        pubsub_log.propagate = False  # counted here, not printed
        pubsub_log.addHandler(self)


class Round:
    """One burst of publishes: send times, and the first delivery of each message at each node."""

    def __init__(self, count: int, receivers: int) -> None:
        self.expected = count * receivers
        self.sent_ns: dict[int, int] = {}
        self.origin: dict[int, int] = {}
        self.delivered: set[tuple[int, int]] = set()
        self.late: set[tuple[int, int]] = set()
        self.latencies_ms: list[float] = []
        self.draining = True
        self.complete = trio.Event()

    def received(self, receiver: int, origin: int, seq: int, at_ns: int) -> None:
        sent = self.sent_ns.get(seq)
        key = (receiver, seq)
        if sent is None or self.origin[seq] != origin or key in self.delivered or key in self.late:
            return
        if not self.draining:
            self.late.add(key)
            return
        self.delivered.add(key)
        self.latencies_ms.append((at_ns - sent) / 1e6)
        if len(self.delivered) == self.expected:
            self.complete.set()


class Receipts:
    """Where receiving nodes report; deliveries outside the current round are ignored."""

    def __init__(self) -> None:
        self.current: Round | None = None

    def received(self, receiver: int, origin: int, seq: int) -> None:
        at_ns = time.perf_counter_ns()
        if self.current is not None:
            self.current.received(receiver, origin, seq, at_ns)


@dataclass(frozen=True)
class GossipResult:
    stack: str
    nodes: int
    mesh: float
    target_rate: float
    achieved_rate: float
    messages: int
    expected: int
    delivered: int
    late: int
    queue_drops: int
    cpu_ms_per_message: float  # the whole process: publisher, receivers and forwarders
    latencies_ms: list[float]

    @property
    def lost(self) -> int:
        return self.expected - self.delivered - self.late

    @property
    def not_in_time(self) -> float:
        """Share of expected deliveries not in within the drain period (late or lost)."""
        return 1.0 - self.delivered / self.expected

    @property
    def p50(self) -> float:
        return percentile(sorted(self.latencies_ms), 0.50)

    @property
    def p99(self) -> float:
        return percentile(sorted(self.latencies_ms), 0.99)


@dataclass(frozen=True)
class RpcResult:
    stack: str
    rtts_ms: list[float]

    @property
    def p50(self) -> float:
        return percentile(sorted(self.rtts_ms), 0.50)

    @property
    def p99(self) -> float:
        return percentile(sorted(self.rtts_ms), 0.99)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.rtts_ms) if self.rtts_ms else math.nan


# ---- the two kinds of cluster


class Cluster(Protocol):
    stack: str
    size: int
    receipts: Receipts

    async def publish(self, origin: int, seq: int) -> None: ...

    def mesh_sizes(self) -> list[int]: ...

    def ready(self) -> bool: ...

    async def ping(self, nonce: int) -> None:
        """One request round trip from node 1 to node 0."""


def _mesh_ready(connected: int, mesh: int, size: int) -> bool:
    return connected >= size - 1 and mesh >= min(MESH_DEGREE_LOW, size - 1)


def _idle() -> ServingStatus:
    return ServingStatus(models=(), queue_depth=0, capacity=0)


def _settings(size: int, heartbeat_interval_s: float, bootstrap: list[str]) -> P2PSection:
    return P2PSection(
        listen=[LISTEN],
        bootstrap=bootstrap,
        heartbeat_interval_s=heartbeat_interval_s,
        peer_timeout_s=min(5 * heartbeat_interval_s, 86_400),
        # Every node wants every other: discovery stops looking once it has them.
        max_peers=size - 1,
        max_message_bytes=MAX_MESSAGE_BYTES,
        gossip_rate=UNLIMITED,
        gossip_burst=UNLIMITED,
        rpc_rate=UNLIMITED,
        rpc_burst=UNLIMITED,
    )


def _bench_heartbeat(seq: int, addrs: list[str]) -> wire.Heartbeat:
    return wire.Heartbeat(
        seq=seq,
        version=BENCH_VERSION,
        protocol=GOSSIP_PROTOCOL,
        addrs=addrs,
        models=[],
        queue_depth=0,
        capacity=0,
    )


def _own_addrs(listen_addrs: list[str], peer_id: str) -> list[str]:
    """A node's addresses as its heartbeats announce them (no /p2p/ suffix)."""
    return [a.removesuffix(f"/p2p/{peer_id}") for a in listen_addrs][:16]


class JoynodeCluster:
    stack = "joynode"

    def __init__(self, services: list[P2PService], receipts: Receipts) -> None:
        self.size = len(services)
        self.services = services
        self.receipts = receipts
        self._addrs = [_own_addrs(s.listen_addrs(), s.peer_id) for s in services]

    def payload_bytes(self) -> int:
        """Size of one sealed bench heartbeat, so the baseline can publish as many bytes."""
        sample = _bench_heartbeat(2**40, self._addrs[0])
        network = P2PSection().network_id
        return len(GossipSigner(NodeKey.generate(), network).seal(HEARTBEAT, sample))

    async def publish(self, origin: int, seq: int) -> None:
        await self.services[origin].publish(HEARTBEAT, _bench_heartbeat(seq, self._addrs[origin]))

    def mesh_sizes(self) -> list[int]:
        return [s.status()["topics"][HEARTBEAT.name]["mesh_peers"] for s in self.services]

    def ready(self) -> bool:
        return all(
            _mesh_ready(status["connected_peers"], mesh, self.size)
            for status, mesh in zip(
                (s.status() for s in self.services), self.mesh_sizes(), strict=True
            )
        )

    async def ping(self, nonce: int) -> None:
        answer = await self.services[1].request(self.services[0].peer_id, wire.Ping(nonce))
        if answer != wire.Pong(nonce):
            raise RuntimeError(f"unexpected answer to ping {nonce}: {answer!r}")


async def _read_verified(
    receiver: int,
    gossip: trio.MemoryReceiveChannel[VerifiedGossip],
    origins: dict[bytes, int],
    receipts: Receipts,
) -> None:
    async for verified in gossip:
        message = verified.message
        if isinstance(message, wire.Heartbeat) and message.version == BENCH_VERSION:
            receipts.received(receiver, origins[verified.origin], message.seq)


@asynccontextmanager
async def joynode_cluster(
    size: int, heartbeat_interval_s: float, workdir: Path
) -> AsyncIterator[JoynodeCluster]:
    """``size`` P2PServices, nodes 1.. bootstrapping from node 0 only."""
    receipts = Receipts()
    origins: dict[bytes, int] = {}
    services: list[P2PService] = []
    async with trio.open_nursery() as databases:
        async with trio.open_nursery() as nodes:
            for index in range(size):
                state = StateStore(workdir / f"node{index}" / "state.db", __version__)
                await databases.start(state.run)
                key = NodeKey.generate()
                origins[ID.from_base58(key.peer_id).to_bytes()] = index
                send, receive = trio.open_memory_channel[VerifiedGossip](math.inf)
                bootstrap = services[0].listen_addrs() if services else []
                service = P2PService(
                    _settings(size, heartbeat_interval_s, bootstrap),
                    key,
                    state,
                    CollectorRegistry(),
                    _idle,
                    gossip_send={HEARTBEAT.name: send},
                )
                await nodes.start(service.run)
                nodes.start_soon(_read_verified, index, receive, origins, receipts)
                services.append(service)
            yield JoynodeCluster(services, receipts)
            # Nodes stop (and persist their peer tables) before their databases close.
            nodes.cancel_scope.cancel()
        databases.cancel_scope.cancel()


class BaselineCluster:
    stack = "baseline"

    def __init__(
        self, stacks: list[libp2p_compat.Libp2pStack], receipts: Receipts, payload_bytes: int
    ) -> None:
        self.size = len(stacks)
        self.stacks = stacks
        self.receipts = receipts
        self._padding = b"\x00" * max(0, payload_bytes - 8)

    async def publish(self, origin: int, seq: int) -> None:
        payload = seq.to_bytes(8, "big") + self._padding
        await self.stacks[origin].pubsub.publish(HEARTBEAT.name, payload)

    def mesh_sizes(self) -> list[int]:
        return [len(s.router.mesh.get(HEARTBEAT.name, ())) for s in self.stacks]

    def ready(self) -> bool:
        return all(
            _mesh_ready(len(s.host.get_connected_peers()), mesh, self.size)
            for s, mesh in zip(self.stacks, self.mesh_sizes(), strict=True)
        )

    async def ping(self, nonce: int) -> None:
        frame = _frame(wire.Ping(nonce))
        server = self.stacks[0].host.get_id()
        stream = await self.stacks[1].host.new_stream(server, [ECHO_PROTOCOL])
        try:
            await stream.write(frame)
            echoed = await rpc.read_exactly(stream, len(frame))
        finally:
            await stream.close()
        if echoed != frame:
            raise RuntimeError(f"echo of ping {nonce} came back changed")


def _frame(message: wire.Message) -> bytes:
    """A /joynet/rpc frame: 4-byte big-endian length, then the encoded message."""
    body = wire.encode(message)
    return len(body).to_bytes(4, "big") + body


async def _echo(stream: INetStream) -> None:
    """The baseline's request handler: read one frame, write it back, close."""
    try:
        header = await rpc.read_exactly(stream, 4)
        body = await rpc.read_exactly(stream, int.from_bytes(header, "big"))
        await stream.write(header + body)
    finally:
        await stream.close()


async def _read_raw(
    receiver: int, subscription: ISubscriptionAPI, origins: dict[bytes, int], receipts: Receipts
) -> None:
    while True:
        message = await subscription.get()
        origin = origins[message.from_id]
        if origin != receiver:
            receipts.received(receiver, origin, int.from_bytes(message.data[:8], "big"))


@asynccontextmanager
async def baseline_cluster(
    size: int, heartbeat_interval_s: float, payload_bytes: int
) -> AsyncIterator[BaselineCluster]:
    """``size`` bare libp2p stacks, connected all-to-all, publishing raw bytes."""
    receipts = Receipts()
    origins: dict[bytes, int] = {}
    async with AsyncExitStack() as exits:
        stacks: list[libp2p_compat.Libp2pStack] = []
        for index in range(size):
            stack = await exits.enter_async_context(
                libp2p_compat.running_stack(
                    NodeKey.generate().libp2p_key_pair(),
                    [LISTEN],
                    [],
                    max_rpc_bytes=MAX_MESSAGE_BYTES + 4096,  # as P2PService.run
                    max_peers=size - 1,
                )
            )
            stack.host.set_stream_handler(ECHO_PROTOCOL, _echo)
            origins[stack.host.get_id().to_bytes()] = index
            stacks.append(stack)
        async with trio.open_nursery() as readers:
            for index, stack in enumerate(stacks):
                subscription = await stack.pubsub.subscribe(HEARTBEAT.name)
                readers.start_soon(_read_raw, index, subscription, origins, receipts)
            for later, dialer in enumerate(stacks):
                for listener in stacks[:later]:
                    await dialer.host.connect(info_from_p2p_addr(listener.host.get_addrs()[0]))
            yield BaselineCluster(stacks, receipts, payload_bytes)
            readers.cancel_scope.cancel()


# ---- running the measurements


@dataclass(frozen=True)
class Plan:
    sizes: tuple[int, ...]
    rates: tuple[float, ...]
    messages: int
    pings: int
    drain_s: float
    heartbeat_interval_s: float


@dataclass
class Report:
    plan: Plan
    gossip: list[GossipResult] = field(default_factory=list)
    rpc: list[RpcResult] = field(default_factory=list)


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def wait_ready(cluster: Cluster) -> None:
    began = time.perf_counter()
    with trio.move_on_after(READY_TIMEOUT_S):
        # Polling: the state watched belongs to libp2p.
        while not cluster.ready():  # noqa: ASYNC110
            await trio.sleep(0.05)
        await trio.sleep(SETTLE_S)
        note(
            f"  {cluster.stack} N={cluster.size}: mesh ready in "
            f"{time.perf_counter() - began - SETTLE_S:.1f} s, sizes {cluster.mesh_sizes()}"
        )
        return
    raise RuntimeError(f"{cluster.stack} N={cluster.size}: mesh not formed in {READY_TIMEOUT_S} s")


async def cpu_share(seconds: float) -> float:
    """The share of a core this process (every node in it) uses over the next ``seconds``."""
    wall, cpu = time.perf_counter(), time.process_time()
    await trio.sleep(seconds)
    return (time.process_time() - cpu) / (time.perf_counter() - wall)


async def wait_idle() -> None:
    """Until this process is nearly idle: no backlog left from a round."""
    with trio.move_on_after(IDLE_MAX_S):
        while await cpu_share(IDLE_WINDOW_S) >= IDLE_CPU:
            pass
        return
    note(f"  still busy after {IDLE_MAX_S:g} s")


async def gossip_round(
    cluster: Cluster,
    rate: float,
    count: int,
    first_seq: int,
    drain_s: float,
    drops: SubscriptionDrops,
    idle_share: float = 0.0,
) -> GossipResult:
    """Publish ``count`` messages at ``rate``; CPU time above ``idle_share`` is charged to them."""
    await wait_idle()
    mesh = statistics.fmean(cluster.mesh_sizes())
    drops_before = drops.count
    wall, cpu = time.perf_counter(), time.process_time()
    round_ = Round(count, cluster.size - 1)
    cluster.receipts.current = round_
    start = last = trio.current_time()
    for k in range(count):
        await trio.sleep_until(start + k / rate)
        seq, origin = first_seq + k, k % cluster.size
        last = trio.current_time()
        round_.origin[seq] = origin
        round_.sent_ns[seq] = time.perf_counter_ns()
        await cluster.publish(origin, seq)
    with trio.move_on_after(drain_s):
        await round_.complete.wait()
    round_.draining = False
    await wait_idle()  # stragglers still arriving now count as late
    cluster.receipts.current = None
    busy_s = time.process_time() - cpu - idle_share * (time.perf_counter() - wall)
    achieved = (count - 1) / (last - start) if count > 1 and last > start else rate
    return GossipResult(
        stack=cluster.stack,
        nodes=cluster.size,
        mesh=mesh,
        target_rate=rate,
        achieved_rate=achieved,
        messages=count,
        expected=round_.expected,
        delivered=len(round_.delivered),
        late=len(round_.late),
        queue_drops=drops.count - drops_before,
        cpu_ms_per_message=max(0.0, busy_s) * 1000 / count,
        latencies_ms=round_.latencies_ms,
    )


async def measure_gossip(
    cluster: Cluster, plan: Plan, drops: SubscriptionDrops
) -> list[GossipResult]:
    await wait_ready(cluster)
    warmup = await gossip_round(cluster, 20.0, 2 * cluster.size, 0, plan.drain_s, drops)
    if warmup.delivered < warmup.expected:
        note(f"  warm-up: {warmup.delivered}/{warmup.expected} delivered")
    await wait_idle()
    heartbeats = 2 * plan.heartbeat_interval_s
    idle_share = await cpu_share(
        max(IDLE_MEASURE_S, heartbeats) if heartbeats <= IDLE_MEASURE_MAX_S else IDLE_MEASURE_S
    )
    results, seq = [], 2 * cluster.size
    for rate in plan.rates:
        count = max(2, min(plan.messages, round(rate * ROUND_MAX_S)))
        result = await gossip_round(cluster, rate, count, seq, plan.drain_s, drops, idle_share)
        seq += count
        note(
            f"  {cluster.stack} N={cluster.size} {rate:g} msg/s: {result.delivered}"
            f"/{result.expected} in time, p50 {result.p50:.2f} ms, p99 {result.p99:.2f} ms"
        )
        results.append(result)
    return results


async def measure_rpc(cluster: Cluster, count: int) -> RpcResult:
    await wait_idle()
    rtts = []
    for nonce in range(RPC_WARMUP + count):
        began = time.perf_counter_ns()
        await cluster.ping(nonce)
        if nonce >= RPC_WARMUP:
            rtts.append((time.perf_counter_ns() - began) / 1e6)
    note(f"  {cluster.stack} RPC: {count} round trips, p50 {percentile(sorted(rtts), 0.5):.2f} ms")
    return RpcResult(cluster.stack, rtts)


async def run(plan: Plan, workdir: Path) -> Report:
    libp2p_compat.quiet_library_logs(False)
    drops = SubscriptionDrops()
    drops.install()
    report = Report(plan)
    rpc_size = min(plan.sizes)
    heartbeat = plan.heartbeat_interval_s
    for size in plan.sizes:
        note(f"N={size}")
        async with joynode_cluster(size, heartbeat, workdir / f"n{size}") as nodes:
            report.gossip += await measure_gossip(nodes, plan, drops)
            payload_bytes = nodes.payload_bytes()
            if size == rpc_size:
                report.rpc.append(await measure_rpc(nodes, plan.pings))
        async with baseline_cluster(size, heartbeat, payload_bytes) as bare:
            report.gossip += await measure_gossip(bare, plan, drops)
            if size == rpc_size:
                report.rpc.append(await measure_rpc(bare, plan.pings))
    return report


# ---- output


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 and not math.isnan(a) and not math.isnan(b) else "n/a"


def _ms(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}"


def render(report: Report) -> str:
    plan = report.plan
    lines = [
        "Gossip: publish -> delivery at every other node (publishers take turns; "
        f"drain {plan.drain_s:g} s; node heartbeats every {plan.heartbeat_interval_s:g} s)",
        "",
        "| stack    |  N | mesh | target/s | achieved/s | msgs | in time     |  late |  lost "
        "| queue drops |  p50 ms |  p99 ms | CPU ms/msg |",
        "|----------|---:|-----:|---------:|-----------:|-----:|-------------|------:|------:"
        "|------------:|--------:|--------:|-----------:|",
    ]
    for g in report.gossip:
        lines.append(
            f"| {g.stack:<8} | {g.nodes:>2} | {g.mesh:>4.1f} | {g.target_rate:>8g} "
            f"| {g.achieved_rate:>10.1f} | {g.messages:>4} | {g.delivered:>5}/{g.expected:<5} "
            f"| {g.late:>5} | {g.lost:>5} | {g.queue_drops:>11} "
            f"| {_ms(g.p50):>7} | {_ms(g.p99):>7} | {g.cpu_ms_per_message:>10.2f} |"
        )
    lines += [
        "",
        "Gossip, joynode / baseline",
        "",
        "|  N | target/s | p50 ratio | p99 ratio | CPU/msg ratio | not in time: joynode "
        "| baseline |",
        "|---:|---------:|----------:|----------:|--------------:|---------------------:"
        "|---------:|",
    ]
    by_key = {(g.stack, g.nodes, g.target_rate): g for g in report.gossip}
    for size in plan.sizes:
        for rate in plan.rates:
            j, b = by_key.get(("joynode", size, rate)), by_key.get(("baseline", size, rate))
            if j is None or b is None:
                continue
            lines.append(
                f"| {size:>2} | {rate:>8g} | {_ratio(j.p50, b.p50):>9} "
                f"| {_ratio(j.p99, b.p99):>9} "
                f"| {_ratio(j.cpu_ms_per_message, b.cpu_ms_per_message):>13} "
                f"| {j.not_in_time:>20.1%} | {b.not_in_time:>8.1%} |"
            )
    if report.rpc:
        lines += [
            "",
            f"RPC round trip, node 1 -> node 0 of N={min(plan.sizes)}, {plan.pings} sequential "
            f"(after {RPC_WARMUP} warm-up): joynode Ping/Pong vs raw stream echo",
            "",
            "| stack    | p50 ms | p99 ms | mean ms |",
            "|----------|-------:|-------:|--------:|",
        ]
        for r in report.rpc:
            lines.append(f"| {r.stack:<8} | {r.p50:>6.2f} | {r.p99:>6.2f} | {r.mean:>7.2f} |")
        if len(report.rpc) == 2:
            ours, bare = report.rpc
            lines.append(
                f"| ratio    | {_ratio(ours.p50, bare.p50):>6} | {_ratio(ours.p99, bare.p99):>6} "
                f"| {_ratio(ours.mean, bare.mean):>7} |"
            )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> Plan:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gossip",
        description="Gossip delivery latency/loss and RPC round trips: joynode vs bare libp2p.",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: N=3, few messages")
    parser.add_argument("--sizes", type=int, nargs="+", help="node counts (default 3 6 10)")
    parser.add_argument("--rates", type=float, nargs="+", help="msg/s (default 10 50 200)")
    parser.add_argument(
        "--messages",
        type=int,
        help=f"messages per rate, at most rate x {ROUND_MAX_S:g} s (default 200; quick 20)",
    )
    parser.add_argument("--pings", type=int, help="RPC round trips (default 500; quick 50)")
    parser.add_argument(
        "--drain", type=float, default=5.0, help="seconds a delivery may take (default 5)"
    )
    parser.add_argument(
        "--heartbeat-interval",
        type=float,
        default=3600.0,
        help="p2p.heartbeat_interval_s of every node, also the GossipSub heartbeat "
        "(default 3600: the nodes' own heartbeats stay out of the figures; 3 is as deployed)",
    )
    args = parser.parse_args(argv)
    sizes = args.sizes or ([3] if args.quick else [3, 6, 10])
    if min(sizes) < 2:
        parser.error("every size must be at least 2 nodes")
    return Plan(
        sizes=tuple(sizes),
        rates=tuple(args.rates or [10.0, 50.0, 200.0]),
        messages=args.messages or (20 if args.quick else 200),
        pings=args.pings or (50 if args.quick else 500),
        drain_s=args.drain,
        heartbeat_interval_s=args.heartbeat_interval,
    )


def main(argv: Sequence[str] | None = None) -> None:
    plan = parse_args(argv)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="joynode-bench-") as workdir:
        report = trio.run(run, plan, Path(workdir))
    print(render(report))
    print(f"\n(total {time.perf_counter() - began:.0f} s)")


if __name__ == "__main__":
    main()
