"""A local anvil chain, started and stopped by the node or the tests.

anvil ships as a binary inside the npm package ``@foundry-rs/anvil`` (installed
by ``make`` from package-lock.json, no download at run time). It listens on
127.0.0.1 only; ``--port 0`` lets it pick a free port, which we read from its
"Listening on" line (a devnet in network namespaces has it listen on its
bridge's address instead). With a state file it loads its state at start and
writes it back every few seconds and at exit (SIGTERM), so balances, contracts
and blocks survive restarts; a SIGKILLed anvil restarts from its last save.
It runs ``tethered`` to whoever starts it, so it never outlives a killed node.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio
from eth_account import Account
from eth_account.signers.local import LocalAccount

from joynode.tether import tethered

ROOT = Path(__file__).resolve().parents[2]
ANVIL_BINARY = ROOT / "node_modules" / "@foundry-rs" / "anvil-linux-amd64" / "bin" / "anvil"
LISTENING = re.compile(rb"Listening on (\d+\.\d+\.\d+\.\d+):(\d+)")
START_TIMEOUT_S = 20.0
# anvil's default dev accounts come from this well-known mnemonic; they are
# public test keys, never to be used on a real network.
DEV_MNEMONIC = "test test test test test test test test test test test junk"


def dev_account(index: int) -> LocalAccount:
    """anvil's public test account ``index`` (deployer and faucet of local chains only)."""
    Account.enable_unaudited_hdwallet_features()
    account: LocalAccount = Account.from_mnemonic(
        DEV_MNEMONIC, account_path=f"m/44'/60'/0'/0/{index}"
    )
    return account


class AnvilError(Exception):
    """anvil is missing, or did not start."""


@dataclass(frozen=True)
class RunningAnvil:
    url: str
    chain_id: int
    process: trio.Process


def anvil_binary() -> Path:
    if not ANVIL_BINARY.is_file():
        raise AnvilError(f"anvil not found at {ANVIL_BINARY}; run `make install` (npm ci)")
    return ANVIL_BINARY


def anvil_command(
    *,
    host: str = "127.0.0.1",
    chain_id: int = 31337,
    port: int = 0,
    state_file: Path | None = None,
    accounts: int = 10,
    balance_eth: int = 10_000,
) -> list[str]:
    """The anvil command line: loopback (or ``host``), dev accounts, optional persisted state."""
    command = [
        str(anvil_binary()),
        "--host",
        host,
        "--port",
        str(port),
        "--chain-id",
        str(chain_id),
        "--accounts",
        str(accounts),
        "--balance",
        str(balance_eth),
        "--mnemonic",
        DEV_MNEMONIC,
    ]
    if state_file is not None:
        state_file.parent.mkdir(parents=True, exist_ok=True)
        command += ["--state", str(state_file), "--state-interval", "5"]
    return command


def listening_url(output: bytes) -> str | None:
    """The RPC URL from anvil's "Listening on" line, once it has printed it."""
    match = LISTENING.search(output)
    return f"http://{match.group(1).decode()}:{match.group(2).decode()}" if match else None


@asynccontextmanager
async def running_anvil(
    *,
    host: str = "127.0.0.1",
    chain_id: int = 31337,
    port: int = 0,
    state_file: Path | None = None,
    log_file: Path | None = None,
) -> AsyncIterator[RunningAnvil]:
    """Run anvil for the duration of the block; stop it (state saved) on exit.

    Its output after the "Listening on" line goes to ``log_file`` (appended), or nowhere.
    """
    command = tethered(
        anvil_command(host=host, chain_id=chain_id, port=port, state_file=state_file)
    )
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                check=False,
                # Out of the terminal's process group: a Ctrl-C is for the node (or the
                # devnet), which stops anvil itself, last, once nothing needs the chain.
                start_new_session=True,
            )
        )
        try:
            url = await _wait_listening(process)
            assert process.stdout is not None
            # Keep reading its output so anvil never blocks on a full pipe.
            nursery.start_soon(_drain, process.stdout, log_file)
            yield RunningAnvil(url, chain_id, process)
        finally:
            # SIGTERM makes anvil write its state file before exiting.
            process.terminate()
            with trio.move_on_after(10, shield=True):
                await process.wait()
            nursery.cancel_scope.cancel()


async def _wait_listening(process: trio.Process) -> str:
    assert process.stdout is not None
    seen = b""
    with trio.move_on_after(START_TIMEOUT_S):
        while True:
            chunk = await process.stdout.receive_some(4096)
            if not chunk:
                break
            seen += chunk
            url = listening_url(seen)
            if url is not None:
                return url
    raise AnvilError(f"anvil did not start: {seen.decode(errors='replace')[-2000:]}")


async def _drain(stream: trio.abc.ReceiveStream, log_file: Path | None) -> None:
    log = await trio.open_file(log_file, "ab") if log_file is not None else None
    try:
        while chunk := await stream.receive_some(65536):
            if log is not None:
                await log.write(chunk)
                await log.flush()
    except (trio.ClosedResourceError, trio.BrokenResourceError):
        pass
    finally:
        if log is not None:
            with trio.CancelScope(shield=True):
                await log.aclose()
