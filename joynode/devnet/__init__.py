"""``joynode devnet``: a whole JoyNet on this machine, for newcomers, demos and tests.

One anvil chain (its state kept in ``DIR/chain``), JoyNet's contracts deployed
once, a second anvil chain (``DIR/side-chain``, id 31338: with the first, every
node serves it at ``/rpc/{chain_id}``), N node homes (``DIR/node0``...), each
funded, staked and registered (for inference, and with a deposit as a SovereignRPC
provider of both chains), the demo model published to the store by node 0
and fetched from it by the others by CID, the model registered in the
marketplace, and N ``joynode run`` processes bootstrapped from node 0. Running
it again reuses all of it (keys, chain state, the model in each node's cache).
SIGINT or SIGTERM stops the nodes first (each stops cleanly on SIGTERM), then
the chains, which save their state.
Every process it starts is tethered (``joynode.tether``): a devnet killed with
SIGKILL takes its nodes and anvil with it.

It is where fault tolerance is tried: a node or anvil that dies is shown as
down in one line and started again (``processes``), the others keep running,
and ``joynode devnet status`` (``DIR/devnet.json``) shows each one's state.
With ``--netns`` each node has its own network namespace (``network``), so
partitions can be made with ``ip``.

Node configs are written by the devnet on every start (ports are the
kernel's choice at a node's first start, kept for its restarts; ``--set``
adds or replaces keys in all of them); everything else in a home is the node's own.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio
from eth_account import Account
from rich.console import Console
from web3 import Web3

from joynode.chain.anvil import dev_account
from joynode.chain.artifacts import load_artifacts
from joynode.chain.deploy import JOY, Deployment, local_deployment
from joynode.chain.sender import RevertDecoder, TransactionSender
from joynode.config import ConfigError, parse_config
from joynode.console import print_job, stderr, step, verified_inference
from joynode.control.client import ControlClient
from joynode.control.jsonrpc import RpcError
from joynode.devnet.governance import give_votes, governance_lines
from joynode.devnet.network import (
    LOOPBACK_HOST,
    DevnetNetwork,
    NetworkError,
    create_namespaces,
    remove_namespaces,
)
from joynode.devnet.processes import ChainKeeper, DevnetError, DevnetNode, NodeSupervisor
from joynode.devnet.status import is_running, read_status, status_lines, write_status
from joynode.exceptiongroups import leaves
from joynode.inference.models import model_id, prepare
from joynode.keys import NodeKey
from joynode.secret_files import ControlToken, write_secret_file

NODE_FUNDING_ETH = 100
NODE_FUNDING_JOY = 10_000
STAKE_JOY = 1_000
MODEL_PRICE_JOY = 1
MESH_TIMEOUT_S = 120.0
DEMO_PROMPT = "What is the capital of France? Answer in one sentence."
DEMO_DEPOSIT_JOY = 10  # ten jobs at MODEL_PRICE_JOY
MAIN_CHAIN_ID = 31337  # JoyNet's contracts
SIDE_CHAIN_ID = 31338  # a second chain, for the chain RPC gateway
CHAIN_NAMES = {MAIN_CHAIN_ID: "joynet", SIDE_CHAIN_ID: "side"}

Override = tuple[str, str, str]  # section, key, TOML value


@dataclass(frozen=True)
class DevnetOptions:
    dir: Path
    nodes: int
    model: str  # a preparable model: tiny or smollm2
    models_dir: Path
    demo: bool = False
    netns: bool = False  # one network namespace per node (root only)
    overrides: tuple[Override, ...] = ()  # --set section.key=value, in every node's config


@dataclass(frozen=True)
class RunningDevnet:
    rpc_url: str
    side_rpc_url: str  # the second chain, served with the first by every node's /rpc
    deployment: Deployment
    model_cid: str
    nodes: list[DevnetNode]


def parse_override(text: str) -> Override:
    """``--set section.key=value``: the value as TOML, or as a string if it is not TOML."""
    name, sep, value = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not section or not key or "." in key:
        raise ValueError(f"--set {text!r}: expected SECTION.KEY=VALUE, e.g. storage.quota_gib=1")
    try:
        tomllib.loads(f"v = {value.strip()}")
    except tomllib.TOMLDecodeError:
        value = json.dumps(value.strip())
    return section, key, value.strip()


def check_overrides(options: DevnetOptions) -> None:
    """Validate ``--set`` against the node config schema before anything starts."""
    chains = dict.fromkeys(CHAIN_NAMES, "http://127.0.0.1:8545")
    text = _config_text(options, 0, "", chains, [], (0, 0, 0), LOOPBACK_HOST)
    try:
        parse_config(tomllib.loads(text), options.dir, source="(a devnet node's config with --set)")
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--set makes an invalid config: {exc}") from None


async def run_devnet(
    options: DevnetOptions,
    *,
    task_status: trio.TaskStatus[RunningDevnet] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Start the devnet, report it with ``task_status``, and keep it up until cancelled."""
    options.dir.mkdir(parents=True, exist_ok=True)
    await _remove_leftovers(options.dir)
    folder = options.models_dir / options.model
    if not (folder / "config.json").is_file():
        with step(f"preparing model {options.model}") as shown:
            await trio.to_thread.run_sync(partial(prepare, options.model, folder, shown.note))
    with step(f"identifying model {options.model} (its CID)"):
        cid = await trio.to_thread.run_sync(model_id, folder)
    nodes = [_node_home(options.dir / f"node{i}") for i in range(options.nodes)]
    network = DevnetNetwork()
    if options.netns:
        with step(f"making {len(nodes)} network namespaces"):
            network = await create_namespaces(len(nodes))
    try:
        await _run(options, network, nodes, cid, task_status)
    finally:
        with trio.CancelScope(shield=True):
            await remove_namespaces(network)


async def _run(
    options: DevnetOptions,
    network: DevnetNetwork,
    nodes: list[DevnetNode],
    cid: str,
    task_status: trio.TaskStatus[RunningDevnet],
) -> None:
    phase = "starting"
    governance: list[str] = []  # where the DAO stands, once the nodes are up

    def changed() -> None:
        write_status(
            options.dir,
            {
                "dir": str(options.dir),
                "pid": os.getpid(),
                "phase": phase,
                "chain": {"url": chain.url, **chain.supervised.to_json()},
                "side_chain": {"url": side.url, **side.supervised.to_json()},
                "network": network.to_json(),
                "nodes": [node.summary() for node in nodes],
                "governance": governance,
            },
        )

    chain = ChainKeeper(
        network,
        options.dir / "chain" / "anvil-state.json",
        options.dir / "chain" / "anvil.log",
        changed,
    )
    side = ChainKeeper(
        network,
        options.dir / "side-chain" / "anvil-state.json",
        options.dir / "side-chain" / "anvil.log",
        changed,
        chain_id=SIDE_CHAIN_ID,
    )
    async with trio.open_nursery() as chain_nursery:
        rpc_url = await chain_nursery.start(chain.run)
        side_url = await chain_nursery.start(side.run)
        try:
            w3 = Web3(Web3.HTTPProvider(rpc_url))
            with step("deploying contracts (once)"):
                deployment = await trio.to_thread.run_sync(
                    local_deployment, w3, options.dir / "chain" / "deployment.json"
                )
            with step(f"funding and staking {len(nodes)} nodes"):
                for node in nodes:
                    await trio.to_thread.run_sync(_fund_and_stake, w3, deployment, node.key)
            with step("delegating the dev accounts' JOY votes to themselves"):
                await trio.to_thread.run_sync(give_votes, w3, deployment)
            with step("registering the model in the marketplace"):
                committee = min(3, len(nodes))
                await trio.to_thread.run_sync(_register_model, w3, deployment, cid, committee)
            chains = {MAIN_CHAIN_ID: rpc_url, SIDE_CHAIN_ID: side_url}
            write_config = partial(_write_config, options, cid, chains, nodes, network)
            async with NodeSupervisor.running(nodes, network, write_config, changed) as nodes_kept:
                first = nodes[0]
                with step("starting node 0"):
                    await nodes_kept.start(first)
                folder = options.models_dir / options.model
                with step(f"publishing {options.model} from node 0") as shown:
                    await _publish(first, folder, shown.note)
                rest = nodes[1:]
                with step(f"starting {len(rest)} more nodes (they fetch the model from node 0)"):
                    async with trio.open_nursery() as nursery:
                        for node in rest:
                            nursery.start_soon(nodes_kept.start, node)
                with step("registering the nodes on-chain and waiting for them to meet"):
                    for node in nodes:
                        await _call(node, "node.register")
                    await _wait_until_meshed(nodes)
                with step("registering the nodes as chain RPC providers of both chains"):
                    for node in nodes:
                        await _serve_chains(node, list(chains))
                devnet = RunningDevnet(rpc_url, side_url, deployment, cid, nodes)
                voters: list[tuple[str, str]] = [("dev account 0", dev_account(0).address)]
                voters += [(f"node {node.index}", node.key.address) for node in nodes]
                governance[:] = await trio.to_thread.run_sync(
                    governance_lines, w3, deployment, voters
                )
                _print_summary(devnet, options, network, governance)
                if options.demo:
                    await _demo(first)
                    await _openai_demo(first, options.model)
                phase = "ready"
                changed()
                print("devnet ready; Ctrl-C stops it", flush=True)
                task_status.started(devnet)
                await trio.sleep_forever()
        finally:
            chain.stop()  # after the nodes: none of them sees the chain go first
            side.stop()
            phase = "stopped"
            changed()


def run_until_signal(options: DevnetOptions) -> int:
    """``joynode devnet``: run until SIGINT/SIGTERM, then stop everything; the exit code.

    A failure to start (or a namespace that cannot be made) is one line, exit 1.
    """

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
    except BaseExceptionGroup as group:
        failed, rest = group.split((DevnetError, NetworkError))
        if failed is None or rest is not None:
            raise
        stderr.print(f"[red]devnet failed:[/red] {leaves(failed)[0]}", soft_wrap=True)
        return 1
    stderr.print("devnet stopped")
    return 0


def devnet_status(directory: Path) -> tuple[bool, list[str]]:
    """``joynode devnet status``: whether a devnet runs in ``directory``, and its lines."""
    data = read_status(directory)
    if data is None:
        return False, [f"no devnet has run in {directory}"]
    if not is_running(data):
        return False, [f"no devnet running in {directory} (the last one is {data['phase']})"]
    return True, status_lines(data)


async def _remove_leftovers(directory: Path) -> None:
    """The namespaces a devnet killed in this folder left behind (none if it still runs)."""
    data = read_status(directory)
    if data is None:
        return
    if is_running(data):
        raise DevnetError(f"a devnet already runs in {directory} (pid {data['pid']})")
    await remove_namespaces(DevnetNetwork.from_json(data.get("network")))


# ---- node homes and configs


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
    options: DevnetOptions,
    cid: str,
    chains: dict[int, str],
    nodes: list[DevnetNode],
    network: DevnetNetwork,
    node: DevnetNode,
) -> None:
    """Before each start: its own ports once known, every other node that is up as bootstrap."""
    bootstrap = [a for other in nodes if other is not node for a in other.bootstrap_addrs()]
    host = network.node_host(node.index)
    text = _config_text(options, node.index, cid, chains, bootstrap, node.ports(), host)
    node.config_path.write_text(text, encoding="utf-8")


def _config_text(
    options: DevnetOptions,
    index: int,
    cid: str,
    chains: dict[int, str],
    bootstrap: list[str],
    ports: tuple[int, int, int],
    host: str,
) -> str:
    control_port, http_port, p2p_port = ports
    # Node 0 serves the prepared folder (and publishes it); the others fetch it by CID.
    folder = (options.models_dir / options.model).resolve()
    model = {"path": json.dumps(str(folder))} if index == 0 else {"cid": json.dumps(cid)}
    sections: dict[str, dict[str, str]] = {
        "node": {"data_dir": '"data"', "key_file": '"node.key"'},
        "control": {
            "listen": json.dumps(f"{host}:{control_port}"),
            "token_file": '"control.token"',
            # A namespace's address is not loopback, but only this machine reaches it.
            **({"allow_remote": "true"} if host != LOOPBACK_HOST else {}),
        },
        "http": {"listen": json.dumps(f"{host}:{http_port}")},
        "p2p": {
            "listen": json.dumps([f"/ip4/{host}/tcp/{p2p_port}"]),
            "bootstrap": json.dumps(bootstrap),
            "heartbeat_interval_s": "1.0",
            "reconnect_backoff_max_s": "5.0",
        },
        "chain": {
            "mode": '"rpc"',
            "rpc_url": json.dumps(chains[MAIN_CHAIN_ID]),
            "deployment_file": json.dumps(
                str((options.dir / "chain" / "deployment.json").resolve())
            ),
            "poll_interval_s": "0.5",
        },
        # Every node serves both chains at /rpc/{chain_id} (the chain RPC gateway).
        "rpc": {
            "chains": "["
            + ", ".join(
                f"{{chain_id = {chain_id}, name = {json.dumps(CHAIN_NAMES[chain_id])}, "
                f"upstreams = [{json.dumps(url)}]}}"
                for chain_id, url in chains.items()
            )
            + "]",
            "head_poll_s": "1.0",
        },
    }
    models = {"name": json.dumps(options.model), **model}
    for section, key, value in options.overrides:
        sections.setdefault(section, {})[key] = value
    text = "# Written by `joynode devnet` on every start; edit the devnet, not this file.\n"
    for section, keys in sections.items():
        text += f"\n[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())
    text += "\n[[inference.models]]\n" + "".join(f"{k} = {v}\n" for k, v in models.items())
    return text


async def _demo(node: DevnetNode) -> None:
    """One paid job (escrowed by a transaction), then a prepaid one: node 0's account
    deposits once, signs the request, and the committee settles it in its next batch."""
    url, token = node.control_url(), node.token.value
    print_job(await verified_inference(url, token, DEMO_PROMPT, None, 32, "paid"))
    with step(f"depositing {DEMO_DEPOSIT_JOY} JOY into node 0's prepaid balance"):
        balance = await _call(node, "balance.deposit", {"amount_joy": DEMO_DEPOSIT_JOY})
    print_job(await verified_inference(url, token, DEMO_PROMPT, None, 32, "prepaid"))
    spendable = (await _call(node, "balance.get"))["spendable"]
    print(
        f"prepaid balance {int(balance['balance']) / JOY:g} JOY, {int(spendable) / JOY:g} "
        "spendable (the job is owed until its batch lands: joynode ctl prepaid.settlements)",
        flush=True,
    )


async def _openai_demo(node: DevnetNode, model: str) -> None:
    """A chat answer through node 0's OpenAI-compatible API, with its certificate; the
    API key it made is left in ``openai.key`` (0600) beside the node's config."""
    key_file = openai_key_file(node)
    with step("asking node 0's OpenAI-compatible API") as shown:
        if key_file.exists():  # from an earlier start: a new key replaces it
            old_id = key_file.read_text().split("-")[1]
            with contextlib.suppress(RpcError):
                await _call(node, "apikeys.revoke", {"id": old_id})
        made = await _call(node, "apikeys.create", {"name": "devnet"})
        write_secret_file(key_file, made["key"], force=True)
        assert node.endpoints is not None
        assert node.endpoints.http_url is not None
        body = {
            "model": model,
            "messages": [{"role": "user", "content": DEMO_PROMPT}],
            "max_tokens": 32,
            "temperature": 0,
        }
        url = node.endpoints.http_url + "/v1/chat/completions"
        answer = await trio.to_thread.run_sync(post_json, url, made["key"], body)
        certificate = answer["joynet"]["certificate"]
        shown.note(f"{len(certificate['signers'])} of {len(certificate['committee'])} signed")
    text = answer["choices"][0]["message"]["content"].strip()
    print(
        f'OpenAI API: "{text}" ({len(certificate["signers"])} of '
        f"{len(certificate['committee'])} signed, request {certificate['request_id'][:14]}...)",
        flush=True,
    )


def openai_key_file(node: DevnetNode) -> Path:
    return node.home / "openai.key"


def post_json(url: str, key: str, body: dict[str, Any]) -> Any:
    """POST ``body`` with an API key; the JSON answer (``DevnetError`` with its message)."""
    if not url.startswith("http://"):
        raise DevnetError(f"not an http URL: {url}")
    request = urllib.request.Request(  # noqa: S310 (checked above)
        url,
        json.dumps(body).encode(),
        {"content-type": "application/json", "authorization": f"Bearer {key}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:  # noqa: S310
            return json.load(response)
    except urllib.error.HTTPError as exc:
        raise DevnetError(f"{url}: {exc.code}: {exc.read().decode(errors='replace')}") from None


async def _call(node: DevnetNode, method: str, params: dict[str, Any] | None = None) -> Any:
    async with ControlClient.connect(node.control_url(), node.token.value) as client:
        return await client.call(method, params)


async def _serve_chains(node: DevnetNode, chain_ids: list[int]) -> None:
    """Register ``node`` with a deposit as a SovereignRPC provider of each chain it is not
    one of yet (a devnet started again keeps its deposits)."""
    for chain_id in chain_ids:
        listed = await _call(node, "rpc.providers", {"chain_id": chain_id})
        if not any(p["provider"] == node.key.address.lower() for p in listed):
            await _call(node, "rpc.register", {"chain_id": chain_id, "deposit_joy": 100})


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
    with trio.move_on_after(MESH_TIMEOUT_S):
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
    raise DevnetError(f"the nodes did not all meet within {MESH_TIMEOUT_S:.0f} s; see their logs")


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


def _print_summary(
    devnet: RunningDevnet, options: DevnetOptions, network: DevnetNetwork, governance: list[str]
) -> None:
    out = Console(highlight=False, soft_wrap=True)  # whole URLs and paths, never cut
    out.print(
        f"[bold]JoyNet devnet[/bold]: {len(devnet.nodes)} nodes, chain {devnet.rpc_url} "
        f"(id {MAIN_CHAIN_ID}), a second chain {devnet.side_rpc_url} (id {SIDE_CHAIN_ID})"
    )
    out.print(f"model {options.model}: {devnet.model_cid}")
    for node in devnet.nodes:
        row = node.summary()
        out.print(f"[bold]node {row['node']}[/bold]  {row['address']}")
        for name in ("control", "dashboard", "config", "log"):
            out.print(f"  {name:<10} {row[name]}")
    if network.namespaces:
        out.print(
            f"each node in its own network namespace ({', '.join(network.namespaces)}) on "
            f"bridge {network.bridge}, {network.subnet}"
        )
    for line in governance:
        out.print(line)
    home = devnet.nodes[0].home
    out.print(f"dashboard token: the node's control.token, e.g. {home}/control.token")
    out.print(f"governance:      joynode gov --config {home}/joynode.toml list")
    out.print(f'send a request:  joynode ctl --config {home}/joynode.toml infer "Tell me a joke"')
    first = devnet.nodes[0]
    if first.endpoints is not None and first.endpoints.http_url is not None:
        out.print(
            f"OpenAI API:      {first.endpoints.http_url}/v1 (key in {openai_key_file(first)} "
            "with --demo, or make one: joynode apikeys create NAME)"
        )
        out.print(
            f"chain RPC:       {first.endpoints.http_url}/rpc/{MAIN_CHAIN_ID} and "
            f"/rpc/{SIDE_CHAIN_ID} (the same keys: point web3.py or viem at them)"
        )
        out.print(
            f"  curl {first.endpoints.http_url}/v1/chat/completions "
            f'-H "authorization: Bearer $(cat {openai_key_file(first)})" '
            "-H 'content-type: application/json' "
            f"""-d '{{"model": "{options.model}", "messages": [{{"role": "user", """
            """"content": "Tell me a joke"}]}'"""
        )
