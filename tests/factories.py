"""Factories for node homes, configs and running nodes, shared by the tests."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import inspect
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from joynode import wire
from joynode.abc import RequestHandler
from joynode.cli import main as joynode_main
from joynode.config import Config, load_config
from joynode.endpoints import Endpoints
from joynode.inference.engine import VllmEngine
from joynode.keys import NodeKey
from joynode.node import Node
from joynode.p2p import libp2p_compat
from joynode.p2p.peers import PeerState, PeerTable
from joynode.p2p.rpc import RpcFailure
from joynode.secret_files import ControlToken

LOOPBACK_PORT_ZERO = "127.0.0.1:0"


# py-libp2p 0.8.1 leaves a dialed TCP socket open when a node with live
# connections is torn down (traced to the swarm's dial path; the socket is
# closed when collected). Tests that run libp2p hosts in-process tolerate that
# one warning; every other test keeps failing on any unclosed resource. See
# joynode/p2p/libp2p_compat.py, item 8.
def close_leaked_sockets() -> None:
    """Collect what a stopped in-process node left behind (see LIBP2P_TEARDOWN_LEAK).

    Needed before restarting a node in the same process: until its leaked
    socket is collected, peers keep the old connection open and send to it.
    A real restart (a new process) closes the socket with the process.
    """
    gc.collect()


LIBP2P_TEARDOWN_LEAK = [
    pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning"),
    pytest.mark.filterwarnings(
        "ignore:Exception ignored in. <socket.socket:pytest.PytestUnraisableExceptionWarning"
    ),
]


@dataclass(frozen=True)
class NodeHome:
    """A node home made by ``joynode init``, listening on kernel-chosen ports."""

    dir: Path

    @property
    def config_path(self) -> Path:
        return self.dir / "joynode.toml"

    @property
    def config(self) -> Config:
        return load_config(self.config_path)

    @property
    def key(self) -> NodeKey:
        return NodeKey.load(self.config.node.key_file)

    @property
    def token(self) -> ControlToken:
        return ControlToken.load(self.config.control.token_file)

    def endpoints(self) -> Endpoints | None:
        return Endpoints.read(self.config.node.data_dir)

    def set(self, section: str, key: str, toml_value: str) -> None:
        """Replace ``key`` in ``[section]`` of the config file (a raw TOML value)."""
        lines = self.config_path.read_text().splitlines()
        current, out, done = "", [], False
        for line in lines:
            if line.startswith("["):
                current = line.strip("[]")
            if current == section and line.split("=")[0].strip() == key:
                line, done = f"{key} = {toml_value}", True
            out.append(line)
        assert done, f"{section}.{key} not in config"
        self.config_path.write_text("\n".join(out) + "\n")


def make_home(path: Path) -> NodeHome:
    assert joynode_main(["init", str(path)]) == 0
    home = NodeHome(path)
    home.set("control", "listen", f'"{LOOPBACK_PORT_ZERO}"')
    home.set("http", "listen", f'"{LOOPBACK_PORT_ZERO}"')
    home.set("p2p", "listen", '["/ip4/127.0.0.1/tcp/0"]')
    return home


@asynccontextmanager
async def running_node(
    home: NodeHome, engines: Mapping[str, VllmEngine] | None = None
) -> AsyncIterator[Node]:
    """A node in this trio run, started and ready; stopped on exit."""
    node = Node(home.config, home.key, home.token, engines=engines)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        yield node
        await node.request_shutdown("test finished")


class NodeProcess:
    """A real ``joynode run`` subprocess with its output captured to a file."""

    def __init__(self, home: NodeHome, *extra_args: str) -> None:
        self.home = home
        self.log_path = home.dir / "node.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "joynode",
                    "run",
                    "--config",
                    str(home.config_path),
                    *extra_args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                # Its own process group, so kill() takes whatever it started at
                # once (its children also die with it by themselves: tether.py).
                start_new_session=True,
            )

    def wait_ready(self, within_s: float = 30.0) -> Endpoints:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            endpoints = self.home.endpoints()
            if endpoints is not None and endpoints.pid == self.proc.pid:
                return endpoints
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"node not ready in {within_s} s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the node and everything it started (its process group)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def node_process(
    home: NodeHome, *extra_args: str, ready_within_s: float = 30.0
) -> Iterator[NodeProcess]:
    process = NodeProcess(home, *extra_args)
    try:
        process.wait_ready(ready_within_s)
        yield process
    finally:
        process.kill()


def run_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run the ``joynode`` command line in a subprocess, as an operator would."""
    return subprocess.run(
        [sys.executable, "-m", "joynode", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def fast_p2p(home: NodeHome, *, bootstrap: list[str] | None = None) -> NodeHome:
    """Short intervals so multi-node tests settle in seconds."""
    home.set("p2p", "heartbeat_interval_s", "0.5")
    home.set("p2p", "peer_timeout_s", "3.0")
    home.set("p2p", "discovery_interval_s", "2.0")
    home.set("p2p", "reconnect_backoff_max_s", "2.0")
    if bootstrap is not None:
        home.set("p2p", "bootstrap", "[" + ", ".join(f'"{a}"' for a in bootstrap) + "]")
    return home


async def wait_for(
    predicate: Callable[[], bool | Awaitable[bool]], within_s: float, what: str
) -> None:
    """Poll ``predicate`` (plain or async) until it holds; fail with ``what`` after ``within_s``.

    Polling, not an Event: what is watched belongs to libp2p, the actors or
    another process.
    """
    with trio.move_on_after(within_s):
        while True:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            await trio.sleep(0.05)
    raise AssertionError(f"not within {within_s} s: {what}")


def pseudo_random(size: int, seed: str) -> bytes:
    """Deterministic bytes that neither compress nor repeat from one 256 KiB chunk to the next."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha512(f"{seed}:{counter}".encode()).digest() * 64
        counter += 1
    return bytes(out[:size])


@asynccontextmanager
async def raw_peer() -> AsyncIterator[libp2p_compat.Libp2pStack]:
    """A bare libp2p host with the node's stack but none of its checks: it sends what we say."""
    async with libp2p_compat.running_stack(
        NodeKey.generate().libp2p_key_pair(),
        ["/ip4/127.0.0.1/tcp/0"],
        [],
        max_rpc_bytes=1 << 20,
        max_peers=8,
    ) as stack:
        yield stack


# ---- the process tree, from /proc


@dataclass(frozen=True)
class Running:
    """A process as seen in /proc: its pid and start time (together, one process ever)."""

    pid: int
    started: int
    command: str

    def alive(self) -> bool:
        seen = proc_stat(self.pid)
        return seen is not None and seen[2] == self.started and seen[0] != "Z"


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """A process's (state, parent pid, start time), or None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), int(fields[19])


def descendants(root: int) -> list[Running]:
    """Every process under ``root`` now, found by walking /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (seen := proc_stat(int(entry.name))) is not None:
            children.setdefault(seen[1], []).append(int(entry.name))
    found, stack = [], list(children.get(root, []))
    while stack:
        pid = stack.pop()
        seen = proc_stat(pid)
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if seen is not None:
            found.append(Running(pid, seen[2], command.strip()))
            stack.extend(children.get(pid, []))
    return found


def sees_all_serving(node: Node, nodes: Sequence[Node], model: str) -> bool:
    """Whether ``node`` sees every other of ``nodes`` up and serving ``model`` (its name)."""
    model_id = node.inference.model_id(model)
    records = {r.peer_id: r for r in node.p2p.peers.records()}
    return all(
        n.p2p.peer_id in records
        and records[n.p2p.peer_id].state is PeerState.UP
        and model_id in records[n.p2p.peer_id].models
        for n in nodes
        if n is not node
    )


class NoPeers:
    """A ``PeerRequests`` with nobody to ask (each request fails); handlers are kept, for
    a test to call."""

    def __init__(self) -> None:
        self.peers = PeerTable(60.0)
        self.handlers: dict[type[wire.Message], RequestHandler] = {}

    def handle_requests(
        self, kind: type[wire.Message], handler: RequestHandler, *, timeout_s: float | None = None
    ) -> None:
        self.handlers[kind] = handler

    async def request(
        self, peer_id: str, message: wire.Message, *, timeout_s: float | None = None
    ) -> wire.AnyMessage:
        await trio.lowlevel.checkpoint()
        raise RpcFailure(f"no peer {peer_id}")
