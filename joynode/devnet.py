"""``joynode devnet``: a whole JoyNet on this machine, for newcomers, demos and tests.

One anvil chain (its state kept in ``DIR/chain``), JoyNet's contracts deployed
once, N node homes (``DIR/node0``...), each funded, staked and registered, the
demo model published to the store by node 0 and fetched from it by the others
by CID, the model registered in the marketplace, and N ``joynode run``
processes bootstrapped from node 0. Running it again reuses all of it (keys,
chain state, the model in each node's cache). SIGINT or SIGTERM stops the
nodes first (each stops cleanly on SIGINT), then anvil, which saves its state.

Node configs are written by the devnet on every start (ports are the
kernel's choice each time, so two devnets never collide); everything else in
a home is the node's own.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio
from eth_account import Account
from rich.console import Console
from web3 import Web3

from joynode.chain.anvil import dev_account, running_anvil
from joynode.chain.artifacts import load_artifacts
from joynode.chain.deploy import JOY, Deployment, local_deployment
from joynode.chain.sender import RevertDecoder, TransactionSender
from joynode.console import print_job, stderr, step, verified_inference
from joynode.control.client import ControlClient
from joynode.endpoints import Endpoints
from joynode.inference.models import model_id, prepare
from joynode.keys import ControlToken, NodeKey

NODE_FUNDING_ETH = 100
NODE_FUNDING_JOY = 10_000
STAKE_JOY = 1_000
MODEL_PRICE_JOY = 1
START_TIMEOUT_S = 900.0  # first start: the model fetched from node 0 and a vLLM engine per node
STOP_TIMEOUT_S = 15.0
DEMO_PROMPT = "What is the capital of France? Answer in one sentence."


class DevnetError(Exception):
    """The devnet cannot start or a node died; the message says which and where its log is."""


@dataclass(frozen=True)
class DevnetOptions:
    dir: Path
    nodes: int
    model: str  # a preparable model: tiny or smollm2
    models_dir: Path
    demo: bool = False


@dataclass
class DevnetNode:
    index: int
    home: Path
    key: NodeKey
    token: ControlToken
    process: trio.Process | None = None
    endpoints: Endpoints | None = None

    @property
    def config_path(self) -> Path:
        return self.home / "joynode.toml"

    @property
    def log_path(self) -> Path:
        return self.home / "node.log"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    def control_url(self) -> str:
        assert self.endpoints is not None
        return self.endpoints.control_url

    def summary(self) -> dict[str, Any]:
        assert self.endpoints is not None
        return {
            "node": self.index,
            "address": self.key.address,
            "peer_id": self.key.peer_id,
            "control": self.endpoints.control_url,
            "dashboard": (self.endpoints.http_url or "") + "/",
            "config": str(self.config_path),
            "log": str(self.log_path),
        }


@dataclass(frozen=True)
class RunningDevnet:
    rpc_url: str
    deployment: Deployment
    model_cid: str
    nodes: list[DevnetNode]


async def run_devnet(
    options: DevnetOptions,
    *,
    task_status: trio.TaskStatus[RunningDevnet] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Start the devnet, report it with ``task_status``, and keep it up until cancelled."""
    options.dir.mkdir(parents=True, exist_ok=True)
    folder = options.models_dir / options.model
    if not (folder / "config.json").is_file():
        with step(f"preparing model {options.model}") as shown:
            await trio.to_thread.run_sync(partial(prepare, options.model, folder, shown.note))
    with step(f"identifying model {options.model} (its CID)"):
        cid = await trio.to_thread.run_sync(model_id, folder)
    nodes = [_node_home(options.dir / f"node{i}") for i in range(options.nodes)]
    async with running_anvil(state_file=options.dir / "chain" / "anvil-state.json") as anvil:
        w3 = Web3(Web3.HTTPProvider(anvil.url))
        with step("deploying contracts (once)"):
            deployment = await trio.to_thread.run_sync(
                local_deployment, w3, options.dir / "chain" / "deployment.json"
            )
        with step(f"funding and staking {len(nodes)} nodes"):
            for node in nodes:
                await trio.to_thread.run_sync(_fund_and_stake, w3, deployment, node.key)
        with step("registering the model in the marketplace"):
            committee = min(3, len(nodes))
            await trio.to_thread.run_sync(_register_model, w3, deployment, cid, committee)
        async with _node_processes(nodes) as start:
            first = nodes[0]
            _write_config(first, anvil.url, options, folder, cid, bootstrap=[])
            with step("starting node 0"):
                await start(first)
            with step(f"publishing {options.model} from node 0") as shown:
                await _publish(first, folder, shown.note)
            assert first.endpoints is not None
            bootstrap = [f"{a}/p2p/{first.key.peer_id}" for a in first.endpoints.p2p_addrs]
            rest = nodes[1:]
            with step(f"starting {len(rest)} more nodes (they fetch the model from node 0)"):
                async with trio.open_nursery() as nursery:
                    for node in rest:
                        _write_config(node, anvil.url, options, folder, cid, bootstrap)
                        nursery.start_soon(start, node)
            with step("registering the nodes on-chain and waiting for them to meet"):
                for node in nodes:
                    await _call(node, "node.register")
                await _wait_until_meshed(nodes)
            devnet = RunningDevnet(anvil.url, deployment, cid, nodes)
            _print_summary(devnet, options)
            if options.demo:
                job = await verified_inference(
                    first.control_url(), first.token.value, DEMO_PROMPT, None, 32, True
                )
                print_job(job)
            print("devnet ready; Ctrl-C stops it", flush=True)
            task_status.started(devnet)
            await trio.sleep_forever()


def run_until_signal(options: DevnetOptions) -> int:
    """``joynode devnet``: run until SIGINT/SIGTERM, then stop everything; the exit code."""

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(run_devnet, options)
                async for signum in signals:
                    stderr.print(f"{signal.Signals(signum).name}: stopping the devnet")
                    break
                nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except DevnetError as exc:
        stderr.print(f"[red]devnet failed:[/red] {exc}")
        return 1
    stderr.print("devnet stopped")
    return 0


# ---- node homes and processes


def _node_home(home: Path) -> DevnetNode:
    """A node home: the key and token are made once and kept (mode 0600)."""
    home.mkdir(parents=True, exist_ok=True)
    key_file, token_file = home / "node.key", home / "control.token"
    if not key_file.exists():
        NodeKey.generate().save(key_file)
    if not token_file.exists():
        ControlToken.generate().save(token_file)
    index = int(home.name.removeprefix("node"))
    return DevnetNode(index, home, NodeKey.load(key_file), ControlToken.load(token_file))


def _write_config(
    node: DevnetNode,
    rpc_url: str,
    options: DevnetOptions,
    folder: Path,
    cid: str,
    bootstrap: list[str],
) -> None:
    # Node 0 serves the prepared folder (and publishes it); the others fetch it by CID.
    model = f'path = "{folder.resolve()}"' if node.index == 0 else f'cid = "{cid}"'
    node.config_path.write_text(
        f"""# Written by `joynode devnet` on every start; edit the devnet, not this file.
[node]
data_dir = "data"
key_file = "node.key"

[control]
listen = "127.0.0.1:0"
token_file = "control.token"

[http]
listen = "127.0.0.1:0"

[p2p]
listen = ["/ip4/127.0.0.1/tcp/0"]
bootstrap = {json.dumps(bootstrap)}
heartbeat_interval_s = 1.0

[chain]
mode = "rpc"
rpc_url = "{rpc_url}"
deployment_file = "{(options.dir / "chain" / "deployment.json").resolve()}"
poll_interval_s = 0.5

[[inference.models]]
name = "{options.model}"
{model}
""",
        encoding="utf-8",
    )


@asynccontextmanager
async def _node_processes(
    nodes: list[DevnetNode],
) -> AsyncIterator[Callable[[DevnetNode], Any]]:
    """Start nodes with the function this yields; on exit, stop them all (SIGINT, then kill)."""
    async with trio.open_nursery() as nursery:

        async def start(node: DevnetNode) -> None:
            (node.data_dir / "endpoints.json").unlink(missing_ok=True)  # a crash leaves one
            with node.log_path.open("ab") as log:
                node.process = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "joynode", "run", "--config", str(node.config_path)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    # Ctrl-C reaches the devnet only, which then stops the nodes in order.
                    start_new_session=True,
                )
            nursery.start_soon(_watch_process, node)
            with trio.move_on_after(START_TIMEOUT_S):
                while (endpoints := Endpoints.read(node.data_dir)) is None:
                    if node.process.returncode is not None:
                        raise DevnetError(f"node {node.index} exited at start; see {node.log_path}")
                    await trio.sleep(0.2)
                node.endpoints = endpoints
                return
            raise DevnetError(
                f"node {node.index} not ready in {START_TIMEOUT_S:.0f} s; see {node.log_path}"
            )

        try:
            yield start
        finally:
            with trio.CancelScope(shield=True):
                await _stop(nodes)
            nursery.cancel_scope.cancel()


async def _watch_process(node: DevnetNode) -> None:
    assert node.process is not None
    code = await node.process.wait()
    raise DevnetError(f"node {node.index} stopped (exit {code}); see {node.log_path}")


async def _stop(nodes: list[DevnetNode]) -> None:
    running = [n.process for n in nodes if n.process is not None and n.process.returncode is None]
    for process in running:
        process.send_signal(signal.SIGINT)
    with trio.move_on_after(STOP_TIMEOUT_S):
        for process in running:
            await process.wait()
    for process in running:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _call(node: DevnetNode, method: str, params: dict[str, Any] | None = None) -> Any:
    async with ControlClient.connect(node.control_url(), node.token.value) as client:
        return await client.call(method, params)


async def _publish(node: DevnetNode, folder: Path, note: Callable[[str], None]) -> str:
    def on_notification(notification: dict[str, Any]) -> None:
        progress = notification.get("params") or {}
        if "bytes" in progress:
            note(f"{progress['bytes'] / 1e6:.0f} MB")

    async with ControlClient.connect(
        node.control_url(), node.token.value, on_notification=on_notification
    ) as client:
        published = await client.call("models.publish", {"path": str(folder)})
    return str(published["cid"])


async def _wait_until_meshed(nodes: list[DevnetNode]) -> None:
    """Every node sees every other one up, and its chain mirror has every node registered."""
    others = len(nodes) - 1
    with trio.move_on_after(120):
        while True:
            ready = 0
            for node in nodes:
                peers = await _call(node, "peers.list")
                chain = await _call(node, "chain.status")
                up = sum(1 for p in peers if p.get("state") == "up")
                if up >= others and chain["registered_nodes"] >= len(nodes):
                    ready += 1
            if ready == len(nodes):
                return
            await trio.sleep(0.5)
    raise DevnetError("the nodes did not all meet within 120 s; see their logs")


# ---- chain


def _fund_and_stake(w3: Web3, deployment: Deployment, key: NodeKey) -> None:
    """ETH for gas, JOY to stake and pay with, and the stake itself (each only if missing)."""
    address = key.address
    if w3.eth.get_balance(Web3.to_checksum_address(address)) < JOY:
        w3.provider.make_request("anvil_setBalance", [address, hex(NODE_FUNDING_ETH * JOY)])  # type: ignore[arg-type]
    token = deployment.contract(w3, "JoyToken")
    coordinator = deployment.contract(w3, "NodeCoordinator")
    staked = int(coordinator.functions.nodeInfo(address).call()[0])
    if staked >= STAKE_JOY * JOY:
        return
    _admin(w3).transact(token.functions.transfer(address, NODE_FUNDING_JOY * JOY))
    node = TransactionSender(w3, Account.from_key(key.secret), _decoder())
    node.transact(token.functions.approve(coordinator.address, STAKE_JOY * JOY - staked))
    node.transact(coordinator.functions.stake(STAKE_JOY * JOY - staked))


def _decoder() -> RevertDecoder:
    return RevertDecoder(load_artifacts().contracts.values())


def _admin(w3: Web3) -> TransactionSender:
    """Anvil's first dev account: the deployer, faucet and model owner of the devnet."""
    return TransactionSender(w3, dev_account(0), _decoder())


def _register_model(w3: Web3, deployment: Deployment, cid: str, committee_size: int) -> None:
    market = deployment.contract(w3, "ModelMarketplace")
    owner = market.functions.modelInfo(market.functions.modelIdOf(cid).call()).call()[0]
    if int(owner, 16) != 0:
        return
    _admin(w3).transact(
        market.functions.registerModel(
            cid, MODEL_PRICE_JOY * JOY, committee_size, 0, [], [], b"\0" * 32, "0x" + "00" * 20
        )
    )


def _print_summary(devnet: RunningDevnet, options: DevnetOptions) -> None:
    out = Console(highlight=False, soft_wrap=True)  # whole URLs and paths, never cut
    out.print(f"[bold]JoyNet devnet[/bold]: {len(devnet.nodes)} nodes, chain {devnet.rpc_url}")
    out.print(f"model {options.model}: {devnet.model_cid}")
    for node in devnet.nodes:
        row = node.summary()
        out.print(f"[bold]node {row['node']}[/bold]  {row['address']}")
        for name in ("control", "dashboard", "config", "log"):
            out.print(f"  {name:<10} {row[name]}")
    home = devnet.nodes[0].home
    out.print(f"dashboard token: the node's control.token, e.g. {home}/control.token")
    out.print(f'send a request:  joynode ctl --config {home}/joynode.toml infer "Tell me a joke"')
