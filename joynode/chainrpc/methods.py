"""Which EVM JSON-RPC answers the gateway may keep, and which calls it may share or hedge.

An answer is kept only while nothing can change it:
- ``FOREVER``: the chain's id;
- ``BY_HASH``: what a block hash names (the block, its transactions, its logs, state
  at it: EIP-1898 ``{"blockHash": ...}``), when the answer is not empty;
- ``IF_FINAL``: what a block number names, once that block is final (the chain's
  ``finalized`` block, or ``finality_depth`` under the head): a reorg cannot reach it;
- ``RESULT_FINAL``: a transaction or receipt, once the block it names is final.
Everything that depends on ``latest``, ``pending`` or ``safe`` is never kept.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any

_HASH = re.compile(r"^0x[0-9a-fA-F]{64}$")
_QUANTITY = re.compile(r"^0x(0|[1-9a-fA-F][0-9a-fA-F]*)$")


class Keep(enum.Enum):
    NEVER = "never"
    FOREVER = "forever"
    BY_HASH = "by_hash"
    IF_FINAL = "if_final"
    RESULT_FINAL = "result_final"


@dataclass(frozen=True)
class Rule:
    keep: Keep
    block: int | None = None  # IF_FINAL: the highest block number the answer depends on


NEVER = Rule(Keep.NEVER)

# Methods whose answer depends on nothing but their arguments and the chain: safe to
# share between callers in flight and to send to a second upstream (hedging).
READS = frozenset(
    {
        "eth_chainId",
        "net_version",
        "eth_blockNumber",
        "eth_gasPrice",
        "eth_maxPriorityFeePerGas",
        "eth_feeHistory",
        "eth_estimateGas",
        "eth_call",
        "eth_getBalance",
        "eth_getCode",
        "eth_getStorageAt",
        "eth_getTransactionCount",
        "eth_getProof",
        "eth_getBlockByHash",
        "eth_getBlockByNumber",
        "eth_getBlockReceipts",
        "eth_getBlockTransactionCountByHash",
        "eth_getBlockTransactionCountByNumber",
        "eth_getTransactionByHash",
        "eth_getTransactionByBlockHashAndIndex",
        "eth_getTransactionByBlockNumberAndIndex",
        "eth_getTransactionReceipt",
        "eth_getUncleCountByBlockHash",
        "eth_getLogs",
        "eth_syncing",
        "web3_clientVersion",
    }
)

# Filters live on one upstream: their calls go to the chain's first healthy upstream.
FILTERS = frozenset(
    {
        "eth_newFilter",
        "eth_newBlockFilter",
        "eth_newPendingTransactionFilter",
        "eth_getFilterChanges",
        "eth_getFilterLogs",
        "eth_uninstallFilter",
    }
)

# The block argument's position, for methods that read state or a block by number.
_STATE_AT = {
    "eth_getBalance": 1,
    "eth_getCode": 1,
    "eth_getTransactionCount": 1,
    "eth_getStorageAt": 2,
    "eth_call": 1,
    "eth_getProof": 2,
}
_BLOCK_AT = {
    "eth_getBlockByNumber": 0,
    "eth_getBlockTransactionCountByNumber": 0,
    "eth_getTransactionByBlockNumberAndIndex": 0,
    "eth_getBlockReceipts": 0,
}
_BY_HASH = frozenset(
    {
        "eth_getBlockByHash",
        "eth_getBlockTransactionCountByHash",
        "eth_getTransactionByBlockHashAndIndex",
        "eth_getUncleCountByBlockHash",
    }
)


def quantity(value: Any) -> int | None:
    """A JSON-RPC quantity (``0x``-hex) as an int; None for anything else."""
    if isinstance(value, str) and _QUANTITY.match(value):
        return int(value, 16)
    return None


def _block_rule(block: Any) -> Rule:
    """The rule for an answer at ``block``: a tag, a number, a hash or an EIP-1898 object."""
    if isinstance(block, dict):
        if isinstance(block.get("blockHash"), str) and _HASH.match(block["blockHash"]):
            return Rule(Keep.BY_HASH)
        block = block.get("blockNumber")
    if isinstance(block, str) and _HASH.match(block):
        return Rule(Keep.BY_HASH)
    if block == "earliest":
        return Rule(Keep.IF_FINAL, 0)
    number = quantity(block)
    return NEVER if number is None else Rule(Keep.IF_FINAL, number)


def rule_of(method: str, params: Any) -> Rule:
    """How long the answer to ``method(params)`` may be kept."""
    args = params if isinstance(params, list) else []
    if method in ("eth_chainId", "net_version"):
        return Rule(Keep.FOREVER)
    if method in _BY_HASH:
        return Rule(Keep.BY_HASH) if args and _HASH.match(str(args[0])) else NEVER
    if method in _BLOCK_AT:
        at = _BLOCK_AT[method]
        return _block_rule(args[at]) if len(args) > at else NEVER
    if method in _STATE_AT:
        at = _STATE_AT[method]
        return _block_rule(args[at]) if len(args) > at else NEVER  # omitted: latest
    if method in ("eth_getTransactionByHash", "eth_getTransactionReceipt"):
        return Rule(Keep.RESULT_FINAL) if args and _HASH.match(str(args[0])) else NEVER
    if method == "eth_getLogs" and args and isinstance(args[0], dict):
        return logs_rule(args[0])
    return NEVER


def logs_rule(query: dict[str, Any]) -> Rule:
    if isinstance(query.get("blockHash"), str):
        return Rule(Keep.BY_HASH) if _HASH.match(query["blockHash"]) else NEVER
    low, high = logs_range(query)
    if low is None or high is None:
        return NEVER
    return Rule(Keep.IF_FINAL, high)


def logs_range(query: dict[str, Any]) -> tuple[int | None, int | None]:
    """An ``eth_getLogs`` query's blocks, when both ends are numbers (the default of
    each is ``latest``, which is not)."""
    low = 0 if query.get("fromBlock") == "earliest" else quantity(query.get("fromBlock"))
    high = 0 if query.get("toBlock") == "earliest" else quantity(query.get("toBlock"))
    return low, high


def result_block(result: Any) -> int | None:
    """The block a transaction or receipt names (None: pending, or not found)."""
    if isinstance(result, dict):
        return quantity(result.get("blockNumber"))
    return None
