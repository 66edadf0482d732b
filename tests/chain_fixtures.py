"""A real anvil chain with JoyNet deployed, shared by a test session; and RPC outages.

Each test runs against a snapshot (``evm_snapshot``) taken after deployment and
funding, and reverts to it afterwards (and puts the chain's clock back to the
wall clock), so tests are isolated and fast. Dev
accounts come from anvil's public test mnemonic.

For outages: ``AnvilProcess`` (an anvil a test stops and starts again on the
same port, its chain kept in a state file), ``refused_port`` (nothing listens),
``hung_rpc`` (accepts, never answers) and ``rpc_proxy`` (a relay to the shared
anvil that a test cuts and restores, while the chain goes on behind it).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import pytest
import trio
from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.contract import Contract
from web3.exceptions import ContractLogicError
from web3.types import RPCEndpoint, TxReceipt

from joynode.chain.anvil import anvil_command, listening_url
from joynode.chain.anvil import dev_account as dev_account  # re-exported for the tests
from joynode.chain.artifacts import load_artifacts
from joynode.chain.deploy import JOY, Deployment, DeployParams, deploy_all
from joynode.chain.sender import RevertDecoder, TransactionFailed, TransactionSender, gas_limit
from joynode.keys import NodeKey


def node_key_of(account: LocalAccount) -> NodeKey:
    return NodeKey(bytes(account.key))


@dataclass
class Chain:
    w3: Web3
    url: str
    deployment: Deployment
    admin: LocalAccount  # the deployer: it holds no role once deployed
    treasury: str  # the timelock's address
    decoder: RevertDecoder

    def contract(self, name: str) -> Contract:
        return self.deployment.contract(self.w3, name)

    def sender(self, account: LocalAccount) -> TransactionSender:
        return TransactionSender(self.w3, account, self.decoder)

    def balance(self, address: str) -> int:
        return int(self.contract("JoyToken").functions.balanceOf(address).call())

    def as_timelock(self, call: Any) -> TxReceipt:
        """Send ``call`` from the DAO's timelock (anvil impersonation): the contract unit
        tests' shortcut past a vote; tests/test_governance.py goes through the real one."""
        timelock = self.treasury
        rpc = self.w3.provider.make_request
        rpc("anvil_impersonateAccount", [timelock])  # type: ignore[arg-type]
        rpc("anvil_setBalance", [timelock, hex(10**20)])  # type: ignore[arg-type]
        try:
            try:
                gas = gas_limit(call.estimate_gas({"from": timelock}))
                tx_hash = call.transact({"from": timelock, "gas": gas})
            except ContractLogicError as exc:
                reason = self.decoder.describe(bytes.fromhex(str(exc.data)[2:]))
                raise TransactionFailed(reason) from None
            return self.w3.eth.wait_for_transaction_receipt(tx_hash)
        finally:
            rpc("anvil_stopImpersonatingAccount", [timelock])  # type: ignore[arg-type]

    def advance(self, seconds: int) -> None:
        """Mine a block ``seconds`` after the latest one. (Not ``evm_increaseTime``: it
        counts from the wall clock, which a chain mining many blocks a second is ahead of.)"""
        self.advance_to(int(self.w3.eth.get_block("latest")["timestamp"]) + seconds)

    def advance_to(self, timestamp: int) -> None:
        """Mine a block at ``timestamp``, unless the chain is already there; the clock
        goes on from it."""
        if int(self.w3.eth.get_block("latest")["timestamp"]) >= timestamp:
            return
        rpc = self.w3.provider.make_request
        rpc(RPCEndpoint("evm_setNextBlockTimestamp"), [timestamp])
        rpc(RPCEndpoint("evm_mine"), [])


def _drain(stream: IO[bytes]) -> None:
    while stream.read(65536):
        pass


class AnvilProcess:
    """A real anvil on 127.0.0.1 that a test can stop and start again on the same port.

    With a state file, a stop saves the chain (blocks, hashes, receipts) and the
    next start loads it, as an RPC provider's outage would leave it.
    """

    def __init__(
        self, *, chain_id: int = 31337, accounts: int = 20, state_file: Path | None = None
    ) -> None:
        self._chain_id = chain_id
        self._accounts = accounts
        self._state_file = state_file
        self._process: subprocess.Popen[bytes] | None = None
        self._drain: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, port: int | None = None) -> str:
        """Start on ``port`` (default: the last one, or any free one the first time)."""
        command = anvil_command(
            chain_id=self._chain_id,
            port=self.port if port is None else port,
            state_file=self._state_file,
            accounts=self._accounts,
        )
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert process.stdout is not None
        seen = b""
        deadline = time.monotonic() + 20
        url = None
        while url is None and time.monotonic() < deadline and process.poll() is None:
            seen += process.stdout.read1(4096)  # type: ignore[attr-defined]
            url = listening_url(seen)
        if url is None:
            process.kill()
            process.wait()
            process.stdout.close()
            raise AssertionError(seen.decode(errors="replace"))
        # anvil logs every call; keep reading so it never blocks on a full pipe.
        self._drain = threading.Thread(target=_drain, args=(process.stdout,), daemon=True)
        self._drain.start()
        self._process = process
        self.port = int(url.rsplit(":", 1)[1])
        return url

    def stop(self) -> None:
        """SIGTERM: anvil writes its state file, then exits."""
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        process.wait(10)
        if self._drain is not None:
            self._drain.join(5)
        assert process.stdout is not None
        process.stdout.close()


def deploy_chain(url: str) -> Chain:
    """JoyNet deployed by dev account 0 with the devnet's settings (the treasury is the
    DAO's timelock); dev accounts 2-19 get JOY to use."""
    w3 = Web3(Web3.HTTPProvider(url))
    admin = dev_account(0)
    decoder = RevertDecoder(load_artifacts().contracts.values())
    sender = TransactionSender(w3, admin, decoder)
    deployment = deploy_all(sender, DeployParams.for_chain(int(w3.eth.chain_id)))
    chain = Chain(w3, url, deployment, admin, deployment.treasury, decoder)
    token = chain.contract("JoyToken")
    for index in range(2, 20):
        sender.transact(token.functions.transfer(dev_account(index).address, 100_000 * JOY))
    return chain


@contextmanager
def refused_port(port: int = 0) -> Iterator[int]:
    """A loopback port (``port``, or any free one) where connections are refused: bound,
    never listening, so nothing else takes it until the block ends."""
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", port))
        yield int(holder.getsockname()[1])


@contextmanager
def hung_rpc() -> Iterator[tuple[str, threading.Event]]:
    """An RPC URL that accepts connections and never answers; the event is set at the first."""
    accepted = threading.Event()
    held: list[socket.socket] = []
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()

        def accept() -> None:
            with contextlib.suppress(OSError):  # closed at the end of the block
                while True:
                    held.append(server.accept()[0])
                    accepted.set()

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.getsockname()[1]}", accepted
        finally:
            server.shutdown(socket.SHUT_RDWR)
            thread.join(5)
            for conn in held:
                conn.close()


@pytest.fixture(scope="session")
def anvil_url() -> Iterator[str]:
    anvil = AnvilProcess()
    try:
        yield anvil.start()
    finally:
        anvil.stop()


@pytest.fixture(scope="session")
def deployed(anvil_url: str) -> Chain:
    return deploy_chain(anvil_url)


@pytest.fixture
def chain(deployed: Chain) -> Iterator[Chain]:
    snapshot = deployed.w3.provider.make_request("evm_snapshot", [])  # type: ignore[arg-type]
    try:
        yield deployed
    finally:
        deployed.w3.provider.make_request("evm_revert", [snapshot["result"]])  # type: ignore[arg-type]
        # A revert also sets anvil's clock back to the snapshot's; the next test
        # (and its nodes' deadlines) expects the chain's time to be now.
        deployed.w3.provider.make_request("anvil_setTime", [int(time.time())])  # type: ignore[arg-type]


class RpcProxy:
    """A TCP relay to an RPC on a fixed loopback port. ``cut`` closes it (connections
    refused, open ones dropped); ``restore`` listens again on the same port."""

    def __init__(self, target_url: str, nursery: trio.Nursery) -> None:
        target = urlsplit(target_url)
        assert target.hostname is not None
        assert target.port is not None
        self._target = (target.hostname, target.port)
        self._nursery = nursery
        self._serving: tuple[trio.CancelScope, trio.Event] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def restore(self) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        self.port = int(listeners[0].socket.getsockname()[1])
        scope, done = trio.CancelScope(), trio.Event()
        self._serving = (scope, done)
        self._nursery.start_soon(self._serve, listeners, scope, done)

    async def cut(self) -> None:
        assert self._serving is not None
        scope, done = self._serving
        scope.cancel()
        await done.wait()
        self._serving = None

    async def _serve(
        self, listeners: list[trio.SocketListener], scope: trio.CancelScope, done: trio.Event
    ) -> None:
        try:
            with scope:
                async with trio.open_nursery() as connections:
                    await trio.serve_listeners(self._relay, listeners, handler_nursery=connections)
        finally:
            for listener in listeners:
                await listener.aclose()
            done.set()

    async def _relay(self, client: trio.SocketStream) -> None:
        async with (
            client,
            await trio.open_tcp_stream(*self._target) as upstream,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(_pump, client, upstream, nursery.cancel_scope)
            nursery.start_soon(_pump, upstream, client, nursery.cancel_scope)


async def _pump(source: trio.SocketStream, sink: trio.SocketStream, both: trio.CancelScope) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while data := await source.receive_some(65536):
            await sink.send_all(data)
    both.cancel()  # one side closed: the relay is over


@asynccontextmanager
async def rpc_proxy(target_url: str) -> AsyncIterator[RpcProxy]:
    async with trio.open_nursery() as nursery:
        proxy = RpcProxy(target_url, nursery)
        await proxy.restore()
        yield proxy
        nursery.cancel_scope.cancel()
