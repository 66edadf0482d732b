"""The node key: created, stored and loaded safely.

One secp256k1 key is both the node's libp2p identity (peer id ``16Uiu2...``)
and its Ethereum account, so a peer's signature on the wire and its signature
on-chain name the same operator. Secrets live in files only the owner can read
(mode 0600) or in an encrypted eth keystore; no repr or log line shows them.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from eth_account import Account
from eth_keys.datatypes import PrivateKey

from joynode.secret_files import SecretFileError, read_secret_file, write_secret_file

if TYPE_CHECKING:
    from libp2p.crypto.keys import KeyPair

PASSWORD_ENV = "JOYNODE_KEY_PASSWORD"  # noqa: S105 (the variable name, not a secret)


@dataclass(frozen=True)
class NodeKey:
    """A node's secp256k1 private key; derives the eth address and libp2p peer id."""

    _secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self._secret) != 32:
            raise SecretFileError("a node key is 32 bytes")
        try:
            PrivateKey(self._secret)
        except Exception as exc:  # eth_keys raises ValidationError for out-of-range scalars
            raise SecretFileError(f"not a valid secp256k1 private key: {exc}") from None

    def __repr__(self) -> str:
        return f"NodeKey(address={self.address})"

    @classmethod
    def generate(cls) -> NodeKey:
        return cls(PrivateKey(secrets.token_bytes(32)).to_bytes())

    @property
    def secret(self) -> bytes:
        """The raw key, for signing code only; never log or display it."""
        return self._secret

    @property
    def address(self) -> str:
        """EIP-55 checksummed Ethereum address."""
        return str(PrivateKey(self._secret).public_key.to_checksum_address())

    @property
    def peer_id(self) -> str:
        """libp2p peer id (base58) of the same key."""
        from libp2p.peer.id import ID

        return str(ID.from_pubkey(self.libp2p_key_pair().public_key).to_base58())

    def libp2p_key_pair(self) -> KeyPair:
        """The same key as a libp2p identity."""
        from libp2p.crypto.secp256k1 import create_new_key_pair

        return create_new_key_pair(self._secret)

    def save(self, path: Path, *, password: str | None = None, force: bool = False) -> None:
        """Write a 0600 hex file, or an encrypted eth keystore when a password is given."""
        if password is None:
            content = self._secret.hex() + "\n"
        else:
            content = json.dumps(Account.encrypt(self._secret, password)) + "\n"
        write_secret_file(path, content, force=force)

    @classmethod
    def load(cls, path: Path, *, password_file: Path | None = None) -> NodeKey:
        text = read_secret_file(path, "node key file")
        if text.startswith("{"):
            return cls._load_keystore(path, text, password_file)
        try:
            raw = bytes.fromhex(text.removeprefix("0x"))
        except ValueError:
            raise SecretFileError(
                f"node key file {path} is neither hex nor an eth keystore"
            ) from None
        if len(raw) != 32:
            raise SecretFileError(f"node key file {path} must hold 32 bytes, found {len(raw)}")
        return cls(raw)

    @classmethod
    def _load_keystore(cls, path: Path, text: str, password_file: Path | None) -> NodeKey:
        if password_file is not None:
            password = read_secret_file(password_file, "key password file")
        elif PASSWORD_ENV in os.environ:
            password = os.environ[PASSWORD_ENV]
        else:
            raise SecretFileError(
                f"node key file {path} is an encrypted keystore: set node.key_password_file "
                f"or {PASSWORD_ENV}"
            )
        try:
            return cls(bytes(Account.decrypt(json.loads(text), password)))
        except ValueError as exc:
            raise SecretFileError(f"cannot decrypt keystore {path}: {exc}") from None
