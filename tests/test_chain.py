"""The chain actor and watcher against a real anvil: local mode, exactly-once, reorgs,
and RPC outages (down at start, lost and back, hung, another chain)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pydantic
import pytest
import trio
from eth_account.signers.local import LocalAccount
from web3 import Web3

from joynode.chain.anvil import dev_account
from joynode.chain.committee import SEED_EPOCH_BLOCKS
from joynode.chain.deploy import JOY
from joynode.chain.rpc import CHAIN_UNREACHABLE, Backoff, RpcLink, public_url
from joynode.chain.service import AmountParams, ModelRegistration
from joynode.chain.watcher import ChainWatcher, MirrorFactory, RegistryMirror
from joynode.control.client import ControlClient
from joynode.control.jsonrpc import RpcError
from joynode.keys import NodeKey
from joynode.messages import ChainEvent
from joynode.node import Node
from joynode.state import StateStore
from tests.chain_fixtures import (
    AnvilProcess,
    Chain,
    anvil_url,
    chain,
    deploy_chain,
    deployed,
    hung_rpc,
    refused_port,
)
from tests.factories import (
    NodeHome,
    NodeProcess,
    make_home,
    node_process,
    running_node,
    wait_for,
)
from tests.test_http import get, http_exchange

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


def assert_boundaries_recorded(db: Path, chain: Chain) -> None:
    """The watcher kept the latest epoch boundary at or below its cursor, with the chain's
    hash (what unpaid committees are drawn from), and no boundary of another branch."""
    conn = sqlite3.connect(db)
    try:
        cursor = int(conn.execute("SELECT block FROM chain_cursor").fetchone()[0])
        blocks = dict(conn.execute("SELECT number, hash FROM chain_blocks").fetchall())
    finally:
        conn.close()
    assert cursor - cursor % SEED_EPOCH_BLOCKS in blocks
    for number, block_hash in blocks.items():
        assert chain.w3.eth.get_block(number)["hash"].to_0x_hex() == block_hash


async def catch_up(watcher: ChainWatcher, chain: Chain) -> list[ChainEvent]:
    delivered: list[ChainEvent] = []
    head = chain.w3.eth.block_number
    while (await watcher.cursor()).block < head:
        delivered += await watcher.poll()
    return delivered


@asynccontextmanager
async def watching(
    chain: Chain, db: Path, block_range: int, mirrors: Sequence[MirrorFactory] = (RegistryMirror,)
) -> AsyncIterator[tuple[StateStore, ChainWatcher]]:
    """A watcher (with the registry mirror, or ``mirrors``) on its own state store at ``db``."""
    async with trio.open_nursery() as nursery:
        state = StateStore(db, "test")
        await nursery.start(state.run)
        link = RpcLink()
        link.open(chain.url)
        yield (
            state,
            ChainWatcher(
                link,
                chain.deployment,
                state,
                confirmations=0,
                block_range=block_range,
                mirrors=[mirror(link, chain.deployment) for mirror in mirrors],
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
    assert_boundaries_recorded(db, chain)
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
        assert_boundaries_recorded(tmp_path / "state.db", chain)
        peers = await state.read(
            lambda c: dict(c.execute("SELECT peer_id, registered FROM registry_nodes").fetchall())
        )
        assert peers.get("peer-6") == 1
        assert peers.get("peer-5") in (None, 0)  # node 5 never registered on this branch


def test_a_deployment_file_from_before_a_contract_was_added_is_not_live(chain: Chain) -> None:
    assert chain.deployment.is_live_on(chain.w3)
    older = {k: v for k, v in chain.deployment.addresses.items() if k != "PrepaidInference"}
    assert not dataclasses.replace(chain.deployment, addresses=older).is_live_on(chain.w3)


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


# ---- RPC outages


@pytest.fixture
def own_anvil(tmp_path: Path) -> Iterator[tuple[AnvilProcess, Chain]]:
    """An anvil of this test's own, its chain kept in a state file across stops, deployed."""
    anvil = AnvilProcess(state_file=tmp_path / "anvil-state.json")
    anvil.start()
    try:
        yield anvil, deploy_chain(anvil.url)
    finally:
        anvil.stop()


def on(chain: Chain, url: str) -> Chain:
    """The same chain, reached at ``url``."""
    return dataclasses.replace(chain, w3=Web3(Web3.HTTPProvider(url)), url=url)


def out_of_sight(anvil: AnvilProcess, chain: Chain, act: Callable[[Chain], object]) -> None:
    """``act`` on the chain while its usual RPC port stays dark: anvil runs for a moment
    on another port, then stops (its state saved)."""
    usual = anvil.port
    act(on(chain, anvil.start(port=0)))
    anvil.stop()
    anvil.port = usual


def moves_on(account: LocalAccount, chain: Chain) -> None:
    """Node ``3`` stakes and registers, and ``account`` sends a transaction of its own."""
    stake_and_register(chain, 3)
    token = chain.contract("JoyToken")
    chain.sender(account).transact(token.functions.transfer(dev_account(7).address, 1))


def zk_model(name: str) -> dict[str, object]:
    return {"model": name, "kind": "zk", "price_joy": 1, "weights_commitment": "0x" + "11" * 32}


def outage_home(tmp_path: Path, chain: Chain, url: str) -> NodeHome:
    home = rpc_home(tmp_path, chain)
    home.set("chain", "rpc_url", f'"{url}"')
    home.set("chain", "retry_max_s", "0.5")
    return home


def actor_state(node: Node, name: str) -> str:
    return str(node.supervisor.snapshot()[name]["state"])


def sample(node: Node, name: str, **labels: str) -> float:
    value = node.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def applied_events(node: Node) -> float:
    return sum(
        metric.value
        for family in node.registry.collect()
        if family.name == "joynode_chain_events"
        for metric in family.samples
        if metric.name == "joynode_chain_events_total"
    )


def caught_up(db: Path, chain: Chain) -> bool:
    return set(recorded(db)) == canonical_logs(chain)


async def recovered_with_every_event_once(node: Node, db: Path, chain: Chain) -> None:
    """The chain actor is ready again and has applied, and delivered, each of ``chain``'s
    events exactly once."""
    await wait_for(lambda: actor_state(node, "chain") == "ready", 30, "recovered")
    await wait_for(partial(caught_up, db, chain), 30, "caught up")
    assert len(recorded(db)) == len(canonical_logs(chain))
    # Each event is counted once delivered, a moment after its row is written.
    expected = len(canonical_logs(chain))
    await wait_for(lambda: applied_events(node) >= expected, 10, "events delivered")
    assert applied_events(node) == expected


# How the RPC went away: refused, or an open connection reset or closed as anvil stopped.
SHORT_REASON = r"[a-z][a-z ]+"


def assert_one_outage_logged(caplog: pytest.LogCaptureFixture, url: str) -> None:
    """One line when the RPC was lost, one when it came back (each with a short reason,
    not a transport library's essay), and no traceback."""
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.name == "joynode.supervisor" and ("degraded" in r.message or "recovered" in r.message)
    ]
    problem = f"chain RPC {re.escape(url)} unreachable: {SHORT_REASON}"
    assert len(lines) == 2, lines
    assert re.fullmatch(f"actor chain degraded: {problem}", lines[0]), lines[0]
    assert re.fullmatch(rf"actor chain recovered \(was: {problem}\)", lines[1]), lines[1]
    assert not [r for r in caplog.records if r.exc_info], "no tracebacks"


async def test_a_node_whose_rpc_is_down_at_start_runs_degraded_then_catches_up(
    tmp_path: Path, own_anvil: tuple[AnvilProcess, Chain], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="joynode")
    anvil, chain = own_anvil
    anvil.stop()
    home = outage_home(tmp_path, chain, anvil.url)
    db = home.config.node.data_dir / "state.db"
    with contextlib.ExitStack() as dark:
        dark.enter_context(refused_port(anvil.port))
        async with (
            running_node(home) as node,
            ControlClient.connect(node.control.url or "", home.token.value) as client,
        ):
            # Every actor runs; the chain's is degraded, and each surface says why.
            await wait_for(lambda: actor_state(node, "chain") == "degraded", 15, "degraded")
            status = await client.call("node.status")
            assert status["health"] == "degraded"
            assert {a["state"] for n, a in status["actors"].items() if n != "chain"} == {"ready"}
            assert status["actors"]["chain"]["error"] == (
                f"chain RPC {anvil.url} unreachable: connection refused"
            )
            code, _, body = await http_exchange(node, get("/healthz"))
            assert (code, json.loads(body)["status"]) == (200, "degraded")
            _, _, metrics = await http_exchange(node, get("/metrics"))
            assert "joynode_chain_reachable 0.0" in metrics.decode()
            assert 'joynode_actor_degraded{actor="chain"} 1.0' in metrics.decode()
            await wait_for(lambda: sample(node, "joynode_chain_rpc_failures_total") >= 2, 15, "2")
            known = await client.call("chain.status")  # what is known, not an error
            assert (known["reachable"], known["last_error"]) == (False, "connection refused")
            assert (known["head"], known["chain_id"]) == (None, 31337)
            assert known["contracts"] == chain.deployment.addresses
            # Paid work is refused with the reason; nothing waits on the dead RPC.
            with pytest.raises(RpcError) as refused:
                await client.call("zk.infer", {"model": "m", "input": [0] * 16})
            assert refused.value.code == CHAIN_UNREACHABLE
            assert "unreachable: connection refused" in refused.value.message

            # The chain goes on where the node cannot see it; then its RPC comes back.
            await trio.to_thread.run_sync(
                out_of_sight, anvil, chain, partial(stake_and_register, index=2)
            )
            dark.close()
            await trio.to_thread.run_sync(anvil.start)
            await recovered_with_every_event_once(node, db, chain)
            assert sample(node, "joynode_chain_reachable") == 1.0
            assert node.supervisor.health() == "ok"
            assert (await client.call("chain.status"))["registered_nodes"] == 1
    assert_one_outage_logged(caplog, anvil.url)


async def test_a_node_that_loses_its_rpc_resumes_from_its_cursor_and_applies_each_event_once(
    tmp_path: Path, own_anvil: tuple[AnvilProcess, Chain], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="joynode")
    anvil, chain = own_anvil
    home = outage_home(tmp_path, chain, anvil.url)
    me = dev_account(6)  # the node's account, which also acts elsewhere during the outage
    NodeKey(bytes(me.key)).save(home.config.node.key_file, force=True)
    db = home.config.node.data_dir / "state.db"
    async with (
        running_node(home) as node,
        ControlClient.connect(node.control.url or "", home.token.value) as client,
    ):
        await client.call("models.register", zk_model("before"))  # its nonce now cached
        await trio.to_thread.run_sync(stake_and_register, chain, 2)
        await wait_for(partial(caught_up, db, chain), 30, "caught up")
        before = await client.call("chain.status")
        assert before["reachable"] is True
        assert before["registered_nodes"] == 1
        with contextlib.ExitStack() as dark:
            await trio.to_thread.run_sync(anvil.stop)
            dark.enter_context(refused_port(anvil.port))
            await wait_for(lambda: actor_state(node, "chain") == "degraded", 30, "degraded")
            assert sample(node, "joynode_chain_reachable") == 0.0
            known = await client.call("chain.status")  # the last values read, and when
            assert known["reachable"] is False
            assert re.fullmatch(SHORT_REASON, known["last_error"])
            assert known["stake"] == before["stake"]
            assert known["as_of"] == before["as_of"]
            await trio.to_thread.run_sync(out_of_sight, anvil, chain, partial(moves_on, me))
        await trio.to_thread.run_sync(anvil.start)
        await recovered_with_every_event_once(node, db, chain)
        assert (await client.call("chain.status"))["registered_nodes"] == 2
        # Its account sent a transaction meanwhile: the node's next one takes the next nonce.
        assert (await client.call("models.register", zk_model("after")))["tx"].startswith("0x")
    assert_one_outage_logged(caplog, anvil.url)


async def test_a_node_whose_rpc_hangs_starts_and_stops_promptly(
    tmp_path: Path, chain: Chain
) -> None:
    with hung_rpc() as (url, accepted):
        home = outage_home(tmp_path, chain, url)
        process = NodeProcess(home)
        try:
            process.wait_ready()  # not held up by the chain
            await wait_for(accepted.is_set, 30, "the node asked the hung RPC")
            began = time.monotonic()
            assert process.stop(signal.SIGTERM, timeout=5.0) == 0
            stopped_in = time.monotonic() - began
        finally:
            process.kill()
    assert stopped_in < 5.0
    assert "Traceback" not in process.log()


async def test_a_database_of_another_chain_stops_the_node_with_one_line(
    tmp_path: Path, chain: Chain
) -> None:
    home = rpc_home(tmp_path, chain)
    db = home.config.node.data_dir / "state.db"
    with node_process(home) as first:
        await wait_for(lambda: db.exists() and recorded(db) != [], 30, "followed chain 31337")
        assert first.stop() == 0
    other = AnvilProcess(chain_id=1337)
    other.start()
    try:
        elsewhere = await trio.to_thread.run_sync(deploy_chain, other.url)
        elsewhere.deployment.write(tmp_path / "deployment.json")
        home.set("chain", "rpc_url", f'"{other.url}"')
        process = NodeProcess(home)
        code = await trio.to_thread.run_sync(partial(process.proc.wait, 60))
    finally:
        process.kill()
        other.stop()
    assert code == 2, process.log()
    assert process.log().splitlines()[-1] == (
        f"joynode: chain.rpc_url: the state database {db} follows"
        f" chain 31337, but chain.rpc_url {other.url} serves chain 1337: point chain.rpc_url"
        " back at chain 31337, or give chain 1337 its own node.data_dir"
    )
    assert "Traceback" not in process.log()


def test_rpc_mode_without_its_deployment_file_stops_with_one_line(tmp_path: Path) -> None:
    home = make_home(tmp_path / "node")
    missing = tmp_path / "nowhere" / "deployment.json"
    home.set("chain", "mode", '"rpc"')
    home.set("chain", "deployment_file", f'"{missing}"')
    process = NodeProcess(home)
    try:
        code = process.proc.wait(60)
    finally:
        process.kill()
    assert code == 2
    assert process.log().splitlines()[-1] == (
        f"joynode: chain.deployment_file: no file at {missing}: run `joynode deploy --config ...`"
    )
    assert "Traceback" not in process.log()


def test_rpc_retries_back_off_to_their_cap_with_jitter_and_start_over_after_a_success() -> None:
    backoff = Backoff(0.5, 4.0)
    for nominal in (0.5, 1.0, 2.0, 4.0, 4.0, 4.0):
        assert 0.75 * nominal <= backoff.next_delay() <= nominal
    backoff.reset()
    assert backoff.next_delay() <= 0.5


def test_rpc_urls_are_shown_without_their_credentials() -> None:
    # Providers put API keys in the path or the user part; logs and chain.status show neither.
    assert (
        public_url("https://user:secret@rpc.example:8545/v3/KEY?x=1") == "https://rpc.example:8545"
    )
    assert public_url("http://[::1]:8545/") == "http://[::1]:8545"
