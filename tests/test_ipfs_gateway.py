"""The IPFS trustless gateway on real nodes: a file asked of a node that lacks it arrives
from an honest peer though a lying one is asked first; raw blocks and CARs that a client
checks block by block; paths, directory listings and clear errors."""

from __future__ import annotations

import hashlib
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import trio

from joynode.gateway import apikeys
from joynode.node import Node
from joynode.storage.cid import Cid
from joynode.storage.protobuf import decode_varint
from joynode.storage.unixfs import CHUNK_SIZE
from tests.factories import LIBP2P_TEARDOWN_LEAK, pseudo_random, running_node, wait_for
from tests.test_storage_network import corrupting, storage_home

pytestmark = LIBP2P_TEARDOWN_LEAK


def car_blocks(car: bytes) -> tuple[bytes, list[tuple[Cid, bytes]]]:
    """A CARv1's header and its (CID, block) sections, as a client parses them."""
    length, at = decode_varint(car, 0)
    header, at = car[at : at + length], at + length
    sections = []
    while at < len(car):
        length, at = decode_varint(car, at)
        section, at = car[at : at + length], at + length
        # A CIDv0 is its 34-byte multihash (0x12 0x20 ...); a CIDv1 says its own length.
        size = 34 if section[:2] == b"\x12\x20" else 36
        cid = Cid.from_bytes(section[:size])
        sections.append((cid, section[size:]))
    return header, sections


async def get(node: Node, key: str, path: str, **headers: str) -> httpx.Response:
    assert node.http.url is not None
    async with httpx.AsyncClient(timeout=60) as client:
        return await client.get(
            node.http.url + path, headers={"authorization": f"Bearer {key}", **headers}
        )


async def test_content_arrives_checked_from_an_honest_peer_when_a_liar_is_asked_first(
    tmp_path: Path,
) -> None:
    data = pseudo_random(6 * CHUNK_SIZE + 5, "gateway")
    folder = tmp_path / "site"
    (folder / "docs").mkdir(parents=True)
    (folder / "docs" / "data.bin").write_bytes(data)
    (folder / "docs" / "note.txt").write_text("hello")
    async with AsyncExitStack() as stack:
        honest, fetcher, liar = [
            await stack.enter_async_context(running_node(storage_home(tmp_path / name)))
            for name in ("honest", "fetcher", "liar")
        ]
        root = (await honest.storage.add(folder)).cid
        assert (await liar.storage.add(folder)).cid == root
        corrupting(liar.storage.store)
        key, _ = await fetcher.state.write(lambda c: apikeys.create(c, "web", 600, None))
        await fetcher.p2p.connect(liar.p2p.listen_addrs()[0])

        answers: list[httpx.Response] = []

        async def ask() -> None:
            answers.append(await get(fetcher, key, f"/ipfs/{root}/docs/data.bin"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            await wait_for(
                lambda: fetcher.storage.bitswap.stats.bad_blocks >= 1, 20, "the lie caught"
            )
            await fetcher.p2p.connect(honest.p2p.listen_addrs()[0])
        (whole,) = answers
        assert whole.status_code == 200, whole.text
        assert whole.content == data
        assert whole.headers["etag"].strip('"') != str(root)  # the file's own CID
        assert "immutable" in whole.headers["cache-control"]

        # A CAR of the folder: every block checks against its CID, the root first.
        car = await get(fetcher, key, f"/ipfs/{root}?format=car")
        assert car.headers["content-type"].startswith("application/vnd.ipld.car")
        header, sections = car_blocks(car.content)
        assert b"roots" in header
        assert sections[0][0] == root.to_v1() or sections[0][0] == root
        for cid, block in sections:
            assert cid.matches(block)
        assert len({cid for cid, _ in sections}) == len(sections)
        # The raw root block, as the Accept header asks.
        raw = await get(fetcher, key, f"/ipfs/{root}", accept="application/vnd.ipld.raw")
        assert raw.headers["content-type"] == "application/vnd.ipld.raw"
        assert hashlib.sha256(raw.content).digest() == root.digest
        # A folder without index.html is listed; a text file has its type.
        listing = await get(fetcher, key, f"/ipfs/{root}/docs")
        assert "data.bin" in listing.text
        assert "note.txt" in listing.text
        note = await get(fetcher, key, f"/ipfs/{root}/docs/note.txt")
        assert note.text == "hello"
        assert note.headers["content-type"].startswith("text/plain")

        # Clear errors, and the node keeps serving.
        missing: Any = await get(fetcher, key, f"/ipfs/{root}/docs/nope")
        assert missing.status_code == 404
        assert "nope" in missing.text
        assert (await get(fetcher, key, "/ipfs/not-a-cid")).status_code == 400
        assert (await get(fetcher, "jn-wrong", f"/ipfs/{root}")).status_code == 401
        again = await get(fetcher, key, f"/ipfs/{root}/docs/data.bin")
        assert again.content == data


async def test_fetched_content_is_kept_least_recently_used_first_out_and_pins_stay(
    tmp_path: Path,
) -> None:
    """Within storage.gateway_cache_mib (1 MiB here): three 400 KiB files, the one not
    asked for longest goes when the third arrives; what the node pinned is never touched."""
    files = {name: pseudo_random(400 << 10, name) for name in ("a", "b", "c")}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "own").write_bytes(pseudo_random(300 << 10, "own"))
    holder_home = storage_home(tmp_path / "holder")
    fetcher_home = storage_home(tmp_path / "fetcher")
    fetcher_home.set("storage", "gateway_cache_mib", "1")
    async with (
        running_node(holder_home) as holder,
        running_node(fetcher_home) as fetcher,
    ):
        cids = {name: (await holder.storage.add(tmp_path / name)).cid for name in files}
        own = (await fetcher.storage.add(tmp_path / "own")).cid  # pinned by the operator
        key, _ = await fetcher.state.write(lambda c: apikeys.create(c, "web", 600, None))
        await fetcher.p2p.connect(holder.p2p.listen_addrs()[0])
        store, cache = fetcher.storage.store, fetcher.storage.content_cache

        async def read(name: str) -> None:
            answer = await get(fetcher, key, f"/ipfs/{cids[name]}")
            assert answer.status_code == 200, answer.text
            assert answer.content == files[name]

        await read("a")
        await read("b")
        await read("a")  # from the store: now the most recently used
        assert cache.statistics().hits == 1
        await read("c")  # 1.2 MiB cached: b, the least recently used, goes
        assert store.has(cids["a"])
        assert store.has(cids["c"])
        assert not store.has(cids["b"])
        assert store.has(own)
        stats = cache.statistics()
        assert (stats.roots, stats.evicted_roots) == (2, 1)
        assert stats.bytes <= stats.budget_bytes
        await read("b")  # fetched again, on demand
        assert store.has(own)
        assert cache.statistics().roots == 2
