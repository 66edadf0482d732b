"""The storage actor between real nodes on 127.0.0.1 (several nodes in one process).

Sharing by CID, a peer serving corrupted blocks (Proof of Integrity), pins and
gc, a fetch resumed after a restart, the control methods, and bad input from
a raw libp2p peer and from control clients.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from joynode.control.client import ControlClient
from joynode.control.jsonrpc import INVALID_PARAMS, RpcError
from joynode.node import Node
from joynode.storage.bitswap_messages import PROTOCOL_1_2, BitswapMessage, write_message
from joynode.storage.blockstore import Blockstore
from joynode.storage.cid import Cid
from joynode.storage.errors import StorageError
from joynode.storage.service import STORAGE_ERROR
from joynode.storage.unixfs import CHUNK_SIZE
from tests.factories import (
    LIBP2P_TEARDOWN_LEAK,
    NodeHome,
    close_leaked_sockets,
    fast_p2p,
    make_home,
    pseudo_random,
    raw_peer,
    running_node,
    wait_for,
)

pytestmark = LIBP2P_TEARDOWN_LEAK


def storage_home(path: Path, *, bootstrap: list[str] | None = None) -> NodeHome:
    home = fast_p2p(make_home(path), bootstrap=bootstrap)
    home.set("storage", "block_timeout_s", "2.0")
    home.set("storage", "stall_timeout_s", "10.0")
    return home


@asynccontextmanager
async def nodes(tmp_path: Path, count: int) -> AsyncIterator[list[Node]]:
    """``count`` nodes, all connected to the first."""
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(running_node(storage_home(tmp_path / "n0")))
        out = [first]
        for i in range(1, count):
            home = storage_home(tmp_path / f"n{i}", bootstrap=first.p2p.listen_addrs())
            out.append(await stack.enter_async_context(running_node(home)))
        for node in out[1:]:
            await node.p2p.connect(first.p2p.listen_addrs()[0])
        yield out


async def test_a_file_and_a_folder_are_shared_by_cid(tmp_path: Path) -> None:
    data = pseudo_random(3 * CHUNK_SIZE + 11, "file")
    (tmp_path / "file.bin").write_bytes(data)
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "sub" / "weights").write_bytes(pseudo_random(CHUNK_SIZE + 1, "w"))
    async with nodes(tmp_path, 2) as (a, b):
        file_cid = (await a.storage.add(tmp_path / "file.bin")).cid
        folder_cid = (await a.storage.add(folder)).cid
        seen: list[dict[str, object]] = []

        async def progress(p: Any) -> None:
            seen.append(p.to_json())

        done = await b.storage.fetch(file_cid, on_progress=progress)
        assert done.done
        assert done.fetched_blocks == 5
        assert done.total_bytes == done.bytes
        assert seen[-1]["done"] is True
        assert seen[-1]["peers"] == 1
        await b.storage.export(file_cid, tmp_path / "file-out")
        assert (tmp_path / "file-out").read_bytes() == data
        await b.storage.fetch(folder_cid)
        await b.storage.export(folder_cid, tmp_path / "folder-out")
        assert (tmp_path / "folder-out" / "sub" / "weights").read_bytes() == (
            folder / "sub" / "weights"
        ).read_bytes()
        assert (tmp_path / "folder-out" / "config.json").read_text() == "{}"
        # A second fetch finds everything local and asks no one.
        received = b.storage.bitswap.stats.blocks_received
        again = await b.storage.fetch(file_cid)
        assert again.fetched_blocks == 0
        assert b.storage.bitswap.stats.blocks_received == received
        assert {p.cid: p.complete for p in await b.storage.pins()} == {
            str(file_cid): True,
            str(folder_cid): True,
        }


def corrupting(store: Blockstore) -> None:
    """Make ``store`` serve every block with one byte flipped (a lying peer)."""
    honest_get = store.get

    def get(cid: Cid) -> bytes:
        data = bytearray(honest_get(cid))
        data[len(data) // 2] ^= 0xFF
        return bytes(data)

    store.get = get  # type: ignore[method-assign]


async def test_a_peer_serving_corrupted_blocks_is_caught_and_the_fetch_completes(
    tmp_path: Path,
) -> None:
    data = pseudo_random(12 * CHUNK_SIZE, "integrity")
    (tmp_path / "data.bin").write_bytes(data)
    async with AsyncExitStack() as stack:
        honest, fetcher, liar = [
            await stack.enter_async_context(running_node(storage_home(tmp_path / name)))
            for name in ("honest", "fetcher", "liar")
        ]
        cid = (await honest.storage.add(tmp_path / "data.bin")).cid
        assert (await liar.storage.add(tmp_path / "data.bin")).cid == cid
        corrupting(liar.storage.store)
        # The fetcher first knows only the liar; the honest node turns up later.
        await fetcher.p2p.connect(liar.p2p.listen_addrs()[0])
        async with trio.open_nursery() as nursery:
            outcome: list[Any] = []

            async def fetch() -> None:
                outcome.append(await fetcher.storage.fetch(cid))

            nursery.start_soon(fetch)
            await wait_for(
                lambda: fetcher.storage.bitswap.stats.bad_blocks >= 1, 10, "the lie caught"
            )
            assert fetcher.storage.store.statistics().blocks == 0  # nothing wrong was kept
            await fetcher.p2p.connect(honest.p2p.listen_addrs()[0])
        await fetcher.storage.export(cid, tmp_path / "out")

        assert (tmp_path / "out").read_bytes() == data
        assert outcome[0].peers == 1  # only the honest node's blocks were kept
        standing = fetcher.p2p.scorer.snapshot()[liar.p2p.peer_id]
        assert standing["offences"] == {"bad_block": fetcher.storage.bitswap.stats.bad_blocks}
        assert fetcher.p2p.scorer.score(liar.p2p.peer_id) < 0
        assert honest.p2p.peer_id not in fetcher.p2p.scorer.snapshot()


async def test_gc_removes_only_what_no_pin_needs(tmp_path: Path) -> None:
    kept = pseudo_random(2 * CHUNK_SIZE + 1, "kept")
    dropped = pseudo_random(3 * CHUNK_SIZE, "dropped")
    (tmp_path / "kept").write_bytes(kept)
    (tmp_path / "dropped").write_bytes(dropped)
    async with running_node(storage_home(tmp_path / "node")) as node:
        kept_cid = (await node.storage.add(tmp_path / "kept")).cid
        dropped_cid = (await node.storage.add(tmp_path / "dropped", pin=False)).cid
        assert node.storage.store.statistics().blocks == 4 + 4

        result = await node.storage.gc()

        assert (result.removed_blocks, result.kept_blocks) == (4, 4)
        assert result.freed_bytes > 3 * CHUNK_SIZE
        assert (await node.storage.stat(kept_cid))["complete"] is True
        assert (await node.storage.stat(dropped_cid))["complete"] is False
        await node.storage.export(kept_cid, tmp_path / "out")
        assert (tmp_path / "out").read_bytes() == kept

        assert await node.storage.unpin(kept_cid)
        assert (await node.storage.gc()).removed_blocks == 4
        assert node.storage.store.statistics().blocks == 0


async def test_a_fetch_cut_by_a_restart_resumes_from_the_stored_blocks(tmp_path: Path) -> None:
    blocks = 60
    data = pseudo_random(blocks * CHUNK_SIZE, "resume")
    (tmp_path / "data.bin").write_bytes(data)
    async with running_node(storage_home(tmp_path / "source")) as source:
        cid = (await source.storage.add(tmp_path / "data.bin")).cid
        home = storage_home(tmp_path / "fetcher", bootstrap=source.p2p.listen_addrs())
        home.set("storage", "fetch_window", "2")

        async with running_node(home) as fetcher:
            await wait_for(
                lambda: source.p2p.peer_id in fetcher.p2p.connected_peers(), 10, "connected"
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fetcher.storage.fetch, cid)
                await wait_for(
                    lambda: fetcher.storage.store.statistics().blocks >= 20, 20, "20 blocks in"
                )
                nursery.cancel_scope.cancel()
            stored_before_restart = fetcher.storage.store.statistics().blocks
        assert stored_before_restart < blocks + 1
        close_leaked_sockets()

        # The pin survived, incomplete; the restarted node resumes by itself.
        async with running_node(home) as restarted:
            pins = await restarted.storage.pins()
            assert [(p.cid, p.complete) for p in pins] == [(str(cid), False)]
            await wait_for(
                lambda: restarted.storage.store.statistics().blocks == blocks + 1,
                30,
                "the resumed fetch completes",
            )
            await wait_for(lambda: _complete(restarted, cid), 10, "the pin is marked complete")
            assert restarted.storage.bitswap.stats.blocks_received <= (
                blocks + 1 - stored_before_restart + 2  # + the window in flight when cut
            )
            await restarted.storage.export(cid, tmp_path / "out")
            assert (tmp_path / "out").read_bytes() == data


async def _complete(node: Node, cid: Cid) -> bool:
    return any(p.cid == str(cid) and p.complete for p in await node.storage.pins())


async def test_control_methods_with_progress_and_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "data.bin").write_bytes(pseudo_random(6 * CHUNK_SIZE, "ctl"))
    async with nodes(tmp_path, 2) as (a, b):
        notes: list[dict[str, Any]] = []
        async with (
            ControlClient.connect(a.control.url or "", _token(a)) as ctl_a,
            ControlClient.connect(
                b.control.url or "", _token(b), on_notification=notes.append
            ) as ctl_b,
        ):
            added = await ctl_a.call("storage.add", {"path": str(tmp_path / "data.bin")})
            assert added["bytes"] == 6 * CHUNK_SIZE
            got = await ctl_b.call(
                "storage.get", {"cid": added["cid"], "out": str(tmp_path / "out.bin")}
            )
            assert got["done"] is True
            assert got["out"] == str(tmp_path / "out.bin")
            assert (tmp_path / "out.bin").read_bytes() == (tmp_path / "data.bin").read_bytes()
            assert notes
            assert notes[-1]["method"] == "storage.progress"
            assert notes[-1]["params"]["done"] is True
            stat = await ctl_b.call("storage.stat", {"cid": added["cid"]})
            assert stat["root"]["complete"] is True
            assert stat["blocks"] == 7
            assert [p["cid"] for p in stat["pins"]] == [added["cid"]]

            bad_calls: list[tuple[str, dict[str, Any], int, str]] = [
                ("storage.add", {"path": "relative/path"}, INVALID_PARAMS, "absolute path"),
                ("storage.add", {"path": str(tmp_path / "missing")}, STORAGE_ERROR, "no such"),
                ("storage.get", {"cid": "not-a-cid"}, INVALID_PARAMS, "not a CID"),
                ("storage.get", {"cid": "Qm" + "1" * 44}, INVALID_PARAMS, "not a valid CID"),
                (
                    "storage.get",
                    {"cid": added["cid"], "out": str(tmp_path / "out.bin")},
                    STORAGE_ERROR,
                    "already exists",
                ),
                ("storage.unpin", {"cid": str(Cid.of_block(b"x"))}, STORAGE_ERROR, "not pinned"),
                ("models.publish", {"path": str(tmp_path)}, STORAGE_ERROR, "no config.json"),
                ("storage.gc", {"unexpected": 1}, INVALID_PARAMS, "unexpected"),
            ]
            for method, params, code, message in bad_calls:
                with pytest.raises(RpcError) as caught:
                    await ctl_b.call(method, params)
                assert caught.value.code == code, (method, caught.value.message)
                assert message in caught.value.message, (method, caught.value.message)
            # Nothing was lost and both nodes still answer.
            assert (await ctl_b.call("storage.stat"))["pins"][0]["complete"] is True
            assert (await ctl_a.call("node.status"))["actors"]["storage"]["state"] == "ready"


def _token(node: Node) -> str:
    return node.config.control.token_file.read_text().strip()


async def test_a_fetch_nobody_can_serve_fails_clearly_and_keeps_nothing_broken(
    tmp_path: Path,
) -> None:
    home = storage_home(tmp_path / "node")
    home.set("storage", "stall_timeout_s", "1.5")
    async with running_node(home) as node:
        missing = Cid.of_block(b"nobody has this")
        with pytest.raises(Exception, match="no peer delivered block"):
            await node.storage.fetch(missing)
        pins = await node.storage.pins()
        assert [(p.cid, p.complete) for p in pins] == [(str(missing), False)]
        assert node.supervisor.snapshot()["storage"]["state"] == "ready"


async def test_garbage_and_unsolicited_blocks_from_a_raw_peer_cost_it(tmp_path: Path) -> None:
    (tmp_path / "data.bin").write_bytes(pseudo_random(2 * CHUNK_SIZE, "raw"))
    async with nodes(tmp_path, 2) as (a, b), raw_peer() as raw:
        cid = (await a.storage.add(tmp_path / "data.bin")).cid
        await raw.host.connect(info_from_p2p_addr(Multiaddr(a.p2p.listen_addrs()[0])))
        raw_id = raw.host.get_id().to_base58()

        stream = await raw.host.new_stream(ID.from_base58(a.p2p.peer_id), [TProtocol(PROTOCOL_1_2)])
        await stream.write(b"\x05\xff\xff\xff\xff\xff")  # a 5-byte message that is not protobuf
        await wait_for(lambda: a.storage.bitswap.stats.invalid_messages == 1, 5, "garbage seen")

        stream = await raw.host.new_stream(ID.from_base58(a.p2p.peer_id), [TProtocol(PROTOCOL_1_2)])
        junk = b"a block nobody asked for"
        await write_message(
            stream, BitswapMessage(blocks=[(Cid.of_block(junk), junk)]), PROTOCOL_1_2
        )
        await wait_for(lambda: a.storage.bitswap.stats.bad_blocks == 1, 5, "junk block seen")

        offences = a.p2p.scorer.snapshot()[raw_id]["offences"]
        assert offences == {"invalid_request": 1, "bad_block": 1}
        assert a.storage.store.statistics().blocks == 3  # the junk was not stored
        # A still serves honest peers.
        done = await b.storage.fetch(cid)
        assert done.done
        assert done.fetched_blocks == 3


async def test_a_provider_announced_on_the_dht_is_found_and_fetched_from(tmp_path: Path) -> None:
    """C knows only the hub B; A, which has the file, is found through the DHT."""
    (tmp_path / "data.bin").write_bytes(pseudo_random(4 * CHUNK_SIZE, "dht"))
    async with AsyncExitStack() as stack:
        hub = await stack.enter_async_context(running_node(storage_home(tmp_path / "hub")))
        provider, fetcher = [
            await stack.enter_async_context(
                running_node(storage_home(tmp_path / name, bootstrap=hub.p2p.listen_addrs()))
            )
            for name in ("provider", "fetcher")
        ]
        cid = (await provider.storage.add(tmp_path / "data.bin")).cid

        async def announced() -> bool:
            found = await fetcher.p2p.find_providers(cid.multihash, 5)
            return provider.p2p.peer_id in [peer for peer, _ in found]

        await wait_for(announced, 15, "the provider record reaches the DHT")
        done = await fetcher.storage.fetch(cid)
        assert done.done
        assert done.fetched_blocks == 5
        assert provider.storage.bitswap.stats.blocks_sent == 5
        assert hub.storage.bitswap.stats.blocks_sent == 0


async def test_the_quota_stops_adds_and_fetches_with_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "big.bin").write_bytes(pseudo_random(6 * CHUNK_SIZE, "quota"))
    (tmp_path / "small.bin").write_bytes(b"fits")
    async with nodes(tmp_path, 2) as (a, b):
        cid = (await a.storage.add(tmp_path / "big.bin")).cid
        b.storage.store.quota_bytes = 4 * CHUNK_SIZE  # about 1 MiB
        with pytest.raises(StorageError, match="block store is full"):
            await b.storage.fetch(cid)
        with pytest.raises(StorageError, match="block store is full"):
            await b.storage.add(tmp_path / "big.bin")
        # What fitted is kept (the fetch can resume once there is room), and the
        # node goes on: a small add still works.
        assert 0 < b.storage.store.statistics().bytes <= 4 * CHUNK_SIZE
        assert (await b.storage.add(tmp_path / "small.bin")).bytes_read == 4
        b.storage.store.quota_bytes = 0
        done = await b.storage.fetch(cid)
        assert done.done
        assert done.fetched_blocks < 7
