"""ZoKrates from Python: a warm ``circuits/zokrates.mjs worker`` process.

No native ZoKrates installs here; zokrates-js (ZoKrates 0.8 compiled to
WebAssembly, pinned in package-lock.json) does, and ``circuits/zokrates.mjs``
wraps it as a command line and as a worker reading one JSON request per line.
Starting Node and the wasm costs 0.6 to 1.3 s here, so the node keeps one
worker and sends it every request; the wasm runs one request at a time, so
requests are serialised here too. Field elements travel as decimal strings.
The worker runs ``tethered`` to the node, so it never outlives a killed node.
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from types import TracebackType
from typing import Any

import trio

from joynode.tether import tethered

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
CLI = REPO / "circuits" / "zokrates.mjs"
MAX_LINE = 64 << 20  # a reply line (a proof, a witness's outputs) is far smaller


class ZokratesError(Exception):
    """ZoKrates refused a request (a failed assertion, a type error, a bad file)."""


class ZokratesWorker:
    """One ``zokrates.mjs worker`` process; ``call`` is one request, one reply.

    Use as an async context manager; the process is stopped on exit.
    """

    def __init__(self, cli: Path = CLI) -> None:
        self._cli = cli
        self._process: trio.Process | None = None
        self._buffer = bytearray()
        self._lock = trio.Lock()
        self._next_id = 0
        self.requests = 0

    async def __aenter__(self) -> ZokratesWorker:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        self._process = await trio.lowlevel.open_process(
            tethered(["node", str(self._cli), "worker"]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=REPO,
        )
        ready = json.loads(await self._read_line())
        if not ready.get("ready"):
            raise ZokratesError(f"the ZoKrates worker did not start: {ready}")

    async def aclose(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        with trio.CancelScope(shield=True):
            await _close(process)

    async def call(self, command: str, **options: Any) -> dict[str, Any]:
        """Run ``command`` (compile, setup, compute-witness, generate-proof, prove,
        verify, export-verifier) with ``options``; its result, or ``ZokratesError``."""
        async with self._lock:
            process = self._process
            if process is None or process.stdin is None:
                raise ZokratesError("the ZoKrates worker is not running")
            self._next_id += 1
            request = {"id": self._next_id, "command": command, "options": _paths(options)}
            answered = False
            try:
                await process.stdin.send_all(json.dumps(request).encode() + b"\n")
                reply = json.loads(await self._read_line())
                answered = True
            finally:
                if not answered:
                    # Cancelled (or failed) between request and reply: the reply would
                    # come out of turn later, so this worker is done; start another.
                    self._process = None
                    self._buffer.clear()
                    process.kill()
                    with trio.CancelScope(shield=True):
                        await _close(process)
            self.requests += 1
        if reply.get("id") != request["id"]:
            raise ZokratesError(f"the ZoKrates worker answered out of turn: {reply}")
        if not reply.get("ok"):
            raise ZokratesError(str(reply.get("error")))
        result: dict[str, Any] = reply["result"]
        return result

    async def _read_line(self) -> bytes:
        assert self._process is not None
        assert self._process.stdout is not None
        while b"\n" not in self._buffer:
            chunk = await self._process.stdout.receive_some(1 << 20)
            if not chunk:
                raise ZokratesError("the ZoKrates worker exited")
            self._buffer += chunk
            if len(self._buffer) > MAX_LINE:
                raise ZokratesError("the ZoKrates worker sent an overlong line")
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        return line


def solidity_proof(proof: dict[str, Any]) -> tuple[Any, ...]:
    """A zokrates-js Groth16 proof (JSON) as the exported verifiers' ``Proof`` struct: (a, b, c)."""
    points = proof["proof"]

    def h(value: str) -> int:
        return int(value, 16)

    return (
        tuple(map(h, points["a"])),
        tuple(tuple(map(h, pair)) for pair in points["b"]),
        tuple(map(h, points["c"])),
    )


def _paths(options: dict[str, Any]) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in options.items()}


async def _close(process: trio.Process) -> None:
    """End the worker: end of input (it exits), or a kill if it does not; close its pipes."""
    if process.stdin is not None:
        await process.stdin.aclose()
    with trio.move_on_after(5):
        await process.wait()
    if process.returncode is None:
        process.kill()
        await process.wait()
    if process.stdout is not None:
        await process.stdout.aclose()
