"""The devnet's processes, kept running: nodes and anvil come back when they die.

A node that exits while the devnet runs (a crash, an out-of-memory kill, a
``kill -9`` to try fault tolerance) gets one line on the terminal naming its
exit status and log; whatever it left running in its session (vLLM's engine
core, say) is killed, and it is started again after a backoff (1 s, doubling
to 30 s; back to 1 s once it has stayed up a minute), on the same ports (new
ones if it failed to start on them) and with the other nodes as bootstrap
peers, so it catches up as any restarted node does: jobs from its SQLite
state, chain events from its cursor. anvil is restarted the same way on the
same address from its state file. The other nodes keep running throughout;
the devnet stops only on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import trio
from rich.markup import escape

from joynode.chain.anvil import AnvilError, running_anvil
from joynode.console import stderr
from joynode.devnet.network import DevnetNetwork
from joynode.endpoints import Endpoints
from joynode.keys import NodeKey
from joynode.secret_files import ControlToken
from joynode.tether import tethered

BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
STABLE_S = 60.0  # up this long, a process's next exit starts the backoff over
START_TIMEOUT_S = 900.0  # first start: the model fetched from node 0 and a vLLM engine per node
STOP_TIMEOUT_S = 15.0
ORPHAN_GRACE_S = 3.0
REAP_TIMEOUT_S = 10.0
KEPT_EXITS = 100  # per process, in the status file

State = Literal["starting", "up", "down", "stopped"]


class DevnetError(Exception):
    """The devnet cannot start or a node died; the message says which and where its log is."""


@dataclass(frozen=True)
class Exit:
    """One unexpected exit of a devnet process."""

    at: float
    pid: int | None  # (None: anvil did not start again)
    status: str  # "killed by SIGKILL", "exited with status 1"
    leftovers: int  # processes it left in its session, killed by the devnet

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "pid": self.pid, "status": self.status, "leftovers": self.leftovers}


@dataclass
class Supervised:
    """What the status file says about a process the devnet keeps running."""

    log_path: Path
    state: State = "stopped"
    since: float = field(default_factory=time.time)
    pid: int | None = None
    restarts: int = 0
    exits: list[Exit] = field(default_factory=list)

    def set_state(self, state: State, pid: int | None = None) -> None:
        self.state, self.since, self.pid = state, time.time(), pid

    def record_exit(self, status: str, leftovers: int) -> None:
        self.exits = [*self.exits, Exit(time.time(), self.pid, status, leftovers)][-KEPT_EXITS:]

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "since": self.since,
            "pid": self.pid,
            "restarts": self.restarts,
            "exits": [e.to_json() for e in self.exits],
            "log": str(self.log_path),
        }


@dataclass
class DevnetNode:
    index: int
    home: Path
    key: NodeKey
    token: ControlToken
    process: trio.Process | None = None
    endpoints: Endpoints | None = None
    supervised: Supervised = field(init=False)
    new_ports: bool = False  # after a failed start: let the kernel choose again

    def __post_init__(self) -> None:
        self.supervised = Supervised(self.log_path)

    @property
    def config_path(self) -> Path:
        return self.home / "joynode.toml"

    @property
    def log_path(self) -> Path:
        return self.home / "node.log"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    def control_url(self) -> str:
        assert self.endpoints is not None
        return self.endpoints.control_url

    def ports(self) -> tuple[int, int, int]:
        """Control, http and p2p ports of its last start (0, 0, 0: the kernel's choice)."""
        if self.endpoints is None or self.new_ports:
            return 0, 0, 0
        http = urlsplit(self.endpoints.http_url).port if self.endpoints.http_url else 0
        p2p = int(self.endpoints.p2p_addrs[0].split("/")[4]) if self.endpoints.p2p_addrs else 0
        return urlsplit(self.endpoints.control_url).port or 0, http or 0, p2p

    def bootstrap_addrs(self) -> list[str]:
        if self.endpoints is None:
            return []
        suffix = f"/p2p/{self.key.peer_id}"
        return [a if a.endswith(suffix) else a + suffix for a in self.endpoints.p2p_addrs]

    def summary(self) -> dict[str, Any]:
        return {
            "node": self.index,
            "address": self.key.address,
            "peer_id": self.key.peer_id,
            "control": self.endpoints.control_url if self.endpoints else None,
            "dashboard": (self.endpoints.http_url or "") + "/" if self.endpoints else None,
            "config": str(self.config_path),
            "log": str(self.log_path),
            **self.supervised.to_json(),
        }


def describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def session_members(session: int) -> list[int]:
    """Live processes (not zombies) in ``session`` other than its leader: a node's children."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == session:
            continue
        with contextlib.suppress(OSError):
            if os.getsid(int(entry)) != session:
                continue
            stat = Path(f"/proc/{entry}/stat").read_text()
            if stat[stat.rindex(")") + 2] != "Z":
                found.append(int(entry))
    return found


async def kill_session(session: int) -> int:
    """What a dead node left running in its ``session``: killed, waited for, counted.

    Children that go by themselves once their parent is gone (within
    ``ORPHAN_GRACE_S``) are not counted; whatever is still there then is.
    """
    with trio.move_on_after(ORPHAN_GRACE_S):
        while session_members(session):  # noqa: ASYNC110 (other processes: nothing to wait on)
            await trio.sleep(0.1)
    left = session_members(session)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with trio.move_on_after(REAP_TIMEOUT_S):  # (a big process takes a while to unmap)
        while session_members(session):  # noqa: ASYNC110
            await trio.sleep(0.1)
    return len(left)


def _in_session(pid: int, session: int) -> bool:
    """Whether ``pid`` runs in ``session``: the node of this start, not one from before."""
    try:
        return os.getsid(pid) == session
    except ProcessLookupError:
        return False


def _backoff(supervised: Supervised, failures: int) -> tuple[float, int]:
    """The wait before the next start, and the failure count it makes."""
    if supervised.state == "up" and time.time() - supervised.since >= STABLE_S:
        failures = 0
    return BACKOFF_S[min(failures, len(BACKOFF_S) - 1)], failures + 1


def _say_down(what: str, supervised: Supervised, status: str, leftovers: int, delay: float) -> None:
    left = f"; {leftovers} process(es) it left running killed" if leftovers else ""
    stderr.print(
        f"[yellow]{what} is down[/yellow]: {escape(status)}; log {escape(str(supervised.log_path))}"
        f"{left}; restarting in {delay:.0f} s",
        soft_wrap=True,
    )


class NodeSupervisor:
    """Starts the nodes, restarts one that exits, and stops them all (``running``)."""

    def __init__(
        self,
        nodes: list[DevnetNode],
        network: DevnetNetwork,
        write_config: Callable[[DevnetNode], None],
        changed: Callable[[], None],
        nursery: trio.Nursery,
    ) -> None:
        self._nodes = nodes
        self._network = network
        self._write_config = write_config
        self._changed = changed
        self._nursery = nursery
        self._stopping = False

    @classmethod
    @asynccontextmanager
    async def running(
        cls,
        nodes: list[DevnetNode],
        network: DevnetNetwork,
        write_config: Callable[[DevnetNode], None],
        changed: Callable[[], None],
    ) -> AsyncIterator[NodeSupervisor]:
        async with trio.open_nursery() as nursery:
            supervisor = cls(nodes, network, write_config, changed, nursery)
            try:
                yield supervisor
            finally:
                with trio.CancelScope(shield=True):
                    await supervisor._stop_all()
                nursery.cancel_scope.cancel()

    async def start(self, node: DevnetNode) -> None:
        """Start ``node`` and wait until it is ready; from then on it is kept running.

        A first start that fails is the devnet's failure (``DevnetError``).
        """
        await self._launch(node)
        self._nursery.start_soon(self._keep_running, node)

    async def _launch(self, node: DevnetNode) -> None:
        supervised = node.supervised
        self._write_config(node)
        (node.data_dir / "endpoints.json").unlink(missing_ok=True)  # a crash leaves one
        argv = [sys.executable, "-m", "joynode", "run", "--config", str(node.config_path)]
        with node.log_path.open("ab") as log:
            node.process = process = await trio.lowlevel.open_process(
                # Tethered: a devnet killed with SIGKILL takes its nodes with it.
                tethered(self._network.command(node.index, argv)),
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own session: Ctrl-C reaches the devnet only, which then stops the
                # nodes in order, and whatever a dead node leaves behind can be found.
                start_new_session=True,
            )
        supervised.set_state("starting", process.pid)
        self._changed()
        with trio.move_on_after(START_TIMEOUT_S):
            while (endpoints := Endpoints.read(node.data_dir)) is None or not _in_session(
                endpoints.pid, process.pid
            ):
                if process.returncode is not None:
                    raise DevnetError(
                        f"node {node.index} {describe_exit(process.returncode)} at start; "
                        f"see {node.log_path}"
                    )
                await trio.sleep(0.2)
            node.endpoints, node.new_ports = endpoints, False
            supervised.set_state("up", process.pid)
            self._changed()
            return
        process.kill()
        raise DevnetError(
            f"node {node.index} not ready in {START_TIMEOUT_S:.0f} s; see {node.log_path}"
        )

    async def _keep_running(self, node: DevnetNode) -> None:
        supervised = node.supervised
        failures = 0
        while True:
            assert node.process is not None
            code = await node.process.wait()
            if self._stopping:
                return
            leftovers = await kill_session(node.process.pid)
            delay, failures = _backoff(supervised, failures)
            status = describe_exit(code)
            supervised.record_exit(status, leftovers)
            supervised.set_state("down")
            self._changed()
            _say_down(f"node {node.index}", supervised, status, leftovers, delay)
            await trio.sleep(delay)
            down_since = supervised.since
            supervised.restarts += 1
            try:
                await self._launch(node)
            except DevnetError:
                # (one of its ports may have been taken meanwhile: no longer insist on them)
                node.new_ports = True
                continue  # the next turn says how it exited
            stderr.print(
                f"[green]node {node.index} is up again[/green] (restart {supervised.restarts}, "
                f"{time.time() - down_since:.0f} s after it went down)",
                soft_wrap=True,
            )

    async def _stop_all(self) -> None:
        """SIGTERM to every node (each stops cleanly), then SIGKILL what is left of them."""
        self._stopping = True
        running = [n for n in self._nodes if n.process is not None and n.process.returncode is None]
        for node in running:
            assert node.process is not None
            node.process.send_signal(signal.SIGTERM)  # (the tether passes it on)
        with trio.move_on_after(STOP_TIMEOUT_S):
            for node in running:
                assert node.process is not None
                await node.process.wait()
        for node in self._nodes:
            if node.process is None:
                continue
            if node.process.returncode is None:
                node.process.kill()
                await node.process.wait()
            await kill_session(node.process.pid)
            node.supervised.set_state("stopped")
        self._changed()


class ChainKeeper:
    """anvil, restarted on the same address from its state file whenever it exits.

    Its task is shielded from the devnet's cancellation: the devnet stops it
    (``stop``) after the nodes, so that none of them sees the chain go first.
    """

    def __init__(
        self,
        network: DevnetNetwork,
        state_file: Path,
        log_path: Path,
        changed: Callable[[], None],
        chain_id: int = 31337,
    ) -> None:
        self._network = network
        self._chain_id = chain_id
        self._state_file = state_file
        self.supervised = Supervised(log_path)
        self._changed = changed
        self._scope = trio.CancelScope(shield=True)
        self.url: str | None = None

    def stop(self) -> None:
        self._scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        supervised = self.supervised
        failures, port = 0, 0
        with self._scope:
            while True:
                try:
                    async with running_anvil(
                        host=self._network.chain_host,
                        chain_id=self._chain_id,
                        port=port,
                        state_file=self._state_file,
                        log_file=supervised.log_path,
                    ) as anvil:
                        if self.url is None:
                            task_status.started(anvil.url)
                        elif supervised.restarts:
                            stderr.print(
                                f"[green]anvil is up again[/green] at {anvil.url} "
                                f"(restart {supervised.restarts})",
                                soft_wrap=True,
                            )
                        self.url, port = anvil.url, urlsplit(anvil.url).port or 0
                        supervised.set_state("up", anvil.process.pid)
                        self._changed()
                        code = await anvil.process.wait()
                except AnvilError as exc:
                    if self.url is None:
                        raise DevnetError(str(exc)) from None
                    status = f"did not start again: {exc}"
                else:
                    status = describe_exit(code)
                delay, failures = _backoff(supervised, failures)
                supervised.record_exit(status, 0)
                supervised.set_state("down")
                self._changed()
                _say_down(
                    "anvil", supervised, f"{status} (restarting from its saved state)", 0, delay
                )
                await trio.sleep(delay)
                supervised.restarts += 1
