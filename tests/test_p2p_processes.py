"""Four real ``joynode run`` processes: discovery from one bootstrap peer, liveness, rejoin."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from joynode.control.client import ControlClient
from joynode.control.jsonrpc import RpcError
from joynode.p2p.gossip import HEARTBEAT
from tests.factories import NodeHome, NodeProcess, fast_p2p, make_home, wait_for

pytestmark = pytest.mark.slow


async def call(home: NodeHome, method: str) -> Any:
    endpoints = home.endpoints()
    assert endpoints is not None
    async with ControlClient.connect(endpoints.control_url, home.token.value) as client:
        return await client.call(method)


async def peer_states(home: NodeHome) -> dict[str, dict[str, Any]]:
    return {p["peer_id"]: p for p in await call(home, "peers.list")}


@pytest.fixture
def four_homes(tmp_path: Path) -> list[NodeHome]:
    return [fast_p2p(make_home(tmp_path / name)) for name in "abcd"]


@pytest.fixture
def processes() -> Iterator[list[NodeProcess]]:
    started: list[NodeProcess] = []
    yield started
    for process in started:
        process.kill()


async def test_four_processes_discover_fail_and_rejoin(
    four_homes: list[NodeHome], processes: list[NodeProcess]
) -> None:
    a, b, c, d = four_homes
    processes.append(NodeProcess(a))
    a_endpoints = processes[0].wait_ready()
    for home in (b, c, d):
        home.set("p2p", "bootstrap", f'["{a_endpoints.p2p_addrs[0]}"]')
        processes.append(NodeProcess(home))
    for process in processes[1:]:
        process.wait_ready()
    ids = {home.key.peer_id: home for home in four_homes}

    async def all_see_all_up() -> bool:
        for home in four_homes:
            states = await peer_states(home)
            expected = set(ids) - {home.key.peer_id}
            if {p for p, s in states.items() if s["state"] == "up"} != expected:
                return False
        return True

    await wait_for(all_see_all_up, 10, "every node lists every other as up")

    # Heartbeats flow: every peer was heard from within two heartbeat intervals.
    for home in four_homes:
        for entry in (await peer_states(home)).values():
            assert entry["last_seen_s_ago"] < 1.5, entry
            assert entry["address"] == ids[entry["peer_id"]].key.address

    # Kill C: the others mark it down within the peer timeout (3 s, swept every 1 s).
    c_process = processes[2]
    c_process.proc.send_signal(signal.SIGKILL)
    c_process.proc.wait()
    killed_at = trio.current_time()

    async def c_down_everywhere() -> bool:
        for home in (a, b, d):
            if (await peer_states(home))[c.key.peer_id]["state"] != "down":
                return False
        return True

    await wait_for(c_down_everywhere, 6, "C marked down by A, B and D")
    assert trio.current_time() - killed_at < 6

    # Restart C with the same home: same peer id, and it rejoins.
    processes[2] = NodeProcess(c)
    processes[2].wait_ready()
    assert (await call(c, "node.status"))["peer_id"] == c.key.peer_id

    async def c_up_everywhere() -> bool:
        for home in (a, b, d):
            if (await peer_states(home))[c.key.peer_id]["state"] != "up":
                return False
        c_view = await peer_states(c)
        return all(c_view.get(h.key.peer_id, {}).get("state") == "up" for h in (a, b, d))

    await wait_for(c_up_everywhere, 10, "C rejoined and sees everyone")
    status = await call(a, "p2p.status")
    assert status["topics"][HEARTBEAT.name]["mesh_peers"] >= 1
    assert status["connected_peers"] >= 2


async def test_peers_connect_and_ping_through_ctl(
    four_homes: list[NodeHome], processes: list[NodeProcess]
) -> None:
    a, b = four_homes[:2]
    processes += [NodeProcess(a), NodeProcess(b)]
    a_endpoints = processes[0].wait_ready()
    processes[1].wait_ready()
    endpoints = b.endpoints()
    assert endpoints is not None
    async with ControlClient.connect(endpoints.control_url, b.token.value) as client:
        joined = await client.call("peers.connect", {"multiaddr": a_endpoints.p2p_addrs[0]})
        assert joined == {"peer_id": a.key.peer_id, "connected": True}
        pong = await client.call("peers.ping", {"peer_id": a.key.peer_id})
        assert pong["rtt_ms"] > 0
        with pytest.raises(RpcError, match="not a dialable"):
            await client.call("peers.connect", {"multiaddr": "/ip4/127.0.0.1/tcp/1"})
        with pytest.raises(RpcError, match="own peer id"):
            await client.call("peers.connect", {"multiaddr": endpoints.p2p_addrs[0]})
