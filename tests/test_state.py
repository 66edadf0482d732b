from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import trio

from joynode.config import SettingError
from joynode.state import MIGRATIONS, StateStore


async def open_store(nursery: trio.Nursery, path: Path) -> StateStore:
    store = StateStore(path, "test")
    await nursery.start(store.run)
    return store


async def test_migrates_counts_boots_and_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    for expected_boot in (1, 2):
        async with trio.open_nursery() as nursery:
            store = await open_store(nursery, path)
            assert store.boot == expected_boot
            mode = await store.read(lambda c: c.execute("PRAGMA journal_mode").fetchone()[0])
            assert mode == "wal"
            assert store.statistics().schema_version == len(MIGRATIONS)
            nursery.cancel_scope.cancel()


async def test_write_is_one_transaction(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        store = await open_store(nursery, tmp_path / "state.db")

        def half_then_fail(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO node_meta VALUES ('a', '1')")
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError):
            await store.write(half_then_fail)
        await store.write(lambda c: c.execute("INSERT INTO node_meta VALUES ('b', '2')"))
        rows = await store.read(lambda c: c.execute("SELECT key FROM node_meta").fetchall())
        assert rows == [("b",)]
        nursery.cancel_scope.cancel()


async def test_database_from_a_newer_joynode_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(SettingError, match=r"^node.data_dir: .* newer than this joynode"):
        await StateStore(path, "test").run()


async def test_loop_keeps_running_while_the_database_works(tmp_path: Path) -> None:
    ticks = 0
    async with trio.open_nursery() as nursery:
        store = await open_store(nursery, tmp_path / "state.db")

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await trio.sleep(0.001)

        nursery.start_soon(tick)
        await store.read(
            lambda c: c.execute(
                "SELECT 1 FROM (WITH RECURSIVE r(i) AS "
                "(SELECT 1 UNION ALL SELECT i+1 FROM r WHERE i < "
                "2000000) SELECT i FROM r)"
            ).fetchall()
        )
        nursery.cancel_scope.cancel()
    assert ticks > 5
