"""A js-libp2p peer for interop tests (tests/js_gossip_peer.mjs), driven from trio.

The peer runs under Node with the npm packages of package.json (``make
install``). It reports what happens as JSON lines, which a reader task keeps
in ``events``; tests poll them with ``wait_for``. Only 127.0.0.1 is used.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from tests.factories import wait_for

JS_PEER_SCRIPT = Path(__file__).with_name("js_gossip_peer.mjs")
READY_TIMEOUT_S = 60.0  # Node start, imports and the dial, on a loaded 2-core machine
STOP_GRACE_S = 10.0

Event = dict[str, Any]


class JsPeer:
    """One running js peer: its events so far, and commands to it."""

    def __init__(self, process: trio.Process, log_path: Path) -> None:
        assert process.stdin is not None
        self.process = process
        self.log_path = log_path
        self.events: list[Event] = []
        self._stdin = process.stdin
        self.peer_id = ""

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def find(self, kind: str, where: Callable[[Event], bool] = lambda _: True) -> list[Event]:
        return [e for e in self.events if e["event"] == kind and where(e)]

    async def wait_event(
        self, kind: str, within_s: float, what: str, where: Callable[[Event], bool] = lambda _: True
    ) -> Event:
        """The first event of ``kind`` matching ``where``, waiting for it if need be."""
        try:
            await wait_for(lambda: bool(self.find(kind, where)) or self._exited(), within_s, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\njs peer log:\n{self.log_tail()}") from None
        found = self.find(kind, where)
        if not found:
            raise AssertionError(f"js peer exited before {what}:\n{self.log_tail()}")
        return found[0]

    def _exited(self) -> bool:
        return self.process.returncode is not None

    async def close_input(self) -> None:
        """End the peer's command loop; it then stops libp2p and exits."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._stdin.aclose()

    async def send(self, **command: object) -> None:
        await self._stdin.send_all(json.dumps(command).encode() + b"\n")

    async def publish_signed(self, network: str, topic: str, message: dict[str, object]) -> Event:
        """Seal ``message`` with the peer's own key for ``network`` and publish it."""
        return await self._publish(
            op="publish_signed", network=network, topic=topic, message=message
        )

    async def publish_signed_to(
        self, peer_id: str, network: str, topic: str, message: dict[str, object]
    ) -> Event:
        """Publish until ``peer_id`` is among the recipients.

        js gossipsub reports a subscriber as soon as its subscription arrives,
        but sends to it only once its own outbound stream to that peer is open,
        a moment later; until then a publish reaches nobody.
        """
        with trio.move_on_after(30):
            while True:
                published = await self.publish_signed(network, topic, message)
                if peer_id in published["recipients"]:
                    return published
                await trio.sleep(0.2)
        raise AssertionError(f"js peer never sent to {peer_id}:\n{self.log_tail()}")

    async def publish_raw(self, topic: str, data: bytes) -> Event:
        return await self._publish(op="publish_raw", topic=topic, hex=data.hex())

    async def _publish(self, **command: object) -> Event:
        before = len(self.find("published")) + len(self.find("error"))
        await self.send(**command)
        await wait_for(
            lambda: len(self.find("published")) + len(self.find("error")) > before,
            30,
            f"js peer answers {command['op']}",
        )
        errors = self.find("error")
        assert not errors, f"js peer: {errors[-1]['message']}\n{self.log_tail()}"
        return self.find("published")[-1]

    async def read_events(self) -> None:
        assert self.process.stdout is not None
        buffer = b""
        async for chunk in self.process.stdout:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            self.events += [json.loads(line) for line in lines if line.strip()]


@asynccontextmanager
async def running_js_peer(
    dial: str, topics: Sequence[str], *, key_type: str, log_dir: Path
) -> AsyncIterator[JsPeer]:
    """A js peer connected to ``dial`` and subscribed to ``topics``; stopped on exit."""
    log_path = log_dir / f"js_peer_{key_type}.log"
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        process = await trio.lowlevel.open_process(
            [
                "node",
                str(JS_PEER_SCRIPT),
                "--key",
                key_type,
                "--dial",
                dial,
                *(arg for topic in topics for arg in ("--topic", topic)),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log_fd,
        )
    finally:
        os.close(log_fd)
    peer = JsPeer(process, log_path)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.read_events)
            try:
                ready = await peer.wait_event("ready", READY_TIMEOUT_S, "js peer connected")
                peer.peer_id = ready["peer_id"]
                yield peer
            finally:
                with trio.CancelScope(shield=True):
                    await peer.close_input()
                    with trio.move_on_after(STOP_GRACE_S):
                        await process.wait()
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
            await peer.close_input()
            assert process.stdout is not None
            await process.stdout.aclose()
