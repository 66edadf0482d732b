"""Sending transactions: nonces, fees, retries, receipts, and readable reverts.

``TransactionSender`` is synchronous (web3's HTTP provider is) and thread-safe;
the chain actor calls it through ``trio.to_thread`` with a limiter of one, so
the trio loop never waits on the chain and our nonces go out in order. It keeps
its own nonce (re-read from the chain when a send fails), prices EIP-1559 fees
from the latest base fee, replaces a transaction that is not mined in time with
the same nonce and at least 25 % higher fees (taking the receipt of whichever
version got mined), and turns a revert into a
``TransactionFailed`` naming the contract error and its arguments, e.g.
``NodeCoordinator.StakeTooLow(stake=0, minimum=100000000000000000000)``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from eth_abi.abi import decode as abi_decode
from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from eth_utils.crypto import keccak
from hexbytes import HexBytes
from web3 import Web3
from web3.exceptions import (
    ContractCustomError,
    ContractLogicError,
    TimeExhausted,
    TransactionNotFound,
    Web3Exception,
)
from web3.types import TxReceipt

from joynode.chain.artifacts import Compiled

log = logging.getLogger(__name__)

RECEIPT_TIMEOUT_S = 30.0
MAX_REPLACEMENTS = 3
FEE_BUMP = 1.25
GAS_MARGIN = 1.2
# Votes count by timestamp: a call that moves votes (stake, unstake, a JOY transfer between
# delegates) writes a new checkpoint slot when it lands in a later second than the estimate
# ran in, and updates one in place when not; two new slots cost about 40k more.
GAS_HEADROOM = 50_000
PRIORITY_FEE_WEI = 1_000_000_000  # 1 gwei


@dataclass(frozen=True)
class Revert:
    """A contract's custom error, decoded: ``contract`` is empty when several declare it."""

    contract: str
    name: str
    args: dict[str, Any]


def gas_limit(estimate: int) -> int:
    """The gas limit to send with a transaction estimated at ``estimate``."""
    return int(estimate * GAS_MARGIN) + GAS_HEADROOM


class TransactionFailed(Exception):
    """A transaction that reverted (or could not be sent); the message says why.

    ``revert`` is the contract's custom error when one of our contracts raised it,
    for callers that explain it further (the governance actor does).
    """

    def __init__(self, message: str, revert: Revert | None = None) -> None:
        super().__init__(message)
        self.revert = revert


@dataclass(frozen=True)
class ErrorSignature:
    contract: str
    name: str
    types: tuple[str, ...]
    names: tuple[str, ...]


class RevertDecoder:
    """Maps custom-error selectors of our contracts to readable messages."""

    def __init__(self, contracts: Iterable[Compiled]) -> None:
        self._errors: dict[bytes, ErrorSignature] = {}
        for compiled in contracts:
            for entry in compiled.abi:
                if entry.get("type") != "error":
                    continue
                types = tuple(_abi_type(i) for i in entry["inputs"])
                selector = keccak(text=f"{entry['name']}({','.join(types)})")[:4]
                names = tuple(i["name"] for i in entry["inputs"])
                known = self._errors.get(selector)
                # An error declared alike in several contracts is named without one.
                owner = compiled.name if known is None or known.contract == compiled.name else ""
                self._errors[selector] = ErrorSignature(owner, entry["name"], types, names)

    def describe(self, data: bytes) -> str:
        if data[:4] == b"\x08\xc3\x79\xa0":  # Error(string)
            return str(abi_decode(["string"], data[4:])[0])
        signature = self._errors.get(data[:4])
        if signature is None:
            return f"reverted with unknown data 0x{data.hex()}"
        revert = self.decode(data)
        if revert is None:  # malformed error data: show what we know
            return f"{signature.name}(?)"
        args = ", ".join(
            f"{n}={_show(v)}" if n else _show(v)
            for n, v in zip(signature.names, revert.args.values(), strict=True)
        )
        prefix = f"{revert.contract}." if revert.contract else ""
        return f"{prefix}{revert.name}({args})"

    def decode(self, data: bytes) -> Revert | None:
        """The custom error in revert ``data``; None if it is not one of ours or is malformed.

        Unnamed arguments are keyed ``_0``, ``_1``... by position.
        """
        signature = self._errors.get(data[:4])
        if signature is None:
            return None
        try:
            values = abi_decode(list(signature.types), data[4:])
        except Exception:
            return None
        names = [n or f"_{i}" for i, n in enumerate(signature.names)]
        return Revert(signature.contract, signature.name, dict(zip(names, values, strict=True)))


def _abi_type(item: dict[str, Any]) -> str:
    if item["type"].startswith("tuple"):
        inner = ",".join(_abi_type(c) for c in item["components"])
        return f"({inner}){item['type'][5:]}"
    return str(item["type"])


def _show(value: Any) -> str:
    if isinstance(value, bytes):
        return "0x" + value.hex()
    return str(value)


class TransactionSender:
    def __init__(self, w3: Web3, account: LocalAccount, decoder: RevertDecoder) -> None:
        self.w3 = w3
        self.account = account
        self._decoder = decoder
        self._lock = threading.Lock()
        self._nonce: int | None = None
        self._stale = False  # set from any thread: re-read the nonce before the next send
        self.sent = 0
        self.replaced = 0

    @property
    def address(self) -> ChecksumAddress:
        return self.account.address

    def resync_nonce(self) -> None:
        """Read the nonce from the chain before the next transaction: after an outage or a
        reorg the chain may be ahead of ours (a transaction mined unseen) or behind it (a
        chain restarted from an older state)."""
        self._stale = True

    def transact(self, call: Any, *, value: int = 0, gas: int | None = None) -> TxReceipt:
        """Send a contract function call (``contract.functions.f(...)``); wait for its receipt.

        ``gas`` skips the estimate, which runs against the pending block (the
        next one's number; on a chain that mines only on demand its time may
        still lag the wall clock, so a call that depends on time can pass it).
        """
        tx = self._prepare(lambda params: call.build_transaction(params), value, gas)
        return self._send(tx)

    def deploy(self, compiled: Compiled, *args: Any) -> tuple[str, TxReceipt]:
        factory = self.w3.eth.contract(abi=compiled.abi, bytecode=compiled.bytecode)
        tx = self._prepare(lambda params: factory.constructor(*args).build_transaction(params), 0)
        receipt = self._send(tx)
        address = receipt["contractAddress"]
        if address is None:
            raise TransactionFailed(f"deploying {compiled.name} created no contract")
        return str(address), receipt

    def _prepare(self, build: Any, value: int, gas: int | None = None) -> dict[str, Any]:
        # A gas field keeps web3 from estimating at the latest block: the estimate runs
        # against the pending one, where the transaction will run (its number and time).
        base = {"from": self.address, "value": value, "chainId": self.w3.eth.chain_id}
        base["gas"] = gas if gas is not None else 0
        try:
            tx: dict[str, Any] = dict(build(base))
            if gas is None:
                del tx["gas"]
                tx["gas"] = int(self.w3.eth.estimate_gas(tx, "pending"))  # type: ignore[arg-type]
        except ContractLogicError as exc:
            raise TransactionFailed(*self._reason(exc)) from None
        tx["gas"] = gas_limit(int(tx["gas"]))
        return tx

    def _fees(self) -> dict[str, int]:
        """EIP-1559 fees from the latest base fee (room for it to double)."""
        latest = self.w3.eth.get_block("latest")
        base_fee = int(latest.get("baseFeePerGas", 0) or 0)
        return {
            "maxPriorityFeePerGas": PRIORITY_FEE_WEI,
            "maxFeePerGas": 2 * base_fee + PRIORITY_FEE_WEI,
        }

    def _send(self, tx: dict[str, Any]) -> TxReceipt:
        with self._lock:
            try:
                return self._send_locked(tx)
            except OSError:  # the RPC went away: the transaction may be out, or mined
                self._nonce = None  # re-read (pending count) before the next one
                raise

    def _send_locked(self, tx: dict[str, Any]) -> TxReceipt:
        if self._nonce is None or self._stale:
            self._stale = False
            self._nonce = self.w3.eth.get_transaction_count(self.address, "pending")
        tx["nonce"] = self._nonce
        fees = self._fees()
        hashes: list[HexBytes] = []
        for attempt in range(MAX_REPLACEMENTS + 1):
            if hashes:  # a replacement must outbid the transaction it replaces
                fees = {
                    k: max(int(v * FEE_BUMP), new)
                    for (k, v), new in zip(fees.items(), self._fees().values(), strict=True)
                }
            tx.update(fees)
            signed = self.account.sign_transaction(tx)
            try:
                hashes.append(HexBytes(self.w3.eth.send_raw_transaction(signed.raw_transaction)))
            except (ValueError, Web3Exception) as exc:  # refused: nonce, fees, balance
                self._nonce = None  # re-read from the chain next time
                raise TransactionFailed(f"transaction refused: {exc}") from None
            self.sent += 1
            receipt = self._wait_any(hashes)
            if receipt is None:
                log.warning(
                    "transaction not mined in %.0f s; replacing it (attempt %d)",
                    RECEIPT_TIMEOUT_S,
                    attempt + 1,
                )
                self.replaced += 1
                continue
            self._nonce += 1
            if receipt["status"] != 1:
                raise TransactionFailed(*self._replay_failure(tx, receipt))
            return receipt
        self._nonce = None
        raise TransactionFailed(f"transaction not mined after {MAX_REPLACEMENTS} replacements")

    def _wait_any(self, hashes: list[HexBytes]) -> TxReceipt | None:
        """The receipt of whichever of ``hashes`` (one nonce) got mined, if any in time."""
        try:
            return self.w3.eth.wait_for_transaction_receipt(hashes[-1], timeout=RECEIPT_TIMEOUT_S)
        except TimeExhausted:
            pass
        for earlier in hashes[:-1]:  # an earlier version may have been mined meanwhile
            try:
                return self.w3.eth.get_transaction_receipt(earlier)
            except TransactionNotFound:
                continue
        return None

    def _replay_failure(self, tx: dict[str, Any], receipt: TxReceipt) -> tuple[str, Revert | None]:
        """Re-run a reverted transaction as a call at its block to learn why."""
        tx_hash = receipt["transactionHash"].to_0x_hex()
        call = {k: tx[k] for k in ("from", "to", "data", "value") if k in tx}
        try:
            self.w3.eth.call(call, receipt["blockNumber"] - 1)  # type: ignore[arg-type]
        except ContractLogicError as exc:
            return self._reason(exc)
        used, limit = int(receipt["gasUsed"]), int(tx["gas"])
        if used * 64 >= limit * 63:  # all but what a call keeps back (EIP-150): out of gas
            return f"transaction {tx_hash} ran out of gas ({used:,} of its limit {limit:,})", None
        return f"transaction {tx_hash} reverted", None

    def _reason(self, exc: ContractLogicError) -> tuple[str, Revert | None]:
        """What the revert says, and the custom error when it is one of ours."""
        data = exc.data
        if isinstance(exc, ContractCustomError) or isinstance(data, str):
            raw = data if isinstance(data, str) else ""
            if raw.startswith("0x") and len(raw) >= 10:
                payload = bytes.fromhex(raw[2:])
                return self._decoder.describe(payload), self._decoder.decode(payload)
        return str(exc.message or exc), None
