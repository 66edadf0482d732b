"""The chain actor and watcher against a real anvil: local mode, exactly-once, reorgs."""

from __future__ import annotations

import json
import signal
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pydantic
import pytest
import trio

from joynode.chain.anvil import dev_account
from joynode.chain.deploy import JOY
from joynode.chain.service import AmountParams, ModelRegistration
from joynode.chain.watcher import ChainWatcher, RegistryMirror
from joynode.control.client import ControlClient
from joynode.messages import ChainEvent
from joynode.node import Node
from joynode.state import StateStore
from tests.chain_fixtures import Chain, anvil_url, chain, deployed
from tests.factories import NodeHome, NodeProcess, make_home, running_node, wait_for

__all__ = ["anvil_url", "chain", "deployed"]


def stake_and_register(chain: Chain, index: int, model: bytes = b"\x01" * 32) -> None:
    account = dev_account(index)
    sender = chain.sender(account)
    coordinator = chain.contract("NodeCoordinator")
    sender.transact(chain.contract("JoyToken").functions.approve(coordinator.address, 500 * JOY))
    sender.transact(coordinator.functions.stake(500 * JOY))
    sender.transact(coordinator.functions.register(f"peer-{index}", [], [model], 1))


def canonical_logs(chain: Chain) -> set[tuple[str, int]]:
    logs = chain.w3.eth.get_logs(
        {
            "fromBlock": chain.deployment.start_block,
            "toBlock": "latest",
            "address": [
                chain.w3.to_checksum_address(a) for a in chain.deployment.addresses.values()
            ],
        }
    )
    return {(log["blockHash"].to_0x_hex(), int(log["logIndex"])) for log in logs}


def recorded(db: Path) -> list[tuple[str, int]]:
    conn = sqlite3.connect(db)
    try:
        return [
            (h, int(i)) for h, i in conn.execute("SELECT block_hash, log_index FROM chain_events")
        ]
    finally:
        conn.close()


async def catch_up(watcher: ChainWatcher, chain: Chain) -> list[ChainEvent]:
    delivered: list[ChainEvent] = []
    head = chain.w3.eth.block_number
    while (await watcher.cursor()).block < head:
        delivered += await watcher.poll()
    return delivered


@asynccontextmanager
async def watching(
    chain: Chain, db: Path, block_range: int
) -> AsyncIterator[tuple[StateStore, ChainWatcher]]:
    """A watcher (with the registry mirror) on its own state store at ``db``."""
    async with trio.open_nursery() as nursery:
        state = StateStore(db, "test")
        await nursery.start(state.run)
        mirror = RegistryMirror(chain.w3, chain.deployment, state)
        yield (
            state,
            ChainWatcher(
                chain.w3,
                chain.deployment,
                state,
                confirmations=0,
                block_range=block_range,
                mirror=mirror,
            ),
        )
        nursery.cancel_scope.cancel()


async def test_watcher_applies_each_event_once_across_restarts_and_mirrors_the_registry(
    chain: Chain, tmp_path: Path
) -> None:
    db = tmp_path / "state.db"
    stake_and_register(chain, 2)
    delivered: list[ChainEvent] = []
    for index in (3, 4):
        async with watching(chain, db, block_range=3) as (_, watcher):
            delivered += await catch_up(watcher, chain)
        # More happens while no watcher runs; the next one resumes from the cursor.
        stake_and_register(chain, index)
    async with watching(chain, db, block_range=3) as (state, watcher):
        delivered += await catch_up(watcher, chain)
        mirrored = await state.read(
            lambda c: c.execute(
                "SELECT address, stake, registered, peer_id FROM registry_nodes ORDER BY peer_id"
            ).fetchall()
        )
    keys = [(e.block_hash, e.log_index) for e in delivered]
    assert len(keys) == len(set(keys))  # nothing delivered twice
    assert set(keys) == canonical_logs(chain)  # nothing missed
    assert sorted(recorded(db)) == sorted(keys)
    assert [(peer, registered, int(stake)) for _, stake, registered, peer in mirrored] == [
        (f"peer-{i}", 1, 500 * JOY) for i in (2, 3, 4)
    ]


async def test_watcher_follows_a_reorg(chain: Chain, tmp_path: Path) -> None:
    async with watching(chain, tmp_path / "state.db", block_range=100) as (state, watcher):
        await catch_up(watcher, chain)
        fork = chain.w3.provider.make_request("evm_snapshot", [])  # type: ignore[arg-type]
        stake_and_register(chain, 5)
        doomed = await catch_up(watcher, chain)
        assert {e.name for e in doomed} >= {"Staked", "Registered"}
        # The blocks with node 5's events vanish; node 6 registers on the new branch instead.
        chain.w3.provider.make_request("evm_revert", [fork["result"]])  # type: ignore[arg-type]
        stake_and_register(chain, 6)
        chain.w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]
        after = await catch_up(watcher, chain)
        retracted = [e for e in after if e.removed]
        assert {(e.block_hash, e.log_index) for e in retracted} == {
            (e.block_hash, e.log_index) for e in doomed
        }
        assert any(e.name == "Registered" and e.args["peerId"] == "peer-6" for e in after)
        assert set(recorded(tmp_path / "state.db")) == canonical_logs(chain)
        peers = await state.read(
            lambda c: dict(c.execute("SELECT peer_id, registered FROM registry_nodes").fetchall())
        )
        assert peers.get("peer-6") == 1
        assert peers.get("peer-5") in (None, 0)  # node 5 never registered on this branch


def rpc_home(tmp_path: Path, chain: Chain) -> NodeHome:
    home = make_home(tmp_path / "node")
    chain.deployment.write(tmp_path / "deployment.json")
    home.set("chain", "mode", '"rpc"')
    home.set("chain", "rpc_url", f'"{chain.url}"')
    home.set("chain", "deployment_file", f'"{tmp_path / "deployment.json"}"')
    home.set("chain", "poll_interval_s", "0.1")
    home.set("chain", "block_range", "2")
    return home


async def test_a_killed_node_process_resumes_without_missing_or_repeating(
    chain: Chain, tmp_path: Path
) -> None:
    home = rpc_home(tmp_path, chain)
    db = home.config.node.data_dir / "state.db"
    process = NodeProcess(home)
    try:
        process.wait_ready()
        for index in (7, 8):
            stake_and_register(chain, index)
        process.proc.send_signal(signal.SIGKILL)
        process.proc.wait()
        stake_and_register(chain, 9)
        process = NodeProcess(home)
        process.wait_ready()
        await wait_for(lambda: set(recorded(db)) == canonical_logs(chain), 20, "caught up")
        assert len(recorded(db)) == len(set(recorded(db)))
    finally:
        process.kill()


def watcher_applied_something(node: Node) -> bool:
    watcher = node.chain._watcher if node.chain is not None else None
    return watcher is not None and watcher.applied > 0


async def test_local_mode_runs_anvil_deploys_once_and_registers_the_node(tmp_path: Path) -> None:
    home = make_home(tmp_path / "node")
    home.set("chain", "mode", '"local"')
    home.set("chain", "poll_interval_s", "0.2")
    statuses: list[dict[str, Any]] = []
    for _ in range(2):  # the second start finds its chain state and contracts again
        async with (
            running_node(home) as node,
            ControlClient.connect(node.control.url or "", home.token.value) as client,
        ):
            await wait_for(
                partial(watcher_applied_something, node), 15, "watcher saw the registration"
            )
            statuses.append(await client.call("chain.status"))
    first, second = statuses
    assert first["registered"] is True
    assert int(first["stake"]) == 1000 * JOY
    assert first["reputation"] == 1000
    assert second["contracts"] == first["contracts"]  # not deployed twice
    assert int(second["stake"]) == 1000 * JOY  # not staked twice
    deployment = json.loads((home.config.node.data_dir / "deployment.json").read_text())
    assert deployment["addresses"] == first["contracts"]


MODEL_CID = "QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH"


def test_chain_control_params_are_validated() -> None:
    ok = ModelRegistration(
        model=MODEL_CID,
        price_joy=1,
        royalty_recipients=[dev_account(3).address.lower()],
        royalty_bps=[500],
    )
    assert ok.royalty_recipients == [dev_account(3).address]
    for bad in (
        {"model": MODEL_CID, "price_joy": 10**13},
        {"model": MODEL_CID, "price_joy": 1, "royalty_recipients": ["0x12"], "royalty_bps": [1]},
        {"model": MODEL_CID, "price_joy": 1, "royalty_recipients": [], "royalty_bps": [1]},
        {
            "model": MODEL_CID,
            "price_joy": 1,
            "royalty_recipients": [dev_account(3).address] * 2,
            "royalty_bps": [6000, 6000],
        },
        {"model": "not-a-cid", "price_joy": 1},
    ):
        with pytest.raises(pydantic.ValidationError):
            ModelRegistration(**bad)
    with pytest.raises(pydantic.ValidationError):
        AmountParams(amount_joy=0)
