"""Checking what an upstream says against what it cannot forge.

- A block's ``hash`` must be keccak256 of its RLP-encoded header, rebuilt here from the
  fields it sent (every fork's fields up to Prague): an upstream that alters a block and
  keeps its hash, or sends a hash of nothing, is caught on the block alone.
- An account's balance, nonce or code at a block must match the account in the state
  trie whose root is that block's ``stateRoot``: ``eth_getProof``'s Merkle-Patricia
  proof, checked with the ``trie`` package, settles which of two upstreams lied about it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import rlp
from eth_utils.crypto import keccak
from trie.exceptions import BadTrieProof
from trie.hexary import HexaryTrie

EMPTY_CODE_HASH = keccak(b"")
EMPTY_TRIE_ROOT = keccak(rlp.encode(b""))

# The header's fields in RLP order: (JSON name, kind); those after ``nonce`` come with
# forks (London, Shanghai, Cancun, Prague) and are present only from them on.
_HEADER = (
    ("parentHash", "bytes"),
    ("sha3Uncles", "bytes"),
    ("miner", "bytes"),
    ("stateRoot", "bytes"),
    ("transactionsRoot", "bytes"),
    ("receiptsRoot", "bytes"),
    ("logsBloom", "bytes"),
    ("difficulty", "int"),
    ("number", "int"),
    ("gasLimit", "int"),
    ("gasUsed", "int"),
    ("timestamp", "int"),
    ("extraData", "bytes"),
    ("mixHash", "bytes"),
    ("nonce", "bytes"),
)
_FORK_FIELDS = (
    ("baseFeePerGas", "int"),
    ("withdrawalsRoot", "bytes"),
    ("blobGasUsed", "int"),
    ("excessBlobGas", "int"),
    ("parentBeaconBlockRoot", "bytes"),
    ("requestsHash", "bytes"),
)


class Forged(Exception):
    """An answer that contradicts itself or its proof."""


def _field(value: Any, kind: str) -> bytes:
    if not isinstance(value, str) or not value.startswith("0x"):
        raise Forged(f"a header field is not 0x-hex: {value!r}"[:120])
    try:
        if kind == "int":
            number = int(value, 16)
            return number.to_bytes((number.bit_length() + 7) // 8, "big")
        return bytes.fromhex(value[2:])
    except ValueError:
        raise Forged(f"a header field is not hex: {value!r}"[:120]) from None


def header_hash(block: dict[str, Any]) -> bytes:
    """keccak256 of the block's header as its fields say (``Forged`` if they cannot)."""
    fields = [_field(block.get(name), kind) for name, kind in _HEADER]
    for name, kind in _FORK_FIELDS:
        if name not in block:
            break
        fields.append(_field(block[name], kind))
    return bytes(keccak(rlp.encode(fields)))


def check_block(block: Any) -> None:
    """Raise ``Forged`` unless ``block`` (a JSON-RPC block, or null) hashes to its hash."""
    if block is None:
        return
    if not isinstance(block, dict):
        raise Forged("a block that is not an object")
    claimed = block.get("hash")
    if not isinstance(claimed, str) or _field(claimed, "bytes") != header_hash(block):
        raise Forged(f"block {block.get('number')}: its hash is not its header's")


@dataclass(frozen=True)
class Account:
    nonce: int
    balance: int
    storage_root: bytes
    code_hash: bytes


def proven_account(state_root: bytes, address: str, proof: Any) -> Account | None:
    """The account at ``address`` in the state trie ``state_root``, by ``eth_getProof``'s
    ``accountProof`` (None: the proof shows it does not exist). ``Forged`` if the proof
    does not lead to that root."""
    found = _trie_value(state_root, bytes.fromhex(address[2:]), proof, "account")
    if not found:
        return None
    nonce, balance, storage_root, code_hash = rlp.decode(found)
    return Account(
        int.from_bytes(nonce, "big"), int.from_bytes(balance, "big"), storage_root, code_hash
    )


def _trie_value(root: bytes, key: bytes, proof: Any, what: str) -> bytes:
    try:
        nodes = [rlp.decode(bytes.fromhex(str(node)[2:])) for node in proof]
        return bytes(HexaryTrie.get_from_proof(root, keccak(key), nodes))  # type: ignore[no-untyped-call]
    except (BadTrieProof, ValueError, rlp.DecodingError, TypeError, KeyError) as exc:
        raise Forged(f"the {what} proof does not lead to its root: {exc}"[:200]) from None


def _quantity(value: Any) -> int:
    if not isinstance(value, str) or not value.startswith("0x"):
        raise Forged(f"not a quantity: {value!r}"[:80])
    try:
        return int(value, 16) if value != "0x" else 0
    except ValueError:
        raise Forged(f"not a quantity: {value!r}"[:80]) from None


def check_account_read(
    method: str, claimed: Any, account: Account | None, proof: Any, keys: list[Any]
) -> None:
    """Raise ``Forged`` unless ``claimed``, the answer to an account read, is what the
    proven ``account`` (None: absent) holds; storage by ``proof``'s storage proof."""
    if method == "eth_getBalance":
        expected, what = (account.balance if account else 0), "balance"
        if _quantity(claimed) != expected:
            raise Forged(f"it claimed a {what} of {_quantity(claimed)}; the state holds {expected}")
    elif method == "eth_getTransactionCount":
        if _quantity(claimed) != (account.nonce if account else 0):
            raise Forged("it claimed a nonce the state does not hold")
    elif method == "eth_getCode":
        code_hash = account.code_hash if account else EMPTY_CODE_HASH
        try:
            code = bytes.fromhex(str(claimed)[2:])
        except ValueError:
            raise Forged("code that is not hex") from None
        if keccak(code) != code_hash:
            raise Forged("it claimed code whose hash is not the account's")
    elif method == "eth_getStorageAt":
        root = account.storage_root if account else EMPTY_TRIE_ROOT
        try:
            storage = proof["storageProof"][0]["proof"]
        except (TypeError, KeyError, IndexError):
            raise Forged("a proof without a storage proof") from None
        slot = _quantity(keys[0]).to_bytes(32, "big")
        raw = _trie_value(root, slot, storage, "storage")
        expected = int.from_bytes(rlp.decode(raw), "big") if raw else 0
        if _quantity(claimed) != expected:
            raise Forged("it claimed a storage value the state does not hold")
