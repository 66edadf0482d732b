"""A real anvil chain with JoyNet deployed, shared by a test session.

Each test runs against a snapshot (``evm_snapshot``) taken after deployment and
funding, and reverts to it afterwards (and puts the chain's clock back to the
wall clock), so tests are isolated and fast. Dev
accounts come from anvil's public test mnemonic.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

import pytest
from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.contract import Contract

from joynode.chain.anvil import anvil_command, listening_url
from joynode.chain.anvil import dev_account as dev_account  # re-exported for the tests
from joynode.chain.artifacts import load_artifacts
from joynode.chain.deploy import JOY, Deployment, DeployParams, deploy_all
from joynode.chain.sender import RevertDecoder, TransactionSender
from joynode.keys import NodeKey


def node_key_of(account: LocalAccount) -> NodeKey:
    return NodeKey(bytes(account.key))


@dataclass
class Chain:
    w3: Web3
    url: str
    deployment: Deployment
    admin: LocalAccount
    treasury: LocalAccount
    decoder: RevertDecoder

    def contract(self, name: str) -> Contract:
        return self.deployment.contract(self.w3, name)

    def sender(self, account: LocalAccount) -> TransactionSender:
        return TransactionSender(self.w3, account, self.decoder)

    def balance(self, address: str) -> int:
        return int(self.contract("JoyToken").functions.balanceOf(address).call())

    def advance(self, seconds: int) -> None:
        self.w3.provider.make_request("evm_increaseTime", [seconds])  # type: ignore[arg-type]
        self.w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]


def _drain(stream: IO[bytes]) -> None:
    while stream.read(65536):
        pass


@pytest.fixture(scope="session")
def anvil_url() -> Iterator[str]:
    process = subprocess.Popen(
        anvil_command(accounts=20), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert process.stdout is not None
    seen = b""
    deadline = time.monotonic() + 20
    url = None
    while url is None and time.monotonic() < deadline:
        seen += process.stdout.read1(4096)  # type: ignore[attr-defined]
        url = listening_url(seen)
    assert url is not None, seen.decode(errors="replace")
    # anvil logs every call; keep reading so it never blocks on a full pipe.
    drain = threading.Thread(target=_drain, args=(process.stdout,), daemon=True)
    drain.start()
    try:
        yield url
    finally:
        process.terminate()
        process.wait(10)
        drain.join(5)
        process.stdout.close()


@pytest.fixture(scope="session")
def deployed(anvil_url: str) -> Chain:
    w3 = Web3(Web3.HTTPProvider(anvil_url))
    admin, treasury = dev_account(0), dev_account(1)
    decoder = RevertDecoder(load_artifacts().contracts.values())
    sender = TransactionSender(w3, admin, decoder)
    deployment = deploy_all(sender, DeployParams(treasury=treasury.address, unbonding_delay_s=3600))
    chain = Chain(w3, anvil_url, deployment, admin, treasury, decoder)
    token = chain.contract("JoyToken")
    for index in range(2, 20):  # every dev account gets JOY to stake and pay with
        sender.transact(token.functions.transfer(dev_account(index).address, 100_000 * JOY))
    return chain


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
